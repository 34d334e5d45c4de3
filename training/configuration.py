"""The training config before anything is built: the settings that must hold, absolute paths.

`config/base.yaml` holds every key and its default; nothing below repeats a default. What is
checked here is what the YAML cannot say: the type each key takes (its default's, or
`DECLARED_TYPES` where the default is null), the range of each number (`LIMITS`), the paths
that must exist (`PATHS`) and the combinations that cannot work (`check_settings`), each
failure named by the key to change and what to do.

`command_line.check_command_line(config_name)` runs all of it on the command line of a Hydra
entry point before `@hydra.main` does (training/command_line.py).
"""
from __future__ import annotations

import math
import types
import typing
from typing import Any

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.checks import (AT_LEAST_1, DATA_ROOT, DECAY, DEVICE, NON_NEGATIVE, POSITIVE, PROBABILITY,
                          ConfigError,
                    Limit, OneOf, PathRule, Pattern, Rule, setting_error, show)
from modules.level_side_info import check_level_bands, trained_level_side
from modules.losses import MelLoss
from modules.seanet import CONV_NORMS
from modules.pairwise_terms import DIV_KINDS, NCE_POOLINGS, SIM_KINDS
from pairwise_losses import SCHEDULES
from training.tracking import WANDB_MODES

AMP_MODES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Paths resolved against the folder the command was started in.
PATH_KEYS = (("datasets", "data_root"), ("checkpoint", "save_folder"),
             ("checkpoint", "resume_path"), ("model", "init_from"), ("wandb", "dir"))

# The type of keys whose default (null, ??? or {}) does not say it. Every other key takes
# its default's type (ints where floats are expected); a null default also accepts null.
DECLARED_TYPES: dict[str, Any] = {
    "common.amp": str | bool,  # YAML reads a bare `off` as false; prepare_config maps it back
    "common.max_steps_per_epoch": int,
    "common.stop_after_step": int,
    "datasets.data_root": str,
    "datasets.prepared_root": str,
    "datasets.channels": list[int],
    "model.init_from": str,
    "discriminator.start_epoch": int,
    "checkpoint.resume_path": str,
    "wandb.name": str,
    "wandb.dir": str,
    "pairwise.class_weights": dict[str, float],
    "pairwise.head_lr": float,
    # config/evaluate.yaml
    "checkpoints": list[str] | str,
    "null_model": str,
    "array_set": str,
    "array_geometry": str,
    "shared_content.equal_bitrate_checkpoint": str,
    "datasets.val_files": str,
    "labels": list[str],
    "datasets.classes": list[str],
    "datasets.val_pairs": int,
    "datasets.segment_seconds": float,
    "instrument.ild_probe_alpha": float,
    "instrument.channel_probe_c": float,
}

