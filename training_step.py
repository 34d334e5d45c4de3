"""One training step for V channel views: `train_step` = `discriminate` ->
`generator_losses` -> `backward` -> `apply_updates`.

A step is the same code for mono (V = 1) and paired (V = 2) training: the V views of B
segments go through the generator as ONE batch of B*V (view-major inside an item), the
result is split back into views for per-channel losses, and the pairwise losses compare the
views' codebook embeddings. The generator loss is the design document's sum over channels:
`sum_v (l_t + l_f + l_g + l_feat + commit)_v + l_sim + l_div` (weighted), plus the terms the
pairwise recipe adds (cross-reconstruction `l_xrec`, the level-difference heads).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

import distributed
import metrics
import spatial_cues
from losses import discriminator_loss
from model import EncodecModel, EncodecOutput
from pairwise_losses import LOSS_TERMS, split_views
from parts import Parts, set_learning_rates
from runtime import Runtime


@dataclass
class StepResult:
    """Whether the step was applied (False: a loss or gradient was not finite on some rank,
    and nothing changed), and every logged number of the step."""
    ok: bool
    scalars: dict[str, float]


@dataclass
class Adversarial:
    """The discriminator's view of one step (all None before the discriminator starts)."""
    fake_logits: list[torch.Tensor] | None = None
    real_fmaps: list[list[torch.Tensor]] | None = None
    fake_fmaps: list[list[torch.Tensor]] | None = None
    loss_d: torch.Tensor | None = None  # set on the steps where the discriminator updates


@dataclass
class GeneratorLosses:
    """The generator's losses of one step.

    Attributes:
        per_view: name -> `[V]` means over the batch, commitment included (logged per channel).
        per_loss: the output-dependent losses summed over views (what the balancer balances).
        rest: commitment + pairwise losses, which do not go through the balancer.
        pair: the pairwise losses' dict (weighted and unweighted terms), empty in mono.
        total: the design document's weighted sum of everything.
    """
    per_view: dict[str, torch.Tensor]
    per_loss: dict[str, torch.Tensor]
    rest: torch.Tensor
    pair: dict[str, torch.Tensor]
    total: torch.Tensor


def discriminator_coin(seed: int, epoch: int, batch: int) -> float:
    """The discriminator-update coin flip at batch `batch` of `epoch`: a pure function of
    the position in training, so it is the same on every rank and after a resume."""
    return float(np.random.default_rng([seed, epoch, batch, 0xD15C]).random())


def per_view_means(items: dict[str, torch.Tensor], batch_size: int, views: int) -> dict[str, torch.Tensor]:
    """Per-item losses `[B*V]` (view-major inside an item) -> per-view means `[V]`."""
    return {name: value.reshape(batch_size, views).mean(0) for name, value in items.items()}


