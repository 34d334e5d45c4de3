"""The training config before anything is built: the settings that must hold, absolute paths.

`config/base.yaml` holds every key and its default; nothing below repeats a default. What is
checked here is what the YAML cannot say: combinations that cannot work, named by the key to
change.
"""
from __future__ import annotations

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

AMP_MODES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Paths resolved against the folder the command was started in.
PATH_KEYS = (("datasets", "data_root"), ("checkpoint", "save_folder"),
             ("checkpoint", "resume_path"), ("model", "init_from"), ("wandb", "dir"))


class ConfigError(ValueError):
    """A setting that cannot work, with the key to change and what to do."""


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
    """Raise ConfigError for settings that cannot work together."""
    views = cfg.datasets.views
    if views < 1:
        raise ConfigError(f"datasets.views={views}: use 1 (mono), 2 (paired) or more.")
    if cfg.common.amp not in AMP_MODES:
        raise ConfigError(f"common.amp={cfg.common.amp!r}: use one of {list(AMP_MODES)}")
    if views >= 2:
        n_q = cfg.model.n_q
        for key in ("content_codebook", "channel_codebook"):
            if not 0 <= cfg.pairwise[key] < n_q:
                raise ConfigError(
                    f"pairwise.{key}={cfg.pairwise[key]} but model.n_q={n_q}: paired training "
                    f"needs that codebook; use model.n_q>={cfg.pairwise[key] + 1}.")
    if cfg.balancer.enabled and cfg.common.amp == "fp16":
        raise ConfigError("balancer.enabled=true does not combine with common.amp=fp16 (the "
                          "balancer normalises gradients itself); use common.amp=bf16 or off.")
    if cfg.datasets.fixed_length < cfg.datasets.batch_size:
        raise ConfigError(f"datasets.fixed_length={cfg.datasets.fixed_length} is smaller than "
                          f"datasets.batch_size={cfg.datasets.batch_size}: an epoch has no step.")
