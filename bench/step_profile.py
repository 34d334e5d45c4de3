"""Time and peak memory of the training step, phase by phase.

The three modes of `training.step.train_step` on the full paired config (32 filters, 2 x 1024
codes, 3-scale discriminator) at batch B x 1 s (paired: 2B segments), and mono at batch 2B
(the same number of segments) beside it:

- ``gen``: generator only (no adversarial terms: the steps before the discriminator starts);
- ``adv``: + adversarial terms (feature matching, hinge), no discriminator update;
- ``upd``: + a discriminator update (two thirds of the steps after warmup);
- ``disc``: the discriminator alone on 2B segments, forward + backward (weights) and a
  no-grad forward: what the adversarial part of the step cannot go below.

Each (mode, phase) runs in its own process (so that its peak memory is its own): one warm-up
step (k-means init on the first batch: ``model.kmeans_buffer=0``, so that the timed steps are
steady-state steps), then ``--steps`` timed steps. Peak memory is the process's peak RSS over
the timed steps (Linux: VmHWM, reset after the warm-up through /proc/self/clear_refs) and, on
CUDA, `torch.cuda.max_memory_allocated`. Rounds alternate the order of the processes.

    python bench/step_profile.py [--batch 8] [--seconds 1.0] [--steps 3] [--rounds 2]
                                 [--modes paired,mono] [--threads 0] [--device auto]
                                 [--seed-root PATH] [--override key=value ...] [--json out.json]

``--seed-root`` adds the mode ``seed``: the seed system (the public EnCodec training fork the
design document was written for: github.com/Madhudorai/encodec-pytorch, with the modules of
its upstream) run side by side, from a checkout at PATH. Its own `train_one_step_paired`
(train_paired_gpu.py) runs on one batch of B pairs per call, with its model, discriminator,
optimizers, schedulers and balancer built as its `train_paired` builds them from its
config/config_paired_nq2.yaml; phases ``adv`` and ``upd`` force its discriminator coin
(`random.random() < 0.5`) off and on. Its `.cuda()` calls are made no-ops on the CPU.

Prints one line per measurement, then the table (median s/step, peak memory), the
adversarial part (adv - gen, upd - gen) next to the discriminator's own cost, the step of
the training mix (1/3 adv + 2/3 upd, `discriminator.update_prob`), paired(B) / mono(2B) and,
with ``--seed-root``, paired over the seed system's paired step (``paired_over_seed_time=``,
``paired_over_seed_memory=``, per phase and for each system's training mix).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("gen", "adv", "upd")
SEED_UPDATE_PROB = 0.5  # the seed system's discriminator coin: random.random() < 0.5


def current_rss_peak_mb() -> float:
    """Peak RSS since the last `reset_rss_peak` (VmHWM), in MiB; 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_rss_peak() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def build(views: int, batch: int, device: str, overrides: list[str]):
    import torch
    from hydra import compose, initialize_config_dir
    from training.configuration import prepare_config
    from training.parts import build_parts
    from training.runtime import seed_everything, setup_runtime

    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose(config_name="config_paired_nq2", overrides=[
            "datasets.data_root=unused", "model.kmeans_buffer=0", f"common.device={device}",
            f"datasets.views={views}", f"datasets.batch_size={batch}", *overrides])
    cfg = prepare_config(cfg)
    runtime = setup_runtime(cfg)
    seed_everything(0)
    parts = build_parts(cfg, runtime, steps_per_epoch=1000)
    del torch
    return cfg, runtime, parts


