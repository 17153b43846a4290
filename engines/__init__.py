"""`python -m engines ...` from the repository root runs `bakeoff.engines` (installed, the command is `bakeoff engines`)."""
import bakeoff.engines

__path__ = bakeoff.engines.__path__  # (submodules and __main__ come from the installed package)
