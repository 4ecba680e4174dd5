"""`sonodistill analyze`: how each encoder organises ultrasound data (paper Fig. 2), in numbers.

Reads an `embed` output folder and writes:
- `tsne.png` (or `umap.png`): one panel per model, points coloured by dataset with one shared
  colour map, and a legend panel of the top-K most frequent datasets (the rest in grey, "other");
- `metrics.{md,csv,json}`: per model, the silhouette score of the dataset labels (cosine, in the
  embedding space, and euclidean in the 2-D projection) and the k-NN dataset-ID accuracy
  (cosine k-NN, stratified k-fold with frames of one file/clip kept in one fold, so that
  near-identical video frames cannot vouch for each other); chance = the majority-class share;
- `projection.parquet`: the 2-D coordinates with the metadata, to re-plot elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from sonodistill.config import check_fields
from sonodistill.errors import UserError, unknown_name
from sonodistill.evaluate.config import ANALYZE, AnalyzeConfig
from sonodistill.evaluate.embed import load_embeddings
from sonodistill.io import atomic_path, write_parquet, write_table
from sonodistill.utils.rundir import RunDir

log = logging.getLogger(__name__)
UMAP_HINT = "UMAP needs the optional dependency: pip install 'sonodistill[umap]'"

# --- metrics ------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)  # centre first: raw CNN features share a big mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def silhouette(x: np.ndarray, labels: np.ndarray, metric: str = "cosine", seed: int = 0) -> float:
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        return float("nan")
    size = min(len(x), 5000)  # silhouette is quadratic in N
    return float(silhouette_score(x, labels, metric=metric, sample_size=size, random_state=seed))


def knn_accuracy(
    x: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int = 5, folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """Cosine k-NN dataset-ID accuracy, grouped stratified k-fold (mean, std, balanced)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.neighbors import KNeighborsClassifier

    # Each class needs a group in every fold; fewer folds when a dataset has few files.
    per_class = pd.Series(groups).groupby(labels).nunique()
    n_splits = int(min(folds, per_class.min()))
    if n_splits < 2 or len(per_class) < 2:
        return {"knn_acc": float("nan"), "knn_acc_std": float("nan"), "knn_bal_acc": float("nan")}
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    accs, bals = [], []
    for train, test in cv.split(x, labels, groups):
        clf = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine")
        pred = clf.fit(x[train], labels[train]).predict(x[test])
        accs.append(accuracy_score(labels[test], pred))
        bals.append(balanced_accuracy_score(labels[test], pred))
    return {
        "knn_acc": float(np.mean(accs)),
        "knn_acc_std": float(np.std(accs)),
        "knn_bal_acc": float(np.mean(bals)),
    }


# --- projection ---------------------------------------------------------------------------------


def project(
    x: np.ndarray, method: str, perplexity: float, pca_dim: int, seed: int, iters: int = 1000
) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = _unit(x)
    if x.shape[1] > pca_dim and len(x) > pca_dim:
        x = PCA(n_components=pca_dim, random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap
        except ImportError as err:
            raise ImportError(UMAP_HINT) from err
        n = min(15, len(x) - 1)
        return umap.UMAP(n_neighbors=n, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, max(2.0, (len(x) - 1) / 3))  # t-SNE needs N > 3 perplexity
    tsne = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=iters
    )
    return tsne.fit_transform(x)


def colour_map(labels: pd.Series, top_k: int) -> tuple[dict[str, tuple], list[str]]:
    """One colour per top-K dataset (by frequency), shared by every panel; others grey."""
    import matplotlib

    order = labels.value_counts().index.tolist()
    top = order[:top_k]
    cmap = matplotlib.colormaps["tab10" if len(top) <= 10 else "tab20"]
    colours = {name: cmap(i % cmap.N) for i, name in enumerate(top)}
    for name in order[top_k:]:
        colours[name] = (0.7, 0.7, 0.7, 1.0)
    return colours, top


