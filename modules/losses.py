"""Reconstruction and adversarial losses of EnCodec, all per item.

Every function reduces over everything but the batch dimension and returns a `[N]` tensor,
so that the engine can reshape a `[B*V]` result to `[B, V]` and report one value per view.
The commitment loss comes from the quantizer (see `model.py`).
"""
from __future__ import annotations

import typing as tp
import warnings

import torch
import torchaudio
from torch import nn
from torch.nn import functional as F

GENERATOR_LOSS_NAMES = ('l_t', 'l_f', 'l_g', 'l_feat')


def per_item_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all dimensions but the first: `[N, ...] -> [N]`."""
    return x.flatten(1).mean(dim=1)


def check_same_shape(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")


def time_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 distance between waveforms `x` and `y` (`[N, C, T]`), per item `[N]`."""
    check_same_shape(x, y, "time_loss")
    return per_item_mean((x - y).abs())


class MelLoss(nn.Module):
    """Multi-scale mel-spectrogram loss of EnCodec, per item.

    For each window 2^i, i in [min_exp, max_exp] (hop = window / 4, `n_mels` bins), the loss
    is the L1 distance of the mel magnitudes plus the mean squared distance of
    `log10(floor + mel)`, averaged over scales (EnCodec's l_f with alpha_i = 1; the log term
    as in audiocraft's mel loss). The transforms are built once here and run in float32
    even under autocast.

    Two choices keep every scale in play:
    - The STFT is normalised (divided by the window's L2 norm), as in the EnCodec paper.
      Unnormalised magnitudes grow with the window, so the largest window's L1 term
      dominated the sum (about 300x the smallest window's on a pair of scene recordings);
      normalised, the per-scale losses stay within a few times of each other.
    - The floor sits inside the log. `log(max(mel, eps))` has no gradient wherever the
      reconstruction is quieter than eps, so a decoder that outputs silence there gets no
      signal to come back; `log10(floor + mel)` always has one.

    Args:
        sample_rate (int): Audio sample rate.
        n_mels (int): Number of mel bins per scale.
        min_exp (int): Exponent of the smallest window.
        max_exp (int): Exponent of the largest window (inclusive).
        floor (float): Added to the mel magnitudes inside the log.
    """

    def __init__(self, sample_rate: int, n_mels: int = 64, min_exp: int = 5, max_exp: int = 11,
                 floor: float = 1e-5):
        super().__init__()
        if min_exp > max_exp:
            raise ValueError(f"MelLoss: min_exp ({min_exp}) must not exceed max_exp ({max_exp})")
        self.floor = floor
        self.max_window = 2 ** max_exp
        with warnings.catch_warnings():
            # Small windows have fewer FFT bins than mel bins, so some filters are empty by
            # design (EnCodec's setting); they contribute 0 to the loss.
            warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero",
                                    category=UserWarning)
            self.transforms = nn.ModuleList([
                torchaudio.transforms.MelSpectrogram(
                    sample_rate=sample_rate, n_fft=2 ** i, win_length=2 ** i,
                    hop_length=2 ** i // 4, n_mels=n_mels, power=1.0, normalized=True)
                for i in range(min_exp, max_exp + 1)])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mel loss between `x` and `y` (`[N, C, T]`), per item `[N]`."""
        check_same_shape(x, y, "MelLoss")
        # Reflection padding of the centred STFT needs more than half a window of signal.
        if x.shape[-1] <= self.max_window // 2:
            raise ValueError(f"MelLoss needs more than {self.max_window // 2} samples per item, "
                             f"got {x.shape[-1]}: raise datasets.tensor_cut")
        n = x.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            both = torch.cat([x, y]).float()  # one transform call per scale for x and y
            loss = x.new_zeros(n, dtype=torch.float32)
            for transform in self.transforms:
                mel_x, mel_y = transform(both).split(n)
                log_x = torch.log10(self.floor + mel_x)
                log_y = torch.log10(self.floor + mel_y)
                loss = (loss + per_item_mean((mel_x - mel_y).abs())
                        + per_item_mean((log_x - log_y) ** 2))
        return loss / len(self.transforms)


def generator_adv_loss(logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Hinge generator loss: mean over scales of mean(relu(1 - D_k(fake))), per item `[N]`."""
    return torch.stack([per_item_mean(F.relu(1 - logit)) for logit in logits_fake]).mean(dim=0)


def discriminator_loss(logits_real: list[torch.Tensor],
                       logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Hinge discriminator loss: mean over scales of mean(relu(1 - D_k(real))) +
    mean(relu(1 + D_k(fake))), per item `[N]`. Pass logits of a detached fake."""
    if len(logits_real) != len(logits_fake):
        raise ValueError(f"discriminator_loss: {len(logits_real)} real vs {len(logits_fake)} "
                         "fake scales")
    per_scale = [per_item_mean(F.relu(1 - real)) + per_item_mean(F.relu(1 + fake))
                 for real, fake in zip(logits_real, logits_fake)]
    return torch.stack(per_scale).mean(dim=0)


def feature_matching_loss(fmaps_real: list[list[torch.Tensor]],
                          fmaps_fake: list[list[torch.Tensor]], eps: float = 1e-12) -> torch.Tensor:
    """Relative feature matching: mean over scales and layers of
    L1(f_real, f_fake) / mean(|f_real|), per item `[N]`.

    The real features are detached here: they are targets, and the discriminator must not
    receive gradient from a generator loss through them.
    """
    if len(fmaps_real) != len(fmaps_fake):
        raise ValueError(f"feature_matching_loss: {len(fmaps_real)} real vs {len(fmaps_fake)} "
                         "fake scales")
    terms = []
    for scale_real, scale_fake in zip(fmaps_real, fmaps_fake):
        if len(scale_real) != len(scale_fake):
            raise ValueError("feature_matching_loss: real and fake feature maps have different "
                             "numbers of layers")
        for real, fake in zip(scale_real, scale_fake):
            real = real.detach()
            terms.append(per_item_mean((real - fake).abs())
                         / per_item_mean(real.abs()).clamp_min(eps))
    return torch.stack(terms).mean(dim=0)


# ----------------------------------------------------------------------------- fused forms
# The training step computes the adversarial terms scale by scale with these. They compute what
# `generator_adv_loss`, `discriminator_loss` and `feature_matching_loss` compute (those stay
# the definitions, and the tests compare against them) in fewer passes over the feature maps,
# which are the largest tensors of the step: on a CPU and on a GPU alike the element-wise
# passes of the plain form (sub, abs, mean, and sgn, mul, neg, div in its backward) cost more
# than the discriminator's convolutions.


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 when it is in a lower precision (autocast), else as it is (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def hinge_real(logit: torch.Tensor) -> torch.Tensor:
    """mean(relu(1 - logit)) per item `[N]` (at least float32): the generator's hinge on a
    fake, the discriminator's on a real."""
    return per_item_mean(F.relu(1 - at_least_float32(logit)))


def hinge_fake(logit: torch.Tensor) -> torch.Tensor:
    """mean(relu(1 + logit)) per item `[N]` (at least float32): the discriminator's hinge on
    a fake."""
    return per_item_mean(F.relu(1 + at_least_float32(logit)))


def per_item_l1_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of |x| over all dimensions but the first, `[N]`, in one pass (any memory format)."""
    return torch.linalg.vector_norm(x, ord=1, dim=tuple(range(1, x.dim())))


def item_rows(x: torch.Tensor) -> torch.Tensor:
    """`x [N, ...]` as `[N, 1, M]` rows, a view when `x` is contiguous or channels-last."""
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()):
        x = x.permute(0, 2, 3, 1)  # NHWC in memory: this order is the contiguous one
    return x.reshape(x.shape[0], 1, -1)


def per_item_l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of |a - b| over all dimensions but the first, `[N]`.

    On a CPU one `cdist` pass reads both maps once and writes nothing (3x faster than
    subtracting into a new map and reducing it, at the full config's map sizes); on a GPU
    `cdist` runs one block per item, so the subtraction and a reduction are faster there.
    """
    same_layout = a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) and same_layout:
        return torch.cdist(item_rows(a), item_rows(b), p=1).view(-1)
    return per_item_l1_sum(a - b)


class _RelativeL1(torch.autograd.Function):
    """`sum|fake - real| * inv_norm` per item, with the gradient into `fake` only.

    Forward: one subtraction and one reduction, nothing kept but the two inputs (which the
    discriminator's graph and the caller keep anyway). Backward: `sign(fake - real) * g *
    inv_norm`, recomputed in place in one buffer, instead of autograd's chain of `abs`,
    `sub`, `mean` and `div` backwards (each a pass over the map and a new buffer).
    """

    @staticmethod
    def forward(ctx, fake: torch.Tensor, real: torch.Tensor,
                inv_norm: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(fake, real, inv_norm)
        return at_least_float32(per_item_l1_distance(fake, real)) * inv_norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        fake, real, inv_norm = ctx.saved_tensors
        coefficient = (grad * inv_norm).to(fake.dtype).view(-1, *([1] * (fake.dim() - 1)))
        return torch.sub(fake, real).sign_().mul_(coefficient), None, None


def relative_l1(fake: torch.Tensor, real: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """One layer's relative feature-matching term, `L1(real, fake) / mean(|real|)` per item
    `[N]` (at least float32), with a gradient into `fake` only: the real side is a target, and its
    normaliser is computed once, without a graph."""
    count = real[0].numel()
    with torch.no_grad():
        inv_norm = 1.0 / (count * (at_least_float32(per_item_l1_sum(real)) / count).clamp_min(eps))
    return _RelativeL1.apply(fake, real.detach(), inv_norm)


class GeneratorLoss(nn.Module):
    """All per-item generator losses of one step and their weights.

    `forward` returns unweighted per-item losses; `weights` holds their weights (the same
    dict the balancer uses) and `commit_weight` the weight of the model's commitment loss,
    which the engine applies.

    Args:
        weights (dict): Weight of each of 'l_t', 'l_f', 'l_g', 'l_feat'.
        commit_weight (float): Weight of the quantizer's commitment loss.
        sample_rate (int): Audio sample rate (for the mel loss).
    """

    def __init__(self, weights: tp.Mapping[str, float], commit_weight: float, sample_rate: int):
        super().__init__()
        missing = [name for name in GENERATOR_LOSS_NAMES if name not in weights]
        if missing:
            raise ValueError(f"GeneratorLoss: missing config keys "
                             f"{', '.join('losses.' + name for name in missing)}")
        self.weights = {name: float(weights[name]) for name in GENERATOR_LOSS_NAMES}
        self.commit_weight = float(commit_weight)
        self.mel_loss = MelLoss(int(sample_rate))

    @classmethod
    def from_config(cls, losses_cfg: tp.Any, sample_rate: int) -> "GeneratorLoss":
        """Build from the `losses` config group (weights `l_t`, `l_f`, `l_g`, `l_feat`,
        `commit`); `sample_rate` is `model.sample_rate`."""
        weights = {name: losses_cfg[name] for name in GENERATOR_LOSS_NAMES if name in losses_cfg}
        return cls(weights, commit_weight=losses_cfg.commit, sample_rate=sample_rate)

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                logits_fake: list[torch.Tensor] | None = None,
                fmaps_real: list[list[torch.Tensor]] | None = None,
                fmaps_fake: list[list[torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """Per-item losses `[N]` between the input `x` and the reconstruction `y`.

        'l_t' and 'l_f' are always present. 'l_g' is present when `logits_fake` is given and
        'l_feat' when both feature-map lists are given; with the discriminator disabled (or
        before it starts) they are absent rather than zero, so that neither the weighted sum
        nor the balancer sees a loss without a gradient.
        """
        losses = {'l_t': time_loss(x, y), 'l_f': self.mel_loss(x, y)}
        if logits_fake is not None:
            losses['l_g'] = generator_adv_loss(logits_fake)
        if (fmaps_real is None) != (fmaps_fake is None):
            raise ValueError("GeneratorLoss: pass both fmaps_real and fmaps_fake, or neither")
        if fmaps_real is not None:
            losses['l_feat'] = feature_matching_loss(fmaps_real, fmaps_fake)
        return losses

    def weighted_sum(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of weight * loss over the losses present (per item if the losses are)."""
        return sum(self.weights[name] * value for name, value in losses.items())
