"""Mono EnCodec training, the baseline: one random channel per item, no pairwise losses.

    python train_single_gpu.py --config-name=config_mono_nq2 datasets.data_root=DIR [key=value ...]
"""
from functools import partial

import hydra
from omegaconf import DictConfig

from training.command_line import check_command_line
from training.configuration import check_training

CONFIG_NAME = "config_mono_nq2"


@hydra.main(config_path="config", config_name=CONFIG_NAME, version_base="1.3")
def main(cfg: DictConfig) -> None:
    # here, not above: a command-line mistake is reported without loading it
    from training import engine

    engine.train_from_command_line(cfg, paired=False)


if __name__ == "__main__":
    # Mistakes on the command line are one line here, before Hydra or any model.
    check_command_line(CONFIG_NAME, check=partial(check_training, paired=False))
    main()
