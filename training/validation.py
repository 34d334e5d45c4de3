"""Validation: the fixed validation pairs, measured one way for the engine's per-epoch
validation and for `evaluate.py`.

Both build the items from the config with `validation_dataset`, measure each batch with
`measure_batch` (every decode of an item at ONE scale, its views' common RMS: the
reconstructions, the swap between views 1 and 2 and the cues of `pair_cues.pair_cues`;
the ceiling copy's codes; the reconstructions at each channel's own scale) and feed
`MetricAccumulator` with `accumulate`, in item order. On top of that, the
engine's `validate` adds the per-channel training losses, splits the items over the ranks
and writes a few items as audio; `evaluate_model` keeps a few waveforms for the report.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import soundfile as sf
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import distributed
from measure import metrics, pair_cues
from measure.accumulator import InstrumentSettings, MetricAccumulator
from measure.results import flatten_metrics
from utils.array_files import geometry_channels, read_geometry
from utils.eigenscape import CAPSULES
from model import EncodecModel, EncodecOutput
from paired_channel_dataset import PairedChannelDataset
from modules.level_side_info import with_level_side
from modules.views import flatten_views, per_view_means, split_views, unflatten_views
from training.parts import Parts
from training.runtime import Runtime
from training.tracking import Tracker

log = logging.getLogger("encodec")

# Logged on the console after each validation (all of them go to wandb): reconstruction, then
# the decisive paired-channel figures each beside its reference.
VAL_SUMMARY = ("val/l_f_ch1", "val/l_sim", "val/l_div", "val/si_snr", "val/mel_distance",
               "val/swap_gain", "val/swap_separation_db", "val/ild_corr", "val/ild_error_db",
               "val/ild_zero_error_db", "val/itd_error_us", "val/itd_zero_error_us",
               "val/agreement_cb1", "val/chance_agreement_cb1", "val/ceiling_agreement_cb1",
               "val/agreement_cb2", "val/chance_agreement_cb2", "val/ild_probe_r2_cb1",
               "val/ild_probe_r2_cb2", "val/ild_probe_r2_shuffled_cb2")

# The per-epoch validation's statistics: cheap probes (fixed regularisation, one shuffle),
# so that it stays a few seconds on the CPU; evaluate.py runs the full ones.
PER_EPOCH_SETTINGS = InstrumentSettings()


# ----------------------------------------------------------------------------------------
# The items


def validation_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with at least two views per item.

    Mono models are validated on pairs too (each channel encoded separately), so that
    their cross-channel agreement, swap test and probe are measured on the same pairs as
    paired models'.
    """
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.datasets.views = max(2, cfg.datasets.views)
    return cfg


def validation_dataset(cfg: DictConfig) -> PairedChannelDataset:
    """The `datasets.val_pairs` fixed validation items of `datasets.val_classes`."""
    dataset = PairedChannelDataset(validation_config(cfg), "val")
    if len(dataset) == 0:
        raise ValueError(f"no validation items for classes {list(cfg.datasets.val_classes)} in "
                         f"{cfg.datasets.data_root}: raise datasets.val_pairs or check the "
                         "classes.")
    return dataset


def array_geometry(dataset: Any, spec: str | None = None) -> Any:
    """Capsule directions `[C, 3]` of the files of `dataset`, or None (unknown): the swap
    gain then uses every pair and says so (`pair_cues.separated_pairs`).

    `spec` (evaluate.py's `array_geometry`): `em32` or a file of one line per channel
    (`array_files.read_geometry`). Without it: the em32's (`eigenscape.CAPSULES`) when
    every file of an EigenScape `dataset` has 32 channels (EigenScape and the synthetic
    set); an array set (`datasets.array_set`) has no geometry unless given one.
    """
    files = getattr(dataset, "files", None)
    if spec:
        return read_geometry(str(spec), geometry_channels(files or [], str(spec)))
    if getattr(dataset, "array_set", False):
        return None
    if not files or any(f.channels != 32 for f in files):
        return None
    return CAPSULES


# ----------------------------------------------------------------------------------------
# Measuring a batch


