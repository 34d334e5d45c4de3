"""Residual vector quantizer with EMA codebooks and a gradient path for EVERY codebook.

Differences from the usual straight-through RVQ (EnCodec, SoundStream), on purpose:

* The residual of codebook k is `x - sum_{j<k} c_j` with the chosen vectors `c_j` constant
  (they come from buffers) but `x` NOT detached, so each residual has an identity gradient to
  `x`. The per-codebook embedding `residual_k + (c_k - residual_k).detach()` equals `c_k` in
  value and passes gradients straight through to `x` -- for codebook 2 as for codebook 1. (In
  the usual form `residual = residual - quantized` with `quantized = residual + (c -
  residual).detach()`, the residual after codebook 1 is constant and a loss on codebook 2's
  output has exactly zero gradient into the encoder.)
* The decoder input keeps EnCodec's identity gradient: `x + (sum_k c_k - x).detach()`.
* The commitment loss is `sum_k mse(residual_k, c_k)`. Since every residual carries a gradient,
  every codebook's term pulls the encoder output (d/dx = sum_k 2 (residual_k - c_k) / numel). In
  EnCodec the residuals after the first are constants, so only codebook 1's term reaches the
  encoder; EnCodec also averages the terms where we sum them (the commitment weight sees up to
  n_q times EnCodec's value).
* After k-means init, `embed_avg` holds the cluster sums (means x counts), consistent with
  `embed = embed_avg / count`; EnCodec stores the means there, so its first EMA step divides
  every code by its count.
* Dead-code replacement also resets `embed_avg` and `cluster_size` of the replaced codes; in
  EnCodec the EMA update that follows recomputes `embed` from the old `embed_avg` and the
  replacement is lost.
* Codebooks are synchronised across ranks (see `EuclideanCodebook`).
* k-means runs on a buffer of `kmeans_buffer x bins` vectors gathered over several training
  forwards (and ranks), codebook after codebook, instead of on the first batch: on one batch of
  about as many frames as codes, codebook 1 fits nearly every frame and codebook 2 starts on
  near-zero residuals. Until its buffer is full a codebook works on a provisional k-means of
  one batch (see `EuclideanCodebook`).
* Everything runs in float32 with autocast off: `x.float()` alone does not stop autocast from
  casting the distance matmul, which changes ~9% of the codes under bf16.

The codebooks run once per forward: the codes returned are the codes decoded and the codes of
the embeddings, and a training forward makes exactly one EMA update per codebook.

Optionally the quantizer is split (`content_dims`): codebook 1 codes a first block of the
latent's dimensions and codebook 2 the rest, so that nothing codebook 2 holds can change
codebook 1's choice. In a residual quantizer codebook 1 chooses by the whole vector and
whatever tells two channels apart moves its code first; split, a channel codebook can exist.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from utils import distributed


@dataclass
class QuantizerOutput:
    """Result of `ResidualVectorQuantizer.forward`.

    Attributes:
        quantized: `[B, D, F]` sum of the chosen vectors, identity gradient to the input.
        codes: `[B, n_q, F]` long.
        commit_loss: scalar, sum over codebooks of the commitment MSE.
        embeddings: None unless asked; else `n_q` tensors `[B, D, F]`, codebook k's chosen
            vectors with a straight-through gradient into the input.
        commit_per_item: `[B]` the commitment loss of each item (its mean is `commit_loss`).
    """
    quantized: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor
    embeddings: list[torch.Tensor] | None = None
    commit_per_item: torch.Tensor | None = None


def nearest_code(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of `embed` `[K, D]` for each row of `x` `[N, D]`.

    Written as EnCodec writes it (same operations in the same order) so that codes computed
    from official weights match the official package exactly, ties included.
    """
    embed_t = embed.t()
    dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ embed_t
             + embed_t.pow(2).sum(0, keepdim=True))
    return dist.max(dim=-1).indices


def sample_vectors(samples: torch.Tensor, num: int) -> torch.Tensor:
    """`num` rows of `samples`, without replacement when there are enough."""
    if samples.shape[0] >= num:
        indices = torch.randperm(samples.shape[0], device=samples.device)[:num]
    else:
        indices = torch.randint(0, samples.shape[0], (num,), device=samples.device)
    return samples[indices]


