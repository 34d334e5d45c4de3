"""Cross-validated linear probes on frozen embeddings, with folds grouped by source file.

A probe asks how much of a property (the inter-channel level difference, a channel index)
a linear read-out can recover from a frozen representation. It only answers that fairly
when
- no file has segments on both sides of a split: segments of one file share the scene,
  the recording and often the target, so a probe that recognises the file would look as
  if it read the property (folds are grouped by `groups`);
- everything fitted (standardisation, the regularisation strength) is fitted on the
  training folds only;
- it is read against what the same procedure scores when the features carry no
  information about the labels: labels permuted within the training folds
  (`shuffled_mean`), and for classification the majority-class share (`chance`);
- it is reported as mean +- std over folds, not one split.

The estimators are scikit-learn's: `Ridge` (multi-output) and multinomial
`LogisticRegression`, each behind a `StandardScaler` in one `Pipeline`.
"""
from __future__ import annotations

import typing as tp
import warnings

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

# Regularisation grids searched by nested, grouped CV inside each training fold. Features
# are standardised, so these are on a fixed scale: ridge alpha against a sum of squares
# over n training samples, logistic C as the inverse penalty strength.
RIDGE_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
LOGISTIC_CS = (1e-3, 1e-2, 1e-1, 1.0)
INNER_FOLDS = 3


