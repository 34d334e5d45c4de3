"""Paired-channel EnCodec training (design document: README_PAIRED_TRAINING.md).

Two channels of the same segment go through the codec with shared weights; a similarity
loss pulls codebook-1 embeddings together and a diversity loss pushes codebook-2 embeddings
apart. Everything else is the mono recipe, run by the shared engine.

    python train_paired_gpu.py --config-name=config_paired_nq2 datasets.data_root=DIR [key=value ...]
"""
from functools import partial

import hydra
from omegaconf import DictConfig

from training.command_line import check_command_line
from training.configuration import check_training

CONFIG_NAME = "config_paired_nq2"


@hydra.main(config_path="config", config_name=CONFIG_NAME, version_base="1.3")
def main(cfg: DictConfig) -> None:
    # here, not above: a command-line mistake is reported without loading it
    from training import engine

    engine.train_from_command_line(cfg, paired=True)


if __name__ == "__main__":
    # Mistakes on the command line are one line here, before Hydra or any model.
    check_command_line(CONFIG_NAME, check=partial(check_training, paired=True))
    main()
