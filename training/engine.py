"""The one training engine behind `train_single_gpu.py` (1 view) and `train_paired_gpu.py`.

`train(cfg)` reads top to bottom: check the config, set up the runtime, build the data and
the parts, resume if asked; then the epoch loop: `run_epoch` trains the epoch's remaining
batches, `finish_epoch` validates and saves. Mono and paired training differ only in
`datasets.views`. Each concern lives in its own module:

    training/configuration.py   checks and absolute paths (ConfigError)
    training/runtime.py         device, DDP, AMP, seeding, preemption (StopFlag)
    training/loaders.py         the training set and loaders by position
    training/parts.py           model, discriminator, losses, optimizers, learning-rate schedule
    training/step.py   one step for V views
    training/validation.py      the validation pass (shared with evaluate.py)
    training/state.py  what a checkpoint holds, resume
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import checkpoints as ckpt_io
from utils import distributed
from utils.checks import one_line_errors
from training.configuration import ConfigError, check_mode, prepare_config
from training.loaders import (build_train_dataset, epoch_loader, make_loader, rank_share,
                              steps_in_epoch)
from paired_channel_dataset import ChannelViewsDataset, TooManyReadFailures
from training.parts import Parts, build_parts, estimate_checkpoint_bytes
from training.runtime import Runtime, StopFlag, seed_everything, setup_runtime
from training.tracking import Tracker, setup_logging
from training.state import Progress, find_resume_checkpoint, restore_training_state, training_state
from training.step import StepResult, discriminator_coin, replicated_state, train_step
from training.validation import validate, validation_dataset

log = logging.getLogger("encodec")

# Shown in the progress bar after each step.
BAR_KEYS = ("l_f_ch1", "l_sim", "l_div", "loss_d")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good state was checkpointed."""


# A run that failed for a reason the user can act on: one line and exit code 1, no traceback.
RUN_FAILURES = (ckpt_io.CheckpointError, TooManyReadFailures, TrainingDiverged,
                distributed.PeerStopped)
# What a rank says after the name of the peer that stopped (distributed.leave_together).
START_ADVICE = " before training started"
RESUME_ADVICE = (": the checkpoints saved so far are kept; resume with checkpoint.resume=true "
                 "once the cause is fixed")


def train_from_command_line(cfg: DictConfig, paired: bool) -> None:
    """The body of both training entry points: `train` in Hydra's run folder, with a
    configuration mistake as `config error: ...` (exit code 2) and a failed run (a save that
    failed, no loadable checkpoint, data gone, divergence) as `error: ...` (exit code 1)."""
    with one_line_errors(RUN_FAILURES):
        check_mode(cfg, paired)
        train(cfg, run_dir=HydraConfig.get().runtime.output_dir)


@dataclass
class TrainingRun:
    """What the loop works with, built once by `start_run`.

    `checkpoint` is the newest rotating checkpoint this run wrote (None before the first).
    """
    cfg: DictConfig
    runtime: Runtime
    parts: Parts
    train_set: ChannelViewsDataset
    val_loader: DataLoader
    steps_per_epoch: int
    tracker: Tracker
    save_folder: Path
    stop_after_step: int | None
    checkpoint: Path | None = None