def build_config_value(key: str, overrides: list[str]):
    """One value of the composed paired config (no parts built)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose(config_name="config_paired_nq2",
                      overrides=["datasets.data_root=unused", *overrides])
    return OmegaConf.select(cfg, key)


def synchronize(runtime) -> None:
    import torch
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()


def reset_peaks(runtime) -> None:
    import torch
    reset_rss_peak()
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peaks(runtime) -> dict:
    import torch
    gpu = torch.cuda.max_memory_allocated() / 2**20 if runtime.device.type == "cuda" else 0.0
    return {"peak_rss_mb": current_rss_peak_mb(), "peak_gpu_mb": gpu}


def timed_steps(runtime, inputs: list, run) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of `run(i, inputs[i])` for every input but the first, a warm-up
    (k-means init on the first batch, the allocator's growth); the peak-memory window starts
    after it."""
    times, cpu = [], []
    for i, item in enumerate(inputs):
        if i == 1:
            reset_peaks(runtime)
        synchronize(runtime)
        start, start_cpu = time.perf_counter(), time.process_time()
        run(i, item)
        synchronize(runtime)
        if i >= 1:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return times, cpu


def measure_step(views: int, batch: int, phase: str, args) -> dict:
    """Median time and peak memory of `args.steps` steps of one phase."""
    import torch
    from training.step import train_step

    cfg, runtime, parts = build(views, batch, args.device, args.override)
    length = int(args.seconds * cfg.model.sample_rate)
    gen = torch.Generator().manual_seed(0)
    metas = [{"class": "Beach", "channels": list(range(views)), "path": "", "start": 0}] * batch
    adversarial, update_disc = phase != "gen", phase == "upd"
    batches = [0.1 * torch.randn(batch, views, 1, length, generator=gen)
               for _ in range(args.steps + 1)]

    def run(i: int, wavs) -> None:
        result = train_step(parts, runtime, wavs, metas, step=i, adversarial=adversarial,
                            update_disc=update_disc, grad_clip=0.0, bins=cfg.model.bins)
        if not result.ok:
            raise RuntimeError(f"non-finite step in the benchmark ({phase}, views={views})")

    times, cpu = timed_steps(runtime, batches, run)
    return {"times": times, "cpu_times": cpu, **peaks(runtime), "device": str(runtime.device),
            "threads": torch.get_num_threads()}


def measure_discriminator(views: int, batch: int, args) -> dict:
    """The discriminator alone on the step's segments: forward + backward into its weights
    (one scale at a time, as the step runs it) and a no-grad forward."""
    import torch

    cfg, runtime, parts = build(views, batch, args.device, args.override)
    disc = parts.raw_disc
    length = int(args.seconds * cfg.model.sample_rate)
    x = 0.1 * torch.randn(batch * views, 1, length, generator=torch.Generator().manual_seed(0),
                          device="cpu").to(runtime.device)
    train, forward, cpu = [], [], []
    for i in range(args.steps + 1):
        synchronize(runtime)
        start, start_cpu = time.perf_counter(), time.process_time()
        with runtime.autocast():
            logits, _ = disc(x)
        sum(logit.float().mean() for logit in logits).backward()
        synchronize(runtime)
        middle = time.perf_counter()
        with torch.no_grad(), runtime.autocast():
            disc(x)
        synchronize(runtime)
        if i >= 1:
            train.append(middle - start)
            forward.append(time.perf_counter() - middle)
            cpu.append(time.process_time() - start_cpu)
        disc.zero_grad(set_to_none=True)
    return {"times": train, "forward_times": forward, "cpu_times": cpu, **peaks(runtime),
            "device": str(runtime.device), "threads": torch.get_num_threads()}


class ForcedCoin:
    """Stands in for the `random` module in the seed's training script: `random()` returns
    `value`; everything else is the real module."""

    def __init__(self) -> None:
        self.value = 0.0

    def random(self) -> float:
        return self.value

    def __getattr__(self, name: str):
        import random
        return getattr(random, name)


