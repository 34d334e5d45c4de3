"""The view axis of a training batch.

The V channel views of B segments go through the generator as ONE batch of B*V rows,
view-major inside an item: row `b * V + v` is view v of item b. These are the only two
reshapes between that batch and `[B, V, ...]`; everything else indexes through them.
"""
from __future__ import annotations

import typing as tp

import torch


def flatten_views(batch: torch.Tensor) -> torch.Tensor:
    """`[B, V, ...] -> [B*V, ...]` (row b*V + v)."""
    return batch.flatten(0, 1)


def unflatten_views(rows: torch.Tensor, views: int) -> torch.Tensor:
    """`[B*V, ...] -> [B, V, ...]`, the inverse of `flatten_views`."""
    if rows.shape[0] % views:
        raise ValueError(f"a batch of {rows.shape[0]} rows is not a multiple of {views} views "
                         "(datasets.views)")
    return rows.unflatten(0, (-1, views))


def per_view_means(items: dict[str, torch.Tensor], views: int) -> dict[str, torch.Tensor]:
    """Per-item values `[B*V]` -> per-view means over the batch `[V]`."""
    return {name: unflatten_views(value, views).mean(0) for name, value in items.items()}


def split_views(embeddings: tp.Sequence[torch.Tensor], views: int) -> list[list[torch.Tensor]]:
    """Per-codebook embeddings of one generator pass on `[B*V, ...]` -> V views, each a list
    of per-codebook `[B, D, F]`."""
    per_codebook = [unflatten_views(emb, views) for emb in embeddings]
    return [[emb[:, v] for emb in per_codebook] for v in range(views)]
