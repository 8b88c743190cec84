"""k-nearest-neighbour prediction and balanced accuracy on embeddings: used by the metrics and by the pretraining
kNN monitor, so they live below both (DESIGN layers; re-exported by :mod:`shiftkit.metrics`)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def as_numpy(x) -> np.ndarray:
    """A numpy array of ``x`` (tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def unit_rows(x) -> np.ndarray:
    """The rows of ``x`` as float64 unit vectors (zero rows stay zero)."""
    x = as_numpy(x).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train, train_labels, test, k: int = 20, chunk: int = 2048, exclude_same: Optional[tuple] = None) -> np.ndarray:
    """Majority vote of the k nearest training samples (cosine on centred, L2-normalised features; ties → the
    smallest label). ``exclude_same=(train_groups, test_groups)`` ignores neighbours of the same group (slide)."""
    tr = as_numpy(train).astype(np.float64)
    mu = tr.mean(0, keepdims=True)
    tr, te = unit_rows(tr - mu), unit_rows(as_numpy(test).astype(np.float64) - mu)
    y = as_numpy(train_labels)
    classes, yi = np.unique(y, return_inverse=True)
    out = np.empty(te.shape[0], dtype=classes.dtype)
    # similarity block <= 32 MB: -sim and argpartition make copies of it, so the temporaries stay near 130 MB
    chunk = max(1, min(int(chunk), (32 << 20) // (8 * max(1, tr.shape[0]))))
    for s in range(0, te.shape[0], chunk):
        sim = te[s : s + chunk] @ tr.T
        if exclude_same is not None:
            g_tr, g_te = (as_numpy(g) for g in exclude_same)
            sim[g_te[s : s + chunk, None] == g_tr[None]] = -np.inf
        kk = min(k, tr.shape[0])
        nn = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        votes = np.zeros((nn.shape[0], len(classes)))
        np.add.at(votes, (np.repeat(np.arange(nn.shape[0]), kk), yi[nn].ravel()), 1)
        out[s : s + chunk] = classes[votes.argmax(1)]
    return out


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    y_true, y_pred = as_numpy(y_true), as_numpy(y_pred)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


__all__ = ["knn_predict", "balanced_accuracy", "as_numpy", "unit_rows"]
