"""The one training engine behind ``train_single_gpu.py`` (1 view) and ``train_paired_gpu.py``.

Read it top to bottom: configuration checks, runtime (device, DDP, AMP), building the parts,
the learning-rate schedule, one training step for V channel views, validation, checkpoints,
and ``train()``, the epoch loop that ties them together.

A step is the same code for mono (V = 1) and paired (V = 2) training: the V views of B
segments go through the generator as ONE batch of B*V, the result is split back into
views for per-channel losses, and the pairwise losses compare the views' codebook
embeddings. The generator loss is the design document's sum over channels:
``sum_v (l_t + l_f + l_g + l_feat + commit)_v + l_sim + l_div`` (weighted).
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoints as ckpt_io
import distributed as du
import metrics
from balancer import Balancer
from losses import GeneratorLoss, discriminator_loss
from model import EncodecModel
from msstftd import MultiScaleSTFTDiscriminator
from paired_channel_dataset import (MonoChannelDataset, PairedChannelDataset, TooManyReadFailures,
                                    collate_fn)
from pairwise_losses import PairwiseLoss, split_views
from tracking import Tracker, setup_logging

log = logging.getLogger("encodec")

AMP_MODES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConfigError(ValueError):
    """A setting that cannot work, with the key to change and what to do."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good state was checkpointed."""


# ----------------------------------------------------------------------------------------
# Configuration


def prepare_config(cfg: DictConfig, views: int) -> DictConfig:
    """Check the settings that must hold and make paths absolute.

    Paths are resolved against the folder the command was started in (not Hydra's run
    folder), once, so the checkpoint's config can be reused from anywhere.
    """
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    if OmegaConf.is_missing(cfg.datasets, "data_root") or not cfg.datasets.data_root:
        raise ConfigError(
            "datasets.data_root is required: add datasets.data_root=/path/to/eigenscape to the "
            "command line (train_paired.sh and run_training.sh read it from $EIGENSCAPE_ROOT). "
            "No data yet? `python synth_eigenscape.py --out data/synth` writes a synthetic set.")
    cfg.datasets.views = views
    for group, key in [("datasets", "data_root"), ("checkpoint", "save_folder"),
                       ("checkpoint", "resume_path"), ("model", "init_from"), ("wandb", "dir")]:
        value = cfg[group].get(key)
        if value:
            cfg[group][key] = to_absolute_path(str(value))
    if cfg.common.amp is False:  # YAML reads a bare `off` / `false` as a boolean
        cfg.common.amp = "off"
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
    return cfg


# ----------------------------------------------------------------------------------------
# Runtime: device, distributed, precision


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(cfg: DictConfig) -> Runtime:
    """Pick the device, join the process group under torchrun, set precision flags."""
    wanted = str(cfg.common.device)
    du.export_submitit_env()
    distributed = du.env_world_size() > 1
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
        if wanted == "cpu":
            warnings.warn("CUDA is not available: training on CPU (slow). "
                          "Set common.device=cpu to silence this warning.")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"common.device={cfg.common.device} but CUDA is not available; "
                          "use common.device=cpu or auto.")
    if wanted.startswith("cuda"):
        index = du.env_local_rank() if distributed else (torch.device(wanted).index or 0)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if distributed:
        du.init_process_group(cfg.distributed.backend, device)
    amp_dtype = AMP_MODES[cfg.common.amp]
    if amp_dtype is not None and device.type != "cuda":
        warnings.warn(f"common.amp={cfg.common.amp} needs CUDA; training in float32 on CPU.")
        amp_dtype = None
    return Runtime(device=device, rank=du.rank(), world_size=du.world_size(), amp_dtype=amp_dtype)


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------
# Building the parts


