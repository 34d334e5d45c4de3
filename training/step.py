"""One training step for V channel views: `train_step` = `discriminate` ->
`generator_losses` -> `backward` -> `apply_updates`.

A step is the same code for mono (V = 1) and paired (V = 2) training: the V views of B
segments go through the generator as ONE batch of B*V (`modules.views`), and the per-item
losses are averaged per view. Paired training (`parts.pairwise` is not None) adds the
pairwise objective, which takes what it needs from the generator pass in one call. The
generator loss is the design document's sum over channels:
`sum_v (l_t + l_f + l_g + l_feat + commit)_v + l_sim + l_div` (weighted), plus the terms the
pairwise recipe adds (cross-reconstruction `l_xrec`, the level-difference heads, ...).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from measure import metrics
from model import EncodecModel, EncodecOutput
from modules.level_side_info import with_level_side
from modules.losses import hinge_fake, hinge_real, relative_l1
from modules.views import flatten_views, per_view_means
from pairwise_losses import LOGGED_TERMS, LOSS_TERMS
from training.parts import Parts, set_learning_rates
from utils import distributed
from training.runtime import Runtime


@dataclass
class StepResult:
    """Whether the step was applied (False: a loss or gradient was not finite on some rank,
    and nothing changed: weights, optimizer states, codebooks; the engine does not count the
    step, so the learning-rate schedule does not advance either), every logged number of the
    step, and why it was skipped (`reason`, empty when applied)."""
    ok: bool
    scalars: dict[str, float]
    reason: str = ""


@dataclass
class Adversarial:
    """The discriminator's side of one step, computed before the generator's backward (empty
    before the discriminator starts).

    Attributes:
        per_item: the generator's `l_g` and `l_feat` per item `[N]` (values, no graph).
        output_grads: their gradients at the generator's output, already computed scale by
            scale: `{'l_g', 'l_feat'}` of each loss summed over views (for the balancer), or
            `{'weighted'}`, of the weighted sum times the generator's loss scale.
        loss_d: the discriminator loss on the steps where it updates; its gradients are
            already in the discriminator's `.grad` (times its loss scale).
    """
    per_item: dict[str, torch.Tensor] = field(default_factory=dict)
    output_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_d: torch.Tensor | None = None


@dataclass
class GeneratorLosses:
    """The generator's losses of one step.

    Attributes:
        per_view: name -> `[V]` means over the batch, commitment included (logged per channel).
        per_loss: the output-dependent losses summed over views (what the balancer balances);
            the adversarial ones (`l_g`, `l_feat`) are values: their gradient at the output is
            already in `Adversarial.output_grads`.
        unbalanced: commitment + the weighted pairwise terms, which do not go through the
            balancer.
        pairwise: the pairwise objective's weighted terms and unweighted logs (empty in mono
            and before its terms switch on).
        total: the design document's weighted sum of everything (a value, for the log).
    """
    per_view: dict[str, torch.Tensor]
    per_loss: dict[str, torch.Tensor]
    unbalanced: torch.Tensor
    pairwise: dict[str, torch.Tensor]
    total: torch.Tensor

    def with_graph(self) -> dict[str, torch.Tensor]:
        """The output-dependent losses that still carry their graph (`l_t`, `l_f`)."""
        return {name: value for name, value in self.per_loss.items() if value.requires_grad}


def discriminator_coin(seed: int, epoch: int, batch: int) -> float:
    """The discriminator-update coin flip at batch `batch` of `epoch`: a pure function of
    the position in training, so it is the same on every rank and after a resume."""
    return float(np.random.default_rng([seed, epoch, batch, 0xD15C]).random())


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
    """The adversarial terms of one step, one discriminator scale at a time, each scale's
    graph freed before the next one is built.

    Per scale: the real audio `x` (with a graph only on update steps) and the fake `y` go
    through the scale's discriminator once each. The fake pass serves both players: the
    generator's hinge and relative feature matching are differentiated into the audio only
    (through a detached copy of `y`, so that the generator's own backward can follow later
    with that gradient), and on update steps the discriminator's hinge on real and fake is
    differentiated into the discriminator's weights only (the fake as a detached input). So
    the peak holds one scale's graph of the discriminator, not the graphs of three passes,
    and the generator's pass through the discriminator uses its weights from before its
    update, as a step on the whole sum would.

    The per-item values and the gradient at `y` are what the plain sum
    `weights . (l_g, l_feat)` (`GeneratorLoss` with the discriminator's outputs) gives, up to
    float rounding: `tests/test_training_step.py` checks it against the step written out.
    """
    disc = parts.raw_disc
    disc.train()
    scales = disc.discriminators
    layers = sum(len(scale.convs) for scale in scales)  # feature-matching terms over scales
    balanced = parts.balancer is not None
    weights = parts.generator_loss.weights
    fake = y.detach().requires_grad_()
    n = x.shape[0]
    per_item = {"l_g": x.new_zeros(n), "l_feat": x.new_zeros(n)}
    grads: dict[str, torch.Tensor] = {}
    loss_d = x.new_zeros(()) if update_disc else None
    if update_disc:
        parts.opt_d.zero_grad(set_to_none=True)
    for scale in scales:
        with contextlib.ExitStack() as stack:
            if not update_disc:
                # the generator's pass: gradient to the audio only
                stack.enter_context(frozen(scale))
            with runtime.autocast(), torch.set_grad_enabled(update_disc):
                real_logit, real_fmaps = scale(x)
            with runtime.autocast():
                fake_logit, fake_fmaps = scale(fake)
        # Per item, over views: the step's losses are sums over views of batch means, i.e.
        # sums over the batch's items divided by `batch_size`.
        l_g = hinge_real(fake_logit) / len(scales)
        l_feat = sum(relative_l1(f, r) for r, f in zip(real_fmaps, fake_fmaps)) / layers
        per_item["l_g"] += l_g.detach()
        per_item["l_feat"] += l_feat.detach()
        if balanced:
            terms = {"l_g": l_g.sum() / batch_size, "l_feat": l_feat.sum() / batch_size}
        else:
            weighted = (weights["l_g"] * l_g + weights["l_feat"] * l_feat).sum() / batch_size
            terms = {"weighted": parts.scaler_g.scale(weighted)}
        for i, (name, term) in enumerate(terms.items()):
            keep = update_disc or i + 1 < len(terms)  # the graph serves a later backward
            grad, = torch.autograd.grad(term, fake, retain_graph=keep)
            grads[name] = grad if name not in grads else grads[name].add_(grad)
        if update_disc:
            d_items = (hinge_real(real_logit) + hinge_fake(fake_logit)) / len(scales)
            scale_loss = d_items.sum() / batch_size
            parts.scaler_d.scale(scale_loss).backward(inputs=list(scale.parameters()))
            loss_d += scale_loss.detach()
        del real_logit, real_fmaps, fake_logit, fake_fmaps, l_g, l_feat, terms
    if update_disc:
        distributed.average_gradients_(disc.parameters())  # the scales are called without DDP
    return Adversarial(per_item=per_item, output_grads=grads, loss_d=loss_d)


def normalisation_scale(model: EncodecModel, x: torch.Tensor, views: int, shared: bool,
                        gain_jitter_db: float = 0.0) -> torch.Tensor | None:
    """The scale the generator divides `x [B*V, 1, T]` by, or None for its own default (each
    item's RMS, or no normalisation at all).

    - With `shared` (`pairwise.shared_scale`), the views of an item share their common RMS, so
      that the level differences between the channels of a pair stay in the latent.
    - With `gain_jitter_db` > 0 (`datasets.gain_jitter_db`), each item's scale is multiplied
      by a random gain, uniform in dB within +-gain_jitter_db (one gain for all views of an
      item): the encoder sees its input at varied levels and the reconstruction is scored at
      the true level. Without it a per-item RMS shows the codec every input at the same
      level, and it learns to ignore level: a louder input may even decode quieter.
    """
    if not model.audio_normalize:
        return None
    shared = shared and views > 1
    if not shared and gain_jitter_db <= 0:
        return None
    scale = EncodecModel.shared_scale(x, views) if shared else model.normalize(x)[1]
    if gain_jitter_db > 0:
        gain_db = (2 * torch.rand(x.shape[0] // views) - 1) * gain_jitter_db  # CPU RNG: resumable
        gain = 10 ** (-gain_db.to(scale.device) / 20)
        scale = scale * flatten_views(gain[:, None].expand(-1, views)).view(-1, 1, 1)
    return scale


def generator_losses(parts: Parts, runtime: Runtime, out: EncodecOutput,
                     played: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None,
                     adversarial_terms: Adversarial, metas: list[dict[str, Any]], step: int,
                     views: int) -> GeneratorLosses:
    """sum over channels of (weighted l_t, l_f, l_g, l_feat, commit) + the pairwise terms
    (`l_g`, `l_feat`: the values `discriminate` computed). The reconstruction losses score
    `played`, the decode as played (`out.audio`, or it after the band gains of
    `parts.level_side`); the pairwise terms take `out`."""
    items = {**parts.generator_loss(x, played), **adversarial_terms.per_item}
    per_view = per_view_means({**items, "commit": out.commit_per_item}, views)
    per_loss = {name: value.sum() for name, value in per_view.items() if name != "commit"}
    unbalanced = parts.generator_loss.commit_weight * per_view["commit"].sum()
    pairwise: dict[str, torch.Tensor] = {}
    if parts.pairwise is not None:  # paired training: the pairwise objective, in one call
        pairwise = parts.pairwise(parts.raw_model, out, x, scale, views=views, step=step,
                                  metas=metas, reconstruction_loss=parts.generator_loss,
                                  autocast=runtime.autocast)
        unbalanced = unbalanced + sum(pairwise[k] for k in LOSS_TERMS if k in pairwise)
    total = (parts.generator_loss.weighted_sum(per_loss) + unbalanced).detach()
    return GeneratorLosses(per_view, per_loss, unbalanced, pairwise, total)


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
    for name in LOSS_TERMS:
        term = losses.pairwise.get(name)
        if term is None or not term.requires_grad:
            continue
        grad = torch.autograd.grad(term, latent, retain_graph=True, allow_unused=True)[0]
        norm = grad.norm() if grad is not None else reference.new_zeros(())
        ratios[f"grad_ratio_{name[2:]}"] = norm / reference.clamp_min(1e-20)
    return ratios


def backward(parts: Parts, runtime: Runtime, losses: GeneratorLosses, y: torch.Tensor,
             adversarial: Adversarial, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's gradients in one backward (the discriminator's are already there, from
    `discriminate`); returns both norms before clipping.

    The adversarial losses enter as their gradient at the output `y`: the backward starts
    from `y` with that gradient and from the losses that still have their graph, which is
    the gradient of the whole weighted sum. Under fp16 both parts carry the GradScaler's
    scale, so that `unscale_` gives the true gradient (the balancer does not combine with
    fp16: `configuration.check_settings`).
    """
    parts.opt_g.zero_grad(set_to_none=True)
    scaler = parts.scaler_g
    if parts.balancer is not None:
        grad = parts.balancer.balanced_grad(losses.with_graph(), y, grads=adversarial.output_grads)
        roots, root_grads = [y], [grad]
        if losses.unbalanced.requires_grad:  # constant without pairwise terms and commitment
            roots.append(losses.unbalanced)
            root_grads.append(torch.ones_like(losses.unbalanced))
    else:
        weighted = parts.generator_loss.weighted_sum(losses.with_graph()) + losses.unbalanced
        roots, root_grads = [scaler.scale(weighted)], [torch.ones_like(weighted)]
        if "weighted" in adversarial.output_grads:  # already times the loss scale
            roots.append(y)
            root_grads.append(adversarial.output_grads["weighted"])
    torch.autograd.backward(roots, root_grads)
    if parts.pairwise is not None:
        distributed.average_gradients_(parts.pairwise.parameters())  # the head is outside DDP
    scaler.unscale_(parts.opt_g)
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm_g = torch.nn.utils.clip_grad_norm_(parts.generator_params(), max_norm)
    grad_norm_d = torch.zeros((), device=runtime.device)
    if adversarial.loss_d is not None:
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
    named.update({k: losses.pairwise[k] for k in LOGGED_TERMS if k in losses.pairwise})
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


def discard_step(parts: Parts, codebook_snapshot: dict[str, torch.Tensor], update_disc: bool,
                 scalars: dict[str, float]) -> None:
    """Leave no trace of a step that is skipped: codebooks as before its forward, no gradients.

    The GradScalers that unscaled gradients this step still close it (`close_skipped`):
    without that the next `unscale_()` raises ("already been called ... since the last
    update()"). Outside fp16 the scalers are disabled and closing them does nothing.
    """
    parts.raw_model.quantizer.restore(codebook_snapshot)
    parts.opt_g.zero_grad(set_to_none=True)
    close_skipped(parts.scaler_g, math.isfinite(scalars.get("grad_norm_g", 0.0)))
    if parts.opt_d is not None:
        parts.opt_d.zero_grad(set_to_none=True)
        if update_disc:
            close_skipped(parts.scaler_d, math.isfinite(scalars.get("grad_norm_d", 0.0)))


def close_skipped(scaler: torch.amp.GradScaler, gradients_finite: bool) -> None:
    """End a skipped step's iteration of `scaler`: where this player's gradients overflowed,
    `update()` lowers the loss scale as for any overflow; where they were finite (the step was
    skipped for the other player, or another rank), the scale stays and the step does not
    count toward its growth, since no optimizer step was taken at that scale."""
    if gradients_finite and scaler.is_enabled():
        scaler.update(new_scale=scaler.get_scale())
    else:
        scaler.update()


def skip_reason(parts: Parts, scalars: dict[str, float]) -> str:
    """Why this rank cannot apply the step ('' when it can): a non-finite loss, or a
    non-finite gradient (under fp16, that player's loss scale overflowed)."""
    if not (math.isfinite(scalars["loss_g"]) and math.isfinite(scalars.get("loss_d", 0.0))):
        return "non-finite loss"
    for player, name, scaler in (("", "grad_norm_g", parts.scaler_g),
                                 ("discriminator ", "grad_norm_d", parts.scaler_d)):
        if not math.isfinite(scalars.get(name, 0.0)):
            if scaler.is_enabled():
                return f"{player}gradient overflow at fp16 loss scale {scaler.get_scale():g}"
            return f"non-finite {player}gradient"
    return ""


def train_step(parts: Parts, runtime: Runtime, wavs: torch.Tensor, metas: list[dict[str, Any]], *,
               step: int, adversarial: bool, update_disc: bool, grad_clip: float,
               bins: int, measure_gradients: bool = False, gain_jitter_db: float = 0.0
               ) -> StepResult:
    """One GAN step on `wavs [B, V, 1, T]` at optimizer step `step`.

    The V views of B segments go through the generator as one batch of B*V. `adversarial`:
    the discriminator has started (adversarial losses on); `update_disc`: it also updates
    this step; `measure_gradients`: also log `gradient_ratios` (the engine asks on the
    steps it logs); `gain_jitter_db`: see `normalisation_scale`. Returns the logged scalars,
    or ok=False when the step was skipped because a loss or gradient was not finite (on any
    rank).
    """
    batch_size, views = wavs.shape[:2]
    x = flatten_views(wavs.to(runtime.device, non_blocking=True))
    parts.model.train()
    # The quantizer updates its codebooks (and k-means buffers) during the forward; keep a
    # copy so that a skipped step leaves no trace in them either.
    codebook_snapshot = parts.raw_model.quantizer.snapshot()
    paired = parts.pairwise is not None
    scale = normalisation_scale(parts.raw_model, x, views, paired and parts.pairwise.shared_scale,
                                gain_jitter_db)
    content_views = views if paired and parts.pairwise.shared_content_code else 1
    with runtime.autocast():
        out = parts.model(x, return_embeddings=paired, scale=scale, content_views=content_views)
    # What the receiver plays: the decode, after the band gains sent beside the codes when
    # there are any. The pairwise terms still judge what the codes alone carry (`out`).
    played = (out.audio if parts.level_side is None else
              with_level_side(x, out.audio, parts.raw_model.sample_rate, parts.level_side))
    adversarial_terms = (discriminate(parts, runtime, x, played, batch_size, views,
                                      update_disc) if adversarial else Adversarial())
    losses = generator_losses(parts, runtime, out, played, x, scale, adversarial_terms, metas,
                              step, views)
    ratios = (gradient_ratios(out.latent, losses, parts.generator_loss.weights)
              if measure_gradients and losses.pairwise else {})
    grad_norm_g, grad_norm_d = backward(parts, runtime, losses, played, adversarial_terms,
                                        grad_clip)
    scalars = step_scalars(losses, adversarial_terms, grad_norm_g, grad_norm_d, out.codes, bins,
                           ratios)
    scalars["kmeans_done"] = float(parts.raw_model.codebooks_initialized)

    # A step with a non-finite loss or gradient is skipped here, under fp16 too: the
    # GradScaler would skip an overflowed step's optimizer update by itself, but the
    # codebooks' EMA and the step count (the learning-rate schedule) would still advance.
    # The grad norms are of the unscaled gradients: non-finite exactly when the GradScaler
    # finds an inf or NaN. Every rank skips or steps together (a NaN on one rank must not
    # fork the replicas).
    reason = skip_reason(parts, scalars)
    updated_disc = adversarial_terms.loss_d is not None
    if not distributed.all_true(not reason):
        discard_step(parts, codebook_snapshot, updated_disc, scalars)
        return StepResult(False, scalars, reason or "non-finite loss or gradient on another rank")
    apply_updates(parts, step, updated_disc)
    scalars["lr_g"] = parts.opt_g.param_groups[0]["lr"]
    if len(parts.opt_g.param_groups) > 1:
        scalars["lr_heads"] = parts.opt_g.param_groups[1]["lr"]
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
