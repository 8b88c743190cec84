"""Robustness metrics against scikit-learn or direct, loop-by-loop computations."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.neighbors import KNeighborsClassifier

from shiftkit import metrics as M


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    n, d = 120, 16
    y = rng.integers(0, 3, n)
    centers = rng.normal(0, 1, (3, d))
    x = centers[y] + rng.normal(0, 1.2, (n, d))
    return x, y, rng


def test_cosine_consistency_equals_sklearn(data):
    x, _, rng = data
    z = x + rng.normal(0, 0.5, x.shape)
    np.testing.assert_allclose(M.cosine_consistency(x, z), np.diag(cosine_similarity(x, z)), atol=1e-12)
    np.testing.assert_allclose(M.cosine_consistency(x, x), 1.0)


def test_paired_topk_equals_brute_force(data):
    x, _, rng = data
    a, b = x[:40], x[:40] + rng.normal(0, 1.0, (40, x.shape[1]))
    pool = np.concatenate([a, b])
    sim = cosine_similarity(pool)
    np.fill_diagonal(sim, -np.inf)
    expected = {}
    for k in (1, 3, 5, 10):
        hits = []
        for i in range(80):
            partner = i + 40 if i < 40 else i - 40
            nn = np.argsort(-sim[i])[:k]
            hits.append(partner in nn)
        expected[k] = 0.5 * (np.mean(hits[:40]) + np.mean(hits[40:]))
    assert M.paired_topk_retrieval(a, b, chunk=7) == pytest.approx(expected)
    assert M.paired_topk_retrieval(a, a)[1] == 1.0


def test_knn_equals_sklearn_on_centred_normalised_features(data):
    x, y, _ = data
    tr, te, ytr, yte = x[:80], x[80:], y[:80], y[80:]
    mu = tr.mean(0)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    ref = KNeighborsClassifier(n_neighbors=20, metric="cosine").fit(unit(tr - mu), ytr).predict(unit(te - mu))
    ours = M.knn_predict(tr, ytr, te, k=20, chunk=9)
    assert (ours == ref).mean() >= 0.97  # sklearn breaks distance ties by index order
    assert M.balanced_accuracy(yte, ours) == pytest.approx(balanced_accuracy_score(yte, ours))
    assert M.knn_balanced_accuracy(tr, ytr, te, yte) > 0.6


def test_flip_rate_ece_and_corruption_errors():
    assert M.flip_rate([0, 1, 2, 2], [0, 2, 2, 1]) == 0.5
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(3), 500)
    y = rng.integers(0, 3, 500)
    ece = 0.0  # the definition, sample by sample
    conf, pred = p.max(1), p.argmax(1)
    for b in range(15):
        idx = [i for i in range(500) if min(int(conf[i] * 15), 14) == b]
        if idx:
            ece += len(idx) / 500 * abs(np.mean([pred[i] == y[i] for i in idx]) - np.mean([conf[i] for i in idx]))
    assert M.expected_calibration_error(p, y) == pytest.approx(ece)
    assert M.corruption_error([0.2, 0.3], [0.4, 0.6]) == pytest.approx(0.5)
    assert M.relative_corruption_error([0.2, 0.3], 0.1, [0.4, 0.6], 0.2) == pytest.approx(0.3 / 0.6)


def test_robustness_index_equals_loop_definition():
    rng = np.random.default_rng(2)
    n = 60
    y, s, g = rng.integers(0, 2, n), rng.integers(0, 3, n), rng.integers(0, 12, n)
    x = rng.normal(0, 1, (n, 8)) + 1.5 * y[:, None] + 0.7 * s[:, None]
    e = x - x.mean(0)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    so = os_ = 0
    for i in range(n):
        cand = [j for j in range(n) if g[j] != g[i]]
        order = sorted(cand, key=lambda j: -e[i] @ e[j])[:10]
        for r, j in enumerate(order):
            w = 10 - r
            so += w * (y[j] == y[i] and s[j] != s[i])
            os_ += w * (y[j] != y[i] and s[j] == s[i])
    assert M.robustness_index(x, y, s, g, k=10) == pytest.approx(so / (so + os_))


def test_site_predictability_detects_site_signal():
    rng = np.random.default_rng(3)
    s = np.repeat([0, 1, 2], 40)
    noise = rng.normal(0, 1, (120, 8))
    assert abs(M.site_predictability(noise, s) - 0.5) < 0.15
    assert M.site_predictability(noise + 2.0 * np.eye(8)[s], s) > 0.95


def test_bootstrap_ci_over_groups():
    rng = np.random.default_rng(4)
    v = rng.normal(1.0, 1.0, 300)
    est, lo, hi = M.bootstrap_ci(v, n=500)
    assert lo < est < hi and lo < 1.0 < hi
    groups = np.repeat(np.arange(10), 30)
    v2 = v + groups * 0.3  # strong between-slide variation widens a slide-level CI
    _, lo_t, hi_t = M.bootstrap_ci(v2, n=500)
    _, lo_g, hi_g = M.bootstrap_ci(v2, groups=groups, n=500)
    assert hi_g - lo_g > 1.5 * (hi_t - lo_t)
