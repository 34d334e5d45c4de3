"""Cross-validated, file-grouped probes with a shuffled-label baseline (measure/probes.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from measure import probes


def grouped_data(groups: int = 20, per_group: int = 8, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng, np.repeat(np.arange(groups), per_group), rng.normal(size=(groups * per_group, dim))


def test_separable_regression_scores_high_and_its_shuffled_baseline_does_not():
    rng, groups, x = grouped_data()
    # multi-output (e.g. per band)
    y = x @ rng.normal(size=(16, 3)) + 0.1 * rng.normal(size=(len(x), 3))
    result = probes.cross_validated_probe(torch.as_tensor(x), torch.as_tensor(y), groups,
                                          shuffles=2)
    assert result["metric"] == "r2" and result["folds"] == 5 and result["n_groups"] == 20
    assert result["mean"] > 0.95 and result["std"] < 0.05
    assert result["shuffled_mean"] < 0.05
    assert (len(result["regularization"]) == 5
            and np.array(result["shuffled_scores"]).shape == (2, 5))


def test_multi_output_r2_is_the_mean_over_outputs():
    # One band predictable, one pure noise: the probe reports their average, about 0.5.
    rng, groups, x = grouped_data()
    y = np.stack([x @ rng.normal(size=16), rng.normal(size=len(x))], axis=1)
    result = probes.cross_validated_probe(x, y, groups, shuffles=0, regularization=1.0)
    assert 0.35 < result["mean"] < 0.55


def test_separable_classification_scores_high_and_shuffled_labels_score_chance():
    rng, groups, x = grouped_data(groups=24, per_group=10)
    labels = np.argmax(x[:, :4], axis=1)                     # 4 classes, linearly separable
    names = np.array(["north", "east", "south", "west"])[labels]
    result = probes.cross_validated_probe(x, names, groups, kind="classification", shuffles=2,
                                          regularization=1.0)
    assert result["metric"] == "accuracy" and result["mean"] > 0.85
    assert 0.25 <= result["chance"] < 0.45                   # majority share of 4 balanced classes
    assert result["shuffled_mean"] <= result["chance"] + 0.05
    assert abs(result["shuffled_mean"] - 0.25) < 0.1


def test_grouped_folds_stop_a_probe_that_recognises_files_from_scoring():
    # The target is constant within a file and the features identify the file, with no
    # signal that carries to a new file: only an ungrouped split lets the probe look good.
    rng = np.random.default_rng(1)
    files, per_file = 20, 8
    groups = np.repeat(np.arange(files), per_file)
    x = rng.normal(size=(files, 64))[groups] + 0.1 * rng.normal(size=(files * per_file, 64))
    y = rng.normal(size=files)[groups]
    grouped = probes.cross_validated_probe(x, y, groups, shuffles=0)
    leaky = probes.cross_validated_probe(x, y, np.arange(len(x)), shuffles=0)
    assert grouped["mean"] < 0.1
    assert leaky["mean"] > 0.8

    classes = rng.integers(0, 4, size=files)[groups]
    grouped = probes.cross_validated_probe(x, classes, groups, kind="classification", shuffles=0,
                                           regularization=1.0)
    leaky = probes.cross_validated_probe(x, classes, np.arange(len(x)), kind="classification",
                                         shuffles=0, regularization=1.0)
    assert grouped["mean"] < grouped["chance"] + 0.1
    assert leaky["mean"] > 0.9


def test_grouped_folds_never_put_a_file_on_both_sides():
    groups = np.array([f"file{k % 7}.wav" for k in range(70)])
    splits = probes.grouped_folds(groups, folds=5, seed=3)
    assert len(splits) == 5
    assert sorted(np.concatenate([test for _, test in splits]).tolist()) == list(range(70))
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])


def test_fewer_groups_than_folds_warns_and_a_single_group_is_an_error():
    rng, _, x = grouped_data()
    y = x[:, 0]
    three = np.arange(len(x)) % 3
    with pytest.warns(UserWarning, match="only 3 groups"):
        result = probes.cross_validated_probe(x, y, three, folds=5, shuffles=0)
    assert result["folds"] == 3 and result["mean"] > 0.9
    with pytest.raises(ValueError, match="at least 2 groups"):
        probes.cross_validated_probe(x, y, np.zeros(len(x)), shuffles=0)
    with pytest.raises(ValueError, match="kind"):
        probes.cross_validated_probe(x, y, three, kind="ranking")


def test_features_that_vary_by_rounding_only_do_not_blow_up_a_probe():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(8), 6)
    target = rng.normal(size=(48, 3))
    signal = target @ rng.normal(size=(3, 4)) + 0.1 * rng.normal(size=(48, 4))
    # A collapsed codebook: one code vector, identical up to rounding within a file and a
    # rounding step apart between files.
    collapsed = 0.3 + 1e-12 * rng.normal(size=(48, 20)) + 1e-8 * rng.normal(size=(8, 20))[groups]
    result = probes.cross_validated_probe(np.hstack([signal, collapsed]), target, groups,
                                          kind="regression", regularization=1e-3, shuffles=1)
    assert result["mean"] > 0.9
    noise = probes.cross_validated_probe(collapsed, target, groups, kind="regression",
                                         regularization=1e-3, shuffles=1)
    assert min(noise["fold_scores"]) > -0.5  # no better than the mean, and no wilder
    kept = probes.RelativeVarianceFilter().fit(np.hstack([signal, collapsed])).keep_
    assert kept[:4].all() and not kept[4:].any()


def test_r2_on_labels_that_vary_only_by_rounding_is_undefined():
    # A decode with no level difference gives ILD labels that differ by float rounding only:
    # their R^2 is a ratio of rounding errors (-5e5 was seen), not a finding.
    rng, groups, x = grouped_data()
    flat = 0.3 + 1e-6 * rng.normal(size=(len(x), 2))
    raw = probes.cross_validated_probe(x, flat, groups, shuffles=1, regularization=1.0)
    assert np.isfinite(raw["mean"])                # without a resolution it reads as a score
    result = probes.cross_validated_probe(x, flat, groups, shuffles=1, regularization=1.0,
                                          resolution=1e-3)
    assert np.isnan(result["mean"]) and np.isnan(result["std"])
    assert np.isnan(result["shuffled_mean"]) and all(np.isnan(result["fold_scores"]))


def test_an_output_below_the_resolution_is_left_out_of_the_mean():
    rng, groups, x = grouped_data()
    y = np.stack([x @ rng.normal(size=16), 0.3 + 1e-6 * rng.normal(size=len(x))], axis=1)
    both = probes.cross_validated_probe(x, y, groups, shuffles=0, regularization=1.0,
                                        resolution=1e-3)
    alone = probes.cross_validated_probe(x, y[:, :1], groups, shuffles=0, regularization=1.0)
    assert both["mean"] == pytest.approx(alone["mean"]) and both["mean"] > 0.9
