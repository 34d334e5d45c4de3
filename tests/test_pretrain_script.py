"""scripts/pretrain_start.sh runs the stages its header promises: the procedural stage from
scratch, and with REAL=DIR a second stage on scenes with real material, from the first
stage's result (or START); the export takes the last stage's checkpoint. Python is replaced by
a recorder (PYTHON=...), so nothing trains here."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from test_study_script import RECORDER, option

ROOT = Path(__file__).resolve().parents[1]


def run_pretrain(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    calls = tmp_path / "calls"
    recorder = tmp_path / "python"
    recorder.write_text(RECORDER.format(calls=calls))
    recorder.chmod(0o755)
    full_env = {**os.environ, "PYTHON": str(recorder), "OUT": str(tmp_path / "start.pt"), **env}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "pretrain_start.sh"),
                             str(tmp_path / "work"), "common.seed=5"],
                            env=full_env, capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, [shlex.split(line) for line in lines]


def calls_of(calls: list[list[str]], script: str) -> list[list[str]]:
    return [c for c in calls if c[0].endswith(script)]


def test_procedural_stage_alone_trains_from_scratch_and_exports_it(tmp_path):
    result, calls = run_pretrain(tmp_path, STEPS="1200")
    assert result.returncode == 0, result.stderr
    synth, = calls_of(calls, "synth_eigenscape.py")
    assert "--sources" not in synth
    train, = calls_of(calls, "train_single_gpu.py")
    assert option(train, "model.init_from") is None and "common.seed=5" in train
    assert option(train, "common.max_epoch") == "3"  # 1200 steps of 500 a epoch
    export, = [c for c in calls if c[0] == "-c"]
    assert str(tmp_path / "work" / "mono" / "ckpt_") in " ".join(export)


def test_real_stage_starts_from_the_first_and_hears_the_real_material(tmp_path):
    material = tmp_path / "material"
    material.mkdir()
    result, calls = run_pretrain(tmp_path, REAL=str(material), REAL_STEPS="700",
                                 REAL_SHARE="0.25")
    assert result.returncode == 0, result.stderr
    procedural, real = calls_of(calls, "synth_eigenscape.py")
    assert "--sources" not in procedural
    assert real[real.index("--sources") + 1] == str(material)
    assert real[real.index("--real-share") + 1] == "0.25"
    assert real[real.index("--self-noise-db") + 1:][:2] == ["-40", "0"]  # the default draw
    assert real[real.index("--bed-db") + 1:][:2] == ["-30", "0"]
    assert "--self-noise-db" not in procedural and "--bed-db" not in procedural
    first, second = calls_of(calls, "train_single_gpu.py")
    assert option(first, "model.init_from") is None
    assert option(second, "model.init_from").startswith(str(tmp_path / "work" / "mono" / "ckpt_"))
    assert option(second, "datasets.data_root") == str(tmp_path / "work" / "data_real")
    assert option(second, "common.max_epoch") == "2" and "common.seed=5" in second
    export, = [c for c in calls if c[0] == "-c"]
    assert str(tmp_path / "work" / "real" / "ckpt_") in " ".join(export)


def test_start_skips_the_first_stage(tmp_path):
    start = tmp_path / "earlier.pt"
    start.touch()
    material = tmp_path / "material"
    material.mkdir()
    result, calls = run_pretrain(tmp_path, START=str(start), REAL=str(material))
    assert result.returncode == 0, result.stderr
    train, = calls_of(calls, "train_single_gpu.py")
    assert option(train, "model.init_from") == str(start)
    assert option(train, "common.max_epoch") == "6"  # REAL_STEPS default 3000
    synth, = calls_of(calls, "synth_eigenscape.py")
    assert synth[synth.index("--real-share") + 1] == "0.5"
