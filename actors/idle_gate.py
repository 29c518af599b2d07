"""When the trainer may compute on spare capacity only (``trainer.busy_duty`` 0): serving must have stayed idle
for a grace period. Clients that send their next request as the last one ends leave gaps of milliseconds, and a
part of a training step begun in one runs on beside the next request (BENCHMARKS.md, "the trainer on spare
capacity only")."""
import time


class IdleGate:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.since: float | None = None  # when serving was last seen going idle

    def reset(self) -> None:
        """Forget the idle spell: serving was not watched meanwhile (the trainer was paused)."""
        self.since = None

    def open(self, busy: bool) -> bool:
        """Whether serving, seen ``busy`` now, has been idle for ``grace_s``."""
        if busy:
            self.since = None
            return False
        now = time.monotonic()
        if self.since is None:
            self.since = now
        return now - self.since >= self.grace_s
