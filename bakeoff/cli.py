"""``bakeoff COMMAND ...``: the installed entry point, one sub-command per stage CLI."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command -> module whose main(argv) it runs
    "train": "bakeoff.train.__main__",
    "data": "bakeoff.train.data.__main__",
    "export": "bakeoff.export.__main__",
    "engines": "bakeoff.engines.__main__",
    "evaluate": "bakeoff.evaluate.__main__",
    "ablation": "bakeoff.evaluate.ablation",
    "reports": "bakeoff.reports.__main__",
    "pipeline": "bakeoff.reports.pipeline",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: bakeoff {" + ",".join(COMMANDS) + "} ...\n(from the repository root, `python -m train ...`, "
              "`python -m train.data ...`, `python -m evaluate.ablation ...`, `python -m reports.pipeline ...` "
              "work too)", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
