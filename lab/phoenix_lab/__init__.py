"""The Phoenix lab: a real local Kubernetes control plane and S3 server, without Docker.

etcd, kube-apiserver and kube-controller-manager are real binaries built from the Go module
proxy (``lab/build-binaries.sh``); pods run as local processes under a Python node agent;
object storage is versitygw on loopback. Everything listens on 127.0.0.1 only.
"""
