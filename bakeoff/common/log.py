"""Verbosity of the stage CLIs: ``-v/--verbose`` and ``-q/--quiet`` over the standard library's ``logging``.

A stage CLI adds the flags to its parser and sets logging up from what was parsed::

    from bakeoff.common.log import add_verbosity_flags, setup_logging
    args = setup_logging(add_verbosity_flags(parser).parse_args(argv))

``setup_logging`` gives the ``bakeoff`` logger (every module logs under it: ``logging.getLogger(__name__)``; a
stage's ``__main__`` names its package, e.g. ``bakeoff.export``, since ``python -m export`` runs it as
``__main__``) one handler on stderr, and sets its level:

- default: INFO, the status lines the stages always printed;
- ``-q``: WARNING, warnings and errors only, and no progress bars;
- ``-v``: DEBUG, with per-step timings, execution providers, file paths.

Progress bars (tqdm, on stderr) show only on a terminal: ``setup_logging`` sets ``args.no_progress`` with -q or
when stderr is not a terminal (a log file, a pipe, a test's capture), so every CLI whose bars follow
``--no-progress`` gets one rule; ``progress_enabled(args)`` says the same for the CLIs that ask it.

Warnings read ``WARNING <message>``, errors ``error: <message>``, the rest is the message alone. What a user pipes
(tables, JSON, the trtexec-style summaries, the recommendation) stays on stdout, printed. Log lines go through
``tqdm.write`` so that they do not tear a progress bar on the same terminal. Other libraries' loggers are left
as they are.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Self

from tqdm import tqdm

ROOT = "bakeoff"
PREFIX = {logging.WARNING: "WARNING ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}
VERBOSE_HELP = "debug detail: per-step timings, execution providers, file paths"
QUIET_HELP = "warnings and errors only, no progress bars"


def add_verbosity_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``-v/--verbose`` and ``-q/--quiet`` (mutually exclusive) to ``parser``; returns it.

    Unset flags leave no attribute (``argparse.SUPPRESS``), so the flags can sit on a parser and on its
    subcommands' parsers (``python -m engines -q bench`` and ``python -m engines bench -q``) without the
    subcommand's defaults overwriting what the main parser read; ``setup_logging`` reads them with defaults.
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    return parser


def verbosity(args: argparse.Namespace | None) -> tuple[bool, bool]:
    """(verbose, quiet) as parsed; both False when the flags were not given (or not added)."""
    verbose, quiet = bool(getattr(args, "verbose", False)), bool(getattr(args, "quiet", False))
    return verbose, quiet and not verbose  # both given on two levels of subcommands: the more output wins


def level(verbose: bool = False, quiet: bool = False) -> int:
    return logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO


def format_line(levelno: int, message: str) -> str:
    """A log line as the stage CLIs show it: ``WARNING <msg>``, ``error: <msg>``, or the message alone."""
    return PREFIX.get(levelno, "") + message


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return format_line(record.levelno, super().format(record))


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test's capture, a redirect), through
    ``tqdm.write`` so that an active progress bar is cleared and redrawn around the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001  logging must not break the stage
            self.handleError(record)


def setup_logging(args: argparse.Namespace | None = None, *, verbose: bool = False,
                  quiet: bool = False) -> argparse.Namespace | None:
    """Configure the ``bakeoff`` logger from parsed ``-v``/``-q`` (or the keywords); returns ``args``.

    Idempotent (one handler, whatever the number of calls). With ``-q``, or when stderr is not a terminal, it
    also sets ``args.no_progress`` (when ``args`` has that attribute): no progress bars then, also for the CLIs
    whose bars follow --no-progress. ``args.verbose`` and ``args.quiet`` are set on ``args`` either way.
    """
    if args is not None:
        verbose, quiet = verbosity(args)
        args.verbose, args.quiet = verbose, quiet
        if hasattr(args, "no_progress") and (quiet or not stderr_is_terminal()):
            args.no_progress = True
    logger = logging.getLogger(ROOT)
    logger.setLevel(level(verbose, quiet))
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False  # no second copy through a root handler someone else configured
    return args


def stderr_is_terminal() -> bool:
    """Whether stderr, where the bars go, is a terminal (not a file, a pipe or a capture)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def progress_enabled(args: argparse.Namespace) -> bool:
    """Whether to show progress bars: on a terminal, unless ``--no-progress`` or ``-q``."""
    return not getattr(args, "no_progress", False) and not verbosity(args)[1] and stderr_is_terminal()


def verbosity_argv(args: argparse.Namespace) -> list[str]:
    """The flag that passes this process's verbosity on to a subprocess stage: ``["-v"]``, ``["-q"]`` or ``[]``."""
    verbose, quiet = verbosity(args)
    return ["-v"] if verbose else ["-q"] if quiet else []


def progress_bar(enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar (on stderr, as every bar of the toolkit), shown only when ``enabled``."""
    return tqdm(disable=not enabled, **kwargs)


class Say:
    """Messages of a library function with a ``log=`` parameter: to ``logger`` at their level, or, when
    ``sink`` (a callable taking one line) is given, as the lines the CLI would show at the default verbosity
    (DEBUG dropped, warnings and errors prefixed as ``format_line`` does)."""

    def __init__(self, logger: logging.Logger, sink: Callable[[str], None] | None = None):
        self.logger, self.sink = logger, sink

    def log(self, levelno: int, message: str) -> None:
        if self.sink is None:
            self.logger.log(levelno, message)
        elif levelno >= logging.INFO:
            self.sink(format_line(levelno, message))

    def debug(self, message: str) -> None:
        self.log(logging.DEBUG, message)

    def info(self, message: str) -> None:
        self.log(logging.INFO, message)

    def warning(self, message: str) -> None:
        self.log(logging.WARNING, message)

    def error(self, message: str) -> None:
        self.log(logging.ERROR, message)


class Steps:
    """A progress bar over one job's named steps (``leave=False``: it goes once the job is done).

    ``with steps.step("ONNX export"): ...`` shows the step beside the bar while it runs, then advances the bar
    and logs ``<desc>: <step> in <seconds> s`` at DEBUG; a step that raises neither advances nor logs.
    """

    def __init__(self, desc: str, total: int, enabled: bool, say: Say | logging.Logger):
        self.desc, self.say = desc, say
        self.bar = progress_bar(enabled, total=total, desc=desc, unit="step", leave=False)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.say.debug(f"{self.desc}: {name} in {seconds:.1f} s")
        self.bar.update()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
