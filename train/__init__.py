"""`python -m train ...` from the repository root runs `bakeoff.train` (installed, the command is `bakeoff train`)."""
import bakeoff.train

__path__ = bakeoff.train.__path__  # (submodules and __main__ come from the installed package)
