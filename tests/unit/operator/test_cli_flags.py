"""The `phoenixctl` CLI's kubectl habits without a cluster: global flags anywhere on the line,
the namespace from the chosen kubeconfig context, -o json|yaml, and the `kubectl phoenix`
program name. The API is replaced at `cli._connect`; everything before it is the real code."""
from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
import yaml

from phoenix_operator import kubectl_phoenix as cli
from phoenix_trainer.core.layout import CheckpointInfo, Manifest
from phoenix_trainer.core.storage import FileEntry

from opfacts import job, phase_status, status

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]


# --- flags anywhere on the line ----------------------------------------------------------

WANT = {"context": "lab", "namespace": "team", "output": "json", "kubeconfig": "/k"}


@pytest.mark.parametrize("argv", [
    ["--context", "lab", "-n", "team", "-o", "json", "--kubeconfig", "/k", "status", "j"],
    ["status", "--context", "lab", "-n", "team", "-o", "json", "--kubeconfig", "/k", "j"],
    ["status", "j", "--context", "lab", "-n", "team", "-o", "json", "--kubeconfig", "/k"],
    ["--context=lab", "status", "-nteam", "j", "-ojson", "--kubeconfig=/k"],
    ["-n", "team", "--kubeconfig", "/k", "status", "j", "--output", "json", "--context", "lab"],
    ["status", "--namespace=team", "j", "--output=json", "--context=lab", "--kubeconfig", "/k"],
], ids=["before", "after-command", "after-job", "mixed-forms", "split", "long-equals"])
def test_global_flags_anywhere_on_the_line(argv):
    args = cli.parse_args(argv)
    assert {k: getattr(args, k) for k in WANT} == WANT
    assert args.command == "status" and args.job == "j"


def test_flags_before_the_command_survive_the_subcommand_defaults():
    # The subcommand has its own copy of every global flag; an absent one must not reset a
    # value given before the command to None.
    args = cli.parse_args(["-n", "team", "-o", "yaml", "--context", "lab", "checkpoints", "j"])
    assert (args.namespace, args.output, args.context) == ("team", "yaml", "lab")


def test_flags_default_to_none_and_the_last_one_wins():
    args = cli.parse_args(["reset", "j"])
    assert (args.namespace, args.output, args.context, args.kubeconfig) == (None,) * 4
    args = cli.parse_args(["-n", "first", "reset", "j", "-n", "second"])
    assert args.namespace == "second"


def test_command_flags_still_work_beside_global_ones():
    args = cli.parse_args(["checkpoints", "-n", "ns", "j", "--phase", "eval", "--strict",
                           "--shallow", "--endpoint", "http://s3:9000", "-o", "yaml"])
    assert (args.phase, args.strict, args.shallow, args.endpoint, args.output) == (
        "eval", True, True, "http://s3:9000", "yaml")
    args = cli.parse_args(["reset", "j", "--force", "--phase", "train", "-n", "ns"])
    assert (args.force, args.phase, args.namespace) == (True, "train", "ns")


