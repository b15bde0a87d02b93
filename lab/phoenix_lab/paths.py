"""Where the lab keeps binaries (a cache shared across checkouts) and its runtime state."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "lab" / "build-binaries.sh"


def cache_dir() -> Path:
    return Path(os.environ.get("PHOENIX_CACHE", Path.home() / ".cache" / "phoenix"))


def bin_dir() -> Path:
    return cache_dir() / "bin"


def binary(name: str) -> Path:
    """Path of a cached lab binary; raises a clear error when it has not been built."""
    path = bin_dir() / name
    if not path.is_file() or not os.access(path, os.X_OK):
        raise FileNotFoundError(
            f"lab binary '{name}' not found at {path}; build it with 'bash {BUILD_SCRIPT}' "
            "(or 'phoenix-lab build')"
        )
    return path


def default_state_dir() -> Path:
    return Path(os.environ.get("PHOENIX_LAB_DIR", REPO_ROOT / ".lab"))