def codebook_usage(codes: torch.Tensor, bins: int) -> torch.Tensor:
    """Fraction of each codebook's entries used in the batch, `[n_q]`."""
    return (metrics.code_counts(codes, bins) > 0).float().mean(1)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """`module`'s parameters need no gradient inside the block; each one's flag is restored
    on the way out, also when the block raises."""
    flags = [param.requires_grad for param in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for param, flag in zip(module.parameters(), flags):
            param.requires_grad_(flag)


def discriminate(parts: Parts, runtime: Runtime, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int, views: int, update_disc: bool) -> Adversarial:
    """Discriminator passes of one step: as few as the maths needs.

    On update steps one pass on [real, detached fake] gives the discriminator loss, and its
    real features serve the generator's feature matching (detached); otherwise the real
    features are computed without a graph. The fake pass for the generator runs with the
    discriminator's weights frozen: its gradient goes to the audio only.
    """
    parts.disc.train()
    n = x.shape[0]
    adversarial = Adversarial()
    if update_disc:
        with runtime.autocast():
            logits, fmaps = parts.disc(torch.cat([x, y.detach()]))
        d_items = discriminator_loss([logit[:n] for logit in logits], [logit[n:] for logit in logits])
        adversarial.loss_d = d_items.reshape(batch_size, views).mean(0).sum()  # channel 1 + 2 + ...
        adversarial.real_fmaps = [[f[:n].detach() for f in scale] for scale in fmaps]
    else:
        with torch.no_grad(), runtime.autocast():
            _, adversarial.real_fmaps = parts.raw_disc(x)
    with frozen(parts.raw_disc), runtime.autocast():
        adversarial.fake_logits, adversarial.fake_fmaps = parts.raw_disc(y)
    return adversarial


def normalisation_scale(parts: Parts, x: torch.Tensor, views: int,
                        gain_jitter_db: float = 0.0) -> torch.Tensor | None:
    """The scale the generator divides `x [B*V, 1, T]` by, or None for its own default (each
    item's RMS, or no normalisation at all).

    - With `pairwise.shared_scale`, the views of an item share their common RMS, so that the
      level differences between the channels of a pair stay in the latent.
    - With `gain_jitter_db` > 0 (`datasets.gain_jitter_db`), each item's scale is multiplied
      by a random gain, uniform in dB within +-gain_jitter_db (one gain for all views of an
      item): the encoder sees its input at varied levels and the reconstruction is scored at
      the true level. Without it a per-item RMS shows the codec every input at the same
      level, and it learns to ignore level: a louder input may even decode quieter.
    """
    if not parts.raw_model.audio_normalize:
        return None
    shared = views > 1 and parts.pairwise is not None and parts.pairwise.shared_scale
    if not shared and gain_jitter_db <= 0:
        return None
    scale = EncodecModel.shared_scale(x, views) if shared else parts.raw_model.normalize(x)[1]
    if gain_jitter_db > 0:
        gain_db = (2 * torch.rand(x.shape[0] // views) - 1) * gain_jitter_db  # CPU RNG: resumable
        gain = 10 ** (-gain_db.to(scale.device) / 20)
        scale = scale * gain.repeat_interleave(views).view(-1, 1, 1)
    return scale


def cross_reconstruction(parts: Parts, views: list[list[torch.Tensor]], x: torch.Tensor,
                         scale: torch.Tensor | None, step: int) -> dict[str, torch.Tensor]:
    """Decode the content codebook of each view with the other codebooks of each other view
    and score it against the other view's waveform, in the reconstruction loss's units
    (weighted L1 + mel): `{'l_xrec', 'xrec'}`. The decode is restored at the target's scale."""
    swap = parts.pairwise.swap_latents(views)
    audio = parts.raw_model.decoder(swap.latents)[..., :x.shape[-1]]
    if scale is None:
        scale = parts.raw_model.normalize(x)[1]  # the targets' own scales (None: no normalisation)
    if scale is not None:
        audio = audio * scale[swap.target_index]
    target = x[swap.target_index]
    per_item = parts.generator_loss.weighted_sum(parts.generator_loss(target, audio))
    return parts.pairwise.xrec_loss(per_item, step)


CUE_BANDS = 8  # band levels of the cue terms: spatial_cues.band_levels' defaults (100 Hz - 11 kHz)


def view_levels(parts: Parts, audio: torch.Tensor, batch_size: int, views: int,
                n_bands: int = CUE_BANDS) -> torch.Tensor:
    """Per-view band levels `[B, V, n_bands]` dB of `audio [B*V, 1, T]` (differentiable)."""
    n_fft = 2048 if audio.shape[-1] >= 2048 else 1024  # short (test) segments: coarser bins
    levels = spatial_cues.band_levels(audio.float(), parts.raw_model.sample_rate, n_bands=n_bands,
                                      n_fft=n_fft)
    return levels.view(batch_size, views, n_bands)


def level_difference_targets(parts: Parts, x: torch.Tensor, batch_size: int,
                             views: int) -> torch.Tensor | None:
    """Per-view band levels `[B, V, n_bands]` dB of the raw views (one scale for all), the
    targets of the level-difference heads; None when the heads are off."""
    head = parts.pairwise.ild_head
    if head is None:
        return None
    with torch.no_grad():
        return view_levels(parts, x, batch_size, views, head.n_bands)


def cue_fidelity(parts: Parts, out: EncodecOutput, x: torch.Tensor, batch_size: int,
                 views: int, step: int) -> dict[str, torch.Tensor]:
    """`PairwiseLoss.cue_loss` of the decoded views against the input views."""
    with torch.no_grad():
        target = view_levels(parts, x, batch_size, views)
    return parts.pairwise.cue_loss(view_levels(parts, out.audio, batch_size, views), target, step)


def pairwise_terms(parts: Parts, runtime: Runtime, out: EncodecOutput, x: torch.Tensor,
                   scale: torch.Tensor | None, metas: list[dict[str, Any]], step: int, batch_size: int,
                   views: int) -> dict[str, torch.Tensor]:
    """The pairwise recipe's terms of one step (weighted `l_*` and unweighted logs). The
    scheduled terms count once `pairwise.start_step` is reached (and, with
    `pairwise.wait_for_kmeans`, every codebook has done its k-means); before that only the
    unscheduled channel classifier runs."""
    pairwise = parts.pairwise
    initialized = parts.raw_model.codebooks_initialized
    active = pairwise.is_active(step, initialized)
    if not active and pairwise.classifier is None:
        return {}
    embeddings = split_views(out.embeddings, views)
    channels = torch.tensor([m["channels"] for m in metas])  # CPU: range-checked there
    pair = pairwise(embeddings, step, classes=[m["class"] for m in metas], channels=channels,
                    ild_targets=level_difference_targets(parts, x, batch_size, views) if active else None,
                    codebooks_initialized=initialized)
    if active and pairwise.uses_xrec:
        with runtime.autocast():
            pair.update(cross_reconstruction(parts, embeddings, x, scale, step))
    if active and pairwise.uses_cue:
        pair.update(cue_fidelity(parts, out, x, batch_size, views, step))
    return pair


def generator_losses(parts: Parts, runtime: Runtime, out: EncodecOutput, x: torch.Tensor,
                     scale: torch.Tensor | None, adversarial: Adversarial, metas: list[dict[str, Any]], step: int,
                     batch_size: int, views: int) -> GeneratorLosses:
    """sum over channels of (weighted l_t, l_f, l_g, l_feat, commit) + the pairwise terms."""
    items = parts.generator_loss(x, out.audio, adversarial.fake_logits, adversarial.real_fmaps,
                                 adversarial.fake_fmaps)
    per_view = per_view_means({**items, "commit": out.commit_per_item}, batch_size, views)
    per_loss = {name: value.sum() for name, value in per_view.items() if name != "commit"}
    rest = parts.generator_loss.commit_weight * per_view["commit"].sum()
    pair: dict[str, torch.Tensor] = {}
    if parts.pairwise is not None:
        pair = pairwise_terms(parts, runtime, out, x, scale, metas, step, batch_size, views)
        rest = rest + sum(pair[k] for k in PAIRWISE_LOSS_TERMS if k in pair)
    total = parts.generator_loss.weighted_sum(per_loss) + rest
    return GeneratorLosses(per_view, per_loss, rest, pair, total)


# Weighted pairwise terms that join the generator loss, and the unweighted values logged.
PAIRWISE_LOSS_TERMS = (*LOSS_TERMS, "l_xrec", "l_cue")
PAIRWISE_LOGGED = (*PAIRWISE_LOSS_TERMS, "sim", "div", "nce_accuracy", "div_cosine", "cls",
                   "ild", "ild_adv", "xrec", "cue")


def gradient_ratios(latent: torch.Tensor, losses: GeneratorLosses,
                    weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """How hard each pairwise term pulls on the encoder output next to the reconstruction:
    `grad_ratio_<term> = |d l_<term> / d latent| / |d (l_t + l_f) / d latent|` (weighted,
    summed over views; `weights`: the generator loss's). A ratio of 1e-4 means the term's
    weight is too small to act; one far above 1 means it dominates the codec. Costs one
    extra backward through the decoder (and the cross-reconstruction's)."""
    reconstruction = sum(weights[name] * losses.per_loss[name] for name in ("l_t", "l_f"))
    reference = torch.autograd.grad(reconstruction, latent, retain_graph=True)[0].norm()
    ratios = {}
    for name in PAIRWISE_LOSS_TERMS:
        term = losses.pair.get(name)
        if term is None or not term.requires_grad:
            continue
        grad = torch.autograd.grad(term, latent, retain_graph=True, allow_unused=True)[0]
        norm = grad.norm() if grad is not None else reference.new_zeros(())
        ratios[f"grad_ratio_{name[2:]}"] = norm / reference.clamp_min(1e-20)
    return ratios


def backward(parts: Parts, runtime: Runtime, losses: GeneratorLosses, y: torch.Tensor,
             adversarial: Adversarial, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of both players (one backward each); returns their norms before clipping."""
    parts.opt_g.zero_grad(set_to_none=True)
    if parts.balancer is not None:
        parts.balancer.backward(losses.per_loss, y, losses.rest)  # balanced output losses + the rest
    else:
        parts.scaler_g.scale(losses.total).backward()
    if parts.pairwise is not None:
        distributed.average_gradients_(parts.pairwise.parameters())  # the head is outside DDP
    parts.scaler_g.unscale_(parts.opt_g)
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm_g = torch.nn.utils.clip_grad_norm_(parts.generator_params(), max_norm)
    grad_norm_d = torch.zeros((), device=runtime.device)
    if adversarial.loss_d is not None:
        parts.opt_d.zero_grad(set_to_none=True)
        parts.scaler_d.scale(adversarial.loss_d).backward()
        parts.scaler_d.unscale_(parts.opt_d)
        grad_norm_d = torch.nn.utils.clip_grad_norm_(parts.raw_disc.parameters(), max_norm)
    return grad_norm_g, grad_norm_d


def step_scalars(losses: GeneratorLosses, adversarial: Adversarial, grad_norm_g: torch.Tensor,
                 grad_norm_d: torch.Tensor, codes: torch.Tensor, bins: int,
                 ratios: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Every logged number of a step, moved to the host in ONE transfer."""
    named = {f"{name}_ch{v + 1}": values[v] for name, values in losses.per_view.items()
             for v in range(len(values))}
    named.update({"loss_g": losses.total, "grad_norm_g": grad_norm_g})
    named.update({k: losses.pair[k] for k in PAIRWISE_LOGGED if k in losses.pair})
    if adversarial.loss_d is not None:
        named.update({"loss_d": adversarial.loss_d, "grad_norm_d": grad_norm_d})
    named.update({f"usage_cb{k + 1}": u for k, u in enumerate(codebook_usage(codes, bins))})
    named.update(ratios or {})
    values = torch.stack([v.detach().float().reshape(()) for v in named.values()]).cpu()
    return dict(zip(named, values.tolist()))


def apply_updates(parts: Parts, step: int, update_disc: bool) -> None:
    """Optimizer steps at the learning rates of step `step` (through the GradScalers)."""
    set_learning_rates(parts, step)
    parts.scaler_g.step(parts.opt_g)
    parts.scaler_g.update()
    if update_disc:
        parts.scaler_d.step(parts.opt_d)
        parts.scaler_d.update()


def discard_step(parts: Parts, codebook_snapshot: dict[str, torch.Tensor]) -> None:
    """Leave no trace of a step that is skipped: codebooks as before its forward, no gradients."""
    parts.raw_model.quantizer.restore(codebook_snapshot)
    parts.opt_g.zero_grad(set_to_none=True)
    if parts.opt_d is not None:
        parts.opt_d.zero_grad(set_to_none=True)


def train_step(parts: Parts, runtime: Runtime, wavs: torch.Tensor, metas: list[dict[str, Any]], *,
               step: int, adversarial: bool, update_disc: bool, grad_clip: float,
               bins: int, measure_gradients: bool = False, gain_jitter_db: float = 0.0
               ) -> StepResult:
    """One GAN step on `wavs [B, V, 1, T]` at optimizer step `step`.

    The V views of B segments go through the generator as one batch of B*V. `adversarial`:
    the discriminator has started (adversarial losses on); `update_disc`: it also updates
    this step; `measure_gradients`: also log `gradient_ratios` (the engine asks on the
    steps it logs); `gain_jitter_db`: see `normalisation_scale`. Returns the logged scalars, or ok=False when the step was skipped
    because a loss or gradient was not finite (on any rank).
    """
    batch_size, views = wavs.shape[:2]
    x = wavs.to(runtime.device, non_blocking=True).flatten(0, 1)
    parts.model.train()
    # The quantizer updates its codebooks (and k-means buffers) during the forward; keep a
    # copy so that a skipped step leaves no trace in them either.
    codebook_snapshot = parts.raw_model.quantizer.snapshot()
    scale = normalisation_scale(parts, x, views, gain_jitter_db)
    with runtime.autocast():
        out = parts.model(x, return_embeddings=views > 1, scale=scale)
    adversarial_view = (discriminate(parts, runtime, x, out.audio, batch_size, views, update_disc)
                        if adversarial else Adversarial())
    losses = generator_losses(parts, runtime, out, x, scale, adversarial_view, metas, step,
                              batch_size, views)
    ratios = (gradient_ratios(out.latent, losses, parts.generator_loss.weights)
              if measure_gradients and losses.pair else {})
    grad_norm_g, grad_norm_d = backward(parts, runtime, losses, out.audio, adversarial_view, grad_clip)
    scalars = step_scalars(losses, adversarial_view, grad_norm_g, grad_norm_d, out.codes, bins,
                           ratios)
    scalars["kmeans_done"] = float(parts.raw_model.codebooks_initialized)

    # Under fp16 the GradScaler skips inf/NaN gradients itself; a non-finite LOSS is ours.
    finite_loss = math.isfinite(scalars["loss_g"]) and math.isfinite(scalars.get("loss_d", 0.0))
    finite_grad = parts.scaler_g.is_enabled() or (math.isfinite(scalars["grad_norm_g"])
                                                   and math.isfinite(scalars.get("grad_norm_d", 0.0)))
    # Every rank skips or steps together (a NaN on one rank must not fork the replicas).
    if not distributed.all_true(finite_loss and finite_grad):
        discard_step(parts, codebook_snapshot)
        return StepResult(False, scalars)
    apply_updates(parts, step, adversarial_view.loss_d is not None)
    scalars["lr_g"] = parts.opt_g.param_groups[0]["lr"]
    if parts.opt_d is not None:
        scalars["lr_d"] = parts.opt_d.param_groups[0]["lr"]
    return StepResult(True, scalars)


def replicated_state(parts: Parts) -> Iterator[tuple[str, torch.Tensor]]:
    """Everything that must be identical on every rank: weights and codebooks."""
    for prefix, module in (("model", parts.raw_model), ("disc", parts.raw_disc),
                           ("pairwise", parts.pairwise)):
        if module is not None:
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                yield f"{prefix}.{name}", tensor
