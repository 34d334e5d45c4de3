"""How much of a pair's per-band level difference can still be read from what codebook 1 codes
of each channel, by read-outs the training did not run: a control for the level twin
(`pairwise.ild_head`), whose loss during training says only what its own, lagging head reads.

On the evaluation pairs of a checkpoint (its validation classes, the held-out files), each
pair at its common scale as `evaluate.py` codes it:
- the grouped, cross-validated ridge probe of `evaluate.py` (`measure.probes`) on the
  time-pooled codebook-1 content of both channels: the continuous latent on codebook 1's
  dimensions (before quantization) and its codes' embeddings;
- a fresh head of the twin's architecture (`LevelDifferenceHead`) trained on the continuous
  content of half the files and scored on the others: its normalised error (1 = no better than
  predicting no difference, 0 = exact).

    python scripts/level_readout.py CHECKPOINT DATA_ROOT [--pairs 256] [--steps 3000]

Runs on the CPU in about a minute for 256 pairs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluate import at_rate, evaluation_data_config, validation_loader  # noqa: E402
from measure.probes import cross_validated_probe  # noqa: E402
from model import load_model  # noqa: E402
from modules.pairwise_heads import LevelDifferenceHead, level_difference_loss  # noqa: E402
from modules.views import flatten_views, unflatten_views  # noqa: E402
from pairwise_losses import view_band_levels  # noqa: E402
from training.validation import pair_scale  # noqa: E402


@torch.no_grad()
def content_and_levels(model, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Per pair: continuous codebook-1 content `[N, 2, D, F]`, its codes' embeddings (same
    shape), the level difference of channel 1 minus 2 `[N, n_bands]` dB, the source file."""
    dims = model.quantizer.codebooks[0].dims[:, None]
    latents, codes, levels, files = [], [], [], []
    for wavs, metas in loader:
        x = flatten_views(wavs)
        out = model(x, return_embeddings=True, scale=pair_scale(model, x, 2))
        latents.append(unflatten_views(out.latent.float() * dims, 2))
        codes.append(unflatten_views(out.embeddings[0].float(), 2))
        band = view_band_levels(x, model.sample_rate, 2, 8)
        levels.append(band[:, 0] - band[:, 1])
        files += [str(m["path"]) for m in metas]
    return torch.cat(latents), torch.cat(codes), torch.cat(levels), files


def fresh_head_error(content: torch.Tensor, target: torch.Tensor, train: torch.Tensor,
                     steps: int, seed: int = 0) -> float:
    """Normalised error on the held-out pairs of a twin-shaped head trained on `train`."""
    torch.manual_seed(seed)
    head = LevelDifferenceHead(content.shape[2], target.shape[1])
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-4)
    a, b = content[:, 0], content[:, 1]
    train_idx, test_idx = train.nonzero().squeeze(1), (~train).nonzero().squeeze(1)
    for _ in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (32,))]
        loss = level_difference_loss(head(a[idx], b[idx]), target[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return level_difference_loss(head(a[test_idx], b[test_idx]), target[test_idx]).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data_root")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    model, train_cfg = load_model(args.checkpoint, torch.device("cpu"))
    if not getattr(model.quantizer, "content_dims", 0):
        raise SystemExit(f"{args.checkpoint}: not a split quantizer (model.content_share=0): "
                         "codebook 1 has no content dimensions of its own to read.")
    eval_cfg = OmegaConf.create({"array_set": None, "datasets": {
        "data_root": args.data_root, "classes": None, "val_pairs": args.pairs, "channels": None,
        "segment_seconds": 1.0, "val_files": None, "batch_size": 16, "num_workers": 0}})
    data_cfg = at_rate(evaluation_data_config(train_cfg, eval_cfg), eval_cfg, model.sample_rate)
    loader = validation_loader(data_cfg, torch.device("cpu"))
    latent, codes, target, files = content_and_levels(model.eval(), loader)
    groups = np.array(files)
    print(f"{len(target)} pairs from {len(set(files))} files; level differences "
          f"{target.pow(2).mean().sqrt():.2f} dB rms")
    for name, content in (("continuous content", latent), ("codebook-1 codes", codes)):
        probe = cross_validated_probe(content.mean(-1).flatten(1).double(), target.double(),
                                      groups, kind="regression")
        print(f"ridge probe R^2 on {name}: {probe['mean']:.3f} +- {probe['std']:.3f} "
              f"(shuffled labels {probe['shuffled_mean']:.3f})")
    names = np.unique(groups)
    np.random.default_rng(0).shuffle(names)
    train = torch.from_numpy(np.isin(groups, names[: len(names) // 2]))
    error = fresh_head_error(latent, target, train, args.steps)
    print(f"fresh twin-shaped head on the continuous content, held-out files: normalised error "
          f"{error:.3f} (1 = predicting no difference)")


if __name__ == "__main__":
    main()
