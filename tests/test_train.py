"""The training engine end to end, with the tiny preset on synthetic EigenScape data."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from utils import checkpoints as ckpt_io
from training import engine
from training import validation
from model import load_model
from training.configuration import ConfigError, prepare_config
from conftest import ROOT, make_config
from training.runtime import setup_runtime
from training.state import check_compatible, grouped_like
from step_faults import fp16_scalers, nan_time_loss, overflowing_gradient
from training.step import codebook_usage


def tiny(tmp_path: Path, data_root: Path, name: str = "config_paired_nq2",
         extra: list[str] | None = None):
    return make_config(name, [f"datasets.data_root={data_root}",
                              f"checkpoint.save_folder={tmp_path / 'ckpt'}", *(extra or [])])


def run_script(script: str, args: list[str], cwd: Path, timeout: int = 300,
               **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.load_checkpoint(path)["model"]


@pytest.mark.parametrize("script,views", [("train_paired_gpu.py", 2), ("train_single_gpu.py", 1)])
def test_scripts_train_through_hydra_and_write_checkpoint_and_audio(
        tmp_path, synth_root, script, views):
    save = tmp_path / "ckpt"
    res = run_script(script, ["+preset=tiny", f"datasets.data_root={synth_root}",
                              "checkpoint.save_folder=ckpt", "common.max_epoch=1",
                              f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # Relative save_folder is relative to where the command started, not Hydra's run dir.
    ckpts = ckpt_io.list_checkpoints(save)
    assert ckpts, f"no checkpoint in {save}: {list(tmp_path.rglob('*'))}"
    state = ckpt_io.load_checkpoint(ckpts[-1])
    assert {"model", "discriminator", "config", "epoch", "step"} <= set(state)
    assert state["config"]["datasets"]["views"] == views
    assert state["step"] == 2  # fixed_length 4 / batch 2
    wavs = sorted((save / "audio" / "epoch0001").glob("*.wav"))
    assert any("recon" in w.name for w in wavs) and any("input" in w.name for w in wavs)
    assert (tmp_path / "hydra" / "train.log").is_file()
    log_text = (tmp_path / "hydra" / "train.log").read_text()
    assert "validation epoch 1" in log_text
    if views == 2:
        assert "l_sim" in log_text and "agreement_cb2" in log_text


def test_missing_data_root_is_a_clear_error(tmp_path):
    res = run_script("train_paired_gpu.py", ["+preset=tiny"], cwd=tmp_path)
    assert res.returncode != 0
    assert "datasets.data_root is required" in res.stderr


def test_data_root_without_recordings_is_a_one_line_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_script("train_single_gpu.py", ["+preset=tiny", "datasets.data_root=empty"],
                     cwd=tmp_path)
    assert res.returncode != 0
    assert res.stderr.startswith("config error:") and "Traceback" not in res.stderr
    assert str(tmp_path / "empty") in res.stderr


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, synth_root):
    extra = ["common.max_epoch=2", "datasets.fixed_length=6", "common.save_interval=5",
             "common.val_interval=5"]  # 3 steps per epoch, no periodic saves in between
    full = engine.train(tiny(tmp_path / "full", synth_root, extra=extra))
    assert full["step"] == 6

    part_cfg = tiny(tmp_path / "part", synth_root, extra=extra)
    first = engine.train(part_cfg, stop_after_step=4)  # mid-epoch 2
    assert first["step"] == 4
    state = ckpt_io.load_checkpoint(first["checkpoint"])
    assert (state["epoch"], state["batch"]) == (2, 1)
    resumed = engine.train(tiny(tmp_path / "part", synth_root,
                                extra=[*extra, "checkpoint.resume=true"]))
    assert resumed["step"] == 6

    a, b = model_state(full["checkpoint"]), model_state(resumed["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    da = ckpt_io.load_checkpoint(full["checkpoint"])["opt_d"]["state"]
    db = ckpt_io.load_checkpoint(resumed["checkpoint"])["opt_d"]["state"]
    for k in da:
        assert torch.equal(da[k]["exp_avg"], db[k]["exp_avg"])


def test_a_stop_right_after_an_epochs_last_batch_resumes_into_its_validation(tmp_path, synth_root):
    extra = ["common.max_epoch=1"]  # 2 steps per epoch
    first = engine.train(tiny(tmp_path, synth_root, extra=extra), stop_after_step=2)
    state = ckpt_io.load_checkpoint(first["checkpoint"])
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 2) and not first["val"]
    assert not (tmp_path / "ckpt" / "best.pt").exists()

    resumed = engine.train(tiny(tmp_path, synth_root, extra=[*extra, "checkpoint.resume=true"]))
    assert resumed["step"] == 2 and "val/mel_distance" in resumed["val"]
    assert (tmp_path / "ckpt" / "best.pt").is_file()
    final = ckpt_io.load_checkpoint(resumed["checkpoint"])
    assert (final["epoch"], final["batch"]) == (2, 0) and final["val"] == resumed["val"]


def test_adversarial_terms_start_at_the_discriminator_start_epoch_without_scheduler_warnings(
        tmp_path, synth_root):
    extra = ["discriminator.start_epoch=2", "lr_scheduler.warmup_epoch=1", "common.val_interval=5"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.train(tiny(tmp_path, synth_root, extra=extra), run_dir=tmp_path / "run")
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    lines = [line
             for line in (tmp_path / "run" / "train.log").read_text().splitlines()
             if " step " in line]
    epoch1 = [line for line in lines if " epoch 1 batch" in line]
    epoch2 = [line for line in lines if " epoch 2 batch" in line]
    assert epoch1 and epoch2
    assert not any("l_g_ch1" in line for line in epoch1)
    assert all("l_g_ch1" in line and "l_feat_ch2" in line for line in epoch2)


def test_resume_with_shape_changing_config_fails_clearly(tmp_path, synth_root):
    engine.train(tiny(tmp_path, synth_root, extra=["common.max_epoch=1"]))
    cfg = tiny(tmp_path, synth_root, extra=["common.max_epoch=2", "checkpoint.resume=true",
                                            "model.n_q=3"])
    with pytest.raises(ConfigError, match=r"model\.n_q: checkpoint 2 vs now 3"):
        engine.train(cfg)


def test_resume_with_another_quantizer_split_is_refused(cfg_factory, tmp_path):
    # A split moves codebook 1 onto other latent dims: the saved codes would mean something
    # else, with every tensor shape unchanged.
    split = cfg_factory("config_paired_nq2", ["model.content_share=0.5"])
    unsplit = OmegaConf.to_container(cfg_factory("config_paired_nq2", ["model.content_share=0"]))
    with pytest.raises(ConfigError, match=r"model\.content_share: checkpoint 0(\.0)? vs now 0\.5"):
        check_compatible({"config": unsplit}, split, tmp_path / "ckpt.pt")
    check_compatible({"config": OmegaConf.to_container(split)}, split, tmp_path / "ckpt.pt")


def test_resume_with_the_level_head_switched_is_refused_by_name(cfg_factory, tmp_path):
    # A run of a default without the level head has no head parameters to restore.
    without = OmegaConf.to_container(cfg_factory("config_paired_nq2",
                                                 ["pairwise.ild_head.enabled=false"]))
    with pytest.raises(ConfigError, match=r"pairwise\.ild_head\.enabled: checkpoint False vs now "
                                          r"True"):
        check_compatible({"config": without}, cfg_factory("config_paired_nq2"), tmp_path / "c.pt")
    # Its weights are no shape: a resume may change them.
    check_compatible({"config": without}, cfg_factory("config_paired_nq2", [
        "pairwise.ild_head.enabled=false", "pairwise.ild_head.weight=0.9"]), tmp_path / "c.pt")


def test_resume_splits_a_one_group_optimizer_state_into_model_and_heads():
    # Checkpoints from before the heads had a parameter group of their own hold one group.
    from step_setup import tiny_setup
    _, _, parts = tiny_setup(["pairwise.ild_head.enabled=true"])
    model, heads = list(parts.raw_model.parameters()), list(parts.pairwise.parameters())
    old = torch.optim.Adam(model + heads, lr=1e-3, betas=(0.5, 0.9))
    for param in model + heads:
        param.grad = torch.randn_like(param)
    old.step()
    saved = old.state_dict()
    with pytest.raises(ValueError, match="parameter groups"):
        parts.opt_g.load_state_dict(saved)
    parts.opt_g.load_state_dict(grouped_like(saved, parts.opt_g))
    assert [len(g["params"]) for g in parts.opt_g.param_groups] == [len(model), len(heads)]
    for param in (model[0], heads[0], heads[-1]):
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(parts.opt_g.state[param][moment], old.state[param][moment])


def test_atomic_save_keeps_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    ckpt_io.atomic_save({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(ckpt_io.CheckpointSaveError, match="disk full"):  # one clear line
        ckpt_io.atomic_save({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    monkeypatch.undo()
    assert torch.equal(ckpt_io.load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_checkpoint_loading_refuses_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "config": {}}, path)
    with pytest.raises(RuntimeError, match="could not load checkpoint"):
        ckpt_io.load_checkpoint(path)


def test_non_finite_steps_are_skipped_then_training_stops_with_a_checkpoint(tmp_path, synth_root):
    cfg = tiny(tmp_path, synth_root,
               extra=["datasets.fixed_length=10", "common.max_nonfinite_steps=3"])
    # The first step is fine, every later one is NaN.
    with nan_time_loss(from_call=2), pytest.raises(engine.TrainingDiverged,
                                                   match="3 consecutive non-finite steps"):
        engine.train(cfg)
    saved = ckpt_io.latest_checkpoint(tmp_path / "ckpt")
    assert saved is not None
    state = ckpt_io.load_checkpoint(saved)
    assert state["step"] == 1 and state["skipped_total"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_an_fp16_overflow_does_not_count_as_a_step(tmp_path, synth_root, monkeypatch):
    # The GradScalers of fp16 training, on the CPU (float32 arithmetic): an overflow in one
    # step's gradients must not advance the step count, hence the learning-rate schedule.
    build_parts = engine.build_parts

    def with_fp16_scalers(*args, **kwargs):
        parts = build_parts(*args, **kwargs)
        fp16_scalers(parts)
        return parts

    train_step, steps = engine.train_step, []

    def overflow_in_the_second_batch(parts, *args, **kwargs):
        steps.append(kwargs["step"])
        with overflowing_gradient(parts.raw_model) if len(steps) == 2 else contextlib.nullcontext():
            return train_step(parts, *args, **kwargs)

    monkeypatch.setattr(engine, "build_parts", with_fp16_scalers)
    monkeypatch.setattr(engine, "train_step", overflow_in_the_second_batch)
    summary = engine.train(tiny(tmp_path, synth_root, extra=["common.max_epoch=2"]),
                           run_dir=tmp_path)
    assert steps == [0, 1, 1, 2]  # the batch after the overflow gets step 1 (and its learning rate)
    state = ckpt_io.load_checkpoint(summary["checkpoint"])
    assert state["step"] == 3 and state["skipped_total"] == 1
    assert state["scaler_g"]["scale"] == 2.0 ** 15
    assert ("gradient overflow at fp16 loss scale 65536 at epoch 1 batch 2"
            in (tmp_path / "train.log").read_text())


def diverse_signals(count: int = 8, length: int = 1920) -> torch.Tensor:
    """Tones, noise, clicks, a chirp, a square wave and bursts: a fixed input `[count, 1, T]`."""
    t = torch.arange(length) / 24000
    gen = torch.Generator().manual_seed(0)
    signals = [torch.sin(2 * torch.pi * 100 * t), torch.sin(2 * torch.pi * 1000 * t),
               torch.sin(2 * torch.pi * 6000 * t), torch.randn(length, generator=gen),
               (torch.arange(length) % 240 == 0).float(),
               torch.sin(2 * torch.pi * (50 + 5e4 * t) * t),
               torch.sign(torch.sin(2 * torch.pi * 300 * t)),
               torch.randn(length, generator=gen) * (torch.sin(2 * torch.pi * 30 * t) > 0)]
    return 0.1 * torch.stack(signals[:count]).unsqueeze(1)


def test_bf16_on_cpu_trains_resumes_and_its_codes_match_float32(tmp_path, synth_root):
    # A learning rate small enough that 4 steps keep the tiny encoder's latents among the
    # codes k-means gave them (else every frame maps to one code and the codes say nothing).
    extra = ["common.amp=bf16", "common.max_epoch=2", "model.kmeans_buffer=0",
             "optimization.lr=1e-6", "optimization.disc_lr=1e-6", "lr_scheduler.warmup_epoch=0",
             "discriminator.start_epoch=1", "common.val_interval=5", "common.save_interval=5"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # before: "needs CUDA; training in float32"
        runtime = setup_runtime(prepare_config(tiny(tmp_path / "x", synth_root, extra=extra)))
    assert runtime.amp_dtype == torch.bfloat16 and runtime.device.type == "cpu"

    full = engine.train(tiny(tmp_path / "full", synth_root, extra=extra))
    engine.train(tiny(tmp_path / "part", synth_root, extra=extra), stop_after_step=3)
    resumed = engine.train(tiny(tmp_path / "part", synth_root,
                                extra=[*extra, "checkpoint.resume=true"]))
    assert full["step"] == resumed["step"] == 4
    a, b = model_state(full["checkpoint"]), model_state(resumed["checkpoint"])
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"

    model, _ = load_model(resumed["checkpoint"])
    x = diverse_signals()
    with torch.no_grad():
        want = model.encode(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            codes = model.encode(x)
            latent = model.encoder(model.normalize(x)[0])
            quantized = model.quantizer.encode(latent)
        exact = model.quantizer.encode(latent.float())
    assert all(want[:, k].unique().numel() >= 4 for k in range(want.shape[1]))  # not one code
    # The nearest-code search runs in float32 under autocast: the same codes for the same
    # latent. The encoder itself runs in bf16, so a few frames near a boundary between two
    # codes may change; the rest match.
    assert torch.equal(quantized, exact)
    assert (codes == want).float().mean() >= 0.9


def test_sigterm_saves_and_exits_cleanly(tmp_path, synth_root):
    args = ["+preset=tiny", f"datasets.data_root={synth_root}", "checkpoint.save_folder=ckpt",
            "datasets.fixed_length=2000", "common.max_epoch=1", "common.log_interval=1",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_paired_gpu.py"), *args],
                            cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 2:" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    text = "".join(lines) + out
    assert proc.returncode == 0, text[-3000:]
    assert "SIGTERM received" in text
    saved = ckpt_io.latest_checkpoint(tmp_path / "ckpt")
    assert saved is not None, text[-3000:]
    state = ckpt_io.load_checkpoint(saved)
    assert state["epoch"] == 1 and 2 <= state["batch"] < 1000


def test_wandb_online_failure_falls_back_to_offline(tmp_path, monkeypatch):
    from training.tracking import Tracker
    modes = []
    real_init = Tracker._init

    def fake_init(mode, kwargs):
        modes.append(mode)
        if mode == "online":
            raise RuntimeError("no network")
        return real_init(mode, kwargs)

    monkeypatch.setattr(Tracker, "_init", staticmethod(fake_init))
    with pytest.warns(UserWarning, match="falling back to wandb offline"):
        tracker = Tracker("online", "test", None, tmp_path, {"a": 1})
    assert modes == ["online", "offline"] and tracker.mode == "offline"
    tracker.log({"x": 1.0}, step=1)
    tracker.finish()
    assert list(tmp_path.rglob("*.wandb")), "offline run files were not written"


def test_validation_audio_goes_to_wav_files_and_wandb(tmp_path):
    from training.tracking import Tracker
    tracker = Tracker("offline", "test", None, tmp_path / "wandb", {})
    inp, rec = 0.1 * torch.randn(2, 1, 4800), 0.1 * torch.randn(2, 1, 4800)
    validation.write_validation_audio([(inp, rec, {"channels": [3, 17], "path": "x.wav"})],
                                  tmp_path / "audio", 24000, tracker, step=1)
    run_dir = Path(tracker.directory)
    tracker.finish()
    names = sorted(p.name for p in (tmp_path / "audio").iterdir())
    assert names == ["item0_ch17_input.wav", "item0_ch17_recon.wav",
                     "item0_ch3_input.wav", "item0_ch3_recon.wav"]
    media = [p.suffix for p in run_dir.rglob("*") if p.is_file() and "media" in p.parts]
    assert media.count(".wav") == 4 and ".png" in media, media


def test_codebook_usage_is_the_fraction_of_entries_used_per_codebook():
    codes = torch.tensor([[[0, 0, 1], [3, 3, 3]], [[2, 0, 1], [3, 3, 3]]])  # [N=2, n_q=2, F=3]
    assert codebook_usage(codes, bins=4).tolist() == [0.75, 0.25]
