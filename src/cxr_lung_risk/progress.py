"""Progress a person can see: a bar on a terminal, plain log lines everywhere else.

Each input is one unit; a scored input advances in steps (decoded, each network of each model,
written), so the count moves image by image even though the networks see batches. On a
terminal (stderr is a TTY) a tqdm bar is drawn; otherwise (``docker logs``, a batch system's log
file, a pipe) one line is printed at most every ``interval`` seconds plus a last one, e.g.::

    cxr-lung-risk: 96/240 inputs (40%), 90 scored, 4 skipped, 2 failed; 0.45 s/input, about 1m05s left
"""
from __future__ import annotations

import sys
import time
from typing import IO

__all__ = ["Progress", "say"]

PREFIX = "cxr-lung-risk"


def say(message: str, stream: IO[str] | None = None) -> None:
    """One line on stderr, prefixed with the program name (flushed at once)."""
    s = stream or sys.stderr
    print(f"{PREFIX}: {message}", file=s, flush=True)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class Progress:
    """Counts inputs (fractions allowed) and statuses; see the module docstring."""

    def __init__(
        self,
        total: int,
        *,
        desc: str = "scoring",
        enabled: bool = True,
        stream: IO[str] | None = None,
        interval: float = 10.0,
        tty: bool | None = None,
    ) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interval = float(interval)
        self.done = 0.0
        self.counts: dict[str, int] = {}
        self._t0 = time.monotonic()
        self._last = self._t0
        self._bar = None
        is_tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        if enabled and is_tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit="img", file=self.stream, leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------------ counting
    def advance(self, amount: float) -> None:
        """Advance by a fraction of an input (a step of a scored image)."""
        amount = max(0.0, min(float(amount), self.total - self.done))
        self.done += amount
        self._show()

    def finish_input(self, status: str, fraction_done: float = 0.0) -> None:
        """One input finished with ``status``; ``fraction_done`` of it was already advanced."""
        key = str(status)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.advance(max(0.0, 1.0 - fraction_done))

    # ------------------------------------------------------------------ display
    def line(self) -> str:
        n = sum(self.counts.values())
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{n}/{self.total} inputs done ({pct:.0f}%)"]
        parts.append(", ".join(f"{self.counts.get(k, 0)} {w}" for k, w in (("ok", "scored" if self.desc == "scoring" else "done"), ("skipped", "skipped"), ("failed", "failed"))))
        elapsed = time.monotonic() - self._t0
        if self.done > 0:
            rate = elapsed / self.done
            left = rate * (self.total - self.done)
            tail = f"{rate:.2f} s/input" + (f", about {_duration(left)} left" if self.done < self.total else f", {_duration(elapsed)} in all")
            parts[-1] += "; " + tail
        return ", ".join(parts)

    def _show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = round(self.done, 2)
            self._bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())), refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            say(self.line(), self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.total:
            self._show(force=True)
