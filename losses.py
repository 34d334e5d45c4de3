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

    For each window 2^i, i in [min_exp, max_exp] (hop = window / 4, `n_mels` bins), the loss is
    the L1 distance of the mel magnitudes plus the squared distance of their logs; the result
    is averaged over scales. The transforms are built once here and run in float32 even under
    autocast.

    Args:
        sample_rate (int): Audio sample rate.
        n_mels (int): Number of mel bins per scale.
        min_exp (int): Exponent of the smallest window.
        max_exp (int): Exponent of the largest window (inclusive).
        log_eps (float): Floor of the mel magnitudes before the log, so that silent bins do
            not dominate the L2 term.
    """

    def __init__(self, sample_rate: int, n_mels: int = 64, min_exp: int = 5, max_exp: int = 11,
                 log_eps: float = 1e-5):
        super().__init__()
        if min_exp > max_exp:
            raise ValueError(f"MelLoss: min_exp ({min_exp}) must not exceed max_exp ({max_exp})")
        self.log_eps = log_eps
        self.max_window = 2 ** max_exp
        with warnings.catch_warnings():
            # Small windows have fewer FFT bins than mel bins, so some filters are empty by
            # design (EnCodec's setting); they contribute 0 to the loss.
            warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero",
                                    category=UserWarning)
            self.transforms = nn.ModuleList([
                torchaudio.transforms.MelSpectrogram(
                    sample_rate=sample_rate, n_fft=2 ** i, win_length=2 ** i,
                    hop_length=2 ** i // 4, n_mels=n_mels, power=1.0)
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
                log_x = mel_x.clamp_min(self.log_eps).log()
                log_y = mel_y.clamp_min(self.log_eps).log()
                loss = loss + per_item_mean((mel_x - mel_y).abs()) + per_item_mean((log_x - log_y) ** 2)
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


class GeneratorLoss(nn.Module):
    """All per-item generator losses of one step, built from the whole training config.

    Reads `model.sample_rate` and the weights `losses.{l_t, l_f, l_g, l_feat, commit}`.
    `forward` returns unweighted per-item losses; `weights` holds their weights (the same
    dict the balancer uses) and `commit_weight` the weight of the model's commitment loss,
    which the engine applies.

    Args:
        cfg: The whole training config (Hydra / OmegaConf or anything with the same keys).
    """

    def __init__(self, cfg: tp.Any):
        super().__init__()
        missing = [name for name in GENERATOR_LOSS_NAMES if name not in cfg.losses]
        if missing:
            raise ValueError(f"GeneratorLoss: missing config keys "
                             f"{', '.join('losses.' + name for name in missing)}")
        self.weights = {name: float(cfg.losses[name]) for name in GENERATOR_LOSS_NAMES}
        self.commit_weight = float(cfg.losses.get('commit', 1.0))
        self.mel_loss = MelLoss(int(cfg.model.sample_rate))

    @classmethod
    def from_config(cls, cfg: tp.Any) -> "GeneratorLoss":
        """Same as `GeneratorLoss(cfg)`, for symmetry with the other modules."""
        return cls(cfg)

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
