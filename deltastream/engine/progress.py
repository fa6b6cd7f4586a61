"""A progress bar in bytes, with rate and ETA, on a terminal only."""

from __future__ import annotations

import sys
import threading

__all__ = ["Progress"]


class Progress:
    """tqdm over bytes processed; silent when disabled or when stderr is not a terminal."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = None
        self._lock = threading.Lock()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                             dynamic_ncols=True, leave=False, file=sys.stderr)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(nbytes)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