@dataclass
class Parts:
    """Everything a step needs. ``model``/``disc`` may be DDP or compiled wrappers of
    ``raw_model``/``raw_disc``; state dicts always come from the raw modules."""
    raw_model: EncodecModel
    raw_disc: MultiScaleSTFTDiscriminator | None
    model: nn.Module
    disc: nn.Module | None
    gen_loss: GeneratorLoss
    pairwise: PairwiseLoss | None
    balancer: Balancer | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    sched_g: torch.optim.lr_scheduler.LambdaLR
    sched_d: torch.optim.lr_scheduler.LambdaLR | None
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler

    def generator_params(self) -> list[nn.Parameter]:
        return [p for group in self.opt_g.param_groups for p in group["params"]]


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine to zero at ``total_steps``.

    Built from the *current* config on every start, so extending ``common.max_epoch`` on
    resume stretches the schedule (the reference restored the old length).
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_parts(cfg: DictConfig, rt: Runtime, steps_per_epoch: int) -> Parts:
    views = cfg.datasets.views
    raw_model = EncodecModel.from_config(cfg.model).to(rt.device)
    raw_disc = (MultiScaleSTFTDiscriminator.from_config(cfg.discriminator).to(rt.device)
                if cfg.discriminator.enabled else None)
    gen_loss = GeneratorLoss(cfg).to(rt.device)
    pairwise = (PairwiseLoss.from_config(cfg.pairwise, dimension=cfg.model.dimension).to(rt.device)
                if views >= 2 else None)
    balancer = Balancer.from_config(cfg) if cfg.balancer.enabled else None

    opt = cfg.optimization
    gen_params = list(raw_model.parameters()) + (list(pairwise.parameters()) if pairwise else [])
    opt_g = torch.optim.Adam(gen_params, lr=opt.lr, betas=tuple(opt.betas),
                             weight_decay=opt.weight_decay)
    opt_d = (torch.optim.Adam(raw_disc.parameters(), lr=opt.disc_lr, betas=tuple(opt.betas),
                              weight_decay=opt.weight_decay) if raw_disc is not None else None)
    schedule = warmup_cosine(cfg.lr_scheduler.warmup_epoch * steps_per_epoch,
                             cfg.common.max_epoch * steps_per_epoch)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, schedule)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, schedule) if opt_d else None
    fp16 = rt.amp_dtype == torch.float16
    scaler_g = torch.amp.GradScaler(rt.device.type, enabled=fp16)
    scaler_d = torch.amp.GradScaler(rt.device.type, enabled=fp16)

    model, disc = raw_model, raw_disc
    if rt.world_size > 1:
        # Codebooks are kept identical by the quantizer's own all-reduce, so DDP need not
        # broadcast buffers every step.
        ddp = dict(broadcast_buffers=False,
                   find_unused_parameters=cfg.distributed.find_unused_parameters)
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(raw_model, device_ids=ids, **ddp)
        if raw_disc is not None:
            disc = nn.parallel.DistributedDataParallel(raw_disc, device_ids=ids, **ddp)
    if cfg.common.compile:
        model = torch.compile(model)
    return Parts(raw_model, raw_disc, model, disc, gen_loss, pairwise, balancer, opt_g, opt_d,
                 sched_g, sched_d, scaler_g, scaler_d)


# ----------------------------------------------------------------------------------------
# Data


def build_datasets(cfg: DictConfig):
    """Training items with V views, and paired validation items for both modes (so that a
    mono model's cross-channel code agreement is measured on the same pairs)."""
    train_cls = PairedChannelDataset if cfg.datasets.views >= 2 else MonoChannelDataset
    val_cfg = cfg.copy()
    val_cfg.datasets.views = max(2, cfg.datasets.views)
    try:
        return train_cls(cfg, "train"), PairedChannelDataset(val_cfg, "val")
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # messages name file and setting
        raise ConfigError(str(e)) from e


def make_loader(dataset, cfg: DictConfig, rt: Runtime, indices: range) -> DataLoader:
    """A loader over ``indices`` of ``dataset``, in order.

    Training items are pure functions of (seed, epoch, index, rank), so resuming mid-epoch
    is starting the index range later, and every rank can use the same range. The loader
    gets its own generator so that creating it does not consume the global torch RNG (which
    would break bit-exact resume).
    """
    return DataLoader(
        dataset, batch_size=cfg.datasets.batch_size, sampler=indices,
        num_workers=cfg.datasets.num_workers, collate_fn=collate_fn,
        pin_memory=cfg.datasets.pin_memory and rt.device.type == "cuda",
        drop_last=dataset.mode == "train",
        generator=torch.Generator().manual_seed(cfg.common.seed), persistent_workers=False)


def steps_in_epoch(dataset, cfg: DictConfig, world_size: int) -> int:
    """An epoch is ``datasets.fixed_length`` items in all, shared by the ranks."""
    steps = len(dataset) // (cfg.datasets.batch_size * world_size)
    cap = cfg.common.get("max_steps_per_epoch")
    return min(steps, cap) if cap else steps


def rank_share(n: int, rank: int, world_size: int) -> range:
    """Contiguous block of ``range(n)`` for ``rank``: concatenated in rank order, the blocks
    are ``range(n)`` again (validation results are gathered in that order)."""
    per_rank = math.ceil(n / world_size)
    return range(min(n, rank * per_rank), min(n, (rank + 1) * per_rank))


def discriminator_coin(seed: int, epoch: int, batch: int) -> float:
    """The discriminator-update coin flip: a pure function of the position in training, so
    it is the same on every rank and after a resume."""
    return float(np.random.default_rng([seed, epoch, batch, 0xD15C]).random())


# ----------------------------------------------------------------------------------------
# One training step


def per_view_means(items: dict[str, torch.Tensor], batch: int, views: int) -> dict[str, torch.Tensor]:
    """Per-item losses [B*V] -> per-view means [V]."""
    return {k: v.reshape(batch, views).mean(0) for k, v in items.items()}


