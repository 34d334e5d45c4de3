"""evaluate.py on any array's recordings (`array_set=DIR`): files found with no classes,
any channel count from 2, unusable files explained, the geometry only when given."""
from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

import evaluate
from test_codec import save_tiny_checkpoint
from test_instrument import HOP, FramedCodec, everything_in_codebook_1
from training.validation import array_geometry, evaluate_model
from utils.array_files import find_array_files, read_geometry
from utils.eigenscape import CAPSULES
from utils.eigenscape_files import DataWarning

ROOT = Path(__file__).resolve().parents[1]
RATE = 24000
SEGMENT_SECONDS = 30 * HOP / RATE  # 0.4 s: whole frames of the FramedCodec stub


def write_recording(path: Path, channels: int, seconds: float = 1.0, rate: int = RATE,
                    seed: int = 0, gains_db: list[float] | None = None) -> None:
    """Independent noise per channel (or one noise at `gains_db` per channel)."""
    rng = np.random.default_rng(seed)
    frames = int(round(seconds * rate))
    if gains_db is None:
        audio = 0.1 * rng.standard_normal((frames, channels))
    else:
        source = 0.1 * rng.standard_normal(frames)
        audio = np.stack([source * 10 ** (g / 20) for g in gains_db], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio.astype(np.float32), rate)


def eval_config(folder: Path, *overrides: str):
    """config/evaluate.yaml with `array_set=folder` and light statistics."""
    cfg = OmegaConf.load(ROOT / "config" / "evaluate.yaml")
    cfg.merge_with_dotlist([f"array_set={folder}", "device=cpu", "datasets.val_pairs=4",
                            "datasets.batch_size=4", "instrument.probe_shuffles=1",
                            "instrument.bootstrap=20", "shared_content.segments=2",
                            f"datasets.segment_seconds={SEGMENT_SECONDS}", *overrides])
    return cfg


def array_loader(train_cfg, folder: Path, *overrides: str):
    cfg = eval_config(folder, *overrides)
    data_cfg = evaluate.at_rate(evaluate.evaluation_data_config(train_cfg, cfg), cfg, RATE)
    return evaluate.validation_loader(data_cfg, torch.device("cpu")), cfg


def test_level_difference_is_recovered_and_a_codec_that_decodes_alike_scores_none(
        cfg_factory, tmp_path):
    """Channel 2 is channel 1 at -6 dB: the inputs' |ILD| is 6 dB in every band; a codec
    that decodes every channel alike (a fixed waveform) predicts no difference, so its ILD
    error is exactly its no-difference error, and a lossless one has no error at all."""
    for i in range(2):
        write_recording(tmp_path / "set" / f"take{i}.flac", 2, seconds=2.0, seed=i,
                        gains_db=[0.0, -6.0])
    loader, _ = array_loader(cfg_factory(), tmp_path / "set", "datasets.val_pairs=8")
    length = loader.dataset.length
    fixed = torch.randn(1, 1, length, generator=torch.Generator().manual_seed(0))
    alike = FramedCodec(everything_in_codebook_1,
                        decoder=lambda latent: fixed.expand(latent.shape[0], 1, length))
    results = evaluate_model(alike, alike.bins, loader, content_codebook=0, keep_examples=0)[0]
    ild = results["ild_fidelity"]
    assert ild["zero_error_db"] == pytest.approx(6.0, abs=0.1)
    assert ild["error_db"] == pytest.approx(ild["zero_error_db"], abs=1e-3)
    per_band = torch.tensor(results["per_pair"]["ild_true_db"]).abs()  # [pairs, bands]
    assert per_band.shape[0] == 8 and (per_band - 6.0).abs().max() < 0.3
    lossless = FramedCodec(everything_in_codebook_1)
    exact = evaluate_model(lossless, lossless.bins, loader, content_codebook=0,
                           keep_examples=0)[0]["ild_fidelity"]
    assert exact["error_db"] < 0.05 and exact["zero_error_db"] == pytest.approx(6.0, abs=0.1)
    assert results["num_items"] == 8 and results["probe_groups"] == 2  # grouped by file


