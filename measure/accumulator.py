"""`MetricAccumulator`: every metric of a validation set, collected batch by batch.

The engine's per-epoch validation and `evaluate.py` both feed it (through
`validation.accumulate`), so that they compute the same numbers the same way; the
`InstrumentSettings` say how much work the set-level statistics (probes, bootstrap) do.
The per-batch functions are in measure/metrics.py (reconstruction, codes, agreement) and
measure/pair_cues.py (swap gain, ILD / ITD fidelity); the probes in measure/probes.py.
`results.flatten_metrics` turns `compute()`'s dict into the flat scalars that are logged.

Batches of paired items add a view axis after the batch axis: `[B, V, ...]`.
"""
from __future__ import annotations

import functools
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from measure import pair_cues
from modules import spatial_cues
from measure.metrics import (centered_pooled_cosine, codebook_histogram, histogram_entropy,
                             mel_distance, nominal_bitrate_kbps, per_item_agreement,
                             per_item_cosine, si_snr, stft_distance)
from measure.pair_cues import PairCues


@dataclass(frozen=True)
class InstrumentSettings:
    """How much work the set-level statistics do. The defaults are the per-epoch
    validation's light settings; `evaluate.py` passes the full ones (config/evaluate.yaml).

    Attributes:
        probe_folds: outer folds of the probes (grouped by file; fewer files, fewer folds).
        probe_shuffles: label permutations of the shuffled-label baseline.
        ild_probe_alpha: ridge strength of the ILD probe; None: chosen by nested grouped CV
            over `probes.RIDGE_ALPHAS` inside each training fold.
        channel_probe_c: inverse penalty of the channel-index probe; None: nested CV over
            `probes.LOGISTIC_CS`.
        bootstrap: resamples of the swap gain's confidence interval (files resampled).
        seed: seed of the folds, permutations and bootstrap.
    """
    probe_folds: int = 5
    probe_shuffles: int = 1
    ild_probe_alpha: float | None = 10.0
    channel_probe_c: float | None = 0.1
    bootstrap: int = 1000
    seed: int = 0


