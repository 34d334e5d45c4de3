"""evaluate.py and the validation measurements it shares with the engine: a tiny model, the
report files, and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import evaluate
from measure.results import CheckpointReport
from test_codec import save_tiny_checkpoint
from model import EncodecModel
from training.validation import evaluate_model, latent_decoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_model(cfg_factory, tmp_path):
    cfg = cfg_factory()
    return save_tiny_checkpoint(cfg, tmp_path / "tiny.pt"), cfg


def _pairs(n_batches: int, batch: int, length: int, same_signal: bool, seed: int = 0):
    """Paired batches `(wavs [B, 2, 1, T], metas)` with channel labels 3 and 7."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        a = torch.randn(batch, 1, 1, length, generator=gen)
        b = a.clone() if same_signal else torch.randn(batch, 1, 1, length, generator=gen)
        metas = [{"path": "x.wav", "class": "Woodland", "channels": [3, 7], "start": i}
                 for _ in range(batch)]
        batches.append((torch.cat([a, b], dim=1), metas))
    return batches


def test_latent_decoder_reproduces_the_models_reconstruction(tiny_model):
    """The swap decodes latents itself, at the pair's one scale; with all of A's (B's)
    codebooks it must equal the model's reconstruction of x_A (x_B) at that scale."""
    model, cfg = tiny_model
    wavs, _ = _pairs(1, 3, cfg.datasets.tensor_cut, same_signal=False)[0]
    wavs[:, 1] *= 3.0  # B louder: one scale for both is not each one's own
    x = wavs.flatten(0, 1)
    scale = EncodecModel.shared_scale(x, 2)
    with torch.no_grad():
        out = model(x, return_embeddings=True, scale=scale)
        decode = latent_decoder(model, scale.reshape(3, 2, 1, 1)[:, 0], wavs.shape[-1])
        per_view = [e.reshape(3, 2, *e.shape[1:]) for e in out.embeddings]
        for view in range(2):
            latent = sum(e[:, view] for e in per_view)
            expected = out.audio.reshape(3, 2, 1, -1)[:, view]
            assert torch.allclose(decode(latent), expected, atol=1e-5)


def test_measurements_pair_the_views_of_each_item(tiny_model):
    """Half the items carry the same signal on both channels, half independent ones: the
    agreement must be what encoding each channel on its own gives, item by item, which a
    mix-up of items or views would change. (Identical channels alone agree for any
    deterministic model, however the pairs are formed.)"""
    model, cfg = tiny_model
    batches = _pairs(2, 4, cfg.datasets.tensor_cut, same_signal=False)
    for wavs, _ in batches:
        wavs[::2, 1] = wavs[::2, 0]  # items 0 and 2 of each batch: the same signal twice
    results, examples = evaluate_model(model, cfg.model.bins, batches, content_codebook=0,
                                       keep_examples=2)
    wavs = torch.cat([w for w, _ in batches])
    scale = EncodecModel.shared_scale(wavs.flatten(0, 1), 2).reshape(-1, 2, 1, 1)
    with torch.no_grad():  # each channel encoded on its own, at the pair's scale
        codes_a, codes_b = (model.encode(wavs[:, 0], scale=scale[:, 0]),
                            model.encode(wavs[:, 1], scale=scale[:, 1]))
    per_item = (codes_a == codes_b).float().mean(dim=2)  # [items, n_q]
    assert results["codebook_agreement"] == pytest.approx(per_item.mean(dim=0).tolist())
    assert per_item[::2].min() == 1.0 and per_item[1::2].mean() < 0.9
    # The swap: where A and B are the same signal, swapping codebooks changes nothing.
    assert results["num_items"] == 8 and examples["input_a"].shape == (2, cfg.datasets.tensor_cut)
    assert set(examples) == {"input_a", "input_b", "recon_a", "recon_b", "swap"}
    torch.testing.assert_close(examples["swap"][0], examples["recon_b"][0])
    assert not torch.allclose(examples["swap"][1], examples["recon_b"][1])


