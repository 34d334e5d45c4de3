"""The training step on one GPU: float32 (TF32) vs bf16 vs bf16 + torch.compile, at batch 8 and
32 x 1 s, paired (B items x 2 views) and mono (2B items: the same segments), full paired config.

Run by `bench/gpu_check.sh` (which installs what the device image lacks). One process; for
each configuration: fresh parts, warm-up steps (compilation included), then `--steps` timed
steps in the training mix (2 of 3 with a discriminator update), each synchronised. Prints one
table row per configuration as soon as it is measured (a row that would start after
`--budget` seconds is skipped and says so), then the table. Before the timings, one step on
the GPU is checked against the straightforward step of `tests/reference_step.py` (float32).

    python bench/gpu_check.py [--steps 12] [--budget 420] [--json out.json]

`--dry-run` runs the same code on the CPU with the tiny preset (checks the script itself).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# (precision, compile) in the order they are measured: the compiled runs, the slowest to
# start, come last so that a tight budget still gets the others.
PRECISIONS = [("fp32", False), ("bf16", False), ("bf16", True)]
SHAPES = [("paired", 8), ("mono", 16), ("paired", 32), ("mono", 64)]  # items per step


DEVICE, EXTRA = "cuda", []  # --dry-run: "cpu", the tiny preset


def synchronize() -> None:
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(views: int, batch: int, amp: str, compiled: bool):
    from hydra import compose, initialize_config_dir
    from training.configuration import prepare_config
    from training.parts import build_parts
    from training.runtime import seed_everything, setup_runtime

    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose(config_name="config_paired_nq2", overrides=[
            *EXTRA, "datasets.data_root=unused", "model.kmeans_buffer=0", f"common.device={DEVICE}",
            f"datasets.views={views}", f"datasets.batch_size={batch}",
            f"common.amp={'off' if amp == 'fp32' else amp}", f"common.compile={compiled}"])
    cfg = prepare_config(cfg)
    runtime = setup_runtime(cfg)
    seed_everything(0)
    if compiled:  # each configuration compiles from scratch, as a training run would
        import torch._dynamo
        torch._dynamo.reset()
    return cfg, runtime, build_parts(cfg, runtime, steps_per_epoch=1000)


def batch_of(cfg, views: int, batch: int, seed: int):
    import torch
    gen = torch.Generator().manual_seed(seed)
    wavs = 0.1 * torch.randn(batch, views, 1, int(cfg.datasets.tensor_cut), generator=gen)
    metas = [{"class": "Beach", "channels": list(range(views)), "path": "", "start": 0}] * batch
    return wavs, metas


def check_against_reference() -> str:
    """One float32 update step on the GPU, the toolkit's step against the reference step."""
    import torch
    from reference_step import reference_step
    from training.step import train_step

    cfg, runtime, parts = build(2, 4, "fp32", False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    wavs, metas = batch_of(cfg, 2, 4, 0)
    wavs = wavs.to(runtime.device)
    with torch.no_grad():
        parts.raw_model.train()(wavs.flatten(0, 1))  # k-means init, outside the step
    reference = copy.deepcopy(parts)
    torch.manual_seed(1)
    got = train_step(parts, runtime, wavs, metas, step=0, adversarial=True, update_disc=True,
                     grad_clip=0.0, bins=cfg.model.bins)
    torch.manual_seed(1)
    want = reference_step(reference, runtime, wavs, metas, step=0, adversarial=True,
                          update_disc=True)
    worst = {name: abs(got.scalars[name] - want[name]) / max(abs(want[name]), 1e-12)
             for name in ("loss_g", "loss_d", "grad_norm_g", "grad_norm_d", "l_feat_ch1",
                          "l_g_ch1")}
    # Per player, the largest gradient difference next to its largest gradient: a weight
    # whose true gradient is 0 (the hinge terms of real and fake cancel in the logits' bias)
    # differs by float32 rounding alone.
    grads = 0.0
    for mine, theirs in ((parts.raw_model, reference.raw_model),
                         (parts.raw_disc, reference.raw_disc)):
        pairs = [(a.grad, b.grad)
                 for a, b in zip(mine.parameters(), theirs.parameters()) if b.grad is not None]
        largest = max(b.abs().max().item() for _, b in pairs)
        grads = max(grads, max((a - b).abs().max().item() for a, b in pairs) / largest)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    verdict = "ok" if max(worst.values()) < 1e-3 and grads < 1e-3 else "MISMATCH"
    return (f"reference check (float32, update step): {verdict}; largest relative difference "
            f"{max(worst, key=worst.get)}={max(worst.values()):.2e}, gradients {grads:.2e}")


def measure(mode: str, batch: int, amp: str, compiled: bool, steps: int) -> dict:
    import torch
    from training.step import discriminator_coin, train_step

    views, items = (2 if mode == "paired" else 1), batch
    cfg, runtime, parts = build(views, items, amp, compiled)
    kinds = [discriminator_coin(0, 1, i) < cfg.discriminator.update_prob for i in range(steps)]
    start = time.perf_counter()
    for i, update in enumerate([True, False, True]):  # k-means, compilation, allocator
        wavs, metas = batch_of(cfg, views, items, 100 + i)
        train_step(parts, runtime, wavs, metas, step=i, adversarial=True, update_disc=update,
                   grad_clip=0.0, bins=cfg.model.bins)
    synchronize()
    warmup = time.perf_counter() - start
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {True: [], False: []}
    for i, update in enumerate(kinds):
        wavs, metas = batch_of(cfg, views, items, i)
        synchronize()
        begin = time.perf_counter()
        result = train_step(parts, runtime, wavs, metas, step=3 + i, adversarial=True,
                            update_disc=update, grad_clip=0.0, bins=cfg.model.bins)
        synchronize()
        times[update].append(time.perf_counter() - begin)
        if not result.ok:
            raise RuntimeError(f"skipped step in the benchmark: {result.reason}")
    every = times[True] + times[False]
    segments = items * views
    row = {"mode": mode, "batch": items, "segments": segments, "precision": amp,
           "compiled": compiled, "warmup_s": warmup,
           "s_per_step": statistics.median(every),
           "upd_s": statistics.median(times[True]) if times[True] else float("nan"),
           "adv_s": statistics.median(times[False]) if times[False] else float("nan"),
           "segments_per_s": segments * len(every) / sum(every),
           "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0}
    del parts
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def print_row(row: dict) -> None:
    name = f"{row['precision']}{' + compile' if row['compiled'] else ''}"
    print(f"| {row['mode']} | {row['batch']} ({row['segments']} segments) | {name} | "
          f"{row['s_per_step'] * 1e3:.0f} | {row['adv_s'] * 1e3:.0f} / {row['upd_s'] * 1e3:.0f} | "
          f"{row['segments_per_s']:.0f} | {row['peak_gpu_gb']:.2f} | {row['warmup_s']:.0f} |",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds after which no new configuration is started")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="the tiny preset on the CPU")
    args = ap.parse_args()
    import torch
    global DEVICE, EXTRA
    if args.dry_run:
        DEVICE, EXTRA = ("cpu",
                         ["+preset=tiny", "datasets.tensor_cut=4800", "datasets.fixed_length=1000"])
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for a GPU machine")
    start = time.perf_counter()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    print(f"device={name} torch={torch.__version__}", flush=True)
    print(check_against_reference(), flush=True)
    header = ("| mode | batch | precision | ms/step (mix) | ms/step no update / update | "
              "segments/s | peak GPU GB | warm-up s |\n|---|---|---|---|---|---|---|---|")
    print(header, flush=True)
    rows, skipped = [], []
    for amp, compiled in PRECISIONS:
        for mode, batch in SHAPES:
            if time.perf_counter() - start > args.budget:
                skipped.append(f"{mode} batch {batch} {amp}{' + compile' if compiled else ''}")
                continue
            try:
                rows.append(measure(mode, batch, amp, compiled, args.steps))
                print_row(rows[-1])
            except Exception as error:  # one failing configuration must not hide the others
                print(f"| {mode} | {batch} | {amp}{' + compile' if compiled else ''} | failed: "
                      f"{type(error).__name__}: {str(error)[:200]} |", flush=True)
    if skipped:
        print(f"skipped (time budget): {', '.join(skipped)}")
    print(f"\n{header}")
    for row in rows:
        print_row(row)
    by = {(r["mode"], r["segments"], r["precision"], r["compiled"]): r for r in rows}
    for segments in (16, 64):
        for amp, compiled in PRECISIONS:
            paired, mono = (by.get(("paired", segments, amp, compiled)),
                            by.get(("mono", segments, amp, compiled)))
            if paired and mono:
                print(f"paired_over_mono2B segments={segments} "
                      f"{amp}{'+compile' if compiled else ''}: "
                      f"{paired['s_per_step'] / mono['s_per_step']:.3f}")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
