"""`python -m reports ...` from the repository root runs `bakeoff.reports` (installed, the command is `bakeoff reports`)."""
import bakeoff.reports

__path__ = bakeoff.reports.__path__  # (submodules and __main__ come from the installed package)
