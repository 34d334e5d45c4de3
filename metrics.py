"""Evaluation metrics shared by the training engine's validation and `evaluate.py`.

Everything here is a plain tensor function or a small accumulator, so that the engine's
per-epoch validation and the offline report compute the same numbers the same way.

Shapes used throughout: waveforms `[N, C, T]`, codes `[N, n_q, F]`, per-codebook embeddings
`list[Tensor [N, D, F]]`. Batches of paired items add a view axis after the batch axis:
`[B, V, ...]`.

Three groups of metrics:
- reconstruction: `si_snr`, `mel_distance`, `stft_distance` (per item), `nominal_bitrate_kbps`;
- codebook health: `codebook_histogram` and `histogram_entropy` (perplexity, dead codes);
- disentanglement (does codebook 1 carry what the channels share and codebook 2 what
  differs?): cross-channel code agreement and embedding cosine against their chance levels,
  `centered_pooled_cosine`, `swap_test`, `channel_probe_accuracy`.
`MetricAccumulator` collects all of them over a validation set and returns one dict;
`flatten_metrics` turns that dict into the flat scalars that are logged, and
`CheckpointReport` holds one checkpoint's results for the evaluation report.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torchaudio
from torch import Tensor
from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

MEL_FFTS = (512, 1024, 2048)
MEL_BINS = 64
STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop)
LOG_EPS = 1e-5


# ----------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------

def _check_pair(x: Tensor, y: Tensor, min_length: int = 1) -> None:
    if x.shape != y.shape:
        raise ValueError(f"reference and estimate shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() < 2:
        raise ValueError(f"expected waveforms [N, T] or [N, C, T], got shape {tuple(x.shape)}")
    if x.shape[-1] < min_length:
        raise ValueError(f"signals of {x.shape[-1]} samples are too short for this metric "
                         f"(need at least {min_length}); evaluate longer segments")


def _per_item(values: Tensor) -> Tensor:
    """Average everything but the leading (item) dimension."""
    return values.reshape(values.shape[0], -1).mean(dim=1)


def si_snr(x: Tensor, y: Tensor) -> Tensor:
    """Scale-invariant SNR in dB of estimate `y` against reference `x`, one value per item.

    `x`, `y`: `[N, T]` or `[N, C, T]` (channels averaged). Identical signals give about
    +100 dB (torchmetrics' epsilon), so higher is better with no fixed ceiling.
    """
    _check_pair(x, y)
    return _per_item(scale_invariant_signal_noise_ratio(y.float(), x.float()))


@functools.lru_cache(maxsize=32)
def _mel_transform(sample_rate: int, n_fft: int, device: torch.device) -> torchaudio.transforms.MelSpectrogram:
    # Cached so that the filterbanks are built once per (rate, size, device), not per batch.
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=MEL_BINS,
        power=1.0).to(device)


@functools.lru_cache(maxsize=32)
def _magnitude_transform(n_fft: int, hop: int, device: torch.device) -> torchaudio.transforms.Spectrogram:
    return torchaudio.transforms.Spectrogram(n_fft=n_fft, hop_length=hop, power=1.0).to(device)


@torch.no_grad()
def mel_distance(x: Tensor, y: Tensor, sample_rate: int = 24000) -> Tensor:
    """Multi-scale log-mel L1 distance (lower is better; 0 for identical signals), `[N]`.

    Mean absolute difference of log10 mel magnitudes (64 bands) at FFT sizes 512, 1024 and
    2048 (hop n_fft / 4), averaged over scales. Computed in float32.
    """
    _check_pair(x, y, min_length=max(MEL_FFTS) // 2 + 1)
    x, y = x.float(), y.float()
    total = torch.zeros(x.shape[0], device=x.device)
    for n_fft in MEL_FFTS:
        mel = _mel_transform(int(sample_rate), n_fft, x.device)
        diff = torch.log10(mel(x) + LOG_EPS) - torch.log10(mel(y) + LOG_EPS)
        total += _per_item(diff.abs())
    return total / len(MEL_FFTS)


@torch.no_grad()
def stft_distance(x: Tensor, y: Tensor) -> Tensor:
    """Multi-resolution STFT distance, `[N]`: spectral convergence + log-magnitude L1.

    Averaged over (n_fft, hop) in (512, 128), (1024, 256), (2048, 512); 0 for identical
    signals. Spectral convergence is ||Y| - |X||_F / ||X||_F per item.
    """
    _check_pair(x, y, min_length=max(n for n, _ in STFT_RESOLUTIONS) // 2 + 1)
    x, y = x.float(), y.float()
    total = torch.zeros(x.shape[0], device=x.device)
    for n_fft, hop in STFT_RESOLUTIONS:
        spec = _magnitude_transform(n_fft, hop, x.device)
        mag_x, mag_y = spec(x).flatten(1), spec(y).flatten(1)
        convergence = (mag_y - mag_x).norm(dim=1) / mag_x.norm(dim=1).clamp_min(LOG_EPS)
        log_l1 = (torch.log(mag_x + LOG_EPS) - torch.log(mag_y + LOG_EPS)).abs().mean(dim=1)
        total += convergence + log_l1
    return total / len(STFT_RESOLUTIONS)


def nominal_bitrate_kbps(n_q: int, bins: int, frame_rate: float) -> float:
    """Bitrate of the token stream if every code costs log2(bins) bits, per channel."""
    return n_q * math.log2(bins) * frame_rate / 1000.0


# ----------------------------------------------------------------------------------------
# Codebook health
# ----------------------------------------------------------------------------------------

def _check_codes(codes: Tensor, bins: int | None = None) -> None:
    if codes.dim() != 3:
        raise ValueError(f"expected codes [N, n_q, F], got shape {tuple(codes.shape)}")
    if codes.is_floating_point():
        raise ValueError("codes must be an integer tensor (indices into the codebooks)")
    if bins is not None and codes.numel() and (codes.min() < 0 or codes.max() >= bins):
        raise ValueError(f"codes out of range [0, {bins}): min {int(codes.min())}, "
                         f"max {int(codes.max())}; is `bins` the model's codebook size?")


def codebook_histogram(codes: Tensor, bins: int) -> Tensor:
    """Usage counts of each code, `[n_q, bins]` (int64), from codes `[N, n_q, F]`."""
    _check_codes(codes, bins)
    return code_counts(codes, bins)


def code_counts(codes: Tensor, bins: int) -> Tensor:
    """`codebook_histogram` without the range check (which costs a host sync): for codes
    straight from the model, e.g. in the training step."""
    per_codebook = codes.transpose(0, 1).reshape(codes.shape[1], -1).long()
    hist = torch.zeros(codes.shape[1], bins, dtype=torch.long, device=codes.device)
    return hist.scatter_add_(1, per_codebook, torch.ones_like(per_codebook))


def histogram_entropy(hist: Tensor) -> Tensor:
    """Entropy in nats of each row of a usage histogram `[n_q, bins]` -> `[n_q]`."""
    probs = hist.double() / hist.sum(dim=1, keepdim=True).clamp_min(1)
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=1)


# ----------------------------------------------------------------------------------------
# Disentanglement: agreement and similarity across channels of the same segment
# ----------------------------------------------------------------------------------------

def _per_item_agreement(codes_a: Tensor, codes_b: Tensor) -> Tensor:
    """Fraction of frames with equal codes, `[N, n_q]`."""
    _check_codes(codes_a)
    if codes_a.shape != codes_b.shape:
        raise ValueError(f"codes shapes differ: {tuple(codes_a.shape)} vs {tuple(codes_b.shape)}")
    return (codes_a == codes_b).float().mean(dim=2)


def _per_item_cosine(emb_a: Sequence[Tensor], emb_b: Sequence[Tensor]) -> Tensor:
    """Frame-wise cosine similarity of the embeddings, averaged over frames, `[N, n_q]`."""
    if len(emb_a) != len(emb_b):
        raise ValueError(f"embedding lists differ in length: {len(emb_a)} vs {len(emb_b)}")
    return torch.stack([torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).mean(dim=1)
                        for a, b in zip(emb_a, emb_b)], dim=1)


def _rolled(items: Tensor) -> Tensor:
    """Shift the items by one so that item i meets item i + 1 (a different segment)."""
    if items.shape[0] < 2:
        raise ValueError("chance level needs at least 2 items (different segments)")
    return items.roll(-1, dims=0)


def centered_pooled_cosine(pooled: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-view cosine of time-pooled embeddings after removing their mean over the set.

    `pooled`: `[N, V, n_q, D]`, per-codebook embeddings averaged over frames. Returns
    `(same, chance)`, each `[n_q]`: views i < j of the same item, and view i of item n
    against view j of item n + 1. Raw cosines of codebook vectors are often all near 1, because the vectors in use
    share a large common offset; centring removes it, so that what remains is whether the
    two channels move together (about 0 for unrelated segments).
    """
    if pooled.dim() != 4 or pooled.shape[1] < 2:
        raise ValueError(f"expected pooled embeddings [N, V >= 2, n_q, D], got {tuple(pooled.shape)}")
    centered = pooled - pooled.mean(dim=(0, 1), keepdim=True)
    following = _rolled(centered)
    pairs = list(itertools.combinations(range(pooled.shape[1]), 2))
    cosine = torch.nn.functional.cosine_similarity
    same = torch.stack([cosine(centered[:, i], centered[:, j], dim=-1) for i, j in pairs]).mean(dim=(0, 1))
    chance = torch.stack([cosine(centered[:, i], following[:, j], dim=-1) for i, j in pairs]).mean(dim=(0, 1))
    return same, chance


# ----------------------------------------------------------------------------------------
# Swap test
# ----------------------------------------------------------------------------------------

def swap_variants(n_q: int, content_codebook: int = 0) -> dict[str, tuple[str | None, ...]]:
    """Which view ('a', 'b' or None = left out) feeds each codebook, per swap-test variant.

    - `recon_a`: all codebooks of A (plain reconstruction of x_A);
    - `swap`: the content codebook of A, every other codebook of B. If the content codebook
      carries what the channels share and the others the channel, this sounds like x_B;
    - `content_a`: the content codebook of A alone;
    - `rest_b`: the other codebooks of B alone.
    """
    if not 0 <= content_codebook < n_q:
        raise ValueError(f"content_codebook {content_codebook} out of range for n_q={n_q}")
    if n_q < 2:
        raise ValueError("the swap test needs at least 2 codebooks")
    only = lambda view, keep_content: tuple(  # noqa: E731
        view if (k == content_codebook) == keep_content else None for k in range(n_q))
    return {
        "recon_a": ("a",) * n_q,
        "swap": tuple("a" if k == content_codebook else "b" for k in range(n_q)),
        "content_a": only("a", True),
        "rest_b": only("b", False),
    }


def mix_embeddings(sources: Sequence[str | None], emb_a: Sequence[Tensor],
                   emb_b: Sequence[Tensor]) -> Tensor:
    """Latent `[N, D, F]` = sum of the chosen codebooks' embeddings (left-out ones add 0)."""
    if len(sources) != len(emb_a) or len(emb_a) != len(emb_b):
        raise ValueError(f"need one source per codebook: {len(sources)} sources, "
                         f"{len(emb_a)} and {len(emb_b)} codebooks")
    latent = torch.zeros_like(emb_a[0])
    for source, a, b in zip(sources, emb_a, emb_b):
        if source == "a":
            latent = latent + a
        elif source == "b":
            latent = latent + b
        elif source is not None:
            raise ValueError(f"source must be 'a', 'b' or None, got {source!r}")
    return latent


@torch.no_grad()
def swap_test(decode: Callable[[Tensor, str], Tensor], emb_a: Sequence[Tensor],
              emb_b: Sequence[Tensor], x_a: Tensor, x_b: Tensor, sample_rate: int = 24000,
              content_codebook: int = 0) -> dict[str, dict[str, Tensor]]:
    """Decode mixtures of two channels' codebooks and measure distances to x_A and x_B.

    `decode(latent [N, D, F], level_view)` turns a quantized latent into audio `[N, C, T]`
    shaped like `x_a`; `level_view` ('a' or 'b') says whose loudness to restore: the view
    that provides the channel codebooks (B in `swap` and `rest_b`, A otherwise).
    Returns `{variant: {'mel_to_a', 'mel_to_b', 'si_snr_to_a', 'si_snr_to_b'}: [N]}` for the
    variants of `swap_variants`. The disentanglement signal is `swap`: closer to x_B than
    to x_A (`mel_to_b < mel_to_a`) means the channel identity follows the channel codebooks.
    """
    results = {}
    for name, sources in swap_variants(len(emb_a), content_codebook).items():
        level_view = "b" if "b" in sources else "a"
        audio = decode(mix_embeddings(sources, emb_a, emb_b), level_view)
        audio = audio[..., : x_a.shape[-1]]
        results[name] = {
            "mel_to_a": mel_distance(x_a, audio, sample_rate),
            "mel_to_b": mel_distance(x_b, audio, sample_rate),
            "si_snr_to_a": si_snr(x_a, audio),
            "si_snr_to_b": si_snr(x_b, audio),
        }
    return results


# ----------------------------------------------------------------------------------------
# Channel-identity probe
# ----------------------------------------------------------------------------------------

def probe_split(n_items: int) -> tuple[Tensor, Tensor]:
    """Indices of the probe's training and test halves: even and odd items.

    Interleaved rather than first/second half, because validation items are ordered by file
    and class, and a contiguous split would test on scenes the probe never saw.
    """
    index = torch.arange(n_items)
    return index[0::2], index[1::2]


def train_logistic_probe(features: Tensor, labels: Tensor, num_classes: int, steps: int = 200,
                         weight_decay: float = 1e-3) -> Callable[[Tensor], Tensor]:
    """Multinomial logistic regression fit by full-batch L-BFGS; returns `predict(x) -> labels`.

    Features are standardised with the training statistics; a small L2 penalty keeps the
    solution finite when the training set is separable.
    """
    mean, std = features.mean(dim=0), features.std(dim=0, unbiased=False).clamp_min(1e-6)
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, labels)
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda z: (((z - mean) / std) @ weight + bias).argmax(dim=1)


