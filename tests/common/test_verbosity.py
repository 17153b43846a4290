"""-v/--verbose and -q/--quiet (bakeoff.common.log): levels, line format, progress-bar rule, one stage CLI end to end."""
from __future__ import annotations

import argparse
import io
import logging
import sys

import pytest

from bakeoff.common.log import (
    Say,
    Steps,
    add_verbosity_flags,
    format_line,
    progress_enabled,
    setup_logging,
    verbosity_argv,
)
from tests.progress import Terminal

log = logging.getLogger("bakeoff.test")


def parse(*argv: str, no_progress: bool = False) -> argparse.Namespace:
    p = add_verbosity_flags(argparse.ArgumentParser(prog="stage"))
    if no_progress:
        p.add_argument("--no-progress", action="store_true")
    return p.parse_args(list(argv))


def emit_all() -> None:
    log.debug("per-step timing")
    log.info("status line")
    log.warning("run x: something odd")
    log.error("file.csv row 3: bad tag")


@pytest.mark.parametrize("flags, shown, hidden", [
    ([], ["status line", "WARNING run x: something odd", "error: file.csv row 3: bad tag"], ["per-step timing"]),
    (["-q"], ["WARNING run x: something odd", "error: file.csv row 3: bad tag"], ["status line", "per-step timing"]),
    (["--quiet"], ["error: file.csv row 3: bad tag"], ["status line"]),
    (["-v"], ["per-step timing", "status line", "WARNING run x", "error: file.csv"], []),
    (["--verbose"], ["per-step timing"], []),
])
def test_levels_by_flag(flags, shown, hidden, capsys):
    setup_logging(parse(*flags))
    emit_all()
    out, err = capsys.readouterr()
    assert out == ""  # log lines never go to stdout, which stays for tables and JSON
    assert all(s in err for s in shown) and not any(s in err for s in hidden)


def test_lines_are_plain_messages_with_a_level_prefix_for_problems(capsys):
    setup_logging(parse("-v"))
    emit_all()
    assert capsys.readouterr().err.splitlines() == ["per-step timing", "status line", "WARNING run x: something odd",
                                                    "error: file.csv row 3: bad tag"]
    assert format_line(logging.INFO, "m") == "m" and format_line(logging.CRITICAL, "m") == "error: m"


def test_one_handler_however_often_it_is_set_up(capsys):
    for flags in ([], ["-v"], ["-q"], []):
        setup_logging(parse(*flags))
    log.info("once")
    assert capsys.readouterr().err == "once\n"


def test_verbose_and_quiet_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parse("-v", "-q")
    assert "not allowed with argument" in capsys.readouterr().err


def test_flags_on_a_command_and_its_subcommand():
    """-q before or after the subcommand; a subcommand's unset flags do not undo the main parser's."""
    p = add_verbosity_flags(argparse.ArgumentParser())
    add_verbosity_flags(p.add_subparsers(dest="cmd").add_parser("bench"))
    for argv in (["-q", "bench"], ["bench", "-q"]):
        a = setup_logging(p.parse_args(argv))
        assert (a.quiet, a.verbose) == (True, False) and logging.getLogger("bakeoff").level == logging.WARNING
    a = setup_logging(p.parse_args(["bench"]))
    assert (a.quiet, a.verbose) == (False, False) and logging.getLogger("bakeoff").level == logging.INFO


def test_progress_bars_only_on_a_terminal_and_never_with_quiet(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_enabled(setup_logging(parse(no_progress=True)))
    assert progress_enabled(setup_logging(parse("-v", no_progress=True)))
    quiet = setup_logging(parse("-q", no_progress=True))
    assert quiet.no_progress and not progress_enabled(quiet)  # -q turns --no-progress on, for every CLI's bars
    assert not progress_enabled(setup_logging(parse("--no-progress", no_progress=True)))
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, a pipe
    piped = setup_logging(parse(no_progress=True))
    assert piped.no_progress and not progress_enabled(piped)


def test_verbosity_passes_on_as_one_flag():
    assert verbosity_argv(parse("-v")) == ["-v"] and verbosity_argv(parse("--quiet")) == ["-q"]
    assert verbosity_argv(parse()) == []


def test_say_sends_lines_to_a_sink_as_the_cli_shows_them(capsys):
    lines: list[str] = []
    say = Say(log, lines.append)
    say.debug("d")
    say.info("i")
    say.warning("w")
    say.error("e")
    assert lines == ["i", "WARNING w", "error: e"] and capsys.readouterr().err == ""
    setup_logging(parse("-q"))
    Say(log).info("hidden")
    Say(log).warning("shown")
    assert capsys.readouterr().err == "WARNING shown\n"


def test_steps_time_each_step_at_debug_and_advance_once_per_step(capsys, bars):
    setup_logging(parse("-v"))
    with Steps("cnn-probe", 2, False, log) as steps:
        with steps.step("ONNX export"):
            pass
        with pytest.raises(ValueError), steps.step("parity check"):
            raise ValueError("flips")
    assert bars[0].steps == [1]  # a step that raised does not advance the bar
    err = capsys.readouterr().err
    assert "cnn-probe: ONNX export in 0.0 s" in err and "parity check in" not in err


# -- one stage CLI end to end: python -m train.data cache --------------------------------------------------

def test_data_cli_quiet_silences_status_and_verbose_adds_timings(tiny_data, capsys):
    from bakeoff.train.data.__main__ import main

    assert main(["cache", str(tiny_data), "--size", "32", "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "cache" in err and "done in" not in err  # INFO: the cache's status line
    assert main(["cache", str(tiny_data), "--size", "32", "--workers", "1", "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["-v", "cache", str(tiny_data), "--size", "32", "--workers", "1"]) == 0
    assert "cache done in " in capsys.readouterr().err  # DEBUG
    assert main(["stats", str(tiny_data), "-q"]) == 0
    assert "tags" in capsys.readouterr().out  # -q leaves the table, on stdout
    assert main(["stats", str(tiny_data / "nope"), "-q"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tiny_data / 'nope'}")  # errors name the file
