"""Mono EnCodec training, the baseline: one random channel per item, no pairwise losses.

    python train_single_gpu.py --config-name=config_mono_nq2 datasets.data_root=DIR [key=value ...]
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import checkpoints as ckpt_io
import engine
from configuration import ConfigError
from paired_channel_dataset import TooManyReadFailures


@hydra.main(config_path="config", config_name="config_mono_nq2", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.datasets.views != 1:
        sys.exit("config error: train_single_gpu.py trains on one channel per item; "
                 "use train_paired_gpu.py for datasets.views >= 2.")
    try:
        engine.train(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (ckpt_io.CheckpointError, TooManyReadFailures, engine.TrainingDiverged) as e:
        sys.exit(f"error: {e}")  # a failed save, no loadable checkpoint, data gone: non-zero exit


if __name__ == "__main__":
    main()
