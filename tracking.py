"""Where training numbers go: a log file, the console, and wandb (never fatal)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("encodec")

WANDB_MODES = ("online", "offline", "disabled")


def setup_logging(log_file: str | Path | None, is_main: bool = True) -> None:
    """Console + file logging for the ``encodec`` logger (only the main rank writes)."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    log.addHandler(console)
    if log_file is not None and is_main:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)


class Tracker:
    """A thin wandb wrapper: offline fallback when online fails, no-op when disabled.

    wandb must never stop training: every call is guarded, and a failing call disables
    further logging with one warning.
    """

    def __init__(self, mode: str, project: str, name: str | None, directory: str | Path,
                 config: dict[str, Any], run_id: str | None = None, enabled: bool = True):
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb.mode={mode!r}: expected one of {WANDB_MODES}")
        self.run = None
        self.mode = mode if enabled else "disabled"
        if self.mode == "disabled":
            return
        Path(directory).mkdir(parents=True, exist_ok=True)
        kwargs = dict(project=project, name=name, dir=str(directory), config=config,
                      id=run_id, resume="allow" if run_id else None)
        try:
            self.run = self._init(mode, kwargs)
        except Exception as e:  # no login, no network, service down
            if mode != "online":
                warnings.warn(f"wandb {mode} init failed ({e}); continuing without wandb")
                self.mode = "disabled"
                return
            warnings.warn(f"wandb online init failed ({e}); falling back to wandb offline. "
                          "Sync later with `wandb sync` from the run folder.")
            try:
                self.run = self._init("offline", kwargs)
                self.mode = "offline"
            except Exception as e2:
                warnings.warn(f"wandb offline init failed too ({e2}); continuing without wandb")
                self.mode = "disabled"

    @staticmethod
    def _init(mode: str, kwargs: dict[str, Any]):
        import wandb
        # Fail fast instead of waiting minutes for an unreachable server.
        settings = wandb.Settings(init_timeout=30, silent=True)
        return wandb.init(mode=mode, settings=settings, **kwargs)

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    @property
    def directory(self) -> str | None:
        return None if self.run is None else self.run.dir

    def log(self, data: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data, step=step)
        except Exception as e:
            warnings.warn(f"wandb log failed ({e}); disabling wandb for the rest of the run")
            self.run = None

    def log_audio(self, items: dict[str, np.ndarray], sample_rate: int, step: int) -> None:
        if self.run is None:
            return
        import wandb
        self.log({k: wandb.Audio(v, sample_rate=sample_rate) for k, v in items.items()}, step)

    def log_images(self, items: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        import wandb
        self.log({k: wandb.Image(v) for k, v in items.items()}, step)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            warnings.warn(f"wandb finish failed ({e})")
        self.run = None

