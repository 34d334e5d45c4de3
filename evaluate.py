"""Compare trained checkpoints: does codebook 1 carry the content and codebook 2 the channel?

    python evaluate.py checkpoints='[mono.pt,paired.pt]' datasets.data_root=DIR out_dir=DIR
    python evaluate.py checkpoints='[paired.pt]' array_set=DIR [array_geometry=FILE|em32]

Every checkpoint (mono or paired) runs on the same fixed validation pairs: two channels of
the same segment, encoded separately at ONE scale per pair (their common RMS), so mono and
paired models are scored alike and no loudness restored from outside the codes can fake a
channel difference. Metrics (measure/, modules/spatial_cues.py): reconstruction,
swap gain with its bootstrap interval, ILD / ITD fidelity beside predicting no difference,
code agreement across channels beside chance and ceiling, probes trained fresh on frozen
embeddings (folds grouped by file, shuffled-label baseline), codebook health.

`array_set=DIR` evaluates on any folder of multichannel recordings (any array, channel
count >= 2 and rate; no scene classes) instead of EigenScape's; its geometry is unknown
(the swap gain over all pairs, with a note) unless `array_geometry` gives one.

Writes to `out_dir`: `metrics.json` (one entry per checkpoint; NaN written as null),
`report.md` (the checkpoints side by side, each figure beside its reference, and a legend),
`code_agreement.png`, `swap_gain.png`, `ild_scatter.png`, `codebook_usage.png`,
`spectrograms.png` (measure/plots.py); and the same numbers to wandb when `wandb.mode` is not
`disabled`. Config: config/evaluate.yaml. The measuring itself is `training/validation.py`'s, the
same as the engine's per-epoch validation (which uses lighter probe settings).
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from measure import plots
from training.command_line import check_command_line
from training.loaders import make_loader
from measure.accumulator import InstrumentSettings
from measure.pair_cues import MIN_RESOLVED_SEPARATION
from measure.results import CheckpointReport, flatten_metrics, per_codebook
from model import EncodecModel, load_model
from training.runtime import resolve_device
from modules.level_side_info import LevelSideInfo, trained_level_side
from coding.shared_content_comparison import (EQUAL_BITRATE, INDEPENDENT_LEVEL, LEVEL_SIDE,
                                              shared_content_comparison)
from training.validation import array_geometry, evaluate_model, validation_dataset
from utils.array_files import EM32


# ----------------------------------------------------------------------------------------
# Data


def evaluation_data_config(train_cfg: DictConfig, eval_cfg: DictConfig) -> DictConfig:
    """The training config with the evaluation's data overrides, always two views.

    Mono checkpoints are evaluated on pairs too (each channel encoded separately), so that
    their cross-channel agreement, swap gain, cue fidelity and probes are comparable with
    paired ones. `datasets.segment_seconds` sets the segment length per model rate in
    `evaluate_checkpoints`. With `array_set`, the folder's recordings (`array_set_config`).
    """
    cfg = train_cfg.copy()
    OmegaConf.set_struct(cfg, False)
    data = eval_cfg.datasets
    if eval_cfg.get("array_set"):
        return array_set_config(cfg, eval_cfg)
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
    # A run that validated on the monitor files is scored on the others by default.
    trained_on = cfg.datasets.get("val_files", "all")
    cfg.datasets.val_files = (str(data.val_files) if data.get("val_files") is not None
                              else "held_out" if trained_on == "monitor" else trained_on)
    cfg.datasets.views = 2
    cfg.datasets.batch_size = int(data.batch_size)
    cfg.datasets.num_workers = int(data.num_workers)
    cfg.datasets.pin_memory = False
    return cfg


def array_set_config(cfg: DictConfig, eval_cfg: DictConfig) -> DictConfig:
    """`cfg` (the training config, unlocked) reading `array_set`: every usable recording of
    the folder, no classes, pairs of any of its channels (`datasets.channels` of the
    evaluation, or all), always two views."""
    data = eval_cfg.datasets
    root = Path(to_absolute_path(str(eval_cfg.array_set)))
    if not root.is_dir():
        raise FileNotFoundError(f"array_set={root} is not a folder; point it at a folder of "
                                "multichannel WAV / FLAC / OGG recordings.")
    cfg.datasets.array_set = str(root)
    cfg.datasets.channels = None if data.channels is None else [int(c) for c in data.channels]
    cfg.datasets.val_files = "all"
    if data.val_pairs is not None:
        cfg.datasets.val_pairs = int(data.val_pairs)
    cfg.datasets.views = 2
    cfg.datasets.batch_size = int(data.batch_size)
    cfg.datasets.num_workers = int(data.num_workers)
    cfg.datasets.pin_memory = False
    return cfg


def geometry_spec(cfg: DictConfig) -> str | None:
    """`array_geometry` of the evaluation config: `em32`, a file (absolute), or None."""
    spec = cfg.get("array_geometry")
    if not spec:
        return None
    return str(spec) if str(spec) == EM32 else to_absolute_path(str(spec))


def shared_content_loader(data_cfg: DictConfig, cfg: DictConfig, sample_rate: int,
                          device: torch.device, channels: list[int]) -> DataLoader:
    """`shared_content.segments` fixed segments of the evaluation classes, each with all of
    `channels` (the first one's codebook 1 is shared): the multichannel use."""
    multi = at_rate(data_cfg, cfg, sample_rate)
    multi.datasets.channels = channels
    multi.datasets.views = len(channels)
    multi.datasets.val_pairs = int(cfg.shared_content.segments)
    return validation_loader(multi, device)


def shared_content_codings(cfg: DictConfig) -> tuple[str, ...]:
    """The codings compared: independent and shared from the reference channel, and with
    `shared_content.mean_stream` also the channels' mean content stream (`mean_content`)."""
    mean = ("shared_content_mean",) if cfg.shared_content.get("mean_stream") else ()
    return ("independent", "shared_content", *mean)


def level_side_info(cfg: DictConfig) -> LevelSideInfo | None:
    """The band-level side information of `shared_content.level_side_info`, or None (off)."""
    return LevelSideInfo.from_config(cfg.shared_content.get("level_side_info"),
                                     "shared_content.level_side_info")


def level_side_note(train_cfg: DictConfig, level_side: LevelSideInfo | None) -> str:
    """Why the figures of a codec trained to leave band levels to side information
    (`losses.level_side_info`) are not those of its intended decode, or '' when they are: the
    instrument reads the decode of the codes alone, and the shared-content rows add only the
    side information of `shared_content.level_side_info`."""
    trained = trained_level_side(train_cfg)
    if trained is None or trained == level_side:
        return ""
    return (f"trained to be decoded with {trained.bands} band levels sent beside its codes "
            f"(losses.level_side_info); the metrics read its codes' own decode: add "
            f"shared_content.level_side_info.bands={trained.bands} (and its bits, step_db, "
            f"block_ms, max_boost_db) for the coding rows it was trained for")


def shared_content_channel_sets(cfg: DictConfig, dataset: Any) -> dict[str, list[int]]:
    """Result key -> channels coded together: `shared_content.channels` (`shared_content`)
    and, with `shared_content.all_channels`, every channel the files have
    (`shared_content_all`, e.g. the 32 capsules)."""
    sets = {"shared_content": [int(c) for c in cfg.shared_content.channels]}
    counts = {f.channels for f in getattr(dataset, "files", [])}
    # An array set may have fewer channels than those named: its first (up to 4) then.
    if (getattr(dataset, "array_set", False) and counts
            and max(sets["shared_content"]) >= min(counts)):
        sets["shared_content"] = list(range(min(4, min(counts))))
    if cfg.shared_content.get("all_channels") and len(counts) == 1:
        sets["shared_content_all"] = list(range(counts.pop()))
    return sets


def equal_bitrate_model(cfg: DictConfig, device: torch.device) -> EncodecModel | None:
    """The model of `shared_content.equal_bitrate_checkpoint` (e.g. a mono model trained with
    `model.n_q=1`), or None."""
    path = cfg.shared_content.get("equal_bitrate_checkpoint")
    return load_model(to_absolute_path(str(path)), device)[0] if path else None


def validation_loader(data_cfg: DictConfig, device: torch.device) -> DataLoader:
    """The fixed validation pairs of `data_cfg`, in order (the engine's validation items)."""
    dataset = validation_dataset(data_cfg)
    return make_loader(dataset, data_cfg, device, range(len(dataset)))


# ----------------------------------------------------------------------------------------
# Measuring the checkpoints


def checkpoint_labels(paths: list[str]) -> list[str]:
    """Short unique names: the file stem, or `folder/stem` when stems repeat."""
    stems = [Path(p).stem for p in paths]
    labels = [s if stems.count(s) == 1 else f"{Path(p).parent.name}/{s}"
              for s, p in zip(stems, paths)]
    return [label if labels.count(label) == 1 else f"{label}#{i + 1}"
            for i, label in enumerate(labels)]


def instrument_settings(cfg: DictConfig) -> InstrumentSettings:
    """The full statistics of the report (`instrument:` in config/evaluate.yaml)."""
    return InstrumentSettings(**OmegaConf.to_container(cfg.instrument, resolve=True))


def at_rate(data_cfg: DictConfig, cfg: DictConfig, sample_rate: int) -> DictConfig:
    """A copy of the evaluation data config for a model at `sample_rate`: the same items, cut
    to `segment_length` samples at that rate."""
    rate_cfg = data_cfg.copy()
    rate_cfg.model.sample_rate = sample_rate
    rate_cfg.datasets.tensor_cut = segment_length(cfg, data_cfg, sample_rate)
    return rate_cfg


def segment_length(cfg: DictConfig, data_cfg: DictConfig, sample_rate: int) -> int:
    """Validation segment in samples at `sample_rate`: `datasets.segment_seconds`, or the
    checkpoint's `datasets.tensor_cut` when that is null."""
    seconds = cfg.datasets.get("segment_seconds")
    return (int(data_cfg.datasets.tensor_cut) if seconds is None
            else int(round(float(seconds) * sample_rate)))


def null_model_for(cfg: DictConfig, train_cfg: DictConfig, device: torch.device
                   ) -> tuple[EncodecModel | None, str | None]:
    """The unsplit model whose continuous-latent swap is a split checkpoint's null, and a note
    when there is none: `null_model` of the evaluation config, or else the checkpoint's own
    `model.init_from` (the model it was fine-tuned from), built with the checkpoint's
    architecture and no split. (None, None) for an unsplit checkpoint, whose null is 0."""
    if not float(train_cfg.model.get("content_share") or 0.0) > 0.0:
        return None, None
    given = cfg.get("null_model")
    name = given or train_cfg.model.get("init_from")
    if not name:
        return None, "no null model: the checkpoint has no model.init_from; set null_model=PATH"
    candidates = [Path(to_absolute_path(str(name))), Path(__file__).resolve().parent / str(name)]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        if given:
            raise FileNotFoundError(f"null_model={given}: no such file; point it at the unsplit "
                                    "model the checkpoints were fine-tuned from.")
        return None, f"no null model: model.init_from={name} not found; set null_model=PATH"
    model_cfg = OmegaConf.to_container(train_cfg.model, resolve=True)
    model_cfg.update(content_share=0.0, init_from=str(found))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its codebooks are not used: only encoder and decoder
        return EncodecModel.from_config(model_cfg).to(device).eval(), None


def evaluate_checkpoints(cfg: DictConfig) -> list[CheckpointReport]:
    """Measure every checkpoint of `cfg.checkpoints` on the same validation pairs."""
    paths = [to_absolute_path(str(p)) for p in _as_list(cfg.checkpoints)]
    labels = checkpoint_labels(paths)
    if cfg.labels:
        labels = [str(label) for label in cfg.labels]
        if len(labels) != len(paths) or len(set(labels)) != len(labels):
            raise ValueError(f"labels={labels}: need one distinct label per checkpoint "
                             f"({len(paths)})")
    device = resolve_device(cfg.device)
    loaders: dict[int, DataLoader] = {}
    data_cfg = None
    reports = []
    level_side = level_side_info(cfg)
    equal_model = equal_bitrate_model(cfg, device)
    for path, label in zip(paths, labels):
        model, train_cfg = load_model(path, device)
        # The first checkpoint fixes the validation items (seed, segment length, classes) so
        # that every checkpoint is scored on the same pairs; only the rate follows the model.
        if data_cfg is None:
            data_cfg = evaluation_data_config(train_cfg, cfg)
        if model.sample_rate not in loaders:
            loaders[model.sample_rate] = validation_loader(
                at_rate(data_cfg, cfg, model.sample_rate), device)
        loader = loaders[model.sample_rate]
        null_model, null_note = null_model_for(cfg, train_cfg, device)
        results, examples = evaluate_model(
            model, int(train_cfg.model.bins), loader,
            content_codebook=int(train_cfg.pairwise.content_codebook),
            keep_examples=int(cfg.spectrogram_items), settings=instrument_settings(cfg),
            capsules=array_geometry(loader.dataset, geometry_spec(cfg)), desc=label,
            null_model=null_model)
        if null_note and results.get("swap_gain") is not None:
            results["swap_null_note"] = null_note
        note = level_side_note(train_cfg, level_side)
        if note:
            results["level_side_note"] = note
            print(f"note: {label}: {note}", file=sys.stderr)
        mode = "paired" if int(train_cfg.datasets.views) >= 2 else "mono"
        results.update(step=checkpoint_entry(path, "step"), sample_rate=model.sample_rate,
                       segment_samples=loader.dataset.length)
        if cfg.shared_content.segments:
            for key, channels in shared_content_channel_sets(cfg, loader.dataset).items():
                results[key] = shared_content_comparison(
                    model, shared_content_loader(data_cfg, cfg, model.sample_rate, device,
                                                 channels),
                    reference=0, codings=shared_content_codings(cfg),
                    equal_bitrate_model=equal_model, level_side=level_side)
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


def json_safe(value: Any) -> Any:
    """`value` with every NaN / infinity replaced by None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    return value


def write_metrics_json(reports: list[CheckpointReport], path: Path) -> None:
    """`{label: {checkpoint, mode, ...metrics}}`, NaN written as null (strict JSON)."""
    entries = {r.label: json_safe(r.entry()) for r in reports}
    path.write_text(json.dumps(entries, indent=2, allow_nan=False, default=float))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _pm(mean: Any, std: Any) -> str:
    return f"{_fmt(mean)} ± {_fmt(std, 2)}" if mean is not None else "n/a"


def _nested(results: dict, key: str, inner: str) -> Any:
    container = results.get(key)
    return None if container is None else container.get(inner)


def _swap_gain_cell(r: dict) -> str:
    if r.get("swap_gain") is None:
        return "n/a"
    lo, hi = r.get("swap_gain_ci") or (None, None)
    cell = (f"{_fmt(r['swap_gain'])} [{_fmt(lo)}, {_fmt(hi)}] "
            f"({_fmt(r.get('swap_n_used'))} used, {_fmt(r.get('swap_n_degenerate'))} degenerate)")
    ratio = r.get("swap_separation_ratio")
    if (math.isfinite(r["swap_gain"]) and ratio is not None and math.isfinite(ratio)
        and ratio < MIN_RESOLVED_SEPARATION):
        cell += f" ⚠ not resolved: decodes differ by {100 * ratio:.2g}% of the inputs' separation"
    return cell


def _with_ci(r: dict, key: str) -> str:
    lo, hi = r.get(f"{key}_ci") or (None, None)
    return "n/a" if r.get(key) is None else f"{_fmt(r[key])} [{_fmt(lo)}, {_fmt(hi)}]"


def table_rows(reports: list[CheckpointReport]) -> list[tuple[str, list[str]]]:
    """The report's rows: (name with its reference in brackets, one cell per checkpoint)."""
    res = [r.results for r in reports]
    cells = lambda f: [f(r) for r in res]  # noqa: E731
    rows: list[tuple[str, list[str]]] = [
        ("mode", [r.mode for r in reports]),
        ("step", cells(lambda r: _fmt(r.get("step")))),
        ("pairs (segment samples)",
         cells(lambda r: f"{_fmt(r.get('num_items'))} ({_fmt(r.get('segment_samples'))})")),
        ("SI-SNR dB ↑, pair's scale (own scale)",
         cells(lambda r: f"{_fmt(r.get('si_snr'))} ({_fmt(r.get('si_snr_own_scale'))})")),
        ("mel distance ↓, pair's scale (own scale)",
         cells(lambda r: f"{_fmt(r.get('mel_distance'))} "
                         f"({_fmt(r.get('mel_distance_own_scale'))})")),
        ("bitrate kbps (entropy)",
         cells(lambda r: f"{_fmt(r.get('bitrate_kbps'))} "
                         f"({_fmt(r.get('effective_bitrate_kbps'))})")),
        ("**swap gain** [95% CI] (0: cb2 of B moves nothing, 1: decodes like B)",
         cells(_swap_gain_cell)),
        ("swap gain of the spectral shape [95% CI] (band mean removed: loudness cannot move it)",
         cells(lambda r: _with_ci(r, "swap_gain_shape"))),
        ("swap gain of a loudness-only fake swap (A's decode at B's level)",
         cells(lambda r: _fmt(r.get("swap_gain_loudness_only")))),
        ("null: swap gain / shape of an untrained split (unsplit start's latent)",
         cells(lambda r: f"{_fmt(r.get('swap_gain_null'))} / {_fmt(r.get('swap_gain_shape_null'))}"
                         + (f" ({r['swap_null_note']})" if r.get("swap_null_note") else ""))),
        ("**swap gain normalised** (g - null) / (1 - null): broadband+shape / shape",
         cells(lambda r: f"{_fmt(r.get('swap_gain_normalized'))} / "
                         f"{_fmt(r.get('swap_gain_shape_normalized'))}")),
        ("channel separation dB/band: decodes (inputs)",
         cells(lambda r: f"{_fmt(r.get('swap_separation_db'))} "
                         f"({_fmt(r.get('swap_input_separation_db'))})")),
        ("swap mel to x_A / x_B (rec_A to x_B / rec_B to x_B)",
         cells(lambda r: f"{_fmt(r.get('swap_mel_to_a'))} / {_fmt(r.get('swap_mel_to_b'))} "
                         f"({_fmt(r.get('swap_rec_a_mel_to_b'))} / "
                         f"{_fmt(r.get('swap_rec_b_mel_to_b'))})")),
        ("**ILD correlation** decoded vs true (slope)",
         cells(lambda r: f"{_fmt(_nested(r, 'ild_fidelity', 'correlation'))} "
                         f"({_fmt(_nested(r, 'ild_fidelity', 'slope'))})")),
        ("**ILD error** dB ↓ (predicting no difference)",
         cells(lambda r: f"{_fmt(_nested(r, 'ild_fidelity', 'error_db'))} "
                         f"({_fmt(_nested(r, 'ild_fidelity', 'zero_error_db'))})")),
        ("ILD shape correlation, band mean removed (slope)",
         cells(lambda r: f"{_fmt(_nested(r, 'ild_fidelity_shape', 'correlation'))} "
                         f"({_fmt(_nested(r, 'ild_fidelity_shape', 'slope'))})")),
        ("ILD shape error dB ↓ (predicting no difference)",
         cells(lambda r: f"{_fmt(_nested(r, 'ild_fidelity_shape', 'error_db'))} "
                         f"({_fmt(_nested(r, 'ild_fidelity_shape', 'zero_error_db'))})")),
        ("ITD error µs < 1.5 kHz ↓ (predicting no delay)",
         cells(lambda r: f"{_fmt(_nested(r, 'itd_fidelity', 'error_us'))} "
                         f"({_fmt(_nested(r, 'itd_fidelity', 'zero_error_us'))})")),
        *shared_content_rows(cells),
        *shared_content_rows(cells, "shared_content_all"),
    ]
    n_q = max(len(r.get("perplexity") or []) for r in res)
    for k in range(n_q):
        cb = f"cb{k + 1}"
        at = lambda r, key: per_codebook(r, key, k)  # noqa: E731
        spread = lambda r, key: _pm(at(r, key), at(r, f"{key}_std"))  # noqa: E731
        rows += [
            (f"{cb} code agreement across channels (chance / ceiling)",
             cells(lambda r: f"{_fmt(at(r, 'codebook_agreement'))} "
                             f"({_fmt(at(r, 'chance_agreement'))} / "
                             f"{_fmt(at(r, 'ceiling_agreement'))})")),
            (f"{cb} ILD probe R² ± std (shuffled labels)",
             cells(lambda r: f"{spread(r, 'ild_probe_r2')} "
                             f"({spread(r, 'ild_probe_r2_shuffled')})")),
            (f"{cb} channel-index probe acc. ± std, capsule fingerprints only (chance / shuffled)",
             cells(lambda r: f"{spread(r, 'channel_probe_accuracy')} "
                             f"({_fmt(r.get('channel_probe_chance'))} / "
                             f"{_fmt(at(r, 'channel_probe_accuracy_shuffled'))})")),
            (f"{cb} centred pooled-embedding cosine (chance)",
             cells(lambda r: f"{_fmt(at(r, 'centered_cosine'))} "
                             f"({_fmt(at(r, 'chance_centered_cosine'))})")),
            (f"{cb} perplexity / dead codes",
             cells(lambda r: f"{_fmt(at(r, 'perplexity'))} / {_fmt(at(r, 'dead_codes'))}")),
        ]
    return rows


def shared_content_rows(cells, key: str = "shared_content") -> list[tuple[str, list[str]]]:
    """Rows of one shared-content comparison (`key`): shared coding (independent coding at
    full bitrate; independent coding at about the shared bitrate, when measured) of the same
    multichannel segments, all at one scale per segment."""
    def codings(r: dict) -> list[dict]:
        comparison = r.get(key) or {}
        return [comparison.get(c) or {} for c in ("shared_content", "independent", EQUAL_BITRATE)]

    def all_three(name: str) -> Callable[[dict], str]:
        def cell(r: dict) -> str:
            shared, independent, equal = codings(r)
            tail = f"; {_fmt(equal.get(name))}" if equal else ""
            return f"{_fmt(shared.get(name))} ({_fmt(independent.get(name))}{tail})"
        return cell

    def channels(r: dict) -> str:
        comparison = r.get(key) or {}
        return (f"{_fmt(comparison.get('channels'))} ch, cb1 agreement with the reference "
                f"{_fmt(comparison.get('codebook1_agreement'))}")

    def ild(r: dict) -> str:
        return f"{all_three('ild_error_db')(r)} [{_fmt(codings(r)[1].get('ild_zero_error_db'))}]"

    if not any(r.get(key) for r in cells(lambda r: r)):
        return []
    what = "(independent; independent at equal bitrate)"
    return [(f"shared-content coding ({key}): channels, codebook 1 shared from the first",
             cells(channels)),
            (f"shared-content kbps per channel {what}", cells(all_three("kbps_per_channel"))),
            (f"shared-content mel distance ↓ {what}", cells(all_three("mel_distance"))),
            (f"shared-content SI-SNR dB {what}", cells(all_three("si_snr"))),
            (f"shared-content ILD error dB ↓ vs the reference {what} [predicting none]",
             cells(ild)),
            (f"shared-content ILD shape correlation, band mean removed {what}",
             cells(all_three("ild_shape_correlation"))),
            (f"shared-content ITD error µs ↓ {what}", cells(all_three("itd_error_us"))),
            *mean_stream_rows(cells, key), *level_side_rows(cells, key)]


def mean_stream_rows(cells, key: str) -> list[tuple[str, list[str]]]:
    """Rows of shared-content coding with the channels' mean content stream, when measured
    (`shared_content.mean_stream`)."""
    def mean(name: str) -> Callable[[dict], str]:
        return lambda r: _fmt(((r.get(key) or {}).get("shared_content_mean") or {}).get(name))

    if not any((r.get(key) or {}).get("shared_content_mean") for r in cells(lambda r: r)):
        return []
    return [(f"mean-stream shared-content ({key}) mel distance ↓", cells(mean("mel_distance"))),
            (f"mean-stream shared-content ({key}) ILD error dB ↓", cells(mean("ild_error_db")))]


def level_side_rows(cells, key: str) -> list[tuple[str, list[str]]]:
    """Rows of shared-content coding with band-level side information, beside independent
    coding with the same side information, when measured (`shared_content.level_side_info`)."""
    def level(name: str) -> Callable[[dict], str]:
        def cell(r: dict) -> str:
            comparison = r.get(key) or {}
            shared, independent = (comparison.get(c) or {} for c in (LEVEL_SIDE, INDEPENDENT_LEVEL))
            return f"{_fmt(shared.get(name))} ({_fmt(independent.get(name))})"
        return cell

    if not any((r.get(key) or {}).get(LEVEL_SIDE) for r in cells(lambda r: r)):
        return []
    what = f"shared-content + level side information ({key})"
    also = "(independent + level side information)"
    return [(f"{what}: kbps per channel {also}", cells(level("kbps_per_channel"))),
            (f"{what}: side information kbps per channel", cells(
                lambda r: _fmt(((r.get(key) or {}).get(LEVEL_SIDE) or {})
                               .get("side_kbps_per_channel")))),
            (f"{what}: mel distance ↓ {also}", cells(level("mel_distance"))),
            (f"{what}: SI-SNR dB {also}", cells(level("si_snr"))),
            (f"{what}: ILD error dB ↓ {also} (the bands it sends: by construction)",
             cells(level("ild_error_db"))),
            (f"{what}: ILD shape correlation (band mean removed) {also}",
             cells(level("ild_shape_correlation")))]


def markdown_table(reports: list[CheckpointReport]) -> str:
    """The checkpoints side by side, one metric per row, each beside its reference."""
    header = "| metric (reference) | " + " | ".join(f"{r.label} ({r.mode})" for r in reports) + " |"
    rule = "|---|" + "---|" * len(reports)
    return "\n".join([header, rule, *(f"| {name} | " + " | ".join(cells) + " |"
                                      for name, cells in table_rows(reports))])


LEGEND = """\
How to read it. Every decode of a pair (A's, B's, the swap) is restored at ONE scale per
pair, the two channels' common RMS, for mono and paired checkpoints alike: a per-channel
scale would restore the broadband level difference from outside the codes, and a codec
that carries nothing would look faithful. Input levels come from the raw pair.

- **SI-SNR / mel distance**: reconstruction of each channel at the pair's scale (own scale:
  each channel at its own RMS, as `codec.py` codes one channel).
- **swap gain**: codebook 1 of A decoded with codebook 2 of B; per-band levels L over the
  segment; the projection <L(swap) - L(rec_A), d> / |d|^2 with d = L(rec_B) - L(rec_A),
  pooled over {selection} as a ratio of sums, 95% bootstrap interval resampling files.
  0: codebook 2 of B moves nothing toward B's decode; 1: the swap decodes like B.
  Loudness cannot move it (one scale for all three decodes), nor a bias common to every
  decode (it cancels in both differences). A codebook 2 that is ~0 gives 0, not noise; a
  codec that does not resolve the channels has no direction d (degenerate pairs, counted):
  read the gain only where the decodes' separation is a sizeable part of the inputs'
  (⚠ below {min_ratio:.0%}: noise over noise).
  The mel distances of the swap to x_A and x_B stand beside the same for A's and B's
  decodes against x_B (the 0 and 1 ends).
- **ILD** (inter-channel level difference per band, A - B): correlation and slope of the
  decoded pair's ILD against the input pair's, and its mean error beside the error of
  predicting no difference (a codec that decodes both channels alike scores exactly that).
  **ITD**: GCC-PHAT delay below 1.5 kHz, error beside predicting no delay.
- **code agreement**: share of frames where both channels of a segment get the same code,
  beside chance (different segments: what a degenerate codebook that uses few codes
  scores too) and the ceiling (a channel against itself 1 sample later and 0.5 dB louder,
  at the same scale: no pair of channels can agree more).
- **ILD probe**: ridge regression, trained fresh on frozen time-pooled embeddings of both
  channels, predicting the per-band input ILD; R^2 mean ± std over folds grouped by file
  (no file on both sides, so recognising a file cannot leak into the score), beside the
  same procedure on shuffled labels (what the probe scores on nothing). Content in
  codebook 1 and channel in codebook 2 shows as cb2 > cb1.
- **channel-index probe**: logistic regression of the capsule index from one channel's
  pooled embedding, same folds; it measures only capsule fingerprints (coloration, noise):
  on real recordings the capsule-to-direction map changes with every recording, so it says
  nothing about spatial content. Beside the majority-class chance and shuffled labels.
- **perplexity / dead codes**: codebook health (a collapsed codebook agrees trivially).
- **shared-content coding** (`codec.py encode --shared-content`): the same multichannel
  segments coded with ONE codebook-1 stream (the first channel's) and each channel's own
  codebook 2, against independent coding of every channel, both at one scale per segment;
  quality per channel and the level / delay errors of each channel against the reference
  channel. A codebook 1 that carries the shared content loses little by being shared.
"""


def write_markdown(reports: list[CheckpointReport], path: Path) -> str:
    """`report.md`: the table and how to read it; returns the table."""
    table = markdown_table(reports)
    selections = sorted({r.results.get("swap_pairs")
                         for r in reports if r.results.get("swap_pairs")})
    selection = "; ".join(selections) or "the well-separated pairs"
    notes = [f"- {r.label}: probes: {r.results['probe_note']}"
             for r in reports if r.results.get("probe_note")]
    notes += [f"- {r.label}: {r.results['level_side_note']}"
              for r in reports if r.results.get("level_side_note")]
    path.write_text("# Evaluation: does codebook 1 carry the content and codebook 2 the "
                    "channel?\n\n"
                    + table + "\n\n" + ("\n".join(notes) + "\n\n" if notes else "")
                    + LEGEND.format(selection=selection, min_ratio=MIN_RESOLVED_SEPARATION))
    return table


def write_report(reports: list[CheckpointReport], out_dir: Path) -> dict[str, Path]:
    """All report files into `out_dir`; returns them by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md",
             "code_agreement": out_dir / "code_agreement.png",
             "swap_gain": out_dir / "swap_gain.png",
             "ild_scatter": out_dir / "ild_scatter.png",
             "codebook_usage": out_dir / "codebook_usage.png",
             "spectrograms": out_dir / "spectrograms.png"}
    write_metrics_json(reports, files["metrics"])
    write_markdown(reports, files["report"])
    plots.plot_code_agreement(reports, files["code_agreement"])
    plots.plot_swap_gain(reports, files["swap_gain"])
    if any((r.results.get("per_pair") or {}).get("ild_true_db") for r in reports):
        plots.plot_ild_scatter(reports, files["ild_scatter"])
    else:
        del files["ild_scatter"]
    plots.plot_codebook_usage(reports, files["codebook_usage"])
    if any(r.examples for r in reports):
        plots.plot_spectrograms(reports, files["spectrograms"])
    else:
        del files["spectrograms"]
    return files


def log_to_wandb(reports: list[CheckpointReport], files: dict[str, Path], cfg: DictConfig) -> None:
    """The same numbers and plots to wandb (nothing when `wandb.mode=disabled`)."""
    if cfg.wandb.mode == "disabled":
        return
    from training.tracking import Tracker

    tracker = Tracker(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name,
                      Path(files["metrics"]).parent, OmegaConf.to_container(cfg, resolve=True))
    scalars = {f"{r.label}/{key}": value for r in reports
               for key, value in flatten_metrics(r.results).items()}
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
