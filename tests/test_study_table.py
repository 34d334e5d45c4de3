"""scripts/study_table.py: the study's table is the mean and sample std over seeds, each
figure beside its reference, variants in the order evaluate.py wrote them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import study_table  # noqa: E402


def seed_metrics(swap_mono: float, swap_paired: float, ild_corr: float) -> dict:
    """A metrics.json of one seed with two variants (evaluate.py's layout)."""
    def entry(swap: float) -> dict:
        return {"swap_gain": swap, "swap_gain_ci": [swap - 0.1, swap + 0.1],
                "ild_fidelity": {"correlation": ild_corr, "error_db": 1.0, "zero_error_db": 2.0,
                                 "slope": 0.5},
                "codebook_agreement": [0.4, 0.1], "chance_agreement": [0.01, 0.02],
                "ceiling_agreement": [0.9, 0.8],
                "shared_content": {"independent": {"mel_distance": 0.3, "kbps_per_channel": 1.5},
                                   "shared_content": {"mel_distance": 0.4,
                                                      "kbps_per_channel": 0.77}},
                "shared_content_all": {
                    "independent": {"ild_error_db": 0.5},
                    "independent_equal_bitrate": {"ild_error_db": 0.9},
                    "shared_content": {"ild_error_db": 0.6},
                    "shared_content_mean": {"ild_error_db": 0.55},
                    "shared_content_level": {"mel_distance": 0.16},
                    "independent_level": {"mel_distance": 0.15}}}
    return {"paired": entry(swap_paired), "mono": entry(swap_mono)}


def write_seeds(tmp_path: Path) -> list[Path]:
    paths = []
    for seed, (mono, paired, corr) in enumerate([(0.1, 0.5, 0.6), (0.3, 0.7, 0.8),
                                                  (0.2, 0.9, None)]):
        path = tmp_path / f"seed{seed}" / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps(seed_metrics(mono, paired, corr)))
        paths.append(path)
    return paths


def test_table_is_mean_and_sample_std_over_seeds_with_references(tmp_path):
    lines = study_table.table(write_seeds(tmp_path)).splitlines()
    header = next(line for line in lines if line.startswith("| metric"))
    assert header.split("|")[2:4] == [" paired ", " mono "]  # the order of the first file
    swap = next(line for line in lines if "swap gain" in line).split("|")
    assert swap[2].strip() == "0.7 ± 0.2"  # paired 0.5, 0.7, 0.9: sample std 0.2
    assert swap[3].strip() == "0.2 ± 0.1"
    # A seed without the figure (null in metrics.json) is left out, not counted as 0.
    ild = next(line for line in lines if "ILD correlation" in line).split("|")
    assert ild[2].strip() == "0.7 ± 0.14 (0.5)"  # 0.6, 0.8; its slope as the reference
    agreement = next(line for line in lines if "cb1 code agreement" in line).split("|")
    assert agreement[2].strip() == "0.4 ± 0 (0.01 / 0.9)"  # chance / ceiling beside it
    shared = next(line for line in lines if "kbps per channel" in line).split("|")
    assert shared[2].strip() == "0.77 ± 0 (1.5)"
    every = next(line for line in lines if "all capsules" in line and "ILD" in line).split("|")
    assert every[2].strip() == "0.6 ± 0 (0.5 / 0.9)"  # beside full and equal bitrate
    level = next(line for line in lines if "level side information: mel" in line).split("|")
    assert level[2].strip() == "0.16 ± 0 (0.15)"  # beside independent coding with it
    mean = next(line for line in lines if "mean-stream" in line and "ILD" in line).split("|")
    assert mean[2].strip() == "0.55 ± 0 (0.5 / 0.9)"
    assert not any("mean-stream" in line and "mel" in line for line in lines)
    assert not any("perplexity" in line for line in lines)  # rows nobody measured are left out


def test_missing_file_is_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "study_table.py"),
                             str(tmp_path / "nowhere" / "metrics.json")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "run evaluate.py first" in result.stderr
