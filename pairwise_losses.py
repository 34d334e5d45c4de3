"""Pairwise objective across channel views of the same segment.

The content codebook (default: codebook 1, index 0) should give the same embeddings for the
channels of one segment (similarity term), the channel codebook (default: codebook 2,
index 1) should carry what differs between them (diversity term, cross-reconstruction, and
the optional level-difference head). Embeddings are the per-codebook quantizer outputs
`[B, D, F]` of `EncodecOutput.embeddings`; a view is one channel's list of them.

Two recipes are selected with the Hydra config group `pairwise=` (config/pairwise/):
- `seed`: the design document's recipe, MSE similarity on codebook 1 and negative-MSE
  diversity on codebook 2. Both depend on the embeddings' scale, and the similarity is won
  by a constant codebook 1 (collapse).
- `contrastive`: scale-free and collapse-proof terms. InfoNCE on codebook 1 (positives: the
  channels of one segment; negatives: the other segments of the global batch), normalised
  by log(number of candidates) so that a collapsed codebook scores 1 (chance) and a perfect
  one 0; a bounded cosine hinge on the centred codebook-2 embeddings; cross-reconstruction
  (`swap_latents`: content codebook of A + the other codebooks of B must decode to x_B).
  Optional terms, off in both recipes: code consensus (`code_consensus`: the views take the
  same content code) and invariance to a random channel-style change of a view
  (`PairwiseLoss.invariance_loss`).

Sign convention: every loss here is minimised. With `div_kind='neg_mse'` (the design
document's default) `l_div` is the NEGATIVE mean squared distance between the channel-codebook
embeddings, so `l_div` is <= 0 and a decreasing (more negative) `l_div` means the embeddings of
the two channels are moving apart. `neg_mse` is unbounded below; `margin` (relu(margin - mse),
>= 0, zero once the views are `margin` apart), `cosine` (cosine similarity, in [-1, 1]) and
`cos_hinge` (relu(cos - max_cosine) of the batch-centred embeddings, in [0, 1 - max_cosine],
scale-free) are bounded alternatives.
"""
from __future__ import annotations

import itertools
import math
import typing as tp
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from utils import distributed
from modules.quantization import nearest_code

SIM_KINDS = ('mse', 'cosine', 'infonce')
DIV_KINDS = ('neg_mse', 'cosine', 'margin', 'cos_hinge')
SCHEDULES = ('constant', 'linear')
NCE_POOLINGS = ('frame', 'mean')
# Weighted terms of `PairwiseLoss.forward` that the training step adds to the generator loss
# (each present only when its part is on); 'l_xrec' comes from `PairwiseLoss.xrec_loss`.
LOSS_TERMS = ('l_sim', 'l_div', 'l_cls', 'l_ild', 'l_ild_adv')

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