def run_seed_on_cpu() -> None:
    """The seed system hard-codes CUDA: `.cuda()` on tensors and modules, and `device='cuda'`
    in `torch.tensor` / `torch.hann_window` calls of its losses and mel transform. Make those
    no-ops so that its step runs unchanged on the CPU."""
    import types
    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self

    def on_cpu(fn):
        return lambda *a, device=None, **k: fn(*a, **k)

    cpu_torch = types.ModuleType("torch")
    cpu_torch.__getattr__ = lambda name: getattr(torch, name)
    cpu_torch.tensor, cpu_torch.hann_window = on_cpu(torch.tensor), on_cpu(torch.hann_window)
    for name in ("losses", "audio_to_mel"):
        if name in sys.modules and hasattr(sys.modules[name], "torch"):
            sys.modules[name].torch = cpu_torch


def build_seed_step(root: Path, batch: int, device: str):
    """The seed system's paired step as its `train_paired` sets it up; returns
    `step(wav1, wav2, update_disc)`, which runs its `train_one_step_paired` on one batch."""
    import random
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(root))
    import train_paired_gpu as seed  # noqa: E402  (the checkout's own module)
    if device != "cuda":
        run_seed_on_cpu()

    config = OmegaConf.load(root / "config" / "config_paired_nq2.yaml")
    config.datasets.batch_size = batch
    m = config.model
    random.seed(0)
    torch.manual_seed(0)
    model = seed.EncodecModel._get_model(
        m.target_bandwidths, m.sample_rate, m.channels, causal=m.causal, model_norm=m.norm,
        audio_normalize=m.audio_normalize, segment=eval(m.segment), name=m.name, ratios=m.ratios,
        n_q=m.n_q).to(device)
    disc = seed.MultiScaleSTFTDiscriminator(
        in_channels=m.channels, out_channels=m.channels, filters=m.filters,
        hop_lengths=m.disc_hop_lengths, win_lengths=m.disc_win_lengths,
        n_ffts=m.disc_n_ffts).to(device)
    optimizer = torch.optim.Adam([{"params": [p for p in model.parameters() if p.requires_grad],
                                   "lr": config.optimization.lr}], betas=(0.5, 0.9))
    optimizer_disc = torch.optim.Adam([{"params": [p for p in disc.parameters() if p.requires_grad],
                                        "lr": config.optimization.disc_lr}], betas=(0.5, 0.9))
    iters = 1000
    schedulers = [seed.WarmupCosineLrScheduler(opt, max_iter=config.common.max_epoch * iters,
                                               eta_ratio=0.1,
                                               warmup_iter=config.lr_scheduler.warmup_epoch * iters,
                                               warmup_ratio=1e-4)
                  for opt in (optimizer, optimizer_disc)]
    scaler = torch.amp.GradScaler() if config.common.amp else None
    scaler_disc = torch.amp.GradScaler() if config.common.amp else None
    balancer = seed.Balancer(dict(config.balancer.weights)) if hasattr(config, "balancer") else None
    epoch = max(1, config.lr_scheduler.warmup_epoch)  # past warmup: the discriminator may train
    coin = ForcedCoin()
    seed.random = coin  # the step draws its discriminator coin from its module's `random`

    def step(wav1, wav2, update_disc: bool) -> None:
        coin.value = 0.0 if update_disc else 1.0
        seed.train_one_step_paired(epoch, optimizer, optimizer_disc, model, disc, [(wav1, wav2)],
                                   config, *schedulers, scaler, scaler_disc, balancer, None)

    return config, step


