"""The code blocks of README.md and docs/ cannot rot.

- Python: every ```python block is a complete program kept as a file under docs/snippets/;
  the block is preceded by ``<!-- snippet: docs/snippets/<name>.py -->`` and must equal the
  file. Every snippet runs here: stopped by a real SIGTERM at a step, resumed through the env
  contract, and it must end with an uninterrupted run's checkpoint, tensor for tensor.
- YAML: every key of a PhoenixJob or status block exists in the CRD's schema; a complete
  PhoenixJob also starts its first phase (as tests/unit/operator/test_examples.py does for
  examples/). JSON: the termination message parses.
- Shell: the commands need a machine set up or a cluster (make, kubectl, helm, the lab) and
  are not run; the repository paths and make targets they name must exist, and every
  ``phoenixctl`` CLI command shown parses with the CLI's own parser. (``text`` blocks are
  synopses and layouts: not checked.)
"""
from __future__ import annotations

import json
import os
import re
import runpy
import signal
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SNIPPETS = sorted((REPO / "docs" / "snippets").glob("*.py"))
_BLOCK = re.compile(r"(?:<!-- snippet: (?P<ref>\S+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```\n",
                    re.S | re.M)


def blocks(lang: str) -> list[tuple[str, str | None, str]]:
    """(where, snippet reference, text) of each fenced block in ``lang``."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in _BLOCK.finditer(text):
            if m.group("lang") == lang:
                line = text[: m.start("body")].count("\n")
                out.append((f"{path.relative_to(REPO)}:{line}", m.group("ref"), m.group("body")))
    return out


# ------------------------------------------------------------------ python ---------------
def test_every_python_block_is_a_snippet_file_verbatim():
    found = blocks("python")
    assert found, "no python blocks found: is the pattern still right?"
    for where, ref, body in found:
        assert ref is not None, \
            f"{where}: a python block must be a docs/snippets file (<!-- snippet: ... -->)"
        assert (REPO / ref).read_text() == body, f"{where}: the block differs from {ref}"
    assert {REPO / ref for _, ref, _ in found} == set(SNIPPETS), "a snippet file no doc shows, or the reverse"


def run_snippet(path: Path, root: Path, attempt: int, monkeypatch, sigterm_after: int | None = None) -> int:
    """One attempt of the snippet as a program (in this process, as ``__main__``); its exit code."""
    from phoenix_trainer.session import Session

    for key in [k for k in os.environ if k.startswith("PHOENIX_")]:
        monkeypatch.delenv(key)
    for key, value in {"PHOENIX_CHECKPOINT_URI": (root / "train").as_uri(), "PHOENIX_ATTEMPT": str(attempt),
                       "PHOENIX_CHECKPOINT_INTERVAL_STEPS": "10", "PHOENIX_PREFETCH": "0",
                       "PHOENIX_TERMINATION_LOG": str(root / f"termination-{attempt}")}.items():
        monkeypatch.setenv(key, value)
    if sigterm_after is not None:  # a SIGTERM arriving during step sigterm_after + 1
        own = Session.should_checkpoint

        def should_checkpoint(self, step):
            if step == sigterm_after:
                os.kill(os.getpid(), signal.SIGTERM)
            return own(self, step)

        monkeypatch.setattr(Session, "should_checkpoint", should_checkpoint)
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        monkeypatch.undo()
    return 0


def final_state(root: Path) -> dict:
    from phoenix_trainer.checkpoint import load_checkpoint
    from phoenix_trainer.core.layout import latest_valid_checkpoint
    from phoenix_trainer.core.storage.file import LocalStorage

    storage = LocalStorage(root / "train")
    info = latest_valid_checkpoint(storage)
    assert info is not None and info.step == 40, info
    return load_checkpoint(storage, info)


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=[pytest.mark.slow] if "lightning" in p.name or "transformers" in p.name else [])
    for p in SNIPPETS], ids=lambda p: p.name)
def test_snippet_runs_stops_on_sigterm_and_resumes_exactly(path, tmp_path, monkeypatch):
    from phoenix_trainer.core.contract import TerminationMessage
    from trainer_procs import tensors_equal

    if "lightning" in path.name:
        pytest.importorskip("lightning")
    if "transformers" in path.name:
        pytest.importorskip("transformers")
    assert run_snippet(path, tmp_path / "ref", 0, monkeypatch) == 0
    assert run_snippet(path, tmp_path / "run", 0, monkeypatch, sigterm_after=13) == 143
    stopped = TerminationMessage.from_json((tmp_path / "run" / "termination-0").read_text())
    assert stopped.reason == "preempted" and stopped.emergencySaveCompleted, stopped
    assert stopped.step in (13, 14), stopped  # the step the signal came in, or the next
    assert run_snippet(path, tmp_path / "run", 1, monkeypatch) == 0
    done = TerminationMessage.from_json((tmp_path / "run" / "termination-1").read_text())
    assert done.reason == "completed" and done.resumeExact, done
    ref, run = final_state(tmp_path / "ref"), final_state(tmp_path / "run")
    shards = set(ref) - {"trainer.json"}
    assert {"model.pt"} <= shards and shards == set(run) - {"trainer.json"}
    for name in sorted(shards):
        a, b = run[name], ref[name]
        if name == "lightning.pt":  # its loops' progress counters count restarts too
            a, b = ({k: v for k, v in d.items() if k != "loops"} for d in (a, b))
            assert "ema" in a
        assert tensors_equal(a, b), f"{path.name}: {name} differs after the resume: " + \
            str([k for k in a if not tensors_equal(a[k], b.get(k))] if isinstance(a, dict) else "")


# ------------------------------------------------------------------ yaml / json ----------
def _crd_schema() -> dict:
    crd = yaml.safe_load((REPO / "crds" / "phoenixjobs.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def unknown_keys(value, schema: dict, path: str) -> list[str]:
    """Keys of ``value`` that the schema does not define (where it defines its properties)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    bad = []
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in value.items():
            if key not in schema["properties"]:
                bad.append(f"{path}.{key}")
            else:
                bad += unknown_keys(sub, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            bad += unknown_keys(item, schema["items"], f"{path}[]")
    return bad


def test_yaml_blocks_use_only_fields_the_crd_defines():
    schema, checked = _crd_schema(), 0
    for where, _, body in blocks("yaml"):
        doc = yaml.safe_load(body)
        if doc.get("kind") == "PhoenixJob" or "status" in doc:
            checked += 1
            assert unknown_keys(doc, schema, "") == [], where
    assert checked >= 4


def test_complete_phoenixjob_blocks_start_their_first_phase():
    from phoenix_operator.decide import Listing, decide

    complete = [(w, yaml.safe_load(b)) for w, _, b in blocks("yaml")]
    complete = [(w, d) for w, d in complete
                if d.get("kind") == "PhoenixJob" and "name" in d.get("metadata", {})]
    assert len(complete) >= 2
    for where, body in complete:
        body["metadata"].update(namespace="default", uid="u", generation=1)
        first = body["spec"]["phases"][0]["name"]
        plan = decide(body, [], {first: Listing()}, datetime(2026, 1, 1, tzinfo=timezone.utc))
        assert [c.name for c in plan.create] == [f"{body['metadata']['name']}.{first}-1"], where


def test_json_blocks_parse_as_what_they_document():
    from phoenix_trainer.core.contract import TerminationMessage

    found = blocks("json")
    assert found
    for where, _, body in found:
        msg = TerminationMessage.from_json(body)
        assert json.loads(msg.to_json())["reason"] == json.loads(body)["reason"], where


# ------------------------------------------------------------------ shell ----------------
_TOP = "examples|docs|charts|crds|lab|trainer_image|operator|benchmarks|tests"
_PATH = re.compile(rf"(?<![\w/.~$-])((?:{_TOP})/[\w./-]*\w)")


def test_shell_blocks_name_paths_and_make_targets_that_exist():
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    shell = [b for lang in ("bash", "console", "") for b in blocks(lang)]
    assert shell
    for where, _, body in shell:
        for p in _PATH.findall(body):
            assert (REPO / p).exists(), f"{where}: {p} does not exist"
        for target in re.findall(r"^\s*make ([\w-]+)", body, re.M):
            assert target in targets, f"{where}: no make target {target}"


def test_phoenix_cli_commands_in_the_docs_parse():
    import shlex

    from phoenix_operator.kubectl_phoenix import build_parser

    lines = [line.split("#")[0] for lang in ("bash", "console") for _, _, body in blocks(lang)
             for line in body.splitlines()]
    commands = [line for line in lines if re.match(r"^(\$ )?(phoenixctl|kubectl phoenix) \w", line)]
    assert len(commands) >= 3
    # The command was renamed from `phoenix` (another tool's name): no doc shows the old one.
    assert not [line for line in lines if re.match(r"^(\$ )?phoenix \w", line)]
    for line in commands:
        words = shlex.split(line.removeprefix("$ ").removeprefix("kubectl "))[1:]
        build_parser().parse_args(words)  # SystemExit(2) names what is wrong