# What each number may be (lists: each element; mappings: each value), and the options of
# the keys that take one of a few strings. Keys of config/base.yaml, config/pairwise/*.yaml
# and config/evaluate.yaml alike; a key absent from a config is skipped. The options come
# from the modules that use them.
LIMITS: dict[str, Rule] = {
    "common.seed": NON_NEGATIVE,
    "common.max_epoch": AT_LEAST_1,
    "common.save_interval": AT_LEAST_1,
    "common.val_interval": AT_LEAST_1,
    "common.log_interval": AT_LEAST_1,
    "common.device": Pattern(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"),
    "common.max_nonfinite_steps": AT_LEAST_1,
    "common.max_steps_per_epoch": AT_LEAST_1,
    "common.stop_after_step": NON_NEGATIVE,
    "datasets.format": OneOf(("auto", "wav", "prepared")),
    "datasets.val_files": OneOf(("all", "monitor", "held_out")),
    "datasets.channels": NON_NEGATIVE,
    "datasets.views": AT_LEAST_1,
    "datasets.tensor_cut": AT_LEAST_1,  # and long enough for the model and losses: check_segment
    "datasets.fixed_length": AT_LEAST_1,
    "datasets.val_pairs": AT_LEAST_1,
    "datasets.batch_size": AT_LEAST_1,
    "datasets.num_workers": NON_NEGATIVE,
    "datasets.gain_jitter_db": NON_NEGATIVE,
    "datasets.max_read_retries": NON_NEGATIVE,
    "model.sample_rate": AT_LEAST_1,
    "model.channels": AT_LEAST_1,
    "model.n_q": AT_LEAST_1,
    "model.bins": Limit(2, 65536),  # token files store codes as uint16
    "model.dimension": AT_LEAST_1,
    "model.target_bandwidths": POSITIVE,
    "model.filters": AT_LEAST_1,
    "model.ratios": AT_LEAST_1,
    "model.residual_layers": NON_NEGATIVE,
    "model.lstm": NON_NEGATIVE,
    "model.norm": OneOf(CONV_NORMS),
    "model.ema_decay": DECAY,
    "model.epsilon": POSITIVE,
    "model.kmeans_iters": AT_LEAST_1,
    "model.kmeans_buffer": NON_NEGATIVE,
    "model.dead_code_threshold": NON_NEGATIVE,
    "model.content_share": DECAY,  # [0, 1): 1 would leave codebook 2 no dimension
    "discriminator.filters": AT_LEAST_1,
    "discriminator.n_ffts": AT_LEAST_1,
    "discriminator.hop_lengths": AT_LEAST_1,
    "discriminator.win_lengths": AT_LEAST_1,
    "discriminator.update_prob": PROBABILITY,
    "discriminator.start_epoch": NON_NEGATIVE,
    "losses.l_t": NON_NEGATIVE,
    "losses.l_f": NON_NEGATIVE,
    "losses.l_g": NON_NEGATIVE,
    "losses.l_feat": NON_NEGATIVE,
    "losses.commit": NON_NEGATIVE,
    "losses.level_side_info.bands": NON_NEGATIVE,
    "losses.level_side_info.bits": AT_LEAST_1,
    "losses.level_side_info.step_db": POSITIVE,
    "losses.level_side_info.block_ms": POSITIVE,
    "losses.level_side_info.max_boost_db": NON_NEGATIVE,
    "balancer.ema_decay": DECAY,
    "balancer.total_norm": POSITIVE,
    "optimization.lr": POSITIVE,
    "pairwise.head_lr": POSITIVE,
    "optimization.disc_lr": POSITIVE,
    "optimization.betas": DECAY,
    "optimization.weight_decay": NON_NEGATIVE,
    "optimization.grad_clip": NON_NEGATIVE,
    "lr_scheduler.warmup_epoch": NON_NEGATIVE,
    "checkpoint.keep_last": AT_LEAST_1,
    "checkpoint.save_audio": NON_NEGATIVE,
    "wandb.mode": OneOf(WANDB_MODES),
    "distributed.check_sync_every": NON_NEGATIVE,
    "distributed.timeout_s": POSITIVE,
    "pairwise.sim_weight": NON_NEGATIVE,
    "pairwise.div_weight": NON_NEGATIVE,
    "pairwise.sim_kind": OneOf(SIM_KINDS),
    "pairwise.div_kind": OneOf(DIV_KINDS),
    "pairwise.margin": POSITIVE,
    "pairwise.max_cosine": Limit(-1, 1, open_high=True),
    "pairwise.content_codebook": NON_NEGATIVE,
    "pairwise.channel_codebook": NON_NEGATIVE,
    "pairwise.start_step": NON_NEGATIVE,
    "pairwise.schedule": OneOf(SCHEDULES),
    "pairwise.ramp_steps": NON_NEGATIVE,
    "pairwise.class_weights": NON_NEGATIVE,
    "pairwise.temperature": POSITIVE,
    "pairwise.nce_pooling": OneOf(NCE_POOLINGS),
    "pairwise.nce_projection": NON_NEGATIVE,
    "pairwise.xrec_weight": NON_NEGATIVE,
    "pairwise.cue_weight": NON_NEGATIVE,
    "pairwise.consensus_weight": NON_NEGATIVE,
    "pairwise.invariance.weight": NON_NEGATIVE,
    "pairwise.invariance.band_gain_db": NON_NEGATIVE,
    "pairwise.invariance.max_delay": NON_NEGATIVE,
    "pairwise.channel_classifier.weight": NON_NEGATIVE,
    "pairwise.channel_classifier.num_channels": AT_LEAST_1,
    "pairwise.ild_head.n_bands": AT_LEAST_1,
    "pairwise.ild_head.hidden": AT_LEAST_1,
    "pairwise.ild_head.weight": NON_NEGATIVE,
    "pairwise.ild_head.adv_weight": NON_NEGATIVE,
    "pairwise.ild_head.reversal": NON_NEGATIVE,
    "pairwise.ild_head.floor_db": POSITIVE,
    # config/evaluate.yaml
    "device": DEVICE,
    "datasets.segment_seconds": POSITIVE,
    "instrument.probe_folds": Limit(2),
    "instrument.probe_shuffles": AT_LEAST_1,
    "instrument.ild_probe_alpha": POSITIVE,
    "instrument.channel_probe_c": POSITIVE,
    "instrument.bootstrap": AT_LEAST_1,
    "instrument.seed": NON_NEGATIVE,
    "shared_content.channels": NON_NEGATIVE,
    "shared_content.segments": NON_NEGATIVE,
    "shared_content.level_side_info.bands": NON_NEGATIVE,
    "shared_content.level_side_info.bits": AT_LEAST_1,
    "shared_content.level_side_info.step_db": POSITIVE,
    "shared_content.level_side_info.block_ms": POSITIVE,
    "shared_content.level_side_info.max_boost_db": NON_NEGATIVE,
    "spectrogram_items": NON_NEGATIVE,
}

# Paths that must be there when the command starts (checked by check_command_line only:
# prepare_config also serves configs whose data is elsewhere). checkpoint.save_folder is
# checked (created, writable, room) by checkpoints.prepare_save_folder at the start.
PATHS: dict[str, PathRule] = {
    "datasets.data_root": DATA_ROOT,
    "model.init_from": PathRule("file", "checkpoint"),
    "checkpoint.resume_path": PathRule("file", "checkpoint"),
    "checkpoints": PathRule("file", "checkpoint"),
    "array_set": PathRule("folder", hint="point it at a folder of multichannel recordings"),
    "out_dir": PathRule("output folder"),
}


# ----------------------------------------------------------------------------------------
# The training config


def prepare_config(cfg: DictConfig) -> DictConfig:
    """A checked copy of `cfg` with absolute paths.

    Paths are resolved against the folder the command was started in (not Hydra's run
    folder), once, so that the config stored in a checkpoint can be reused from anywhere.
    The number of channel views per item is `datasets.views` (1 = mono, 2 = paired).
    """
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    if OmegaConf.is_missing(cfg.datasets, "data_root") or not cfg.datasets.data_root:
        raise ConfigError(
            "datasets.data_root is required: add datasets.data_root=/path/to/eigenscape to the "
            "command line (train_paired.sh and run_training.sh read it from $EIGENSCAPE_ROOT). "
            "No data yet? `python synth_eigenscape.py --out data/synth` writes a synthetic set.")
    for group, key in PATH_KEYS:
        if cfg[group][key]:
            cfg[group][key] = to_absolute_path(str(cfg[group][key]))
    if cfg.common.amp is False:  # YAML reads a bare `off` / `false` as a boolean
        cfg.common.amp = "off"
    check_settings(cfg)
    return cfg


def check_settings(cfg: DictConfig) -> None:
    """Raise ConfigError for a number out of range (`LIMITS`) or settings that cannot work
    together."""
    check_limits(cfg)
    views = cfg.datasets.views
    if cfg.common.amp not in AMP_MODES:
        raise setting_error("common.amp", cfg.common.amp,
                            f"not an option; use one of {', '.join(AMP_MODES)}")
    if views >= 2:
        n_q = cfg.model.n_q
        for key in ("content_codebook", "channel_codebook"):
            if not 0 <= cfg.pairwise[key] < n_q:
                raise ConfigError(
                    f"pairwise.{key}={cfg.pairwise[key]} but model.n_q={n_q}: paired training "
                    f"needs that codebook; use model.n_q>={cfg.pairwise[key] + 1}.")
        if cfg.pairwise.content_codebook == cfg.pairwise.channel_codebook:
            raise ConfigError(f"pairwise.channel_codebook={cfg.pairwise.channel_codebook} is also "
                              "the content codebook; use another one "
                              "(pairwise.channel_codebook=1).")
        if cfg.pairwise.shared_content_code and not cfg.model.content_share:
            raise ConfigError("pairwise.shared_content_code=true (the paired default) codes the "
                              "views' mean content part with codebook 1, which needs the split "
                              "quantizer: set model.content_share>0 (e.g. 0.5), or add "
                              "pairwise.shared_content_code=false to train on EnCodec's "
                              "residual quantizer.")
        if cfg.pairwise.schedule == "linear" and cfg.pairwise.ramp_steps < 1:
            raise ConfigError(f"pairwise.ramp_steps={cfg.pairwise.ramp_steps}: "
                              "pairwise.schedule=linear ramps over them; "
                              "use pairwise.ramp_steps>=1.")
    if cfg.balancer.enabled and cfg.common.amp == "fp16":
        raise ConfigError("balancer.enabled=true does not combine with common.amp=fp16 (the "
                          "balancer normalises gradients itself); use common.amp=bf16 or off.")
    check_level_side(cfg)
    if cfg.datasets.fixed_length < cfg.datasets.batch_size:
        raise ConfigError(f"datasets.fixed_length={cfg.datasets.fixed_length} is smaller than "
                          f"datasets.batch_size={cfg.datasets.batch_size}: an epoch has no step.")
    if len(cfg.optimization.betas) != 2:
        raise setting_error("optimization.betas", list(cfg.optimization.betas),
                            "Adam takes two betas; use e.g. optimization.betas=[0.5,0.9]")
    disc = cfg.discriminator
    if not len(disc.n_ffts) == len(disc.hop_lengths) == len(disc.win_lengths):
        raise setting_error("discriminator.n_ffts", list(disc.n_ffts),
                            f"{len(disc.n_ffts)} scales but {len(disc.hop_lengths)} hop_lengths "
                            f"and {len(disc.win_lengths)} win_lengths; give one of each per scale")
    if any(w > n for w, n in zip(disc.win_lengths, disc.n_ffts)):
        raise setting_error("discriminator.win_lengths", list(disc.win_lengths),
                            f"a window is longer than its FFT ({list(disc.n_ffts)}); "
                            "use win_lengths<=n_ffts")
    check_segment(cfg)


def check_level_side(cfg: DictConfig) -> None:
    """ConfigError unless the band-level side information the training losses score the decode
    with (`losses.level_side_info`, `trained_level_side`) can be sent at the model's rate."""
    try:
        side = trained_level_side(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if side is not None:
        try:
            check_level_bands(int(cfg.model.sample_rate), side)
        except ValueError as error:
            raise setting_error("losses.level_side_info.bands", side.bands,
                                f"{error}; use fewer bands, or 0 for none") from error


def check_segment(cfg: DictConfig) -> None:
    """`datasets.tensor_cut` must hold a frame of the model, more than half of the mel loss's
    largest window (its centred STFT pads by reflection) and the discriminator's largest FFT."""
    window = MelLoss(int(cfg.model.sample_rate)).max_window
    needs = [(math.prod(cfg.model.ratios), "a frame of the model (the product of model.ratios)"),
             (window // 2 + 1,
              f"the mel loss (its largest window, {window}, needs more than half)")]
    if cfg.discriminator.enabled:
        needs.append((max(cfg.discriminator.n_ffts),
                      "the discriminator's largest FFT (discriminator.n_ffts)"))
    for samples, what in needs:
        if cfg.datasets.tensor_cut < samples:
            raise setting_error("datasets.tensor_cut", cfg.datasets.tensor_cut,
                                f"too short for {what}; use datasets.tensor_cut>={samples}")


def check_mode(cfg: DictConfig, paired: bool) -> None:
    """The split between the two training scripts: paired needs >= 2 views, mono exactly 1."""
    views = cfg.datasets.views
    if paired and views < 2:
        raise setting_error("datasets.views", views, "train_paired_gpu.py needs datasets.views>=2; "
                            "use train_single_gpu.py for mono training")
    if not paired and views != 1:
        raise setting_error("datasets.views", views, "train_single_gpu.py trains on one channel "
                            "per item; use train_paired_gpu.py for datasets.views>=2")


def check_training(cfg: DictConfig, paired: bool) -> None:
    """The training scripts' check of a composed config: `prepare_config` and the mode."""
    check_mode(prepare_config(cfg), paired)


# ----------------------------------------------------------------------------------------
# Types, ranges, paths of any composed config (training or evaluation)


def check_limits(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value out of its range or options (`LIMITS`)."""
    for key, rule in LIMITS.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)  # ??? -> None
        if value is None:
            continue
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        problem = rule.problem(value)
        if problem:
            raise setting_error(key, value, problem)


def check_paths(cfg: DictConfig) -> None:
    """Raise ConfigError for the first path of `PATHS` that is not what it must be."""
    for key, rule in PATHS.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)  # ??? -> None
        if value is None:
            continue
        if OmegaConf.is_list(value):  # evaluate.py's checkpoints: name the one that is wrong
            value = OmegaConf.to_container(value)
            problems = [f"{path}: {rule.problem(path)}" for path in value if rule.problem(path)]
        else:
            problems = [problem] if (problem := rule.problem(value)) else []
        if problems:
            raise setting_error(key, value, problems[0])


def check_missing(cfg: DictConfig) -> None:
    """Raise ConfigError for a required key (`???` in the YAML) left unset."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        kind = f" ({_describe(DECLARED_TYPES[key])})" if key in DECLARED_TYPES else ""
        raise ConfigError(f"{key}=???: required and not set; "
                          f"add {key}=...{kind} to the command line.")


def expected_type(key: str, default: Any) -> Any:
    """The type `key` takes: `DECLARED_TYPES`, else its default's (None: anything)."""
    if key in DECLARED_TYPES:
        return DECLARED_TYPES[key]
    if default is None:
        return None
    if isinstance(default, (bool, int, float, str)):
        return type(default)
    if isinstance(default, list):
        kinds = {expected_type("", v) for v in default}
        if kinds == {int, float}:
            kinds = {float}
        return list[kinds.pop()] if len(kinds) == 1 else list
    if isinstance(default, dict):
        return dict
    return type(default)


def check_types(cfg: DictConfig, reference: DictConfig) -> None:
    """Raise ConfigError for the first setting whose type is not its default's in `reference`.

    Null defaults accept anything unless `DECLARED_TYPES` says otherwise; ints pass where
    floats are expected; list elements are checked one by one; keys added with `+` and keys
    the reference does not have are not checked.
    """
    _check_node(_plain(cfg), _plain(reference), "")


def _plain(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as error:  # an interpolation that cannot be resolved
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(error).splitlines()[0]}; "
                          "fix the ${...} reference.") from error


def _check_node(value: Any, default: Any, key: str) -> None:
    if key not in DECLARED_TYPES and isinstance(default, dict) and default:
        if not isinstance(value, dict):
            first = next(iter(default))
            raise setting_error(key, value,
                                f"is a group of settings ({', '.join(list(default)[:4])}, ...), "
                                f"not a value; set one of them, "
                                f"e.g. {key}.{first}={show(default[first])}")
        for name, sub in default.items():
            if name in value:
                _check_node(value[name], sub, f"{key}.{name}" if key else name)
        return
    expected = expected_type(key, default)
    if expected is None or (default is None and value is None) or value == "???":
        return
    if not _admits(value, expected):
        example = "" if default is None else f"; the default is {key}={show(default)}"
        raise setting_error(key, value, f"expected {_describe(expected)}{example}")


def _admits(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_admits(value, t) for t in args)
    if origin is list or expected is list:
        return isinstance(value, list) and (not args or all(_admits(v, args[0]) for v in value))
    if origin is dict or expected is dict:
        return isinstance(value, dict) and (not args
                                            or all(_admits(v, args[1]) for v in value.values()))
    if isinstance(value, bool) or expected is bool:  # bool is an int to Python, not to a config
        return isinstance(value, bool) and expected is bool
    if expected is int:
        return isinstance(value, int)
    if expected is float:
        return isinstance(value, (int, float))
    if expected is str:  # a name may look like a number (wandb.name=2024)
        return isinstance(value, (str, int, float))
    return isinstance(value, expected)


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
          list: "a list", dict: "a mapping"}
_PLURALS = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


def _describe(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in args)
    if origin is list:
        return f"a list of {_PLURALS.get(args[0], 'values')}, e.g. [a,b]"
    if origin is dict:
        return f"a mapping of names to {_PLURALS.get(args[1], 'values')}, e.g. {{a:1}}"
    return _NAMES.get(expected, expected.__name__)
