"""One-line configuration errors and the value and path rules behind them (standard library only).

Every entry point reports a setting that cannot work as ONE line on stderr,

    config error: <key>=<value>: <what is wrong>; <what to do>

with exit code 2 (a usage error, as argparse's own) and no traceback, before anything is
built. This module holds what both kinds of entry point share: the Hydra ones through
`training/configuration.py` (which adds the tables of keys), the argparse tools (`codec.py`,
`prepare_dataset.py`, `synth_eigenscape.py`) directly through `check_flags`. It imports
nothing beyond the standard library so that the synthetic-data generator stays torch-free.

`HYDRA_FULL_ERROR=1` turns the one-liners back into ordinary tracebacks, for debugging.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn, Protocol

EXIT_CONFIG_ERROR = 2  # a setting to change; nothing was run (argparse uses 2 for usage errors)
EXIT_FAILURE = 1       # the run itself failed


class ConfigError(ValueError):
    """A setting that cannot work, with the key to change and what to do."""


def full_error() -> bool:
    """Whether the user asked for full tracebacks (Hydra's own switch)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def exit_with(message: str, code: int = EXIT_CONFIG_ERROR) -> NoReturn:
    """Print `message` as one line on stderr and exit with `code`."""
    print(" ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def one_line_errors(failures: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn a `ConfigError` into `config error: ...` (exit 2) and one of `failures` (a run
    that failed: no space for a checkpoint, data gone) into `error: ...` (exit 1), one line
    on stderr each, so that a scheduler sees the exit code and a user the reason; under
    `HYDRA_FULL_ERROR=1` they are raised as usual."""
    try:
        yield
    except ConfigError as error:
        if full_error():
            raise
        exit_with(f"config error: {error}", EXIT_CONFIG_ERROR)
    except failures as error:
        if full_error():
            raise
        exit_with(f"error: {error}", EXIT_FAILURE)


def show(value: Any) -> str:
    """`value` as it would be written on the command line (`null`, `true`, `[a,b]`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
    return str(value)


def setting_error(key: str, value: Any, problem: str) -> ConfigError:
    """`ConfigError("<key>=<value>: <problem>")`; `problem` says what is wrong; what to do."""
    return ConfigError(f"{key}={show(value)}: {problem}")


# ----------------------------------------------------------------------------------------
# Rules: each says what is wrong with a value and what to do, or None when it is fine.


class Rule(Protocol):
    def problem(self, value: Any) -> str | None: ...


def is_number(value: Any) -> bool:
    """int or float, not bool (YAML's true would otherwise pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Limit:
    """A numeric range: `low <= value <= high`, ends left out when `open_low` / `open_high`.

    Applies to each element of a list and each value of a mapping. Values that are not
    numbers pass: their type is checked against the defaults (`configuration.check_types`).
    """

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def admits(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.open_low else x < self.low):
            return False
        return self.high is None or (x < self.high if self.open_high else x <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.open_high else '<='} {self.high:g}"
        return (f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.open_high else ']'}")

    def problem(self, value: Any) -> str | None:
        values = (value.values() if isinstance(value, dict) else value if isinstance(value, list)
                  else [value])
        if all(self.admits(v) for v in values if is_number(v)):
            return None
        return (f"out of range; use {'values' if isinstance(value, (list, dict)) else 'a value'} "
                f"{self}")


AT_LEAST_1 = Limit(1)
NON_NEGATIVE = Limit(0)
POSITIVE = Limit(0, open_low=True)
PROBABILITY = Limit(0, 1)
DECAY = Limit(0, 1, open_high=True)  # an EMA decay of 1 never moves


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of options (strings in the config)."""

    options: tuple

    def problem(self, value: Any) -> str | None:
        if value is None or value in self.options:
            return None
        return f"not an option; use one of {', '.join(show(o) for o in self.options)}"


@dataclass(frozen=True)
class Pattern:
    """A string matching `regex` entirely; `description` says what is accepted."""

    regex: str
    description: str

    def problem(self, value: Any) -> str | None:
        if value is None or re.fullmatch(self.regex, str(value)):
            return None
        return f"not understood; use {self.description}"


DEVICE = Pattern(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")


@dataclass(frozen=True)
class PathRule:
    """A path that must be there before the command runs (relative to where it started).

    `kind`: `file` / `folder` (existing), `output file` (not a folder; its folder exists),
    `output folder` (a folder, or one that can be created: nothing on the way is a file).
    `noun` names it in the message (`checkpoint not found`); `hint` is the advice when it
    is missing.
    """

    kind: str
    noun: str = ""
    hint: str = ""

    def problem(self, value: Any) -> str | None:
        if value is None or value == "":
            return None
        path = Path(str(value)).expanduser()
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        noun = self.noun or ("folder" if self.kind == "folder" else "file")
        if self.kind in ("file", "folder"):
            wanted, other = ((path.is_file, "a folder") if self.kind == "file"
                             else (path.is_dir, "a file"))
            if wanted():
                return None
            if path.exists():
                return f"is {other}, not a {self.kind}; give the {noun} itself"
            return f"{noun} not found{where}; {self.hint or 'check the path'}"
        if self.kind == "output file":
            if path.is_dir():
                return "is a folder; give a file name (inside it, if that is where it should go)"
            folder = path.parent
            if not folder.is_dir():
                return (f"{folder} is a file, not a folder; choose another path" if folder.exists()
                        else f"folder {folder} does not exist{where}; create it first")
            if not os.access(path if path.exists() else folder, os.W_OK):
                return f"cannot be written (permission denied{where}); choose another path"
            return None
        if self.kind == "output folder":
            for part in (path, *path.parents):
                if part.exists():
                    on_the_way = "" if part == path else f"{part} "
                    return (None if part.is_dir()
                            else f"{on_the_way}is a file, not a folder; choose another path")
            return None
        raise ValueError(f"unknown path kind {self.kind!r}")


# The recordings' folder (datasets.data_root, prepare_dataset.py --data-root).
DATA_ROOT = PathRule("folder",
                     hint="point it at the EigenScape recordings, or write a synthetic set "
                                    "with `python synth_eigenscape.py --out DIR`")


def check_flags(*checks: tuple[str, Any, Rule]) -> None:
    """Check parsed command-line flags: `(flag, value, rule)` each, None values skipped.

    The first one that fails ends the program with `config error: <flag>=<value>: ...`
    (exit code 2). For the argparse tools, right after `parse_args`.
    """
    with one_line_errors():
        for flag, value, rule in checks:
            problem = None if value is None else rule.problem(value)
            if problem:
                raise setting_error(flag, value, problem)
