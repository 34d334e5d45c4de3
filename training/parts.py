"""Everything a training step works with, built from the config: generator, discriminator,
losses, balancer, optimizers, GradScalers, the learning-rate schedule and the DDP wrappers.

Each part is built by its own module's `from_config` from its own config group; this file
only decides which parts exist (mono vs paired, discriminator and balancer on or off) and
how they are wrapped for the runtime.
"""
from __future__ import annotations

import math
import warnings
from typing import Any
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from utils import distributed
from modules.balancer import Balancer
from modules.level_side_info import LevelSideInfo, trained_level_side
from modules.losses import GeneratorLoss
from model import EncodecModel, estimate_model_bytes, is_toolkit_checkpoint, module_bytes
from modules.msstftd import MultiScaleSTFTDiscriminator
from pairwise_losses import PairwiseLoss
from training.runtime import Runtime


# A checkpoint size estimate is padded by this (pickle framing, RNG states, config).
CHECKPOINT_SIZE_SLACK = 1.1


def estimate_checkpoint_bytes(cfg: Any) -> int | None:
    """About how large one training checkpoint of ``cfg`` will be, without building anything
    real: generator and discriminator are instantiated on the meta device (no memory, no
    compute) and counted as weights + two Adam moments + buffers. None when the config
    cannot be built; building the real model then reports why."""
    def weights_and_moments(params: int, buffers: int) -> int:
        return 3 * params + buffers

    try:
        total = weights_and_moments(*estimate_model_bytes(cfg.model))
        if cfg.discriminator.enabled:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")  # the real build reports config warnings once
                disc = MultiScaleSTFTDiscriminator.from_config(cfg.discriminator)
            total += weights_and_moments(*module_bytes(disc))
    except Exception:
        return None
    return int(total * CHECKPOINT_SIZE_SLACK)


@dataclass(frozen=True)
class WarmupCosine:
    """Learning-rate factor at an optimizer step: linear warmup to 1 over `warmup_steps`,
    then cosine to 0 at `total_steps` (and 0 after it).

    Built from the current config on every start, so raising `common.max_epoch` on resume
    stretches the schedule.
    """
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Parts:
    """The parts of training.

    `model` is what the step calls: the DDP wrapper of `raw_model` under several processes,
    the raw module otherwise; under `common.compile` its encoder and decoder are compiled in
    place (`compile_generator`). The discriminator is `raw_disc` alone: the step runs its
    scales one at a time (`training.step.discriminate`), which DDP cannot wrap, so its
    initial weights are broadcast from rank 0 and its gradients averaged by hand; under
    `common.compile` each scale is compiled in place. State dicts always come from the raw
    modules. `raw_disc`, `opt_d` are None without a discriminator, `pairwise` is None in mono
    training and `balancer` when it is off. The learning rate of optimizer step `s` is
    `lr_g * schedule(s)` (`lr_d` for the discriminator), set by `set_learning_rates` before each
    step. The pairwise heads (`pairwise`'s parameters) are the generator optimizer's second
    parameter group; with `lr_heads` (`pairwise.head_lr`) they learn at that constant rate.
    `level_side` (`losses.level_side_info`; None when off): the band gains sent beside the
    codes, after which the reconstruction and adversarial losses score the decode.
    """
    raw_model: EncodecModel
    raw_disc: MultiScaleSTFTDiscriminator | None
    model: nn.Module
    generator_loss: GeneratorLoss
    pairwise: PairwiseLoss | None
    balancer: Balancer | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    schedule: WarmupCosine
    lr_g: float
    lr_d: float
    lr_heads: float | None = None
    level_side: LevelSideInfo | None = None

    def generator_params(self) -> list[nn.Parameter]:
        """Everything the generator optimizer updates (the model, then the pairwise heads)."""
        return [param for group in self.opt_g.param_groups for param in group["params"]]


def build_parts(cfg: DictConfig, runtime: Runtime, steps_per_epoch: int) -> Parts:
    """All parts on `runtime.device`, with `datasets.views` views per item (pairwise losses
    from 2 on) and a schedule of `common.max_epoch * steps_per_epoch` optimizer steps."""
    device = runtime.device
    raw_model = EncodecModel.from_config(cfg.model).to(device)
    if cfg.common.compile:
        compile_generator(raw_model)
    raw_disc = (MultiScaleSTFTDiscriminator.from_config(cfg.discriminator).to(device)
                if cfg.discriminator.enabled else None)
    if raw_disc is not None and cfg.model.init_from:
        load_start_discriminator(raw_disc, cfg.model.init_from)
    if raw_disc is not None:
        distributed.broadcast_module_(raw_disc)  # outside DDP: every rank starts from rank 0's
        if cfg.common.compile:
            compile_discriminator(raw_disc)
    generator_loss = GeneratorLoss.from_config(cfg.losses,
                                               sample_rate=cfg.model.sample_rate).to(device)
    pairwise = build_pairwise(cfg, device)
    balancer = (Balancer.from_config(cfg.balancer, generator_loss.weights)
                if cfg.balancer.enabled else None)
    opt_g, opt_d = build_optimizers(cfg.optimization, raw_model, raw_disc, pairwise)
    fp16 = runtime.amp_dtype == torch.float16
    schedule = WarmupCosine(cfg.lr_scheduler.warmup_epoch * steps_per_epoch,
                            cfg.common.max_epoch * steps_per_epoch)
    return Parts(
        raw_model=raw_model, raw_disc=raw_disc,
        model=wrap_for_runtime(raw_model, cfg, runtime),
        generator_loss=generator_loss, pairwise=pairwise, balancer=balancer,
        opt_g=opt_g, opt_d=opt_d,
        scaler_g=torch.amp.GradScaler(device.type, enabled=fp16),
        scaler_d=torch.amp.GradScaler(device.type, enabled=fp16),
        schedule=schedule, lr_g=cfg.optimization.lr, lr_d=cfg.optimization.disc_lr,
        lr_heads=head_learning_rate(cfg),
        level_side=trained_level_side(cfg))


