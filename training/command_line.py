"""The command line of a Hydra entry point, checked before `@hydra.main` composes it.

`check_command_line(config_name)` composes the config of the command line as Hydra will
(with Hydra's own argument parser and override parser), then runs the checks of
training/configuration.py on it (types, ranges, paths, required keys), so that a typo, a
wrong type or an unknown group option is one line (`config error: ...`, exit code 2) rather
than Hydra's multi-line error or a traceback from deep inside the model;
`HYDRA_FULL_ERROR=1` shows the full trace instead. Hydra's composition errors are turned
into the same one-line form by `composition_error`, with the closest existing key or the
available group options.
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from training.configuration import check_limits, check_missing, check_paths, check_types
from utils.checks import ConfigError, one_line_errors

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def check_command_line(config_name: str, argv: Sequence[str] | None = None,
                       check: Callable[[DictConfig], Any] | None = None) -> None:
    """Compose the config of a Hydra command line as `@hydra.main` will, and exit with one
    line `config error: <key>=<value>: <what is wrong>; <what to do>` (code 2) if it cannot
    work: an unknown key (with the closest existing one), an unknown group option (with the
    available ones), a type that is not the default's, a number out of range, a missing
    path, or `check(cfg)`'s ConfigError (the training scripts: `check_training`).

    Args:
        config_name (str): The entry point's `config_name` (`--config-name` on the command
            line wins).
        argv (list of str, optional): The arguments (default: `sys.argv[1:]`).
        check (callable, optional): Further checks of each composed config, raising ConfigError.

    Call it before the `@hydra.main` function. Help, `--info` and other config folders
    (`--config-path`, `--config-dir`) are left to Hydra. Under `--multirun` every value of
    every sweep is checked (with the other overrides at their first value). Under
    `HYDRA_FULL_ERROR=1` the error is raised with its traceback.
    """
    with one_line_errors():
        for cfg in composed_configs(config_name, sys.argv[1:] if argv is None else list(argv)):
            if check is not None:
                check(cfg)
            check_missing(cfg)
            check_limits(cfg)
            check_paths(cfg)


def composed_configs(config_name: str, argv: list[str]) -> Iterator[DictConfig]:
    """The configs of the jobs `argv` describes, type-checked against the defaults."""
    # Hydra's own flags, as @hydra.main parses them
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.config_path
            or args.config_dir or args.experimental_rerun):
        return
    name = args.config_name or config_name
    check_syntax(args.overrides)
    reference = compose_config(name, [])
    for overrides in job_overrides(args.overrides, args.multirun):
        cfg = compose_config(name, overrides, reference)
        check_types(cfg, reference)
        yield cfg


def check_syntax(overrides: list[str]) -> None:
    """Raise ConfigError naming the first argument that is not a Hydra override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parser.parse_override(arg)
        except HydraException as error:  # the parser raises plain HydraExceptions too
            raise ConfigError(f"{arg}: cannot be read as an override "
                              f"({str(error).splitlines()[0]}); "
                              "write key=value, quoted for the shell when the value has spaces or "
                              "brackets: 'key=[a,b]'.") from error


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """One override list per job to check: the command line, or under `--multirun` each
    sweep value once (N checks for N values, not the product of the sweeps)."""
    if not multirun:
        return [list(overrides)]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))  # check_syntax passed
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
               if o.is_sweep_override() else [o.input_line] for o in parsed]
    first = [c[0] for c in choices]
    return [first] + [first[:i] + [v] + first[i + 1:] for i, c in enumerate(choices) for v in c[1:]]


def compose_config(config_name: str, overrides: list[str],
                   reference: DictConfig | None = None) -> DictConfig:
    """`hydra.compose` from config/, its errors turned into one-line ConfigErrors."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        try:
            return compose(config_name=config_name, overrides=overrides)
        except Exception as error:  # compose fails only on the command line or the YAML files
            raise composition_error(error, overrides, reference, config_name) from error


def composition_error(error: Exception, overrides: list[str], reference: DictConfig | None = None,
                      config_name: str = "") -> ConfigError:
    """Hydra's composition error as one line naming the override and what to do."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        if not group:
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            return ConfigError(f"--config-name={config_name}: no such config in {CONFIG_DIR}; "
                               f"use one of {', '.join(names)}.")
        options = ", ".join(error.options or _group_options(group)) or "(none)"
        arg = _override_for(group, overrides, option) or f"{group}={option}"
        return ConfigError(f"{arg}: {group} has no option {option!r}; use one of {options}.")
    quoted = re.search(r"'([^']+)'", first_line)
    key = quoted.group(1) if quoted else ""
    arg = _override_for(key, overrides) or key
    value = arg.split("=", 1)[1] if "=" in arg else "..."
    if first_line.startswith("Ambiguous value"):  # a comma outside --multirun
        return ConfigError(f"{arg}: a comma makes a sweep; "
                           f"write {key.split('=')[0]}=[a,b] for a list, "
                           "quote the value for a string, or add --multirun to sweep.")
    if "No match in the defaults list" in first_line:
        return ConfigError(f"{arg}: {key} is not selected by the config; "
                           f"add it with +{key}={value}.")
    if first_line.startswith("Could not append"):
        return ConfigError(f"{arg}: {key} already exists; drop the + to change it: {key}={value}.")
    # Typos: the closest existing key among the siblings when the parent exists
    # (datasets.batchsize -> datasets.batch_size), else at the same depth (dataset.batch_size).
    known, parent = _known_keys(reference), key.rpartition(".")[0]
    if parent in known:
        known = [k for k in known if k.rpartition(".")[0] == parent]
    else:
        known = [k for k in known if k.count(".") == key.count(".")]
    guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if first_line.startswith("Could not delete"):
        advice = f"; did you mean ~{guess[0]}?" if guess else ""
        return ConfigError(f"{arg}: no such key to delete{advice}")
    if first_line.startswith("Could not override"):
        nested = getattr(error.__cause__, "full_key", None)
        if str(nested).startswith(key + "."):  # key={new:1}: the new key is inside the value
            return ConfigError(f"{arg}: {nested} is not a key of the config; add new keys one by "
                               f"one with +{nested}=...")
        advice = f"did you mean {guess[0]}={value}? " if guess else ""
        return ConfigError(f"{arg}: no such key; {advice}(+{key}={value} adds a new key).")
    return ConfigError(f"{arg + ': ' if arg else ''}{first_line}")


def _override_for(key: str, overrides: list[str], value: str | None = None) -> str:
    """The command-line argument that sets `key` (to `value`, when given), or ''."""
    for arg in overrides:
        name, _, text = arg.lstrip("+~").partition("=")
        if key and name.split("@", 1)[0] == key and value in (None, text):
            return arg
    return ""


def _group_options(group: str) -> list[str]:
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _known_keys(reference: DictConfig | None) -> list[str]:
    """Every dotted key of `reference` (leaves and groups) and the config groups."""
    keys = [p.name for p in CONFIG_DIR.iterdir() if p.is_dir()]

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for name, sub in node.items():
                keys.append(prefix + str(name))
                walk(sub, f"{prefix}{name}.")
    if reference is not None:
        walk(OmegaConf.to_container(reference, resolve=False), "")
    return keys
