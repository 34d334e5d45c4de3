"""Compare trained checkpoints: does codebook 1 carry the content and codebook 2 the channel?

    python evaluate.py checkpoints='[mono.pt,paired.pt]' datasets.data_root=DIR out_dir=DIR

Every checkpoint (mono or paired) runs on the same fixed validation pairs: two channels of
the same segment, encoded separately, so mono and paired models are scored alike. Metrics
(see metrics.py): reconstruction per channel, codebook health, cross-channel code agreement
against chance, embedding cosine, the swap test and the channel-identity probe.

Writes to `out_dir`: `metrics.json` (one entry per checkpoint), `report.md` (the checkpoints
side by side), `code_agreement.png`, `swap_test.png`, `codebook_usage.png`,
`spectrograms.png` (plotting.py); and the same numbers to wandb when `wandb.mode` is not
`disabled`. Config: config/evaluate.yaml. The measuring itself is `validation.py`'s, the
same as the engine's per-epoch validation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

import plotting
from codec import load_model, resolve_device
from configuration import check_command_line
from loaders import make_loader
from metrics import CheckpointReport, flatten_metrics, per_codebook
from validation import evaluate_model, validation_dataset


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
    if data.channels is not None:
        cfg.datasets.channels = [int(c) for c in data.channels]
    cfg.datasets.views = 2
    cfg.datasets.batch_size = int(data.batch_size)
    cfg.datasets.num_workers = int(data.num_workers)
    cfg.datasets.pin_memory = False
    return cfg


def validation_loader(data_cfg: DictConfig, device: torch.device) -> DataLoader:
    """The fixed validation pairs of `data_cfg`, in order (the engine's validation items)."""
    dataset = validation_dataset(data_cfg)
    return make_loader(dataset, data_cfg, device, range(len(dataset)))


# ----------------------------------------------------------------------------------------
# Measuring the checkpoints


def checkpoint_labels(paths: list[str]) -> list[str]:
    """Short unique names: the file stem, or `folder/stem` when stems repeat."""
    stems = [Path(p).stem for p in paths]
    labels = [s if stems.count(s) == 1 else f"{Path(p).parent.name}/{s}" for s, p in zip(stems, paths)]
    return [label if labels.count(label) == 1 else f"{label}#{i + 1}" for i, label in enumerate(labels)]


def evaluate_checkpoints(cfg: DictConfig) -> list[CheckpointReport]:
    """Measure every checkpoint of `cfg.checkpoints` on the same validation pairs."""
    paths = [to_absolute_path(str(p)) for p in _as_list(cfg.checkpoints)]
    labels = checkpoint_labels(paths)
    if cfg.labels:
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
            loaders[model.sample_rate] = validation_loader(rate_cfg, device)
        results, examples = evaluate_model(
            model, int(train_cfg.model.bins), loaders[model.sample_rate],
            content_codebook=int(train_cfg.pairwise.content_codebook),
            probe_steps=int(cfg.probe_steps), keep_examples=int(cfg.spectrogram_items), desc=label)
        mode = "paired" if int(train_cfg.datasets.views) >= 2 else "mono"
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
            f"{_fmt(per_codebook(r.results, key, k))} (chance {_fmt(per_codebook(r.results, chance, k))})"
            for r in reports]
        rows += [
            (f"{cb} perplexity / dead codes",
             [f"{_fmt(per_codebook(r.results, 'perplexity', k))} / {_fmt(per_codebook(r.results, 'dead_codes', k))}"
              for r in reports]),
            (f"{cb} cross-channel code agreement", pair("codebook_agreement", "chance_agreement")),
            (f"{cb} embedding cosine", pair("embedding_cosine", "chance_cosine")),
            (f"{cb} centred pooled-embedding cosine", pair("centered_cosine", "chance_centered_cosine")),
            (f"{cb} channel probe accuracy",
             [f"{_fmt(per_codebook(r.results, 'probe_accuracy', k))} (chance {_fmt(r.results.get('probe_chance'))})"
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


def write_report(reports: list[CheckpointReport], out_dir: Path) -> dict[str, Path]:
    """All report files into `out_dir`; returns them by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md",
             "code_agreement": out_dir / "code_agreement.png", "swap_test": out_dir / "swap_test.png",
             "codebook_usage": out_dir / "codebook_usage.png", "spectrograms": out_dir / "spectrograms.png"}
    write_metrics_json(reports, files["metrics"])
    write_markdown(reports, files["report"])
    plotting.plot_code_agreement(reports, files["code_agreement"])
    plotting.plot_swap_test(reports, files["swap_test"])
    plotting.plot_codebook_usage(reports, files["codebook_usage"])
    if any(r.examples for r in reports):
        plotting.plot_spectrograms(reports, files["spectrograms"])
    else:
        del files["spectrograms"]
    return files


def log_to_wandb(reports: list[CheckpointReport], files: dict[str, Path], cfg: DictConfig) -> None:
    """The same numbers and plots to wandb (nothing when `wandb.mode=disabled`)."""
    if cfg.wandb.mode == "disabled":
        return
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
    check_command_line("evaluate")  # a mistake on the command line: one line, before Hydra
    main()
