"""scripts/paired_study.sh runs what its header promises: each variant with its config and
recipe, the same steps and start for all, the seeds asked for, one evaluation per seed with
the variants side by side, and the table over exactly those seeds. Python is replaced by a
recorder (PYTHON=...), so nothing trains here."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RECORDER = """#!/usr/bin/env bash
echo "$*" >> "{calls}"
for a in "$@"; do
  case "$a" in checkpoint.save_folder=*) mkdir -p "${{a#*=}}"; touch "${{a#*=}}/ckpt_epoch0001_step00000001.pt";; esac
done
"""


def run_study(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    calls = tmp_path / "calls"
    recorder = tmp_path / "python"
    recorder.write_text(RECORDER.format(calls=calls))
    recorder.chmod(0o755)
    start = tmp_path / "start.pt"
    start.touch()
    full_env = {**os.environ, "PYTHON": str(recorder), "DATA_ROOT": str(tmp_path / "data"),
                "OUT": str(tmp_path / "out"), "START": str(start), **env}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "paired_study.sh")], env=full_env,
                            capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, [shlex.split(line) for line in lines]


def option(call: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in call if a.startswith(key + "=")), None)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_every_variant_and_seed_trains_from_one_start_then_each_seed_is_evaluated(tmp_path, jobs):
    result, calls = run_study(tmp_path, SEEDS="2", FIRST_SEED="7", STEPS="250", JOBS=jobs,
                              VARIANTS="mono seed paired "
                                       "head:pairwise.ild_head.enabled=true,pairwise.cue_weight=0 "
                                       "msplit:mono,model.content_share=0.25 mono_split rvq "
                                       "xrec xrec0 scc cons")
    assert result.returncode == 0, result.stderr
    trains = [c for c in calls if c[0].endswith(("train_single_gpu.py", "train_paired_gpu.py"))]
    runs = {(Path(option(c, "checkpoint.save_folder")).parent.name, option(c, "common.seed")): c
            for c in trains}
    assert set(runs) == {(v, s) for v in ("mono", "seed", "paired", "head", "msplit",
                                          "mono_split", "rvq", "xrec", "xrec0", "scc", "cons",
                                          "mono_nq1")
                         for s in ("7", "8")}
    # The equal-bitrate codec: mono, one codebook, trained so (not in the table's variants).
    assert "--config-name=config_mono_nq2" in runs["mono_nq1", "8"]
    assert "model.n_q=1" in runs["mono_nq1", "8"]
    assert runs["mono", "7"][0].endswith("train_single_gpu.py")
    assert "--config-name=config_mono_nq2" in runs["mono", "7"]
    assert {"pairwise=seed", "model.content_share=0"} <= set(runs["seed", "7"])
    assert runs["msplit", "8"][0].endswith("train_single_gpu.py")
    assert "--config-name=config_mono_nq2" in runs["msplit", "8"]
    assert "model.content_share=0.25" in runs["msplit", "8"] and "mono" not in runs["msplit", "8"]
    # The mono baseline of the paired default's architecture, and the paired recipe unsplit.
    assert "--config-name=config_mono_nq2" in runs["mono_split", "7"]
    assert "model.content_share=0.5" in runs["mono_split", "7"]
    assert "--config-name=config_paired_nq2" in runs["rvq", "7"]
    assert {"model.content_share=0", "pairwise.shared_content_code=false"} <= set(runs["rvq", "7"])
    assert not any(a.startswith("pairwise") for a in runs["paired", "7"])  # the config as it is
    assert {"pairwise.ild_head.enabled=true", "pairwise.cue_weight=0"} <= set(runs["head", "8"])
    # An earlier default (cross-reconstruction, no shared content code, no consensus, no level
    # twin), with and without cross-reconstruction; the shared content code alone; the previous
    # default (without the level twin).
    previous = {"pairwise.shared_content_code=false", "pairwise.consensus_weight=0",
                "pairwise.ild_head.enabled=false"}
    assert "--config-name=config_paired_nq2" in runs["xrec", "7"]
    assert previous | {"pairwise.xrec_weight=1"} <= set(runs["xrec", "7"])
    assert previous | {"pairwise.xrec_weight=0"} <= set(runs["xrec0", "7"])
    assert [a for a in runs["scc", "7"] if a.startswith("pairwise")] == [
        "pairwise.consensus_weight=0", "pairwise.ild_head.enabled=false"]
    assert [a for a in runs["cons", "7"] if a.startswith("pairwise")] == [
        "pairwise.ild_head.enabled=false"]
    # Equal segments per step: mono runs take twice the paired runs' items (the demo's 4).
    for (name, seed), call in runs.items():
        items = 8 if call[0].endswith("train_single_gpu.py") else 4
        assert option(call, "datasets.batch_size") == str(items), name
        assert option(call, "datasets.fixed_length") == str(100 * items), name
    # Per-epoch validation on the monitor files; the evaluation defaults to the held-out ones.
    assert {option(c, "datasets.val_files") for c in trains} == {"monitor"}
    # The same start, steps and batch for every run: 250 steps = 3 epochs of at most 100.
    assert {option(c, "model.init_from") for c in trains} == {str(tmp_path / "start.pt")}
    assert {(option(c, "common.max_epoch"), option(c, "common.max_steps_per_epoch"))
            for c in trains} == {("3", "100")}
    evals = [c for c in calls if c[0].endswith("evaluate.py")]
    assert [option(c, "out_dir") for c in evals] == [str(tmp_path / "out" / "eval" / f"seed{s}")
                                                     for s in (7, 8)]
    assert (option(evals[1], "labels")
            == "[mono,seed,paired,head,msplit,mono_split,rvq,xrec,xrec0,scc,cons]")
    assert "/head/seed8/" in option(evals[1], "checkpoints")
    assert "/mono_nq1/seed8/" in option(evals[1], "shared_content.equal_bitrate_checkpoint")
    assert "mono_nq1" not in option(evals[1], "checkpoints")
    table = [c for c in calls if c[0].endswith("study_table.py")]
    assert (table[0][1:] == [str(tmp_path / "out" / "eval" / f"seed{s}" / "metrics.json")
                             for s in (7, 8)])


def test_finished_runs_are_reused_and_train_only_skips_the_evaluation(tmp_path):
    run_study(tmp_path, SEEDS="1", VARIANTS="mono", TRAIN_ONLY="1")
    result, calls = run_study(tmp_path, SEEDS="1", VARIANTS="mono", TRAIN_ONLY="1")
    assert result.returncode == 0 and "reused" in result.stdout
    assert len(calls) == 2  # the first run's mono and mono_nq1; no evaluation either time


def test_an_unknown_variant_is_one_clear_error(tmp_path):
    result, _ = run_study(tmp_path, SEEDS="1", VARIANTS="mono stereo")
    assert result.returncode != 0
    assert "unknown variant 'stereo'" in result.stderr


def test_eval_out_keeps_an_earlier_evaluation_of_other_variants(tmp_path):
    result, calls = run_study(tmp_path, SEEDS="1", VARIANTS="mono", EVAL_OUT=str(tmp_path / "ev2"),
                              EVAL_OVERRIDES="shared_content.segments=8 instrument.bootstrap=10")
    assert result.returncode == 0, result.stderr
    evals = [c for c in calls if c[0].endswith("evaluate.py")]
    assert option(evals[0], "out_dir") == str(tmp_path / "ev2" / "seed1")
    assert option(evals[0], "shared_content.segments") == "8"      # EVAL_OVERRIDES, each one
    assert option(evals[0], "instrument.bootstrap") == "10"
    assert (tmp_path / "ev2" / "study.md").exists() and not (tmp_path / "out" / "study.md").exists()
    assert not (tmp_path / "out" / "eval").exists()


def test_equal_bitrate_0_trains_and_passes_no_one_codebook_model(tmp_path):
    result, calls = run_study(tmp_path, SEEDS="1", VARIANTS="mono", EQUAL_BITRATE="0")
    assert result.returncode == 0, result.stderr
    assert not any("model.n_q=1" in c for c in calls)
    evaluation, = [c for c in calls if c[0].endswith("evaluate.py")]
    assert option(evaluation, "shared_content.equal_bitrate_checkpoint") is None


def test_equal_bitrate_names_the_variant_whose_checkpoint_codes_at_the_shared_bitrate(tmp_path):
    result, calls = run_study(tmp_path, SEEDS="1", VARIANTS="nq3:model.n_q=3",
                              EQUAL_BITRATE="mono")
    assert result.returncode == 0, result.stderr
    trains = {Path(option(c, "checkpoint.save_folder")).parent.name: c for c in calls
              if c[0].endswith(("train_single_gpu.py", "train_paired_gpu.py"))}
    assert set(trains) == {"nq3", "mono"}           # mono trained although not in VARIANTS
    assert "model.n_q=3" in trains["nq3"] and "--config-name=config_mono_nq2" in trains["mono"]
    evaluation, = [c for c in calls if c[0].endswith("evaluate.py")]
    assert "/mono/seed1/" in option(evaluation, "shared_content.equal_bitrate_checkpoint")
    assert option(evaluation, "labels") == "[nq3]"
