"""The pairwise objective's terms on plain tensors: how alike two channel views' codebook
embeddings are (similarity, InfoNCE), how different (diversity), whether they choose the same
code (code consensus), and the swapped latents of cross-reconstruction.

Embeddings are the per-codebook quantizer outputs `[B, D, F]` of `EncodecOutput.embeddings`;
a view is one channel's list of them. `pairwise_losses.PairwiseLoss` combines these terms
with their weights and schedule.

Sign convention: every loss here is minimised. With `div_kind='neg_mse'` (the design
document's default) the diversity is the NEGATIVE mean squared distance between the
channel-codebook embeddings, so it is <= 0 and a decreasing (more negative) value means the
embeddings of the two channels are moving apart. `neg_mse` is unbounded below; `margin`
(relu(margin - mse), >= 0, zero once the views are `margin` apart), `cosine` (cosine
similarity, in [-1, 1]) and `cos_hinge` (relu(cos - max_cosine) of the batch-centred
embeddings, in [0, 1 - max_cosine], scale-free) are bounded alternatives.
"""
from __future__ import annotations

import itertools
import math
import typing as tp
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from modules.quantization import nearest_code
from modules.views import unflatten_views
from utils import distributed

SIM_KINDS = ('mse', 'cosine', 'infonce')
DIV_KINDS = ('neg_mse', 'cosine', 'margin', 'cos_hinge')
NCE_POOLINGS = ('frame', 'mean')

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
        raise ValueError(f"unknown similarity kind {kind!r} (pairwise.sim_kind): use one of "
                         f"{SIM_KINDS}")
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
        raise ValueError(f"unknown diversity kind {kind!r} (pairwise.div_kind): use one of "
                         f"{DIV_KINDS}")
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
    # Row of view v of item b in the flattened generator batch, [B, V].
    rows = unflatten_views(torch.arange(batch * num_views, device=latents.device), num_views)
    content_index = rows[:, [i for i, _ in pairs]].flatten()
    target_index = rows[:, [j for _, j in pairs]].flatten()
    return SwappedLatents(latents, content_index, target_index, pairs)