def codebook_usage(codes: torch.Tensor, bins: int) -> torch.Tensor:
    """Fraction of each codebook's entries used in the batch, [n_q]."""
    return (metrics.code_counts(codes, bins) > 0).float().mean(1)


@dataclass
class StepResult:
    ok: bool
    scalars: dict[str, float]


@dataclass
class Adversarial:
    """The discriminator's view of one step (all None before the discriminator starts)."""
    fake_logits: list[torch.Tensor] | None = None
    real_fmaps: list[list[torch.Tensor]] | None = None
    fake_fmaps: list[list[torch.Tensor]] | None = None
    loss_d: torch.Tensor | None = None  # set on the steps where the discriminator updates


def discriminate(p: Parts, rt: Runtime, x: torch.Tensor, y: torch.Tensor, batch: int,
                 views: int, update_disc: bool) -> Adversarial:
    """Discriminator passes of one step: as few as the maths needs.

    On update steps one pass on [real, detached fake] gives the discriminator loss, and its
    real features serve the generator's feature matching (detached); otherwise the real
    features are computed without a graph. The fake pass for the generator runs with the
    discriminator's weights frozen: its gradient goes to the audio only.
    """
    p.disc.train()
    n = x.shape[0]
    adv = Adversarial()
    if update_disc:
        with rt.autocast():
            logits, fmaps = p.disc(torch.cat([x, y.detach()]))
        d_items = discriminator_loss([l[:n] for l in logits], [l[n:] for l in logits])
        adv.loss_d = d_items.reshape(batch, views).mean(0).sum()  # channel 1 + channel 2 + ...
        adv.real_fmaps = [[f[:n].detach() for f in scale] for scale in fmaps]
    else:
        with torch.no_grad(), rt.autocast():
            _, adv.real_fmaps = p.raw_disc(x)
    p.raw_disc.requires_grad_(False)
    with rt.autocast():
        adv.fake_logits, adv.fake_fmaps = p.raw_disc(y)
    p.raw_disc.requires_grad_(True)
    return adv


@dataclass
class GeneratorLosses:
    per_view: dict[str, torch.Tensor]   # name -> [V] means, incl. commit (logged per channel)
    per_loss: dict[str, torch.Tensor]   # output-dependent losses summed over views
    rest: torch.Tensor                  # commitment + pairwise: not through the balancer
    pair: dict[str, torch.Tensor]
    total: torch.Tensor                 # the design document's sum


def generator_losses(p: Parts, out, x: torch.Tensor, adv: Adversarial,
                     metas: list[dict[str, Any]], step: int, batch: int,
                     views: int) -> GeneratorLosses:
    """sum over channels of (weighted l_t, l_f, l_g, l_feat, commit) + l_sim + l_div."""
    items = p.gen_loss(x, out.audio, adv.fake_logits, adv.real_fmaps, adv.fake_fmaps)
    per_view = per_view_means({**items, "commit": out.commit_per_item}, batch, views)
    per_loss = {k: v.sum() for k, v in per_view.items() if k != "commit"}
    rest = p.gen_loss.commit_weight * per_view["commit"].sum()
    pair: dict[str, torch.Tensor] = {}
    if p.pairwise is not None:
        channels = torch.tensor([m["channels"] for m in metas])  # CPU: range-checked there
        pair = p.pairwise(split_views(out.embeddings, views), step,
                          classes=[m["class"] for m in metas], channels=channels)
        rest = rest + sum(pair[k] for k in ("l_sim", "l_div", "l_cls") if k in pair)
    total = p.gen_loss.weighted_sum(per_loss) + rest
    return GeneratorLosses(per_view, per_loss, rest, pair, total)


