"""Pairwise losses across channel views of the same segment.

The content codebook (default: codebook 1, index 0) should give the same embeddings for two
channels of one segment (similarity loss), the channel codebook (default: codebook 2, index 1)
should give different ones (diversity loss). Embeddings are the per-codebook quantizer
outputs `[B, D, F]` of `EncodecOutput.embeddings`.

Sign convention: every loss here is minimised. With `div_kind='neg_mse'` (the design
document's default) `l_div` is the NEGATIVE mean squared distance between the channel-codebook
embeddings, so `l_div` is <= 0 and a decreasing (more negative) `l_div` means the embeddings of
the two channels are moving apart. `neg_mse` is unbounded below; `margin` (relu(margin - mse),
>= 0, zero once the views are `margin` apart) and `cosine` (cosine similarity, in [-1, 1]) are
bounded alternatives.
"""
from __future__ import annotations

import itertools
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

SIM_KINDS = ('mse', 'cosine')
DIV_KINDS = ('neg_mse', 'cosine', 'margin')
SCHEDULES = ('constant', 'linear')

View = tp.Sequence[torch.Tensor]  # per-codebook embeddings [B, D, F] of one channel view


def reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == 'mean':
        return per_item.mean()
    if reduction == 'none':
        return per_item
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def mse_per_item(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over `D` and `F`: `[B, D, F] -> [B]`."""
    return ((a - b) ** 2).flatten(1).mean(dim=1)


def cosine_per_item(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over `D`, averaged over frames: `[B, D, F] -> [B]`."""
    return F.cosine_similarity(a, b, dim=1).mean(dim=1)


def check_embeddings(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(f"pairwise losses expect two embeddings of the same shape [B, D, F], "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def similarity_loss(a: torch.Tensor, b: torch.Tensor, kind: str = 'mse',
                    reduction: str = 'mean') -> torch.Tensor:
    """Loss that is 0 when the embeddings `a` and `b` (`[B, D, F]`) agree.

    Args:
        a, b (torch.Tensor): Embeddings of two views, `[B, D, F]`.
        kind (str): 'mse' (mean squared difference) or 'cosine' (1 - cosine similarity over
            `D`, averaged over frames, in [0, 2]).
        reduction (str): 'mean' (scalar) or 'none' (`[B]`).
    """
    check_embeddings(a, b)
    if kind == 'mse':
        per_item = mse_per_item(a, b)
    elif kind == 'cosine':
        per_item = 1 - cosine_per_item(a, b)
    else:
        raise ValueError(f"unknown similarity kind {kind!r} (pairwise.sim_kind): use one of {SIM_KINDS}")
    return reduce(per_item, reduction)


def diversity_loss(a: torch.Tensor, b: torch.Tensor, kind: str = 'neg_mse', margin: float = 1.0,
                   reduction: str = 'mean') -> torch.Tensor:
    """Loss that decreases as the embeddings `a` and `b` (`[B, D, F]`) move apart.

    Args:
        a, b (torch.Tensor): Embeddings of two views, `[B, D, F]`.
        kind (str): 'neg_mse' (-mse, <= 0, unbounded below: more negative = further apart),
            'cosine' (cosine similarity over `D` averaged over frames, in [-1, 1]) or 'margin'
            (relu(margin - mse) per item: >= 0, and zero with zero gradient once the views
            are at least `margin` apart in mean squared distance).
        margin (float): Target mean squared distance for 'margin'.
        reduction (str): 'mean' (scalar) or 'none' (`[B]`).
    """
    check_embeddings(a, b)
    if kind == 'neg_mse':
        per_item = -mse_per_item(a, b)
    elif kind == 'cosine':
        per_item = cosine_per_item(a, b)
    elif kind == 'margin':
        per_item = F.relu(margin - mse_per_item(a, b))
    else:
        raise ValueError(f"unknown diversity kind {kind!r} (pairwise.div_kind): use one of {DIV_KINDS}")
    return reduce(per_item, reduction)


def check_views(views: tp.Sequence[View], content_codebook: int, channel_codebook: int) -> None:
    """Raise a clear error unless `views` are >= 2 lists of per-codebook `[B, D, F]` tensors
    that hold both codebook indices."""
    if len(views) < 2:
        raise ValueError(f"pairwise losses need at least 2 channel views, got {len(views)} "
                         "(datasets.views must be >= 2 for the pairwise losses)")
    for view in views:
        if isinstance(view, torch.Tensor) and view.dim() != 4:
            raise ValueError("each view must be a list of per-codebook embeddings [B, D, F] "
                             f"(or one [n_q, B, D, F] tensor), got a tensor {tuple(view.shape)}")
        for name, index in (('content_codebook', content_codebook),
                            ('channel_codebook', channel_codebook)):
            if not 0 <= index < len(view):
                raise ValueError(f"pairwise.{name}={index} is out of range for embeddings of "
                                 f"{len(view)} codebook(s): use an index below model.n_q")


def pairwise_terms(views: tp.Sequence[View], sim_kind: str = 'mse', div_kind: str = 'neg_mse',
                   margin: float = 1.0, content_codebook: int = 0,
                   channel_codebook: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted per-item similarity and diversity `[B]`, averaged over all unordered pairs
    of views."""
    check_views(views, content_codebook, channel_codebook)
    pairs = list(itertools.combinations(views, 2))
    sim = sum(similarity_loss(u[content_codebook], v[content_codebook], sim_kind, 'none')
              for u, v in pairs) / len(pairs)
    div = sum(diversity_loss(u[channel_codebook], v[channel_codebook], div_kind, margin, 'none')
              for u, v in pairs) / len(pairs)
    return sim, div


def pairwise_losses(*views: View, sim_weight: float = 0.5, div_weight: float = 0.5,
                    sim_kind: str = 'mse', div_kind: str = 'neg_mse', margin: float = 1.0,
                    content_codebook: int = 0, channel_codebook: int = 1,
                    sim_item_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Weighted similarity and diversity losses across K >= 2 channel views.

    `pairwise_losses(emb1, emb2, sim_weight=.5, div_weight=.5)` is the design document's
    two-channel call; with K views the losses are averaged over the K(K-1)/2 pairs.

    Args:
        *views: Per-codebook embeddings `[B, D, F]` of each view (a list, or `[n_q, B, D, F]`).
        sim_weight, div_weight (float): Weights of the two losses.
        sim_kind, div_kind, margin: See `similarity_loss` / `diversity_loss`.
        content_codebook (int): Codebook index whose embeddings should agree across views.
        channel_codebook (int): Codebook index whose embeddings should differ across views.
        sim_item_weights (torch.Tensor, optional): `[B]` multipliers of the per-item similarity.
    Returns:
        dict: 'l_sim' and 'l_div', weighted scalars (see the module docstring for the sign).
    """
    sim, div = pairwise_terms(views, sim_kind, div_kind, margin, content_codebook,
                              channel_codebook)
    if sim_item_weights is not None:
        sim = sim * sim_item_weights.to(sim)
    return {'l_sim': sim_weight * sim.mean(), 'l_div': div_weight * div.mean()}


def split_views(embeddings: tp.Sequence[torch.Tensor], num_views: int) -> list[list[torch.Tensor]]:
    """Turn per-codebook embeddings of one generator pass on `[B*V, ...]` (view-major inside an
    item: index b*V + v) into V views, each a list of per-codebook `[B, D, F]`."""
    per_codebook = []
    for emb in embeddings:
        if emb.shape[0] % num_views:
            raise ValueError(f"embeddings batch {emb.shape[0]} is not a multiple of "
                             f"{num_views} views (datasets.views)")
        per_codebook.append(emb.unflatten(0, (-1, num_views)))
    return [[emb[:, v] for emb in per_codebook] for v in range(num_views)]


class ChannelClassifier(nn.Module):
    """Auxiliary head: time-pooled channel-codebook embedding -> channel-index logits."""

    def __init__(self, dimension: int, num_channels: int):
        super().__init__()
        self.num_channels = num_channels
        self.linear = nn.Linear(dimension, num_channels)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """`[B, D, F] -> [B, num_channels]` logits."""
        return self.linear(emb.mean(dim=-1))


class PairwiseLoss(nn.Module):
    """Scheduled, class-weighted pairwise losses plus an optional channel classifier.

    The schedule scales `sim_weight` and `div_weight` (not the classifier, which has its own
    weight): 'constant' uses them as they are, 'linear' ramps them from 0 at step 0 to their
    full value at `ramp_steps`. `class_weights` multiplies the per-item similarity by a factor
    per scene class (classes not listed: 1.0). The channel classifier's parameters belong to
    this module: the engine adds them to the generator optimizer.

    Args:
        sim_weight, div_weight (float): Weights of the similarity and diversity losses.
        sim_kind, div_kind, margin: See `similarity_loss` / `diversity_loss`.
        content_codebook, channel_codebook (int): Codebook indices (see `pairwise_losses`).
        schedule (str): 'constant' or 'linear'.
        ramp_steps (int): Length of the linear ramp in optimizer steps.
        class_weights (dict, optional): Similarity multiplier per scene class name.
        channel_classifier (bool): Add the auxiliary channel-classifier head.
        classifier_weight (float): Weight of the classifier cross-entropy.
        num_channels (int): Number of channel indices the head tells apart.
        dimension (int, optional): Embedding dimension (`model.dimension`), needed by the head.
    """

    def __init__(self, sim_weight: float = 0.5, div_weight: float = 0.5, sim_kind: str = 'mse',
                 div_kind: str = 'neg_mse', margin: float = 1.0, content_codebook: int = 0,
                 channel_codebook: int = 1, schedule: str = 'constant', ramp_steps: int = 0,
                 class_weights: dict[str, float] | None = None, channel_classifier: bool = False,
                 classifier_weight: float = 0.1,
                 num_channels: int = 32, dimension: int | None = None):
        super().__init__()
        if sim_kind not in SIM_KINDS:
            raise ValueError(f"pairwise.sim_kind={sim_kind!r}: use one of {SIM_KINDS}")
        if div_kind not in DIV_KINDS:
            raise ValueError(f"pairwise.div_kind={div_kind!r}: use one of {DIV_KINDS}")
        if content_codebook == channel_codebook:
            raise ValueError(f"pairwise.content_codebook and pairwise.channel_codebook must differ "
                             f"(both {content_codebook}): the losses would pull one codebook both "
                             "ways")
        if div_kind == 'margin' and margin <= 0:
            raise ValueError(f"pairwise.margin must be > 0 for div_kind=margin, got {margin}")
        if schedule not in SCHEDULES:
            raise ValueError(f"pairwise.schedule={schedule!r}: use one of {SCHEDULES}")
        if schedule == 'linear' and ramp_steps <= 0:
            raise ValueError(f"pairwise.schedule=linear needs pairwise.ramp_steps > 0, "
                             f"got {ramp_steps}")
        self.sim_weight = float(sim_weight)
        self.div_weight = float(div_weight)
        self.sim_kind = sim_kind
        self.div_kind = div_kind
        self.margin = float(margin)
        self.content_codebook = int(content_codebook)
        self.channel_codebook = int(channel_codebook)
        self.schedule = schedule
        self.ramp_steps = int(ramp_steps)
        self.class_weights = {str(k): float(v) for k, v in (class_weights or {}).items()}
        self.classifier_weight = float(classifier_weight)
        self.classifier: ChannelClassifier | None = None
        if channel_classifier:
            if dimension is None:
                raise ValueError("pairwise.channel_classifier needs the embedding dimension: "
                                 "pass dimension=model.dimension")
            self.classifier = ChannelClassifier(int(dimension), int(num_channels))

    @classmethod
    def from_config(cls, pairwise_cfg: tp.Any, dimension: int | None = None) -> "PairwiseLoss":
        """Build from the `pairwise` config group; `dimension` is `model.dimension`."""
        head = pairwise_cfg.channel_classifier
        return cls(sim_weight=pairwise_cfg.sim_weight, div_weight=pairwise_cfg.div_weight,
                   sim_kind=pairwise_cfg.sim_kind, div_kind=pairwise_cfg.div_kind,
                   margin=pairwise_cfg.margin, content_codebook=pairwise_cfg.content_codebook,
                   channel_codebook=pairwise_cfg.channel_codebook, schedule=pairwise_cfg.schedule,
                   ramp_steps=pairwise_cfg.ramp_steps,
                   class_weights=dict(pairwise_cfg.class_weights or {}),
                   channel_classifier=bool(head.enabled), classifier_weight=float(head.weight),
                   num_channels=int(head.num_channels), dimension=dimension)

    def schedule_factor(self, step: int) -> float:
        """Multiplier of the similarity and diversity weights at optimizer step `step`."""
        if self.schedule == 'linear':
            return min(1.0, max(0, step) / self.ramp_steps)
        return 1.0

    def item_weights(self, classes: tp.Sequence[str], like: torch.Tensor) -> torch.Tensor:
        """Per-item similarity multipliers `[B]` from the scene class names."""
        return torch.tensor([self.class_weights.get(c, 1.0) for c in classes],
                            dtype=like.dtype, device=like.device)

    def classifier_loss(self, views: tp.Sequence[View], channels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the channel index `channels [B, V]` from each view's channel-codebook
        embedding, averaged over items and views."""
        assert self.classifier is not None
        if channels.dim() != 2 or channels.shape[1] != len(views):
            raise ValueError(f"channels must be [B, V={len(views)}], got {tuple(channels.shape)}")
        # The bound check needs the values on the host; the collated metas are there already.
        if channels.device.type == 'cpu' and channels.numel() and (
                channels.min() < 0 or channels.max() >= self.classifier.num_channels):
            raise ValueError(f"channel index {int(channels.max())} out of range for "
                             f"pairwise.channel_classifier.num_channels="
                             f"{self.classifier.num_channels}")
        emb = torch.stack([view[self.channel_codebook] for view in views], dim=1)  # [B, V, D, F]
        logits = self.classifier(emb.flatten(0, 1))
        return F.cross_entropy(logits, channels.flatten().to(logits.device))

    def forward(self, views: tp.Sequence[View], step: int,
                classes: tp.Sequence[str] | None = None,
                channels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Pairwise losses of V >= 2 views (each a list of per-codebook `[B, D, F]`).

        Returns a dict with the weighted scalars 'l_sim', 'l_div' (and 'l_cls' when the
        classifier is on) to add to the generator loss, and the unweighted, detached 'sim',
        'div' (and 'cls') for logging. With div_kind='neg_mse', 'div' <= 0 and decreasing
        means the channel-codebook embeddings move apart.
        """
        sim, div = pairwise_terms(views, self.sim_kind, self.div_kind, self.margin,
                                  self.content_codebook, self.channel_codebook)
        weighted_sim = sim
        if classes is not None and self.class_weights:
            if len(classes) != sim.shape[0]:
                raise ValueError(f"got {len(classes)} classes for a batch of {sim.shape[0]}")
            weighted_sim = sim * self.item_weights(classes, sim)
        factor = self.schedule_factor(step)
        out = {'l_sim': factor * self.sim_weight * weighted_sim.mean(),
               'l_div': factor * self.div_weight * div.mean(),
               'sim': sim.mean().detach(), 'div': div.mean().detach()}
        if self.classifier is not None:
            if channels is None:
                raise ValueError("pairwise.channel_classifier.enabled needs the channel indices "
                                 "of each view (channels [B, V])")
            cls_loss = self.classifier_loss(views, channels)
            out['l_cls'] = self.classifier_weight * cls_loss
            out['cls'] = cls_loss.detach()
        return out