def measure_seed_step(batch: int, phase: str, args) -> dict:
    """Median time and peak memory of `args.steps` paired steps of the seed system."""
    import torch

    device = ("cuda" if args.device == "cuda"
              or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    config, step = build_seed_step(Path(args.seed_root).resolve(), batch, device)
    runtime = type("Runtime", (), {"device": torch.device(device)})()
    length = int(args.seconds * config.model.sample_rate)
    gen = torch.Generator().manual_seed(0)
    pairs = [[0.1 * torch.randn(batch, 1, length, generator=gen).to(device) for _ in range(2)]
             for _ in range(args.steps + 1)]
    times, cpu = timed_steps(runtime, pairs,
                             lambda i, pair: step(*pair, update_disc=phase == "upd"))
    return {"times": times, "cpu_times": cpu, **peaks(runtime), "device": device,
            "threads": torch.get_num_threads()}


def child(args) -> None:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    views, batch = (2, args.batch) if args.mode in ("paired", "seed") else (1, 2 * args.batch)
    if args.mode == "seed":
        result = measure_seed_step(batch, args.phase, args)
    elif args.phase == "disc":
        result = measure_discriminator(views, batch, args)
    else:
        result = measure_step(views, batch, args.phase, args)
    print(json.dumps(result))


def run_child(mode: str, phase: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--phase", phase,
           "--batch", str(args.batch), "--seconds", str(args.seconds), "--steps", str(args.steps),
           "--device", args.device, "--threads", str(args.threads),
           *(["--seed-root", args.seed_root] if args.seed_root else []),
           *[f"--override={o}" for o in args.override]]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{mode}/{phase} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: dict[tuple[str, str], list[dict]]) -> dict[tuple[str, str], dict]:
    table = {}
    for key, results in runs.items():
        times = [t for r in results for t in r["times"]]
        cpu = [t for r in results for t in r["cpu_times"]]
        row = {"s": statistics.median(times), "min_s": min(times), "max_s": max(times),
               "n": len(times), "cpu_s": statistics.median(cpu),
               "rss_gb": max(r["peak_rss_mb"] for r in results) / 1024,
               "gpu_gb": max(r["peak_gpu_mb"] for r in results) / 1024}
        if "forward_times" in results[0]:
            row["forward_s"] = statistics.median(t for r in results for t in r["forward_times"])
        table[key] = row
    return table


NAMES = {"gen": "generator only", "adv": "+ adversarial terms, no D update",
         "upd": "+ discriminator update", "disc": "discriminator alone: fwd+bwd"}


