"""Progress of the eval stage: one tqdm bar on stderr per benchmark x temperature (prompt turns done, the method
running, its tokens/s). Shown when stderr is a terminal; ORTHRUS_PROGRESS=0 hides it, ORTHRUS_PROGRESS=1 shows
it anyway (e.g. under a log collector that is not a TTY; tqdm then redraws at most every `mininterval`)."""
from __future__ import annotations

import os
import sys
import time

ENV = "ORTHRUS_PROGRESS"


def enabled() -> bool:
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("0", "false", "off", "no"):
        return False
    if v in ("1", "true", "on", "yes"):
        return True
    return sys.stderr.isatty()


class Progress:
    """A bar over `total` prompt turns; `start(method)` then `update(turns, tokens)` after every batch."""

    def __init__(self, total: int, desc: str):
        self.bar = None
        if enabled():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="turn", file=sys.stderr, dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0)
        self.method, self.tokens, self.t0 = "", 0, time.perf_counter()

    def start(self, method: str) -> None:
        self.method, self.tokens, self.t0 = method, 0, time.perf_counter()

    def update(self, turns: int, tokens: int) -> None:
        if self.bar is None:
            return
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.method} {rate:.0f} tok/s", refresh=False)
        self.bar.update(turns)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