@dataclass
class MeasuredBatch:
    """One validation batch, measured, on the CPU: what the metric accumulator takes.

    Every decode here is restored at the pair's common scale (`pair_scale`), except
    `audio_own_scale`.

    Attributes:
        wavs: `[B, V, C, T]` inputs.
        audio: `[B, V, C, T]` reconstructions at the pair's common scale.
        audio_own_scale: `[B, V, C, T]` reconstructions with each channel at its own RMS
            (how `codec.py` codes a single channel), or None (no audio normalisation: the
            same as `audio`).
        codes: `[B, V, n_q, F]`.
        ceiling_codes: `[B, V, n_q, F]` codes of `metrics.ceiling_copy` of every view,
            encoded at the same scale.
        embeddings: `n_q` tensors `[B, V, D, F]`.
        metas: the items' metadata (`channels`: pair selection and channel probe; `path`:
            probe folds and bootstrap groups).
        cues: `pair_cues.PairCues` of views 1 and 2, or None (one view, or segments too
            short); without the swap's entries for a single-codebook model.
        swap_audio: `[B, C, T]` decoded swap (content codebook of view 1, the others of
            view 2, at the pair's scale), or None.
    """
    wavs: Tensor
    audio: Tensor
    codes: Tensor
    embeddings: list[Tensor]
    metas: list[dict[str, Any]]
    audio_own_scale: Tensor | None = None
    ceiling_codes: Tensor | None = None
    cues: pair_cues.PairCues | None = None
    swap_audio: Tensor | None = None

    @property
    def channels(self) -> Tensor:
        """`[B, V]` microphone channel of each view."""
        return torch.tensor([list(m["channels"]) for m in self.metas], dtype=torch.long)

    @property
    def groups(self) -> list[str]:
        """`[B]` source file of each item."""
        return [str(m["path"]) for m in self.metas]


def pair_scale(model: EncodecModel, x: Tensor, views: int) -> Tensor | None:
    """`[B*V, 1, 1]` one normalisation scale per item of `x [B*V, C, T]` (view-major): the
    common RMS of its views (`EncodecModel.shared_scale`); None without audio
    normalisation (then the raw level is coded and restored by nothing at all)."""
    return EncodecModel.shared_scale(x, views) if model.audio_normalize else None


def latent_decoder(model: EncodecModel, scale: Tensor | None,
                   length: int) -> Callable[[Tensor], Tensor]:
    """`decode(latent [B, D, F]) -> [B, C, length]`: the decoder, trimmed, restored at `scale`
    `[B, 1, 1]`, the pair's one scale (None without audio normalisation). Every decode of a
    pair (A, B, the swap) goes through the same scale, so loudness restored from outside the
    codes moves none of them toward the other channel."""
    def decode(latent: Tensor) -> Tensor:
        audio = model.decoder(latent)[..., :length]
        return audio if scale is None else audio * scale.reshape(-1, 1, 1)
    return decode


def content_dims(model: Any) -> int:
    """Latent dimensions codebook 1 alone codes (0: EnCodec's unsplit residual quantizer)."""
    return int(getattr(getattr(model, "quantizer", None), "content_dims", 0) or 0)


