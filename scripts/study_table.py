"""The study's table: mean +- std over seeds of each variant's evaluation, each figure beside
its reference (chance, ceiling, the error of predicting no difference, shuffled labels).

    python scripts/study_table.py runs/paired_study/eval/seed*/metrics.json

Each `metrics.json` is one seed's `evaluate.py` output with the variants as labels; the
variants are the labels found, in the order of the first file. Prints Markdown.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from measure.results import flatten_metrics  # noqa: E402

# (row label, value key, reference keys shown in brackets): keys of results.flatten_metrics.
ROWS = [
    ("mel distance, pair's scale (lower is better)", "mel_distance", []),
    ("SI-SNR dB, pair's scale", "si_snr", []),
    ("**swap gain** (0: codebook 2 of B moves nothing; 1: the swap decodes like B)",
     "swap_gain", []),
    ("swap gain of the spectral shape, band mean removed (loudness-only fake swap)",
     "swap_gain_shape", ["swap_gain_loudness_only"]),
    ("**swap gain normalised**, (g - null) / (1 - null) (null: untrained split)",
     "swap_gain_normalized", ["swap_gain_null"]),
    ("shape swap gain normalised (null)", "swap_gain_shape_normalized",
     ["swap_gain_shape_null"]),
    ("channel separation of the decodes, dB/band (inputs)", "swap_separation_db",
     ["swap_input_separation_db"]),
    ("**ILD correlation**, decoded vs input pair (slope)", "ild_corr", ["ild_slope"]),
    ("ILD error dB (predicting no difference)", "ild_error_db", ["ild_zero_error_db"]),
    ("ILD shape correlation, band mean removed (slope)", "ild_shape_corr", ["ild_shape_slope"]),
    ("ILD shape error dB (predicting no difference)", "ild_shape_error_db",
     ["ild_shape_zero_error_db"]),
    ("ITD error us below 1.5 kHz (predicting no delay)", "itd_error_us", ["itd_zero_error_us"]),
    ("cb1 code agreement across channels (chance / ceiling)", "agreement_cb1",
     ["chance_agreement_cb1", "ceiling_agreement_cb1"]),
    ("cb2 code agreement across channels (chance / ceiling)", "agreement_cb2",
     ["chance_agreement_cb2", "ceiling_agreement_cb2"]),
    ("cb1 ILD probe R^2 (shuffled labels)", "ild_probe_r2_cb1", ["ild_probe_r2_shuffled_cb1"]),
    ("cb2 ILD probe R^2 (shuffled labels)", "ild_probe_r2_cb2", ["ild_probe_r2_shuffled_cb2"]),
    ("cb1 channel-index probe, capsule fingerprints only (chance)", "channel_probe_accuracy_cb1",
     ["channel_probe_chance"]),
    ("cb2 channel-index probe, capsule fingerprints only (chance)", "channel_probe_accuracy_cb2",
     ["channel_probe_chance"]),
    ("cb1 perplexity / dead codes", "perplexity_cb1", ["dead_codes_cb1"]),
    ("cb2 perplexity / dead codes", "perplexity_cb2", ["dead_codes_cb2"]),
    ("shared-content coding: mel distance (independent coding)", "shared_mel_distance",
     ["independent_mel_distance"]),
    ("shared-content coding: ILD error dB (independent coding)", "shared_ild_error_db",
     ["independent_ild_error_db"]),
    ("shared-content coding: kbps per channel (independent)", "shared_kbps_per_channel",
     ["independent_kbps_per_channel"]),
    ("all capsules, shared-content: mel distance (independent; equal bitrate)",
     "all_shared_mel_distance", ["all_independent_mel_distance", "all_equal_mel_distance"]),
    ("all capsules, shared-content: ILD error dB (independent; equal bitrate)",
     "all_shared_ild_error_db", ["all_independent_ild_error_db", "all_equal_ild_error_db"]),
    ("all capsules, mean-stream shared-content: mel distance (independent; equal bitrate)",
     "all_mean_shared_mel_distance", ["all_independent_mel_distance", "all_equal_mel_distance"]),
    ("all capsules, mean-stream shared-content: ILD error dB (independent; equal bitrate)",
     "all_mean_shared_ild_error_db",
     ["all_independent_ild_error_db", "all_equal_ild_error_db"]),
    ("all capsules, shared-content + level side information: mel distance (independent "
     "+ level side information; independent; equal bitrate)", "all_level_shared_mel_distance",
     ["all_level_independent_mel_distance", "all_independent_mel_distance",
      "all_equal_mel_distance"]),
    ("all capsules, shared-content + level side information: ILD error dB, read at the bands "
     "it sends (independent + level side information; independent; equal bitrate)",
     "all_level_shared_ild_error_db",
     ["all_level_independent_ild_error_db", "all_independent_ild_error_db",
      "all_equal_ild_error_db"]),
    ("all capsules, shared-content: ILD shape correlation, band mean removed (independent; "
     "equal bitrate)", "all_shared_ild_shape_correlation",
     ["all_independent_ild_shape_correlation", "all_equal_ild_shape_correlation"]),
    ("all capsules, shared-content + level side information: ILD shape correlation "
     "(independent + level side information; independent; equal bitrate)",
     "all_level_shared_ild_shape_correlation",
     ["all_level_independent_ild_shape_correlation", "all_independent_ild_shape_correlation",
      "all_equal_ild_shape_correlation"]),
    ("all capsules, shared-content + level side information: kbps per channel (independent "
     "+ level side information; independent; equal bitrate)", "all_level_shared_kbps_per_channel",
     ["all_level_independent_kbps_per_channel", "all_independent_kbps_per_channel",
      "all_equal_kbps_per_channel"]),
    ("all capsules, shared-content: kbps per channel (independent; equal bitrate)",
     "all_shared_kbps_per_channel",
     ["all_independent_kbps_per_channel", "all_equal_kbps_per_channel"]),
]


def seed_scalars(path: Path) -> dict[str, dict[str, float]]:
    """`{variant: flat scalars}` of one seed's metrics.json."""
    entries = json.loads(path.read_text())
    return {label: {**flatten_metrics(entry), **shared_content_scalars(entry)}
            for label, entry in entries.items()}


