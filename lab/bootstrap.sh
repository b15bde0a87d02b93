#!/usr/bin/env bash
# Set up everything Phoenix needs on a fresh machine, idempotently:
#   1. uv (Python package manager) if missing,
#   2. the project virtualenv (.venv) with all extras, from uv.lock,
#   3. the lab's node runtime from Debian packages (containerd, runc, CNI plugins, iptables) and
#      the image tools (Docker engine, debootstrap, busybox-static),
#   4. the lab binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
#      CoreDNS, versitygw, kubectl, helm), built from the Go module proxy and cached under
#      ~/.cache/phoenix.
# The images themselves are built by `phoenix-lab up` (lab/phoenix_lab/images.py).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bootstrap] %s\n' "$*" >&2; }

if ! command -v uv >/dev/null 2>&1; then
  say "installing uv"
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
  export PATH="$HOME/.local/bin:$PATH"
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  uv venv --quiet --python python3 .venv
fi
# Compiled bytecode matters here: every trainer pod imports torch, and without .pyc files
# (e.g. under PYTHONDONTWRITEBYTECODE=1) that import costs 6-20 s instead of ~3 s.
stamp=.venv/.phoenix-sync-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "syncing Python dependencies (first run downloads torch: a few minutes)"
  uv sync --quiet --extra dev --compile-bytecode
  echo "$want" > "$stamp"
else
  say "Python dependencies up to date"
fi

# Debian packages the lab's real nodes and image builds need (root: apt-get as it is).
packages=(containerd runc containernetworking-plugins iptables iproute2 util-linux
          docker.io debootstrap busybox-static)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    say "error: the lab needs root to install ${missing[*]} (and to run kubelets)"; exit 2
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

say "building/caching lab binaries"
bash lab/build-binaries.sh
say "ready"
