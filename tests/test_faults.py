"""Faults lose nothing: damaged checkpoints, failed saves, SIGKILL at any moment, data
files that vanish, wandb that breaks. Faults are injected (tests/fault_harness.py for the
subprocess runs) and every test asserts what a user can rely on."""
from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from utils import checkpoints as ckpt_io
from training import engine
import paired_channel_dataset as pcd
from utils.eigenscape_files import DataWarning
from training.configuration import ConfigError, prepare_config
from training.parts import estimate_checkpoint_bytes
from conftest import ROOT, make_config
from model import EncodecModel
from training.tracking import Tracker

HARNESS = ROOT / "tests" / "fault_harness.py"


def tiny(save: Path, data_root: Path, *extra: str):
    return make_config("config_paired_nq2", [f"datasets.data_root={data_root}",
                                             f"checkpoint.save_folder={save}", *extra])


def harness(spec: str, save: Path, data_root: Path, *extra: str, cwd: Path,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """train_paired_gpu.py (tiny preset) with the fault ``spec`` injected."""
    args = ["+preset=tiny", f"datasets.data_root={data_root}", f"checkpoint.save_folder={save}",
            f"hydra.run.dir={cwd / 'hydra'}", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(HARNESS), spec, "train_paired_gpu.py", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def assert_same_state(a: object, b: object, where: str = "") -> None:
    """Tensors bit-identical, plain values equal, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} vs {b.keys()}"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"  # NaN == NaN here


def training_state(path: Path) -> dict:
    """Everything that must continue bit-exactly (the config names the folder: left out)."""
    state = ckpt_io.load_checkpoint(path, required=ckpt_io.RESUME_KEYS)
    return {k: v for k, v in state.items() if k not in ("config", "wandb_id")}


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, synth_root) -> Path:
    """A save folder after 2 tiny epochs: ckpt_epoch0001_step2, ckpt_epoch0002_step4, best.pt."""
    save = tmp_path_factory.mktemp("two_epochs") / "ckpt"
    engine.train(tiny(save, synth_root, "common.val_interval=2"))
    assert [p.name for p in ckpt_io.list_checkpoints(save)] == [
        "ckpt_epoch0001_step00000002.pt", "ckpt_epoch0002_step00000004.pt"]
    return save


def damage(path: Path, how: str) -> str:
    """Damage a checkpoint as a fault would; returns the expected reason's words."""
    if how == "truncated":  # a copy cut short by a node failure
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 3])
        return "does not load"
    if how == "zero-byte":
        path.write_bytes(b"")
        return "empty file"
    if how == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
        return "does not load"
    torch.save({"weights": torch.zeros(3), "note": "someone else's file"}, path)  # foreign dict
    return "missing"


# ------------------------------------------------------------------------------ resume selection


