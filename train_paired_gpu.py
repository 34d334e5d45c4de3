"""Paired-channel EnCodec training (design document: README_PAIRED_TRAINING.md).

Two channels of the same segment go through the codec with shared weights; a similarity
loss pulls codebook-1 embeddings together and a diversity loss pushes codebook-2 embeddings
apart. Everything else is the mono recipe, run by the shared engine.

    python train_paired_gpu.py --config-name=config_paired_nq2 datasets.data_root=DIR [key=value ...]
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import checkpoints as ckpt_io
import engine
from configuration import ConfigError
from paired_channel_dataset import TooManyReadFailures


@hydra.main(config_path="config", config_name="config_paired_nq2", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.datasets.views < 2:
        sys.exit("config error: train_paired_gpu.py needs datasets.views >= 2 "
                 "(use train_single_gpu.py for mono training).")
    try:
        engine.train(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (ckpt_io.CheckpointError, TooManyReadFailures, engine.TrainingDiverged) as e:
        sys.exit(f"error: {e}")  # a failed save, no loadable checkpoint, data gone: non-zero exit


if __name__ == "__main__":
    main()
