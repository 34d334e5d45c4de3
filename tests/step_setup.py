"""The tiny paired training setup the step tests share: a config, its parts, a batch of
two-channel items, initialised codebooks, and one measured step of the contrastive recipe."""
from __future__ import annotations

import copy

import torch

from conftest import make_config
from training.configuration import prepare_config
from training.parts import build_parts
from training.runtime import Runtime
from training.step import train_step

BATCH, VIEWS = 2, 2
SEED_RECIPE = ["pairwise=seed",
               # the design document's (config_paired_nq2: contrastive, split)
               "model.content_share=0"]


def tiny_setup(overrides: list[str] | None = None, runtime: Runtime | None = None):
    cfg = prepare_config(make_config("config_paired_nq2",
                                     ["datasets.data_root=unused", *(overrides or [])]))
    runtime = runtime or Runtime(torch.device("cpu"))
    torch.manual_seed(0)
    parts = build_parts(cfg, runtime, steps_per_epoch=10)
    parts.raw_model.quantizer.float()  # float32 in any case (float64 tests: the rest in float64)
    return cfg, runtime, parts


def make_batch(cfg, seed: int = 0, views: int = VIEWS) -> tuple[torch.Tensor, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    wavs = 0.1 * torch.randn(BATCH, views, 1, cfg.datasets.tensor_cut, generator=gen)
    metas = [{"path": "x.wav", "class": "Beach", "channels": [views * i + v for v in range(views)],
              "start": 0} for i in range(BATCH)]
    return wavs.to(torch.get_default_dtype()), metas


def init_codebooks(parts, wavs) -> None:
    """One training forward: k-means initialises the codebooks (not part of the step under test)."""
    with torch.no_grad():
        parts.raw_model.train()(wavs.flatten(0, 1))


# The contrastive terms from the first step, each view coding its own codebook 1 (no shared
# content code, no consensus) with cross-reconstruction on, so that each term can be written
# out on its own; the tests of the default's shared code and consensus switch them back on.
CONTRASTIVE = ["pairwise=contrastive", "pairwise.start_step=0", "pairwise.schedule=constant",
               "pairwise.cue_weight=0", "model.kmeans_buffer=0",
               "pairwise.shared_content_code=false", "pairwise.consensus_weight=0",
               "pairwise.xrec_weight=1.0", "pairwise.ild_head.enabled=false"]


def level_pair(cfg, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """Two channels of each segment that differ by 6 dB (and a little noise)."""
    wavs, metas = make_batch(cfg, seed)
    wavs[:, 1] = 0.5 * wavs[:, 0] + 0.01 * torch.randn_like(wavs[:, 0])
    return wavs, metas


def measured_step(overrides: list[str]):
    """One step of the contrastive recipe with `overrides` on `level_pair` (codebooks
    initialised, no adversarial terms, gradient ratios measured). Returns the config, the
    parts after the step, a copy of the model before it, the flattened batch and the result."""
    cfg, runtime, parts = tiny_setup([*CONTRASTIVE, *overrides])
    wavs, metas = level_pair(cfg)
    init_codebooks(parts, wavs)
    model = copy.deepcopy(parts.raw_model)
    result = train_step(parts, runtime, wavs, metas, step=3, adversarial=False, update_disc=False,
                        grad_clip=0.0, bins=cfg.model.bins, measure_gradients=True)
    return cfg, parts, model, wavs.flatten(0, 1), result


def per_view_of(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(BATCH, VIEWS).mean(0)
