"""Accumulator results as logged and reported.

`flatten_metrics` turns `MetricAccumulator.compute()`'s nested dict into the flat scalars
that the training engine logs (`val/<name>`), `evaluate.py` logs and
scripts/study_table.py tabulates; `per_codebook` reads one codebook's entry; and
`CheckpointReport` holds one checkpoint's results for the evaluation report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

# Accumulator result -> logged name prefix, for the per-codebook lists.
PER_CODEBOOK = {"perplexity": "perplexity", "dead_codes": "dead_codes",
                "codebook_agreement": "agreement", "chance_agreement": "chance_agreement",
                "ceiling_agreement": "ceiling_agreement",
                "embedding_cosine": "cosine", "chance_cosine": "chance_cosine",
                "ild_probe_r2": "ild_probe_r2", "ild_probe_r2_std": "ild_probe_r2_std",
                "ild_probe_r2_shuffled": "ild_probe_r2_shuffled",
                "channel_probe_accuracy": "channel_probe_accuracy",
                "channel_probe_accuracy_shuffled": "channel_probe_accuracy_shuffled"}
SCALARS = ("si_snr", "mel_distance", "stft_distance", "si_snr_own_scale",
           "mel_distance_own_scale", "effective_bitrate_kbps", "swap_gain", "swap_separation_db",
           "swap_input_separation_db", "swap_separation_ratio", "swap_mel_to_a", "swap_mel_to_b",
           "swap_rec_a_mel_to_b", "swap_rec_b_mel_to_b", "channel_probe_chance",
           "swap_gain_shape", "swap_gain_loudness_only", "swap_gain_null",
           "swap_gain_shape_null", "swap_gain_normalized", "swap_gain_shape_normalized")
PER_VIEW = ("si_snr", "mel_distance")
# Nested results -> logged names.
NESTED = {("swap_gain_ci", 0): "swap_gain_ci_low", ("swap_gain_ci", 1): "swap_gain_ci_high",
          ("ild_fidelity", "correlation"): "ild_corr", ("ild_fidelity", "error_db"): "ild_error_db",
          ("ild_fidelity", "zero_error_db"): "ild_zero_error_db",
          ("ild_fidelity", "slope"): "ild_slope",
          ("swap_gain_shape_ci", 0): "swap_gain_shape_ci_low",
          ("swap_gain_shape_ci", 1): "swap_gain_shape_ci_high",
          ("ild_fidelity_shape", "correlation"): "ild_shape_corr",
          ("ild_fidelity_shape", "error_db"): "ild_shape_error_db",
          ("ild_fidelity_shape", "zero_error_db"): "ild_shape_zero_error_db",
          ("ild_fidelity_shape", "slope"): "ild_shape_slope",
          ("itd_fidelity", "error_us"): "itd_error_us",
          ("itd_fidelity", "zero_error_us"): "itd_zero_error_us"}


def flatten_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`MetricAccumulator.compute()` results -> flat scalars for logging.

    Scalars keep their names; per-codebook lists become `<name>_cbK`, per-view lists
    `<name>_chV` (K, V from 1); the swap gain's interval `swap_gain_ci_low` / `_high`, the
    cue fidelities `ild_corr`, `ild_error_db`, `ild_zero_error_db`, `ild_slope` (and
    `ild_shape_*` of the spectral shape of the difference),
    `itd_error_us`, `itd_zero_error_us`. Entries that are None or NaN (not measurable on
    this set, e.g. a swap gain without a well-separated pair) are left out.
    """
    flat: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if value is not None and not math.isnan(float(value)):
            flat[name] = float(value)

    for key in SCALARS:
        put(key, results.get(key))
    for key in PER_VIEW:
        for v, value in enumerate(results.get(f"{key}_per_view") or []):
            put(f"{key}_ch{v + 1}", value)
    for key, name in PER_CODEBOOK.items():
        for k, value in enumerate(results.get(key) or []):
            put(f"{name}_cb{k + 1}", value)
    for (key, inner), name in NESTED.items():
        container = results.get(key)
        if container is not None:
            put(name, container[inner])
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
