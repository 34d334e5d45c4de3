"""Configuration mistakes are one line naming the key and what to do, in every entry point.

The entry points run as subprocesses, as a user starts them; every mistake is caught before
any model is built, so each run takes only the imports. The checker's parts (types against
the defaults, ranges, paths, Hydra's composition errors) are tested in-process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from training import configuration
from utils.checks import (AT_LEAST_1, DECAY, NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError,
                          Limit,
                    OneOf, PathRule, check_flags, is_number)
from training.command_line import composed_configs, job_overrides
from training.configuration import (DECLARED_TYPES, LIMITS, PATHS, check_limits, check_settings,
                                    check_types, expected_type)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"


# ----------------------------------------------------------------------------------------
# The entry points, as a user runs them


def _training(script: str, *extra: str) -> list[str]:
    # {data} and {tmp} are filled in per test; the data folder exists (and is empty: every
    # mistake below must stop the run before the data is read).
    return [script, "+preset=tiny", "datasets.data_root={data}",
            "checkpoint.save_folder={tmp}/ckpt", "hydra.run.dir={tmp}/hydra", *extra]


CASES = {
    # the mistakes users made most often
    "unknown key": (_training("train_paired_gpu.py", "datasets.batchsize=4"),
                    ["datasets.batchsize=4", "did you mean datasets.batch_size=4",
                     "+datasets.batchsize=4"]),
    "wrong type": (_training("train_paired_gpu.py", "datasets.batch_size=abc"),
                   ["datasets.batch_size=abc", "expected an integer", "datasets.batch_size=8"]),
    "unknown group option": (_training("train_paired_gpu.py", "pairwise=nonexistent"),
                             ["pairwise=nonexistent", "contrastive, seed"]),
    "bins out of range": (_training("train_paired_gpu.py", "model.bins=-3"),
                          ["model.bins=-3", "in [2, 65536]"]),
    "batch size zero": (_training("train_single_gpu.py", "datasets.batch_size=0"),
                        ["datasets.batch_size=0", ">= 1"]),
    # good already (one line), now with exit code 2 like every configuration mistake
    "data root missing": (_training("train_paired_gpu.py", "datasets.data_root={tmp}/nonexistent"),
                          ["datasets.data_root=", "not found"]),
    "amp unknown": (_training("train_paired_gpu.py", "common.amp=fp8"),
                    ["common.amp=fp8", "off, bf16, fp16"]),
    "save folder through a file": (_training("train_paired_gpu.py",
                                             "checkpoint.save_folder={file}/run"),
                                   ["checkpoint.save_folder=", "is a file, not a folder"]),
    # more
    "data root is a file": (_training("train_paired_gpu.py", "datasets.data_root={file}"),
                            ["datasets.data_root=", "is a file, not a folder"]),
    "negative learning rate": (_training("train_paired_gpu.py", "optimization.lr=-1"),
                               ["optimization.lr=-1", "> 0"]),
    "unknown preset": (["train_paired_gpu.py", "+preset=nope", "datasets.data_root={data}"],
                       ["+preset=nope", "demo, tiny"]),
    "typo in a group name": (_training("train_paired_gpu.py", "pairwse=contrastive"),
                             ["pairwse=contrastive", "did you mean pairwise=contrastive"]),
    "segment too short": (_training("train_paired_gpu.py", "datasets.tensor_cut=500"),
                          ["datasets.tensor_cut=500", "datasets.tensor_cut>=1025"]),
    "no data root": (["train_single_gpu.py", "+preset=tiny"], ["datasets.data_root", "required"]),
    "init_from missing": (_training("train_single_gpu.py", "model.init_from={tmp}/nope.pt"),
                          ["model.init_from=", "checkpoint not found"]),
    "mono script, two views": (_training("train_single_gpu.py", "datasets.views=2"),
                               ["datasets.views=2", "train_paired_gpu.py"]),
    "multirun sweep value": (["train_single_gpu.py", "-m", "+preset=tiny",
                              "datasets.data_root={data}",
                              "hydra.sweep.dir={tmp}/sweep", "datasets.batch_size=2,0"],
                             ["datasets.batch_size=0", ">= 1"]),
    "shell wrapper under torchrun": (["train_paired.sh", "+preset=tiny", "datasets.batchsize=4"],
                                     ["datasets.batchsize=4", "datasets.batch_size"]),
    "evaluate: unknown key": (["evaluate.py", "checkpoints=[{file}]", "datasets.batchsize=3",
                               "out_dir={tmp}/ev"],
                              ["datasets.batchsize=3", "datasets.batch_size"]),
    "evaluate: wrong type": (["evaluate.py", "checkpoints=[{file}]", "instrument.bootstrap=abc",
                              "out_dir={tmp}/ev"],
                             ["instrument.bootstrap=abc", "integer"]),
    "evaluate: no checkpoints": (["evaluate.py", "out_dir={tmp}/ev"],
                                 ["checkpoints=???", "required"]),
    "evaluate: checkpoint missing": (["evaluate.py", "checkpoints=[{tmp}/nope.pt]",
                                      "out_dir={tmp}/ev"],
                                     ["checkpoints=", "checkpoint not found"]),
    "codec: checkpoint is a folder": (["codec.py", "encode", "--checkpoint", "{tmp}", "{file}",
                                       "{tmp}/x.tok"],
                                      ["--checkpoint=", "is a folder, not a file"]),
    "codec: token file is a folder": (["codec.py", "decode", "--checkpoint", "{file}", "{tmp}",
                                       "{tmp}/y.wav"],
                                      ["input=", "is a folder, not a file"]),
    "codec: output is a folder": (["codec.py", "encode", "--checkpoint", "{file}", "{file}",
                                   "{tmp}"],
                                  ["output=", "is a folder"]),
    "prepare: output is a file": (["prepare_dataset.py", "--data-root", "{data}", "--out",
                                   "{file}"],
                                  ["--out=", "is a file, not a folder"]),
    "prepare: sample rate zero": (["prepare_dataset.py", "--data-root", "{data}", "--sample-rate",
                                   "0"],
                                  ["--sample-rate=0", ">= 1"]),
    "synth: no files": (["synth_eigenscape.py", "--out", "{tmp}/s", "--files-per-class", "0"],
                        ["--files-per-class=0", ">= 1"]),
    "synth: output is a file": (["synth_eigenscape.py", "--out", "{file}"],
                                ["--out=", "is a file"]),
}


def run_entry_point(args: list[str], tmp_path: Path,
                    env: dict | None = None) -> subprocess.CompletedProcess:
    data, file = tmp_path / "data", tmp_path / "a_file"
    data.mkdir(exist_ok=True)
    file.write_text("not audio, not a checkpoint")
    args = [a.format(data=data, tmp=tmp_path, file=file) for a in args]
    if args[0].endswith(".sh"):  # the torchrun path of the shell wrappers
        command = ["bash", str(ROOT / args[0]), *args[1:]]
        env = {**(env or {}), "NPROC": "2", "EIGENSCAPE_ROOT": str(data), "PYTHON": sys.executable}
    else:
        command = [sys.executable, str(ROOT / args[0]), *args[1:]]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
                               "HYDRA_FULL_ERROR": "0", **(env or {})})


@pytest.mark.parametrize("case", list(CASES))
def test_mistake_is_one_line_naming_the_key(case, tmp_path):
    args, needles = CASES[case]
    res = run_entry_point(args, tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("config error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "HYDRA_FULL_ERROR" not in res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "ckpt").exists()  # stopped before training started


def test_hydra_full_error_still_shows_the_trace(tmp_path):
    res = run_entry_point(_training("train_paired_gpu.py", "datasets.batchsize=4"), tmp_path,
                          env={"HYDRA_FULL_ERROR": "1"})
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "datasets.batchsize" in res.stderr


# ----------------------------------------------------------------------------------------
# Every key is covered


def _leaves(node, prefix=""):
    """(dotted key, default) of every leaf; an empty mapping is a leaf."""
    if isinstance(node, dict) and node:
        for name, sub in node.items():
            yield from _leaves(sub, f"{prefix}{name}.")
    else:
        yield prefix[:-1], node


def _all_defaults() -> dict[str, object]:
    """Every key of every config (both recipes of the pairwise group) with its default."""
    defaults: dict[str, object] = {}
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for name, overrides in [("config_paired_nq2", []), ("config_mono_nq2", []),
                                ("evaluate", []), ("config_paired_nq2", ["pairwise=contrastive"])]:
            cfg = compose(config_name=name, overrides=overrides)
            plain = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
            for key, default in _leaves(plain):
                defaults.setdefault(key, default)
    return defaults


def test_every_key_has_a_type_check():
    untyped = [key
               for key, default in _all_defaults().items() if expected_type(key, default) is None]
    assert not untyped, f"declare the type of {untyped} in configuration.DECLARED_TYPES"


def test_every_number_has_a_range():
    def numeric(key, default):
        kind = expected_type(key, default)
        args = getattr(kind, "__args__", ())
        return kind in (int, float) or any(a in (int, float) for a in args)

    unbounded = [key for key, default in _all_defaults().items()
                 if numeric(key, default) and key not in LIMITS]
    assert not unbounded, f"give {unbounded} a range in configuration.LIMITS"


def test_every_rule_names_an_existing_key():
    keys = set(_all_defaults())
    for table in (DECLARED_TYPES, LIMITS, PATHS):
        assert not set(table) - keys, f"stale keys: {set(table) - keys}"


# ----------------------------------------------------------------------------------------
# The parts of the checker


def _compose(*overrides: str, preset: str = "tiny"):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config_paired_nq2",
                       overrides=[f"+preset={preset}", "datasets.data_root=x", *overrides])


@pytest.fixture(scope="module")
def reference():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config_paired_nq2")


@pytest.mark.parametrize("override", [
    "optimization.lr=1",                     # an int where a float is expected
    "wandb.name=2024",                       # a name that looks like a number
    "common.max_steps_per_epoch=5",          # null default, declared int
    "datasets.channels=[0,8]",               # null default, declared list of ints
    "+pairwise.class_weights.Beach=2",       # empty mapping, declared names -> numbers
    "model.target_bandwidths=[1.5,3]",       # list of floats
    "+datasets.extra=abc",                   # added keys are not checked
    "pairwise=contrastive",
])
def test_types_that_fit_the_defaults_pass(override, reference):
    check_types(_compose(override), reference)


@pytest.mark.parametrize("override, message", [
    ("datasets.batch_size=abc",
     "datasets.batch_size=abc: expected an integer; the default is datasets.batch_size=8"),
    ("datasets.batch_size=8.5", "expected an integer"),
    ("common.compile=1", "common.compile=1: expected true or false"),
    ("optimization.lr=true", "optimization.lr=true: expected a number"),
    ("model.ratios=[8,5.5]", "model.ratios=[8,5.5]: expected a list of integers"),
    ("datasets.train_classes=Beach", "expected a list of strings"),
    ("datasets.channels=3", "datasets.channels=3: expected a list of integers"),
    ("datasets.batch_size=null", "datasets.batch_size=null: expected an integer"),
    ("model=3", "model=3: is a group of settings"),
    ("+pairwise.class_weights.Beach=x", "expected a mapping of names to numbers"),
])
def test_types_that_do_not_fit_are_named(override, message, reference):
    with pytest.raises(ConfigError) as err:
        check_types(_compose(override), reference)
    assert message in str(err.value)


def test_limits_read_as_ranges():
    assert (str(AT_LEAST_1), str(NON_NEGATIVE), str(POSITIVE)) == (">= 1", ">= 0", "> 0")
    assert ((str(PROBABILITY), str(DECAY), str(Limit(-1, 1, open_high=True)))
            == ("in [0, 1]", "in [0, 1)", "in [-1, 1)"))
    assert POSITIVE.problem(0) and not POSITIVE.problem(1e-9)
    assert DECAY.problem(1.0) and not DECAY.problem(0.999)
    assert AT_LEAST_1.problem([1, 0]) == "out of range; use values >= 1"
    assert NON_NEGATIVE.problem({"Beach": -1}) and not NON_NEGATIVE.problem({"Beach": 2})
    assert AT_LEAST_1.problem("abc") is None  # the type check names that one
    assert not is_number(True) and is_number(3) and is_number(0.5)
    assert OneOf(("a", "b")).problem("c") == "not an option; use one of a, b"


@pytest.mark.parametrize("override, key", [
    ("model.bins=1", "model.bins=1"), ("model.n_q=0", "model.n_q=0"),
    ("optimization.lr=0", "optimization.lr=0"),
    ("optimization.betas=[0.5,1.0]", "optimization.betas"),
    ("discriminator.update_prob=1.5", "discriminator.update_prob=1.5"),
    ("common.log_interval=0", "common.log_interval=0"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0"),
    ("losses.l_f=-1", "losses.l_f=-1"), ("pairwise.temperature=0", "pairwise.temperature=0"),
    ("pairwise.sim_kind=l2", "pairwise.sim_kind=l2"), ("model.norm=batch", "model.norm=batch"),
    ("common.device=gpu", "common.device=gpu"), ("datasets.format=mp3", "datasets.format=mp3"),
    ("datasets.tensor_cut=300", "datasets.tensor_cut=300"),
    ("discriminator.win_lengths=[256]", "discriminator.n_ffts"),
    ("pairwise.channel_codebook=0", "pairwise.channel_codebook=0"),
])
def test_settings_out_of_range_are_named(override, key):
    with pytest.raises(ConfigError) as err:
        check_settings(_compose(override))
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_presets_and_recipes_are_in_range():
    for preset in ("tiny", "demo"):
        for recipe in ("seed", "contrastive"):
            check_settings(_compose(f"pairwise={recipe}", preset=preset))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for name in ("config_paired_nq2", "config_mono_nq2"):
            check_settings(compose(config_name=name, overrides=["datasets.data_root=x"]))
        check_limits(compose(config_name="evaluate"))


@pytest.mark.parametrize("argv, message", [
    (["datasets.batchsize=4"],
     "datasets.batchsize=4: no such key; did you mean datasets.batch_size=4? "
     "(+datasets.batchsize=4 adds a new key)."),
    (["dataset.batch_size=4"], "did you mean datasets.batch_size=4?"),
    (["pairwise.class_weights.Beach=2"],
     "no such key; (+pairwise.class_weights.Beach=2 adds a new key)."),
    (["pairwise.class_weights={Beach:2}"],
     "pairwise.class_weights={Beach:2}: pairwise.class_weights.Beach "
     "is not a key of the config; add new keys one by one with "
     "+pairwise.class_weights.Beach=..."),
    (["pairwise=nope"],
     "pairwise=nope: pairwise has no option 'nope'; use one of contrastive, seed."),
    (["+preset=nope"], "+preset=nope: preset has no option 'nope'; use one of demo, tiny."),
    (["preset=tiny"],
     "preset=tiny: preset is not selected by the config; add it with +preset=tiny."),
    (["+datasets.batch_size=3"], "datasets.batch_size already exists; drop the + to change it"),
    (["~datasets.val_pair"],
     "~datasets.val_pair: no such key to delete; did you mean ~datasets.val_pairs?"),
    (["datasets.batch_size=[1,"], "datasets.batch_size=[1,: cannot be read as an override"),
    (["datasets.train_classes=Beach,Park"],
     "datasets.train_classes=Beach,Park: a comma makes a sweep; "
     "write datasets.train_classes=[a,b] for a list"),
    (["--config-name=nope"], "--config-name=nope: no such config"),
])
def test_composition_errors_name_the_override(argv, message):
    with pytest.raises(ConfigError) as err:
        list(composed_configs("config_paired_nq2", ["datasets.data_root=x", *argv]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_help_and_other_config_folders_are_left_to_hydra():
    assert list(composed_configs("config_paired_nq2", ["--help"])) == []
    assert (list(composed_configs("config_paired_nq2",
                                  ["--config-dir", "/elsewhere", "x.y=1"])) == [])


def test_multirun_checks_each_sweep_value_once():
    jobs = job_overrides(["a=1,2", "b=3", "c=x,y,z"], multirun=True)
    assert (jobs == [["a=1", "b=3", "c=x"], ["a=2", "b=3", "c=x"], ["a=1", "b=3", "c=y"],
                     ["a=1", "b=3", "c=z"]])
    assert job_overrides(["a=1"], multirun=False) == [["a=1"]]


def test_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("x")
    assert PathRule("file").problem("f") is None and PathRule("folder").problem(".") is None
    assert PathRule("file", "checkpoint").problem("nope.pt").startswith(
        f"checkpoint not found (relative to {tmp_path}); check the path")
    assert PathRule("file").problem(".").startswith("is a folder, not a file")
    assert PathRule("folder").problem("f").startswith("is a file, not a folder")
    assert PathRule("output file").problem("new.tok") is None
    assert (PathRule("output file").problem("missing/new.tok")
            .startswith("folder missing does not exist"))
    assert PathRule("output file").problem(".").startswith("is a folder")
    assert PathRule("output folder").problem("a/b/c") is None
    assert PathRule("output folder").problem("f/run").startswith("f is a file, not a folder")
    assert PathRule("output folder").problem("f").startswith("is a file, not a folder")


def test_check_flags_exits_with_one_line(capsys):
    check_flags(("--workers", 2, AT_LEAST_1),
                ("--out", None, PathRule("folder")))  # fine / not given
    with pytest.raises(SystemExit) as stop:
        check_flags(("--workers", 0, AT_LEAST_1))
    assert stop.value.code == 2
    assert capsys.readouterr().err == "config error: --workers=0: out of range; use a value >= 1\n"


def test_the_synthetic_generator_stays_torch_free():
    code = "import sys, synth_eigenscape; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.stdout.strip() == "False", res.stderr


def test_configuration_reexports_config_error():
    assert configuration.ConfigError is ConfigError
