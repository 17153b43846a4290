"""`python -m evaluate ...` from the repository root runs `bakeoff.evaluate` (installed, the command is `bakeoff evaluate`)."""
import bakeoff.evaluate

__path__ = bakeoff.evaluate.__path__  # (submodules and __main__ come from the installed package)