def train(cfg: DictConfig, run_dir: str | Path | None = None,
          stop_after_step: int | None = None) -> dict[str, Any]:
    """Train with `datasets.views` channel views per item (1 = mono, 2 = paired).

    `run_dir` receives the log file (default: `checkpoint.save_folder`). `stop_after_step`
    (also `common.stop_after_step`) behaves as if the job were preempted after that global
    step: useful to test resume. Returns a summary: final progress, last validation
    scalars, the newest checkpoint and the save folder.
    """
    cfg = prepare_config(cfg)
    runtime = setup_runtime(cfg)
    save_folder = Path(cfg.checkpoint.save_folder)
    try:  # before anything is built: a save folder that cannot work is a config error
        expected = estimate_checkpoint_bytes(cfg) if runtime.is_main else None
        ckpt_io.prepare_save_folder(save_folder, expected, is_main=runtime.is_main)
    except ckpt_io.SaveFolderError as e:
        raise ConfigError(str(e)) from e
    run_dir = Path(run_dir) if run_dir else save_folder
    log_file = rank_log_file(run_dir / cfg.common.log_file, runtime.rank)
    setup_logging(log_file, runtime.is_main)
    distributed.tell_log_file(log_file)
    seed_everything(cfg.common.seed + runtime.rank)
    timeout_s = cfg.distributed.timeout_s
    with distributed.leave_together(timeout_s, START_ADVICE):
        run, progress = start_run(cfg, runtime, stop_after_step or cfg.common.stop_after_step)

    exit_code = 1
    try:
        # On leaving, StopFlag exits first: a failing rank ignores the launcher's SIGTERM
        # while it tells the others why it stops.
        with distributed.leave_together(timeout_s, RESUME_ADVICE), StopFlag() as stop:
            while progress.epoch <= cfg.common.max_epoch:
                if not run_epoch(run, progress, stop):
                    save_checkpoint(run, progress,
                                    ckpt_io.checkpoint_name(progress.epoch, progress.step))
                    log.info("stopped at epoch %d batch %d (step %d); resume with "
                             "checkpoint.resume=true", progress.epoch, progress.batch,
                             progress.step)
                    break
                finish_epoch(run, progress)
        exit_code = 0
    except TooManyReadFailures:
        if runtime.world_size == 1:  # keep the steps done; under DDP the other ranks are mid-step
            save_checkpoint(run, progress, ckpt_io.checkpoint_name(progress.epoch, progress.step))
        raise
    finally:
        run.tracker.finish(exit_code)
        distributed.destroy_process_group()
    return {"epoch": progress.epoch, "step": progress.step, "skipped": progress.skipped_total,
            "val": progress.last_val, "checkpoint": run.checkpoint, "save_folder": run.save_folder}


def rank_log_file(main_log_file: Path, rank: int) -> Path:
    """Rank 0 logs to `common.log_file`; any other rank logs its warnings and errors to a
    file of its own beside it (`train.rank1.log`)."""
    if rank == 0:
        return main_log_file
    return main_log_file.with_name(f"{main_log_file.stem}.rank{rank}{main_log_file.suffix}")