def load_start_discriminator(raw_disc: MultiScaleSTFTDiscriminator, init_from: str) -> None:
    """When `model.init_from` is a checkpoint of this toolkit that holds a discriminator of
    this run's shape, start from it too: fine-tuning a trained generator against a fresh
    discriminator first undoes part of what the generator learned."""
    loaded = torch.load(init_from, map_location="cpu", weights_only=True)
    state = loaded.get("discriminator") if is_toolkit_checkpoint(loaded) else None
    if not state:
        return
    try:
        raw_disc.load_state_dict(state)
    except RuntimeError:
        warnings.warn(f"model.init_from={init_from}: its discriminator does not fit the "
                      "discriminator.* settings of this run; the discriminator starts fresh.")


def build_pairwise(cfg: DictConfig, device: torch.device) -> PairwiseLoss | None:
    """The pairwise losses for 2 or more views (None in mono training).

    Its optional channel-classifier head is trained outside DDP (its gradients are averaged
    by hand), and every rank seeds differently before building it: rank 0's initial weights
    are broadcast so that all ranks start, and stay, with the same head.
    """
    if cfg.datasets.views < 2:
        return None
    pairwise = PairwiseLoss.from_config(cfg.pairwise, dimension=cfg.model.dimension).to(device)
    return distributed.broadcast_module_(pairwise)


def build_optimizers(opt_cfg: DictConfig, model: nn.Module, disc: nn.Module | None,
                     pairwise: nn.Module | None
                     ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """Adam for the generator and for the discriminator, from the `optimization` group; their
    learning rates are set step by step (`set_learning_rates`). The generator optimizer's first
    parameter group is the model, a second one the pairwise heads when there are any."""
    adam = dict(betas=tuple(opt_cfg.betas), weight_decay=opt_cfg.weight_decay)
    heads = list(pairwise.parameters()) if pairwise is not None else []
    groups = [{"params": list(model.parameters())}] + ([{"params": heads}] if heads else [])
    opt_g = torch.optim.Adam(groups, lr=opt_cfg.lr, **adam)
    opt_d = (torch.optim.Adam(disc.parameters(), lr=opt_cfg.disc_lr, **adam) if disc is not None
             else None)
    return opt_g, opt_d


def wrap_for_runtime(module: nn.Module, cfg: DictConfig, runtime: Runtime) -> nn.Module:
    """DDP under several processes; the module itself otherwise."""
    if runtime.world_size == 1:
        return module
    # Codebooks are kept identical by the quantizer's own all-reduce, so DDP need not
    # broadcast buffers every step.
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
        broadcast_buffers=False, find_unused_parameters=cfg.distributed.find_unused_parameters)


def compile_generator(model: EncodecModel) -> None:
    """`torch.compile` the encoder and the decoder in place (`common.compile`), each as one
    graph; the quantizer stays eager.

    The quantizer's codebook updates are data-dependent (k-means on the first batch, dead-code
    replacement, code counts): compiled with the rest, they split the generator into ~28
    graphs, and each piece of the split convolution stacks is then compiled per module
    instance until the recompile limit sends the rest back to eager. The LSTMs need
    `allow_rnn` to be traced; in place, the state dict keeps its keys.
    """
    import torch._dynamo

    torch._dynamo.config.allow_rnn = True
    model.encoder.compile()
    model.decoder.compile()


def compile_discriminator(disc: MultiScaleSTFTDiscriminator) -> None:
    """`torch.compile` each scale of `disc` in place (`common.compile`).

    Measured on a CPU it does not pay (bench/step_profile.py, README: an update step of the
    full paired config 18.2 s compiled against 17.1 s); it is an option for GPUs
    (bench/gpu_check.sh). The step backpropagates twice through a scale's
    graph on update steps (into the audio, then into the weights), which compiled graphs
    with donated buffers forbid; each scale is compiled for its own passes (real, fake,
    frozen or not), hence the larger recompile limit.
    """
    import torch._dynamo
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               8 * len(disc.discriminators))
    for scale in disc.discriminators:
        scale.compile()


def head_learning_rate(cfg: DictConfig) -> float | None:
    """`pairwise.head_lr` of a paired run, or None: the heads follow the generator's schedule."""
    if cfg.datasets.views < 2 or cfg.pairwise.get("head_lr") is None:
        return None
    return float(cfg.pairwise.head_lr)


def set_learning_rates(parts: Parts, step: int) -> None:
    """The learning rates of optimizer step `step` (generator and discriminator alike); the
    pairwise heads at `lr_heads` when it is set. An adversary behind a gradient reversal
    must keep up with the encoder it reads: warmed up and decayed with it, it lags behind
    what the encoder moves and reads nothing, while the level stays readable."""
    factor = parts.schedule(step)
    for optimizer, base in ((parts.opt_g, parts.lr_g), (parts.opt_d, parts.lr_d)):
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = base * factor
    if parts.lr_heads is not None and len(parts.opt_g.param_groups) > 1:
        parts.opt_g.param_groups[1]["lr"] = parts.lr_heads