def _to_numpy(values: tp.Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensors, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def grouped_folds(groups: tp.Any, folds: int = 5,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train / test index arrays of a K-fold split in which no group is on both sides.

    Args:
        groups (array-like): `[N]` group label of each sample (e.g. its file path).
        folds (int): requested number of folds; with fewer distinct groups, one fold per
            group is used and a warning says so.
        seed (int): seed of the assignment of groups to folds.
    Returns:
        list of `(train_idx, test_idx)` integer arrays.
    Raises:
        ValueError: fewer than 2 distinct groups (nothing to hold out), or folds < 2.
    """
    labels = _to_numpy(groups)
    if labels.ndim != 1:
        raise ValueError(f"groups must be one label per sample [N], got shape {labels.shape}")
    n_groups = len(np.unique(labels))
    if n_groups < 2:
        raise ValueError(f"grouped cross-validation needs at least 2 groups, got {n_groups}")
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    if n_groups < folds:
        warnings.warn(f"only {n_groups} groups for {folds} folds: using {n_groups} folds",
                      stacklevel=2)
        folds = n_groups
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros((len(labels), 1)), groups=labels))


class RelativeVarianceFilter(BaseEstimator, TransformerMixin):
    """Drop features whose spread over the training fold is float noise: a standard deviation
    below `ratio` times the feature's own magnitude (|mean| + std), or below `ratio` times
    the largest standard deviation of all features.

    A collapsed codebook's straight-through embeddings equal one code vector up to rounding
    (relative spread ~1e-7); standardising that to unit variance turns rounding into
    features that a probe fits and then extrapolates wildly on the test fold (an R^2 of -1e9
    was seen). What is dropped carries nothing a probe could use; it is set to zero rather
    than removed, so that a probe on nothing but noise predicts the training mean.
    """

    def __init__(self, ratio: float = 1e-5):
        self.ratio = ratio

    def fit(self, x: np.ndarray, y: tp.Any = None) -> "RelativeVarianceFilter":
        x = np.asarray(x, dtype=np.float64)
        std = x.std(axis=0)
        magnitude = np.abs(x.mean(axis=0)) + std
        largest = std.max() if std.size else 0.0
        self.keep_ = (std > self.ratio * magnitude) & (std > self.ratio * largest)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return np.where(self.keep_, np.asarray(x), 0.0)


class _ConstantClassifier:
    """Predicts the one class seen in training (LogisticRegression needs two)."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> "_ConstantClassifier":
        self.label_ = y[0]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.label_)


def _fit(kind: str, grid: tp.Sequence[float], x: np.ndarray, y: np.ndarray, groups: np.ndarray,
         seed: int):
    """The probe fitted on one training fold, its regularisation chosen without the test fold.

    With one grid value the estimator is fitted directly; with several, a grouped CV on the
    training fold (`INNER_FOLDS` folds, fewer if it has fewer groups) picks the value and the
    pipeline is refitted on the whole training fold.
    """
    if kind == "classification" and len(np.unique(y)) < 2:
        return _ConstantClassifier().fit(x, y), None
    if kind == "regression":
        pipe = Pipeline([("filter", RelativeVarianceFilter()), ("scale", StandardScaler()),
                         ("probe", Ridge())])
        name = "probe__alpha"
    else:
        pipe = Pipeline([("filter", RelativeVarianceFilter()), ("scale", StandardScaler()),
                         ("probe", LogisticRegression(max_iter=300))])
        name = "probe__C"
    inner = min(INNER_FOLDS, len(np.unique(groups)))
    if len(grid) == 1 or inner < 2:
        # One training group cannot be split: the middle of the grid, stated in the result.
        value = grid[len(grid) // 2]
        return clone(pipe).set_params(**{name: value}).fit(x, y), value
    search = GridSearchCV(pipe, {name: list(grid)},
                          cv=GroupKFold(inner, shuffle=True, random_state=seed),
                          scoring="r2" if kind == "regression" else "accuracy")
    with warnings.catch_warnings():
        # Inner folds may miss a class or hold a constant target; those grid points score
        # lower or NaN, which is the right outcome, not something to print.
        warnings.simplefilter("ignore")
        search.fit(x, y, groups=groups)
    return search, search.best_params_[name]


def _score(kind: str, model, x: np.ndarray, y: np.ndarray, resolution: float) -> float:
    prediction = model.predict(x)
    if kind == "classification":
        return float(accuracy_score(y, prediction))
    # Mean R^2 over outputs, each against the test fold's own mean: predicting the training
    # mean scores slightly below 0, a useless probe about 0 or less. An output whose test
    # labels spread by no more than `resolution` has no variance to explain: its R^2 is a
    # ratio of rounding errors (-5e5 was seen), so it is left out, and a fold with no output
    # left is undefined (NaN).
    y2, p2 = y.reshape(len(y), -1), prediction.reshape(len(y), -1)
    varied = y2.std(axis=0) > resolution
    if not varied.any():
        return float("nan")
    return float(r2_score(y2[:, varied], p2[:, varied], multioutput="uniform_average"))


def _nan_mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and population std over the defined (finite) entries; NaN when there are none."""
    defined = values[np.isfinite(values)]
    if defined.size == 0:
        return float("nan"), float("nan")
    return float(defined.mean()), float(defined.std())


def cross_validated_probe(features: tp.Any, targets: tp.Any, groups: tp.Any,
                          kind: str = "regression",
                          folds: int = 5, seed: int = 0, shuffles: int = 5,
                          regularization: float | tp.Sequence[float] | None = None,
                          resolution: float = 0.0) -> dict:
    """Linear probe of `targets` from `features`, cross-validated with folds grouped by file.

    Args:
        features (Tensor or array): `[N, D]` frozen features (e.g. time-pooled embeddings of
            one codebook for each channel of a pair, concatenated).
        targets (Tensor or array): regression: `[N]` or `[N, n_outputs]` (e.g. per-band ILD
            `[N, n_bands]`); classification: `[N]` labels of any type.
        groups (array-like): `[N]` file (or recording) of each sample: no group is ever in
            both the training and the test fold.
        kind (str): 'regression' (ridge, score R^2 averaged over outputs) or
            'classification' (multinomial logistic regression, score accuracy).
        folds (int): outer folds; fewer groups than folds -> one fold per group, with a
            warning; fewer than 2 groups -> ValueError.
        seed (int): seeds the fold assignment and the label permutations.
        shuffles (int): label permutations for the shuffled baseline (0 to skip it).
        regularization (float or sequence, optional): ridge alpha or logistic C. A single
            value is used as is; a sequence is searched by grouped CV inside each training
            fold (nested, the test fold is never used to choose it). Default: the grids
            `RIDGE_ALPHAS` / `LOGISTIC_CS`.
        resolution (float): regression only: a target output whose test-fold labels spread
            (std) by no more than this is float rounding, not a property: it is left out of
            that fold's R^2, and a fold with no output left scores NaN (undefined). Folds
            that are undefined are left out of `mean` / `std`; all undefined gives NaN.
    Returns:
        dict: `mean`, `std` (over folds, population std) of the score, `fold_scores`,
        `shuffled_mean`, `shuffled_std` (over folds x permutations: the same procedure,
        nested search included, fitted on labels permuted within each training fold and
        scored on the true test labels), `shuffled_scores` (`[shuffles][folds]`), `chance`
        (classification: the share of each test fold's most frequent class, averaged over
        folds, the best any constant guess can do; regression: 0.0, R^2 of predicting the
        test mean), `regularization` (value chosen in each fold), `metric` ('r2' or
        'accuracy'), `kind`, `folds` (number used), `n_samples`, `n_groups`.
    """
    if kind not in ("regression", "classification"):
        raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
    x = _to_numpy(features).astype(np.float64)
    y = _to_numpy(targets)
    labels = _to_numpy(groups)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    if len(y) != len(x) or len(labels) != len(x):
        raise ValueError(f"features, targets and groups differ in length: {len(x)}, {len(y)}, "
                         f"{len(labels)}")
    if kind == "regression":
        y = y.astype(np.float64)
        if y.ndim not in (1, 2):
            raise ValueError("regression targets must be [N] or [N, n_outputs], got shape "
                             f"{y.shape}")
    elif y.ndim != 1:
        raise ValueError("classification targets must be one label per sample [N], got shape "
                         f"{y.shape}")
    if regularization is None:
        grid = RIDGE_ALPHAS if kind == "regression" else LOGISTIC_CS
    else:
        grid = tuple(np.atleast_1d(np.asarray(regularization, dtype=np.float64)).tolist())

    splits = grouped_folds(labels, folds, seed)
    # Probes are hundreds of small fits: BLAS / OpenMP threads cost more in start-up and
    # contention than they save there (measured 10-20x slower on a shared 2-core machine).
    with threadpool_limits(limits=1):
        return _cross_validate(kind, grid, x, y, labels, splits, seed, shuffles, resolution)


def _cross_validate(kind: str, grid: tp.Sequence[float], x: np.ndarray, y: np.ndarray,
                    labels: np.ndarray, splits: list, seed: int, shuffles: int,
                    resolution: float) -> dict:
    rng = np.random.default_rng(seed)
    scores, chosen, chance = [], [], []
    shuffled = np.full((max(int(shuffles), 0), len(splits)), np.nan)
    for f, (train, test) in enumerate(splits):
        model, value = _fit(kind, grid, x[train], y[train], labels[train], seed)
        scores.append(_score(kind, model, x[test], y[test], resolution))
        chosen.append(float(value) if value is not None else None)
        if kind == "classification":
            chance.append(np.unique(y[test], return_counts=True)[1].max() / len(test))
        for s in range(shuffled.shape[0]):
            # Permuting within the training fold breaks the feature-label link while keeping
            # the label distribution; the test labels stay true, so this is the score of the
            # same procedure on features that carry nothing about the labels.
            permuted = y[train][rng.permutation(len(train))]
            null_model, _ = _fit(kind, grid, x[train], permuted, labels[train], seed)
            shuffled[s, f] = _score(kind, null_model, x[test], y[test], resolution)
    mean, std = _nan_mean_std(np.asarray(scores))
    shuffled_mean, shuffled_std = _nan_mean_std(shuffled)
    return {
        "mean": mean, "std": std, "fold_scores": scores,
        "shuffled_mean": shuffled_mean, "shuffled_std": shuffled_std,
        "shuffled_scores": shuffled.tolist(),
        "chance": float(np.mean(chance)) if kind == "classification" else 0.0,
        "regularization": chosen,
        "metric": "r2" if kind == "regression" else "accuracy",
        "kind": kind, "folds": len(splits), "n_samples": int(len(x)),
        "n_groups": int(len(np.unique(labels))),
    }
