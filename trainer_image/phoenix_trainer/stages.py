"""Stage and StagedModule: a model split into named stages with exception boundaries.

A Stage wraps any ``nn.Module``: an exception escaping it becomes a ``StageError`` naming
the stage, and forward times are accumulated per stage for the logs. A StagedModule runs its
stages in order and carries the in-process recovery policy (``restart_method``,
``max_retries``) used by ``fit``, which hands the epoch/step loop to ``Trainer``.

Stages never swallow errors and never retry by themselves: deciding whether an error is
transient and rolling state back is the loop's job, where the whole state is known.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from torch import nn

from .core.errors import StageError
from .policies import LEGACY_KEYWORDS, RecoveryPolicy, check_restart_method
from .trainer import Trainer

log = logging.getLogger("phoenix.stages")


class Stage(nn.Module):
    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__()
        if not name:
            raise ValueError("a Stage needs a non-empty name (it appears in errors and logs)")
        self.name = name
        self.module = module
        self.calls = 0
        self.errors = 0
        self.seconds = 0.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.module(*args, **kwargs)
        except StageError:
            raise  # a nested stage already named itself
        except Exception as e:
            self.errors += 1
            raise StageError(self.name, None, e) from e
        finally:
            # On GPU this is launch time unless the caller synchronises; good enough to spot
            # a stage that suddenly gets slow, which is what the log line is for.
            self.calls += 1
            self.seconds += time.perf_counter() - t0

    def reset_timings(self) -> None:
        self.calls, self.errors, self.seconds = 0, 0, 0.0

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class StagedModule(nn.Module):
    """Stages run in order; ``fit`` trains with bounded in-process recovery."""

    def __init__(self, stages: Iterable[Stage], *, restart_method: str = "reload",
                 max_retries: int = 3) -> None:
        super().__init__()
        stages = list(stages)
        if not stages:
            raise ValueError("StagedModule needs at least one Stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        check_restart_method(restart_method)
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.stages = nn.ModuleList(stages)
        self.restart_method = restart_method
        self.max_retries = max_retries

    def forward(self, x: Any) -> Any:
        for stage in self.stages:
            x = stage(x)
        return x

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}; stages are {[s.name for s in self.stages]}")

    def timings(self) -> dict[str, dict[str, float]]:
        return {s.name: {"calls": s.calls, "errors": s.errors, "seconds": round(s.seconds, 6),
                         "ms_per_call": round(1000 * s.seconds / s.calls, 4) if s.calls else 0.0}
                for s in self.stages}

    def log_timings(self, prefix: str = "") -> None:
        parts = [f"{n}={t['ms_per_call']:.3f}ms x{int(t['calls'])}" + (f" ({int(t['errors'])} errors)" if t["errors"] else "")
                 for n, t in self.timings().items()]
        log.info("%sstage forward timings: %s", prefix, ", ".join(parts))
        for s in self.stages:
            s.reset_timings()

    def fit(self, optimizer, train_loader, loss_fn, **trainer_kwargs):
        """Train with the epoch/step loop; see ``Trainer`` for the keyword arguments. This
        module's recovery settings apply unless the caller gives a ``RecoveryPolicy`` (or the
        deprecated keywords for one)."""
        if not any(LEGACY_KEYWORDS.get(k, ("",))[0] == "recovery" for k in trainer_kwargs):
            trainer_kwargs.setdefault("recovery", RecoveryPolicy(
                restart_method=self.restart_method, max_retries=self.max_retries))
        else:  # the old keywords, as before: this module's values fill the ones not given
            trainer_kwargs.setdefault("restart_method", self.restart_method)
            trainer_kwargs.setdefault("max_retries", self.max_retries)
        return Trainer(self, optimizer, train_loader, loss_fn, **trainer_kwargs).fit()
