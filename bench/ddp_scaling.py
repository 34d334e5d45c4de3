"""Training throughput with 1 and 2 processes under torchrun (gloo on CPU, NCCL on GPUs).

Each process runs the real paired training step (training_step.train_step, DistributedDataParallel,
codebook all-reduce) on random audio at ``--batch`` items per process; throughput counts
segments (items x 2 views) of all processes per second.

    python bench/ddp_scaling.py [--batch 4] [--seconds 1.0] [--steps 3] [--device auto]

Prints ``procs=N segments_per_s=...`` per process count and, last, ``scaling_2_over_1=``
(ideal: 2.0). On a 2-core CPU machine the two processes share the cores that one process
uses alone (torchrun gives each one thread), so expect about 1.0 there: report it, do not
tune for it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
           f"--master_port={free_port()}", __file__, "--worker", "--batch", str(args.batch),
           "--seconds", str(args.seconds), "--steps", str(args.steps), "--device", args.device,
           *[f"--override={o}" for o in args.override]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def worker(args) -> None:
    from step_time import time_mode
    result = time_mode(2, args.batch, args.seconds, args.steps, args.device, args.override)
    if int(os.environ.get("RANK", "0")) == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        result["segments_per_s"] = world * args.batch * 2 / result["median_s"]
        print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="paired items per process")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--override", action="append", default=[])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rates = {}
    for procs in (1, 2):
        result = run(procs, args)
        rates[procs] = result["segments_per_s"]
        print(f"procs={procs} device={result['device']} s_per_step={result['median_s']:.3f} "
              f"segments_per_s={rates[procs]:.2f}")
    print(f"cpu_cores={os.cpu_count()}")
    print(f"scaling_2_over_1={rates[2] / rates[1]:.3f}")


if __name__ == "__main__":
    main()