def plot_panels(proj: pd.DataFrame, models: list[str], cfg: AnalyzeConfig, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours, top = colour_map(proj[cfg.color_by], cfg.top_k)
    n = len(models)
    fig, axes = plt.subplots(
        1,
        n + 1,
        figsize=(3.6 * n + 2.2, 3.8),
        squeeze=False,
        gridspec_kw={"width_ratios": [1.0] * n + [0.55]},
    )
    c = proj[cfg.color_by].map(colours).tolist()
    for ax, model in zip(axes[0][:n], models, strict=True):
        ax.scatter(proj[f"{model}_x"], proj[f"{model}_y"], c=c, s=6, alpha=0.8, linewidths=0)
        ax.set_title(model, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    legend = axes[0][n]
    legend.axis("off")
    handles = [Line2D([], [], marker="o", ls="", color=colours[name], label=name) for name in top]
    if len(colours) > len(top):
        handles.append(Line2D([], [], marker="o", ls="", color=(0.7, 0.7, 0.7), label="other"))
    legend.legend(handles=handles, loc="center left", frameon=False, title=cfg.color_by)
    title = {"tsne": "t-SNE", "umap": "UMAP"}[cfg.method]
    fig.suptitle(f"{title} of embeddings, coloured by {cfg.color_by}", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150)
    plt.close(fig)
    return path


def analyze(cfg: AnalyzeConfig) -> Path:
    """Projection figure and metrics table for every model; returns the output folder."""
    from threadpoolctl import threadpool_limits

    check_fields(cfg)
    if cfg.method == "umap" and importlib.util.find_spec("umap") is None:
        raise UserError(f"--method umap: {UMAP_HINT}")
    # OpenMP/BLAS pools spin-wait: on a shared CPU, oversubscription costs 10-50x on t-SNE.
    with threadpool_limits(limits=cfg.threads):
        return _analyze(cfg)


def _analyze(cfg: AnalyzeConfig) -> Path:
    meta, arrays = load_embeddings(cfg.embeddings)
    models = cfg.models or [k for k in arrays if not k.endswith(".cls")]
    for model in models:  # checked before anything is written
        if model not in arrays:
            raise unknown_name("model (no embeddings of it)", model, arrays, "--models")
    if cfg.color_by not in meta.columns:
        raise unknown_name("metadata column", cfg.color_by, meta.columns, "--color_by")
    run = RunDir(cfg.out or Path(cfg.embeddings) / "analysis", ANALYZE, overwrite=cfg.overwrite)
    run.precheck()
    with run.claim():  # one analysis at a time writes a folder
        run.clear()
        return _analyze_into(cfg, run, meta, arrays, models)


def _analyze_into(
    cfg: AnalyzeConfig, run: RunDir, meta: pd.DataFrame, arrays: dict, models: list[str]
) -> Path:
    out = run.path
    run.save_options(cfg)
    labels = meta[cfg.color_by].astype(str).to_numpy()
    groups = meta["group"].astype(str).to_numpy() if "group" in meta else np.arange(len(meta))

    rng = np.random.default_rng(cfg.seed)
    keep = np.arange(len(meta))
    if cfg.max_points is not None and len(keep) > cfg.max_points:
        keep = np.sort(rng.choice(len(keep), cfg.max_points, replace=False))
    proj = meta.iloc[keep].reset_index(drop=True).copy()

    rows = []
    for model in models:
        x = arrays[model].astype(np.float64)
        log.info("analyze: %s %s", model, x.shape)
        xy = project(x[keep], cfg.method, cfg.perplexity, cfg.pca_dim, cfg.seed, cfg.tsne_iter)
        proj[f"{model}_x"], proj[f"{model}_y"] = xy[:, 0], xy[:, 1]
        knn = knn_accuracy(_unit(x), labels, groups, cfg.knn_k, cfg.folds, cfg.seed)
        rows.append(
            {
                "model": model,
                "n": len(x),
                "dim": x.shape[1],
                "datasets": len(np.unique(labels)),
                "silhouette": silhouette(_unit(x), labels, "cosine", cfg.seed),
                f"silhouette_{cfg.method}": silhouette(xy, labels[keep], "euclidean", cfg.seed),
                **knn,
                "chance": float(pd.Series(labels).value_counts(normalize=True).iloc[0]),
            }
        )
    write_parquet(out / "projection.parquet", proj)
    plot_panels(proj, models, cfg, out / f"{cfg.method}.png")
    write_table(rows, out / "metrics", with_json=True)
    return out
