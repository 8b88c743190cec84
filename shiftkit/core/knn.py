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
    # float32 in place: one copy of the training set and one test chunk at a time, so memory stays near the
    # embeddings themselves at any number of tiles (float64 copies cost ~7x the embeddings)
    tr = np.array(as_numpy(train), dtype=np.float32)
    mu = tr.mean(0, keepdims=True, dtype=np.float64).astype(np.float32)
    tr -= mu
    tr /= np.maximum(np.linalg.norm(tr, axis=1, keepdims=True), 1e-12)
    test = as_numpy(test)
    y = as_numpy(train_labels)
    classes, yi = np.unique(y, return_inverse=True)
    out = np.empty(test.shape[0], dtype=classes.dtype)
    # similarity block <= 8 MB: -sim, the group mask and argpartition's int64 indices add ~4x it, so the
    # temporaries stay near 40 MB whatever the number of tiles
    chunk = max(1, min(int(chunk), (8 << 20) // (4 * max(1, tr.shape[0]))))
    for s in range(0, test.shape[0], chunk):
        te = np.array(test[s : s + chunk], dtype=np.float32)
        te -= mu
        te /= np.maximum(np.linalg.norm(te, axis=1, keepdims=True), 1e-12)
        sim = te @ tr.T
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