def test_codebook_one_forced_identical_gives_agreement_one(tiny_model):
    """All entries of codebook 1 equal: every frame of every channel picks code 0."""
    model, cfg = tiny_model
    embed = model.quantizer.codebooks[0].embed
    embed.copy_(embed[:1].expand_as(embed))
    results, _ = evaluate_model(model, cfg.model.bins, _pairs(2, 3, cfg.datasets.tensor_cut, False),
                                content_codebook=0, keep_examples=0)
    assert results["codebook_agreement"][0] == 1.0
    assert results["perplexity"][0] == pytest.approx(1.0)
    assert results["dead_codes"][0] == cfg.model.bins - 1
    assert results["codebook_agreement"][1] < 0.9  # independent noise: codebook 2 differs


def _report(label: str, mode: str, agreement: list[float], swap_gain: float) -> CheckpointReport:
    nan = float("nan")
    results = {
        "num_items": 4, "views": 2, "step": 10, "sample_rate": 24000, "segment_samples": 24000,
        "si_snr": 5.5, "si_snr_per_view": [5.0, 6.0], "mel_distance": 0.8,
        "mel_distance_per_view": [0.7, 0.9],
        "si_snr_own_scale": 5.6, "mel_distance_own_scale": 0.79,
        "stft_distance": 1.2, "stft_distance_per_view": [1.1, 1.3], "bitrate_kbps": 1.5,
        "effective_bitrate_kbps": 1.2, "perplexity": [300.0, 200.0], "entropy": [5.7, 5.3],
        "effective_bits": [8.2, 7.6], "dead_codes": [10, 40], "code_histogram": [[1, 2], [3, 4]],
        "codebook_agreement": agreement, "chance_agreement": [0.01, 0.01],
        "ceiling_agreement": [0.9, 0.6],
        "embedding_cosine": [0.9, 0.1], "chance_cosine": [0.2, 0.0],
        "centered_cosine": [0.5, 0.1], "chance_centered_cosine": [0.0, 0.0],
        "swap_gain": swap_gain, "swap_gain_ci": [swap_gain - 0.1, swap_gain + 0.1],
        "swap_gain_median": swap_gain,
        "swap_separation_db": 0.8, "swap_input_separation_db": 1.1, "swap_separation_ratio": 0.73,
        "swap_n_pairs": 4, "swap_n_used": 4,
        "swap_n_degenerate": 0, "swap_n_groups": 2, "swap_mel_to_a": 0.9, "swap_mel_to_b": 0.7,
        "swap_rec_a_mel_to_b": 0.95, "swap_rec_b_mel_to_b": 0.6,
        "swap_pairs": "pairs of capsules >= 90 deg apart",
        "ild_fidelity": {"correlation": 0.6, "error_db": 0.5, "zero_error_db": 1.0, "slope": 0.7},
        "itd_fidelity": {"error_us": 40.0, "zero_error_us": 60.0, "correlation": nan},
        "ild_probe_r2": [0.1, 0.7], "ild_probe_r2_std": [0.05, 0.1],
        "ild_probe_r2_shuffled": [-0.1, -0.2], "ild_probe_r2_shuffled_std": [0.1, 0.1],
        "channel_probe_accuracy": [0.1, 0.8], "channel_probe_accuracy_std": [0.02, 0.05],
        "channel_probe_accuracy_shuffled": [0.05, 0.06],
        "channel_probe_accuracy_shuffled_std": [0.01, 0.01], "channel_probe_chance": 0.0625,
        "per_pair": {"ild_true_db": [[1.0, -2.0], [0.5, 0.0]],
                     "ild_decoded_db": [[0.5, -1.0], [0.2, nan]]},
    }
    examples = {"input_a": torch.randn(1, 4800), "swap": torch.randn(1, 4800)}
    return CheckpointReport(label, f"/ckpt/{label}.pt", mode, results, examples)


