"""Figures: log-mel spectrograms (training validation and the report) and the evaluation
report's plots of code agreement (with chance and ceiling), swap gain (with its interval),
decoded vs true ILD, and codebook usage.

Every function returns or saves a matplotlib figure and closes what it saves; nothing here
computes a metric (the numbers come from `MetricAccumulator` results).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib
import torch
import torchaudio

from measure.results import CheckpointReport, per_codebook

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def plot_code_agreement(reports: Sequence[CheckpointReport], path: Path) -> None:
    """Grouped bars: agreement across channels per codebook for each checkpoint, chance
    (different segments) as black ticks and the ceiling (a channel against its
    1-sample-shifted, 0.5 dB louder copy) as red ticks."""
    fig, ax = plt.subplots(figsize=(4 + 1.6 * len(reports), 3.5))
    n_q = max(len(r.results.get("codebook_agreement") or []) for r in reports)
    width = 0.8 / max(n_q, 1)
    for k in range(n_q):
        positions = [i + (k - (n_q - 1) / 2) * width for i in range(len(reports))]
        agree = [_finite(per_codebook(r.results, "codebook_agreement", k)) for r in reports]
        ax.bar(positions, agree, width * 0.9, label=f"codebook {k + 1}")
        for key, color, label in (("chance_agreement", "black", "chance (different segments)"),
                                  ("ceiling_agreement", "tab:red",
                                   "ceiling (1-sample shift, +0.5 dB)")):
            values = [per_codebook(r.results, key, k) for r in reports]
            kept = [(p, v) for p, v in zip(positions, values) if v is not None and math.isfinite(v)]
            if kept:
                ax.hlines([v for _, v in kept], [p - width * 0.45 for p, _ in kept],
                          [p + width * 0.45 for p, _ in kept], colors=color, linewidth=2,
                          label=label if k == 0 else None)
    ax.set_xticks(range(len(reports)), [f"{r.label}\n({r.mode})" for r in reports])
    ax.set_ylabel("cross-channel code agreement")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite(value, default: float = 0.0) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else default


def plot_swap_gain(reports: Sequence[CheckpointReport], path: Path) -> None:
    """Swap gain per checkpoint with its 95% bootstrap interval, between the references 0
    (codebook 2 of B moves nothing) and 1 (the swap decodes like B); the decodes' channel
    separation (dB per band) beside each point, since the gain means little where the codec
    does not resolve the channels."""
    fig, ax = plt.subplots(figsize=(3 + 1.4 * len(reports), 3.5))
    for i, report in enumerate(reports):
        r = report.results
        gain = r.get("swap_gain")
        if gain is None or not math.isfinite(gain):
            ax.text(i, 0.5, "n/a", ha="center")
            continue
        lo, hi = r.get("swap_gain_ci") or (gain, gain)
        lo, hi = _finite(lo, gain), _finite(hi, gain)
        ax.errorbar([i], [gain], yerr=[[gain - lo], [hi - gain]], fmt="o", capsize=6,
                    color="tab:blue")
        ax.annotate(f"sep. {_finite(r.get('swap_separation_db'), math.nan):.2g} dB", (i, hi),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize="x-small")
    for level, text in ((0.0, "0: cb2 moves nothing"), (1.0, "1: decodes like B")):
        ax.axhline(level, color="grey", linestyle="--", linewidth=1)
        ax.text(len(reports) - 0.5, level, text, va="bottom", ha="right", fontsize="x-small",
                color="grey")
    ax.set_xticks(range(len(reports)), [f"{r.label}\n({r.mode})" for r in reports])
    ax.set_xlim(-0.5, len(reports) - 0.5)
    ax.set_ylabel("swap gain (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ild_scatter(reports: Sequence[CheckpointReport], path: Path) -> None:
    """Per checkpoint: decoded against true inter-channel level difference, every pair and
    band (dB), with the identity (a faithful codec) and zero (one that carries no
    difference) lines."""
    fig, axes = plt.subplots(1, len(reports), figsize=(3.4 * len(reports), 3.4), squeeze=False,
                             sharex=True, sharey=True)
    for ax, report in zip(axes[0], reports):
        pairs = report.results.get("per_pair") or {}
        true = torch.tensor(pairs.get("ild_true_db") or [], dtype=torch.float64).flatten()
        decoded = torch.tensor(pairs.get("ild_decoded_db") or [], dtype=torch.float64).flatten()
        if true.numel():
            ax.scatter(true.numpy(), decoded.numpy(), s=4, alpha=0.5)
            limit = max(float(true.abs().max()), float(decoded.abs().max()), 0.5)
            ax.plot([-limit, limit], [-limit, limit], color="grey", linestyle="--", linewidth=1)
            ax.axhline(0, color="black", linewidth=0.5)
        ild = report.results.get("ild_fidelity") or {}
        ax.set_title(f"{report.label}: r={_finite(ild.get('correlation'), math.nan):.2f}, "
                     f"err {_finite(ild.get('error_db'), math.nan):.2f} dB "
                     f"(zero {_finite(ild.get('zero_error_db'), math.nan):.2f})",
                     fontsize="x-small")
        ax.set_xlabel("true ILD (dB)")
    axes[0][0].set_ylabel("decoded ILD (dB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_codebook_usage(reports: Sequence[CheckpointReport], path: Path) -> None:
    """Per codebook: share of frames taken by each code, most used first (log scale).

    A flat curve over all entries is a healthy codebook; a cliff after a few codes is collapse.
    """
    n_q = max(len(r.results.get("code_histogram") or []) for r in reports)
    fig, axes = plt.subplots(1, n_q, figsize=(4 * n_q, 3), squeeze=False, sharey=True)
    for k, ax in enumerate(axes[0]):
        for report in reports:
            hist = torch.tensor(report.results["code_histogram"][k], dtype=torch.float64)
            share = hist.sort(descending=True).values / hist.sum().clamp_min(1)
            ax.plot(range(1, len(share) + 1), share.numpy(),
                    label=f"{report.label} (perplexity {report.results['perplexity'][k]:.0f})")
        ax.set_yscale("log")
        ax.set_xlabel("code rank")
        ax.set_title(f"codebook {k + 1}", fontsize="small")
        ax.legend(fontsize="x-small")
    axes[0][0].set_ylabel("share of frames")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SPECTROGRAM_COLUMNS = ("input_a", "input_b", "recon_a", "recon_b", "swap")


def spectrogram_figure(rows: list[tuple[str, dict[str, torch.Tensor]]], sample_rate: int,
                       columns: tuple[str, ...] = SPECTROGRAM_COLUMNS):
    """Log-mel spectrograms: one row per (label, {column name: waveform [T]}), one column
    per name (blank where a row lacks it). Returns the matplotlib figure."""
    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=1024, hop_length=256, n_mels=64)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.6 * len(columns), 2.2 * len(rows)),
                             squeeze=False)
    for index, (row, (label, waves)) in enumerate(zip(axes, rows)):
        for ax, name in zip(row, columns):
            ax.set_xticks([])
            ax.set_yticks([])
            if name not in waves:
                ax.set_axis_off()
                continue
            spec = 10 * torch.log10(mel(waves[name].float().cpu()) + 1e-10)
            ax.imshow(spec.numpy(), origin="lower", aspect="auto", cmap="magma",
                      vmin=float(spec.max()) - 80)
            ax.set_title(name if index == 0 else "", fontsize="small")
        row[0].set_ylabel(label, fontsize="small")
    fig.tight_layout()
    return fig


def plot_spectrograms(reports: Sequence[CheckpointReport], path: Path) -> None:
    """Log-mel spectrograms of the first example: inputs, reconstructions, swap."""
    rows = [(r.label, {name: wave[0] for name, wave in r.examples.items()}) for r in reports]
    fig = spectrogram_figure(rows, reports[0].results["sample_rate"])
    fig.savefig(path, dpi=110)
    plt.close(fig)
