"""`python -m export ...` from the repository root runs `bakeoff.export` (installed, the command is `bakeoff export`)."""
import bakeoff.export

__path__ = bakeoff.export.__path__  # (submodules and __main__ come from the installed package)
