"""`phoenix-lab`: build, start, stop and inspect the local lab cluster."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from . import paths
from .cluster import Lab
from .procs import LabError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="phoenix-lab", description=__doc__)
    ap.add_argument("--state-dir", type=Path, default=None,
                    help="where the lab keeps its state (default: $PHOENIX_LAB_DIR or <repo>/.lab)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build/cache the lab's binaries (control plane, kubelet, CoreDNS, "
                                 "versitygw, SeaweedFS, kubectl, helm)")
    imgs = sub.add_parser("images", help="build the lab's images (base, pause, operator, trainer); "
                                         "see 'phoenix-lab images -h'")
    imgs.add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("prepare", help="build the images and the node image that 'up' boots nodes "
                                   "from, without starting anything")
    sub.add_parser("up", help="build the images if needed and start the lab (idempotent; "
                              "cleans up after a crash)")
    down = sub.add_parser("down", help="stop the lab")
    down.add_argument("--purge", action="store_true", help="also delete the lab's state dir")
    sub.add_parser("status", help="show which lab parts are running")
    lose = sub.add_parser("lose-node", help="node loss: kill a node's kubelet, containerd and "
                                            "containers at once; a replacement spot node registers")
    lose.add_argument("node")
    sub.add_parser("env", help="print shell exports for KUBECONFIG and PATH")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            return subprocess.call(["bash", str(paths.BUILD_SCRIPT)])
        if args.cmd == "images":
            from . import images

            return images.main(args.rest)
        if args.cmd == "prepare":
            from .cluster import prepare

            print(f"node image ready: {prepare()}")
            return 0
        lab = Lab(args.state_dir)
        if args.cmd == "up":
            lab.up()
            print(lab.kubectl("get", "nodes", "-L", "phoenix.dev/spot").stdout, end="")
        elif args.cmd == "down":
            lab.down()
            if args.purge:
                import shutil

                shutil.rmtree(lab.state_dir, ignore_errors=True)
        elif args.cmd == "status":
            status = lab.status()
            print(json.dumps(status, indent=2))
            return 0 if all(status.values()) else 1
        elif args.cmd == "lose-node":
            print(f"replacement: {lab.lose_node(args.node, wait=True).name} (Ready)")
        elif args.cmd == "env":
            print(f"export KUBECONFIG={lab.kubeconfig}")
            print(f"export PATH={paths.bin_dir()}:$PATH")
    except (LabError, FileNotFoundError) as e:
        print(f"phoenix-lab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