def null_swap_decodes(null_model: EncodecModel, x: Tensor, scale: Tensor | None, views: int,
                      dims: int, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Decodes of A, B and of the swap `[z_A[:dims] | z_B[dims:]]` of the continuous latent
    of `null_model`, a model never trained with a split (no quantizer), at the pair's scale:
    what a split of `dims` dimensions scores on the swap without having learned anything.
    `x` `[B*V, C, T]` view-major, `scale` `[B*V, 1, 1]` or None; each output `[B, C, length]`."""
    if not null_model.audio_normalize:
        scale = None
    latent = unflatten_views(null_model.encoder(null_model.normalize(x, scale)[0]), views)
    z_a, z_b = latent[:, 0], latent[:, 1]
    item_scale = None if scale is None else unflatten_views(scale, views)[:, 0]
    decode = latent_decoder(null_model, item_scale, length)
    return decode(z_a), decode(z_b), decode(torch.cat([z_a[:, :dims], z_b[:, dims:]], dim=1))


@torch.no_grad()
def measure_batch(model: EncodecModel, wavs: Tensor, metas: list[dict[str, Any]],
                  content_codebook: int,
                  autocast: Callable[[], contextlib.AbstractContextManager]
                  = contextlib.nullcontext,
                  null_model: EncodecModel | None = None) -> tuple[MeasuredBatch, EncodecOutput]:
    """Measure the V views of `wavs [B, V, C, T]` (on the model's device, under `autocast`),
    all at ONE scale per item: the views' common RMS (`pair_scale`).

    - one forward at that scale (codes, embeddings, reconstructions);
    - one at each channel's own RMS, for the reconstruction metrics `*_own_scale`;
    - the codes of `metrics.ceiling_copy` of every view at the same scale;
    - with 2 views or more: the swap (content codebook `content_codebook` of view 1 with the
      other codebooks of view 2; 2 codebooks or more) decoded at the same scale and under the
      same `autocast` as the views, and, in float32, `pair_cues.pair_cues` of views 1 and 2
      (band levels of the raw inputs, the decodes and the swap, GCC-PHAT delays, the swap's
      mel distances).
    A mono model is measured the same way: its codes must carry the level difference.
    With `null_model` and a split quantizer, also the null swap's decodes
    (`null_swap_decodes`, under the same `autocast`) for the cues' null levels.

    `model` needs `audio_normalize`, `n_q`, `sample_rate`, `decoder`, `forward(x,
    return_embeddings, scale)` and `encode(x, scale=)` (`EncodecModel`'s). Returns the
    measured batch (on the CPU) and the model's output on `wavs.flatten(0, 1)` at the
    pair's scale.
    """
    views, length = wavs.shape[1], wavs.shape[-1]
    x = flatten_views(wavs)
    scale = pair_scale(model, x, views)
    with autocast():
        out = model(x, return_embeddings=True, scale=scale)
        own = model(x) if scale is not None else None
        ceiling_codes = model.encode(metrics.ceiling_copy(x), scale=scale)
    embeddings = [unflatten_views(e.float(), views) for e in out.embeddings]
    audio = unflatten_views(out.audio.float()[..., :length], views)
    cues, swap_audio = None, None
    if views >= 2:
        if model.n_q >= 2:
            item_scale = None if scale is None else unflatten_views(scale.float(), views)[:, 0]
            decode = latent_decoder(model, item_scale, length)
            emb_a, emb_b = [e[:, 0] for e in embeddings], [e[:, 1] for e in embeddings]
            sources = pair_cues.swap_sources(model.n_q, content_codebook)
            with autocast():  # the precision A and B were decoded in, or it moves the swap
                swap_audio = decode(pair_cues.mix_embeddings(sources, emb_a, emb_b)).float()
        null = None
        if swap_audio is not None and null_model is not None and content_dims(model) > 0:
            with autocast():
                null = [d.float() for d in null_swap_decodes(null_model, x, scale, views,
                                                             content_dims(model), length)]
        cues = pair_cues.pair_cues(wavs[:, 0], wavs[:, 1], audio[:, 0], audio[:, 1], swap_audio,
                                   model.sample_rate, null)
        cues = None if cues is None else cues.cpu()
        swap_audio = None if swap_audio is None else swap_audio.cpu()
    measured = MeasuredBatch(
        wavs=wavs.cpu(), audio=audio.cpu(), codes=unflatten_views(out.codes, views).cpu(),
        embeddings=[e.cpu() for e in embeddings], metas=list(metas),
        audio_own_scale=(None if own is None
                         else unflatten_views(own.audio.float()[..., :length], views).cpu()),
        ceiling_codes=unflatten_views(ceiling_codes, views).cpu(), cues=cues, swap_audio=swap_audio)
    return measured, out


def accumulate(acc: MetricAccumulator, measured: MeasuredBatch) -> None:
    """Feed one measured batch to the accumulator."""
    acc.update(measured.wavs, measured.audio, measured.codes, measured.embeddings,
               measured.channels,
               groups=measured.groups, ceiling_codes=measured.ceiling_codes, cues=measured.cues,
               audio_own_scale=measured.audio_own_scale)


# ----------------------------------------------------------------------------------------
# evaluate.py: one model over the validation items


@torch.no_grad()
def evaluate_model(model: EncodecModel, bins: int, batches: Iterable[tuple[Tensor, list[dict]]], *,
                   content_codebook: int, keep_examples: int,
                   settings: InstrumentSettings | None = None, capsules: Any = None,
                   desc: str = "evaluate", null_model: EncodecModel | None = None
                   ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Run `model` over paired batches `(wavs [B, V, 1, T], metas)`.

    `content_codebook` is the model's `pairwise.content_codebook`, `settings` the
    statistics' `InstrumentSettings` (default: the per-epoch validation's),
    `capsules` the array geometry (`array_geometry`), `desc` the progress bar's label,
    `null_model` the unsplit model whose latent swap is a split model's null (`swap_results`).
    Returns `(results, examples)`: `MetricAccumulator.compute()` results, and the first
    `keep_examples` items' inputs, reconstructions and swap as `{name: [items, T]}`.
    """
    device = next(model.parameters()).device
    model.eval()
    acc = MetricAccumulator(model.n_q, bins, model.sample_rate, model.frame_rate, settings,
                            capsules, split_quantizer=content_dims(model) > 0)
    if null_model is not None:
        null_model.eval()
    examples: dict[str, list[Tensor]] = {}
    for wavs, metas in tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True):
        measured, _ = measure_batch(model, wavs.to(device), metas, content_codebook,
                                    null_model=null_model)
        accumulate(acc, measured)
        keep_examples_of(examples, keep_examples, measured)
    if acc.num_items == 0:
        raise ValueError("no validation items to evaluate")
    return acc.compute(), {name: torch.cat(parts) for name, parts in examples.items()}


def keep_examples_of(examples: dict[str, list[Tensor]], limit: int,
                     measured: MeasuredBatch) -> None:
    """Add the batch's first items to `examples` until `limit` items are kept (first audio
    channel of each view: `input_a`, `input_b`, `recon_a`, `recon_b`, `swap`)."""
    kept = sum(len(part) for part in examples.get("input_a", []))
    take = min(limit - kept, measured.wavs.shape[0])
    if take <= 0:
        return
    wavs, audio, swap = measured.wavs, measured.audio, measured.swap_audio
    paired = wavs.shape[1] > 1
    waves = {"input_a": wavs[:take, 0], "input_b": wavs[:take, 1] if paired else None,
             "recon_a": audio[:take, 0], "recon_b": audio[:take, 1] if paired else None,
             "swap": None if swap is None else swap[:take]}
    for name, value in waves.items():
        if value is not None:
            examples.setdefault(name, []).append(value[:, 0].float())


# ----------------------------------------------------------------------------------------
# The engine: per-epoch validation


@torch.no_grad()
def validation_losses(parts: Parts, x: Tensor, out: EncodecOutput, measured: MeasuredBatch,
                      step: int) -> dict[str, float]:
    """The training losses of a validation batch at optimizer step `step`, summed over its
    items: reconstruction losses per channel (`l_t_ch1`, ...) and the pairwise losses (with
    the channel classifier's `l_cls` when it is on), of `out`: the forward at the pair's
    common scale, like every validation measurement. As in training, the reconstruction
    losses score the decode after the band gains of `parts.level_side` when there are any;
    the metrics (`measure_batch`) read the codes' own decode."""
    batch_size, views = measured.wavs.shape[:2]
    played = out.audio.float()
    if parts.level_side is not None:
        played = with_level_side(x.float(), played, parts.raw_model.sample_rate,
                                 parts.level_side)
    per_view = per_view_means(parts.generator_loss(x, played), views)
    sums = {f"{name}_ch{v + 1}": values[v] * batch_size
            for name, values in per_view.items() for v in range(views)}
    if parts.pairwise is not None:
        pair = parts.pairwise.embedding_terms(split_views(out.embeddings, views), step,
                                              classes=[m["class"] for m in measured.metas],
                                              channels=measured.channels)
        sums.update({k: pair[k] * batch_size
                     for k in ("l_sim", "l_div", "l_cls", "sim", "div") if k in pair})
    return {name: float(value) for name, value in sums.items()}


@torch.no_grad()
def validate(parts: Parts, runtime: Runtime, cfg: DictConfig, loader: DataLoader, epoch: int,
             step: int, tracker: Tracker, audio_dir: Path | None) -> dict[str, float]:
    """Over ALL fixed validation items: mean losses per channel, pairwise losses, and the
    metrics of `MetricAccumulator` with the light `PER_EPOCH_SETTINGS` (SI-SNR and
    mel distance at the pair's scale and at each channel's own, perplexity, cross-channel
    code agreement against chance and ceiling, swap gain, ILD / ITD fidelity, the ILD and
    channel-index probes), logged as `val/<name>` (`flatten_metrics`).

    Each rank measures its block of the items (`loader`); the measured batches are gathered
    on rank 0 in item order, so the numbers are those of a single process. Returns the
    scalars on rank 0 (an empty dict elsewhere).
    """
    parts.model.eval()
    model = parts.raw_model
    batches: list[tuple[MeasuredBatch, dict[str, float]]] = []
    for wavs, metas in loader:
        wavs = wavs.to(runtime.device)
        measured, out = measure_batch(model, wavs, metas, cfg.pairwise.content_codebook,
                                      runtime.autocast)
        losses = validation_losses(parts, flatten_views(wavs), out, measured, step)
        batches.append((measured, losses))
    batches = distributed.gather_to_main(batches)
    if not runtime.is_main:
        return {}
    acc = MetricAccumulator(n_q=model.n_q, bins=cfg.model.bins, sample_rate=model.sample_rate,
                            frame_rate=model.frame_rate, settings=PER_EPOCH_SETTINGS,
                            capsules=array_geometry(loader.dataset),
                            split_quantizer=content_dims(model) > 0)
    loss_sums: dict[str, float] = {}
    for measured, sums in batches:
        accumulate(acc, measured)
        for name, value in sums.items():
            loss_sums[name] = loss_sums.get(name, 0.0) + value
    scalars = {f"val/{name}": value / acc.num_items for name, value in loss_sums.items()}
    scalars.update({f"val/{name}": value
                    for name, value in flatten_metrics(acc.compute()).items()})
    log.info("validation epoch %d: %s", epoch, " ".join(
        f"{k[4:]}={scalars[k]:.4g}" for k in VAL_SUMMARY if k in scalars))
    tracker.log({**scalars, "epoch": epoch}, step)
    to_save = [(measured.wavs[i], measured.audio[i], measured.metas[i])
               for measured, _ in batches
               for i in range(len(measured.metas))][:cfg.checkpoint.save_audio]
    if audio_dir is not None and to_save:
        write_validation_audio(to_save, audio_dir / f"epoch{epoch:04d}", cfg.model.sample_rate,
                               tracker, step)
    return scalars


def write_validation_audio(items: list[tuple[Tensor, Tensor, dict[str, Any]]], folder: Path,
                           sample_rate: int, tracker: Tracker, step: int) -> None:
    """Input and reconstruction `[V, 1, T]` of every view of each item as WAV files, and to
    wandb as audio and log-mel spectrograms (one row per item: input and reconstruction of
    each view)."""
    folder.mkdir(parents=True, exist_ok=True)
    audio, rows = {}, []
    for i, (inp, rec, meta) in enumerate(items):
        waves = {}
        for v, channel in enumerate(meta["channels"]):
            for kind, wav in (("input", inp[v]), ("recon", rec[v])):
                data = wav.squeeze(0).numpy()
                sf.write(folder / f"item{i}_ch{channel}_{kind}.wav", data, sample_rate,
                         subtype="FLOAT")
                audio[f"audio/item{i}_view{v + 1}_{kind}"] = data
                waves[f"{kind}_{v + 1}"] = wav.squeeze(0)
        rows.append((f"item{i} ch{list(meta['channels'])}", waves))
    columns = tuple(f"{kind}_{v + 1}" for v in range(len(items[0][0]))
                    for kind in ("input", "recon"))
    tracker.log_audio(audio, sample_rate, step)
    if tracker.run is not None:
        from measure import plots  # matplotlib only when wandb takes images
        figure = plots.spectrogram_figure(rows, sample_rate, columns)
        tracker.log_images({"val/spectrograms": figure}, step)
        plots.plt.close(figure)