def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over `D` per frame, `[B, D, F] -> [B, F]`, of `a` and `b` after
    removing their common mean (over items, frames and both views).

    Why centred: the codebook vectors share a large common component, so the raw cosine of
    any two frames is near 1 and says little; the mean over both views is shared content, so
    removing it keeps what distinguishes the channels. Invariant to the embeddings' scale
    down to ~1e-12 (codebook 2 can start at an RMS of ~1e-4).
    """
    mean = torch.cat([a, b]).mean(dim=(0, 2), keepdim=True)
    a = F.normalize(a - mean, dim=1, eps=1e-12)
    b = F.normalize(b - mean, dim=1, eps=1e-12)
    return (a * b).sum(dim=1)


def check_embeddings(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(f"pairwise losses expect two embeddings of the same shape [B, D, F], "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


# ----------------------------------------------------------------------------------- InfoNCE

@dataclass
class InfoNCE:
    """Result of `info_nce`.

    Attributes:
        loss (torch.Tensor): `[B]` per item, both directions averaged, divided by
            log(number of candidates): ~1 at chance (a collapsed codebook), 0 at best.
        accuracy (torch.Tensor): Scalar, detached: fraction of anchors (items or frames, both
            directions) whose positive scores strictly above every negative.
    """
    loss: torch.Tensor
    accuracy: torch.Tensor


def nce_vectors(emb: torch.Tensor, pooling: str,
                projection: nn.Module | None = None) -> torch.Tensor:
    """Rows compared by InfoNCE: `[B, D, F] -> [B*F, D]` (row b*F + f) for 'frame',
    `[B, D]` (time mean) for 'mean'; then the optional projection."""
    if pooling == 'frame':
        rows = emb.transpose(1, 2).reshape(-1, emb.shape[1])
    elif pooling == 'mean':
        rows = emb.mean(dim=-1)
    else:
        raise ValueError(f"pairwise.nce_pooling={pooling!r}: use one of {NCE_POOLINGS}")
    return rows if projection is None else projection(rows)


def nce_rows(logits: torch.Tensor, positive: torch.Tensor, excluded: torch.Tensor | None,
             candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of the `positive` column divided by log(`candidates`), and
    per-row 'positive ranked first' flags. `excluded` `[n, m]` marks columns that are no
    candidates of their row (each row has `candidates` columns left)."""
    if excluded is not None:
        logits = logits.masked_fill(excluded, float('-inf'))
    positive_logit = logits.gather(1, positive[:, None]).squeeze(1)
    loss = (torch.logsumexp(logits, dim=1) - positive_logit) / math.log(candidates)
    negatives = logits.scatter(1, positive[:, None], float('-inf'))
    first = positive_logit.detach() > negatives.detach().max(dim=1).values
    return loss, first


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1, pooling: str = 'frame',
             center: bool = True, same_segment_negatives: bool = False,
             gather: bool | None = None, projection: nn.Module | None = None) -> InfoNCE:
    """Symmetric InfoNCE between two channel views `a`, `b` (`[B, D, F]`) of the same segments.

    The anchor `a[i]` (a frame, or the time mean of item i) must pick `b[i]` out of the other
    view's rows of the GLOBAL batch (and `b[i]` must pick `a[i]`: both directions averaged).
    Rows are optionally projected, centred (the mean of both views' global rows removed: the
    codebook vectors share a large common component that would make every cosine ~1) and
    L2-normalised, so the loss ignores the embeddings' scale. The loss of each anchor is
    divided by log(number of candidates): a collapsed codebook (all rows equal) gives exactly
    1, whatever the batch size, and a perfect one tends to 0 as the temperature falls.

    Per frame, the candidates of frame f of segment i are frame f of the other view of the
    same segment (positive) and every frame of the OTHER segments. Other frames of the same
    segment are not negatives by default: in the stationary scenes of a soundscape two frames
    13 ms apart carry nearly the same content, and pushing them apart would make codebook 1
    encode frame-to-frame detail, much of which (diffuse noise) differs between capsules: the
    opposite of channel invariance. `same_segment_negatives=True` makes them negatives.

    Under DDP (and with `gather`), each rank's anchors are compared against every rank's rows
    through `distributed.all_gather_with_grad`; with DDP's gradient averaging the gradient
    equals that of the single-process loss on the concatenated batch. `gather=None` gathers
    only when gradients are enabled: validation runs under no_grad, sharded over ranks with
    possibly unequal batch counts, where a collective could wait forever.

    Args:
        a, b (torch.Tensor): Content-codebook embeddings of two views, `[B, D, F]`.
        temperature (float): Softmax temperature on the cosine similarities.
        pooling (str): 'frame' (every frame an anchor) or 'mean' (time-pooled items).
        center (bool): Remove the common mean before normalising.
        same_segment_negatives (bool): Per frame, other frames of the segment are negatives.
        gather (bool, optional): Negatives from all ranks (default: when grad is enabled).
        projection (nn.Module, optional): Applied to each row before centring.
    Returns:
        InfoNCE: per-item normalised loss `[B]` and the ranked-first accuracy.
    """
    check_embeddings(a, b)
    if temperature <= 0:
        raise ValueError(f"pairwise.temperature must be > 0, got {temperature}")
    if gather is None:
        gather = torch.is_grad_enabled()
    batch, _, frames = a.shape
    per_segment = frames if pooling == 'frame' else 1
    # bf16 logits at temperature 0.1 keep ~2 significant digits: compute in float32.
    with torch.autocast(a.device.type, enabled=False):
        rows_a = nce_vectors(a.float(), pooling, projection)
        rows_b = nce_vectors(b.float(), pooling, projection)
        if gather:
            all_a, offset = distributed.all_gather_with_grad(rows_a)
            all_b, _ = distributed.all_gather_with_grad(rows_b)
        else:
            all_a, all_b, offset = rows_a, rows_b, 0
        if center:
            mean = torch.cat([all_a, all_b]).mean(dim=0)
            rows_a, rows_b, all_a, all_b = (z - mean for z in (rows_a, rows_b, all_a, all_b))
        rows_a, rows_b, all_a, all_b = (F.normalize(z, dim=1, eps=1e-12)
                                        for z in (rows_a, rows_b, all_a, all_b))
        n, m = rows_a.shape[0], all_a.shape[0]
        positive = offset + torch.arange(n, device=a.device)
        excluded, candidates = None, m
        if per_segment > 1 and not same_segment_negatives:
            columns = torch.arange(m, device=a.device)
            same_segment = (positive[:, None] // per_segment) == (columns[None, :] // per_segment)
            excluded = same_segment & (columns[None, :] != positive[:, None])
            candidates = m - (per_segment - 1)
        if candidates < 2:
            raise ValueError("InfoNCE needs at least one negative per anchor: use a batch of >= 2 "
                             "segments (datasets.batch_size), or several frames with "
                             "pairwise.nce_same_segment_negatives=true")
        loss_ab, first_ab = nce_rows(rows_a @ all_b.T / temperature, positive, excluded,
                                     candidates)
        loss_ba, first_ba = nce_rows(rows_b @ all_a.T / temperature, positive, excluded,
                                     candidates)
    loss = ((loss_ab + loss_ba) / 2).view(batch, per_segment).mean(dim=1)
    accuracy = torch.cat([first_ab, first_ba]).float().mean()
    return InfoNCE(loss, accuracy)


# -------------------------------------------------------------------- similarity / diversity

def similarity_loss(a: torch.Tensor, b: torch.Tensor, kind: str = 'mse',
                    reduction: str = 'mean', **nce_options: tp.Any) -> torch.Tensor:
    """Loss that is smallest when the embeddings `a` and `b` (`[B, D, F]`) agree.

    Args:
        a, b (torch.Tensor): Embeddings of two views, `[B, D, F]`.
        kind (str): 'mse' (mean squared difference), 'cosine' (1 - cosine similarity over
            `D`, averaged over frames, in [0, 2]) or 'infonce' (normalised InfoNCE across the
            batch, ~1 at chance, 0 at best; see `info_nce`).
        reduction (str): 'mean' (scalar) or 'none' (`[B]`).
        **nce_options: Keyword arguments of `info_nce` (only for 'infonce').
    """
    check_embeddings(a, b)
    if kind == 'mse':
        per_item = mse_per_item(a, b)
    elif kind == 'cosine':
        per_item = 1 - cosine_per_item(a, b)
    elif kind == 'infonce':
        per_item = info_nce(a, b, **nce_options).loss
    else:
        raise ValueError(f"unknown similarity kind {kind!r} (pairwise.sim_kind): use one of {SIM_KINDS}")
    return reduce(per_item, reduction)


def diversity_loss(a: torch.Tensor, b: torch.Tensor, kind: str = 'neg_mse', margin: float = 1.0,
                   reduction: str = 'mean', max_cosine: float = 0.0) -> torch.Tensor:
    """Loss that decreases as the embeddings `a` and `b` (`[B, D, F]`) move apart.

    Args:
        a, b (torch.Tensor): Embeddings of two views, `[B, D, F]`.
        kind (str): 'neg_mse' (-mse, <= 0, unbounded below: more negative = further apart),
            'cosine' (cosine similarity over `D` averaged over frames, in [-1, 1]), 'margin'
            (relu(margin - mse) per item: >= 0, and zero with zero gradient once the views
            are at least `margin` apart in mean squared distance) or 'cos_hinge'
            (relu(cos - max_cosine) per frame of the batch-centred embeddings, averaged over
            frames: in [0, 1 - max_cosine], scale-free, zero once the views are at most
            `max_cosine` alike; see `centred_cosine`).
        margin (float): Target mean squared distance for 'margin'.
        reduction (str): 'mean' (scalar) or 'none' (`[B]`).
        max_cosine (float): Largest centred cosine 'cos_hinge' accepts without loss.
    """
    check_embeddings(a, b)
    if kind == 'neg_mse':
        per_item = -mse_per_item(a, b)
    elif kind == 'cosine':
        per_item = cosine_per_item(a, b)
    elif kind == 'margin':
        per_item = F.relu(margin - mse_per_item(a, b))
    elif kind == 'cos_hinge':
        per_item = F.relu(centred_cosine(a, b) - max_cosine).mean(dim=1)
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


def view_pairs(views: tp.Sequence[View]) -> list[tuple[int, int]]:
    """The K(K-1)/2 unordered pairs (i < j) of view indices, in `itertools.combinations`
    order: every pairwise term is averaged over them."""
    return list(itertools.combinations(range(len(views)), 2))


def pairwise_terms(views: tp.Sequence[View], sim_kind: str = 'mse', div_kind: str = 'neg_mse',
                   margin: float = 1.0, content_codebook: int = 0, channel_codebook: int = 1,
                   max_cosine: float = 0.0,
                   nce_options: dict[str, tp.Any] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted per-item similarity and diversity `[B]`, averaged over all unordered pairs
    of views. `nce_options` are keyword arguments of `info_nce` (sim_kind='infonce')."""
    check_views(views, content_codebook, channel_codebook)
    pairs = view_pairs(views)
    sim = sum(similarity_loss(views[i][content_codebook], views[j][content_codebook], sim_kind,
                              'none', **(nce_options or {}))
              for i, j in pairs) / len(pairs)
    div = sum(diversity_loss(views[i][channel_codebook], views[j][channel_codebook], div_kind,
                             margin, 'none', max_cosine)
              for i, j in pairs) / len(pairs)
    return sim, div


def pairwise_losses(*views: View, sim_weight: float = 0.5, div_weight: float = 0.5,
                    sim_kind: str = 'mse', div_kind: str = 'neg_mse', margin: float = 1.0,
                    content_codebook: int = 0, channel_codebook: int = 1,
                    sim_item_weights: torch.Tensor | None = None, max_cosine: float = 0.0,
                    nce_options: dict[str, tp.Any] | None = None) -> dict[str, torch.Tensor]:
    """Weighted similarity and diversity losses across K >= 2 channel views.

    `pairwise_losses(emb1, emb2, sim_weight=.5, div_weight=.5)` is the design document's
    two-channel call; with K views the losses are averaged over the K(K-1)/2 pairs.

    Args:
        *views: Per-codebook embeddings `[B, D, F]` of each view (a list, or `[n_q, B, D, F]`).
        sim_weight, div_weight (float): Weights of the two losses.
        sim_kind, div_kind, margin, max_cosine: See `similarity_loss` / `diversity_loss`.
        content_codebook (int): Codebook index whose embeddings should agree across views.
        channel_codebook (int): Codebook index whose embeddings should differ across views.
        sim_item_weights (torch.Tensor, optional): `[B]` multipliers of the per-item similarity.
        nce_options (dict, optional): Keyword arguments of `info_nce` for sim_kind='infonce'.
    Returns:
        dict: 'l_sim' and 'l_div', weighted scalars (see the module docstring for the sign).
    """
    sim, div = pairwise_terms(views, sim_kind, div_kind, margin, content_codebook,
                              channel_codebook, max_cosine, nce_options)
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


# --------------------------------------------------------------------------- code consensus

@dataclass
class Consensus:
    """Result of `code_consensus`.

    Attributes:
        loss (torch.Tensor): `[B]` per item: the mean over frames and both views of the
            normalised margin by which a view's own code beats the pair's consensus code
            (0 where the view already takes it, 1 for a view sitting on its own code).
        agreement (torch.Tensor): Scalar, detached: fraction of frames where both views
            take the same code.
    """
    loss: torch.Tensor
    agreement: torch.Tensor


def code_consensus(a: torch.Tensor, b: torch.Tensor, embed: torch.Tensor) -> Consensus:
    """How far two views' vectors `a`, `b` `[B, D, F]` (what a codebook quantizes) are from
    choosing the same code of `embed` `[K, D]` in each frame.

    The consensus code of a frame is the code nearest to the mean of the two views. A view
    whose own nearest code is another one pays the margin of the nearest-code decision,
    `|x - e_consensus|^2 - |x - e_own|^2` (>= 0, 0 on the boundary between the two cells),
    divided by `|e_own - e_consensus|^2`: 1 for a vector on its own code, whatever the
    codebook's scale. Its gradient moves the vector straight toward the consensus cell and
    stops once it is inside: unlike a similarity of embeddings it asks for the same code, not
    for nearby ones, and unlike a commitment it does not pull the vector to the code's centre,
    so what differs between the views can stay in the residual that the next codebook
    quantizes. It is not collapse-proof on its own (one code for everything costs 0): it
    goes with InfoNCE, which a collapsed codebook loses.
    """
    check_embeddings(a, b)
    with torch.autocast(a.device.type, enabled=False):
        dim = a.shape[1]
        rows = [v.float().transpose(1, 2).reshape(-1, dim) for v in (a, b)]
        codes = embed.detach().float()
        consensus = nearest_code(((rows[0] + rows[1]) / 2).detach(), codes)
        target = codes[consensus]
        per_view, own_codes = [], []
        for x in rows:
            own = nearest_code(x.detach(), codes)
            mine = codes[own]
            margin = (x - target).pow(2).sum(1) - (x - mine).pow(2).sum(1)
            spread = (mine - target).pow(2).sum(1)
            per_view.append(torch.where(own == consensus, torch.zeros_like(margin),
                                        margin.clamp_min(0) / spread.clamp_min(1e-20)))
            own_codes.append(own)
    loss = ((per_view[0] + per_view[1]) / 2).view(a.shape[0], -1).mean(dim=1)
    agreement = (own_codes[0] == own_codes[1]).float().mean()
    return Consensus(loss, agreement)


# ------------------------------------------------------------------------ cross-reconstruction

@dataclass
class SwappedLatents:
    """Latents to decode for cross-reconstruction, and where their targets are.

    Rows are item-major like the generator batch: row `b * P + p` holds pair `pairs[p]` of
    item b. Both index tensors point into the flattened `[B*V]` generator batch (row b*V + v),
    so `x[target_index]` is the target waveform and `scale[target_index]` its scale.

    Attributes:
        latents (torch.Tensor): `[B*P, D, F]`, the content codebook of view i plus every other
            codebook of view j, for each ordered pair `(i, j)`, i != j.
        content_index (torch.Tensor): `[B*P]` long, the batch row that gave the content codebook.
        target_index (torch.Tensor): `[B*P]` long, the batch row that gave the other codebooks:
            the waveform the decoded latent must match.
        pairs (list[tuple[int, int]]): The P = V(V-1) ordered pairs (content view, target view).
    """
    latents: torch.Tensor
    content_index: torch.Tensor
    target_index: torch.Tensor
    pairs: list[tuple[int, int]]


def swap_latents(views: tp.Sequence[View], content_codebook: int = 0) -> SwappedLatents:
    """Cross-reconstruction latents: "content codebook of A + all other codebooks of B", to be
    decoded and compared with x_B, for every ordered pair of views (A, B).

    If codebook `content_codebook` holds only what the channels share and the others what is
    channel-specific, the swapped latent decodes to x_B: the loss gives the other codebooks a
    direct reason to carry the channel, and the content codebook one to drop it. The sum of
    straight-through embeddings carries the gradient into both views' encoder outputs.

    Args:
        views: V >= 2 views, each a list of per-codebook embeddings `[B, D, F]`.
        content_codebook (int): Index of the codebook taken from the content view.
    Returns:
        SwappedLatents: latents `[B*P, D, F]` with P = V(V-1), and their batch rows.
    """
    check_views(views, content_codebook, content_codebook)
    num_views, batch = len(views), views[0][0].shape[0]
    pairs = list(itertools.permutations(range(num_views), 2))
    swapped = []
    for content_view, target_view in pairs:
        others = [e for k, e in enumerate(views[target_view]) if k != content_codebook]
        swapped.append(views[content_view][content_codebook] + sum(others))
    latents = torch.stack(swapped, dim=1).flatten(0, 1)
    device = latents.device
    items = torch.arange(batch, device=device)[:, None] * num_views

    def rows(view_of_pair: list[int]) -> torch.Tensor:
        return (items + torch.tensor(view_of_pair, device=device)[None, :]).flatten()

    return SwappedLatents(latents, rows([i for i, _ in pairs]), rows([j for _, j in pairs]),
                          pairs)


# ------------------------------------------------------------------ level-difference heads

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
        with torch.autocast(a.device.type, enabled=False):
            features = torch.cat([self.pool(a.float()), self.pool(b.float())], dim=1)
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


# -------------------------------------------------------------------------------- the module

class PairwiseLoss(nn.Module):
    """The pairwise objective of paired training, built from the `pairwise` config group.

    Terms (each with its weight; see config/pairwise/*.yaml for every key):
    - similarity on the content codebook (`sim_kind`: mse | cosine | infonce),
    - diversity on the channel codebook (`div_kind`: neg_mse | cosine | margin | cos_hinge),
    - cross-reconstruction (`xrec_weight`): the step decodes `swap_latents(views)` and passes
      the per-item reconstruction loss to `xrec_loss`,
    - optional level-difference head on the channel codebook and its gradient-reversed twin
      on the content codebook (`ild_head`),
    - cue fidelity (`cue_weight`): the decoded pair's per-band level differences against the
      input pair's (`cue_loss`; the step passes both pairs' band levels),
    - code consensus (`consensus_weight`): the views of a pair choose the same content code
      (`consensus_loss`; the step passes the vectors the content codebook quantized),
    - invariance (`invariance_weight`): InfoNCE between the content codebook of a view and of
      the same view after a random channel-style change (`invariance_loss`; the step encodes
      the changed view, `channel_change.random_channel_change`),
    - optional channel-index classifier on the channel codebook (`channel_classifier`).

    Switch-on: every term is 0 before `start_step`; then 'constant' uses the weights as they
    are and 'linear' ramps them from 0 at `start_step` to full at `start_step + ramp_steps`
    (the classifier keeps its own weight, unscheduled). `class_weights` multiplies the
    per-item similarity by a factor per scene class (classes not listed: 1.0). The heads'
    parameters belong to this module: the engine adds them to the generator optimizer and
    averages their gradients across ranks.

    Args:
        sim_weight, div_weight (float): Weights of the similarity and diversity terms.
        sim_kind, div_kind, margin, max_cosine: See `similarity_loss` / `diversity_loss`.
        content_codebook, channel_codebook (int): Codebook indices (see `pairwise_losses`).
        schedule (str): 'constant' or 'linear'.
        ramp_steps (int): Length of the linear ramp in optimizer steps.
        start_step (int): First optimizer step at which the terms count.
        class_weights (dict, optional): Similarity multiplier per scene class name.
        channel_classifier (bool): Add the auxiliary channel-classifier head.
        classifier_weight (float): Weight of the classifier cross-entropy.
        num_channels (int): Number of channel indices the head tells apart.
        dimension (int, optional): Embedding dimension (`model.dimension`), needed by the
            heads and the projection.
        temperature (float): InfoNCE temperature.
        nce_pooling (str): 'frame' or 'mean' (see `info_nce`).
        nce_center (bool): Centre the InfoNCE rows.
        nce_same_segment_negatives (bool): Per frame, other frames of the segment are negatives.
        nce_projection (int): Width of a learned linear projection before InfoNCE (0: none).
        xrec_weight (float): Weight of the cross-reconstruction loss.
        cue_weight (float): Weight of the cue-fidelity loss (`cue_loss`).
        invariance_weight (float): Weight of the invariance loss (`invariance_loss`).
        consensus_weight (float): Weight of the code-consensus loss (`consensus_loss`).
        invariance_band_gain_db (float): Per-band gains of the change, uniform in +- this (dB).
        invariance_max_delay (float): Delay of the change, uniform in +- this (samples).
        ild_head (bool): Add the level-difference head and its reversed twin.
        ild_weight, ild_adv_weight (float): Weights of the head's and the twin's losses.
        ild_reversal (float): Gradient reversal factor between codebook 1 and the twin.
        ild_bands, ild_hidden (int): Bands predicted, hidden width of both heads.
        ild_floor_db (float): Floor of the loss normaliser (see `level_difference_loss`).
        wait_for_kmeans (bool): The terms also wait for every codebook's k-means (`active`).
        shared_scale (bool): The step normalises the views of an item by their common RMS
            (`EncodecModel.shared_scale`), so level differences between channels stay in the
            latent; read by the training step and the validation.
    """

    def __init__(self, sim_weight: float = 0.5, div_weight: float = 0.5, sim_kind: str = 'mse',
                 div_kind: str = 'neg_mse', margin: float = 1.0, content_codebook: int = 0,
                 channel_codebook: int = 1, schedule: str = 'constant', ramp_steps: int = 0,
                 class_weights: dict[str, float] | None = None, channel_classifier: bool = False,
                 classifier_weight: float = 0.1,
                 num_channels: int = 32, dimension: int | None = None, *,
                 start_step: int = 0, max_cosine: float = 0.0, temperature: float = 0.1,
                 nce_pooling: str = 'frame', nce_center: bool = True,
                 nce_same_segment_negatives: bool = False, nce_projection: int = 0,
                 xrec_weight: float = 0.0, ild_head: bool = False, ild_weight: float = 0.3,
                 ild_adv_weight: float = 0.3, ild_reversal: float = 1.0, ild_bands: int = 8,
                 ild_hidden: int = 128, ild_floor_db: float = 0.5,
                 wait_for_kmeans: bool = False, shared_scale: bool = False,
                 cue_weight: float = 0.0, invariance_weight: float = 0.0,
                 invariance_band_gain_db: float = 3.0, invariance_max_delay: float = 2.0,
                 consensus_weight: float = 0.0):
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
        if not -1 <= max_cosine < 1:
            raise ValueError(f"pairwise.max_cosine must be in [-1, 1), got {max_cosine}")
        if schedule not in SCHEDULES:
            raise ValueError(f"pairwise.schedule={schedule!r}: use one of {SCHEDULES}")
        if schedule == 'linear' and ramp_steps <= 0:
            raise ValueError(f"pairwise.schedule=linear needs pairwise.ramp_steps > 0, "
                             f"got {ramp_steps}")
        if start_step < 0:
            raise ValueError(f"pairwise.start_step must be >= 0, got {start_step}")
        if temperature <= 0:
            raise ValueError(f"pairwise.temperature must be > 0, got {temperature}")
        if nce_pooling not in NCE_POOLINGS:
            raise ValueError(f"pairwise.nce_pooling={nce_pooling!r}: use one of {NCE_POOLINGS}")
        if xrec_weight < 0:
            raise ValueError(f"pairwise.xrec_weight must be >= 0, got {xrec_weight}")
        if cue_weight < 0:
            raise ValueError(f"pairwise.cue_weight must be >= 0, got {cue_weight}")
        if consensus_weight < 0:
            raise ValueError(f"pairwise.consensus_weight must be >= 0, got {consensus_weight}")
        if invariance_weight < 0 or invariance_band_gain_db < 0 or invariance_max_delay < 0:
            raise ValueError("pairwise.invariance.weight, .band_gain_db and .max_delay must be "
                             f">= 0, got {invariance_weight}, {invariance_band_gain_db}, "
                             f"{invariance_max_delay}")
        self.sim_weight = float(sim_weight)
        self.div_weight = float(div_weight)
        self.sim_kind = sim_kind
        self.div_kind = div_kind
        self.margin = float(margin)
        self.max_cosine = float(max_cosine)
        self.content_codebook = int(content_codebook)
        self.channel_codebook = int(channel_codebook)
        self.schedule = schedule
        self.ramp_steps = int(ramp_steps)
        self.start_step = int(start_step)
        self.wait_for_kmeans = bool(wait_for_kmeans)
        self.shared_scale = bool(shared_scale)
        self.class_weights = {str(k): float(v) for k, v in (class_weights or {}).items()}
        self.temperature = float(temperature)
        self.nce_pooling = nce_pooling
        self.nce_center = bool(nce_center)
        self.nce_same_segment_negatives = bool(nce_same_segment_negatives)
        self.xrec_weight = float(xrec_weight)
        self.cue_weight = float(cue_weight)
        self.invariance_weight = float(invariance_weight)
        self.consensus_weight = float(consensus_weight)
        self.invariance_band_gain_db = float(invariance_band_gain_db)
        self.invariance_max_delay = float(invariance_max_delay)
        self.classifier_weight = float(classifier_weight)
        self.ild_weight = float(ild_weight)
        self.ild_adv_weight = float(ild_adv_weight)
        self.ild_reversal = float(ild_reversal)
        self.ild_floor_db = float(ild_floor_db)

        def need_dimension(what: str) -> int:
            if dimension is None:
                raise ValueError(f"pairwise.{what} needs the embedding dimension: pass "
                                 "dimension=model.dimension")
            return int(dimension)

        self.classifier: ChannelClassifier | None = None
        if channel_classifier:
            self.classifier = ChannelClassifier(need_dimension('channel_classifier'),
                                                int(num_channels))
        self.projection: nn.Linear | None = None
        if nce_projection and sim_kind == 'infonce':
            self.projection = nn.Linear(need_dimension('nce_projection'), int(nce_projection),
                                        bias=False)
        self.ild_head: LevelDifferenceHead | None = None
        self.ild_twin: LevelDifferenceHead | None = None
        if ild_head:
            dim = need_dimension('ild_head')
            self.ild_head = LevelDifferenceHead(dim, int(ild_bands), int(ild_hidden))
            self.ild_twin = LevelDifferenceHead(dim, int(ild_bands), int(ild_hidden))

    @classmethod
    def from_config(cls, pairwise_cfg: tp.Any, dimension: int | None = None) -> "PairwiseLoss":
        """Build from the `pairwise` config group (`config/pairwise/*.yaml`); `dimension` is
        `model.dimension`."""
        cfg = pairwise_cfg
        head, ild = cfg.channel_classifier, cfg.ild_head
        return cls(sim_weight=cfg.sim_weight, div_weight=cfg.div_weight, sim_kind=cfg.sim_kind,
                   div_kind=cfg.div_kind, margin=cfg.margin,
                   content_codebook=cfg.content_codebook, channel_codebook=cfg.channel_codebook,
                   schedule=cfg.schedule, ramp_steps=cfg.ramp_steps,
                   class_weights=dict(cfg.class_weights or {}),
                   channel_classifier=bool(head.enabled), classifier_weight=float(head.weight),
                   num_channels=int(head.num_channels), dimension=dimension,
                   start_step=int(cfg.start_step), max_cosine=float(cfg.max_cosine),
                   temperature=float(cfg.temperature), nce_pooling=cfg.nce_pooling,
                   nce_center=bool(cfg.nce_center),
                   nce_same_segment_negatives=bool(cfg.nce_same_segment_negatives),
                   nce_projection=int(cfg.nce_projection or 0),
                   xrec_weight=float(cfg.xrec_weight),
                   ild_head=bool(ild.enabled), ild_weight=float(ild.weight),
                   ild_adv_weight=float(ild.adv_weight), ild_reversal=float(ild.reversal),
                   ild_bands=int(ild.n_bands), ild_hidden=int(ild.hidden),
                   ild_floor_db=float(ild.floor_db), wait_for_kmeans=bool(cfg.wait_for_kmeans),
                   shared_scale=bool(cfg.shared_scale), cue_weight=float(cfg.cue_weight),
                   invariance_weight=float(cfg.invariance.weight),
                   invariance_band_gain_db=float(cfg.invariance.band_gain_db),
                   invariance_max_delay=float(cfg.invariance.max_delay),
                   consensus_weight=float(cfg.consensus_weight))

    # ------------------------------------------------------------------ schedule
    def schedule_factor(self, step: int, codebooks_initialized: bool = True) -> float:
        """Multiplier of the scheduled weights at optimizer step `step` (0 before
        `start_step`, and with `wait_for_kmeans` while a codebook has not done its k-means:
        contrast on provisional codes teaches nothing)."""
        if step < self.start_step or (self.wait_for_kmeans and not codebooks_initialized):
            return 0.0
        if self.schedule == 'linear':
            return min(1.0, (step - self.start_step) / self.ramp_steps)
        return 1.0

    def is_active(self, step: int, codebooks_initialized: bool = True) -> bool:
        """Whether the scheduled terms count at `step`. The step may skip `forward` and the
        cross-reconstruction decode while False (every rank at once: the step is global and
        the codebooks are identical on every rank); the classifier, if on, is unscheduled
        and needs `forward` anyway."""
        return self.schedule_factor(step, codebooks_initialized) > 0

    @property
    def uses_xrec(self) -> bool:
        """Whether the step must decode `swap_latents` (cross-reconstruction is on)."""
        return self.xrec_weight > 0

    # ------------------------------------------------------------------ terms
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

    def content_nce(self, a: View, b: View) -> InfoNCE:
        """`info_nce` of two views' content codebooks with this recipe's options."""
        return info_nce(a[self.content_codebook], b[self.content_codebook], self.temperature,
                        self.nce_pooling, self.nce_center, self.nce_same_segment_negatives,
                        projection=self.projection)

    def similarity_terms(self, views: tp.Sequence[View]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-item similarity `[B]` averaged over pairs, and detached extras for logging."""
        pairs = view_pairs(views)
        if self.sim_kind != 'infonce':
            sim = sum(similarity_loss(views[i][self.content_codebook],
                                      views[j][self.content_codebook], self.sim_kind, 'none')
                      for i, j in pairs) / len(pairs)
            return sim, {}
        results = [self.content_nce(views[i], views[j]) for i, j in pairs]
        sim = sum(r.loss for r in results) / len(results)
        accuracy = torch.stack([r.accuracy for r in results]).mean()
        return sim, {'nce_accuracy': accuracy}

    def diversity_terms(self, views: tp.Sequence[View]
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-item diversity `[B]` averaged over pairs, and detached extras for logging."""
        pairs = view_pairs(views)
        channel = [view[self.channel_codebook] for view in views]
        div = sum(diversity_loss(channel[i], channel[j], self.div_kind, self.margin, 'none',
                                 self.max_cosine) for i, j in pairs) / len(pairs)
        extras = {}
        if self.div_kind == 'cos_hinge':  # the hinge hides how alike the views are once met
            with torch.no_grad():
                extras['div_cosine'] = torch.stack([centred_cosine(channel[i], channel[j]).mean()
                                                    for i, j in pairs]).mean()
        return div, extras

    def level_difference_terms(self, views: tp.Sequence[View],
                               ild_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted losses of the head on the channel codebook and of its twin behind a
        gradient reversal on the content codebook, averaged over view pairs."""
        assert self.ild_head is not None and self.ild_twin is not None
        targets = level_difference_pairs(ild_targets, len(views), self.ild_head.n_bands)
        plain, adversarial = [], []
        for p, (i, j) in enumerate(view_pairs(views)):
            target = targets[:, p]
            channel_i, channel_j = views[i][self.channel_codebook], views[j][self.channel_codebook]
            plain.append(level_difference_loss(self.ild_head(channel_i, channel_j), target,
                                               self.ild_floor_db))
            content_i = reverse_gradient(views[i][self.content_codebook], self.ild_reversal)
            content_j = reverse_gradient(views[j][self.content_codebook], self.ild_reversal)
            adversarial.append(level_difference_loss(self.ild_twin(content_i, content_j), target,
                                                     self.ild_floor_db))
        return torch.stack(plain).mean(), torch.stack(adversarial).mean()

    def forward(self, views: tp.Sequence[View], step: int,
                classes: tp.Sequence[str] | None = None,
                channels: torch.Tensor | None = None,
                ild_targets: torch.Tensor | None = None,
                codebooks_initialized: bool = True) -> dict[str, torch.Tensor]:
        """Pairwise losses of V >= 2 views (each a list of per-codebook `[B, D, F]`).

        Args:
            views: The views' per-codebook embeddings (`split_views(out.embeddings, V)`).
            step (int): Optimizer step, for the switch-on and the ramp.
            classes (list[str], optional): Scene class per item, for `class_weights`.
            channels (torch.Tensor, optional): `[B, V]` channel indices, for the classifier.
            ild_targets (torch.Tensor, optional): Inter-channel level differences for the
                level-difference head: `[B, n_bands]` dB (level of view 0 minus view 1) or
                per-view band levels `[B, V, n_bands]` dB, measured on the pair at ONE scale.
            codebooks_initialized (bool): Whether every codebook has done its k-means
                (`EncodecModel.codebooks_initialized`), for `wait_for_kmeans`.
        Returns:
            dict: Weighted scalars to add to the generator loss (`LOSS_TERMS`): 'l_sim',
            'l_div', and when on 'l_cls', 'l_ild' (head on the channel codebook) and
            'l_ild_adv' (twin on the content codebook: its value falls as the twin learns, while
            the reversed gradient makes the content codebook lose the level difference).
            Unweighted, detached values for logging: 'sim', 'div', and when they apply
            'nce_accuracy' (fraction of positives ranked first), 'div_cosine' (mean centred
            cosine of the channel codebook), 'cls', 'ild', 'ild_adv' (1 = no better than
            predicting no difference, 0 = exact). With div_kind='neg_mse', 'div' <= 0 and
            decreasing means the channel-codebook embeddings move apart.

        The heads need their inputs while gradients are enabled (training); under no_grad
        (validation) a head whose input is missing is left out.
        """
        check_views(views, self.content_codebook, self.channel_codebook)
        sim, sim_extras = self.similarity_terms(views)
        div, div_extras = self.diversity_terms(views)
        weighted_sim = sim
        if classes is not None and self.class_weights:
            if len(classes) != sim.shape[0]:
                raise ValueError(f"got {len(classes)} classes for a batch of {sim.shape[0]}")
            weighted_sim = sim * self.item_weights(classes, sim)
        factor = self.schedule_factor(step, codebooks_initialized)
        out = {'l_sim': factor * self.sim_weight * weighted_sim.mean(),
               'l_div': factor * self.div_weight * div.mean(),
               'sim': sim.mean().detach(), 'div': div.mean().detach(),
               **sim_extras, **div_extras}
        training = torch.is_grad_enabled()
        if self.classifier is not None and (channels is not None or training):
            if channels is None:
                raise ValueError("pairwise.channel_classifier.enabled needs the channel indices "
                                 "of each view (channels [B, V])")
            cls_loss = self.classifier_loss(views, channels)
            out['l_cls'] = self.classifier_weight * cls_loss
            out['cls'] = cls_loss.detach()
        if self.ild_head is not None and (ild_targets is not None or training):
            if ild_targets is None:
                raise ValueError("pairwise.ild_head.enabled needs the inter-channel level "
                                 "differences of each pair (ild_targets [B, n_bands] dB)")
            ild, ild_adv = self.level_difference_terms(views, ild_targets)
            out['l_ild'] = factor * self.ild_weight * ild
            out['l_ild_adv'] = factor * self.ild_adv_weight * ild_adv
            out['ild'], out['ild_adv'] = ild.detach(), ild_adv.detach()
        return out

    # ------------------------------------------------------------------ cross-reconstruction
    def swap_latents(self, views: tp.Sequence[View]) -> SwappedLatents:
        """`swap_latents(views, self.content_codebook)`: what the step decodes."""
        return swap_latents(views, self.content_codebook)

    def xrec_loss(self, per_item: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Weight the cross-reconstruction loss the step computed on the decoded swaps.

        Args:
            per_item (torch.Tensor): `[B*P]` reconstruction loss of each decoded swapped latent
                against its target (`x[target_index]`), in the units of the reconstruction loss
                (the same weighted mel + L1 sum).
            step (int): Optimizer step (switch-on and ramp as the other terms).
        Returns:
            dict: 'l_xrec' (weighted, to add to the generator loss) and 'xrec' (unweighted
            mean, detached, for logging next to the plain reconstruction loss).
        """
        xrec = per_item.mean()
        return {'l_xrec': self.schedule_factor(step) * self.xrec_weight * xrec,
                'xrec': xrec.detach()}

    # ------------------------------------------------------------------ code consensus
    @property
    def uses_consensus(self) -> bool:
        """Whether the step must pass the content codebook's inputs (`consensus_loss`)."""
        return self.consensus_weight > 0

    def consensus_loss(self, residuals: tp.Sequence[torch.Tensor], embed: torch.Tensor,
                       step: int) -> dict[str, torch.Tensor]:
        """`code_consensus` of every view pair on the content codebook.

        Args:
            residuals: Per view, the vectors `[B, D, F]` the content codebook quantized (the
                encoder output minus the earlier codebooks' vectors), with their graph.
            embed (torch.Tensor): The content codebook's codes `[K, D]`.
            step (int): Optimizer step (switch-on and ramp as the other terms).
        Returns:
            dict: 'l_consensus' (weighted), 'consensus' (unweighted, 0 = every frame takes
            the pair's code) and 'consensus_agreement' (fraction of frames coded alike).
        """
        results = [code_consensus(residuals[i], residuals[j], embed)
                   for i, j in view_pairs(residuals)]
        consensus = torch.stack([r.loss.mean() for r in results]).mean()
        agreement = torch.stack([r.agreement for r in results]).mean()
        return {'l_consensus': self.schedule_factor(step) * self.consensus_weight * consensus,
                'consensus': consensus.detach(), 'consensus_agreement': agreement}

    # ------------------------------------------------------------------ invariance
    @property
    def uses_invariance(self) -> bool:
        """Whether the step must encode a channel-style change of each item (`invariance_loss`)."""
        return self.invariance_weight > 0

    def invariance_loss(self, view: View, changed: View, step: int) -> dict[str, torch.Tensor]:
        """InfoNCE between the content codebook of a view and of the same segment after a
        random channel-style change (per-band gains and a small delay, what differs between two
        capsules): the content codebook should choose the same codes for both.

        The real second channel is a positive of the same kind (`similarity_terms`), but it
        differs from the first by more than the channel (diffuse and capsule noise are
        incoherent between capsules); this positive differs by the channel's cues alone, at a
        size set by the config, so it asks for exactly the invariance that leaves those cues to
        the channel codebook. Options (temperature, pooling, centring, negatives) are the
        similarity term's.

        Args:
            view (View): Per-codebook embeddings of the views' first channel (`[B, D, F]` each).
            changed (View): The same for its changed copy (`ResidualVectorQuantizer.embeddings`).
            step (int): Optimizer step (switch-on and ramp as the other terms).
        Returns:
            dict: 'l_inv' (weighted), 'inv' (unweighted normalised InfoNCE, 1 = chance) and
            'nce_accuracy_inv' (fraction of anchors whose changed copy ranks first).
        """
        nce = self.content_nce(view, changed)
        inv = nce.loss.mean()
        return {'l_inv': self.schedule_factor(step) * self.invariance_weight * inv,
                'inv': inv.detach(), 'nce_accuracy_inv': nce.accuracy}

    # ------------------------------------------------------------------ cue fidelity
    @property
    def uses_cue(self) -> bool:
        """Whether the step must measure the decoded pair's band levels (`cue_loss`)."""
        return self.cue_weight > 0

    def cue_loss(self, decoded_levels: torch.Tensor, input_levels: torch.Tensor,
                 step: int) -> dict[str, torch.Tensor]:
        """How far the decoded views' per-band level differences are from the input views'.

        The inter-channel level difference is the cue a pair of capsules carries about
        direction; only paired training sees both channels and can be asked to keep it.
        Scale-free like the level-difference head: `level_difference_loss` of the decoded
        differences against the input ones (1 = the decode has no difference at all, 0 =
        exact), over all view pairs.

        Args:
            decoded_levels, input_levels (torch.Tensor): Band levels `[B, V, n_bands]` dB of the
                decoded and the input views, both at the views' common scale (the decode
                differentiable, the input without a graph).
            step (int): Optimizer step (switch-on and ramp as the other terms).
        Returns:
            dict: 'l_cue' (weighted) and 'cue' (unweighted, detached).
        """
        views, bands = decoded_levels.shape[1:]
        cue = level_difference_loss(level_difference_pairs(decoded_levels, views, bands),
                                    level_difference_pairs(input_levels, views, bands),
                                    self.ild_floor_db)
        return {'l_cue': self.schedule_factor(step) * self.cue_weight * cue, 'cue': cue.detach()}
