"""Run a training entry point with one injected fault, as a subprocess of a test.

    python tests/fault_harness.py SPEC train_paired_gpu.py [hydra overrides ...]

SPEC names an event of THIS process (counted from 1) and what happens there; under
torchrun, ``SPEC@R`` injects it into rank R only (the other ranks run without a fault):

- ``none``: no fault.
- ``step:N``: SIGKILL at the N-th training forward of the generator (one per step).
- ``val:N``: SIGKILL at the N-th validation forward.
- ``save:N:F``: SIGKILL in the middle of the N-th checkpoint write, after a fraction F of
  its bytes reached the (temporary) file.
- ``renamed:N``: SIGKILL right after the N-th checkpoint was renamed into place, before
  older ones are rotated out.
- ``oserror:N:ERRNO``: the N-th checkpoint write fails with ``OSError(ERRNO)`` (a name
  such as ENOSPC) after writing half of its bytes, as a full disk does.
- ``delete-data:N``: after the N-th training forward, delete every audio file under
  ``datasets.data_root``.
- ``wandb-kill:N``: after the N-th training forward, SIGKILL wandb's service process.
- ``unreadable:N:NAME``: after the N-th training forward, audio files whose name is NAME
  cannot be opened by this process (as if gone from this node's copy of the data).

Faults hook into the model's forward and ``torch.save``, not into the engine's functions,
so that they survive a reorganisation of the training loop.
"""
from __future__ import annotations

import errno
import io
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import EncodecModel  # noqa: E402


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _data_root(argv: list[str]) -> Path:
    value = next(a.split("=", 1)[1] for a in argv if a.startswith("datasets.data_root="))
    return Path(value)


def _process_state(pid: str) -> tuple[str, str] | None:
    """(state letter, parent pid) from /proc, or None when the process is gone."""
    try:
        fields = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[1]


def _kill_wandb_service() -> int:
    """SIGKILL the wandb-core processes started by this one and wait until they are dead
    (a zombie has closed its sockets); returns how many there were."""
    me, killed = str(os.getpid()), []
    for proc in Path("/proc").glob("[0-9]*"):
        state = _process_state(proc.name)
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if state is not None and state[1] == me and b"wandb-core" in cmdline:
            os.kill(int(proc.name), signal.SIGKILL)
            killed.append(proc.name)
    for pid in killed:
        while (state := _process_state(pid)) is not None and state[0] != "Z":
            os.sched_yield()
    return len(killed)


def _hide_audio_file(name: str) -> None:
    """From now on, soundfile cannot open files called `name` in this process."""
    import soundfile

    real_open = soundfile.SoundFile

    def sound_file(file, *a, **k):
        if Path(str(file)).name == name:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(file))
        return real_open(file, *a, **k)

    soundfile.SoundFile = sound_file


def install(spec: str, argv: list[str]) -> None:
    spec, _, only_rank = spec.partition("@")
    kind, *args = spec.split(":")
    if kind == "none" or (only_rank and os.environ.get("RANK", "0") != only_rank):
        return
    n = int(args[0])
    counts = {"train": 0, "val": 0, "save": 0, "renamed": 0}

    if kind in ("step", "val", "delete-data", "wandb-kill", "unreadable"):
        real_forward = EncodecModel.forward

        def forward(self, *a, **k):
            key = "train" if self.training else "val"
            counts[key] += 1
            if counts[key] == n and (kind, key) in (("step", "train"), ("val", "val")):
                _kill()
            out = real_forward(self, *a, **k)
            if key == "train" and counts[key] == n:
                if kind == "delete-data":
                    for path in _data_root(argv).rglob("*.wav"):
                        path.unlink()
                elif kind == "wandb-kill":
                    _kill_wandb_service()
                elif kind == "unreadable":
                    _hide_audio_file(args[1])
            return out

        EncodecModel.forward = forward

    if kind in ("save", "oserror"):
        real_save = torch.save

        def save(obj, f, *a, **k):
            if isinstance(f, io.BytesIO):  # pickling tensors to send them (gather_object)
                return real_save(obj, f, *a, **k)
            counts["save"] += 1
            if counts["save"] != n:
                return real_save(obj, f, *a, **k)
            buffer = io.BytesIO()
            real_save(obj, buffer, *a, **k)
            data = buffer.getvalue()
            if kind == "save":
                f.write(data[:int(len(data) * float(args[1]))])
                f.flush()
                os.fsync(f.fileno())
                _kill()
            f.write(data[:len(data) // 2])
            code = getattr(errno, args[1])
            raise OSError(code, os.strerror(code))

        torch.save = save

    if kind == "renamed":
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            real_replace(src, dst, *a, **k)
            name = Path(src).name
            if name.endswith(".tmp") and (name.startswith(".ckpt_") or name.startswith(".best.pt")):
                counts["renamed"] += 1
                if counts["renamed"] == n:
                    _kill()

        os.replace = replace


def main() -> None:
    spec, script, *argv = sys.argv[1:]
    install(spec, argv)
    sys.argv = [str(ROOT / script), *argv]
    runpy.run_path(str(ROOT / script), run_name="__main__")


if __name__ == "__main__":
    main()
