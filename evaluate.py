"""Compare trained checkpoints: does codebook 1 carry the content and codebook 2 the channel?

    python evaluate.py checkpoints='[mono.pt,paired.pt]' datasets.data_root=DIR out_dir=DIR

Every checkpoint (mono or paired) runs on the same fixed validation pairs: two channels of
the same segment, encoded separately, so mono and paired models are scored alike. Metrics
(see metrics.py): reconstruction per channel, codebook health, cross-channel code agreement
against chance, embedding cosine, the swap test and the channel-identity probe.

Writes to `out_dir`: `metrics.json` (one entry per checkpoint), `report.md` (the checkpoints
side by side), `code_agreement.png`, `swap_test.png`, `codebook_usage.png`,
`spectrograms.png`; and the same
numbers to wandb when `wandb.mode` is not `disabled`. Config: config/evaluate.yaml.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import hydra
import matplotlib
import torch
import torchaudio
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

import metrics
from codec import load_model, resolve_device
from model import EncodecModel

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("evaluate")


@dataclass
class CheckpointReport:
    """Everything measured for one checkpoint: its metrics and a few waveforms to plot."""
    label: str
    path: str
    mode: str
    results: dict[str, Any]
    examples: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [items, T]

    def entry(self) -> dict[str, Any]:
        """The checkpoint's metrics.json entry."""
        return {"checkpoint": self.path, "mode": self.mode, **self.results}


# ----------------------------------------------------------------------------------------
# Data


def evaluation_data_config(train_cfg: DictConfig, eval_cfg: DictConfig) -> DictConfig:
    """The training config with the evaluation's data overrides, always two views.

    Mono checkpoints are evaluated on pairs too (each channel encoded separately), so that
    their cross-channel agreement, swap test and probe are comparable with paired ones.
    """
    cfg = train_cfg.copy()
    OmegaConf.set_struct(cfg, False)
    data = eval_cfg.datasets
    if data.data_root:
        cfg.datasets.data_root = to_absolute_path(str(data.data_root))
    if OmegaConf.is_missing(cfg.datasets, "data_root") or not cfg.datasets.data_root:
        raise ValueError("no data: the checkpoint stores no datasets.data_root; add "
                         "datasets.data_root=DIR to the command line.")
    if not Path(cfg.datasets.data_root).is_dir():
        raise FileNotFoundError(f"datasets.data_root={cfg.datasets.data_root} is not a folder; "
                                "pass datasets.data_root=DIR pointing to the EigenScape files.")
    if data.classes is not None:
        cfg.datasets.val_classes = list(data.classes)
    if data.val_pairs is not None:
        cfg.datasets.val_pairs = int(data.val_pairs)
    if data.get("channels") is not None:
        cfg.datasets.channels = [int(c) for c in data.channels]
    cfg.datasets.views = 2
    cfg.datasets.batch_size = int(data.batch_size)
    cfg.datasets.num_workers = int(data.num_workers)
    cfg.datasets.pin_memory = False
    return cfg


def validation_loader(data_cfg: DictConfig) -> DataLoader:
    """The fixed validation pairs, in order."""
    from paired_channel_dataset import PairedChannelDataset, collate_fn

    dataset = PairedChannelDataset(data_cfg, "val")
    if len(dataset) == 0:
        raise ValueError(f"no validation items for classes {list(data_cfg.datasets.val_classes)} "
                         f"in {data_cfg.datasets.data_root}; check datasets.classes.")
    return DataLoader(dataset, batch_size=data_cfg.datasets.batch_size, shuffle=False,
                      num_workers=data_cfg.datasets.num_workers, collate_fn=collate_fn)


# ----------------------------------------------------------------------------------------
# Measuring one checkpoint


def latent_decoder(model: EncodecModel, scale: torch.Tensor | None, length: int):
    """`decode(latent, view)` for `metrics.swap_test`: decoder, trim, and the view's level.

    `scale` `[B, V, 1, 1]` (or None without audio normalisation): the loudness restored for
    the view ('a' = 0, 'b' = 1) that provides the channel codebooks.
    """
    def decode(latent: torch.Tensor, view: str) -> torch.Tensor:
        audio = model.decoder(latent)[..., :length]
        return audio if scale is None else audio * scale[:, "ab".index(view)]
    return decode


