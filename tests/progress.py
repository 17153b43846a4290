"""What the feedback tests share: a captured stream that says it is a terminal, and a tqdm that records its steps."""
from __future__ import annotations

import io
from typing import ClassVar

from tqdm import tqdm


class Terminal(io.StringIO):
    """A captured stderr that says it is a terminal (progress bars show only on one)."""

    def isatty(self) -> bool:
        return True


class RecordingBar(tqdm):
    """A tqdm that keeps every bar made (``made``) and each bar's updates (``steps``)."""

    made: ClassVar[list[RecordingBar]] = []

    def __init__(self, *args, **kwargs):
        self.steps: list[float] = []
        self.shown = not kwargs.get("disable", False)
        super().__init__(*args, **kwargs)
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.steps.append(n)
        return super().update(n)
