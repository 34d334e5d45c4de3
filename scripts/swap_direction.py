"""Which codebook carries the channel? The study's swap gain both ways round.

    python scripts/swap_direction.py runs/paired_study --data-root runs/paired_study/data

For every seed's checkpoints of a `scripts/paired_study.sh` folder, the swap gain (evaluate.py's
`swap_gain`: how far a swapped decode's per-band levels move from A's decode toward B's) with
codebook 2 taken from B (the instrument's swap: 1 = codebook 2 carries the channel) and with
codebook 1 taken from B (1 = codebook 1 carries it), on the same pairs as the study's
evaluation of that seed. Lighter probe statistics than evaluate.py (they are not reported).
Prints a Markdown table of mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
from model import load_model  # noqa: E402
from training.validation import array_geometry, evaluate_model  # noqa: E402


def swap_gains(study: Path, seed: int, variants: list[str], data_root: str, pairs: int) -> dict:
    """`{variant: (gain with codebook 2 from B, gain with codebook 1 from B)}` for one seed."""
    cfg = OmegaConf.load(ROOT / "config" / "evaluate.yaml")
    cfg.datasets.data_root, cfg.datasets.val_pairs, cfg.device = data_root, pairs, "cpu"
    cfg.instrument.update(probe_folds=2, probe_shuffles=1, ild_probe_alpha=1.0, channel_probe_c=1.0,
                          bootstrap=100)
    paths = {v: sorted((study / v / f"seed{seed}").glob("ckpt_*.pt"))[-1] for v in variants}
    # The first variant's checkpoint fixes the pairs, as in the study's evaluation.
    data_cfg = evaluate.evaluation_data_config(load_model(paths[variants[0]])[1], cfg)
    loader = evaluate.validation_loader(
        evaluate.at_rate(data_cfg, cfg, int(data_cfg.model.sample_rate)), "cpu")
    gains = {}
    for variant, path in paths.items():
        model, train_cfg = load_model(path)
        gains[variant] = tuple(
            evaluate_model(model, int(train_cfg.model.bins), loader, content_codebook=kept_from_a,
                           keep_examples=0, settings=evaluate.instrument_settings(cfg),
                           capsules=array_geometry(loader.dataset),
                           desc=f"{variant} seed {seed}")[0]["swap_gain"]
            for kept_from_a in (0, 1))  # keep codebook 1 of A (swap codebook 2), then codebook 2
    return gains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="OUT folder of scripts/paired_study.sh")
    parser.add_argument("--data-root", required=True, help="the study's DATA_ROOT")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+",
                        default=["mono", "mono_split", "seed", "rvq", "paired"])
    parser.add_argument("--pairs", type=int, default=256)
    args = parser.parse_args()
    per_seed = [swap_gains(args.study, s, args.variants, args.data_root, args.pairs)
                for s in args.seeds]

    def cell(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3f} ± {spread:.3f}"

    print(f"{len(args.seeds)} seed(s), {args.pairs} pairs; swap gain, mean ± std over seeds\n")
    print("| variant | codebook 2 from B | codebook 1 from B |\n|---|---|---|")
    for v in args.variants:
        print(f"| {v} | {cell([g[v][0] for g in per_seed])} | "
              f"{cell([g[v][1] for g in per_seed])} |")


if __name__ == "__main__":
    main()