@torch.no_grad()
def measure_batch(model: EncodecModel, wavs: torch.Tensor, content_codebook: int = 0):
    """One forward over the batch's views, and the swap test between views 1 and 2.

    Returns `(out, swap, swap_audio)`: the model output on `wavs.flatten(0, 1)`, the
    per-item swap-test results (None with fewer than 2 codebooks or views) and the decoded
    swap (content codebook of view 1, other codebooks of view 2) `[B, C, T]`.
    """
    batch, views, _, length = wavs.shape
    x = wavs.flatten(0, 1)
    out = model(x, return_embeddings=True)
    if model.n_q < 2 or views < 2:
        return out, None, None
    _, scale = model.normalize(x)  # the level each view is restored to
    scale = None if scale is None else scale.reshape(batch, views, 1, 1)
    per_view = [e.reshape(batch, views, *e.shape[1:]) for e in out.embeddings]
    emb_a, emb_b = [e[:, 0] for e in per_view], [e[:, 1] for e in per_view]
    decode = latent_decoder(model, scale, length)
    x_a, x_b = wavs[:, 0], wavs[:, 1]
    swap = metrics.swap_test(decode, emb_a, emb_b, x_a, x_b, model.sample_rate, content_codebook)
    sources = metrics.swap_variants(model.n_q, content_codebook)["swap"]
    swap_audio = decode(metrics.mix_embeddings(sources, emb_a, emb_b), "b")
    return out, swap, swap_audio


@torch.no_grad()
def evaluate_model(model: EncodecModel, bins: int, batches: Iterable[tuple[torch.Tensor, list[dict]]],
                   content_codebook: int = 0, probe_steps: int = 200, keep_examples: int = 1,
                   desc: str = "evaluate") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run `model` over paired batches `(wavs [B, V, 1, T], metas)`.

    Returns `(results, examples)`: `MetricAccumulator.compute()` results, and the first
    `keep_examples` items' inputs, reconstructions and swap as `{name: [items, T]}`.
    """
    device = next(model.parameters()).device
    model.eval()
    acc = metrics.MetricAccumulator(model.n_q, bins, model.sample_rate, model.frame_rate, probe_steps)
    examples: dict[str, list[torch.Tensor]] = {}
    for wavs, metas in tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True):
        wavs = wavs.to(device)
        out, swap, swap_audio = measure_batch(model, wavs, content_codebook)
        acc.update_from_output(wavs, out, metas, swap=swap)
        _keep_examples(examples, keep_examples, wavs, out.audio, swap_audio)
    if acc.num_items == 0:
        raise ValueError("no validation items to evaluate")
    return acc.compute(), {name: torch.cat(parts) for name, parts in examples.items()}


def _keep_examples(examples: dict[str, list[torch.Tensor]], limit: int, wavs: torch.Tensor,
                   audio: torch.Tensor, swap_audio: torch.Tensor | None) -> None:
    kept = sum(len(part) for part in examples.get("input_a", []))
    take = min(limit - kept, wavs.shape[0])
    if take <= 0:
        return
    recon = audio.reshape(*wavs.shape[:2], *audio.shape[1:])
    parts = {"input_a": wavs[:take, 0], "input_b": wavs[:take, 1] if wavs.shape[1] > 1 else None,
             "recon_a": recon[:take, 0], "recon_b": recon[:take, 1] if wavs.shape[1] > 1 else None,
             "swap": None if swap_audio is None else swap_audio[:take]}
    for name, value in parts.items():
        if value is not None:
            examples.setdefault(name, []).append(value[:, 0].float().cpu())


def checkpoint_labels(paths: list[str]) -> list[str]:
    """Short unique names: the file stem, or `folder/stem` when stems repeat."""
    stems = [Path(p).stem for p in paths]
    labels = [s if stems.count(s) == 1 else f"{Path(p).parent.name}/{s}" for s, p in zip(stems, paths)]
    return [label if labels.count(label) == 1 else f"{label}#{i + 1}" for i, label in enumerate(labels)]


def evaluate_checkpoints(cfg: DictConfig) -> list[CheckpointReport]:
    """Measure every checkpoint of `cfg.checkpoints` on the same validation pairs."""
    paths = [to_absolute_path(str(p)) for p in _as_list(cfg.checkpoints)]
    labels = checkpoint_labels(paths)
    if cfg.get("labels"):
        labels = [str(label) for label in cfg.labels]
        if len(labels) != len(paths) or len(set(labels)) != len(labels):
            raise ValueError(f"labels={labels}: need one distinct label per checkpoint ({len(paths)})")
    device = resolve_device(cfg.device)
    loaders: dict[int, DataLoader] = {}
    data_cfg = None
    reports = []
    for path, label in zip(paths, labels):
        model, train_cfg = load_model(path, device)
        # The first checkpoint fixes the validation items (seed, segment length, classes) so
        # that every checkpoint is scored on the same pairs; only the rate follows the model.
        if data_cfg is None:
            data_cfg = evaluation_data_config(train_cfg, cfg)
        if model.sample_rate not in loaders:
            rate_cfg = data_cfg.copy()
            rate_cfg.model.sample_rate = model.sample_rate
            loaders[model.sample_rate] = validation_loader(rate_cfg)
        results, examples = evaluate_model(
            model, int(train_cfg.model.bins), loaders[model.sample_rate],
            content_codebook=int(train_cfg.get("pairwise", {}).get("content_codebook", 0)),
            probe_steps=int(cfg.probe_steps), keep_examples=int(cfg.spectrogram_items), desc=label)
        mode = "paired" if int(train_cfg.datasets.get("views", 1)) >= 2 else "mono"
        results.update(step=checkpoint_entry(path, "step"), sample_rate=model.sample_rate)
        reports.append(CheckpointReport(label, path, mode, results, examples))
        del model
    return reports


def checkpoint_entry(path: str, key: str) -> Any:
    """A top-level entry of the checkpoint (step, epoch), or None."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    value = ckpt.get(key)
    return value.item() if isinstance(value, torch.Tensor) else value


