"""Time one training step: paired at batch B against mono at batch 2B (same segments/step).

Uses the paired config's model, discriminator, losses and balancer settings and the real
training step (training.step.train_step), on random audio (no dataset needed). Each mode runs in its own process so
that its peak memory is its own.

    python bench/step_time.py [--batch 8] [--seconds 1.0] [--steps 5] [--rounds 2] [--device auto]

Prints ``paired_s_per_step=``, ``mono2B_s_per_step=``, ``peak_rss_mb=`` (paired) and, last,
``paired_over_mono2B=`` (target <= 1.05 on CPU: pairing must cost no more than the same
number of mono segments).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose_paired_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose(config_name="config_paired_nq2",
                       overrides=["datasets.data_root=unused", *overrides])


def time_mode(views: int, batch: int, seconds: float, steps: int, device: str,
              overrides: list[str]) -> dict:
    import torch
    from training.configuration import prepare_config
    from training.parts import build_parts
    from training.runtime import seed_everything, setup_runtime
    from training.step import discriminator_coin, train_step

    cfg = compose_paired_config([f"common.device={device}", f"datasets.views={views}", *overrides])
    cfg = prepare_config(cfg)
    runtime = setup_runtime(cfg)
    seed_everything(0)
    parts = build_parts(cfg, runtime, steps_per_epoch=1000)
    length = int(seconds * cfg.model.sample_rate)
    gen = torch.Generator().manual_seed(0)
    metas = [{"class": "Beach", "channels": list(range(views)), "path": "", "start": 0}] * batch
    times = []
    warmup = 2  # k-means init and the allocator's first growth: not timed
    for i in range(steps + warmup):
        wavs = 0.1 * torch.randn(batch, views, 1, length, generator=gen)
        update_disc = discriminator_coin(0, 1, i) < cfg.discriminator.update_prob
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = train_step(parts, runtime, wavs, metas, step=i, adversarial=True,
                                   update_disc=update_disc, grad_clip=0.0, bins=cfg.model.bins)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        assert result.ok, "non-finite step in the benchmark"
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if runtime.device.type == "cuda" else 0.0
    return {"median_s": statistics.median(times), "steps": times, "peak_rss_mb": peak_mb,
            "peak_gpu_mb": gpu_mb, "device": str(runtime.device)}


def run_child(views: int, batch: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(views), "--batch", str(batch),
           "--seconds", str(args.seconds), "--steps", str(args.steps), "--device", args.device,
           *[f"--override={o}" for o in args.override]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge_rounds(results: list[dict]) -> dict:
    steps = [t for r in results for t in r["steps"]]
    return {"steps": steps, "median_s": statistics.median(steps), "device": results[0]["device"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "peak_gpu_mb": max(r["peak_gpu_mb"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="paired batch B (mono runs 2B)")
    ap.add_argument("--seconds", type=float, default=1.0, help="segment length in seconds")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating paired/mono rounds")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--override", action="append", default=[],
                    help="extra Hydra override for the paired config, e.g. model.filters=8")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(time_mode(args.child, args.batch, args.seconds, args.steps,
                                   args.device, args.override)))
        return
    # Alternate which mode goes first, round by round: the first process on a machine runs
    # measurably slower, and that must not be charged to one mode.
    runs = {"paired": [], "mono": []}
    for r in range(args.rounds):
        order = ("paired", "mono") if r % 2 == 0 else ("mono", "paired")
        for mode in order:
            views, batch = (2, args.batch) if mode == "paired" else (1, 2 * args.batch)
            runs[mode].append(run_child(views, batch, args))
        ratio = runs["paired"][-1]["median_s"] / runs["mono"][-1]["median_s"]
        print(f"round={r + 1} first={order[0]} paired_over_mono2B={ratio:.3f}")
    paired, mono = (merge_rounds(runs[k]) for k in ("paired", "mono"))
    print(f"device={paired['device']} batch={args.batch} seconds={args.seconds} "
          f"steps={args.steps} rounds={args.rounds}")
    print(f"paired_steps={','.join(f'{t:.3f}' for t in paired['steps'])}")
    print(f"mono2B_steps={','.join(f'{t:.3f}' for t in mono['steps'])}")
    print(f"paired_s_per_step={paired['median_s']:.4f}")
    print(f"mono2B_s_per_step={mono['median_s']:.4f}")
    print(f"mono2B_peak_rss_mb={mono['peak_rss_mb']:.0f}")
    if paired["peak_gpu_mb"]:
        print(f"paired_peak_gpu_mb={paired['peak_gpu_mb']:.0f} "
              f"mono2B_peak_gpu_mb={mono['peak_gpu_mb']:.0f}")
    print(f"peak_rss_mb={paired['peak_rss_mb']:.0f}")
    print(f"paired_over_mono2B={paired['median_s'] / mono['median_s']:.3f}")


if __name__ == "__main__":
    main()