@pytest.mark.parametrize("how", ["truncated", "zero-byte", "random-bytes", "foreign-dict"])
def test_resume_skips_a_damaged_newest_checkpoint_with_one_warning(tmp_path, two_epochs, how):
    save = tmp_path / "ckpt"
    shutil.copytree(two_epochs, save)
    (save / "best.pt").unlink()  # so that the fallback is the older rotating checkpoint
    newest = ckpt_io.latest_checkpoint(save)
    reason = damage(newest, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = ckpt_io.load_newest_good(save)
    assert found is not None
    path, state = found
    assert path.name == "ckpt_epoch0001_step00000002.pt" and state["step"] == 2
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == 1, [str(w.message) for w in caught]
    assert newest.name in skipped[0] and reason in skipped[0]


def test_resume_falls_back_to_best_pt_when_no_rotating_checkpoint_loads(tmp_path, two_epochs):
    save = tmp_path / "ckpt"
    shutil.copytree(two_epochs, save)
    for path in ckpt_io.list_checkpoints(save):
        damage(path, "truncated")
    with pytest.warns(UserWarning, match="skipped 2 damaged"):
        path, state = ckpt_io.load_newest_good(save)
    assert path.name == "best.pt" and (state["epoch"], state["step"]) == (2, 4)


def test_resume_continues_training_past_a_truncated_newest_checkpoint(tmp_path, two_epochs,
                                                                      synth_root):
    save = tmp_path / "ckpt"
    shutil.copytree(two_epochs, save)
    (save / "best.pt").unlink()
    damage(ckpt_io.latest_checkpoint(save), "truncated")
    cfg = tiny(save, synth_root, "common.val_interval=2", "checkpoint.resume=true")
    with pytest.warns(UserWarning, match="ckpt_epoch0002_step00000004.pt: does not load"):
        result = engine.train(cfg)
    assert result["step"] == 4  # epoch 2 was trained again from the epoch-1 checkpoint
    # ... and reached the state of the run that was never damaged
    assert_same_state(training_state(two_epochs / "ckpt_epoch0002_step00000004.pt"),
                      training_state(result["checkpoint"]))


def test_no_loadable_checkpoint_is_one_clear_error(tmp_path, two_epochs, synth_root):
    save = tmp_path / "ckpt"
    shutil.copytree(two_epochs, save)
    for path, how in zip([*ckpt_io.list_checkpoints(save), save / "best.pt"],
                         ["zero-byte", "truncated", "random-bytes"]):
        damage(path, how)
    cfg = tiny(save, synth_root, "checkpoint.resume=true")
    with pytest.raises(ckpt_io.CheckpointError) as err:
        engine.train(cfg)
    message = str(err.value)
    assert "none of the 3 checkpoint(s)" in message and "\n" not in message
    assert all(name in message for name in ("best.pt", "ckpt_epoch0001", "ckpt_epoch0002"))


def test_explicit_resume_path_to_a_damaged_file_is_a_clear_error(tmp_path, two_epochs):
    bad = tmp_path / "copy.pt"
    shutil.copy(two_epochs / "best.pt", bad)
    damage(bad, "foreign-dict")
    with pytest.raises(ckpt_io.CheckpointError, match="missing"):
        ckpt_io.load_checkpoint(bad, required=ckpt_io.RESUME_KEYS)  # what resume_path= uses


# ------------------------------------------------------------------------------ failed saves


def fail_save_after_half(monkeypatch, error: BaseException, context: BaseException | None = None):
    """torch.save writes half of the file, then fails as the file system makes it fail."""
    real_save = torch.save

    def broken(obj, f, *args, **kwargs):
        f.write(b"\0" * 4096)
        if context is None:
            raise error
        try:
            raise context
        except OSError:
            raise error  # torch's zip writer: a RuntimeError whose context is the OSError

    monkeypatch.setattr(torch, "save", broken)
    return real_save


@pytest.mark.parametrize("error,context,why", [
    (OSError(errno.ENOSPC, "No space left on device"), None, "no space left"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662"),
     OSError(errno.ENOSPC, "No space left on device"), "no space left"),
    (PermissionError(errno.EACCES, "Permission denied"), None, "permission denied"),
    (OSError(errno.EIO, "Input/output error"), None, "I/O error (Input/output error)"),
])
def test_failed_save_leaves_no_partial_file_keeps_older_and_says_why(tmp_path, monkeypatch,
                                                                     error, context, why):
    older = ckpt_io.atomic_save({"model": {"w": torch.ones(1000)}, "config": {}},
                                tmp_path / ckpt_io.checkpoint_name(1, 2))
    fail_save_after_half(monkeypatch, error, context)
    with pytest.raises(ckpt_io.CheckpointSaveError) as err:
        ckpt_io.atomic_save({"model": {"w": torch.zeros(250_000)}, "config": {}},
                            tmp_path / ckpt_io.checkpoint_name(2, 4))
    monkeypatch.undo()
    message = str(err.value)
    assert why in message and str(tmp_path) in message and "\n" not in message
    assert "needs about 1.0 MB" in message and " free there" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [older.name]  # nothing partial
    assert torch.equal(ckpt_io.load_checkpoint(older)["model"]["w"], torch.ones(1000))


def test_programming_errors_in_save_are_not_disguised_as_io_errors(tmp_path):
    with pytest.raises(Exception) as err:
        ckpt_io.atomic_save({"model": {"f": lambda: 0}, "config": {}}, tmp_path / "x.pt")
    assert not isinstance(err.value, ckpt_io.CheckpointError)
    assert list(tmp_path.iterdir()) == []


def test_save_onto_a_real_full_tmpfs(tmp_path):
    """The real failure (torch's 'unexpected pos'), where a small tmpfs can be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC tests cover it")
    try:
        older = ckpt_io.atomic_save({"model": {"w": torch.ones(10)}, "config": {}}, mount / "a.pt")
        with pytest.raises(ckpt_io.CheckpointSaveError, match="no space left.*needs about 4.0 MB"):
            ckpt_io.atomic_save({"model": {"w": torch.zeros(1_000_000)}, "config": {}},
                                mount / "b.pt")
        assert [p.name for p in mount.iterdir()] == [older.name]
        assert torch.equal(ckpt_io.load_checkpoint(older)["model"]["w"], torch.ones(10))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_during_training_stops_with_one_line_and_non_zero_exit(tmp_path, synth_root):
    save = tmp_path / "ckpt"
    # saves of this run: ckpt epoch 1, best.pt epoch 2 (fails: disk full), ckpt epoch 2
    res = harness("oserror:2:ENOSPC", save, synth_root, "common.val_interval=2", cwd=tmp_path)
    assert res.returncode != 0, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert (last.startswith("error: could not save checkpoint best.pt in "
                            + str(save))), res.stderr[-3000:]
    assert "no space left" in last and "needs about" in last and "free there" in last
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in save.iterdir()) == ["audio", "ckpt_epoch0001_step00000002.pt"]
    assert ckpt_io.load_checkpoint(save / "ckpt_epoch0001_step00000002.pt")["step"] == 2


# ------------------------------------------------------------------------------ the save folder


def test_save_folder_through_a_file_is_a_config_error_before_any_model_is_built(tmp_path,
                                                                              synth_root,
                                                                              monkeypatch):
    (tmp_path / "results").write_text("a file where a folder should be")
    cfg = tiny(tmp_path / "results" / "run1", synth_root)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the save folder was checked")

    monkeypatch.setattr(EncodecModel, "__init__", no_model)
    with pytest.raises(ConfigError, match=r"results is a file, not a folder") as err:
        engine.train(cfg)
    assert "checkpoint.save_folder=" in str(err.value) and "\n" not in str(err.value)


def test_save_folder_through_a_file_from_the_entry_point(tmp_path):
    (tmp_path / "results").write_text("a file")
    res = subprocess.run([sys.executable, str(ROOT / "train_single_gpu.py"), "+preset=tiny",
                          f"datasets.data_root={tmp_path}", "checkpoint.save_folder=results/run1",
                          f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=tmp_path,
                         env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0
    assert (res.stderr.startswith("config error: checkpoint.save_folder=")
            and "Traceback" not in res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1 and "is a file, not a folder" in res.stderr


def test_save_folder_unwritable_or_short_of_space(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as m:  # root ignores chmod: refuse the probe file instead
        m.setattr(ckpt_io.tempfile, "TemporaryFile", refuse)
        with pytest.raises(ckpt_io.SaveFolderError, match="cannot be written .Permission denied"):
            ckpt_io.prepare_save_folder(tmp_path / "a")
    folder = tmp_path / "b"
    ckpt_io.atomic_save({"model": {"w": torch.zeros(250_000)}, "config": {}},
                        folder / ckpt_io.checkpoint_name(1, 1))
    (folder / ".ckpt_epoch0002_step00000002.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    monkeypatch.setattr(ckpt_io, "free_bytes", lambda path: 1_500_000)
    with pytest.warns(UserWarning) as record:
        ckpt_io.prepare_save_folder(folder)
    messages = [str(w.message) for w in record]
    assert any("1.5 MB free, less than two checkpoints need (about 1.0 MB each)" in m
               for m in messages)
    assert any("removed 1 unfinished checkpoint" in m for m in messages)
    assert temporaries(folder) == []


def test_save_folder_room_estimate_before_the_first_checkpoint(tmp_path):
    cfg = make_config("config_paired_nq2", ["datasets.data_root=x"], tiny=False)
    full = estimate_checkpoint_bytes(cfg)
    assert 170e6 < full < 230e6  # the issue measured ~180 MB for the full model
    small = estimate_checkpoint_bytes(tiny(tmp_path, tmp_path))
    assert 1.5e6 < small < 3e6  # a tiny checkpoint is 2.3 MB on disk


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    # Left from a run that went further, then resumed from step 2 past the damaged ones.
    for step in (2, 8, 9):
        (tmp_path / ckpt_io.checkpoint_name(1, step)).write_bytes(b"x")
    just_written = tmp_path / ckpt_io.checkpoint_name(1, 3)
    just_written.write_bytes(b"x")
    ckpt_io.prune_checkpoints(tmp_path, keep_last=1, keep=just_written)
    assert just_written.exists()


# ------------------------------------------------------------------------------ SIGKILL


def test_sigkill_at_random_moments_then_resume_ends_bit_identical(tmp_path, synth_root):
    """Killed during a step, a validation, mid-write or right after a save (chosen at random
    among the moments still ahead of the run), resumed each time with checkpoint.resume=true:
    the final state equals an uninterrupted run's, bit for bit. FAULT_SEED picks other
    moments and FAULT_ROUNDS more of them, for a longer soak."""
    extra = ["datasets.fixed_length=6", "common.max_epoch=2"]  # 3 steps/epoch, saves every epoch
    # The reference runs like the killed ones (same process set-up, same thread count).
    assert harness("none", tmp_path / "reference", synth_root, *extra, cwd=tmp_path).returncode == 0
    path, state = ckpt_io.load_newest_good(tmp_path / "reference")
    expected, total = training_state(path), state["step"]

    seed = int(os.environ.get("FAULT_SEED", "1234"))
    rounds = int(os.environ.get("FAULT_ROUNDS", "3"))
    rng = random.Random(seed)
    # The first kill is always mid-write; then other kinds, in a random order.
    kinds = ["save", *rng.sample(["step", "val", "renamed", "save"], 4)]
    kinds += [rng.choice(kinds) for _ in range(rounds - len(kinds))]
    save, log = tmp_path / "killed", []
    for kind in kinds[:rounds]:
        found = ckpt_io.load_newest_good(save) if save.exists() else None
        left = total - (found[1]["step"] if found else 0)
        if left == 0:
            break
        # Each of these moments is still ahead of a run that has steps left.
        spec = {"step": f"step:{rng.randint(1, left)}", "val": "val:1", "renamed": "renamed:1",
                "save": f"save:1:{rng.uniform(0.05, 0.95):.2f}"}[kind]
        res = harness(spec, save, synth_root, *extra, *(["checkpoint.resume=true"] if log else []),
                      cwd=tmp_path)
        log.append(f"{spec} with {left} steps left: exit {res.returncode}")
        assert res.returncode == -9, f"seed {seed}: {log}\n{res.stderr[-3000:]}"  # the fault fired
    res = harness("none", save, synth_root, *extra, "checkpoint.resume=true", cwd=tmp_path)
    assert res.returncode == 0, f"seed {seed}: {log}\n{res.stderr[-3000:]}"
    final = ckpt_io.load_newest_good(save)
    assert final is not None and final[1]["step"] == total == 6, log
    assert_same_state(expected, training_state(final[0]), f"seed {seed}, {log}")
    assert temporaries(save) == [], log


# ------------------------------------------------------------------------------ data files


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a data set whose files can be deleted without touching the shared one."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def test_data_file_deleted_mid_epoch_is_redrawn_counted_and_logged(
        tmp_path, synth_root, monkeypatch):
    data = linked_copy(synth_root, tmp_path / "data")
    cfg = tiny(tmp_path / "ckpt", data, "datasets.fixed_length=6", "common.max_epoch=1")
    probe = pcd.PairedChannelDataset(prepare_config(cfg), "train")
    probe.set_epoch(1)
    victim = probe.files[probe.draw(4)[0]].path  # item 4 is read in step 3 (batch size 2)

    logged: list[dict] = []
    real_log, real_forward = Tracker.log, EncodecModel.forward
    calls = {"train": 0}

    def record(self, data, step):
        logged.append(dict(data))
        real_log(self, data, step)

    def forward(self, *args, **kwargs):
        calls["train"] += self.training
        if self.training and calls["train"] == 1:
            victim.unlink()  # vanishes while the epoch runs
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(Tracker, "log", record)
    monkeypatch.setattr(EncodecModel, "forward", forward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        result = engine.train(cfg)
    assert result["step"] == 3  # the epoch completed
    state = ckpt_io.load_checkpoint(result["checkpoint"])
    assert state["skipped_reads"] >= 1
    assert [d for d in logged if "train/skipped_reads" in d][-1]["train/skipped_reads"] == \
        state["skipped_reads"]
    log_text = (tmp_path / "ckpt" / "train.log").read_text()
    assert f"skipped_reads: {victim}" in log_text and "skipped_reads=" in log_text


def test_all_data_gone_stops_clearly_and_keeps_the_steps_done(tmp_path, synth_root, monkeypatch):
    data = linked_copy(synth_root, tmp_path / "data")
    cfg = tiny(tmp_path / "ckpt", data, "datasets.fixed_length=6", "common.max_epoch=1",
               "datasets.max_read_retries=3")
    real_forward = EncodecModel.forward

    def forward(self, *args, **kwargs):
        if self.training:
            for path in data.rglob("*.wav"):
                path.unlink()
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(EncodecModel, "forward", forward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(pcd.TooManyReadFailures, match="failed all 4 draws in a row") as err:
            engine.train(cfg)
    assert "max_read_retries=3" in str(err.value) and "\n" not in str(err.value)
    saved = ckpt_io.load_newest_good(tmp_path / "ckpt")
    assert saved is not None and saved[1]["step"] == 1  # the step done before is kept


def test_all_data_gone_from_the_entry_point_with_workers(tmp_path, synth_root):
    data = linked_copy(synth_root, tmp_path / "data")
    # 6 batches: the worker prefetches at most 2 ahead, so later reads meet the deletion
    res = harness("delete-data:1", tmp_path / "ckpt", data, "datasets.num_workers=1",
                  "datasets.fixed_length=12", "common.max_epoch=1", cwd=tmp_path)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training data unreadable: item "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "DataLoader worker" not in last


# ------------------------------------------------------------------------------ wandb


def test_wandb_folders_vanishing_mid_run_do_not_stop_training(tmp_path, synth_root, monkeypatch):
    """wandb's run folder replaced by a file and its media folder deleted (a /tmp cleaner)
    after the first step: training completes, with one warning."""
    from wandb.sdk.data_types import _private

    cfg = tiny(tmp_path / "ckpt", synth_root, "common.max_epoch=1", "wandb.mode=offline",
               f"wandb.dir={tmp_path / 'wandb'}")
    real_forward = EncodecModel.forward
    calls = {"train": 0}

    def forward(self, *args, **kwargs):
        calls["train"] += self.training
        if self.training and calls["train"] == 1:
            shutil.rmtree(tmp_path / "wandb")
            (tmp_path / "wandb").write_text("not a folder any more")
            shutil.rmtree(_private.MEDIA_TMP.name)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(EncodecModel, "forward", forward)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = engine.train(cfg)
    finally:
        os.makedirs(_private.MEDIA_TMP.name, exist_ok=True)  # for later tests in this process
    assert result["step"] == 2 and result["val"]
    reports = [str(w.message) for w in caught if "wandb" in str(w.message)]
    assert len(reports) == 1 and "training continues without wandb" in reports[0], reports


def test_wandb_process_dying_is_reported_once_without_traceback(tmp_path):
    script = f"""
import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
from fault_harness import _kill_wandb_service
from training.tracking import Tracker
tracker = Tracker("offline", "test", None, {str(tmp_path)!r}, {{}})
tracker.log({{"x": 1.0}}, step=1)
assert _kill_wandb_service() == 1
for step in range(2, 5):
    tracker.log({{"x": float(step)}}, step=step)
tracker.finish()
print("training went on")
"""
    # Its own wandb service: WANDB_SERVICE would connect it to this process's one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0 and "training went on" in res.stdout, res.stderr[-3000:]
    assert res.stderr.count("UserWarning: wandb failed at step") == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