def report(table: dict[tuple[str, str], dict], args) -> None:
    modes = [m for m in args.modes if any((m, p) in table for p in (*PHASES, "disc"))]
    memory = "gpu_gb" if any(row["gpu_gb"] for row in table.values()) else "rss_gb"
    label = "GPU" if memory == "gpu_gb" else "RSS"
    print()
    print("| phase | mode | s/step median (range) | CPU s/step | peak " + label + " GB |")
    print("|---|---|---|---|---|")
    for phase in (*PHASES, "disc"):
        for mode in modes:
            row = table.get((mode, phase))
            if row is not None:
                print(f"| {NAMES[phase]} | {mode} | {row['s']:.2f} "
                      f"({row['min_s']:.2f}-{row['max_s']:.2f}) "
                      f"| {row['cpu_s']:.2f} | {row[memory]:.2f} |")
    for mode in modes:
        get = lambda phase, key="s": table.get((mode, phase), {}).get(key)  # noqa: E731
        line = [f"{mode}:"]
        for phase in ("adv", "upd"):
            if get("gen") is not None and get(phase) is not None:
                line.append(f"adversarial_part_{phase}={get(phase) - get('gen'):.2f}s "
                            f"(cpu {get(phase, 'cpu_s') - get('gen', 'cpu_s'):.2f}s)")
        if get("disc") is not None:
            line.append(f"disc_fwd_bwd={get('disc'):.2f}s "
                        f"disc_nograd_fwd={get('disc', 'forward_s'):.2f}s")
        if len(line) > 1:
            print(" ".join(line))
    mix = {}
    for mode in modes:
        adv, upd = table.get((mode, "adv")), table.get((mode, "upd"))
        if adv and upd:
            p_upd = SEED_UPDATE_PROB if mode == "seed" else args.update_prob
            mix[mode] = {key: (1 - p_upd) * adv[key] + p_upd * upd[key] for key in ("s", "cpu_s")}
            print(f"{mode}_mixed_s_per_step={mix[mode]['s']:.2f} cpu={mix[mode]['cpu_s']:.2f} "
                  f"({1 - p_upd:.2f} adv + {p_upd:.2f} upd) "
                  f"peak_{memory}={max(adv[memory], upd[memory]):.2f}")
    if "paired" in mix and "mono" in mix:
        print(f"paired_over_mono2B={mix['paired']['s'] / mix['mono']['s']:.3f} "
              f"(cpu {mix['paired']['cpu_s'] / mix['mono']['cpu_s']:.3f}; mixed step)")
        for phase in PHASES:
            if ("paired", phase) in table and ("mono", phase) in table:
                paired, mono = table[("paired", phase)], table[("mono", phase)]
                print(f"  {phase}: paired_over_mono2B={paired['s'] / mono['s']:.3f} "
                      f"(cpu {paired['cpu_s'] / mono['cpu_s']:.3f})")
    if "paired" in mix and "seed" in mix:
        ours = max(table[("paired", p)][memory] for p in ("adv", "upd"))
        theirs = max(table[("seed", p)][memory] for p in ("adv", "upd"))
        print(f"paired_over_seed_time={mix['paired']['s'] / mix['seed']['s']:.3f} "
              f"(cpu {mix['paired']['cpu_s'] / mix['seed']['cpu_s']:.3f}; each system's training "
              "mix; goal <= 0.40)")
        print(f"paired_over_seed_memory={ours / theirs:.3f} (peak {label}; goal <= 0.55)")
        for phase in ("adv", "upd"):
            paired, seed = table[("paired", phase)], table[("seed", phase)]
            print(f"  {phase}: paired_over_seed_time={paired['s'] / seed['s']:.3f} "
                  f"(cpu {paired['cpu_s'] / seed['cpu_s']:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="paired batch B (mono runs 2B)")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, alternating the order")
    ap.add_argument("--modes", default="paired,mono")
    ap.add_argument("--phases", default="gen,adv,upd,disc")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per process (0: torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed-root", default=None,
                    help="a checkout of the seed system: time its paired step side by side (mode "
                         "seed)")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="paired", help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="upd", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    args.modes = args.modes.split(",")
    if args.seed_root:
        if not (Path(args.seed_root) / "train_paired_gpu.py").is_file():
            sys.exit(f"--seed-root {args.seed_root}: no train_paired_gpu.py there; "
                     "pass a checkout of github.com/Madhudorai/encodec-pytorch")
        args.modes.append("seed")
    args.update_prob = float(build_config_value("discriminator.update_prob", args.override))
    # The discriminator alone sees the same 2B segments in both modes: measured once; the
    # seed system's step has no generator-only phase here.
    jobs = [(mode, phase) for phase in args.phases.split(",") for mode in args.modes
            if (phase != "disc" or mode == args.modes[0])
            and (mode != "seed" or phase in ("adv", "upd"))]
    runs: dict[tuple[str, str], list[dict]] = {}
    print(f"batch={args.batch} seconds={args.seconds} steps={args.steps} rounds={args.rounds} "
          f"threads={args.threads or 'default'} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
          f"overrides={args.override}", flush=True)
    for r in range(args.rounds):
        for mode, phase in (jobs if r % 2 == 0 else jobs[::-1]):
            result = run_child(mode, phase, args)
            runs.setdefault((mode, phase), []).append(result)
            print(f"round={r + 1} {mode} {phase} s={','.join(f'{t:.2f}' for t in result['times'])} "
                  f"cpu_s={','.join(f'{t:.2f}' for t in result['cpu_times'])} "
                  f"peak_rss_mb={result['peak_rss_mb']:.0f} "
                  f"peak_gpu_mb={result['peak_gpu_mb']:.0f} "
                  f"threads={result['threads']}", flush=True)
    table = summarise(runs)
    report(table, args)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"summary": {f"{m}/{p}": v for (m, p), v in table.items()},
             "runs": {f"{m}/{p}": v for (m, p), v in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