def test_no_abbreviated_flags():
    # kubectl takes no prefixes; with one set of flags in two parsers they would be ambiguous
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["status", "j", "--names", "x"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv", [["-o", "xml", "status", "j"], ["status", "j", "-o", "wide"]])
def test_unknown_output_format_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "-o/--output" in err and "invalid choice" in err and "json" in err


# --- program name: phoenixctl or kubectl phoenix ------------------------------------------


@pytest.mark.parametrize("argv0, prog", [
    ("/usr/local/bin/kubectl-phoenix", "kubectl phoenix"),
    ("kubectl-phoenix", "kubectl phoenix"),
    (r"C:\bin\kubectl-phoenix.exe", "kubectl phoenix") if os.sep == "\\" else
    ("/bin/kubectl-phoenix.exe", "kubectl phoenix"),
    ("/usr/local/bin/phoenixctl", "phoenixctl"),
    ("/repo/operator/phoenix_operator/kubectl_phoenix.py", "phoenixctl"),  # python -m phoenix_operator.kubectl_phoenix
    ("/usr/local/bin/kubectl-phoenix-lab", "phoenixctl"),
])
def test_program_name(argv0, prog):
    assert cli.program_name(argv0) == prog


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"]])
def test_help_names_the_kubectl_plugin(argv, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/kubectl-phoenix", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kubectl phoenix " + ("status " if "status" in argv else ""))
    assert "--context" in out and "--namespace" in out and "--output" in out


def test_usage_errors_name_phoenixctl(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/phoenixctl"])
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("usage: phoenixctl ")


def test_both_console_scripts_run_the_same_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubectl-phoenix"] == scripts["phoenixctl"] == "phoenix_operator.kubectl_phoenix:main"


def test_no_console_script_is_called_phoenix():
    # `phoenix` is another tool's command (and another project's package name): installing
    # ours beside it must not replace it (docs/install.md, "Names").
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "phoenix" not in project["scripts"]
    assert project["name"] != "phoenix"


# --- namespace from the chosen context ---------------------------------------------------


def kubeconfig(path: Path, contexts: dict[str, str | None], current: str | None) -> str:
    entries = []
    for name, ns in contexts.items():
        ctx = {"cluster": "c", "user": "u"}
        if ns:
            ctx["namespace"] = ns
        entries.append({"name": name, "context": ctx})
    doc = {"apiVersion": "v1", "kind": "Config", "contexts": entries,
           "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
           "users": [{"name": "u", "user": {"token": "t"}}]}
    if current:
        doc["current-context"] = current
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture
def kcfg(tmp_path) -> str:
    return kubeconfig(tmp_path / "config", {"lab": "ns-lab", "prod": "ns-prod", "bare": None},
                      current="lab")


@pytest.mark.parametrize("context, flag, want", [
    (None, None, ("lab", "ns-lab")),
    ("prod", None, ("prod", "ns-prod")),  # not the current-context: its own namespace
    ("bare", None, ("bare", "default")),
    ("prod", "mine", ("prod", "mine")),
    (None, "mine", ("lab", "mine")),
])
def test_namespace_comes_from_the_chosen_context(kcfg, context, flag, want):
    t = cli.resolve_target(kcfg, context, flag, environ={})
    assert (t.context, t.namespace) == want and t.kubeconfig == kcfg


def test_kubeconfig_env_with_several_files(tmp_path):
    # As the kubernetes client (and kubectl) merge them: the first file that names a
    # context wins; a later file may add contexts and the current-context.
    first = kubeconfig(tmp_path / "a", {"lab": "from-first"}, current=None)
    second = kubeconfig(tmp_path / "b", {"lab": "from-second", "prod": "ns-prod"},
                        current="lab")
    env = {"KUBECONFIG": os.pathsep.join([first, second])}
    assert cli.resolve_target(None, None, None, env).namespace == "from-first"
    assert cli.resolve_target(None, "prod", None, env).namespace == "ns-prod"
    # --kubeconfig beats $KUBECONFIG
    assert cli.resolve_target(second, None, None, env).namespace == "from-second"


def test_default_kubeconfig_is_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".kube").mkdir()
    kubeconfig(tmp_path / ".kube" / "config", {"home": "ns-home"}, current="home")
    assert cli.resolve_target(None, None, None, environ={}).namespace == "ns-home"
    assert cli.kubeconfig_paths(None, {"KUBECONFIG": ""}) == "~/.kube/config"


def test_unknown_context_names_it_and_the_known_ones(kcfg):
    with pytest.raises(cli.CliError) as e:
        cli.resolve_target(kcfg, "nope", None, environ={})
    assert '"nope"' in str(e.value) and "lab, prod, bare" in str(e.value)


def test_no_current_context_asks_for_one(tmp_path):
    path = kubeconfig(tmp_path / "config", {"lab": "ns-lab"}, current=None)
    with pytest.raises(cli.CliError, match="--context"):
        cli.resolve_target(path, None, None, environ={})
    assert cli.resolve_target(path, "lab", None, environ={}).namespace == "ns-lab"


def test_missing_kubeconfig_says_where_it_looked(tmp_path):
    with pytest.raises(cli.CliError, match="no kubeconfig found at .*nowhere"):
        cli.resolve_target(str(tmp_path / "nowhere"), None, None, environ={})


# --- -o json|yaml ------------------------------------------------------------------------

JOB = job(("train", "eval"), name="mlp", status=status(
    phase_status(state="Succeeded", lastCheckpoint={"step": 10, "uri": "s3://b/train/step-10",
                                                    "time": "2025-01-01T00:00:00Z"}),
    phase_status(name="eval", state="Running"), phase="Running"))


@pytest.mark.parametrize("fmt, load", [("json", json.loads), ("yaml", yaml.safe_load)])
def test_status_document_round_trips(fmt, load):
    doc = load(cli.render(cli.status_document(JOB), fmt))
    assert doc["name"] == "mlp" and doc["namespace"] == "ns" and doc["generation"] == 1
    assert doc["status"] == JOB["status"]
    assert doc["status"]["phases"][0]["lastCheckpoint"]["step"] == 10


def test_status_document_of_a_job_without_status():
    body = job(name="new")
    assert cli.status_document(body)["status"] == {}


def test_render_refuses_an_unknown_format():
    with pytest.raises(cli.CliError) as e:
        cli.render({}, "xml")
    assert e.value.code == 2 and "'xml'" in str(e.value)


def manifest(step: int, files=("model.pt",)) -> Manifest:
    return Manifest(step=step, epoch=3, phase="train", time="2025-01-01T00:00:00Z",
                    config_fingerprint="f", files={n: FileEntry(1, "00") for n in files})


OK = CheckpointInfo(10, "s3://b/train/step-00000010", manifest(10), True)
GANG = CheckpointInfo(20, "s3://b/train/step-00000020",
                      manifest(20, ("rank0-model.pt", "rank1-model.pt", "meta.json")), True)
BAD = CheckpointInfo(30, "s3://b/train/step-00000030", None, False,
                     "manifest.json is missing (incomplete save)")


def test_checkpoint_rows_keep_the_text_people_read():
    assert cli.checkpoint_row("train", OK).text() == (
        "  ok  step       10  epoch 3, 2025-01-01T00:00:00Z  s3://b/train/step-00000010")
    assert cli.checkpoint_row("train", GANG).text().endswith(
        ", 2 ranks, 3 files  s3://b/train/step-00000020")
    assert cli.checkpoint_row("train", BAD, skipped=(30,)).text() == (
        "  BAD step       30    s3://b/train/step-00000030  - manifest.json is missing "
        "(incomplete save)  (skipped by operator)")


@pytest.mark.parametrize("fmt, load", [("json", json.loads), ("yaml", yaml.safe_load)])
def test_checkpoints_document(fmt, load):
    rows = [cli.checkpoint_row("train", i, skipped=(30,)) for i in (OK, GANG, BAD)]
    errors = [{"phase": "eval", "uri": "s3://b/eval", "error": "NoSuchBucket: gone"}]
    doc = load(cli.render(cli.checkpoints_document(JOB, rows, errors), fmt))
    assert (doc["name"], doc["namespace"], doc["errors"]) == ("mlp", "ns", errors)
    ok, gang, bad = doc["checkpoints"]
    assert ok == {"phase": "train", "step": 10, "uri": "s3://b/train/step-00000010",
                  "valid": True, "reason": None, "epoch": 3, "time": "2025-01-01T00:00:00Z",
                  "ranks": 0, "files": 1, "skippedByOperator": False}
    assert (gang["ranks"], gang["files"]) == (2, 3)
    assert bad["valid"] is False and bad["reason"].startswith("manifest.json is missing")
    assert (bad["epoch"], bad["time"], bad["skippedByOperator"]) == (None, None, True)


# --- main(): from the command line to the API call --------------------------------------


class FakeKube:
    def __init__(self, jobs: dict[tuple[str, str], dict]) -> None:
        self.jobs, self.asked = jobs, []

    def get_job(self, namespace: str, name: str) -> dict | None:
        self.asked.append((namespace, name))
        return self.jobs.get((namespace, name))

    def operator_leases(self) -> list[dict]:
        return [{"metadata": {"name": "phx", "namespace": "phoenix-system"},
                 "spec": {"holderIdentity": "phx-a", "leaseDurationSeconds": 15,
                          "acquireTime": "2026-01-01T00:00:00.000000Z",
                          "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 4}}]


@pytest.fixture
def fake(monkeypatch) -> tuple[FakeKube, list]:
    kube, targets = FakeKube({("ns-prod", "mlp"): JOB}), []
    monkeypatch.setattr(cli, "_connect", lambda t: targets.append(t) or kube)
    return kube, targets


def test_status_json_from_a_non_current_context(kcfg, fake, capsys):
    kube, targets = fake
    assert cli.main(["status", "mlp", "--context", "prod", "--kubeconfig", kcfg,
                     "-o", "json"]) == 0
    assert kube.asked == [("ns-prod", "mlp")]
    assert (targets[0].context, targets[0].kubeconfig) == ("prod", kcfg)
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == JOB["status"]
    assert out["operator"][0]["leader"] == "phx-a" and out["operator"][0]["term"] == 4


def test_missing_job_is_a_clear_error(kcfg, fake, capsys):
    assert cli.main(["--kubeconfig", kcfg, "status", "gone"], prog="kubectl phoenix") == 1
    err = capsys.readouterr().err
    assert err.startswith("kubectl phoenix: error: ")
    assert '"gone" not found in namespace "ns-lab"' in err


def test_unknown_context_is_a_clear_error(kcfg, fake, capsys):
    assert cli.main(["status", "mlp", "--kubeconfig", kcfg, "--context", "nope"]) == 1
    assert 'phoenixctl: error: context "nope" does not exist' in capsys.readouterr().err
    assert fake[1] == []  # never connected


def test_checkpoints_yaml_end_to_end_on_local_storage(tmp_path, kcfg, monkeypatch, capsys):
    import hashlib

    from phoenix_trainer.core.layout import MANIFEST_NAME, step_dir_name

    body = job(("train",), name="mlp", status=status(phase_status(skippedSteps=[7])))
    body["spec"]["checkpoint"] = {"uri": f"file://{tmp_path}/run"}
    train = tmp_path / "run" / "train"
    for step in (5, 7):
        d = train / step_dir_name(step)
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(b"weights")
    good = Manifest(step=5, epoch=0, phase="train", time="2025-01-01T00:00:00Z",
                    config_fingerprint="f",
                    files={"model.pt": FileEntry(7, hashlib.sha256(b"weights").hexdigest())})
    (train / step_dir_name(5) / MANIFEST_NAME).write_text(good.to_json())  # 7: no manifest
    monkeypatch.setattr(cli, "_connect", lambda t: FakeKube({("ns-lab", "mlp"): body}))
    argv = ["checkpoints", "mlp", "--kubeconfig", kcfg, "-o", "yaml"]
    assert cli.main(argv) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert [(c["step"], c["valid"], c["skippedByOperator"]) for c in doc["checkpoints"]] == [
        (7, False, True), (5, True, False)]
    assert doc["errors"] == []
    assert cli.main([*argv, "--strict"]) == 1
    capsys.readouterr()
    assert cli.main(["checkpoints", "mlp", "--kubeconfig", kcfg]) == 0  # the text for people
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"phase train: file://{tmp_path}/run/train"
    assert out[1].startswith("  BAD step        7") and out[1].endswith("(skipped by operator)")
    assert out[2].startswith("  ok  step        5  epoch 0, 2025-01-01T00:00:00Z  ")
    assert cli.main(["checkpoints", "mlp", "--kubeconfig", kcfg, "--phase", "eval"]) == 1
    assert "has no phase 'eval'" in capsys.readouterr().err
