"""The Phoenix lab: a real local Kubernetes cluster on one machine, with real nodes.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and CoreDNS are real
binaries built from the Go module proxy (``lab/build-binaries.sh``); each node is a kubelet
with its own containerd and CNI bridge running the repository's own images
(``images.py``, ``nodes.py``); object storage is versitygw. Traffic stays on loopback and on
the lab's own bridges (``network.py``).
"""
