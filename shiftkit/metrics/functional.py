"""Robustness metrics (REFERENCES B2), functional form. Inputs are numpy arrays or tensors; outputs are floats.

Embeddings are ``(N, D)``; labels, sites and slides are ``(N,)``. Distances are cosine; kNN uses centred
(training mean) and L2-normalised features. Large sets are processed in chunks of rows (bounded memory).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import numpy as np

from ..core.knn import as_numpy as _np, balanced_accuracy, knn_predict, unit_rows as _unit  # noqa: F401  (re-exported)


def cosine_consistency(clean, shifted) -> np.ndarray:
    """Per-sample ``cos(f(x_i), f(T x_i))`` (M1/M9). Mean it for the headline number. Higher is better."""
    return np.sum(_unit(clean) * _unit(shifted), axis=1)


def paired_topk_retrieval(a, b, ks: Sequence[int] = (1, 3, 5, 10), chunk: int = 2048) -> Dict[int, float]:
    """plismbench's paired top-k accuracy (M2): pool the 2N embeddings; for each ``a_i`` a hit when ``b_i`` is among
    its k nearest neighbours (cosine, itself excluded), and symmetrically for ``b_i``;
    ``acc@k = ½ [mean_i hit(a_i) + mean_i hit(b_i)]``. Higher is better."""
    a, b = _unit(a), _unit(b)
    n = a.shape[0]
    pool = np.concatenate([a, b])
    partner = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    ranks = np.empty(2 * n, np.int64)
    for s in range(0, 2 * n, chunk):
        sim = pool[s : s + chunk] @ pool.T
        rows = np.arange(sim.shape[0])
        sim[rows, s + rows] = -np.inf  # exclude self
        target = sim[rows, partner[s : s + chunk]]
        ranks[s : s + chunk] = (sim > target[:, None]).sum(1)  # number of neighbours closer than the partner
    out = {}
    for k in ks:
        hit = ranks < k
        out[int(k)] = 0.5 * (hit[:n].mean() + hit[n:].mean())
    return out


def knn_balanced_accuracy(train, train_labels, test, test_labels, k: int = 20) -> float:
    """kNN (k = 20) balanced accuracy on centred, L2-normalised features (M14's BA). Higher is better."""
    return balanced_accuracy(test_labels, knn_predict(train, train_labels, test, k))


def linear_probe(train, train_labels, seed: int = 0, max_iter: int = 2000):
    """A logistic-regression probe (scikit-learn, L2, standardised features), returned fitted."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed)).fit(_np(train), _np(train_labels))


def flip_rate(pred_clean, pred_shifted) -> float:
    """``P[pred(x) ≠ pred(T x)]`` (M13). Lower is better."""
    return float(np.mean(_np(pred_clean) != _np(pred_shifted)))


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE = ``Σ_b (n_b / n) |acc_b − conf_b|`` over equal-width confidence bins (M17). Lower is better."""
    p = _np(probs)
    conf = p.max(1)
    correct = (p.argmax(1) == _np(labels)).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def corruption_error(errors, reference_errors) -> float:
    """``CE_c = Σ_s E_{s,c}(f) / Σ_s E_{s,c}(ref)`` over severities (M11). Lower is better."""
    return float(np.sum(_np(errors)) / max(np.sum(_np(reference_errors)), 1e-12))


def relative_corruption_error(errors, clean_error, reference_errors, reference_clean_error) -> float:
    """``rCE_c = Σ_s (E_{s,c} − E_clean) / Σ_s (E^ref_{s,c} − E^ref_clean)`` (M12). Lower is better."""
    num = np.sum(_np(errors) - clean_error)
    den = np.sum(_np(reference_errors) - reference_clean_error)
    return float(num / den) if abs(den) > 1e-12 else float("nan")


def robustness_index(emb, labels, sites, slides, k: int = 20) -> float:
    """PathoROB robustness index (M4): among each sample's k nearest neighbours from *other slides*, count SO
    (same class, other site) and OS (other class, same site), cumulated over neighbour ranks 1..k;
    ``RI = ΣSO / (ΣSO + ΣOS)``. Higher is better, in [0, 1]."""
    e = _unit(_np(emb) - _np(emb).mean(0, keepdims=True))
    y, s, g = _np(labels), _np(sites), _np(slides)
    sim = e @ e.T
    sim[g[:, None] == g[None]] = -np.inf  # excludes self and same-slide neighbours
    kk = min(k, e.shape[0] - 1)
    order = np.argsort(-sim, axis=1)[:, :kk]
    valid = np.isfinite(np.take_along_axis(sim, order, 1))
    same_y = (y[order] == y[:, None]) & valid
    same_s = (s[order] == s[:, None]) & valid
    so = (same_y & ~same_s)
    os_ = (~same_y & same_s & valid)
    # cumulative over ranks 1..k, summed: rank r counts k − r + 1 times
    w = np.arange(kk, 0, -1)[None]
    tot_so, tot_os = (so * w).sum(), (os_ * w).sum()
    return float(tot_so / (tot_so + tot_os)) if tot_so + tot_os > 0 else float("nan")


def site_predictability(emb, sites, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated logistic-regression AUC of the site from embeddings (M8; one-vs-rest macro AUC for more
    than two sites). 0.5 = no site information; lower is better."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, s = _np(emb), _np(sites)
    n_min = min(np.unique(s, return_counts=True)[1])
    cv = StratifiedKFold(n_splits=max(2, min(folds, n_min)), shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    proba = cross_val_predict(model, x, s, cv=cv, method="predict_proba")
    classes = np.unique(s)
    if len(classes) == 2:
        return float(roc_auc_score(s == classes[1], proba[:, 1]))
    return float(roc_auc_score(s, proba, multi_class="ovr", average="macro"))


def bootstrap_ci(values, groups=None, stat: Callable = np.mean, n: int = 1000, alpha: float = 0.05, seed: int = 0):
    """Percentile bootstrap CI of ``stat`` over ``values``, resampling whole groups (slides) when given.

    Returns ``(estimate, low, high)``.
    """
    v = _np(values).astype(np.float64)
    rng = np.random.default_rng(seed)
    est = float(stat(v))
    if groups is None:
        idx_sets = None
        draws = [stat(v[rng.integers(0, len(v), len(v))]) for _ in range(n)]
    else:
        g = _np(groups)
        uniq = np.unique(g)
        idx_sets = [np.flatnonzero(g == u) for u in uniq]
        draws = []
        for _ in range(n):
            pick = rng.integers(0, len(uniq), len(uniq))
            draws.append(stat(v[np.concatenate([idx_sets[i] for i in pick])]))
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return est, float(lo), float(hi)