def channel_probe_accuracy(features: Tensor, channels: Tensor, steps: int = 200) -> tuple[list[float], float]:
    """Channel-identity probe per codebook: `(accuracy per codebook, chance level)`.

    `features`: `[N, V, n_q, D]` time-pooled embeddings of the V views of N items;
    `channels`: `[N, V]` microphone channel of each view (the label). A logistic regression
    is trained on the views of the even items and scored on the odd ones (`probe_split`).
    Chance is the accuracy of guessing uniformly among the channels seen in training:
    1 / number of channels present when every channel occurs in both halves (the usual case),
    lower when test views carry channels the probe never saw. A codebook that carries the
    channel scores far above chance; one that carries only shared content stays near it.
    """
    if features.dim() != 4 or channels.shape != features.shape[:2]:
        raise ValueError(f"expected features [N, V, n_q, D] and channels [N, V], got "
                         f"{tuple(features.shape)} and {tuple(channels.shape)}")
    n_items, _, n_q, _ = features.shape
    if n_items < 2:
        raise ValueError("the probe needs at least 2 items (one to train on, one to test on)")
    present, labels = torch.unique(channels, return_inverse=True)
    train_idx, test_idx = probe_split(n_items)
    y_train, y_test = labels[train_idx].flatten(), labels[test_idx].flatten()
    seen = torch.unique(y_train)
    chance = torch.isin(y_test, seen).double().mean().item() / len(seen)
    accuracies = []
    for k in range(n_q):
        x_train = features[train_idx, :, k].flatten(0, 1).double()
        x_test = features[test_idx, :, k].flatten(0, 1).double()
        predict = train_logistic_probe(x_train, y_train, len(present), steps)
        accuracies.append((predict(x_test) == y_test).double().mean().item())
    return accuracies, chance


