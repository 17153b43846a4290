"""The project file ``./bakeoff.json``: written by the main job, read by every stage CLI for its defaults.

    {"data": "data/demo", "runs": "runs/demo", "report": "report/demo", "profile": "demo",
     "settings": {...train.profiles.Settings: the profile's settings with the explicit flags on top...},
     "weights": ["auto"], "weights_dir": "../shared/weights"}

So the design card's commands work as typed after ``python -m reports.pipeline``: ``python -m train --backbone
clip --strategy ft`` trains (or finds current) the pair with the main job's dataset, runs directory and options,
``python -m export --fp16`` exports its runs, and so on. Explicit flags override the file. Paths are as the
main job was given them, relative to the directory that holds the file (the one the stages run from).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bakeoff.common.io import read_json, write_json
from bakeoff.train.profiles import PROFILES, Settings

PROJECT_FILE = Path("bakeoff.json")
WHAT = {"data": "the dataset directory", "runs": "the runs directory", "report": "the report directory"}


class ProjectError(ValueError):
    """A project file that cannot be read as one."""


@dataclass(frozen=True)
class Project:
    data: str
    runs: str
    report: str
    profile: str = "full"
    settings: Settings = field(default_factory=Settings)
    weights: list[str] = field(default_factory=list)  # as python -m train --weights takes them
    weights_dir: str | None = None


def write_project(project: Project, path: Path = PROJECT_FILE) -> None:
    write_json(path, asdict(project))


def read_project(path: Path = PROJECT_FILE) -> Project | None:
    """The project in ``path``; None when there is none."""
    if not path.is_file():
        return None
    try:
        d = read_json(path)
        project = Project(**{**d, "settings": Settings.from_dict(d.get("settings", {}))})
    except (ValueError, TypeError) as e:
        raise ProjectError(f"{path}: not a project file ({e}); delete it or rerun python -m reports.pipeline") from e
    if project.profile not in PROFILES:
        raise ProjectError(f"{path}: unknown profile {project.profile!r}; profiles: {', '.join(PROFILES)}")
    return project


def missing(flag: str, what: str) -> str:
    """The message for a required flag that neither the command line nor a project file gave."""
    return (f"{flag} is required ({what}): pass it, or run python -m reports.pipeline first, which writes "
            f"./{PROJECT_FILE} with the defaults every stage reads")


def same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    """How the command line spells ``dest``: its option (``--runs``) or, for a positional, its name (``RUNS``)."""
    action = next(a for a in parser._actions if a.dest == dest)
    return action.option_strings[0] if action.option_strings else dest.upper()


def project_for(named: dict[str, str | Path | None], path: Path = PROJECT_FILE) -> Project | None:
    """The project file when it agrees with what a command names (``named`` = {project attribute: the value given,
    or None}): ``--runs runs/b`` never borrows the dataset of the project ``runs/a``. None without one."""
    project = read_project(path)
    if project is None or any(v is not None and not same_path(v, getattr(project, k)) for k, v in named.items()):
        return None
    return project


def fill(parser: argparse.ArgumentParser, args: argparse.Namespace, fields: dict[str, str],
         path: Path = PROJECT_FILE) -> None:
    """Fill ``args.<dest>`` left unset (None) from the project file (:func:`project_for`), for ``fields`` =
    {dest: project attribute}, and say so on stderr; a dest still unset is a usage error saying what to pass."""
    try:
        project = project_for({attr: getattr(args, dest) for dest, attr in fields.items()}, path)
    except ProjectError as e:
        parser.error(str(e))
    used = [dest for dest in fields if getattr(args, dest) is None and project is not None]
    for dest in used:
        setattr(args, dest, getattr(project, fields[dest]))
    if used:
        print(f"defaults from ./{path}: " + " ".join(f"{_flag(parser, d)} {getattr(args, d)}" for d in used),
              file=sys.stderr)
    for dest, attr in fields.items():
        if getattr(args, dest) is None:
            parser.error(missing(_flag(parser, dest), WHAT[attr]))
