"""The pairwise objective's learned heads: the level-difference head (and the gradient
reversal of its twin) and the channel-index classifier, with the level-difference loss."""
from __future__ import annotations

import itertools

import torch
from torch import nn

class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; the backward multiplies the gradient by `-scale` (Ganin & Lempitsky's
    gradient reversal layer). A predictor behind it learns to predict, while what feeds it
    learns to make the prediction fail."""
    return _GradientReversal.apply(x, scale)


class LevelDifferenceHead(nn.Module):
    """Predicts the per-band inter-channel level difference (dB) of two views from their
    time-pooled embeddings of one codebook.

    Each view is pooled over time into its mean and mean absolute deviation (the deviation
    stays differentiable when a codebook uses one code for a whole segment; a std would give
    NaN gradients there). Both views' features are RMS-normalised TOGETHER: the head ignores
    the embeddings' overall scale (codebook 2 can start 300 times smaller than the latent)
    but keeps the relative size of A and B. The prediction is antisymmetric by construction,
    `head(A, B) = -head(B, A)`, as the level difference is.

    Args:
        dimension (int): Embedding dimension `D`.
        n_bands (int): Bands of the level difference.
        hidden (int): Width of the hidden layer.
    """

    def __init__(self, dimension: int, n_bands: int = 8, hidden: int = 128):
        super().__init__()
        self.n_bands = n_bands
        self.mlp = nn.Sequential(nn.Linear(4 * dimension, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_bands))

    @staticmethod
    def pool(emb: torch.Tensor) -> torch.Tensor:
        """`[B, D, F] -> [B, 2D]`: time mean and mean absolute deviation."""
        mean = emb.mean(dim=-1, keepdim=True)
        return torch.cat([mean.squeeze(-1), (emb - mean).abs().mean(dim=-1)], dim=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Level of `a` minus level of `b`, `[B, n_bands]` dB, from embeddings `[B, D, F]`."""
        dtype = self.mlp[0].weight.dtype  # the head's own precision, whatever the autocast
        with torch.autocast(a.device.type, enabled=False):
            features = torch.cat([self.pool(a.to(dtype)), self.pool(b.to(dtype))], dim=1)
            features = features * torch.rsqrt(features.pow(2).mean(dim=1, keepdim=True) + 1e-20)
            swapped = features.roll(features.shape[1] // 2, dims=1)  # (b, a)
            return (self.mlp(features) - self.mlp(swapped)) / 2


def level_difference_loss(prediction: torch.Tensor, target: torch.Tensor,
                          floor_db: float = 0.5) -> torch.Tensor:
    """Squared error of a predicted level difference relative to predicting none.

    `mean((prediction - target)^2) / max(mean(target^2), floor_db^2)`: 1 for a head that
    predicts no difference, 0 for a perfect one, whatever the scale of the differences (about
    1 dB per band between far-apart em32 capsules on synthetic scenes, up to 10 dB on real
    recordings above 4 kHz), so a weight of 0.1-1 means the same everywhere. The floor keeps
    nearly identical channels from dividing by ~0.
    """
    target = target.to(prediction)
    scale = target.pow(2).mean().clamp_min(floor_db ** 2)
    return (prediction - target).pow(2).mean() / scale


def level_difference_pairs(targets: torch.Tensor, num_views: int, n_bands: int) -> torch.Tensor:
    """Level differences `[B, P, n_bands]` for the unordered view pairs (i < j, as
    `view_pairs`), level of i minus level of j, from the caller's `targets`: `[B, n_bands]`
    (two views: level of view 0 minus view 1) or per-view levels `[B, V, n_bands]`."""
    if targets.dim() == 2 and num_views == 2 and targets.shape[1] == n_bands:
        return targets[:, None]
    if targets.dim() == 3 and targets.shape[1:] == (num_views, n_bands):
        i, j = zip(*itertools.combinations(range(num_views), 2))
        return targets[:, list(i)] - targets[:, list(j)]
    raise ValueError(f"ild_targets must be [B, {n_bands}] dB (two views: level of view 0 minus "
                     f"view 1) or per-view levels [B, V={num_views}, {n_bands}] dB "
                     f"(pairwise.ild_head.n_bands={n_bands}), got {tuple(targets.shape)}")


class ChannelClassifier(nn.Module):
    """Auxiliary head: time-pooled channel-codebook embedding -> channel-index logits."""

    def __init__(self, dimension: int, num_channels: int):
        super().__init__()
        self.num_channels = num_channels
        self.linear = nn.Linear(dimension, num_channels)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """`[B, D, F] -> [B, num_channels]` logits."""
        return self.linear(emb.mean(dim=-1))
