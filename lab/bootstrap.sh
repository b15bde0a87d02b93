#!/usr/bin/env bash
# Set up everything Phoenix needs on a fresh machine, idempotently:
#   1. uv (Python package manager) if missing,
#   2. the project virtualenv (.venv) with all extras, from uv.lock, and the lab (lab/, a
#      distribution of its own that the runtime wheel never ships) from the uv workspace,
#   3. the lab's node runtime from Debian packages (containerd, runc, CNI plugins, iptables) and
#      the image tools (Docker engine, debootstrap, busybox-static),
#   4. the lab binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
#      CoreDNS, versitygw, SeaweedFS, prometheus/promtool, kubectl, helm), built from the Go
#      module proxy and cached under ~/.cache/phoenix.
#   5. meanwhile, in the background, the lab's images and node image (`phoenix-lab prepare`:
#      Debian base, operator and trainer images, the containerd root nodes boot from): they
#      wait on the network and the disk while the Go builds keep both cores busy, so a fresh
#      machine gets both in about the time of the longer. `--no-images` skips them (unit
#      tests need none; `phoenix-lab up` builds whatever is missing anyway).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bootstrap] %s\n' "$*" >&2; }

images=1
for arg in "$@"; do
  case "$arg" in
    --no-images) images=0 ;;
    *) say "unknown option $arg (--no-images)"; exit 2 ;;
  esac
done

export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  say "installing uv"
  # A distribution's own python refuses user installs (PEP 668); uv is one static binary,
  # so a user-site install of it is harmless there.
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv \
    2>/dev/null || python3 -m pip install --quiet --user --break-system-packages uv
  export PATH="$HOME/.local/bin:$PATH"
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  uv venv --quiet --python python3 .venv
fi
# Compiled bytecode matters here: every trainer pod imports torch, and without .pyc files
# (e.g. under PYTHONDONTWRITEBYTECODE=1) that import costs 6-20 s instead of ~3 s.
stamp=.venv/.phoenix-sync-stamp
want=$(cat pyproject.toml lab/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "syncing Python dependencies (first run downloads torch: a few minutes)"
  # --extra dev: the runtime's extras and the test tools; the default `dev` dependency
  # group adds the lab (phoenix-jobs-lab, editable from lab/).
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

prepare_pid=""
if [ "$images" = 1 ]; then
  mkdir -p "${PHOENIX_CACHE:-$HOME/.cache/phoenix}"
  prepare_log="${PHOENIX_CACHE:-$HOME/.cache/phoenix}/prepare.log"
  say "building the lab's images and node image in the background (log: $prepare_log)"
  .venv/bin/python -m phoenix_lab.cli prepare >"$prepare_log" 2>&1 &
  prepare_pid=$!
  # A failed binary build must not leave the image build running behind our exit.
  trap '[ -z "$prepare_pid" ] || kill "$prepare_pid" 2>/dev/null || true' EXIT
fi

say "building/caching lab binaries"
t0=$SECONDS
bash lab/build-binaries.sh
say "binaries ready ($((SECONDS - t0))s)"

if [ -n "$prepare_pid" ]; then
  waited=0
  while kill -0 "$prepare_pid" 2>/dev/null; do
    [ $((waited % 15)) -ne 0 ] || say "images: $(tail -n1 "$prepare_log" 2>/dev/null | cut -c1-110)"
    sleep 1; waited=$((waited + 1))
  done
  rc=0; wait "$prepare_pid" || rc=$?
  prepare_pid=""
  if [ "$rc" -ne 0 ]; then
    say "error: building the lab's images failed (exit $rc); the end of $prepare_log:"
    tail -n 25 "$prepare_log" >&2
    exit "$rc"
  fi
  say "images and node image ready ($((SECONDS - t0))s after the binaries started)"
fi
say "ready"
