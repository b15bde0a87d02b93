"""A/B: one benchmark, two trees of this repository, alternating in the same run.

A refactor is judged against the tree before it on the same machine in the same hour: the
noise of a shared 2-CPU machine is larger than most regressions, and only alternation
(base, new, new, base, ...) spreads that noise evenly over both. Each run writes the
benchmark's own JSON; this script keeps every run's numbers and reports, per numeric field,
the median of each side and new/base.

Two ways to swap the code under test:
- whole tree (default): the base run is the base tree's own script with the base tree on
  PYTHONPATH (bench_checkpoint: the runtime, the writer and the storage all swap);
- ``--operator-only``: both runs are this tree's script; the base run starts its operator
  from the base tree (``PHOENIX_BENCH_OPERATOR_TREE``, read by ``benchlab.Operator``). For
  lab benchmarks (bench_recovery): the lab, its images and the fake trainer stay this
  tree's, so only the operator differs and no image is rebuilt between runs.

    .venv/bin/python benchmarks/ab.py --base 9bfa27b --rounds 3 \\
        --out benchmarks/results/ab-checkpoint.json bench_checkpoint -- --reps 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchstats import percentile  # noqa: E402

OPERATOR_TREE_ENV = "PHOENIX_BENCH_OPERATOR_TREE"


def numeric_leaves(doc, prefix: str = "") -> dict[str, float]:
    """Every int/float in a JSON document, keyed by its dotted path; lists are skipped
    (they hold raw samples, summarized beside them)."""
    out: dict[str, float] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.update(numeric_leaves(v, f"{prefix}{k}."))
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        out[prefix.rstrip(".")] = float(doc)
    return out


def compare(base_runs: list[dict], new_runs: list[dict]) -> dict[str, dict]:
    """Per field present in every run of both sides: the medians and new/base."""
    flat_base = [numeric_leaves(r) for r in base_runs]
    flat_new = [numeric_leaves(r) for r in new_runs]
    keys = set.intersection(*(set(f) for f in flat_base + flat_new)) if flat_base and flat_new else set()
    out = {}
    for key in sorted(keys):
        b = percentile([f[key] for f in flat_base], 0.5)
        n = percentile([f[key] for f in flat_new], 0.5)
        out[key] = {"base_median": b, "new_median": n,
                    "new_over_base": round(n / b, 3) if b else None}
    return out


def order(rounds: int) -> list[str]:
    """base, new, new, base, base, new, ...: each side goes first equally often."""
    seq: list[str] = []
    for i in range(rounds):
        seq += ["base", "new"] if i % 2 == 0 else ["new", "base"]
    return seq


def base_tree(rev: str, where: Path) -> Path:
    tree = where / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), rev],
                   check=True)
    return tree


def run_once(side: str, bench: str, args: list[str], base: Path, operator_only: bool,
             out: Path) -> dict:
    tree = REPO if (side == "new" or operator_only) else base
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in ("operator", "trainer_image", "lab"))
    env.pop(OPERATOR_TREE_ENV, None)
    if operator_only and side == "base":
        env[OPERATOR_TREE_ENV] = str(base)
    cmd = [sys.executable, str(tree / "benchmarks" / f"{bench}.py"), "--out", str(out), *args]
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=tree, env=env, check=True)
    print(f"ab: {side} run of {bench} took {time.monotonic() - t0:.0f} s", flush=True)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the git revision to compare against")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side")
    ap.add_argument("--operator-only", action="store_true",
                    help="swap only the operator process (lab benchmarks)")
    ap.add_argument("--out", required=True)
    ap.add_argument("bench", help="a script in benchmarks/, without .py (bench_checkpoint)")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: the script's options")
    a = ap.parse_args()
    bench_args = a.bench_args[1:] if a.bench_args[:1] == ["--"] else a.bench_args
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="phoenix-ab-") as tmp:
        base = base_tree(a.base, Path(tmp))
        try:
            for i, side in enumerate(order(a.rounds)):
                print(f"ab: run {i + 1}/{2 * a.rounds}: {side}", flush=True)
                runs[side].append(run_once(side, a.bench, bench_args, base, a.operator_only,
                                           Path(tmp) / f"{side}-{i}.json"))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)],
                           check=False)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    result = {"bench": a.bench, "args": bench_args, "base": a.base, "new": head,
              "operator_only": a.operator_only, "order": order(a.rounds),
              "compare": compare(runs["base"], runs["new"]), "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    for key, row in result["compare"].items():
        print(f"{key:60s} base {row['base_median']:12.4g}  new {row['new_median']:12.4g}"
              f"  new/base {row['new_over_base']}")
    print(f"ab: results in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
