"""How numbers are written in the report: every missing value is a dash, never a guess."""
from __future__ import annotations

from collections.abc import Sequence

DASH = "—"


def _rounded(x: float, digits: int) -> float:
    """``x`` rounded to ``digits`` decimals, never negative zero (so a tiny negative prints as 0, not −0)."""
    return round(x, digits) or 0.0


def num(x: float | None, digits: int = 3) -> str:
    return DASH if x is None else f"{_rounded(x, digits):.{digits}f}"


def signed(x: float | None, digits: int = 3) -> str:
    return DASH if x is None else f"{_rounded(x, digits):+.{digits}f}".replace("-", "−")


def with_ci(x: float | None, ci: Sequence[float | None] | None, digits: int = 3) -> str:
    """``0.512 [0.498, 0.526]``; the bare value when the interval is undefined."""
    if x is None:
        return DASH
    if not ci or ci[0] is None or ci[1] is None:
        return num(x, digits)
    return f"{x:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def ci_digits(ci: Sequence[float], digits: int = 3, most: int = 6) -> int:
    """Decimals (``digits`` up to ``most``) at which no nonzero bound of ``ci`` prints as zero: +0.0004, not +0.000,
    so that an interval that excludes 0 never reads as touching it."""
    while digits < most and any(b and _rounded(b, digits) == 0 for b in ci):
        digits += 1
    return digits


def signed_ci(x: float, ci: Sequence[float]) -> str:
    """``+0.012 [+0.004, +0.020]``, with more decimals where a bound would otherwise print as ±0.000."""
    d = ci_digits(ci)
    return f"{signed(x, d)} [{signed(ci[0], d)}, {signed(ci[1], d)}]"


def seconds_unit(max_seconds: float) -> tuple[str, float]:
    """The unit (s, min, h) to show durations up to ``max_seconds`` in, and its length in seconds."""
    return ("s", 1.0) if max_seconds < 120 else ("min", 60.0) if max_seconds < 7200 else ("h", 3600.0)


def duration(seconds: float | None) -> str:
    """``4.2 s``, ``47 s``, ``6.7 min``, ``2.5 h``: one decimal below 10 s and in minutes or hours."""
    if seconds is None:
        return DASH
    unit, scale = seconds_unit(seconds)
    return f"{seconds / scale:.{0 if unit == 's' and seconds >= 9.95 else 1}f} {unit}"


def ms(x: float | None) -> str:
    if x is None:
        return DASH
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"  # 3 significant digits: 2.35, 12.6, 255


def rate(x: float | None) -> str:
    return DASH if x is None else f"{x:,.0f}"


def megabytes(n: float | None) -> str:
    """A file size: ``88.3 MB``, or ``12 kB`` below a megabyte."""
    if n is None:
        return DASH
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def count(n: float | None) -> str:
    """A parameter count: ``22.1 M``, ``394 k``."""
    if n is None:
        return DASH
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} k" if n >= 1e3 else f"{n:.0f}"