def _as_list(value: Any) -> list:
    if isinstance(value, str):
        return [value]
    if value is None or len(value) == 0:
        raise ValueError("no checkpoints given: use checkpoints='[a.pt,b.pt]'")
    return list(value)


# ----------------------------------------------------------------------------------------
# Report: JSON, Markdown, plots


def write_metrics_json(reports: list[CheckpointReport], path: Path) -> None:
    """`{label: {checkpoint, mode, ...metrics}}`."""
    path.write_text(json.dumps({r.label: r.entry() for r in reports}, indent=2, default=float))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _per_codebook(results: dict, key: str, k: int) -> Any:
    values = results.get(key)
    return values[k] if values is not None and k < len(values) else None


def markdown_table(reports: list[CheckpointReport]) -> str:
    """The checkpoints side by side, one metric per row."""
    n_q = max(len(r.results.get("perplexity") or []) for r in reports)
    rows: list[tuple[str, list[str]]] = [
        ("mode", [r.mode for r in reports]),
        ("step", [_fmt(r.results.get("step")) for r in reports]),
        ("items (pairs)", [_fmt(r.results.get("num_items")) for r in reports]),
        ("SI-SNR (dB) ↑", [_fmt(r.results["si_snr"]) for r in reports]),
        ("SI-SNR per channel (dB)", [" / ".join(_fmt(v) for v in r.results["si_snr_per_view"]) for r in reports]),
        ("mel distance ↓", [_fmt(r.results["mel_distance"]) for r in reports]),
        ("MR-STFT distance ↓", [_fmt(r.results["stft_distance"]) for r in reports]),
        ("bitrate (kbps, nominal / entropy)",
         [f"{_fmt(r.results['bitrate_kbps'])} / {_fmt(r.results['effective_bitrate_kbps'])}" for r in reports]),
    ]
    for k in range(n_q):
        cb = f"cb{k + 1}"
        pair = lambda key, chance: [  # noqa: E731
            f"{_fmt(_per_codebook(r.results, key, k))} (chance {_fmt(_per_codebook(r.results, chance, k))})"
            for r in reports]
        rows += [
            (f"{cb} perplexity / dead codes",
             [f"{_fmt(_per_codebook(r.results, 'perplexity', k))} / {_fmt(_per_codebook(r.results, 'dead_codes', k))}"
              for r in reports]),
            (f"{cb} cross-channel code agreement", pair("codebook_agreement", "chance_agreement")),
            (f"{cb} embedding cosine", pair("embedding_cosine", "chance_cosine")),
            (f"{cb} centred pooled-embedding cosine", pair("centered_cosine", "chance_centered_cosine")),
            (f"{cb} channel probe accuracy",
             [f"{_fmt(_per_codebook(r.results, 'probe_accuracy', k))} (chance {_fmt(r.results.get('probe_chance'))})"
              for r in reports]),
        ]
    for variant in ("recon_a", "swap", "content_a", "rest_b"):
        rows.append((f"swap test `{variant}`: mel to x_A / x_B",
                     [_swap_cell(r.results.get("swap_test"), variant) for r in reports]))
    header = "| metric | " + " | ".join(f"{r.label} ({r.mode})" for r in reports) + " |"
    rule = "|---|" + "---|" * len(reports)
    return "\n".join([header, rule, *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows)])


