"""timing.json: seconds per training phase. A run's training time is the sum of its phases, everywhere.

``seconds.total`` is kept in the file for readers, but timing files written before it counted reused caches
leave out the recorded cost of the reused phases; ``wall`` is one process's wall time. Neither is a phase.
"""
from __future__ import annotations

TIMING_TOTALS = ("total", "wall")  # timing.json's seconds.* entries that are not phases


def phase_seconds(timing: dict) -> dict[str, float]:
    """timing.json's seconds per phase (every ``seconds`` entry but total and wall)."""
    return {k: float(v) for k, v in timing.get("seconds", {}).items() if k not in TIMING_TOTALS and v is not None}


def training_seconds(timing: dict) -> float | None:
    """The run's training time: the sum of its phases (None when timing.json records none)."""
    phases = phase_seconds(timing)
    return round(sum(phases.values()), 3) if phases else None
