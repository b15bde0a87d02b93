"""What a long run's history costs: the size of ``history.jsonl`` for N attempts (each with
its start and end record, half of them a standby and a notice too, as a spot job with
standbys writes them) and the time to read it in one GET and decode it, to append one more
attempt (the operator's read-modify-write) and to build ``phoenixctl report`` from it. The
baseline, measured in the same run: one GET of the phase's ``fence.json`` (the read every
recovery already makes), so the figures read as "so many fence reads".

    python benchmarks/bench_history.py --attempts 1000 --out benchmarks/results/history.json

Starts its own S3 server (versitygw via phoenix_lab.s3.S3Server) in a temp dir. Never run by
the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from benchstats import ratio, summary
from phoenix_lab.s3 import S3Server
from phoenix_operator import history
from phoenix_operator.decide import AttemptEnd
from phoenix_operator.phase_storage import append_history, read_history
from phoenix_operator.phoenixjob import JobSpec
from phoenix_operator.report import build_report
from phoenix_trainer.core.handshake import Fence, LeaderTerm, read_fence, write_fence
from phoenix_trainer.core.layout import HISTORY_KEY
from phoenix_trainer.core.storage import Credentials, open_storage

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
BY = {"replica": "phoenix-operator-6d9f7c5b8-x2k4q", "term": 12, "lease": "0b6c1c4e-7f0e-4d0e"}


def attempt_records(a: int) -> list[dict]:
    t = T0 + timedelta(minutes=30 * a)
    ck = f"s3://bucket/runs/llama-8b/pretrain/step-{a * 500:010d}"
    out = [history.start_record("pretrain", a, f"llama-8b-pretrain-{a}", resume_from=ck,
                                promoted=a % 2 == 0, time=t, by=BY, previous_cause="preemption")]
    if a % 2:
        out.append(history.standby_record("pretrain", a + 1, f"llama-8b-pretrain-{a + 1}",
                                          time=t + timedelta(minutes=1), by=BY))
        out += history.notice_records({"phases": [{"name": "pretrain", "lastNotice": {
            "node": f"ip-10-0-{a % 250}-{a % 200}.ec2.internal", "signal": "taint karpenter.sh/disrupted",
            "attempt": a, "time": history.iso(t + timedelta(minutes=29)), "handoffTo": a + 1}}]}, BY)
    digest = {"trainStart": history.iso(t + timedelta(seconds=40)), "startStep": a * 500,
              "lastStep": a * 500 + 517, "trainSeconds": 1700.0, "checkpoints": 10,
              "lastCheckpointStep": a * 500 + 500}
    out.append(history.end_record(AttemptEnd(
        phase="pretrain", attempt=a, cause="preemption", reason="Evicted",
        ended=t + timedelta(minutes=30), pod=f"llama-8b-pretrain-{a}",
        node=f"ip-10-0-{a % 250}-{a % 200}.ec2.internal", created=t, exit_code=143,
        message="the node was reclaimed", stopped_step=a * 500 + 517,
        checkpoint=f"{ck[:-10]}{a * 500 + 517:010d}"), by=BY, gpus=8, digest=digest))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attempts", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/history.json"))
    args = ap.parse_args()
    records = [r for a in range(1, args.attempts + 1) for r in attempt_records(a)]
    term = LeaderTerm(term=12, leader=BY["replica"], lease_uid=BY["lease"])
    with tempfile.TemporaryDirectory() as tmp:
        server = S3Server(Path(tmp) / "s3")
        ep = server.start()
        try:
            ep.client().create_bucket(Bucket="bench-history")
            creds = Credentials(endpoint_url=ep.url, access_key=ep.access_key,
                                secret_key=ep.secret_key)
            spec = JobSpec.parse({"phases": [{"name": "pretrain"}],
                                  "checkpoint": {"uri": "s3://bench-history/run"}})
            storage = open_storage("s3://bench-history/run/pretrain", creds)
            append_history(spec, "pretrain", records, credentials=creds, writer=term)
            write_fence(storage, Fence(args.attempts, "p", "2026-03-01T00:00:00Z", "", uid="u",
                                       job="ns/j", writer=term))
            size = storage.size(HISTORY_KEY)
            times: dict[str, list[float]] = {"fence_get": [], "history_read": [],
                                             "history_append": [], "report": []}
            extra = args.attempts + 1
            for _ in range(args.reps):
                t0 = time.perf_counter()
                read_fence(storage)
                times["fence_get"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                got = read_history(spec, "pretrain", credentials=creds)
                times["history_read"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                build_report("ns/j", got)
                times["report"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                append_history(spec, "pretrain", attempt_records(extra), credentials=creds,
                               writer=term)
                times["history_append"].append(time.perf_counter() - t0)
                extra += 1
            assert len(got) >= len(records)
        finally:
            server.stop()
    stats = {k: summary(v, samples=False) for k, v in times.items()}
    result = {"benchmark": "history", "host": platform.node(), "cpus": os.cpu_count(),
              "attempts": args.attempts, "records": len(records), "bytes": size,
              "bytes_per_attempt": round(size / args.attempts, 1),
              "seconds": {k: {q: round(v[q], 5) for q in ("p50", "p95")} for k, v in stats.items()},
              "read_vs_fence_get": ratio(stats["history_read"]["p50"], stats["fence_get"]["p50"]),
              "append_vs_fence_get": ratio(stats["history_append"]["p50"], stats["fence_get"]["p50"])}
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
