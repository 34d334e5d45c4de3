"""Checkpoint files: atomic writes, safe loading, resume selection, rotation, RNG capture.

A checkpoint is a plain dict of tensors and Python built-ins (the config as a plain dict),
so every loader can use ``torch.load(..., weights_only=True)``: a shared checkpoint cannot
run code.

What a preempted, killed or requeued job can rely on:

- A checkpoint is written to a hidden temporary file beside its final name, fsynced and
  renamed over it, so a crash or SIGKILL mid-save never leaves a partial ``ckpt_*.pt`` and
  never destroys the previous one. Temporaries left by a killed save are removed at the
  next start (``prepare_save_folder``).
- A save that fails (no space, no permission, I/O error) removes its temporary and raises
  ``CheckpointSaveError``, one line naming the folder, the space needed and the space free.
- Resuming (``load_newest_good``) takes the newest checkpoint that loads and is complete,
  names every skipped one with the reason in one warning, and raises ``CheckpointError``
  only when none loads.
- Rotation (``prune_checkpoints``) never deletes the checkpoint that was just written.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

CHECKPOINT_GLOB = "ckpt_*.pt"
BEST_NAME = "best.pt"
_STEP_RE = re.compile(r"ckpt_epoch(\d+)_step(\d+)\.pt$")
# What the engine needs to continue a run; a file without one of them cannot be resumed from.
RESUME_KEYS = ("model", "config", "opt_g", "scaler_g", "scaler_d", "rng",
               "epoch", "batch", "step")
# Temporaries of atomic_save: `.<final name>.<random>.tmp` beside the final file.
_TEMP_GLOBS = (".ckpt_*.pt.*.tmp", f".{BEST_NAME}.*.tmp")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message says which and what to do."""


class CheckpointSaveError(CheckpointError):
    """A save failed cleanly: no partial file was left and older checkpoints are intact."""


class SaveFolderError(CheckpointError):
    """``checkpoint.save_folder`` cannot hold checkpoints (a configuration mistake)."""


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt_epoch{epoch:04d}_step{step:08d}.pt"


def _mb(n: float | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:.1f} MB"


def free_bytes(folder: str | Path) -> int | None:
    """Bytes available to this user in ``folder`` (its nearest existing parent), or None."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def state_bytes(obj: Any) -> int:
    """Bytes of tensor data in a (nested) checkpoint dict: about its size on disk."""
    seen: set[int] = set()

    def walk(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            key = storage.data_ptr() if storage.data_ptr() else id(storage)
            if key in seen:  # shared storages are written once
                return 0
            seen.add(key)
            return storage.nbytes()
        if isinstance(x, Mapping):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    return walk(obj)


# ------------------------------------------------------------------------------ writing


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: torch's zip writer turns a failed write into a RuntimeError
    ("unexpected pos ...") whose context is the real ``OSError(ENOSPC)``."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _is_write_failure(e: BaseException) -> bool:
    """A failure of the file system, not a bug such as an unpicklable object."""
    text = str(e)
    return _os_error(e) is not None or (isinstance(e, RuntimeError) and any(
        s in text for s in ("PytorchStreamWriter", "unexpected pos", "inline_container")))


def _save_error(path: Path, obj: Any, e: BaseException) -> CheckpointSaveError:
    """One line: what failed, where, the space needed and free, and what to do."""
    folder = path.parent
    needed, free = state_bytes(obj), free_bytes(folder)
    os_err = _os_error(e)
    code = os_err.errno if os_err is not None else None
    if (code in (errno.ENOSPC, errno.EDQUOT)
        or (code is None and free is not None and free < needed)):
        why, advice = "no space left on the device (or disk quota exceeded)", (
            f"free at least {_mb(needed)} there, or move the folder to a larger disk and "
            "point checkpoint.save_folder at it")
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "read-only file system" if code == errno.EROFS else "permission denied"
        advice = "make the folder writable, or set checkpoint.save_folder to one that is"
    else:
        detail = os_err.strerror if os_err is not None and os_err.strerror else str(e)
        why, advice = (f"I/O error ({detail.splitlines()[0] if detail else type(e).__name__})",
                       "check the file system (dmesg, quota, network mount)")
    return CheckpointSaveError(
        f"could not save checkpoint {path.name} in {folder}: {why}; a checkpoint needs about "
        f"{_mb(needed)}, {_mb(free)} free there. No partial file was left and the older "
        f"checkpoints are intact: {advice}, then rerun with checkpoint.resume=true.")


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file: mkstemp makes 0600, but a checkpoint in a
    shared group folder on a cluster should be as readable as any other file the user writes."""
    try:  # Linux reports the umask without changing it (os.umask would, process-wide)
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1]
                         for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; not every file system supports it (ignored then)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it.

    A failure leaves ``path`` as it was (absent or the previous checkpoint) and no
    temporary behind; an I/O failure (no space, no permission, I/O error) is raised as
    ``CheckpointSaveError`` naming the folder, the space needed and the space free.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            try:
                os.fchmod(f.fileno(), _default_file_mode())
            except OSError:  # some network file systems refuse it; the mode is cosmetic
                pass
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except Exception as e:
        if _is_write_failure(e):
            raise _save_error(path, obj, e) from e
        raise
    finally:
        if tmp is not None:  # also on KeyboardInterrupt: never leave a partial file
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass
    _fsync_dir(path.parent)
    return path


