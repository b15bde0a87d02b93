"""The interpreter-start hook of a trainer image: a ``.pth`` file that runs ``preflight``
(a clear error when /tmp or the spool is not writable, before torch can fail obscurely) and
then ``prefetch`` (the replacement pod's checkpoint download, overlapping the imports).

Installing the package does not install the hook: a ``.pth`` file runs in every interpreter
of its environment, and a developer's virtualenv or the operator's image must not exit on a
read-only /tmp nor start downloads. An image that runs trainers installs it once, at build
time, into the environment it installed ``phoenix-jobs[trainer]`` into:

    RUN pip install "phoenix-jobs[trainer]" && phoenix-trainer-hook

(trainer_image/Dockerfile and examples/user-image/Dockerfile do exactly that). The hook is
written where that interpreter's ``site`` reads ``.pth`` files (its purelib directory), so
``python -m phoenix_trainer.starthook`` with the image's own python does the same.
Standard library only: this runs at build time next to nothing but the package.
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "phoenix-preflight.pth"
# A .pth line that starts with "import" is executed by site at every interpreter start;
# it must stay one line.
HOOK_LINE = ("import phoenix_trainer.preflight, phoenix_trainer.prefetch; "
             "phoenix_trainer.preflight.main(); phoenix_trainer.prefetch.start_from_env()")


def hook_path(site_dir: str | Path | None = None) -> Path:
    """Where the hook goes: ``site_dir``, else this interpreter's purelib directory."""
    return Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME


def install(site_dir: str | Path | None = None) -> Path:
    """Write the hook (idempotent); returns its path."""
    path = hook_path(site_dir)
    path.write_text(HOOK_LINE + "\n")
    return path


def installed(site_dir: str | Path | None = None) -> bool:
    """Whether this environment's hook is in place and current."""
    try:
        return hook_path(site_dir).read_text().strip() == HOOK_LINE
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="phoenix-trainer-hook",
        description="Install the trainer's interpreter-start hook (preflight and checkpoint "
                    "prefetch) into this Python environment; run once when building an image.")
    ap.add_argument("--site-dir", help="the site-packages folder to write it to (default: "
                    "this interpreter's, %(default)s)" % {"default": hook_path().parent})
    ap.add_argument("--check", action="store_true",
                    help="only check: exit 1 if the hook is missing or out of date")
    args = ap.parse_args(argv)
    if args.check:
        ok = installed(args.site_dir)
        print(f"{hook_path(args.site_dir)}: {'installed' if ok else 'missing or out of date'}")
        return 0 if ok else 1
    try:
        path = install(args.site_dir)
    except OSError as e:
        print(f"phoenix-trainer-hook: cannot write {hook_path(args.site_dir)}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    print(f"installed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