def backward(p: Parts, rt: Runtime, g: GeneratorLosses, y: torch.Tensor, adv: Adversarial,
             grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of both players (one backward each); returns their norms before clipping."""
    p.opt_g.zero_grad(set_to_none=True)
    if p.balancer is not None:
        p.balancer.backward(g.per_loss, y, g.rest)  # balanced output losses + the rest as is
    else:
        p.scaler_g.scale(g.total).backward()
    if p.pairwise is not None and rt.world_size > 1:
        du.average_gradients_(p.pairwise.parameters())  # the head is outside DDP
    p.scaler_g.unscale_(p.opt_g)
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm_g = torch.nn.utils.clip_grad_norm_(p.generator_params(), max_norm)
    grad_norm_d = torch.zeros((), device=rt.device)
    if adv.loss_d is not None:
        p.opt_d.zero_grad(set_to_none=True)
        p.scaler_d.scale(adv.loss_d).backward()
        p.scaler_d.unscale_(p.opt_d)
        grad_norm_d = torch.nn.utils.clip_grad_norm_(p.raw_disc.parameters(), max_norm)
    return grad_norm_g, grad_norm_d


def step_scalars(g: GeneratorLosses, adv: Adversarial, grad_norm_g: torch.Tensor,
                 grad_norm_d: torch.Tensor, codes: torch.Tensor, bins: int) -> dict[str, float]:
    """Every logged number of a step, moved to the host in ONE transfer."""
    named = {f"{k}_ch{v + 1}": pv[v] for k, pv in g.per_view.items() for v in range(len(pv))}
    named.update({"loss_g": g.total, "grad_norm_g": grad_norm_g})
    named.update({k: g.pair[k] for k in ("l_sim", "l_div", "l_cls", "sim", "div") if k in g.pair})
    if adv.loss_d is not None:
        named.update({"loss_d": adv.loss_d, "grad_norm_d": grad_norm_d})
    named.update({f"usage_cb{k + 1}": u for k, u in enumerate(codebook_usage(codes, bins))})
    values = torch.stack([v.detach().float().reshape(()) for v in named.values()]).cpu()
    return dict(zip(named, values.tolist()))


def apply_updates(p: Parts, update_disc: bool) -> None:
    p.scaler_g.step(p.opt_g)
    p.scaler_g.update()
    if update_disc:
        p.scaler_d.step(p.opt_d)
        p.scaler_d.update()
    p.sched_g.step()
    if p.sched_d is not None:
        with warnings.catch_warnings():
            # The discriminator's schedule follows the generator's steps, also on the steps
            # (and warmup epochs) where the discriminator itself does not update.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            p.sched_d.step()


def train_step(p: Parts, rt: Runtime, wavs: torch.Tensor, metas: list[dict[str, Any]], *,
               step: int, adversarial: bool, update_disc: bool, grad_clip: float,
               bins: int) -> StepResult:
    """One GAN step on ``wavs [B, V, 1, T]``: the V views of B segments go through the
    generator as one batch of B*V. Returns the logged scalars, or ok=False when the step
    was skipped because a loss or gradient was not finite (on any rank)."""
    batch, views = wavs.shape[:2]
    x = wavs.to(rt.device, non_blocking=True).flatten(0, 1)
    p.model.train()
    # The quantizer updates its codebooks during the forward; keep a copy so that a skipped
    # step leaves no trace in them either.
    codebook_backup = [b.detach().clone() for b in p.raw_model.buffers()]
    with rt.autocast():
        out = p.model(x, return_embeddings=views > 1)
    adv = (discriminate(p, rt, x, out.audio, batch, views, update_disc) if adversarial
           else Adversarial())
    g = generator_losses(p, out, x, adv, metas, step, batch, views)
    grad_norm_g, grad_norm_d = backward(p, rt, g, out.audio, adv, grad_clip)
    scalars = step_scalars(g, adv, grad_norm_g, grad_norm_d, out.codes, bins)

    # Under fp16 the GradScaler skips inf/NaN gradients itself; a non-finite LOSS is ours.
    finite_loss = math.isfinite(scalars["loss_g"]) and math.isfinite(scalars.get("loss_d", 0.0))
    finite_grad = p.scaler_g.is_enabled() or (math.isfinite(scalars["grad_norm_g"])
                                               and math.isfinite(scalars.get("grad_norm_d", 0.0)))
    # Every rank skips or steps together (a NaN on one rank must not fork the replicas).
    if not du.all_true(finite_loss and finite_grad):
        with torch.no_grad():
            for b, saved in zip(p.raw_model.buffers(), codebook_backup):
                b.copy_(saved)
        p.opt_g.zero_grad(set_to_none=True)
        if p.opt_d is not None:
            p.opt_d.zero_grad(set_to_none=True)
        return StepResult(False, scalars)
    apply_updates(p, adv.loss_d is not None)
    scalars["lr_g"] = p.opt_g.param_groups[0]["lr"]
    if p.opt_d is not None:
        scalars["lr_d"] = p.opt_d.param_groups[0]["lr"]
    return StepResult(True, scalars)


def replicated_state(p: Parts) -> Iterator[tuple[str, torch.Tensor]]:
    """Everything that must be identical on every rank: weights and codebooks."""
    for prefix, module in (("model", p.raw_model), ("disc", p.raw_disc), ("pairwise", p.pairwise)):
        if module is not None:
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                yield f"{prefix}.{name}", t


# ----------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validate(p: Parts, rt: Runtime, cfg: DictConfig, loader: DataLoader, epoch: int,
             step: int, tracker: Tracker, audio_dir: Path | None) -> dict[str, float]:
    """Over ALL fixed validation items: mean losses per channel, pairwise losses, SI-SNR,
    mel distance, codebook perplexity, per-codebook cross-channel code agreement against
    its chance level, and the channel-identity probe (metrics.MetricAccumulator).

    Each rank encodes its block of the items; the outputs are gathered on rank 0 in item
    order, so the numbers are those of a single process. Returns the scalars on rank 0
    (an empty dict elsewhere).
    """
    p.model.eval()
    model = p.raw_model
    batches = []
    for wavs, metas in loader:
        batch, views = wavs.shape[:2]
        x = wavs.to(rt.device).flatten(0, 1)
        with rt.autocast():
            out = model(x, return_embeddings=True)
        y = out.audio.float()
        losses = per_view_means(p.gen_loss(x, y), batch, views)
        sums = {f"{k}_ch{v + 1}": pv[v] * batch for k, pv in losses.items() for v in range(views)}
        if p.pairwise is not None:
            pair = p.pairwise(split_views(out.embeddings, views), step)
            sums.update({k: pair[k] * batch for k in ("l_sim", "l_div", "sim", "div")})
        cpu = lambda t: t.reshape(batch, views, *t.shape[1:]).cpu()  # noqa: E731
        batches.append({"wavs": wavs, "audio": cpu(y), "codes": cpu(out.codes),
                        "embeddings": [cpu(emb.float()) for emb in out.embeddings],
                        "metas": metas, "sums": {k: float(v) for k, v in sums.items()}})
    batches = du.gather_to_main(batches)
    if not rt.is_main:
        return {}
    acc = metrics.MetricAccumulator(n_q=model.n_q, bins=cfg.model.bins,
                                    sample_rate=model.sample_rate, frame_rate=model.frame_rate)
    loss_sums: dict[str, float] = {}
    for b in batches:
        acc.update(b["wavs"], b["audio"], b["codes"], b["embeddings"],
                   torch.tensor([m["channels"] for m in b["metas"]]))
        for k, v in b["sums"].items():
            loss_sums[k] = loss_sums.get(k, 0.0) + v
    n_items = sum(len(b["metas"]) for b in batches)
    scalars = {f"val/{k}": v / n_items for k, v in loss_sums.items()}
    scalars.update({f"val/{k}": v for k, v in flatten_metrics(acc.compute()).items()})
    log.info("validation epoch %d: %s", epoch, " ".join(
        f"{k[4:]}={scalars[k]:.4g}" for k in VAL_SUMMARY if k in scalars))
    tracker.log({**scalars, "epoch": epoch}, step)
    to_save = [(b["wavs"][i], b["audio"][i], b["metas"][i])
               for b in batches for i in range(len(b["metas"]))][:cfg.checkpoint.save_audio]
    if audio_dir is not None and to_save:
        write_validation_audio(to_save, audio_dir / f"epoch{epoch:04d}", cfg.model.sample_rate,
                               tracker, step)
    return scalars


VAL_SUMMARY = ("val/l_f_ch1", "val/l_sim", "val/l_div", "val/si_snr", "val/mel_distance",
               "val/agreement_cb1", "val/chance_agreement_cb1", "val/agreement_cb2",
               "val/chance_agreement_cb2", "val/probe_accuracy_cb1", "val/probe_accuracy_cb2")

# Accumulator result -> logged name prefix, for the per-codebook lists.
PER_CODEBOOK = {"perplexity": "perplexity", "dead_codes": "dead_codes",
                "codebook_agreement": "agreement", "chance_agreement": "chance_agreement",
                "embedding_cosine": "cosine", "chance_cosine": "chance_cosine",
                "probe_accuracy": "probe_accuracy"}


def flatten_metrics(results: dict[str, Any]) -> dict[str, float]:
    """MetricAccumulator results -> flat scalars: lists become ``_cbK`` / ``_chV`` entries."""
    flat: dict[str, float] = {}
    for key in ("si_snr", "mel_distance", "stft_distance", "effective_bitrate_kbps", "probe_chance"):
        if results.get(key) is not None:
            flat[key] = float(results[key])
    for key in ("si_snr", "mel_distance"):
        for v, value in enumerate(results.get(f"{key}_per_view") or []):
            flat[f"{key}_ch{v + 1}"] = float(value)
    for key, name in PER_CODEBOOK.items():
        for k, value in enumerate(results.get(key) or []):
            flat[f"{name}_cb{k + 1}"] = float(value)
    return flat


def write_validation_audio(items, folder: Path, sample_rate: int, tracker: Tracker,
                           step: int) -> None:
    """Input and reconstruction of every view as WAV files, and to wandb as audio and
    log-mel spectrograms (one row per item: input and reconstruction of views 1 and 2)."""
    import soundfile as sf
    folder.mkdir(parents=True, exist_ok=True)
    audio, rows = {}, []
    for i, (inp, rec, meta) in enumerate(items):
        waves = {}
        for v, ch in enumerate(meta["channels"]):
            for kind, wav in (("input", inp[v]), ("recon", rec[v])):
                data = wav.squeeze(0).numpy()
                sf.write(folder / f"item{i}_ch{ch}_{kind}.wav", data, sample_rate, subtype="FLOAT")
                audio[f"audio/item{i}_view{v + 1}_{kind}"] = data
                waves[f"{kind}_{v + 1}"] = wav.squeeze(0)
        rows.append((f"item{i} ch{list(meta['channels'])}", waves))
    columns = tuple(f"{kind}_{v + 1}" for v in range(len(items[0][0])) for kind in ("input", "recon"))
    tracker.log_audio(audio, sample_rate, step)
    if tracker.run is not None:
        import matplotlib.pyplot as plt
        from evaluate import spectrogram_figure
        figure = spectrogram_figure(rows, sample_rate, columns)
        tracker.log_images({"val/spectrograms": figure}, step)
        plt.close(figure)


# ----------------------------------------------------------------------------------------
# Checkpoints


def training_state(p: Parts, cfg: DictConfig, epoch: int, batch: int, step: int,
                   extra: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to continue bit-exactly, as tensors and plain types."""
    state = {
        "model": p.raw_model.state_dict(),
        "discriminator": p.raw_disc.state_dict() if p.raw_disc is not None else {},
        "pairwise": p.pairwise.state_dict() if p.pairwise is not None else {},
        "opt_g": p.opt_g.state_dict(),
        "opt_d": p.opt_d.state_dict() if p.opt_d is not None else {},
        "sched_g": p.sched_g.state_dict(),
        "sched_d": p.sched_d.state_dict() if p.sched_d is not None else {},
        "scaler_g": p.scaler_g.state_dict(),
        "scaler_d": p.scaler_d.state_dict(),
        "balancer": p.balancer.state_dict() if p.balancer is not None else {},
        "epoch": epoch, "batch": batch, "step": step,
        "rng": du.gather_to_main([ckpt_io.capture_rng_state()]),  # one entry per rank
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    state.update(extra)
    return state


def check_compatible(ckpt: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """Name the settings that change shapes, instead of a wall of size mismatches."""
    old = ckpt.get("config", {})
    shape_keys = [("model", k) for k in ("n_q", "bins", "dimension", "filters", "ratios",
                                         "residual_layers", "lstm", "norm", "channels")]
    shape_keys += [("discriminator", k) for k in ("filters", "n_ffts", "enabled")]
    shape_keys += [("pairwise", "channel_classifier")]
    diffs = []
    for group, key in shape_keys:
        a = old.get(group, {}).get(key)
        b = OmegaConf.to_container(cfg[group], resolve=True).get(key)
        if a is not None and a != b:
            diffs.append(f"{group}.{key}: checkpoint {a} vs now {b}")
    if old.get("datasets", {}).get("views", 1) >= 2 > cfg.datasets.views or \
            old.get("datasets", {}).get("views", 1) < 2 <= cfg.datasets.views:
        diffs.append("training mode (mono vs paired)")
    if diffs:
        raise ConfigError(
            f"cannot resume from {path}: the config changes shapes ({'; '.join(diffs)}). "
            "Resume with the original settings, or start a new run with another "
            "checkpoint.save_folder.")


def load_training_state(p: Parts, rt: Runtime, ckpt: dict[str, Any], cfg: DictConfig,
                        path: Path) -> None:
    check_compatible(ckpt, cfg, path)
    try:
        p.raw_model.load_state_dict(ckpt["model"])
        if p.raw_disc is not None and ckpt.get("discriminator"):
            p.raw_disc.load_state_dict(ckpt["discriminator"])
        if p.pairwise is not None and ckpt.get("pairwise"):
            p.pairwise.load_state_dict(ckpt["pairwise"])
    except RuntimeError as e:
        raise ConfigError(f"cannot resume from {path}: {e}") from e
    p.opt_g.load_state_dict(ckpt["opt_g"])
    if p.opt_d is not None and ckpt.get("opt_d"):
        p.opt_d.load_state_dict(ckpt["opt_d"])
    p.sched_g.load_state_dict(ckpt["sched_g"])
    if p.sched_d is not None and ckpt.get("sched_d"):
        p.sched_d.load_state_dict(ckpt["sched_d"])
    # The schedule's length comes from the current config (max_epoch may have grown):
    # LambdaLR recomputes the lr from the restored step count on the next step; set it now.
    for sched in (p.sched_g, p.sched_d):
        if sched is not None:
            for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * fn(sched.last_epoch)
    p.scaler_g.load_state_dict(ckpt["scaler_g"])
    p.scaler_d.load_state_dict(ckpt["scaler_d"])
    if p.balancer is not None and ckpt.get("balancer"):
        p.balancer.load_state_dict(ckpt["balancer"])
    rng = ckpt["rng"]
    if len(rng) != rt.world_size:
        warnings.warn(f"{path} was saved by {len(rng)} process(es), this run has "
                      f"{rt.world_size}: every rank restores rank 0's random state, so the "
                      "run continues correctly but not bit-identically.")
    ckpt_io.restore_rng_state(rng[rt.rank] if len(rng) == rt.world_size else rng[0])


def find_resume_checkpoint(cfg: DictConfig, map_location: torch.device
                           ) -> tuple[Path, dict[str, Any]] | None:
    """(path, checkpoint) to continue from: ``resume_path``, or with ``resume`` the newest
    checkpoint in the save folder that loads and is complete (damaged ones are skipped
    with a warning); None to start from scratch."""
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


# ----------------------------------------------------------------------------------------
# Preemption


class StopFlag:
    """SIGTERM / SIGUSR1 (cluster preemption) / Ctrl-C: finish the step, save, exit cleanly.
    A second Ctrl-C interrupts at once."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving a checkpoint",
                    self.requested)

    def __enter__(self) -> "StopFlag":
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                with contextlib.suppress(ValueError):  # not the main thread
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """All ranks stop together if any rank was signalled."""
        return du.any_true(self.requested is not None)


# ----------------------------------------------------------------------------------------
# The training loop


@dataclass
class Progress:
    epoch: int = 1
    batch: int = 0          # batches done in ``epoch``
    step: int = 0           # optimizer steps done, all epochs
    skipped_in_a_row: int = 0
    skipped_total: int = 0
    skipped_reads: int = 0  # unreadable data reads redrawn around, all epochs
    best: float = math.inf


def train(cfg: DictConfig, views: int, run_dir: str | Path | None = None,
          stop_after_step: int | None = None) -> dict[str, Any]:
    """Train with ``views`` channel views per item (1 = mono, 2 = paired).

    ``stop_after_step`` (also ``common.stop_after_step``) behaves as if the job were
    preempted after that global step: useful to test resume.
    Returns a summary: final progress, last validation scalars, checkpoint paths.
    """
    cfg = prepare_config(cfg, views)
    rt = setup_runtime(cfg)
    save_folder = Path(cfg.checkpoint.save_folder)
    try:  # before anything is built: a save folder that cannot work is a config error
        ckpt_io.prepare_save_folder(save_folder, cfg, is_main=rt.is_main)
    except ckpt_io.SaveFolderError as e:
        raise ConfigError(str(e)) from e
    run_dir = Path(run_dir) if run_dir else save_folder
    setup_logging(run_dir / cfg.common.log_file, rt.is_main)
    seed_everything(cfg.common.seed + rt.rank)
    stop_after_step = stop_after_step or cfg.common.get("stop_after_step")

    train_set, val_set = build_datasets(cfg)
    steps_per_epoch = steps_in_epoch(train_set, cfg, rt.world_size)
    p = build_parts(cfg, rt, steps_per_epoch)

    prog = Progress()
    wandb_id = None
    resume = find_resume_checkpoint(cfg, rt.device)
    if resume is not None:
        resume_path, state = resume
        load_training_state(p, rt, state, cfg, resume_path)
        prog = Progress(epoch=state["epoch"], batch=state["batch"], step=state["step"],
                        skipped_total=state.get("skipped_total", 0),
                        skipped_reads=state.get("skipped_reads", 0),
                        best=state.get("best", math.inf))
        if prog.batch >= steps_per_epoch:
            prog.epoch, prog.batch = prog.epoch + 1, 0
        wandb_id = state.get("wandb_id")
        log.info("resumed from %s at epoch %d batch %d (step %d)", resume_path, prog.epoch,
                 prog.batch, prog.step)

    tracker = Tracker(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name,
                      cfg.wandb.dir or save_folder, OmegaConf.to_container(cfg, resolve=True),
                      run_id=wandb_id, enabled=rt.is_main)
    mode = "paired" if views >= 2 else "mono"
    n_params = sum(t.numel() for t in p.raw_model.parameters())
    log.info("%s training on %s (world size %d): %d train files, %d val items, %d steps/epoch, "
             "generator %.2fM parameters", mode, rt.device, rt.world_size, len(train_set.files),
             len(val_set), steps_per_epoch, n_params / 1e6)

    val_loader = make_loader(val_set, cfg, rt, rank_share(len(val_set), rt.rank, rt.world_size))
    d_start = cfg.discriminator.start_epoch or cfg.lr_scheduler.warmup_epoch + 1
    last_val: dict[str, float] = {}
    saved: Path | None = None

    def save(epoch: int, batch: int, name: str | None = None) -> Path | None:
        """Every rank calls it (RNG states are gathered); rank 0 writes."""
        nonlocal saved
        du.barrier()
        extra = {"wandb_id": tracker.run_id, "best": prog.best, "skipped_total": prog.skipped_total,
                 "skipped_reads": prog.skipped_reads, "val": last_val}
        state = training_state(p, cfg, epoch, batch, prog.step, extra)
        path = None
        if rt.is_main:
            path = save_folder / (name or ckpt_io.checkpoint_name(epoch, prog.step))
            ckpt_io.atomic_save(state, path)
            if name is None:
                ckpt_io.prune_checkpoints(save_folder, cfg.checkpoint.keep_last, keep=path)
                saved = path
            log.info("checkpoint saved: %s", path)
        du.barrier()
        return path

    exit_code = 1
    try:
        with StopFlag() as stop:
            stopped = False
            while prog.epoch <= cfg.common.max_epoch and not stopped:
                epoch = prog.epoch
                train_set.set_epoch(epoch)
                adversarial = p.raw_disc is not None and epoch >= d_start
                bs = cfg.datasets.batch_size
                loader = make_loader(train_set, cfg, rt, range(prog.batch * bs, steps_per_epoch * bs))
                bar = tqdm(total=steps_per_epoch, initial=prog.batch, desc=f"epoch {epoch}",
                           disable=not rt.is_main, dynamic_ncols=True, leave=False)
                window: dict[str, list[float]] = {}
                t0, seen = time.perf_counter(), 0
                for wavs, metas in loader:
                    prog.skipped_reads += train_set.count_skipped_reads(metas)
                    update_disc = adversarial and discriminator_coin(
                        cfg.common.seed, epoch, prog.batch) < cfg.discriminator.update_prob
                    result = train_step(p, rt, wavs, metas, step=prog.step, adversarial=adversarial,
                                        update_disc=update_disc,
                                        grad_clip=cfg.optimization.grad_clip, bins=cfg.model.bins)
                    prog.batch += 1
                    every = cfg.distributed.check_sync_every
                    if rt.world_size > 1 and every and prog.batch % every == 0:
                        du.assert_same_on_all_ranks(replicated_state(p))
                    if result.ok:
                        prog.step += 1
                        prog.skipped_in_a_row = 0
                        for k, v in result.scalars.items():
                            window.setdefault(k, []).append(v)
                    else:
                        prog.skipped_in_a_row += 1
                        prog.skipped_total += 1
                        log.warning("non-finite loss or gradient at epoch %d batch %d: step skipped "
                                    "(%d in a row, %d in total)", epoch, prog.batch,
                                    prog.skipped_in_a_row, prog.skipped_total)
                        if prog.skipped_in_a_row >= cfg.common.max_nonfinite_steps:
                            path = save(epoch, prog.batch)
                            raise TrainingDiverged(
                                f"{prog.skipped_in_a_row} consecutive non-finite steps "
                                f"(common.max_nonfinite_steps={cfg.common.max_nonfinite_steps}). "
                                f"The last good state is saved in {path or save_folder}. Try a lower "
                                "optimization.lr, optimization.grad_clip=1.0, or common.amp=off.")
                    seen += wavs.shape[0] * wavs.shape[1] * rt.world_size
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    if result.ok:
                        bar.set_postfix({k: f"{result.scalars[k]:.3g}" for k in
                                         ("l_f_ch1", "l_sim", "l_div", "loss_d") if k in result.scalars}
                                        | {"seg/s": f"{rate:.1f}"})
                    bar.update(1)
                    if window and (prog.batch % cfg.common.log_interval == 0
                                   or prog.batch == steps_per_epoch):
                        means = {f"train/{k}": float(np.mean(v)) for k, v in window.items()}
                        means.update({"train/segments_per_s": rate, "epoch": epoch,
                                      "train/skipped_steps": prog.skipped_total,
                                      "train/skipped_reads": prog.skipped_reads})
                        tracker.log(means, prog.step)
                        log.info("epoch %d batch %d/%d step %d: %s", epoch, prog.batch,
                                 steps_per_epoch, prog.step, " ".join(
                                     f"{k[6:]}={v:.4g}" for k, v in means.items()
                                     if k.startswith("train/") and not k.startswith("train/usage")))
                        window = {}
                    if stop.agreed() or (stop_after_step is not None and prog.step >= stop_after_step):
                        stopped = True
                        break
                bar.close()
                if stopped:
                    save(epoch, prog.batch)
                    log.info("stopped at epoch %d batch %d (step %d); resume with "
                             "checkpoint.resume=true", epoch, prog.batch, prog.step)
                    break
                if epoch % cfg.common.val_interval == 0 or epoch == cfg.common.max_epoch:
                    last_val = validate(p, rt, cfg, val_loader, epoch, prog.step, tracker,
                                        save_folder / "audio")
                    metric = last_val.get(cfg.checkpoint.best_metric, math.inf)
                    if du.any_true(metric < prog.best):  # rank 0 decides
                        prog.best = metric
                        save(epoch, steps_per_epoch, name="best.pt")
                if epoch % cfg.common.save_interval == 0 or epoch == cfg.common.max_epoch:
                    save(epoch, steps_per_epoch)
                prog.epoch, prog.batch = epoch + 1, 0
        exit_code = 0
    except TooManyReadFailures:
        if rt.world_size == 1:  # keep the steps done; under DDP the other ranks are mid-step
            save(prog.epoch, prog.batch)
        raise
    finally:
        tracker.finish(exit_code)
        du.destroy_process_group()
    return {"epoch": prog.epoch, "step": prog.step, "skipped": prog.skipped_total,
            "val": last_val, "checkpoint": saved, "save_folder": save_folder}