# ------------------------------------------------------------------------------ reading


def _load_problem(path: Path, map_location: str | torch.device,
                  required: Iterable[str]) -> tuple[dict[str, Any] | None, str | None]:
    """(checkpoint, None) or (None, why it cannot be used), without raising."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with code, unreadable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        first = "".join(c if c.isprintable() else "?" for c in first)  # one line, whatever it held
        return None, f"does not load ({type(e).__name__}: {first})"
    if not isinstance(ckpt, dict):
        return None, f"not a checkpoint of this toolkit (holds a {type(ckpt).__name__})"
    missing = [k for k in required if k not in ckpt]
    if missing:
        return None, f"not a complete training checkpoint of this toolkit (missing {missing})"
    if "model" in ckpt and not (isinstance(ckpt["model"], dict) and ckpt["model"] and all(
            isinstance(v, torch.Tensor) for v in ckpt["model"].values())):
        return None, "not a checkpoint of this toolkit ('model' is not a state dict of tensors)"
    return ckpt, None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    required: Iterable[str] = ("model", "config")) -> dict[str, Any]:
    """Load a checkpoint without executing code (``weights_only=True``), with a clear error.

    ``required``: keys that must be present (``RESUME_KEYS`` to continue training).
    Raises ``FileNotFoundError`` for a missing file, ``CheckpointError`` for one that does
    not load (truncated, empty, not a torch file, a pickle with code) or is incomplete.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt, problem = _load_problem(path, map_location, required)
    if problem is not None:
        raise CheckpointError(
            f"could not load checkpoint {path}: {problem}. It may be truncated or not a "
            "checkpoint written by this toolkit (only tensors and plain Python types are "
            "accepted).")
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


def resume_candidates(folder: str | Path) -> list[Path]:
    """Checkpoints to resume from, in order: the rotating ones newest first, then ``best.pt``
    as the last resort (it holds the state of the end of some epoch, usually older)."""
    folder = Path(folder)
    best = folder / BEST_NAME
    return list_checkpoints(folder)[::-1] + ([best] if best.is_file() else [])