def shared_content_scalars(entry: dict) -> dict[str, float]:
    """The shared-content comparison's headline numbers, when the report has them."""
    flat = {}
    for result, head in (("shared_content", ""), ("shared_content_all", "all_")):
        comparison = entry.get(result) or {}
        for coding, prefix in (("shared_content", "shared"), ("independent", "independent"),
                               ("independent_equal_bitrate", "equal"),
                               ("shared_content_mean", "mean_shared"),
                               ("shared_content_level", "level_shared"),
                               ("independent_level", "level_independent")):
            for key in ("mel_distance", "ild_error_db", "ild_shape_correlation",
                        "kbps_per_channel"):
                value = (comparison.get(coding) or {}).get(key)
                if value is not None:
                    flat[f"{head}{prefix}_{key}"] = float(value)
    return flat


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    """Mean and sample std of the finite values (std 0 for one value); None when none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    # statistics computes exactly: equal values give a std of 0, not a rounding residue
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(runs: list[dict[str, float]], key: str, references: list[str]) -> str:
    stats = mean_std([run.get(key) for run in runs])
    if stats is None:
        return "n/a"
    text = f"{stats[0]:.3g} ± {stats[1]:.2g}"
    refs = [mean_std([run.get(ref) for run in runs]) for ref in references]
    shown = [f"{r[0]:.3g}" for r in refs if r is not None]
    return f"{text} ({' / '.join(shown)})" if shown else text


def table(files: list[Path]) -> str:
    seeds = [seed_scalars(path) for path in files]
    variants = list(seeds[0])
    lines = [f"{len(seeds)} seed(s); mean ± std over seeds; references in brackets.", "",
             "| metric (reference) | " + " | ".join(variants) + " |",
             "|---|" + "---|" * len(variants)]
    for label, key, references in ROWS:
        cells = [cell([seed[v] for seed in seeds if v in seed], key, references) for v in variants]
        if all(c == "n/a" for c in cells):
            continue
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="one metrics.json per seed")
    args = parser.parse_args()
    missing = [str(p) for p in args.metrics if not p.is_file()]
    if missing:
        sys.exit(f"error: no metrics.json at {', '.join(missing)}: run evaluate.py first")
    print(table(args.metrics))


if __name__ == "__main__":
    main()
