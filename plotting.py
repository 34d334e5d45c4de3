"""Figures: log-mel spectrograms (training validation and the report) and the evaluation
report's plots of code agreement, the swap test and codebook usage.

Every function returns or saves a matplotlib figure and closes what it saves; nothing here
computes a metric (the numbers come from `metrics.MetricAccumulator` results).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import torch
import torchaudio

from metrics import CheckpointReport, per_codebook

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def plot_code_agreement(reports: Sequence[CheckpointReport], path: Path) -> None:
    """Grouped bars: agreement per codebook for each checkpoint, chance as black ticks."""
    fig, ax = plt.subplots(figsize=(4 + 1.6 * len(reports), 3.5))
    n_q = max(len(r.results.get("codebook_agreement") or []) for r in reports)
    width = 0.8 / max(n_q, 1)
    for k in range(n_q):
        positions = [i + (k - (n_q - 1) / 2) * width for i in range(len(reports))]
        agree = [per_codebook(r.results, "codebook_agreement", k) or 0.0 for r in reports]
        chance = [per_codebook(r.results, "chance_agreement", k) or 0.0 for r in reports]
        ax.bar(positions, agree, width * 0.9, label=f"codebook {k + 1}")
        ax.hlines(chance, [p - width * 0.45 for p in positions], [p + width * 0.45 for p in positions],
                  colors="black", label="chance (different segments)" if k == 0 else None)
    ax.set_xticks(range(len(reports)), [f"{r.label}\n({r.mode})" for r in reports])
    ax.set_ylabel("cross-channel code agreement")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_swap_test(reports: Sequence[CheckpointReport], path: Path) -> None:
    """Per checkpoint: mel distance of each swap variant to x_A and to x_B."""
    variants = ("recon_a", "swap", "content_a", "rest_b")
    fig, axes = plt.subplots(1, len(reports), figsize=(4 * len(reports), 3.2), squeeze=False, sharey=True)
    for ax, report in zip(axes[0], reports):
        swap = report.results.get("swap_test") or {}
        for offset, target, color in ((-0.2, "a", "tab:blue"), (0.2, "b", "tab:orange")):
            values = [swap.get(v, {}).get(f"mel_to_{target}", 0.0) for v in variants]
            ax.bar([i + offset for i in range(len(variants))], values, 0.4, color=color,
                   label=f"distance to x_{target.upper()}")
        ax.set_xticks(range(len(variants)), variants, fontsize="small")
        ax.set_title(f"{report.label} ({report.mode})", fontsize="small")
    axes[0][0].set_ylabel("mel distance")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize="small")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
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