def load_newest_good(folder: str | Path, map_location: str | torch.device = "cpu",
                     required: Iterable[str] = RESUME_KEYS) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that loads and is complete, as (path, checkpoint).

    Damaged ones (truncated, empty, foreign, incomplete) are skipped and named, with the
    reason, in one warning. None when the folder holds no checkpoint; ``CheckpointError``
    when it holds some and none loads.
    """
    required = tuple(required)
    skipped: list[str] = []
    candidates = resume_candidates(folder)
    for path in candidates:
        ckpt, problem = _load_problem(path, map_location, required)
        if problem is None:
            if skipped:
                warnings.warn(f"resume: skipped {len(skipped)} damaged checkpoint(s) in {folder}: "
                              f"{'; '.join(skipped)}. Resuming from {path.name}.", stacklevel=2)
            return path, ckpt
        skipped.append(f"{path.name}: {problem}")
    if not candidates:
        return None
    raise CheckpointError(
        f"checkpoint.resume=true but none of the {len(candidates)} checkpoint(s) in {folder} "
        f"loads: {'; '.join(skipped)}. Pass checkpoint.resume_path=FILE for a good copy, or "
        "checkpoint.resume=false to start from scratch (the damaged files are left in place).")


def prune_checkpoints(folder: str | Path, keep_last: int, keep: str | Path | None = None) -> None:
    """Delete all but the ``keep_last`` newest rotating checkpoints (``best.pt`` is kept).

    ``keep`` (the checkpoint just written) is never deleted, even when files with higher
    steps are left from a run that was resumed from an earlier point.
    """
    if keep_last <= 0:
        return
    keep = Path(keep).resolve() if keep is not None else None
    for p in list_checkpoints(folder)[:-keep_last]:
        if keep is None or p.resolve() != keep:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ the save folder


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporaries left by saves that were killed mid-write; returns them.

    Only one process may write checkpoints to a folder (rank 0 of one run), so at start
    every temporary is a leftover.
    """
    removed = []
    for pattern in _TEMP_GLOBS:
        for p in Path(folder).glob(pattern):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def prepare_save_folder(folder: str | Path, expected_bytes: int | None = None,
                        is_main: bool = True) -> None:
    """Check ``checkpoint.save_folder`` before anything is built.

    Creates it, proves it writable with a probe file, and (on the main process) removes
    temporaries of killed saves and warns when it has room for fewer than two checkpoints
    (the size of the newest one there, or ``expected_bytes`` before the first). Raises
    ``SaveFolderError`` (one line naming the path and what to do) when it cannot work.
    """
    folder = Path(folder)
    where = f"checkpoint.save_folder={folder}"
    blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise SaveFolderError(f"{where}: {blocker} is a file, not a folder; choose another "
                              "checkpoint.save_folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-probe."):
            pass
    except OSError as e:
        why = e.strerror or str(e)
        raise SaveFolderError(f"{where} cannot be written ({why}): make it writable or choose "
                              "another checkpoint.save_folder.") from e
    if not is_main:
        return
    removed = remove_stale_temporaries(folder)
    if removed:
        warnings.warn(f"removed {len(removed)} unfinished checkpoint file(s) in {folder} left by "
                      f"a save that was interrupted: {', '.join(p.name for p in removed)}",
                      stacklevel=2)
    newest = latest_checkpoint(folder)
    try:
        one = newest.stat().st_size if newest is not None else None
    except OSError:
        one = None
    if one is None:
        one = expected_bytes
    free = free_bytes(folder)
    if one and free is not None and free < 2 * one:
        warnings.warn(f"{where} has {_mb(free)} free, less than two checkpoints need (about "
                      f"{_mb(one)} each): a save may fail later. Free space or choose another "
                      "folder.", stacklevel=2)


# ------------------------------------------------------------------------------ random state


def export_start_point(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the weights of a training checkpoint as a starting point for `model.init_from`:
    generator (codebooks included) and discriminator, and the training config; no optimizer,
    RNG or progress state (a third of the size). Returns `out`."""
    ckpt = load_checkpoint(checkpoint, "cpu", required=("model", "config"))
    start = {"model": ckpt["model"], "discriminator": ckpt.get("discriminator") or {},
             "config": ckpt["config"],
             "source": {"step": ckpt.get("step"), "epoch": ckpt.get("epoch")}}
    return atomic_save(start, out)


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
