"""Two gloo processes on CPU under torchrun: the same training as one process, split."""
from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from utils import checkpoints as ckpt_io
from utils import distributed
from conftest import ROOT, make_config
from test_faults import HARNESS, assert_same_state, temporaries, training_state
from training.loaders import make_loader
from training.parts import build_parts
from training.runtime import setup_runtime
from training.tracking import Tracker
from paired_channel_dataset import PairedChannelDataset
from pairwise_losses import PairwiseLoss
from training.configuration import prepare_config
from training.validation import validate, validation_dataset


TIMEOUT_S = 30  # distributed.timeout_s: a rank left waiting fails fast


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, data_root: Path, save: str, extra: list[str],
             fault: str | None = None) -> subprocess.CompletedProcess:
    """train_paired_gpu.py on two gloo ranks. With a `fault` (tests/fault_harness.py's SPEC,
    `SPEC@R` for rank R only) the run may fail, and each rank's output goes to its own
    files (`rank_output`) instead of the console."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
              f"--master_port={free_port()}"]
    script = [str(ROOT / "train_paired_gpu.py")]
    if fault:
        launch += [f"--log-dir={tmp_path / 'ranks' / save}", "--redirects=3"]
        script = [str(HARNESS), fault, "train_paired_gpu.py"]
    args = [*launch, *script, "+preset=tiny",
            f"datasets.data_root={data_root}", f"checkpoint.save_folder={save}",
            "common.max_epoch=2", "datasets.fixed_length=12",  # 3 steps per epoch per rank
            "pairwise.channel_classifier.enabled=true",  # a part outside DDP, kept in sync by hand
            "distributed.check_sync_every=1", f"distributed.timeout_s={TIMEOUT_S}",
            f"hydra.run.dir={tmp_path / 'hydra' / save}", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if not fault:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def rank_output(tmp_path: Path, save: str, rank: int) -> str:
    """What `rank` wrote on stderr in the latest faulted run into `save`."""
    files = sorted((tmp_path / "ranks" / save).glob(f"*/attempt_0/{rank}/stderr.log"),
                   key=lambda f: f.stat().st_mtime)
    return files[-1].read_text()


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def exit_codes(res: subprocess.CompletedProcess) -> dict[int, int]:
    """Each failed rank's exit code, from torchrun's summary (negative: killed by a signal)."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*exitcode\s*: (-?\d+)", res.stderr)
    return {int(r): int(code) for r, code in found}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, synth_root) -> tuple[Path, subprocess.CompletedProcess]:
    """Two uninterrupted epochs on two ranks, in `tmp / "full"`: what every resume must reach."""
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp, torchrun(tmp, synth_root, "full", [])


@pytest.fixture(scope="module")
def two_rank_runs(baseline, synth_root):
    tmp, full = baseline
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
# Rank faults: one rank dies or fails; every other rank stops at once with one line naming
# it, nothing saved is lost, and the resumed run is bit-identical to the baseline.


@pytest.fixture(scope="module")
def rank_faults(baseline, synth_root) -> dict:
    """One save folder through two faults, each resumed: rank 1 is SIGKILLed in the middle
    of epoch 2 (its 5th step), then rank 0's first checkpoint write fails (disk full), then
    a last resume runs to the end."""
    tmp, save = baseline[0], "faults"
    runs = {}
    for name, fault, extra in [("killed", "step:5@1", []),
                               ("failed_save", "oserror:1:ENOSPC@0", ["checkpoint.resume=true"]),
                               ("resumed", None, ["checkpoint.resume=true"])]:
        res = torchrun(tmp, synth_root, save, extra, fault)
        folder = tmp / save
        runs[name] = {"res": res, "saved": sorted(p.name for p in folder.iterdir() if p.is_file()),
                      "ranks": [rank_output(tmp, save, r) for r in range(2)] if fault else None}
    return {"tmp": tmp, "folder": tmp / save, "hydra": tmp / "hydra" / save, **runs}


def assert_one_clean_line(output: str, start: str) -> str:
    """`output`'s last line starts with `start`, and it is the only error said there."""
    line = last_line(output)
    assert line.startswith(start), output[-3000:]
    assert "Traceback" not in output and "Error executing job" not in output, output[-3000:]
    assert "Connection" not in output and output.count("error: ") == 1, output[-3000:]
    return line


def test_sigkill_of_one_rank_stops_the_other_with_one_line(rank_faults):
    killed = rank_faults["killed"]
    assert exit_codes(killed["res"]) == {0: 1, 1: -9}, killed["res"].stderr[-3000:]
    line = assert_one_clean_line(killed["ranks"][0], "error: rank 1 stopped without a word")
    log_file = rank_faults["hydra"] / "train.rank1.log"
    assert f"its log: {log_file};" in line and log_file.is_file()
    assert "rank 0 stops too" in line and "checkpoint.resume=true" in line
    # Nothing saved is lost: epoch 1's checkpoints load, and nothing is left half written.
    assert killed["saved"] == ["best.pt", "ckpt_epoch0001_step00000003.pt"]
    assert ckpt_io.load_checkpoint(rank_faults["folder"] / killed["saved"][1])["step"] == 3