def float32_region(x: torch.Tensor) -> torch.autocast:
    """Context with autocast off on `x`'s device, so that float32 tensors stay float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def kmeans(samples: torch.Tensor, num_clusters: int,
           num_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from randomly drawn samples.

    Args:
        samples: `[N, D]`.
        num_clusters: K.
        num_iters: iterations (at least 1).
    Returns:
        means `[K, D]` (an empty cluster keeps its previous mean) and the cluster sizes `[K]` of
        the last assignment.
    """
    means = sample_vectors(samples, num_clusters)
    counts = torch.zeros(num_clusters, device=samples.device, dtype=samples.dtype)
    for _ in range(num_iters):
        assignment = nearest_code(samples, means)
        counts = torch.bincount(assignment, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, assignment, samples)
        new_means = sums / counts.clamp(min=1).unsqueeze(1)
        means = torch.where(counts.unsqueeze(1) == 0, means, new_means)
    return means, counts


class EuclideanCodebook(nn.Module):
    """Codebook of `codebook_size` vectors updated by exponential moving averages.

    In training mode, each forward: k-means init (see below), then nearest-code search,
    dead-code replacement, and one EMA update of the per-code counts and sums. In eval mode the
    buffers are never touched.

    k-means init over several batches: a training forward that may gather (`gather=True`, given
    by `ResidualVectorQuantizer` only once every earlier codebook is initialised) appends its
    vectors to the `kmeans_samples` buffer; the forward at which the buffer reaches
    `kmeans_buffer x codebook_size` vectors runs k-means on it (a random subset of exactly that
    many) and marks the codebook initialised (`inited`), then empties the buffer. Until then the
    codebook holds a provisional k-means of its first training batch and makes its usual EMA and
    dead-code updates; the final init overwrites all of it (codes, counts and sums), so nothing
    of the provisional codebook survives.

    Distributed training: the EMA statistics are all-reduced before the update, the k-means
    buffer holds the all-gathered batches (so it is identical on every rank), k-means and
    dead-code sampling run on rank 0 and are broadcast. Every rank therefore holds the codebook
    one process would compute on the concatenated batch, and every rank takes the same
    (buffer-based) decisions, so the collectives always match.

    Args:
        dim (int): Vector dimension.
        codebook_size (int): Number of codes K.
        kmeans_init (bool): Initialise by k-means (else uniform random init, marked as
            initialised).
        kmeans_iters (int): k-means iterations.
        decay (float): EMA decay.
        epsilon (float): Laplace smoothing of the counts.
        threshold_ema_dead_code (float): A code used fewer than this many times over the EMA
            horizon (`1 / (1 - decay)` steps, 100 at decay 0.99) is dead and replaced by a vector
            of the current batch (0 disables). EnCodec compares the per-step EMA count with it
            directly, which only makes sense for large batches: at batch 8 x 1 s (600-1200
            frames for 1024 codes) the average code is used about once per step, so nearly
            the whole codebook would count as dead and be re-drawn every step.
        kmeans_buffer (float): k-means runs on at least `kmeans_buffer x codebook_size` vectors
            gathered over training forwards and ranks; 0 runs it on the first training batch
            alone (EnCodec's init).
    """

    # Buffers that EnCodec's checkpoints lack; loading defaults them (`_load_from_state_dict`).
    OPTIONAL_BUFFERS: tuple[str, ...] = ("kmeans_samples",)

    def __init__(self, dim: int, codebook_size: int, kmeans_init: bool = True,
                 kmeans_iters: int = 50, decay: float = 0.99, epsilon: float = 1e-5,
                 threshold_ema_dead_code: float = 2, kmeans_buffer: float = 10):
        super().__init__()
        if kmeans_init and kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be >= 1 with kmeans_init, got {kmeans_iters}.")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        if kmeans_buffer < 0:
            raise ValueError(f"kmeans_buffer must be >= 0, got {kmeans_buffer}.")
        self.dim = dim
        self.codebook_size = codebook_size
        self.kmeans_iters = kmeans_iters
        self.decay = decay
        self.epsilon = epsilon
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.kmeans_target = math.ceil(kmeans_buffer * codebook_size)
        embed = torch.zeros(codebook_size, dim)
        cluster_size = torch.zeros(codebook_size)
        if not kmeans_init:
            # Random codes counted once each, so that embed == embed_avg / cluster_size holds
            # from the start (EnCodec leaves the counts at 0 and its first EMA step blows up).
            nn.init.kaiming_uniform_(embed)
            cluster_size.fill_(1.0)
        # Buffer names and shapes are those of EnCodec's checkpoints (`inited` is a float [1]).
        self.register_buffer("inited", torch.tensor([float(not kmeans_init)]))
        self.register_buffer("cluster_size", cluster_size)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        # Vectors gathered for k-means, [n, dim] with 0 <= n < kmeans_target: it grows while the
        # codebook gathers and is emptied by the init, so that an initialised codebook carries
        # no dead weight (up to 5 MB per codebook at the defaults). Persistent so that a run
        # resumed mid-gather initialises exactly as an uninterrupted one; its variable length is
        # handled by `_load_from_state_dict`.
        self.register_buffer("kmeans_samples", torch.zeros(0, dim))
        # The latent dimensions this codebook quantizes (1) and ignores (0); not saved: it is
        # the model's structure (`ResidualVectorQuantizer(content_dims=...)`), not its state.
        self.register_buffer("dims", torch.ones(dim), persistent=False)

    # ---------------------------------------------------------------- status
    @property
    def initialized(self) -> bool:
        """True once the final k-means has run (or without k-means init)."""
        return bool(self.inited)

    @property
    def kmeans_progress(self) -> float:
        """Fraction of the k-means buffer gathered: 1.0 once initialised."""
        if self.initialized:
            return 1.0
        return self.kmeans_samples.shape[0] / max(self.kmeans_target, 1)

    @property
    def has_codes(self) -> bool:
        """True once the codebook holds codes to quantize with (final or provisional).

        Every k-means init counts each vector once and later EMA or dead-code updates keep the
        counts positive, so a codebook with no count at all has never been initialised.
        """
        return self.initialized or bool(self.cluster_size.sum() > 0)

    # ---------------------------------------------------------------- quantization
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes `[N]` of vectors `x` `[N, D]` (of their dimensions in `dims`)."""
        with float32_region(x):
            return nearest_code(x.float() * self.dims, self.embed * self.dims)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectors `[..., D]` of `codes` `[...]` (0 outside `dims`)."""
        return F.embedding(codes, self.embed) * self.dims

    def forward(self, x: torch.Tensor,
                gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize `x` `[N, D]` (no gradient flows here); update the codebook in training.

        Args:
            x: vectors `[N, D]`.
            gather: whether this training batch may fill the k-means buffer (else it can at
                most give the codebook its provisional init).
        Returns:
            the chosen vectors `[N, D]` (before this step's update) and their codes `[N]`.
        """
        with float32_region(x):
            x = x.detach().float() * self.dims  # k-means, EMA and dead codes see only `dims`
            if self.training:
                self.init_embed_(x, gather)
            codes = self.encode(x)
            vectors = self.decode(codes)
            if self.training:
                self.expire_codes_(x)
                self.update_ema_(x, codes)
        return vectors, codes

    # ---------------------------------------------------------------- k-means init
    @torch.no_grad()
    def init_embed_(self, x: torch.Tensor, gather: bool = True) -> None:
        """Gather `x` into the k-means buffer and initialise when it is full, or give the
        codebook its provisional init from this batch (see the class docstring)."""
        if self.initialized or (not gather and self.has_codes):
            return
        batch = distributed.all_gather_cat(x)
        if gather:
            pool = torch.cat([self.kmeans_samples, batch])
            if pool.shape[0] >= self.kmeans_target:
                self._set_kmeans_(pool, step_vectors=batch.shape[0],
                                  max_samples=self.kmeans_target)
                self.inited.fill_(1.0)
                self.kmeans_samples = pool.new_zeros(0, self.dim)
                return
            self.kmeans_samples = pool
        if not self.has_codes:
            self._set_kmeans_(batch, step_vectors=batch.shape[0])

    @torch.no_grad()
    def _set_kmeans_(self, samples: torch.Tensor, step_vectors: int,
                     max_samples: int = 0) -> None:
        """Codes, counts and sums from k-means on `samples` (identical on every rank), randomly
        thinned to `max_samples` rows when there are more (0: all); rank 0 computes, then
        broadcasts.

        The counts are rescaled to `step_vectors` vectors (one training step's, all ranks), as
        the EMA holds per-step counts: counts of a buffer of many batches would weigh the init
        like that many steps and freeze the codebook for hundreds of steps.
        """
        if distributed.rank() == 0:
            if 0 < max_samples < samples.shape[0]:
                # Random rows, not a stride, which could alias with the periodic layout of
                # the batch (items x views x frames); rank 0's RNG, like k-means itself.
                samples = sample_vectors(samples, max_samples)
            embed, counts = kmeans(samples, self.codebook_size, self.kmeans_iters)
            counts = counts * (step_vectors / samples.shape[0])
            self.embed.copy_(embed)
            # embed_avg is the EMA of per-code sums (embed = embed_avg / count); EnCodec copies
            # the means here, which shrinks every code by ~count at the first EMA step.
            self.embed_avg.copy_(embed * counts.unsqueeze(1))
            self.cluster_size.copy_(counts)
        for buffer in (self.embed, self.embed_avg, self.cluster_size):
            distributed.broadcast_(buffer)

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        """Accept a k-means buffer of any length (it changes during a gather), and state dicts
        without one (official EnCodec, or saved before it existed): an empty buffer, so that an
        initialised codebook stays as it is and an unfinished gather restarts."""
        key = prefix + "kmeans_samples"
        if key not in state_dict:
            state_dict[key] = self.kmeans_samples.new_zeros(0, self.dim)
        # Only the length adapts: a wrong vector dimension is still reported as a mismatch.
        self.kmeans_samples = self.kmeans_samples.new_zeros(state_dict[key].shape[0], self.dim)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if bool((self.embed * (1 - self.dims)).abs().sum() > 0):
            self.reset_()  # codes of a quantizer without `dims` (e.g. an unsplit start point)

    @torch.no_grad()
    def reset_(self) -> None:
        """Forget every code: the next training forwards run k-means again (on vectors of
        this codebook's `dims`). A split quantizer (`content_dims`) that starts from the codes
        of an unsplit one gets fresh codes of its own dimensions, not projections of codes
        that were fitted to every dimension."""
        for buffer in (self.inited, self.cluster_size, self.embed, self.embed_avg):
            buffer.zero_()
        self.kmeans_samples = self.kmeans_samples.new_zeros(0, self.dim)

    # ---------------------------------------------------------------- updates
    @property
    def dead_count(self) -> float:
        """Per-step EMA count under which a code is dead: `threshold` uses over the horizon."""
        return self.threshold_ema_dead_code * (1.0 - self.decay)

    @torch.no_grad()
    def expire_codes_(self, x: torch.Tensor) -> None:
        """Replace dead codes by vectors of the batch.

        A replaced code starts as a code used twice the threshold over the horizon (count and
        sum), so the EMA update that follows keeps the new vector, and the code has about
        `ln 2 * horizon` steps (69 at decay 0.99) to attract vectors before it counts as dead.
        """
        if self.threshold_ema_dead_code <= 0:
            return
        expired = self.cluster_size < self.dead_count
        if not bool(expired.any()):  # same decision on every rank: the buffers are in sync
            return
        samples = distributed.all_gather_cat(x)
        if distributed.rank() == 0:
            fresh = sample_vectors(samples, self.codebook_size)
            mask = expired.unsqueeze(1)
            self.embed.copy_(torch.where(mask, fresh, self.embed))
            fresh_count = 2.0 * self.dead_count
            self.embed_avg.copy_(torch.where(mask, fresh * fresh_count, self.embed_avg))
            self.cluster_size.masked_fill_(expired, fresh_count)
        for buffer in (self.embed, self.embed_avg, self.cluster_size):
            distributed.broadcast_(buffer)

    @torch.no_grad()
    def update_ema_(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step of per-code counts and sums (summed over ranks), then the new codebook."""
        counts = torch.bincount(codes, minlength=self.codebook_size).to(self.cluster_size.dtype)
        sums = torch.zeros_like(self.embed_avg).index_add_(0, codes, x.to(self.embed_avg.dtype))
        distributed.all_reduce_sum_(counts)
        distributed.all_reduce_sum_(sums)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_avg.lerp_(sums, 1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = ((self.cluster_size + self.epsilon)
                    / (total + self.codebook_size * self.epsilon) * total)
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))


class VectorQuantization(nn.Module):
    """Holds one codebook under EnCodec's attribute name (`layers.K._codebook`)."""

    def __init__(self, codebook: EuclideanCodebook):
        super().__init__()
        self._codebook = codebook


class ResidualVectorQuantization(nn.Module):
    """The list of codebooks under EnCodec's path (`vq.layers`)."""

    def __init__(self, layers: list[VectorQuantization]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class ResidualVectorQuantizer(nn.Module):
    """Residual vector quantizer of `n_q` EMA codebooks (see the module docstring).

    Args:
        dimension (int): Vector dimension D.
        n_q (int): Number of codebooks.
        bins (int): Codes per codebook.
        decay (float): EMA decay.
        epsilon (float): Laplace smoothing.
        kmeans_init (bool): k-means init (else random codes).
        kmeans_iters (int): k-means iterations.
        threshold_ema_dead_code (float): Dead-code threshold (0 disables).
        kmeans_buffer (float): Each codebook runs k-means on `kmeans_buffer x bins` vectors
            gathered over training forwards; codebook k starts gathering once the codebooks
            < k that share its dimensions are initialised, so that it sees their true
            residuals (codebook 2 of a split from the start). 0: the first training batch.
        content_dims (int): 0: every codebook quantizes every dimension (EnCodec's RVQ).
            C > 0: codebook 1 quantizes the first C latent dimensions only and codebook 2 the
            other D - C (codebooks 3.. everything that is left), so that what codebook 2 codes
            cannot change codebook 1's choice: a content part and a channel part of the latent.
            Each codebook then sees, updates and decodes only its dimensions.
    """

    def __init__(self, dimension: int = 128, n_q: int = 2, bins: int = 1024, decay: float = 0.99,
                 epsilon: float = 1e-5, kmeans_init: bool = True, kmeans_iters: int = 50,
                 threshold_ema_dead_code: float = 2, kmeans_buffer: float = 10,
                 content_dims: int = 0):
        super().__init__()
        if n_q < 1 or bins < 2:
            raise ValueError(f"need n_q >= 1 and bins >= 2, got n_q={n_q}, bins={bins}.")
        if content_dims and not (0 < content_dims < dimension and n_q >= 2):
            raise ValueError(f"content_dims={content_dims} (model.content_share x model.dimension) "
                             f"must be 0 (off) or between 1 and {dimension - 1}, with n_q >= 2 "
                             f"(got n_q={n_q}).")
        self.dimension = dimension
        self.n_q = n_q
        self.bins = bins
        self.vq = ResidualVectorQuantization([
            VectorQuantization(EuclideanCodebook(
                dimension, bins, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                decay=decay, epsilon=epsilon, threshold_ema_dead_code=threshold_ema_dead_code,
                kmeans_buffer=kmeans_buffer))
            for _ in range(n_q)])
        self.content_dims = int(content_dims)
        if content_dims:
            self.codebooks[0].dims[content_dims:] = 0
            self.codebooks[1].dims[:content_dims] = 0
        # Codebook k's input depends on the earlier codebooks that share its dimensions: it
        # waits for their k-means before gathering its own. The two halves of a split do not
        # share any, so codebook 2 of a split gathers from the first step, as codebook 1 does.
        self.waits_for = [[j for j in range(k) if not (content_dims and (j, k) == (0, 1))]
                          for k in range(n_q)]

    @property
    def codebooks(self) -> list[EuclideanCodebook]:
        """The `n_q` codebooks, in residual order."""
        return [layer._codebook for layer in self.vq.layers]

    @property
    def initialized(self) -> bool:
        """True once every codebook has run its final k-means (the same on every rank)."""
        return all(codebook.initialized for codebook in self.codebooks)

    @property
    def kmeans_progress(self) -> list[float]:
        """Per codebook, the fraction of its k-means buffer gathered (1.0: initialised)."""
        return [codebook.kmeans_progress for codebook in self.codebooks]

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of every codebook buffer (k-means buffers included), for `restore`."""
        return {name: tensor.detach().clone() for name, tensor in self.state_dict().items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Put back the codebooks of `snapshot` (from `snapshot()`): undoes every update made
        since (k-means gathering and init, dead codes, EMA), e.g. by a skipped training step."""
        self.load_state_dict(snapshot)

    def forward(self, x: torch.Tensor, return_embeddings: bool = False) -> QuantizerOutput:
        """Quantize `x` `[B, D, F]`; in training mode, also update the codebooks (once).

        Args:
            x: encoder output `[B, D, F]`.
            return_embeddings: also return the per-codebook embeddings.
        """
        self._check_latent(x)
        input_dtype = x.dtype
        with float32_region(x):
            x = x.float()
            batch, dim, frames = x.shape
            residual = x
            total = torch.zeros_like(x)
            commit_per_item = x.new_zeros(batch)
            codes, embeddings = [], []
            for k, codebook in enumerate(self.codebooks):
                flat = residual.detach().transpose(1, 2).reshape(-1, dim)
                ready = all(self.codebooks[j].initialized for j in self.waits_for[k])
                vectors, indices = codebook(flat, gather=ready)
                chosen = vectors.view(batch, frames, dim).transpose(1, 2)
                coded = residual * codebook.dims[:, None]  # what this codebook quantizes
                commit_per_item = commit_per_item + (coded - chosen).pow(2).mean(dim=(1, 2))
                if return_embeddings:
                    embeddings.append(coded + (chosen - coded).detach())
                # `chosen` has no gradient, so the next residual keeps an identity gradient to x.
                residual = residual - chosen
                total = total + chosen
                codes.append(indices.view(batch, frames))
            # The decoder's input in the encoder's dtype (that of the decoder's weights outside
            # autocast); losses and embeddings stay float32.
            quantized = (x + (total - x).detach()).to(input_dtype)
        return QuantizerOutput(quantized=quantized, codes=torch.stack(codes, dim=1),
                               commit_loss=commit_per_item.mean(),
                               embeddings=embeddings if return_embeddings else None,
                               commit_per_item=commit_per_item)

    def share_content(self, x: torch.Tensor, views: int) -> torch.Tensor:
        """`x` `[B*V, D, F]` (V views of each item, view-minor rows) with the content part of
        each item's views replaced by its mean over the views.

        Quantizing the result codes codebook 1 once per item, from a content latent that is no
        one view's, while each view keeps its own channel part for codebook 2: the
        shared-content use (one codebook-1 stream for several channels) built into training.
        Only a split quantizer has a content part that codebook 2 never sees.
        """
        if not self.content_dims:
            raise ValueError("a shared content code needs the split quantizer: set "
                             "model.content_share > 0 (codebook 1 of EnCodec's residual "
                             "quantizer codes every dimension)")
        if views < 2 or x.shape[0] % views:
            raise ValueError(f"share_content needs >= 2 views dividing the batch, got "
                             f"{views} views of {x.shape[0]} rows")
        grouped = x.unflatten(0, (-1, views))
        content = grouped[:, :, :self.content_dims].mean(dim=1, keepdim=True)
        shared = torch.cat([content.expand(-1, views, -1, -1),
                            grouped[:, :, self.content_dims:]], dim=2)
        return shared.flatten(0, 1)

    def embeddings(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-codebook embeddings `[B, D, F]` of `x` `[B, D, F]`, as `forward` returns them
        (each the chosen vectors with the straight-through gradient of its residual), but
        without updating any codebook: for an extra view of an item that must not count
        twice in the codebooks' statistics (`PairwiseLoss.invariance_loss`)."""
        self._check_latent(x)
        with float32_region(x):
            residual = x.float()
            batch, dim, frames = residual.shape
            embeddings = []
            for codebook in self.codebooks:
                flat = residual.detach().transpose(1, 2).reshape(-1, dim)
                chosen = codebook.decode(codebook.encode(flat)).view(batch, frames, dim)
                chosen = chosen.transpose(1, 2)
                coded = residual * codebook.dims[:, None]
                embeddings.append(coded + (chosen - coded).detach())
                residual = residual - chosen
        return embeddings

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes `[B, n_q, F]` of `x` `[B, D, F]`; never updates the codebooks."""
        self._check_latent(x)
        with float32_region(x):
            residual = x.float().transpose(1, 2)
            batch, frames, dim = residual.shape
            codes = []
            for codebook in self.codebooks:
                indices = codebook.encode(residual.reshape(-1, dim)).view(batch, frames)
                residual = residual - codebook.decode(indices)
                codes.append(indices)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """`[B, D, F]` sum of the vectors of `codes` `[B, K, F]` (the first K <= n_q codebooks)."""
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.n_q:
            raise ValueError(f"codes must be [B, K, F] with 1 <= K <= n_q={self.n_q}, "
                             f"got shape {tuple(codes.shape)}.")
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be integer (long), got {codes.dtype}.")
        quantized = self.codebooks[0].decode(codes[:, 0])
        for k in range(1, codes.shape[1]):
            quantized = quantized + self.codebooks[k].decode(codes[:, k])
        return quantized.transpose(1, 2)

    def _check_latent(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.dimension:
            raise ValueError(f"expected a latent [B, {self.dimension}, F], "
                             f"got shape {tuple(x.shape)}.")
