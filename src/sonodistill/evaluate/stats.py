"""Uncertainty of evaluation results: bootstrap intervals over test images and paired tests.

A table cell pools the runs of one (task, protocol, encoder, label fraction): several seeds
and, with cross-validation, several folds. From the runs' per-image scores:
- segmentation: each image's score is its mean over the runs that tested it; the interval is a
  95% percentile bootstrap of the mean over images (scipy.stats.bootstrap, 2,000 resamples,
  seeded); images left out by the `ignore` empty rule (NaN) are dropped;
- classification: images are resampled jointly for every seed and the metric (accuracy,
  macro-F1) is averaged over seeds inside each resample.
A paired comparison of two encoders uses the images both were tested on: Wilcoxon's
signed-rank test on per-image scores (Dice; for classification, the share of seeds that got
the image right) and a paired bootstrap interval of the metric difference.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

RESAMPLES = 2000
LEVEL = 0.95


def _onehot_counts(labels: np.ndarray, preds: np.ndarray, idx: np.ndarray, k: int):
    """True positives, predicted and actual counts per class for resampled index rows."""
    lab = labels[idx]  # (..., n)
    pre = preds[idx]
    classes = np.arange(k)
    tp = ((lab[..., None] == classes) & (pre[..., None] == classes)).sum(-2)
    npred = (pre[..., None] == classes).sum(-2)
    nlab = (lab[..., None] == classes).sum(-2)
    return tp, npred, nlab


def cls_metric(labels: np.ndarray, preds: np.ndarray, idx: np.ndarray, metric: str, k: int):
    """Accuracy or macro-F1 (every class counted, F1 = 0 where undefined) of predictions on
    resampled image indices idx (..., n), vectorised over the leading axes."""
    if metric == "acc":
        return (labels[idx] == preds[idx]).mean(-1)
    tp, npred, nlab = _onehot_counts(labels, preds, idx, k)
    denom = npred + nlab
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.mean(-1)


def _bootstrap(n: int, statistic, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of statistic(resampled indices (B, n)) over image indices."""
    if n < 2:
        return float("nan"), float("nan")
    res = stats.bootstrap(
        (np.arange(n),),
        lambda idx, axis=-1: statistic(np.moveaxis(idx, axis, -1)),
        vectorized=True,
        n_resamples=RESAMPLES,
        confidence_level=LEVEL,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def per_image_means(runs: list[dict], metric: str) -> dict[str, float]:
    """{image id: mean score over the runs that tested it} (segmentation metrics)."""
    sums: dict[str, list[float]] = {}
    for r in runs:
        pi = r.get("per_image") or {}
        for i, v in zip(pi.get("id", []), pi.get(metric, []), strict=True):
            if v is not None and not np.isnan(v):
                sums.setdefault(i, []).append(float(v))
    return {i: float(np.mean(v)) for i, v in sums.items()}


def seed_predictions(runs: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Classification: (ids, labels (n,), predictions (seeds, n)) over the images every seed
    tested (cross-validation folds of one seed are joined)."""
    by_seed: dict[int, dict[str, int]] = {}
    labels: dict[str, int] = {}
    for r in runs:
        pi = r.get("per_image") or {}
        seed_preds = by_seed.setdefault(int(r.get("seed", 0)), {})
        for i, y, p in zip(pi.get("id", []), pi.get("label", []), pi.get("pred", []), strict=True):
            seed_preds[i] = int(p)
            labels[i] = int(y)
    if not by_seed:
        return [], np.zeros(0, int), np.zeros((0, 0), int)
    ids = sorted(set.intersection(*(set(p) for p in by_seed.values())))
    preds = np.array([[p[i] for i in ids] for p in by_seed.values()], dtype=int)
    return ids, np.array([labels[i] for i in ids], dtype=int), preds


def interval(runs: list[dict], metric: str, num_classes: int | None = None) -> dict:
    """95% bootstrap interval over test images of a cell's metric, and the image count."""
    if metric in ("dice", "iou"):
        scores = np.array(list(per_image_means(runs, metric).values()))
        lo, hi = _bootstrap(len(scores), lambda idx: scores[idx].mean(-1))
        return {"low": lo, "high": hi, "images": len(scores)}
    ids, labels, preds = seed_predictions(runs)
    if not ids:
        return {"low": float("nan"), "high": float("nan"), "images": 0}
    k = num_classes or int(max(labels.max(), preds.max()) + 1)

    def statistic(idx):
        return np.mean([cls_metric(labels, p, idx, metric, k) for p in preds], axis=0)

    lo, hi = _bootstrap(len(ids), statistic)
    return {"low": lo, "high": hi, "images": len(ids)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error) of a list of p-values."""
    p = np.asarray(pvalues, float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(p) - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted.tolist()


def paired(
    ref_runs: list[dict],
    runs: list[dict],
    metric: str,
    num_classes: int | None = None,
    alternative: str = "two-sided",
):
    """Encoder vs reference on their common test images: mean difference, its 95% paired
    bootstrap interval, Wilcoxon signed-rank p (two-sided, or `greater`: the encoder better)
    and the image count."""
    if metric in ("dice", "iou"):
        a, b = per_image_means(runs, metric), per_image_means(ref_runs, metric)
        ids = sorted(set(a) & set(b))
        x, y = np.array([a[i] for i in ids]), np.array([b[i] for i in ids])
        diff = x - y
        lo, hi = _bootstrap(len(ids), lambda idx: diff[idx].mean(-1))
        delta = float(diff.mean()) if len(ids) else float("nan")
        per_image_x, per_image_y = x, y
    else:
        ids_a, lab_a, pred_a = seed_predictions(runs)
        ids_b, _, pred_b = seed_predictions(ref_runs)
        common = sorted(set(ids_a) & set(ids_b))
        ia = [ids_a.index(i) for i in common]
        ib = [ids_b.index(i) for i in common]
        labels, pa, pb = lab_a[ia], pred_a[:, ia], pred_b[:, ib]
        k = num_classes or int(max(labels.max(initial=0), pa.max(initial=0), pb.max(initial=0)) + 1)

        def statistic(idx):
            mine = np.mean([cls_metric(labels, p, idx, metric, k) for p in pa], axis=0)
            ref = np.mean([cls_metric(labels, p, idx, metric, k) for p in pb], axis=0)
            return mine - ref

        ids = common
        lo, hi = _bootstrap(len(ids), statistic)
        whole = np.arange(len(ids))
        delta = float(statistic(whole)) if len(ids) else float("nan")
        per_image_x = (pa == labels).mean(0)
        per_image_y = (pb == labels).mean(0)
    p = float("nan")
    if len(ids) >= 2 and np.any(per_image_x != per_image_y):
        p = float(stats.wilcoxon(per_image_x, per_image_y, alternative=alternative).pvalue)
    return {"delta": delta, "low": lo, "high": hi, "p": p, "images": len(ids)}


ALPHA = 0.05


def no_better(runs: list[dict], trivial_runs: list[dict], metric: str, num_classes=None) -> bool:
    """A cell no better than a trivial predictor on the same images: the one-sided Wilcoxon
    signed-rank test of "better" does not reject at ALPHA, or the 95% paired bootstrap
    interval of the difference reaches 0 (a mean above the trivial one is not enough: a probe
    scoring all-foreground's Dice on most images and a little more on a few is flagged)."""
    test = paired(trivial_runs, runs, metric, num_classes, alternative="greater")
    if not test["images"]:
        return False
    rejected = not np.isnan(test["p"]) and test["p"] < ALPHA
    return not (rejected and test["low"] > 0)