def test_failed_save_on_rank_0_stops_rank_1_with_one_line(rank_faults):
    failed = rank_faults["failed_save"]
    # Rank 1 does not wait out distributed.timeout_s at the barrier after the save: it
    # stops by itself (exit code 1, not the launcher's SIGTERM or SIGKILL) with the reason.
    assert exit_codes(failed["res"]) == {0: 1, 1: 1}, failed["res"].stderr[-3000:]
    own = assert_one_clean_line(failed["ranks"][0], "error: could not save checkpoint best.pt")
    line = assert_one_clean_line(failed["ranks"][1], "error: rank 0 stopped (CheckpointSaveError: "
                                                     "could not save checkpoint best.pt")
    assert own[len("error: "):] in line and "no space left" in line
    assert f"its log: {rank_faults['hydra'] / 'train.log'};" in line
    assert failed["saved"] == ["best.pt", "ckpt_epoch0001_step00000003.pt"]
    assert temporaries(rank_faults["folder"]) == []


def test_resume_after_rank_faults_is_bit_identical(baseline, rank_faults):
    assert rank_faults["resumed"]["res"].returncode == 0
    expected = training_state(ckpt_io.latest_checkpoint(baseline[0] / "full"))
    final = ckpt_io.latest_checkpoint(rank_faults["folder"])
    assert final.name == "ckpt_epoch0002_step00000006.pt"
    assert_same_state(expected, training_state(final))


def failed_draws(probe: PairedChannelDataset, name: str, items: range) -> int:
    """How many draws of `items` meet the file called `name` (each one is redrawn)."""
    count = 0
    for index in items:
        attempt = 0
        while probe.files[probe.draw(index, attempt)[0]].path.name == name:
            count, attempt = count + 1, attempt + 1
    return count


def test_file_unreadable_on_one_rank_is_redrawn_and_counted_over_ranks(tmp_path, synth_root):
    cfg = prepare_config(make_config("config_paired_nq2", [
        f"datasets.data_root={synth_root}", f"checkpoint.save_folder={tmp_path}",
        "datasets.fixed_length=12"]))
    probe = PairedChannelDataset(cfg, "train", rank=1)
    probe.set_epoch(1)
    # Rank 1 reads items 0-5 of epoch 1 (batch 2, 3 steps); it loses the file of item 2
    # after its first step; rank 0 keeps reading it.
    victim = probe.files[probe.draw(2)[0]].path
    expected = failed_draws(probe, victim.name, range(2, 6))
    assert expected >= 1
    res = torchrun(tmp_path, synth_root, "unreadable", ["common.max_epoch=1"],
                   fault=f"unreadable:1:{victim.name}@1")
    assert res.returncode == 0, rank_output(tmp_path, "unreadable", 1)[-3000:]
    state = ckpt_io.load_checkpoint(tmp_path / "unreadable" / "ckpt_epoch0001_step00000003.pt")
    assert state["skipped_reads"] == expected
    hydra = tmp_path / "hydra" / "unreadable"
    # Rank 0 logs the count of all ranks, though it read every file it drew.
    logged = re.findall(r"skipped_reads=(\d+)", (hydra / "train.log").read_text())
    assert int(logged[-1]) == expected
    assert f"skipped_reads: {victim}" in (hydra / "train.rank1.log").read_text()


def leave_together_worker(rank: int, ports: tuple[int, int], out_dir: str) -> None:
    """Rank 1 fails with a reason, then (in a new group) rank 1 hangs outside collectives;
    rank 0 waits in a collective each time. What rank 0 is told goes to `out_dir`."""
    said = {}
    for case, port in zip(("reason", "hang"), ports):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2, timeout=timedelta(seconds=2))
        distributed.tell_log_file(Path(out_dir) / f"rank{rank}.log")
        try:
            with distributed.leave_together(timeout_s=2, advice=" (advice)"):
                if rank == 1 and case == "reason":
                    raise ValueError("a reason only rank 1 knows")
                if rank == 1:
                    time.sleep(6)  # stuck: no collective within the timeout
                distributed.barrier()
        except (ValueError, distributed.PeerStopped) as error:
            said[case] = (type(error).__name__, str(error))
        distributed.destroy_process_group()
    torch.save(said, Path(out_dir) / f"said{rank}.pt")


def test_a_rank_that_fails_or_hangs_is_named_by_the_others(tmp_path):
    mp.spawn(leave_together_worker, args=((free_port(), free_port()), str(tmp_path)), nprocs=2)
    said = torch.load(tmp_path / "said0.pt")
    assert said["reason"] == ("PeerStopped", "rank 1 stopped (ValueError: a reason only rank 1 "
                              f"knows); its log: {tmp_path / 'rank1.log'}; rank 0 stops too "
                              "(advice)")
    kind, message = said["hang"]
    assert kind == "PeerStopped" and message.startswith(
        "rank 1 did not answer for 2 s (distributed.timeout_s)")
    assert torch.load(tmp_path / "said1.pt")["reason"][0] == "ValueError"  # its own, unchanged


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
