"""Where training numbers go: a log file, the console, and wandb (never fatal)."""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("encodec")

WANDB_MODES = ("online", "offline", "disabled")


def setup_logging(log_file: str | Path | None, is_main: bool = True) -> None:
    """Console + file logging for the ``encodec`` logger: everything on the main rank,
    warnings and errors on the others (each to its own `log_file`)."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    log.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)


class Tracker:
    """A thin wandb wrapper: offline fallback when online fails, no-op when disabled.

    wandb must never stop training: every call is guarded (building media too, which
    writes to wandb's temporary folder), and the first failure during the run (its folder
    unwritable or gone, its service process dead) disables wandb with one warning.
    """

    CLOSE_TIMEOUT_S = 30.0  # for finishing a run that failed mid-training

    def __init__(self, mode: str, project: str, name: str | None, directory: str | Path,
                 config: dict[str, Any], run_id: str | None = None, enabled: bool = True):
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb.mode={mode!r}: expected one of {WANDB_MODES}")
        self.run = None
        self.last_step: int | None = None  # of the last log call that went through
        self.mode = mode if enabled else "disabled"
        if self.mode == "disabled":
            return
        kwargs = dict(project=project, name=name, dir=str(directory), config=config,
                      id=run_id, resume="allow" if run_id else None)
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.run = self._init(mode, kwargs)
        except Exception as e:  # no login, no network, service down, folder not writable
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

    def _failed(self, error: Exception, step: int | None, teardown: bool = False) -> None:
        """Report the first failure during the run once, and stop using wandb. `teardown`:
        also close the connection to wandb's service (a failed finish means it is gone)."""
        run, self.run = self.run, None
        where = None
        with contextlib.suppress(Exception):  # the run object may be half broken
            where = str(Path(run.dir).parent)  # the run folder, not its files/
        warnings.warn(f"wandb failed at step {step} ({type(error).__name__}: {error}); training "
                      "continues without wandb (train.log has every logged number)"
                      + (f"; what wandb wrote so far is in {where}" if where else ""))

        def close() -> None:
            # Finish the broken run, or the next wandb.init in this process returns it.
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)
            if teardown or isinstance(error, ConnectionError):
                # Its service process died: close our end now, or wandb's exit hook retries
                # the dead connection and prints a traceback when training ends.
                with contextlib.suppress(Exception):
                    import wandb
                    wandb.teardown(exit_code=1)

        # A wedged wandb must not hold training: give it a bounded time, in the background.
        closer = threading.Thread(target=close, name="wandb-close", daemon=True)
        closer.start()
        closer.join(timeout=self.CLOSE_TIMEOUT_S)

    def _guarded(self, make: Callable[[], dict[str, Any]], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(make(), step=step)
            self.last_step = step
        except Exception as e:
            self._failed(e, step)

    def log(self, data: dict[str, Any], step: int) -> None:
        self._guarded(lambda: data, step)

    def log_audio(self, items: dict[str, np.ndarray], sample_rate: int, step: int) -> None:
        def make() -> dict[str, Any]:
            import wandb
            return {k: wandb.Audio(v, sample_rate=sample_rate) for k, v in items.items()}
        self._guarded(make, step)

    def log_images(self, items: dict[str, Any], step: int) -> None:
        def make() -> dict[str, Any]:
            import wandb
            return {k: wandb.Image(v) for k, v in items.items()}
        self._guarded(make, step)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # e.g. its service died after the last (buffered) log call
            self._failed(e, self.last_step, teardown=True)
        self.run = None