# ----------------------------------------------------------------------------------------
# Accumulator
# ----------------------------------------------------------------------------------------

class MetricAccumulator:
    """Collects per-batch statistics over a validation set; `compute()` returns one dict.

    Fed by `validation.accumulate` for both the engine's validation and `evaluate.py`; by
    hand, batches of V views go in like this:

        acc = MetricAccumulator(n_q=model.n_q, bins=cfg.model.bins,
                                sample_rate=model.sample_rate, frame_rate=model.frame_rate)
        for wavs, metas in loader:                      # wavs [B, V, 1, T]
            out = model(wavs.flatten(0, 1), return_embeddings=True)
            acc.update(wavs, out.audio, out.codes, out.embeddings,
                       torch.tensor([m["channels"] for m in metas]))
        results = acc.compute()

    Memory stays small: per-item scalars, code histograms and time-pooled embeddings (for
    the probe). The chance levels pair view i of item n with view j of item n + 1 across the
    whole stream (wrapping around at the end), so they do not depend on the batch size.
    """

    def __init__(self, n_q: int, bins: int, sample_rate: int, frame_rate: float,
                 probe_steps: int = 200):
        self.n_q, self.bins = int(n_q), int(bins)
        self.sample_rate, self.frame_rate = int(sample_rate), float(frame_rate)
        self.probe_steps = probe_steps
        self.reset()

    def reset(self) -> None:
        """Forget everything collected so far."""
        self._recon: dict[str, list[Tensor]] = {"si_snr": [], "mel_distance": [], "stft_distance": []}
        self._hist = torch.zeros(self.n_q, self.bins, dtype=torch.long)
        self._agreement: list[Tensor] = []
        self._cosine: list[Tensor] = []
        self._chance_agreement: list[Tensor] = []
        self._chance_cosine: list[Tensor] = []
        self._pooled: list[Tensor] = []
        self._channels: list[Tensor] = []
        self._swap: dict[str, dict[str, list[Tensor]]] = {}
        self._first_item = None    # (codes [V, n_q, F], embeddings) of the very first item
        self._pending_item = None  # last item seen, waiting for its successor
        self.num_items = 0
        self.views = None

    # -- collection ------------------------------------------------------------------

    @torch.no_grad()
    def update(self, wavs: Tensor, audio: Tensor, codes: Tensor,
               embeddings: Sequence[Tensor] | None = None, channels: Tensor | None = None,
               swap: dict[str, dict[str, Tensor]] | None = None) -> None:
        """Add one batch.

        `wavs`: `[B, V, C, T]` inputs. `audio`, `codes` and each of `embeddings` either
        shaped `[B, V, ...]` or flattened view-major `[B * V, ...]` (the model's output on
        `wavs.flatten(0, 1)`). `channels`: `[B, V]` microphone indices (for the probe).
        `swap`: optional per-item results of `swap_test` for this batch.
        """
        if wavs.dim() != 4:
            raise ValueError(f"expected wavs [B, V, C, T], got shape {tuple(wavs.shape)}")
        batch_size, views = wavs.shape[:2]
        if self.views is None:
            self.views = views
        elif views != self.views:
            raise ValueError(f"number of views changed from {self.views} to {views} between batches")
        unflat = lambda t: t.reshape(batch_size, views, *t.shape[-2:]) if t.dim() == 3 else t  # noqa: E731
        audio, codes = unflat(audio), unflat(codes).detach().cpu()
        if codes.shape[2] != self.n_q:
            raise ValueError(f"codes have {codes.shape[2]} codebooks, the accumulator expects {self.n_q}")
        embeddings = None if embeddings is None else [unflat(e).detach().float().cpu() for e in embeddings]

        reference = wavs.to(audio.device).flatten(0, 1)  # inputs often stay on the CPU
        self._update_reconstruction(reference, audio[..., : wavs.shape[-1]].flatten(0, 1), batch_size, views)
        self._hist += codebook_histogram(codes.flatten(0, 1), self.bins)
        if embeddings is not None:
            self._pooled.append(torch.stack([e.mean(dim=-1) for e in embeddings], dim=2))
        if channels is not None:
            self._channels.append(torch.as_tensor(channels, dtype=torch.long).reshape(batch_size, views))
        if views >= 2:
            self._update_pairs(codes, embeddings)
        if swap is not None:
            for variant, values in swap.items():
                for name, value in values.items():
                    self._swap.setdefault(variant, {}).setdefault(name, []).append(value.detach().float().cpu())
        self.num_items += batch_size

    def _update_reconstruction(self, x: Tensor, y: Tensor, batch_size: int, views: int) -> None:
        for name, value in (("si_snr", si_snr(x, y)),
                            ("mel_distance", mel_distance(x, y, self.sample_rate)),
                            ("stft_distance", stft_distance(x, y))):
            self._recon[name].append(value.detach().cpu().reshape(batch_size, views))

    def _update_pairs(self, codes: Tensor, embeddings: list[Tensor] | None) -> None:
        same_agree, same_cos = self._pair_stats(codes, embeddings, codes, embeddings)
        self._agreement.append(same_agree)
        self._cosine.append(same_cos)
        # Chance: views of item n against views of item n + 1, carried across batches.
        items = [(codes[n], None if embeddings is None else [e[n] for e in embeddings])
                 for n in range(codes.shape[0])]
        if self._first_item is None:
            self._first_item = items[0]
        else:
            items = [self._pending_item, *items]
        for current, following in zip(items[:-1], items[1:]):
            self._add_chance_pair(current, following)
        self._pending_item = items[-1]

    def _add_chance_pair(self, current, following) -> None:
        agree, cos = self._pair_stats(current[0][None], self._wrap(current[1]),
                                      following[0][None], self._wrap(following[1]))
        self._chance_agreement.append(agree)
        self._chance_cosine.append(cos)

    @staticmethod
    def _pair_stats(codes_a: Tensor, emb_a, codes_b: Tensor, emb_b) -> tuple[Tensor, Tensor | None]:
        """Agreement and cosine `[N, pairs, n_q]` of view i of `*_a` with view j of `*_b`, i < j."""
        pairs = list(itertools.combinations(range(codes_a.shape[1]), 2))
        agree = torch.stack([_per_item_agreement(codes_a[:, i], codes_b[:, j]) for i, j in pairs], dim=1)
        if emb_a is None or emb_b is None:
            return agree, None
        cos = torch.stack([_per_item_cosine([e[:, i] for e in emb_a], [e[:, j] for e in emb_b])
                           for i, j in pairs], dim=1)
        return agree, cos

    # -- results ---------------------------------------------------------------------

    def compute(self) -> dict:
        """All metrics as plain Python numbers and lists (JSON-ready).

        Scalars: `si_snr`, `mel_distance`, `stft_distance` (means over items and views),
        `bitrate_kbps` (nominal), `effective_bitrate_kbps` (from the code entropies),
        `num_items`, `probe_chance`. Per view: `*_per_view`. Per codebook (lists): `perplexity`,
        `entropy` (nats), `effective_bits` (log2 perplexity), `dead_codes`, `code_histogram`,
        `codebook_agreement`, `chance_agreement`, `embedding_cosine`, `chance_cosine`,
        `centered_cosine`, `chance_centered_cosine` (`centered_pooled_cosine`), `probe_accuracy`.
        `swap_test`: `{variant: {metric: mean}}`. Entries that need more than one view,
        embeddings or channel labels are None when those are missing.
        """
        if self.num_items == 0:
            raise RuntimeError("MetricAccumulator.compute() called before any update()")
        results: dict = {"num_items": self.num_items, "views": self.views}
        for name, values in self._recon.items():
            per_item = torch.cat(values)
            results[name] = per_item.mean().item()
            results[f"{name}_per_view"] = per_item.mean(dim=0).tolist()
        results.update(self._codebook_results())
        results.update(self._pair_results())
        results.update(self._probe_results())
        results["swap_test"] = {variant: {name: torch.cat(vals).mean().item() for name, vals in metrics.items()}
                                for variant, metrics in self._swap.items()} or None
        return results

    def _codebook_results(self) -> dict:
        entropy = histogram_entropy(self._hist)
        return {
            "bitrate_kbps": nominal_bitrate_kbps(self.n_q, self.bins, self.frame_rate),
            "effective_bitrate_kbps": (entropy / math.log(2)).sum().item() * self.frame_rate / 1000.0,
            "perplexity": entropy.exp().tolist(),
            "entropy": entropy.tolist(),
            "effective_bits": (entropy / math.log(2)).tolist(),
            "dead_codes": (self._hist == 0).sum(dim=1).tolist(),
            "code_histogram": self._hist.tolist(),
        }

    def _pair_results(self) -> dict:
        results = dict.fromkeys(["codebook_agreement", "chance_agreement", "embedding_cosine", "chance_cosine",
                                 "centered_cosine", "chance_centered_cosine"])
        if not self._agreement:
            return results
        chance_agree, chance_cos = list(self._chance_agreement), list(self._chance_cosine)
        if self.num_items >= 2:  # close the ring: the last item meets the first one
            agree, cos = self._pair_stats(self._pending_item[0][None], self._wrap(self._pending_item[1]),
                                          self._first_item[0][None], self._wrap(self._first_item[1]))
            chance_agree.append(agree)
            chance_cos.append(cos)
        mean = lambda parts: torch.cat(parts).mean(dim=(0, 1)).tolist()  # noqa: E731
        results["codebook_agreement"] = mean(self._agreement)
        if len(chance_agree):
            results["chance_agreement"] = mean(chance_agree)
        if self._cosine[0] is not None:
            results["embedding_cosine"] = mean(self._cosine)
            if chance_cos and chance_cos[0] is not None:
                results["chance_cosine"] = mean(chance_cos)
        if self._pooled and self.num_items >= 2:
            same, chance = centered_pooled_cosine(torch.cat(self._pooled))
            results["centered_cosine"], results["chance_centered_cosine"] = same.tolist(), chance.tolist()
        return results

    @staticmethod
    def _wrap(embeddings):
        return None if embeddings is None else [e[None] for e in embeddings]

    def _probe_results(self) -> dict:
        results = {"probe_accuracy": None, "probe_chance": None}
        if not self._pooled or len(self._channels) != len(self._pooled) or self.num_items < 2:
            return results
        channels = torch.cat(self._channels)
        if len(torch.unique(channels)) < 2:
            return results  # one channel only: nothing to tell apart
        accuracy, chance = channel_probe_accuracy(torch.cat(self._pooled), channels, self.probe_steps)
        return {"probe_accuracy": accuracy, "probe_chance": chance}


