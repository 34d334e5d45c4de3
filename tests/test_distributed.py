"""Two gloo processes on CPU under torchrun: the same training as one process, split."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import checkpoints as ckpt_io
from conftest import ROOT
from loaders import make_loader
from parts import build_parts
from runtime import setup_runtime
from tracking import Tracker
from validation import validate, validation_dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, data_root: Path, save: str, extra: list[str]) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--master_port={free_port()}", str(ROOT / "train_paired_gpu.py"), "+preset=tiny",
            f"datasets.data_root={data_root}", f"checkpoint.save_folder={save}",
            "common.max_epoch=2", "datasets.fixed_length=12",  # 3 steps per epoch per rank
            "pairwise.channel_classifier.enabled=true",  # a part outside DDP, kept in sync by hand
            "distributed.check_sync_every=1", f"hydra.run.dir={tmp_path / 'hydra' / save}", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, synth_root):
    tmp = tmp_path_factory.mktemp("ddp")
    full = torchrun(tmp, synth_root, "full", [])
    torchrun(tmp, synth_root, "part", ["common.stop_after_step=4"])
    resumed = torchrun(tmp, synth_root, "part", ["checkpoint.resume=true"])
    return tmp, full, resumed


def test_two_ranks_stay_in_sync_and_share_the_epoch(two_rank_runs):
    tmp, full, _ = two_rank_runs
    state = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(tmp / "full"))
    # fixed_length 12 items per epoch shared by 2 ranks of batch 2: 3 steps per epoch; the
    # checkpoint after epoch 2 points at the start of epoch 3.
    assert (state["epoch"], state["batch"], state["step"]) == (3, 0, 6)
    # check_sync_every=1 compared weights, codebooks and the channel-classifier head of both
    # ranks after every step.
    assert "disagree" not in full.stderr
    assert "world size 2" in full.stderr
    assert len(state["rng"]) == 2  # each rank's random state is kept


def test_resume_under_two_ranks_is_bit_identical(two_rank_runs):
    tmp, _, resumed = two_rank_runs
    assert "resumed from" in resumed.stderr
    a = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(tmp / "full"))
    b = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(tmp / "part"))
    assert b["step"] == a["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"{k} differs after a 2-rank resume"


def test_validation_split_over_ranks_equals_one_process(two_rank_runs):
    tmp, _, _ = two_rank_runs
    state = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(tmp / "full"))
    distributed_val = state["val"]
    assert distributed_val and "val/agreement_cb1" in distributed_val

    cfg = OmegaConf.create(state["config"])
    runtime = setup_runtime(cfg)
    val_set = validation_dataset(cfg)
    parts = build_parts(cfg, runtime, steps_per_epoch=3)
    parts.raw_model.load_state_dict(state["model"])
    parts.raw_disc.load_state_dict(state["discriminator"])
    parts.pairwise.load_state_dict(state["pairwise"])
    loader = make_loader(val_set, cfg, runtime.device, range(len(val_set)))
    single = validate(parts, runtime, cfg, loader, epoch=2, step=6,
                      tracker=Tracker("disabled", "", None, tmp, {}), audio_dir=None)
    assert single.keys() == distributed_val.keys()
    for k, v in single.items():
        assert math.isclose(v, distributed_val[k], rel_tol=1e-4, abs_tol=1e-6), (k, v, distributed_val[k])
