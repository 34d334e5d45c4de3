"""Where training runs: device, process group, mixed precision, seeding, and preemption.

`setup_runtime(cfg)` picks the device and joins torchrun's process group; the `Runtime` it
returns is what the rest of the training code asks about the machine (rank, autocast).
`StopFlag` turns SIGTERM / SIGUSR1 / Ctrl-C into a request to save and stop at the next
step boundary, agreed on by every rank.
"""
from __future__ import annotations

import contextlib
import logging
import random
import signal
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from utils import distributed
from training.configuration import AMP_MODES, ConfigError

log = logging.getLogger("encodec")


@dataclass
class Runtime:
    """The device this process trains on, its rank, and the autocast dtype (None = float32)."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and wandb."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to `amp_dtype` on this device (CUDA or CPU), or nothing in float32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(cfg: DictConfig) -> Runtime:
    """Pick the device (`common.device`), join the process group under torchrun (collectives
    time out after `distributed.timeout_s`), set the precision flags (`common.amp`)."""
    distributed.export_submitit_env()
    multi_process = distributed.env_world_size() > 1
    device = pick_device(str(cfg.common.device), multi_process)
    if multi_process:
        distributed.init_process_group(cfg.distributed.backend, device, cfg.distributed.timeout_s)
    amp_dtype = AMP_MODES[cfg.common.amp]
    if amp_dtype == torch.float16 and device.type != "cuda":
        # bf16 autocasts on a CPU too (so that CI runs the mixed-precision path); fp16 and
        # its GradScaler are for GPUs.
        warnings.warn("common.amp=fp16 needs CUDA; training in float32 on CPU "
                      "(common.amp=bf16 works on CPU).")
        amp_dtype = None
    return Runtime(device=device, rank=distributed.rank(), world_size=distributed.world_size(),
                   amp_dtype=amp_dtype)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_device(wanted: str, multi_process: bool) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> the device; under torchrun each process takes
    the GPU of its local rank."""
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
        if wanted == "cpu":
            warnings.warn("CUDA is not available: training on CPU (slow). "
                          "Set common.device=cpu to silence this warning.")
    if not wanted.startswith("cuda"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"common.device={wanted} but CUDA is not available; "
                          "use common.device=cpu or auto.")
    index = distributed.env_local_rank() if multi_process else (torch.device(wanted).index or 0)
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopFlag:
    """SIGTERM / SIGUSR1 (cluster preemption) / Ctrl-C: finish the step, save, exit cleanly.
    A second Ctrl-C interrupts at once. Use as a context manager around the training loop.

    The handler only takes note; `noticed` logs it at the end of the step, once the loop
    goes on: under several ranks, the SIGTERM that the launcher sends to the ranks left when
    one exits is no preemption. When the loop fails under several ranks, the stop signals
    stay ignored on leaving, so that SIGTERM cannot cut short the line saying why.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.requested: str | None = None
        self._said = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopFlag":
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                with contextlib.suppress(ValueError):  # not the main thread
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        failing_with_peers = exc_type is not None and distributed.is_distributed()
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if failing_with_peers else handler)

    def noticed(self) -> bool:
        """Whether this process was signalled; says so in the log the first time."""
        if self.requested and not self._said:
            self._said = True
            log.warning("%s received: finishing the current step, then saving a checkpoint",
                        self.requested)
        return self.requested is not None
