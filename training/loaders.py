"""DataLoaders over the datasets, by position: the training items of an epoch from a given
batch on, and each rank's share of the validation items.

Training items are pure functions of (seed, epoch, index, rank) (see
`paired_channel_dataset.py`), so resuming mid-epoch is starting the index range later, and
every rank can use the same range.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from training.configuration import ConfigError
from paired_channel_dataset import (ChannelViewsDataset, MonoChannelDataset, PairedChannelDataset,
                                    collate_fn)


def build_train_dataset(cfg: DictConfig, rank: int) -> ChannelViewsDataset:
    """`datasets.views` channels per item (1 = mono) for the process of `rank`."""
    dataset_class = PairedChannelDataset if cfg.datasets.views >= 2 else MonoChannelDataset
    try:
        return dataset_class(cfg, "train", rank=rank)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # messages name file and setting
        raise ConfigError(str(e)) from e


def make_loader(dataset: ChannelViewsDataset, cfg: DictConfig, device: torch.device,
                indices: range) -> DataLoader:
    """A loader over `indices` of `dataset`, in order, `datasets.batch_size` items a batch.

    The loader gets its own generator so that creating it does not consume the global torch
    RNG (which would break bit-exact resume).
    """
    return DataLoader(
        dataset, batch_size=cfg.datasets.batch_size, sampler=indices,
        num_workers=cfg.datasets.num_workers, collate_fn=collate_fn,
        pin_memory=cfg.datasets.pin_memory and device.type == "cuda",
        drop_last=dataset.mode == "train",
        generator=torch.Generator().manual_seed(cfg.common.seed), persistent_workers=False)


def epoch_loader(dataset: ChannelViewsDataset, cfg: DictConfig, device: torch.device,
                 first_batch: int, steps_per_epoch: int) -> DataLoader:
    """The training batches `first_batch` .. `steps_per_epoch - 1` of the current epoch."""
    batch_size = cfg.datasets.batch_size
    return make_loader(dataset, cfg, device,
                       range(first_batch * batch_size, steps_per_epoch * batch_size))


def steps_in_epoch(dataset: ChannelViewsDataset, cfg: DictConfig, world_size: int) -> int:
    """An epoch is `datasets.fixed_length` items in all, shared by the ranks (capped by
    `common.max_steps_per_epoch` when set)."""
    steps = len(dataset) // (cfg.datasets.batch_size * world_size)
    cap = cfg.common.max_steps_per_epoch
    return min(steps, cap) if cap else steps


def rank_share(n: int, rank: int, world_size: int) -> range:
    """Contiguous block of `range(n)` for `rank`: concatenated in rank order, the blocks are
    `range(n)` again (validation results are gathered in that order)."""
    per_rank = math.ceil(n / world_size)
    return range(min(n, rank * per_rank), min(n, (rank + 1) * per_rank))
