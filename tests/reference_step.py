"""The training step written out the straightforward way: whole-discriminator passes, the plain
loss functions of `modules/losses.py`, one backward of the weighted sum (or of the balancer's
gradient), and the discriminator's hinge loss on the real audio and the detached fake,
backpropagated after the generator's. The normalisation scale and the pairwise terms are
written out here too, from the `pairwise` config, with plain torch: nothing of
`training/step.py` or `pairwise_losses.py` is used, so a mistake there shows. `train_step`
must compute the same losses, gradients and updates, up to float rounding
(tests/test_training_step.py).

The pairwise terms follow the step's precision: InfoNCE and the band levels in float32 (as
the code computes them whatever the input's dtype), the rest in the input's dtype; each
float32 term is computed with the same operations in the same order, so that both agree to
the float64 tests' tolerance."""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, Iterator

import torch
from torch.nn import functional as F

from modules import spatial_cues
from modules.losses import discriminator_loss
from training.parts import Parts, set_learning_rates
from training.runtime import Runtime


@contextlib.contextmanager
def no_grad_for(module: torch.nn.Module) -> Iterator[None]:
    """`module`'s parameters need no gradient inside the block (flags restored after)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def reference_scale(model, x: torch.Tensor, views: int, shared: bool,
                    gain_jitter_db: float) -> torch.Tensor | None:
    """The generator's normalisation scale `[B*V, 1, 1]`: each item's RMS, or the common RMS
    of an item's views (`shared`), times a random gain per item (None: the model's own)."""
    if not model.audio_normalize or (not (shared and views > 1) and gain_jitter_db <= 0):
        return None
    power = x.mean(dim=1).pow(2).mean(dim=-1)  # [B*V]
    if shared and views > 1:
        power = power.view(-1, views).mean(dim=1).repeat_interleave(views)
    scale = (power + model.normalize_eps ** 2).sqrt()
    if gain_jitter_db > 0:
        gain_db = (2 * torch.rand(x.shape[0] // views) - 1) * gain_jitter_db
        scale = scale * (10 ** (-gain_db / 20)).repeat_interleave(views)
    return scale.view(-1, 1, 1)


def reference_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-item normalised InfoNCE `[B]` of two views' embeddings `[B, D, F]`, per frame: the
    positive of frame f of item i is frame f of the other view of item i, the candidates are
    it and every frame of the other items; rows centred and L2-normalised; both directions."""
    batch, dim, frames = a.shape
    rows_a, rows_b = (e.float().transpose(1, 2).reshape(-1, dim) for e in (a, b))
    mean = torch.cat([rows_a, rows_b]).mean(dim=0)
    # Anchors and candidates centred and normalised each on their own, as the step does
    # (its candidates are the rows of every rank), so that the float32 rounding agrees.
    anchors_a, anchors_b, candidates_a, candidates_b = (
        F.normalize(r - mean, dim=1, eps=1e-12) for r in (rows_a, rows_b, rows_a, rows_b))
    n = rows_a.shape[0]
    item = torch.arange(n) // frames
    excluded = (item[:, None] == item[None, :]) & ~torch.eye(n, dtype=torch.bool)
    candidates = n - (frames - 1)

    def one_direction(anchors: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        logits = (anchors @ others.T / temperature).masked_fill(excluded, float('-inf'))
        return (torch.logsumexp(logits, dim=1) - logits.diagonal()) / math.log(candidates)

    both = (one_direction(anchors_a, candidates_b) + one_direction(anchors_b, candidates_a)) / 2
    return both.view(batch, frames).mean(dim=1)


def reference_cos_hinge(a: torch.Tensor, b: torch.Tensor, max_cosine: float) -> torch.Tensor:
    """Per item `[B]`: relu(cosine - max_cosine) per frame of the embeddings after removing
    the mean of both views, averaged over frames."""
    mean = torch.cat([a, b]).mean(dim=(0, 2), keepdim=True)
    cosine = (F.normalize(a - mean, dim=1, eps=1e-12)
              * F.normalize(b - mean, dim=1, eps=1e-12)).sum(dim=1)
    return F.relu(cosine - max_cosine).mean(dim=1)


def reference_levels(audio: torch.Tensor, sample_rate: int, views: int,
                     n_bands: int = 8) -> torch.Tensor:
    """Per-view band levels `[B, V, n_bands]` dB (float32)."""
    n_fft = 2048 if audio.shape[-1] >= 2048 else 1024
    levels = spatial_cues.band_levels(audio.float(), sample_rate, n_bands=n_bands, n_fft=n_fft)
    return levels.view(-1, views, levels.shape[-1])


def reference_pairwise(cfg: Any, parts: Parts, runtime: Runtime, out, x: torch.Tensor,
                       scale: torch.Tensor | None, step: int, batch_size: int,
                       views: int) -> list[torch.Tensor]:
    """The weighted pairwise terms of one step, in the order they are summed."""
    model = parts.raw_model
    if step < cfg.start_step or (cfg.wait_for_kmeans and not model.codebooks_initialized):
        return []
    unsupported = (cfg.schedule != 'constant' or cfg.channel_classifier.enabled
                   or cfg.class_weights
                   or cfg.invariance.weight or cfg.nce_projection
                   or cfg.nce_pooling != 'frame' or not cfg.nce_center
                   or cfg.nce_same_segment_negatives)
    if unsupported:
        # The linear ramp counts from the step the gate opened, which this stateless reference
        # cannot know; test_pairwise_step checks the ramp against the trainer's own record.
        raise NotImplementedError("the reference step writes out the recipes' default terms "
                                  "with the constant schedule only")
    factor = 1.0
    content, channel = cfg.content_codebook, cfg.channel_codebook
    # Codebook k of view v, [B, D, F], out of embeddings[k] [B*V, D, F] (row b * V + v). Each
    # taken once: the float32 embeddings then sum their gradients in the step's order.
    per_view = [[e.view(batch_size, views, *e.shape[1:])[:, v] for e in out.embeddings]
                for v in range(views)]
    view = lambda k, v: per_view[v][k]  # noqa: E731
    pairs = list(itertools.combinations(range(views), 2))
    if cfg.sim_kind == 'infonce':
        sim = sum(reference_info_nce(view(content, i), view(content, j), cfg.temperature)
                  for i, j in pairs) / len(pairs)
    elif cfg.sim_kind == 'mse':
        sim = sum(((view(content, i) - view(content, j)) ** 2).flatten(1).mean(dim=1)
                  for i, j in pairs) / len(pairs)
    else:
        raise NotImplementedError(cfg.sim_kind)
    if cfg.div_kind == 'cos_hinge':
        div = sum(reference_cos_hinge(view(channel, i), view(channel, j), cfg.max_cosine)
                  for i, j in pairs) / len(pairs)
    elif cfg.div_kind == 'neg_mse':
        div = sum(-((view(channel, i) - view(channel, j)) ** 2).flatten(1).mean(dim=1)
                  for i, j in pairs) / len(pairs)
    else:
        raise NotImplementedError(cfg.div_kind)
    terms = [factor * cfg.sim_weight * sim.mean(), factor * cfg.div_weight * div.mean()]

    # Each view's own content latent `[B, D, F]`: the encoder output (before a shared content
    # code) less the earlier codebooks' vectors, on the codebook's dimensions.
    own = out.latent.float() - sum(e.detach().float() for e in out.embeddings[:content])
    own = own * model.quantizer.codebooks[content].dims[:, None]
    own_content = list(own.view(batch_size, views, *own.shape[1:]).unbind(1))

    if cfg.ild_head.enabled:
        # A head predicts the pair's band-level difference from the channel codebook, its twin
        # from the content (each view's own under a shared content code) through a reversed
        # gradient; each pools a view over time into mean and mean absolute deviation, both
        # views' features scaled by their joint RMS, antisymmetric in the two views.
        def predict(mlp: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            pooled = [torch.cat([e.mean(-1), (e - e.mean(-1, keepdim=True)).abs().mean(-1)], 1)
                      for e in (a.to(mlp[0].weight.dtype), b.to(mlp[0].weight.dtype))]
            ab, ba = torch.cat(pooled, 1), torch.cat(pooled[::-1], 1)
            norm = torch.rsqrt(ab.pow(2).mean(dim=1, keepdim=True) + 1e-20)
            return (mlp(ab * norm) - mlp(ba * norm)) / 2

        def reversed_gradient(e: torch.Tensor) -> torch.Tensor:  # value e, gradient -reversal
            e = e.to(parts.pairwise.ild_twin.mlp[0].weight.dtype)  # exact there: e is float32
            return (1 + cfg.ild_head.reversal) * e.detach() - cfg.ild_head.reversal * e

        def relative_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            target = target.to(prediction)
            normaliser = target.pow(2).mean().clamp_min(cfg.ild_head.floor_db ** 2)
            return (prediction - target).pow(2).mean() / normaliser

        with torch.no_grad():
            levels = reference_levels(x, model.sample_rate, views, cfg.ild_head.n_bands)
        contents = (own_content if cfg.shared_content_code
                    else [view(content, v) for v in range(views)])
        head, twin = parts.pairwise.ild_head.mlp, parts.pairwise.ild_twin.mlp
        plain, adversarial = [], []
        for i, j in pairs:
            target = levels[:, i] - levels[:, j]
            plain.append(relative_error(predict(head, view(channel, i), view(channel, j)),
                                        target))
            adversarial.append(relative_error(
                predict(twin, reversed_gradient(contents[i]), reversed_gradient(contents[j])),
                target))
        terms.append(factor * cfg.ild_head.weight * torch.stack(plain).mean())
        terms.append(factor * cfg.ild_head.adv_weight * torch.stack(adversarial).mean())

    if cfg.xrec_weight > 0:
        # Content codebook of view i + the other codebooks of view j, decoded, against x_j.
        ordered = list(itertools.permutations(range(views), 2))
        n_q = len(out.embeddings)
        swapped = [view(content, i) + sum(view(k, j) for k in range(n_q) if k != content)
                   for i, j in ordered]
        latents = torch.stack(swapped, dim=1).flatten(0, 1)  # row b * P + p
        targets = torch.tensor([b * views + j for b in range(batch_size) for _, j in ordered],
                               device=x.device)
        loss = parts.generator_loss
        with runtime.autocast():
            audio = model.decoder(latents.to(x.dtype))[..., :x.shape[-1]]
            target_scale = scale if scale is not None else model.normalize(x)[1]
            if target_scale is not None:
                audio = audio * target_scale[targets]
            xrec = loss.weighted_sum(loss(x[targets], audio)).mean()
        terms.append(factor * cfg.xrec_weight * xrec)

    if cfg.cue_weight > 0:
        # The decoded pairs' band-level differences against the input pairs'.
        with torch.no_grad():
            inputs = reference_levels(x, model.sample_rate, views)
        decoded = reference_levels(out.audio, model.sample_rate, views)
        first, second = (list(side) for side in zip(*pairs))
        difference = decoded[:, first] - decoded[:, second]
        target = (inputs[:, first] - inputs[:, second]).to(difference)
        if cfg.cue_shape:
            difference = difference - difference.mean(dim=-1, keepdim=True)
            target = target - target.mean(dim=-1, keepdim=True)
        normaliser = target.pow(2).mean().clamp_min(cfg.ild_head.floor_db ** 2)
        cue = (difference - target).pow(2).mean() / normaliser
        terms.append(factor * cfg.cue_weight * cue)

    if cfg.consensus_weight > 0:
        # Each view's own content latent (the encoder output, before a shared content code)
        # pays, in every frame its nearest code is not the pair's (the code nearest the views'
        # mean), its distance to the pair's code less that to its own, over the two codes'.
        codebook = model.quantizer.codebooks[content]
        codes = (codebook.embed * codebook.dims).detach().float()
        per_item = torch.stack(own_content, dim=1).transpose(2, 3)  # [B, V, F, D]
        nearest = lambda v: ((v[..., None, :] - codes) ** 2).sum(-1).argmin(-1)  # noqa: E731
        margins = []
        for i, j in pairs:
            pair_code = nearest(((per_item[:, i] + per_item[:, j]) / 2).detach())
            for v in (per_item[:, i], per_item[:, j]):
                own = nearest(v.detach())
                margin = (((v - codes[pair_code]) ** 2).sum(-1) - ((v - codes[own]) ** 2).sum(-1))
                spread = ((codes[own] - codes[pair_code]) ** 2).sum(-1)
                margins.append(torch.where(own == pair_code, torch.zeros_like(margin),
                                           margin.clamp_min(0) / spread))
        terms.append(factor * cfg.consensus_weight * torch.stack(margins).mean())
    return terms


def reference_step(parts: Parts, runtime: Runtime, wavs: torch.Tensor, metas: list[dict[str, Any]],
                   *, step: int, adversarial: bool, update_disc: bool, grad_clip: float = 0.0,
                   gain_jitter_db: float = 0.0, pairwise_cfg: Any = None) -> dict[str, Any]:
    """One step on `parts` (updated in place); returns the losses and gradient norms (floats)
    and whether the update was applied. `pairwise_cfg`: the `pairwise` config group of a
    paired run (None: mono)."""
    batch_size, views = wavs.shape[:2]
    x = wavs.flatten(0, 1)
    per_view = lambda values: values.reshape(batch_size, views).mean(0)  # noqa: E731
    snapshot = parts.raw_model.quantizer.snapshot()
    parts.raw_model.train()
    paired = pairwise_cfg is not None
    scale = reference_scale(parts.raw_model, x, views, paired and pairwise_cfg.shared_scale,
                            gain_jitter_db)
    # The mean content latent is the model's own (`share_content` has its own test).
    content_views = views if paired and pairwise_cfg.shared_content_code else 1
    with runtime.autocast():
        out = parts.raw_model(x, return_embeddings=paired, scale=scale,
                              content_views=content_views)
    y = out.audio

    # The generator's losses: each per item, reduced to per-channel means, summed over channels.
    fake_logits = real_fmaps = fake_fmaps = None
    if adversarial:
        disc = parts.raw_disc.train()
        # The generator's losses train the generator only.
        with runtime.autocast(), no_grad_for(disc):
            fake_logits, fake_fmaps = disc(y)
            real_fmaps = [[f.detach() for f in scale_fmaps] for scale_fmaps in disc(x)[1]]
    items = parts.generator_loss(x, y, fake_logits, real_fmaps, fake_fmaps)
    per_loss = {name: per_view(value).sum() for name, value in items.items()}
    rest = parts.generator_loss.commit_weight * per_view(out.commit_per_item).sum()
    if paired:
        rest = rest + sum(reference_pairwise(pairwise_cfg, parts, runtime, out, x, scale, step,
                                             batch_size, views))
    total = parts.generator_loss.weighted_sum(per_loss) + rest

    # The generator's backward: the whole sum, or the balanced output losses + the rest.
    parts.opt_g.zero_grad(set_to_none=True)
    if parts.balancer is not None:
        parts.balancer.backward(per_loss, y, rest)
    else:
        total.backward()
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm_g = torch.nn.utils.clip_grad_norm_(parts.generator_params(), max_norm)

    # The discriminator's: hinge on the real audio and the detached fake, in one pass.
    loss_d = grad_norm_d = None
    if update_disc:
        parts.opt_d.zero_grad(set_to_none=True)
        n = x.shape[0]
        with runtime.autocast():
            logits, _ = parts.raw_disc(torch.cat([x, y.detach()]))
        loss_d = per_view(discriminator_loss([l[:n] for l in logits],
                                             [l[n:] for l in logits])).sum()
        loss_d.backward()
        grad_norm_d = torch.nn.utils.clip_grad_norm_(parts.raw_disc.parameters(), max_norm)

    numbers = {"loss_g": total.item(), "grad_norm_g": grad_norm_g.item(),
               **{f"{name}_ch{v + 1}": value.item() for name, values in items.items()
                  for v, value in enumerate(per_view(values))}}
    if update_disc:
        numbers.update(loss_d=loss_d.item(), grad_norm_d=grad_norm_d.item())
    applied = all(math.isfinite(v) for v in numbers.values())
    if applied:
        set_learning_rates(parts, step)
        parts.opt_g.step()
        if update_disc:
            parts.opt_d.step()
    else:
        parts.raw_model.quantizer.restore(snapshot)
    return {**numbers, "ok": applied}