@pytest.mark.parametrize("channels", [2, 5, 25])
def test_any_channel_count_from_two_is_evaluated(cfg_factory, tmp_path, channels):
    """Two files of `channels` channels at 32 kHz, nested, no class names: every figure,
    the swap gain over all pairs with the note, shared content on the first min(4, N)
    channels and on all N."""
    for i, rel in enumerate(["a/rec one.wav", "b/c/rec-two.ogg"]):
        write_recording(tmp_path / "set" / rel, channels, rate=32000, seed=i)
    save_tiny_checkpoint(cfg_factory("config_paired_nq2"), tmp_path / "paired.pt")
    cfg = eval_config(tmp_path / "set", f"checkpoints=[{tmp_path / 'paired.pt'}]")
    [report] = evaluate.evaluate_checkpoints(cfg)
    r = report.results
    assert r["num_items"] == 4 and r["probe_groups"] == 2
    assert r["swap_pairs"] == "all pairs (no array geometry known for these files)"
    assert r["swap_n_pairs"] == 4 and math.isfinite(r["ild_fidelity"]["zero_error_db"])
    assert r["shared_content"]["channels"] == min(4, channels)
    assert r["shared_content_all"]["channels"] == channels
    assert r["segment_samples"] == round(SEGMENT_SECONDS * RATE)


def test_one_channel_and_short_files_are_explained(tmp_path):
    folder = tmp_path / "set"
    write_recording(folder / "good.wav", 3)
    write_recording(folder / "mono.wav", 1)
    write_recording(folder / "short.wav", 3, seconds=0.2)
    with pytest.warns(DataWarning, match=r"skipped 2 of 3 file\(s\)") as caught:
        files = find_array_files(folder, 2, None, segment=9600, model_rate=RATE)
    assert [f.rel for f in files] == ["good.wav"]
    message = str(caught[0].message)
    assert "mono.wav: 1 channel(s)" in message
    assert "short.wav: 0.2 s, shorter than one segment" in message
    (folder / "good.wav").unlink()
    with pytest.raises(RuntimeError, match=r"array_set=.*set: no usable recording among 2") as err:
        find_array_files(folder, 2, None, segment=9600, model_rate=RATE)
    assert "\n" not in str(err.value) and "lower datasets.segment_seconds" in str(err.value)


def test_command_line_names_the_folder_when_nothing_is_usable(cfg_factory, tmp_path):
    write_recording(tmp_path / "set" / "mono.wav", 1)
    save_tiny_checkpoint(cfg_factory("config_paired_nq2"), tmp_path / "paired.pt")
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "checkpoints=[paired.pt]",
                           "array_set=set", "out_dir=report", "device=cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate: array_set=") and "mono.wav: 1 channel(s)" in last


def test_geometry_file_is_read_and_a_wrong_one_refused(tmp_path):
    good = tmp_path / "geometry.txt"
    good.write_text("# colatitude azimuth\n90, 0\n90 90  # second capsule\n\n0 0\n")
    directions = read_geometry(str(good), 3)
    assert np.allclose(directions, [[1, 0, 0], [0, 1, 0], [0, 0, 1]], atol=1e-12)
    with pytest.raises(ValueError, match="3 line\\(s\\) of angles for files of 4 channels"):
        read_geometry(str(good), 4)
    bad = tmp_path / "bad.txt"
    bad.write_text("90 0\n90 ninety\n")
    with pytest.raises(ValueError, match="line 2: '90 ninety' is not two angles"):
        read_geometry(str(bad), 2)
    with pytest.raises(ValueError, match="em32 gives 32 capsules but the files have 3"):
        read_geometry("em32", 3)


def test_a_32_channel_array_set_gets_em32_angles_only_when_asked(cfg_factory, tmp_path):
    write_recording(tmp_path / "set" / "x.wav", 32)
    loader, _ = array_loader(cfg_factory(), tmp_path / "set")
    assert array_geometry(loader.dataset) is None
    assert array_geometry(loader.dataset, "em32") is CAPSULES
    lines = "\n".join(f"{10 + c} {c}" for c in range(32))
    (tmp_path / "g.txt").write_text(lines)
    assert array_geometry(loader.dataset, str(tmp_path / "g.txt")).shape == (32, 3)


def test_geometry_selects_the_separated_pairs(cfg_factory, tmp_path):
    """With a geometry, the swap gain counts only pairs at least 90 degrees apart: here
    channels 0 and 1 are opposite and channel 2 is next to 0."""
    write_recording(tmp_path / "set" / "x.wav", 3, seconds=2.0)
    (tmp_path / "g.csv").write_text("0,0\n180,0\n10,0\n")
    codec = FramedCodec(everything_in_codebook_1)
    loader, cfg = array_loader(cfg_factory(), tmp_path / "set", "datasets.val_pairs=12")
    capsules = array_geometry(loader.dataset, str(tmp_path / "g.csv"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = evaluate_model(codec, codec.bins, loader, content_codebook=0, keep_examples=0,
                                 capsules=capsules)[0]
    pairs = [sorted(m["channels"]) for _, metas in loader for m in metas]
    separated = sum(p in ([0, 1], [1, 2]) for p in pairs)
    assert results["swap_pairs"] == "pairs of capsules >= 90 deg apart"
    assert results["swap_n_pairs"] == separated < len(pairs)
