"""Checkpoint files: atomic writes, safe loading, rotation, and RNG state capture.

A checkpoint is a plain dict of tensors and Python built-ins (the config as a plain dict),
so every loader can use ``torch.load(..., weights_only=True)``: a shared checkpoint cannot
run code. Files are written to a temporary name in the target folder and renamed, so a
crash mid-save never destroys the previous checkpoint.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_GLOB = "ckpt_*.pt"
_STEP_RE = re.compile(r"ckpt_epoch(\d+)_step(\d+)\.pt$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt_epoch{epoch:04d}_step{step:08d}.pt"


def atomic_save(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code (``weights_only=True``), with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, pickle with code, not a torch file
        raise RuntimeError(
            f"could not load checkpoint {path}: {e}. It may be truncated or not a checkpoint "
            "written by this toolkit (only tensors and plain Python types are accepted).") from e
    missing = [k for k in ("model", "config") if k not in ckpt]
    if missing:
        raise RuntimeError(f"{path} is not a training checkpoint of this toolkit: missing {missing}")
    return ckpt


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Rotating checkpoints in ``folder``, oldest first (by global step)."""
    found = []
    for p in Path(folder).glob(CHECKPOINT_GLOB):
        m = _STEP_RE.search(p.name)
        if m:
            found.append((int(m.group(2)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    ckpts = list_checkpoints(folder)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(folder: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest rotating checkpoints (``best.pt`` is kept)."""
    if keep_last <= 0:
        return
    for p in list_checkpoints(folder)[:-keep_last]:
        p.unlink(missing_ok=True)


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG, as tensors and plain types (weights_only-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