# ----------------------------------------------------------------------------------------
# Results as logged and reported
# ----------------------------------------------------------------------------------------

# Accumulator result -> logged name prefix, for the per-codebook lists.
PER_CODEBOOK = {"perplexity": "perplexity", "dead_codes": "dead_codes",
                "codebook_agreement": "agreement", "chance_agreement": "chance_agreement",
                "embedding_cosine": "cosine", "chance_cosine": "chance_cosine",
                "probe_accuracy": "probe_accuracy"}
SCALARS = ("si_snr", "mel_distance", "stft_distance", "effective_bitrate_kbps", "probe_chance")
PER_VIEW = ("si_snr", "mel_distance")


def flatten_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`MetricAccumulator.compute()` results -> flat scalars for logging.

    Per-codebook lists become `<name>_cbK`, per-view lists `<name>_chV` (K, V from 1), and
    the swap test `swap_<variant>_<metric>`; entries that are None are left out.
    """
    flat: dict[str, float] = {}
    for key in SCALARS:
        if results.get(key) is not None:
            flat[key] = float(results[key])
    for key in PER_VIEW:
        for v, value in enumerate(results.get(f"{key}_per_view") or []):
            flat[f"{key}_ch{v + 1}"] = float(value)
    for key, name in PER_CODEBOOK.items():
        for k, value in enumerate(results.get(key) or []):
            flat[f"{name}_cb{k + 1}"] = float(value)
    for variant, values in (results.get("swap_test") or {}).items():
        for name, value in values.items():
            flat[f"swap_{variant}_{name}"] = float(value)
    return flat


def per_codebook(results: dict[str, Any], key: str, k: int) -> Any:
    """Codebook k's entry of the per-codebook list `results[key]`, or None."""
    values = results.get(key)
    return values[k] if values is not None and k < len(values) else None


@dataclass
class CheckpointReport:
    """Everything measured for one checkpoint: its metrics and a few waveforms to plot.

    Attributes:
        label: column name in the report.
        path: the checkpoint file.
        mode: 'mono' or 'paired' (how it was trained).
        results: `MetricAccumulator.compute()` results plus `step` and `sample_rate`.
        examples: waveform name ('input_a', 'recon_b', 'swap', ...) -> `[items, T]`.
    """
    label: str
    path: str
    mode: str
    results: dict[str, Any]
    examples: dict[str, Tensor] = field(default_factory=dict)

    def entry(self) -> dict[str, Any]:
        """The checkpoint's metrics.json entry."""
        return {"checkpoint": self.path, "mode": self.mode, **self.results}
