"""The training step written out the straightforward way, as it was before the discriminator's
side was made cheap (issue 10): whole-discriminator passes, the plain loss functions of
`modules/losses.py`, one backward of the weighted sum (or of the balancer's gradient), and the
discriminator's hinge loss on the real audio and the detached fake, backpropagated after the
generator's. `train_step` must compute the same losses, gradients and updates, up to float
rounding (tests/test_training_step.py)."""
from __future__ import annotations

import math
from typing import Any

import torch

from modules.losses import discriminator_loss
from training.parts import Parts, set_learning_rates
from training.runtime import Runtime
from training.step import PAIRWISE_LOSS_TERMS, frozen, normalisation_scale, pairwise_terms


def reference_step(parts: Parts, runtime: Runtime, wavs: torch.Tensor, metas: list[dict[str, Any]],
                   *, step: int, adversarial: bool, update_disc: bool, grad_clip: float = 0.0,
                   gain_jitter_db: float = 0.0) -> dict[str, Any]:
    """One step on `parts` (updated in place); returns the losses and gradient norms (floats)
    and whether the update was applied."""
    batch_size, views = wavs.shape[:2]
    x = wavs.flatten(0, 1)
    per_view = lambda values: values.reshape(batch_size, views).mean(0)  # noqa: E731
    snapshot = parts.raw_model.quantizer.snapshot()
    parts.raw_model.train()
    scale = normalisation_scale(parts, x, views, gain_jitter_db)
    with runtime.autocast():
        out = parts.raw_model(x, return_embeddings=views > 1, scale=scale)
    y = out.audio

    # The generator's losses: each per item, reduced to per-channel means, summed over channels.
    fake_logits = real_fmaps = fake_fmaps = None
    if adversarial:
        disc = parts.raw_disc.train()
        with runtime.autocast(), frozen(disc):  # the generator's losses train the generator only
            fake_logits, fake_fmaps = disc(y)
            real_fmaps = [[f.detach() for f in scale_fmaps] for scale_fmaps in disc(x)[1]]
    items = parts.generator_loss(x, y, fake_logits, real_fmaps, fake_fmaps)
    per_loss = {name: per_view(value).sum() for name, value in items.items()}
    rest = parts.generator_loss.commit_weight * per_view(out.commit_per_item).sum()
    if parts.pairwise is not None:
        pair = pairwise_terms(parts, runtime, out, x, scale, metas, step, batch_size, views)
        rest = rest + sum(pair[k] for k in PAIRWISE_LOSS_TERMS if k in pair)
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
        loss_d = per_view(discriminator_loss([l[:n] for l in logits], [l[n:] for l in logits])).sum()
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
