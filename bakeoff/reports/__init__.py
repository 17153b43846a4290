"""Reports: tables, figures and a recommendation from a runs directory's artifacts only (no model code)."""
from bakeoff.reports.build import build_report

__all__ = ["build_report"]