def test_report_files_hold_the_checkpoints_side_by_side(tmp_path):
    reports = [_report("mono", "mono", [0.12, 0.02], 0.1),
               _report("paired", "paired", [0.73, 0.01], 0.8)]
    reports[0].results["swap_separation_ratio"] = 0.05  # the codec barely resolves the channels
    files = evaluate.write_report(reports, tmp_path / "out")
    assert {p.name for p in files.values()} == {"metrics.json", "report.md", "code_agreement.png",
                                                "swap_gain.png", "ild_scatter.png",
                                                "codebook_usage.png", "spectrograms.png"}
    data = json.loads(files["metrics"].read_text(), parse_constant=_no_nan)
    assert list(data) == ["mono", "paired"]
    for key in ("si_snr", "mel_distance", "codebook_agreement", "chance_agreement",
                "ceiling_agreement", "swap_gain", "swap_gain_ci", "ild_fidelity", "itd_fidelity",
                "ild_probe_r2", "channel_probe_accuracy", "perplexity"):
        assert key in data["paired"]
    assert data["paired"]["codebook_agreement"] == [0.73, 0.01]
    assert data["mono"]["checkpoint"] == "/ckpt/mono.pt"
    assert data["mono"]["itd_fidelity"]["correlation"] is None  # NaN -> null
    assert data["mono"]["per_pair"]["ild_decoded_db"][1] == [0.2, None]

    report = files["report"].read_text()
    assert "| metric (reference) | mono (mono) | paired (paired) |" in report
    assert ("| cb1 code agreement across channels (chance / ceiling) | 0.12 (0.01 / 0.9) | 0.73 "
            "(0.01 / 0.9) |" in report)
    assert ("| **swap gain** [95% CI] (0: cb2 of B moves nothing, 1: decodes like B) | "
            "0.1 [0, 0.2] (4 used, 0 degenerate) ⚠ not resolved: decodes differ by 5% of the "
            "inputs' separation | 0.8 [0.7, 0.9] (4 used, 0 degenerate) |") in report
    assert "| **ILD error** dB ↓ (predicting no difference) | 0.5 (1) | 0.5 (1) |" in report
    assert "| cb2 ILD probe R² ± std (shuffled labels) | 0.7 ± 0.1 (-0.2 ± 0.1) |" in report
    assert "capsule fingerprints only" in report and "pairs of capsules >= 90 deg apart" in report
    for png in ("code_agreement", "swap_gain", "ild_scatter", "codebook_usage", "spectrograms"):
        assert files[png].read_bytes().startswith(b"\x89PNG")


def _no_nan(constant: str):
    raise ValueError(f"metrics.json holds {constant}: not valid JSON")


def test_checkpoint_labels_are_short_and_unique():
    assert evaluate.checkpoint_labels(["/r/mono/last.pt", "/r/paired/best.pt"]) == ["last", "best"]
    assert (evaluate.checkpoint_labels(["/r/mono/last.pt", "/r/paired/last.pt"])
            == ["mono/last", "paired/last"])
    assert evaluate.checkpoint_labels(["/r/a/x.pt", "/r/a/x.pt"]) == ["a/x#1", "a/x#2"]


def test_data_config_turns_mono_into_pairs_and_applies_overrides(cfg_factory, synth_root):
    train_cfg = cfg_factory("config_mono_nq2", [f"datasets.data_root={synth_root}"])
    eval_cfg = OmegaConf.create({"datasets": {"data_root": None, "classes": ["Woodland"],
                                              "val_pairs": 3, "channels": [0, 9], "batch_size": 2,
                                              "num_workers": 0}})
    data_cfg = evaluate.evaluation_data_config(train_cfg, eval_cfg)
    assert data_cfg.datasets.views == 2 and data_cfg.datasets.val_classes == ["Woodland"]
    assert data_cfg.datasets.channels == [0, 9]
    batches = list(evaluate.validation_loader(data_cfg, torch.device("cpu")))
    assert sum(len(metas) for _, metas in batches) == 3
    assert all(sorted(meta["channels"]) == [0, 9] and meta["class"] == "Woodland"
               for _, metas in batches for meta in metas)
    assert data_cfg.datasets.val_pairs == 3 and data_cfg.datasets.data_root == str(synth_root)
    eval_cfg.datasets.data_root = str(synth_root / "missing")
    with pytest.raises(FileNotFoundError, match="datasets.data_root"):
        evaluate.evaluation_data_config(train_cfg, eval_cfg)