class MetricAccumulator:
    """Collects per-batch statistics over a validation set; `compute()` returns one dict.

    Fed by `validation.accumulate` for both the engine's validation and `evaluate.py`; by
    hand, batches of V views go in like this (all decodes at the pair's common scale):

        acc = MetricAccumulator(n_q=model.n_q, bins=cfg.model.bins,
                                sample_rate=model.sample_rate, frame_rate=model.frame_rate)
        for wavs, metas in loader:                      # wavs [B, V, 1, T]
            x = wavs.flatten(0, 1)
            scale = EncodecModel.shared_scale(x, wavs.shape[1])
            out = model(x, return_embeddings=True, scale=scale)
            acc.update(wavs, out.audio, out.codes, out.embeddings,
                       torch.tensor([m["channels"] for m in metas]),
                       groups=[m["path"] for m in metas])
        results = acc.compute()

    (`validation.measure_batch` adds the swap, the cues and the ceiling codes.) Memory
    stays small: per-item scalars and band levels, code histograms and time-pooled
    embeddings (for the probes). The chance levels pair view i of item n with view j of
    item n + 1 across the whole stream (wrapping around at the end), so they do not depend
    on the batch size.

    Args:
        n_q, bins: the model's codebooks and their size.
        sample_rate, frame_rate: the model's.
        settings: `InstrumentSettings` (default: the light per-epoch ones).
        capsules: `[C, 3]` capsule directions of the files' array
            (`pair_cues.separated_pairs`), or None: the swap gain then uses every pair and
            says so.
    """

    PROBE_KEYS = ("ild_probe_r2", "ild_probe_r2_std", "ild_probe_r2_shuffled",
                  "ild_probe_r2_shuffled_std", "channel_probe_accuracy",
                  "channel_probe_accuracy_std", "channel_probe_accuracy_shuffled",
                  "channel_probe_accuracy_shuffled_std", "channel_probe_chance", "probe_folds",
                  "probe_groups", "probe_note")

    def __init__(self, n_q: int, bins: int, sample_rate: int, frame_rate: float,
                 settings: InstrumentSettings | None = None, capsules: Any = None,
                 split_quantizer: bool = False):
        self.n_q, self.bins = int(n_q), int(bins)
        self.split_quantizer = bool(split_quantizer)
        self.sample_rate, self.frame_rate = int(sample_rate), float(frame_rate)
        self.settings = settings or InstrumentSettings()
        self.capsules = capsules
        self.reset()

    def reset(self) -> None:
        """Forget everything collected so far."""
        self._reconstruction: dict[str, list[Tensor]] = {
            "si_snr": [], "mel_distance": [], "stft_distance": []}
        self._reconstruction_own_scale: dict[str, list[Tensor]] = {
            "si_snr": [], "mel_distance": []}
        self._code_histogram = torch.zeros(self.n_q, self.bins, dtype=torch.long)
        self._agreement: list[Tensor] = []
        self._cosine: list[Tensor] = []
        self._chance_agreement: list[Tensor] = []
        self._chance_cosine: list[Tensor] = []
        self._ceiling_agreement: list[Tensor] = []
        self._pooled_embeddings: list[Tensor] = []
        self._channels: list[Tensor] = []
        self._groups: list[str] = []
        self._cues: list[PairCues] = []
        self._first_item = None    # (codes [V, n_q, F], embeddings) of the very first item
        self._pending_item = None  # last item seen, waiting for its successor
        self.num_items = 0
        self.views = None

    # -- collection ------------------------------------------------------------------

    @torch.no_grad()
    def update(self, wavs: Tensor, audio: Tensor, codes: Tensor,
               embeddings: Sequence[Tensor] | None = None, channels: Tensor | None = None, *,
               groups: Sequence[str] | None = None, ceiling_codes: Tensor | None = None,
               cues: PairCues | None = None, audio_own_scale: Tensor | None = None) -> None:
        """Add one batch.

        `wavs`: `[B, V, C, T]` inputs. `audio`, `codes`, `ceiling_codes` and each of
        `embeddings` either shaped `[B, V, ...]` or flattened view-major `[B * V, ...]` (the
        model's output on `wavs.flatten(0, 1)`). `audio` is the reconstruction the
        reconstruction metrics score (validation: at the pair's common scale);
        `audio_own_scale` optionally the same with each channel at its own RMS.
        `channels`: `[B, V]` microphone indices (pair selection, channel probe). `groups`:
        `[B]` source file of each item (probe folds, bootstrap). `ceiling_codes`: codes of
        `metrics.ceiling_copy` of each view at the same scale. `cues`:
        `pair_cues.pair_cues` of the batch.
        """
        if wavs.dim() != 4:
            raise ValueError(f"expected wavs [B, V, C, T], got shape {tuple(wavs.shape)}")
        batch_size, views = wavs.shape[:2]
        if self.views is None:
            self.views = views
        elif views != self.views:
            raise ValueError(f"number of views changed from {self.views} to {views} "
                             f"between batches")

        def unflat(t: Tensor) -> Tensor:
            return t.reshape(batch_size, views, *t.shape[-2:]) if t.dim() == 3 else t

        audio, codes = unflat(audio), unflat(codes).detach().cpu()
        if codes.shape[2] != self.n_q:
            raise ValueError(f"codes have {codes.shape[2]} codebooks, "
                             f"the accumulator expects {self.n_q}")
        if embeddings is not None:
            embeddings = [unflat(e).detach().float().cpu() for e in embeddings]
        if groups is not None and len(groups) != batch_size:
            raise ValueError(f"groups has {len(groups)} entries for a batch of "
                             f"{batch_size} items")

        reference = wavs.to(audio.device).flatten(0, 1)  # inputs often stay on the CPU
        self._update_reconstruction(self._reconstruction, reference,
                                    audio[..., : wavs.shape[-1]].flatten(0, 1), batch_size, views)
        if audio_own_scale is not None:
            own = unflat(audio_own_scale)[..., : wavs.shape[-1]].flatten(0, 1)
            self._update_reconstruction(self._reconstruction_own_scale, reference.to(own.device),
                                        own, batch_size, views)
        self._code_histogram += codebook_histogram(codes.flatten(0, 1), self.bins)
        if embeddings is not None:
            self._pooled_embeddings.append(torch.stack([e.mean(dim=-1) for e in embeddings],
                                                       dim=2))
        if channels is not None:
            self._channels.append(torch.as_tensor(channels, dtype=torch.long)
                                  .reshape(batch_size, views).cpu())
        if groups is not None:
            self._groups.extend(str(g) for g in groups)
        if ceiling_codes is not None:
            ceiling = unflat(ceiling_codes).detach().cpu()
            if ceiling.shape != codes.shape:
                raise ValueError(f"ceiling codes {tuple(ceiling.shape)} differ in shape "
                                 f"from codes {tuple(codes.shape)}")
            # [B, n_q], views averaged
            self._ceiling_agreement.append((ceiling == codes).double().mean(dim=(1, 3)))
        if cues is not None:
            self._cues.append(cues.cpu())
        if views >= 2:
            self._update_pairs(codes, embeddings)
        self.num_items += batch_size

    def _update_reconstruction(self, store: dict[str, list[Tensor]], x: Tensor, y: Tensor,
                               batch_size: int, views: int) -> None:
        functions = {"si_snr": si_snr,
                     "mel_distance": lambda a, b: mel_distance(a, b, self.sample_rate),
                     "stft_distance": stft_distance}
        for name in store:
            store[name].append(functions[name](x, y).detach().cpu().reshape(batch_size, views))

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
        agree, cos = self._pair_stats(current[0][None], self._as_batch_of_one(current[1]),
                                      following[0][None], self._as_batch_of_one(following[1]))
        self._chance_agreement.append(agree)
        self._chance_cosine.append(cos)

    @staticmethod
    def _pair_stats(codes_a: Tensor, emb_a, codes_b: Tensor,
                    emb_b) -> tuple[Tensor, Tensor | None]:
        """Agreement and cosine `[N, pairs, n_q]` of view i of `*_a` with view j of `*_b`,
        i < j."""
        pairs = list(itertools.combinations(range(codes_a.shape[1]), 2))
        agree = torch.stack([per_item_agreement(codes_a[:, i], codes_b[:, j])
                             for i, j in pairs], dim=1)
        if emb_a is None or emb_b is None:
            return agree, None
        cos = torch.stack([per_item_cosine([e[:, i] for e in emb_a], [e[:, j] for e in emb_b])
                           for i, j in pairs], dim=1)
        return agree, cos

    @staticmethod
    def _as_batch_of_one(embeddings):
        return None if embeddings is None else [e[None] for e in embeddings]

    # -- results ---------------------------------------------------------------------

    def compute(self) -> dict:
        """All metrics as plain Python numbers, lists and dicts (JSON-ready but for NaN).

        Reconstruction (of `audio` as given: validation gives the pair's common scale):
        `si_snr`, `mel_distance`, `stft_distance` and `*_per_view`; `si_snr_own_scale`,
        `mel_distance_own_scale` (+ `_per_view`) when `audio_own_scale` was given.
        `bitrate_kbps` (nominal), `effective_bitrate_kbps` (from the code entropies),
        `num_items`, `views`.
        Per codebook (lists): `perplexity`, `entropy` (nats), `effective_bits`, `dead_codes`,
        `code_histogram`; `codebook_agreement` across the channels of a segment beside
        `chance_agreement` (different segments) and `ceiling_agreement` (a channel against
        its `ceiling_copy`); `embedding_cosine`, `chance_cosine`, `centered_cosine`,
        `chance_centered_cosine`.
        Swap (`pair_cues.swap_results`), cue fidelity (`ild_fidelity`, `itd_fidelity`),
        probes (`_probe_results`) and `per_pair` values. Entries whose inputs are missing
        (one view, no cues, no embeddings, no labels, one file) are None.
        """
        if self.num_items == 0:
            raise RuntimeError("MetricAccumulator.compute() called before any update()")
        results: dict = {"num_items": self.num_items, "views": self.views}
        for suffix, store in (("", self._reconstruction),
                              ("_own_scale", self._reconstruction_own_scale)):
            for name, values in store.items():
                per_item = torch.cat(values) if values else None
                results[f"{name}{suffix}"] = None if per_item is None else per_item.mean().item()
                results[f"{name}{suffix}_per_view"] = (None if per_item is None
                                                       else per_item.mean(dim=0).tolist())
        results.update(self._codebook_results())
        results.update(self._pair_results())
        cues = self._joined_cues()
        separated, selection = self._separated()
        groups = self._item_groups()
        results.update(pair_cues.swap_results(cues, separated, selection, groups,
                                              self.settings.bootstrap, self.settings.seed,
                                              self.split_quantizer))
        results.update(pair_cues.fidelity_results(cues))
        results.update(self._probe_results(cues))
        results["per_pair"] = pair_cues.per_pair_values(cues, separated, groups,
                                                        self._item_channels())
        return results

    def _codebook_results(self) -> dict:
        entropy = histogram_entropy(self._code_histogram)
        bits = entropy / math.log(2)
        return {
            "bitrate_kbps": nominal_bitrate_kbps(self.n_q, self.bins, self.frame_rate),
            "effective_bitrate_kbps": bits.sum().item() * self.frame_rate / 1000.0,
            "perplexity": entropy.exp().tolist(),
            "entropy": entropy.tolist(),
            "effective_bits": bits.tolist(),
            "dead_codes": (self._code_histogram == 0).sum(dim=1).tolist(),
            "code_histogram": self._code_histogram.tolist(),
        }

    def _pair_results(self) -> dict:
        results = dict.fromkeys(["codebook_agreement", "chance_agreement", "ceiling_agreement",
                                 "embedding_cosine", "chance_cosine", "centered_cosine",
                                 "chance_centered_cosine"])
        ceiling = self._ceiling_agreement
        if ceiling and sum(len(c) for c in ceiling) == self.num_items:
            results["ceiling_agreement"] = torch.cat(ceiling).mean(dim=0).tolist()
        if not self._agreement:
            return results
        chance_agree, chance_cos = list(self._chance_agreement), list(self._chance_cosine)
        if self.num_items >= 2:  # close the ring: the last item meets the first one
            last, first = self._pending_item, self._first_item
            agree, cos = self._pair_stats(last[0][None], self._as_batch_of_one(last[1]),
                                          first[0][None], self._as_batch_of_one(first[1]))
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
        if self._pooled_embeddings and self.num_items >= 2:
            same, chance = centered_pooled_cosine(torch.cat(self._pooled_embeddings))
            results["centered_cosine"] = same.tolist()
            results["chance_centered_cosine"] = chance.tolist()
        return results

    # -- pair cues: swap gain, ILD / ITD fidelity --------------------------------------

    def _joined_cues(self) -> PairCues | None:
        """All batches' cues concatenated, or None unless every item has them."""
        if not self._cues or sum(len(c.delays["in"]) for c in self._cues) != self.num_items:
            return None
        return PairCues.cat(self._cues)

    def _item_groups(self) -> list[str] | None:
        return self._groups if len(self._groups) == self.num_items else None

    def _item_channels(self) -> Tensor | None:
        channels = torch.cat(self._channels) if self._channels else None
        return channels if channels is not None and len(channels) == self.num_items else None

    def _separated(self) -> tuple[Tensor, str]:
        """Mask of the well-separated pairs (views 1 and 2) and how they were chosen."""
        channels = self._item_channels()
        if channels is None or channels.shape[1] < 2:
            return torch.ones(self.num_items, dtype=torch.bool), "all pairs (no channel labels)"
        return pair_cues.separated_pairs(channels[:, :2], self.capsules)

    # -- probes ----------------------------------------------------------------------

    def _probe_results(self, cues: PairCues | None) -> dict:
        """Linear probes trained fresh on the frozen, time-pooled embeddings, cross-validated
        with folds grouped by file (`probes.cross_validated_probe`), per codebook: mean and
        std over folds beside the shuffled-label baseline.

        - `ild_probe_r2`: R^2 of the per-band input ILD (raw pair) from codebook k's pooled
          embeddings of both channels concatenated (`_std`, `_shuffled`, `_shuffled_std`).
        - `channel_probe_accuracy`: accuracy of the channel index from one channel's pooled
          embedding, beside `channel_probe_chance` (the majority class of the test folds)
          and `_shuffled`. It measures only capsule fingerprints (a capsule's own
          coloration and noise): on real recordings the capsule-to-direction map changes
          with every recording, so no spatial meaning can be read from it.
        `probe_folds`, `probe_groups` (files) and `probe_note` (why a probe is missing).
        """
        results = dict.fromkeys(self.PROBE_KEYS)
        groups, channels = self._item_groups(), self._item_channels()
        if (not self._pooled_embeddings
                or len(torch.cat(self._pooled_embeddings)) != self.num_items):
            results["probe_note"] = "no embeddings"
            return results
        if groups is None or len(set(groups)) < 2:
            results["probe_note"] = "fewer than 2 files: no grouped folds"
            return results
        from measure import probes  # scikit-learn, only when probes run

        pooled = torch.cat(self._pooled_embeddings).double()  # [N, V, n_q, D]
        settings = self.settings
        folds = min(settings.probe_folds, len(set(groups)))
        results.update(probe_folds=folds, probe_groups=len(set(groups)))
        run = functools.partial(probes.cross_validated_probe, folds=folds, seed=settings.seed,
                                shuffles=settings.probe_shuffles)
        notes = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter of tiny folds, every epoch
            if cues is not None and self.views >= 2:
                ild = (cues.levels["in_a"] - cues.levels["in_b"]).double()
                # Bands whose ILD varies by rounding only have no R^2 (NaN, not -5e5).
                fits = [run(pooled[:, :2, k].flatten(1), ild, groups, kind="regression",
                            regularization=settings.ild_probe_alpha,
                            resolution=spatial_cues.ILD_RESOLUTION_DB) for k in range(self.n_q)]
                results.update(self._probe_lists("ild_probe_r2", fits))
            else:
                notes.append("ILD probe: no pair cues")
            if channels is not None and len(torch.unique(channels)) >= 2:
                views = pooled.shape[1]
                view_groups = [g for g in groups for _ in range(views)]
                fits = [run(pooled[:, :, k].flatten(0, 1), channels.flatten(), view_groups,
                            kind="classification", regularization=settings.channel_probe_c)
                        for k in range(self.n_q)]
                results.update(self._probe_lists("channel_probe_accuracy", fits))
                results["channel_probe_chance"] = fits[0]["chance"]
            else:
                notes.append("channel probe: fewer than 2 channels")
        results["probe_note"] = "; ".join(notes) or None
        return results

    @staticmethod
    def _probe_lists(name: str, fits: list[dict]) -> dict:
        return {name: [f["mean"] for f in fits], f"{name}_std": [f["std"] for f in fits],
                f"{name}_shuffled": [f["shuffled_mean"] for f in fits],
                f"{name}_shuffled_std": [f["shuffled_std"] for f in fits]}
