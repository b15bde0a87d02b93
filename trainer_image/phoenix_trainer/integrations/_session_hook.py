"""What the framework callbacks share: a session, what it restored, the exit code.

Imports the runtime (torch), never a framework."""
from __future__ import annotations

from ..session import Restored, Session


class SessionHook:
    """Base of the Lightning and transformers callbacks (a mixin beside the framework's)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.restored: Restored | None = None

    def _restore(self) -> Restored | None:
        """``session.restore()``; what to resume from (this phase's own checkpoint), or None.
        A previous phase's weights (``PHOENIX_INIT_FROM``) stay in ``self.restored``."""
        self.restored = self.session.restore()
        return self.restored if self.restored is not None and self.restored.kind == "resume" else None

    @property
    def exit_code(self) -> int:
        """0 completed, 143 preempted, 1 failed; 1 if the run never finished."""
        return self.session.result.exit_code if self.session.result else 1