def test_command_line_compares_mono_and_paired_checkpoints(cfg_factory, synth_root, tmp_path):
    """The documented command, run from another folder with relative paths."""
    data = [f"datasets.data_root={synth_root}"]
    save_tiny_checkpoint(cfg_factory("config_mono_nq2", data), tmp_path / "mono.pt", seed=0)
    save_tiny_checkpoint(cfg_factory("config_paired_nq2", data), tmp_path / "paired.pt", seed=1)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "checkpoints=[mono.pt,paired.pt]",
         f"datasets.data_root={synth_root}", "datasets.val_pairs=6", "datasets.batch_size=4",
         "instrument.probe_shuffles=1", "shared_content.segments=3", "out_dir=report",
         "shared_content.mean_stream=true", "device=cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "report" / "metrics.json").read_text(), parse_constant=_no_nan)
    assert list(data) == ["mono", "paired"]
    assert data["mono"]["mode"] == "mono" and data["paired"]["mode"] == "paired"
    for entry in data.values():
        assert entry["num_items"] == 6 and entry["segment_samples"] == 24000  # 1 s by default
        for key in ("codebook_agreement", "chance_agreement", "ceiling_agreement", "perplexity",
                    "dead_codes", "ild_probe_r2", "ild_probe_r2_std", "ild_probe_r2_shuffled",
                    "channel_probe_accuracy"):
            assert len(entry[key]) == 2, key
        assert entry["swap_pairs"] == "pairs of capsules >= 90 deg apart"
        assert entry["swap_n_pairs"] == entry["swap_n_used"] + entry["swap_n_degenerate"]
        assert (len(entry["swap_gain_ci"]) == 2 and "swap_gain" in entry
                and "swap_separation_db" in entry)
        assert entry["swap_mel_to_a"] is None or entry["swap_mel_to_a"] > 0
        assert set(entry["ild_fidelity"]) >= {"correlation", "error_db", "zero_error_db", "slope"}
        assert entry["ild_fidelity"]["n_pairs"] == 6 and entry["itd_fidelity"]["zero_error_us"] >= 0
        assert entry["probe_groups"] == 2  # the two validation files
        shared = entry["shared_content"]  # 4 capsules, one codebook-1 stream
        assert shared["channels"] == 4 and shared["segments"] == 3
        assert (shared["shared_content"]["kbps_per_channel"]
                < shared["independent"]["kbps_per_channel"])
        assert shared["shared_content"]["n_pairs"] == 3 * 3  # each channel against the reference
        every = entry["shared_content_all"]  # all 32 capsules of the files together
        assert every["channels"] == 32 and every["shared_content"]["n_pairs"] == 3 * 31
        assert every["shared_content"]["streams"] == 1 + 32 * 1
        mean = every["shared_content_mean"]  # codebook 1 of the capsules' mean latent
        assert mean["kbps_per_channel"] == every["shared_content"]["kbps_per_channel"]
        assert mean["n_pairs"] == 3 * 31
    assert "| metric (reference) | mono (mono) | paired (paired) |" in proc.stdout
    assert "shared-content kbps per channel" in proc.stdout
    assert "mean-stream shared-content (shared_content_all) ILD error dB" in proc.stdout
    for name in ("report.md", "code_agreement.png", "swap_gain.png", "ild_scatter.png",
                 "spectrograms.png"):
        assert (tmp_path / "report" / name).is_file()


def test_command_line_explains_a_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "checkpoints=[nope.pt]",
                           "out_dir=report"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "checkpoint not found" in proc.stderr