def _swap_cell(swap: dict | None, variant: str) -> str:
    if not swap or variant not in swap:
        return "n/a"
    return f"{_fmt(swap[variant]['mel_to_a'])} / {_fmt(swap[variant]['mel_to_b'])}"


def write_markdown(reports: list[CheckpointReport], path: Path) -> str:
    """`report.md`: the table and how to read it; returns the table."""
    table = markdown_table(reports)
    path.write_text(
        "# Evaluation: does codebook 1 carry the content and codebook 2 the channel?\n\n"
        + table + "\n\n"
        "Reading it: a content codebook agrees across the two channels of a segment far above "
        "chance (different segments) and its probe stays near chance; a channel codebook "
        "agrees at chance and its probe scores high. Swap test: codebook 1 of channel A with "
        "the other codebooks of channel B (`swap`) should be closer to x_B than to x_A. "
        "`recon_a` is the plain reconstruction of A; `content_a` and `rest_b` decode each part "
        "alone.\n")
    return table


def plot_code_agreement(reports: list[CheckpointReport], path: Path) -> None:
    """Grouped bars: agreement per codebook for each checkpoint, chance as black ticks."""
    fig, ax = plt.subplots(figsize=(4 + 1.6 * len(reports), 3.5))
    n_q = max(len(r.results.get("codebook_agreement") or []) for r in reports)
    width = 0.8 / max(n_q, 1)
    for k in range(n_q):
        positions = [i + (k - (n_q - 1) / 2) * width for i in range(len(reports))]
        agree = [_per_codebook(r.results, "codebook_agreement", k) or 0.0 for r in reports]
        chance = [_per_codebook(r.results, "chance_agreement", k) or 0.0 for r in reports]
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


def plot_swap_test(reports: list[CheckpointReport], path: Path) -> None:
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


def plot_codebook_usage(reports: list[CheckpointReport], path: Path) -> None:
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


def plot_spectrograms(reports: list[CheckpointReport], path: Path) -> None:
    """Log-mel spectrograms of the first example: inputs, reconstructions, swap."""
    rows = [(r.label, {name: wave[0] for name, wave in r.examples.items()}) for r in reports]
    fig = spectrogram_figure(rows, reports[0].results["sample_rate"])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(reports: list[CheckpointReport], out_dir: Path) -> dict[str, Path]:
    """All report files into `out_dir`; returns them by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md",
             "code_agreement": out_dir / "code_agreement.png", "swap_test": out_dir / "swap_test.png",
             "codebook_usage": out_dir / "codebook_usage.png", "spectrograms": out_dir / "spectrograms.png"}
    write_metrics_json(reports, files["metrics"])
    write_markdown(reports, files["report"])
    plot_code_agreement(reports, files["code_agreement"])
    plot_swap_test(reports, files["swap_test"])
    plot_codebook_usage(reports, files["codebook_usage"])
    if any(r.examples for r in reports):
        plot_spectrograms(reports, files["spectrograms"])
    else:
        del files["spectrograms"]
    return files


def log_to_wandb(reports: list[CheckpointReport], files: dict[str, Path], cfg: DictConfig) -> None:
    """The same numbers and plots to wandb (nothing when `wandb.mode=disabled`)."""
    if cfg.wandb.mode == "disabled":
        return
    from engine import flatten_metrics
    from tracking import Tracker

    tracker = Tracker(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name, Path(files["metrics"]).parent,
                      OmegaConf.to_container(cfg, resolve=True))
    scalars = {f"{r.label}/{key}": value for r in reports for key, value in flatten_metrics(r.results).items()}
    tracker.log(scalars, step=0)
    tracker.log_images({name: str(p) for name, p in files.items() if p.suffix == ".png"}, step=0)
    tracker.finish()


# ----------------------------------------------------------------------------------------
# Command line


def run(cfg: DictConfig) -> list[CheckpointReport]:
    """Evaluate, write the report, print the table."""
    reports = evaluate_checkpoints(cfg)
    out_dir = Path(to_absolute_path(str(cfg.out_dir)))
    files = write_report(reports, out_dir)
    log_to_wandb(reports, files, cfg)
    print(markdown_table(reports))
    print(f"\nreport written to {out_dir}: {', '.join(p.name for p in files.values())}")
    return reports


@hydra.main(config_path="config", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        sys.exit(f"evaluate: {error}")


if __name__ == "__main__":
    main()
