"""The training state: where training is (`Progress`), what a checkpoint holds, whether a
checkpoint fits the current config, restoring it, and which checkpoint to resume from.

A checkpoint's position (`epoch`, `batch`, `step`) is where training continues: `batch`
batches of `epoch` are done. A checkpoint saved after the last batch of an epoch but before
that epoch's validation (a stop right there) therefore resumes into the validation, the
best-model check and the periodic checkpoint of that epoch; a checkpoint saved after them
points at the next epoch.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from utils import checkpoints as ckpt_io
from utils import distributed
from training.configuration import ConfigError
from training.parts import Parts
from training.runtime import Runtime

# Settings that change the shape of a saved tensor, or (content_share) what its codes mean;
# a dotted key is a setting inside a sub-group.
SHAPE_KEYS = ([("model", k) for k in ("n_q", "bins", "dimension", "filters", "ratios",
                                      "residual_layers", "lstm", "norm", "channels",
                                      "content_share")]
              + [("discriminator", k) for k in ("filters", "n_ffts", "enabled")]
              + [("pairwise", "channel_classifier")]
              + [("pairwise", f"ild_head.{k}") for k in ("enabled", "n_bands", "hidden")])


@dataclass
class Progress:
    """Where training is and what it has seen so far.

    Attributes:
        epoch: the epoch in progress (from 1).
        batch: batches of `epoch` done (position in the epoch, not a size).
        step: optimizer steps done, all epochs.
        skipped_in_a_row, skipped_total: non-finite steps skipped.
        skipped_reads: data reads that failed and were redrawn around, all epochs.
        best: best value of `checkpoint.best_metric` so far (lower is better).
        last_val: the scalars of the last validation.
        wandb_id: the wandb run to continue.
    """
    epoch: int = 1
    batch: int = 0
    step: int = 0
    skipped_in_a_row: int = 0
    skipped_total: int = 0
    skipped_reads: int = 0
    best: float = math.inf
    last_val: dict[str, float] = field(default_factory=dict)
    wandb_id: str | None = None


def training_state(parts: Parts, cfg: DictConfig, progress: Progress) -> dict[str, Any]:
    """Everything needed to continue bit-exactly, as tensors and plain types.

    Every rank calls it: the random states of all ranks are gathered (one entry per rank).
    """
    return {
        "model": parts.raw_model.state_dict(),
        "discriminator": state_or_empty(parts.raw_disc),
        "pairwise": state_or_empty(parts.pairwise),
        "opt_g": parts.opt_g.state_dict(),
        "opt_d": state_or_empty(parts.opt_d),
        "scaler_g": parts.scaler_g.state_dict(),
        "scaler_d": parts.scaler_d.state_dict(),
        "balancer": state_or_empty(parts.balancer),
        "epoch": progress.epoch, "batch": progress.batch, "step": progress.step,
        "skipped_total": progress.skipped_total, "skipped_reads": progress.skipped_reads,
        "best": progress.best, "val": progress.last_val,
        "wandb_id": progress.wandb_id,
        "rng": distributed.gather_to_main([ckpt_io.capture_rng_state()]),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def state_or_empty(part: Any) -> dict[str, Any]:
    """`part.state_dict()`, or {} for a part that this run does not have."""
    return part.state_dict() if part is not None else {}


def check_compatible(ckpt: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """Name the settings that change shapes, instead of a wall of size mismatches."""
    old = ckpt.get("config", {})
    diffs = []

    def setting(config: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            config = config.get(part) if isinstance(config, dict) else None
        return config

    for group, key in SHAPE_KEYS:
        saved = setting(old.get(group, {}), key)
        now = setting(OmegaConf.to_container(cfg[group], resolve=True), key)
        if saved is not None and saved != now:
            diffs.append(f"{group}.{key}: checkpoint {saved} vs now {now}")
    if (old.get("datasets", {}).get("views", 1) >= 2) != (cfg.datasets.views >= 2):
        diffs.append("training mode (mono vs paired)")
    if diffs:
        raise ConfigError(
            f"cannot resume from {path}: the config changes shapes ({'; '.join(diffs)}). "
            "Resume with the original settings, or start a new run with another "
            "checkpoint.save_folder.")


def grouped_like(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`saved` (an optimizer state dict) in the parameter groups of `optimizer`.

    Checkpoints written before the pairwise heads had a group of their own hold the model
    and the heads in one group, in the same order: that group is split at the model's size,
    each part keeping the saved hyperparameters and the per-parameter moments. Anything else
    is returned as is (a mismatch is then `load_state_dict`'s error)."""
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != 1 or len(groups) != 2:
        return saved
    (old,) = saved["param_groups"]
    if len(old["params"]) != sum(len(g["params"]) for g in groups):
        return saved
    cut = len(groups[0]["params"])
    split = [{**old, "params": old["params"][:cut]}, {**old, "params": old["params"][cut:]}]
    return {**saved, "param_groups": split}