def test_wandb_gets_the_same_numbers_and_plots(tmp_path, monkeypatch):
    from training import tracking

    logged: dict = {}

    class FakeTracker:
        def __init__(self, mode, project, name, directory, config, **_):
            logged["mode"] = mode

        def log(self, data, step):
            logged.update(data)

        def log_images(self, items, step):
            logged["images"] = sorted(items)

        def finish(self, exit_code=0):
            logged["finished"] = True

    monkeypatch.setattr(tracking, "Tracker", FakeTracker)
    reports = [_report("mono", "mono", [0.12, 0.02], 0.1),
               _report("paired", "paired", [0.73, 0.01], 0.8)]
    files = evaluate.write_report(reports, tmp_path)
    cfg = OmegaConf.create({"wandb": {"mode": "disabled", "project": "p", "name": None}})
    evaluate.log_to_wandb(reports, files, cfg)
    assert logged == {}  # disabled: wandb is never touched
    cfg.wandb.mode = "offline"
    evaluate.log_to_wandb(reports, files, cfg)
    assert logged["paired/agreement_cb1"] == 0.73 and logged["mono/si_snr"] == 5.5
    assert logged["paired/swap_gain"] == 0.8 and logged["paired/ild_corr"] == 0.6
    assert (logged["images"] == ["code_agreement", "codebook_usage", "ild_scatter", "spectrograms",
                                 "swap_gain"])
    assert logged["finished"]


def test_a_split_checkpoints_null_model_is_its_unsplit_start_point(cfg_factory, tmp_path):
    cpu = torch.device("cpu")
    evaluation = OmegaConf.create({"null_model": None})
    unsplit = cfg_factory("config_paired_nq2", ["model.content_share=0"])
    assert evaluate.null_model_for(evaluation, unsplit, cpu) == (None, None)  # its null is 0

    start = EncodecModel.from_config(unsplit.model)
    path = tmp_path / "start.pt"
    torch.save({"model": start.state_dict(), "config": OmegaConf.to_container(unsplit)}, path)
    split = cfg_factory("config_paired_nq2", ["model.content_share=0.5", f"model.init_from={path}"])
    null, note = evaluate.null_model_for(evaluation, split, cpu)
    assert note is None and null.quantizer.content_dims == 0
    for name, value in start.state_dict().items():
        if name.startswith(("encoder.", "decoder.")):
            torch.testing.assert_close(null.state_dict()[name], value)

    gone = cfg_factory("config_paired_nq2", ["model.content_share=0.5",
                                             f"model.init_from={tmp_path / 'gone.pt'}"])
    null, note = evaluate.null_model_for(evaluation, gone, cpu)
    assert null is None and "not found; set null_model=PATH" in note
    with pytest.raises(FileNotFoundError, match="null_model=.*no such file"):
        evaluate.null_model_for(OmegaConf.create({"null_model": str(tmp_path / "x.pt")}), split,
                                cpu)


def test_a_run_validated_on_the_monitor_files_is_evaluated_on_the_others(cfg_factory, synth_root):
    data = {"data_root": None, "classes": None, "val_pairs": None, "channels": None,
            "batch_size": 2, "num_workers": 0, "val_files": None}
    monitored = cfg_factory("config_paired_nq2", [f"datasets.data_root={synth_root}",
                                                  "datasets.val_files=monitor"])
    cfg = evaluate.evaluation_data_config(monitored, OmegaConf.create({"datasets": data}))
    assert cfg.datasets.val_files == "held_out"
    plain = cfg_factory("config_paired_nq2", [f"datasets.data_root={synth_root}"])
    assert evaluate.evaluation_data_config(plain, OmegaConf.create({"datasets": data})
                                           ).datasets.val_files == "all"
    chosen = OmegaConf.create({"datasets": {**data, "val_files": "monitor"}})
    assert evaluate.evaluation_data_config(monitored, chosen).datasets.val_files == "monitor"
