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
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from utils import checkpoints as ckpt_io
from utils import distributed
from conftest import ROOT
from training.loaders import make_loader
from training.parts import build_parts
from training.runtime import setup_runtime
from training.tracking import Tracker
from pairwise_losses import PairwiseLoss
from training.validation import validate, validation_dataset


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
    differ = {k: (v, distributed_val[k]) for k, v in single.items()
              if not math.isclose(v, distributed_val[k], rel_tol=1e-4, abs_tol=1e-6)}
    # The contrastive recipe's InfoNCE and centred cosine take their negatives and their centre
    # from the validation batch, which is each rank's own: those two values depend on the
    # batching by definition (README, "What the logs mean"); every other figure does not.
    assert set(differ) <= {"val/sim", "val/div", "val/l_sim", "val/l_div", "val/nce_accuracy",
                           "val/div_cosine"}, differ


# ----------------------------------------------------------------------------------------
# InfoNCE across ranks: the global batch, gathered with gradient, gives the single-process
# loss and (after DDP's averaging) its gradients.

NCE_WORLD, NCE_BATCH = 2, 6  # 3 items per rank
NCE_CASES = {
    "frame": dict(sim_kind="infonce", nce_pooling="frame", temperature=0.2),
    "mean_projected": dict(sim_kind="infonce", nce_pooling="mean", nce_projection=3,
                           dimension=5, nce_center=False),
    "frame_with_segment_negatives": dict(sim_kind="infonce", nce_same_segment_negatives=True),
}


def nce_case(name: str) -> tuple[PairwiseLoss, list[list[torch.Tensor]]]:
    """The loss (same initial projection on every rank) and the GLOBAL batch of 2 views."""
    torch.manual_seed(0)
    loss = PairwiseLoss(sim_weight=1.0, **NCE_CASES[name])
    views = [[torch.randn(NCE_BATCH, 5, 4) for _ in range(2)] for _ in range(2)]
    return loss, views


def nce_run(loss: PairwiseLoss, views: list[list[torch.Tensor]], rows: slice) -> dict:
    """Loss, accuracy and gradients (embeddings and parameters) on the items `rows`."""
    leaves = [[e[rows].clone().requires_grad_() for e in view] for view in views]
    out = loss.embedding_terms(leaves, step=0)
    loss.zero_grad()
    out["l_sim"].backward()
    return {"l_sim": out["l_sim"].detach(), "nce_accuracy": out["nce_accuracy"],
            "grads": [view[0].grad for view in leaves],
            "param_grads": [p.grad.clone() for p in loss.parameters()]}


def nce_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=NCE_WORLD)
    torch.set_num_threads(1)
    per_rank = NCE_BATCH // NCE_WORLD
    results = {name: nce_run(*nce_case(name), slice(rank * per_rank, (rank + 1) * per_rank))
               for name in NCE_CASES}
    # Unequal sizes (3 rows and 2 rows): values in rank order, gradient summed over ranks.
    local = torch.arange(3 - rank, dtype=torch.float32).add(10 * rank).requires_grad_()
    gathered, offset = distributed.all_gather_with_grad(local)
    weights = torch.arange(1, 6, dtype=torch.float32)
    (gathered * weights).sum().backward()
    results["uneven"] = {"gathered": gathered.detach(), "offset": offset, "grad": local.grad}
    # Validation (no_grad): no collective, negatives from this rank only.
    loss, views = nce_case("frame")
    with torch.no_grad():
        results["no_grad"] = loss.embedding_terms([[e[rank * per_rank:(rank + 1) * per_rank]
                                                    for e in view] for view in views],
                                                  step=0)["sim"]
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def nce_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("nce")
    mp.spawn(nce_worker, args=(free_port(), str(out)), nprocs=NCE_WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(NCE_WORLD)]


@pytest.mark.parametrize("name", list(NCE_CASES))
def test_infonce_over_two_ranks_equals_one_process(nce_ranks, name):
    single = nce_run(*nce_case(name), slice(None))
    ranks = [r[name] for r in nce_ranks]
    per_rank = NCE_BATCH // NCE_WORLD
    # The mean of the ranks' losses is the global-batch loss (equal per-rank batches).
    torch.testing.assert_close(sum(r["l_sim"] for r in ranks) / NCE_WORLD, single["l_sim"])
    torch.testing.assert_close(sum(r["nce_accuracy"] for r in ranks) / NCE_WORLD,
                               single["nce_accuracy"])
    for rank, r in enumerate(ranks):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        for v in range(2):  # DDP divides by the world size
            torch.testing.assert_close(r["grads"][v] / NCE_WORLD, single["grads"][v][rows])
    for i, grad in enumerate(single["param_grads"]):  # DDP / average_gradients_: the mean
        torch.testing.assert_close(sum(r["param_grads"][i] for r in ranks) / NCE_WORLD, grad)


def test_all_gather_with_grad_uneven_sizes(nce_ranks):
    expected = torch.tensor([0., 1., 2., 10., 11.])
    for rank, r in enumerate(nce_ranks):
        torch.testing.assert_close(r["uneven"]["gathered"], expected)
        assert r["uneven"]["offset"] == 3 * rank
        rows = slice(0, 3) if rank == 0 else slice(3, 5)
        # Both ranks' losses depend on this rank's rows: the gradient is their sum.
        torch.testing.assert_close(r["uneven"]["grad"],
                                   NCE_WORLD * torch.arange(1, 6, dtype=torch.float32)[rows])
    gathered, offset = distributed.all_gather_with_grad(expected)  # one process: the identity
    assert gathered is expected and offset == 0


def test_infonce_under_no_grad_stays_local(nce_ranks):
    loss, views = nce_case("frame")
    per_rank = NCE_BATCH // NCE_WORLD
    for rank, r in enumerate(nce_ranks):
        local = [[e[rank * per_rank:(rank + 1) * per_rank] for e in view] for view in views]
        torch.testing.assert_close(r["no_grad"], loss.embedding_terms(local, step=0)["sim"])