def start_run(cfg: DictConfig, runtime: Runtime,
              stop_after_step: int | None) -> tuple[TrainingRun, Progress]:
    """Datasets, parts, the resumed state (or a fresh one) and the tracker."""
    train_set = build_train_dataset(cfg, runtime.rank)
    try:
        val_set = validation_dataset(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # messages name file and setting
        raise ConfigError(str(e)) from e
    steps_per_epoch = steps_in_epoch(train_set, cfg, runtime.world_size)
    parts = build_parts(cfg, runtime, steps_per_epoch)
    save_folder = Path(cfg.checkpoint.save_folder)  # checked and created by prepare_save_folder
    progress = resume(parts, runtime, cfg)
    tracker = Tracker(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name,
                      cfg.wandb.dir or save_folder, OmegaConf.to_container(cfg, resolve=True),
                      run_id=progress.wandb_id, enabled=runtime.is_main)
    progress.wandb_id = tracker.run_id
    log.info("%s training on %s (world size %d): %d train files, %d val items, %d steps/epoch, "
             "generator %.2fM parameters", "paired" if cfg.datasets.views >= 2 else "mono",
             runtime.device, runtime.world_size, len(train_set.files), len(val_set),
             steps_per_epoch, sum(t.numel() for t in parts.raw_model.parameters()) / 1e6)
    val_loader = make_loader(val_set, cfg, runtime.device,
                             rank_share(len(val_set), runtime.rank, runtime.world_size))
    run = TrainingRun(cfg, runtime, parts, train_set, val_loader, steps_per_epoch, tracker,
                      save_folder, stop_after_step)
    return run, progress


def resume(parts: Parts, runtime: Runtime, cfg: DictConfig) -> Progress:
    """Restore the checkpoint to resume from, if any; where training continues."""
    found = find_resume_checkpoint(cfg, runtime.device)
    if found is None:
        return Progress()
    path, checkpoint = found
    progress = restore_training_state(parts, runtime, checkpoint, cfg, path)
    log.info("resumed from %s at epoch %d batch %d (step %d)", path, progress.epoch,
             progress.batch, progress.step)
    return progress


def discriminator_start_epoch(cfg: DictConfig) -> int:
    """First epoch with adversarial losses and discriminator steps: `discriminator.start_epoch`,
    by default the first epoch after the learning-rate warmup."""
    return cfg.discriminator.start_epoch or cfg.lr_scheduler.warmup_epoch + 1


def run_epoch(run: TrainingRun, progress: Progress, stop: StopFlag) -> bool:
    """Train the remaining batches of `progress.epoch`.

    Returns True when all of the epoch's batches are done, False when training must stop
    first (a signal or `stop_after_step`); `progress` then points after the last batch done.
    """
    cfg, runtime = run.cfg, run.runtime
    epoch = progress.epoch
    run.train_set.set_epoch(epoch)
    adversarial = run.parts.raw_disc is not None and epoch >= discriminator_start_epoch(cfg)
    loader = epoch_loader(run.train_set, cfg, runtime.device, progress.batch, run.steps_per_epoch)
    bar = tqdm(total=run.steps_per_epoch, initial=progress.batch, desc=f"epoch {epoch}",
               disable=not runtime.is_main, dynamic_ncols=True, leave=False)
    window: dict[str, list[float]] = {}
    start, segments = time.perf_counter(), 0
    for wavs, metas in loader:
        reads_skipped_here = run.train_set.count_skipped_reads(metas)
        update_disc = adversarial and discriminator_coin(
            cfg.common.seed, epoch, progress.batch) < cfg.discriminator.update_prob
        result = train_step(run.parts, runtime, wavs, metas, step=progress.step,
                            adversarial=adversarial, update_disc=update_disc,
                            grad_clip=cfg.optimization.grad_clip, bins=cfg.model.bins,
                            measure_gradients=(progress.batch + 1) % cfg.common.log_interval == 0,
                            gain_jitter_db=cfg.datasets.gain_jitter_db)
        progress.batch += 1
        # One collective after every batch: a stop signal on any rank, and the reads that
        # every rank redrew around (train/skipped_reads counts them all).
        signalled, reads_skipped = distributed.sum_over_ranks(stop.noticed(), reads_skipped_here)
        progress.skipped_reads += reads_skipped
        check_replicas(run, progress.batch)
        count_step(run, progress, result)
        segments += wavs.shape[0] * wavs.shape[1] * runtime.world_size
        rate = segments / max(time.perf_counter() - start, 1e-9)
        if result.ok:
            for name, value in result.scalars.items():
                window.setdefault(name, []).append(value)
            bar.set_postfix({k: f"{result.scalars[k]:.3g}" for k in BAR_KEYS if k in result.scalars}
                            | {"seg/s": f"{rate:.1f}"})
        bar.update(1)
        if window and (progress.batch % cfg.common.log_interval == 0
                       or progress.batch == run.steps_per_epoch):
            log_window(run, progress, window, rate)
            window = {}
        if signalled or (run.stop_after_step is not None and progress.step >= run.stop_after_step):
            bar.close()
            return False
    bar.close()
    return True


def check_replicas(run: TrainingRun, batch: int) -> None:
    """Every `distributed.check_sync_every` batches, verify that all ranks hold the same
    weights and codebooks (raises naming what drifted)."""
    every = run.cfg.distributed.check_sync_every
    if run.runtime.world_size > 1 and every and batch % every == 0:
        distributed.assert_same_on_all_ranks(replicated_state(run.parts))


def count_step(run: TrainingRun, progress: Progress, result: StepResult) -> None:
    """Count an applied or a skipped step; too many skipped in a row end training with a
    checkpoint of the last good state."""
    if result.ok:
        progress.step += 1
        progress.skipped_in_a_row = 0
        return
    progress.skipped_in_a_row += 1
    progress.skipped_total += 1
    log.warning("%s at epoch %d batch %d: step skipped (%d in a row, %d in total)",
                result.reason or "non-finite loss or gradient", progress.epoch, progress.batch,
                progress.skipped_in_a_row, progress.skipped_total)
    limit = run.cfg.common.max_nonfinite_steps
    if progress.skipped_in_a_row >= limit:
        path = save_checkpoint(run, progress,
                               ckpt_io.checkpoint_name(progress.epoch, progress.step))
        raise TrainingDiverged(
            f"{progress.skipped_in_a_row} consecutive non-finite steps "
            f"(common.max_nonfinite_steps={limit}). The last good state is saved in "
            f"{path or run.save_folder}. Try a lower optimization.lr, "
            "optimization.grad_clip=1.0, or common.amp=off.")


def log_window(run: TrainingRun, progress: Progress, window: dict[str, list[float]],
               rate: float) -> None:
    """Means of the steps since the last log line, to the log and wandb (`train/...`)."""
    means = {f"train/{name}": float(np.mean(values)) for name, values in window.items()}
    means.update({"train/segments_per_s": rate, "epoch": progress.epoch,
                  "train/skipped_steps": progress.skipped_total,
                  "train/skipped_reads": progress.skipped_reads})
    run.tracker.log(means, progress.step)
    log.info("epoch %d batch %d/%d step %d: %s", progress.epoch, progress.batch,
             run.steps_per_epoch, progress.step, " ".join(
                 f"{k[6:]}={v:.4g}" for k, v in means.items()
                 if k.startswith("train/") and not k.startswith("train/usage")))


def finish_epoch(run: TrainingRun, progress: Progress) -> None:
    """Validation, `best.pt` and the periodic checkpoint of the epoch whose batches are all
    done; afterwards `progress` points at the next epoch."""
    cfg, epoch = run.cfg, progress.epoch
    last = epoch == cfg.common.max_epoch
    if epoch % cfg.common.val_interval == 0 or last:
        progress.last_val = validate(run.parts, run.runtime, cfg, run.val_loader, epoch,
                                     progress.step, run.tracker, run.save_folder / "audio")
        metric = progress.last_val.get(cfg.checkpoint.best_metric, math.inf)
        if distributed.any_true(metric < progress.best):  # rank 0 decides
            progress.best = metric
            save_checkpoint(run, progress, "best.pt", rotating=False)
    progress.epoch, progress.batch = epoch + 1, 0
    if epoch % cfg.common.save_interval == 0 or last:
        save_checkpoint(run, progress, ckpt_io.checkpoint_name(epoch, progress.step))


def save_checkpoint(run: TrainingRun, progress: Progress, name: str,
                    rotating: bool = True) -> Path | None:
    """Save the training state as `save_folder / name`; returns the path on rank 0.

    Every rank calls it (random states are gathered); rank 0 writes. Rotating checkpoints
    are pruned to `checkpoint.keep_last`; `best.pt` is not rotating.
    """
    distributed.barrier()
    state = training_state(run.parts, run.cfg, progress)
    path = None
    if run.runtime.is_main:
        path = ckpt_io.atomic_save(state, run.save_folder / name)
        if rotating:
            ckpt_io.prune_checkpoints(run.save_folder, run.cfg.checkpoint.keep_last, keep=path)
            run.checkpoint = path
        log.info("checkpoint saved: %s", path)
    distributed.barrier()
    return path