def restore_training_state(parts: Parts, runtime: Runtime, ckpt: dict[str, Any], cfg: DictConfig,
                           path: Path) -> Progress:
    """Load `ckpt` into `parts` and the random generators; returns where training continues."""
    check_compatible(ckpt, cfg, path)
    try:
        parts.raw_model.load_state_dict(ckpt["model"])
        if parts.raw_disc is not None and ckpt.get("discriminator"):
            parts.raw_disc.load_state_dict(ckpt["discriminator"])
        if parts.pairwise is not None and "pairwise" in ckpt:
            parts.pairwise.load_state_dict(ckpt["pairwise"])
    except RuntimeError as e:
        raise ConfigError(f"cannot resume from {path}: {e}") from e
    parts.opt_g.load_state_dict(grouped_like(ckpt["opt_g"], parts.opt_g))
    if parts.opt_d is not None and ckpt.get("opt_d"):
        parts.opt_d.load_state_dict(ckpt["opt_d"])
    parts.scaler_g.load_state_dict(ckpt["scaler_g"])
    parts.scaler_d.load_state_dict(ckpt["scaler_d"])
    if parts.balancer is not None and ckpt.get("balancer"):
        parts.balancer.load_state_dict(ckpt["balancer"])
    restore_rng(ckpt["rng"], runtime, path)
    return Progress(epoch=ckpt["epoch"], batch=ckpt["batch"], step=ckpt["step"],
                    skipped_total=ckpt.get("skipped_total", 0),
                    skipped_reads=ckpt.get("skipped_reads", 0), best=ckpt.get("best", math.inf),
                    last_val=ckpt.get("val", {}), wandb_id=ckpt.get("wandb_id"))


def restore_rng(rng: list[dict[str, Any]], runtime: Runtime, path: Path) -> None:
    """Each rank takes its own saved random state (rank 0's when the world size changed)."""
    if len(rng) != runtime.world_size:
        warnings.warn(f"{path} was saved by {len(rng)} process(es), this run has "
                      f"{runtime.world_size}: every rank restores rank 0's random state, so the "
                      "run continues correctly but not bit-identically.")
    ckpt_io.restore_rng_state(rng[runtime.rank] if len(rng) == runtime.world_size else rng[0])


def find_resume_checkpoint(cfg: DictConfig, map_location: Any
                           ) -> tuple[Path, dict[str, Any]] | None:
    """`(path, checkpoint)` to continue from: `checkpoint.resume_path`, else with
    `checkpoint.resume` the newest checkpoint in `checkpoint.save_folder` that loads and is
    complete (damaged ones are skipped with one warning naming them), else None (a fresh
    start)."""
    if cfg.checkpoint.resume_path:
        path = Path(cfg.checkpoint.resume_path)
        if not path.is_file():
            raise ConfigError(f"checkpoint.resume_path={path} does not exist.")
        return path, ckpt_io.load_checkpoint(path, map_location, required=ckpt_io.RESUME_KEYS)
    if not cfg.checkpoint.resume:
        return None
    found = ckpt_io.load_newest_good(cfg.checkpoint.save_folder, map_location)
    if found is None:
        warnings.warn(f"checkpoint.resume=true but no checkpoint in {cfg.checkpoint.save_folder}; "
                      "starting from scratch.")
    return found
