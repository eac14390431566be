"""Loss functions against hand computations written independently with explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cdcl.methods.losses import (
    barlow_loss,
    byol_loss,
    dino_cross_entropy,
    dino_pairs,
    teacher_temperature,
    update_batch_centers,
    update_center,
)


def _softmax(row: list[float]) -> list[float]:
    mx = max(row)
    e = [math.exp(x - mx) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _ref_dino(s: np.ndarray, t: np.ndarray, c: np.ndarray, tau_s: float, tau_t: float, pairs):
    """Mean over pairs and images of the cross-entropy, divided by log K, with plain loops."""
    n_views, n, k = s.shape
    total, count = 0.0, 0
    for i, v in pairs:
        for b in range(n):
            q = _softmax([(t[i, b, j] - c[i, b, j]) / tau_t for j in range(k)])
            p = _softmax([s[v, b, j] / tau_s for j in range(k)])
            total += -sum(q[j] * math.log(p[j]) for j in range(k))
        count += 1
    return total / (count * n) / math.log(k)


def test_teacher_temperature_schedule() -> None:
    assert teacher_temperature(0) == pytest.approx(0.04)
    assert teacher_temperature(5) == pytest.approx(0.055)
    assert teacher_temperature(2.5) == pytest.approx(0.04 + 0.03 * 0.25)
    assert teacher_temperature(10) == pytest.approx(0.07)
    assert teacher_temperature(37.2) == pytest.approx(0.07)
    assert teacher_temperature(3, 0.04, 0.07, 0) == pytest.approx(0.07)


def test_pairs_lists() -> None:
    pairs = dino_pairs(8)
    assert len(pairs) == 14
    assert all(i in (0, 1) and v != i for i, v in pairs)
    assert dino_pairs(2) == [(0, 1), (1, 0)]
    # Teacher global(A)=0 with B's student views: global(B)=1 and local(B)=5,6,7; and symmetric.
    assert dino_pairs(8, only_cross_domain=True) == [
        (0, 1),
        (0, 5),
        (0, 6),
        (0, 7),
        (1, 0),
        (1, 2),
        (1, 3),
        (1, 4),
    ]
    with pytest.raises(ValueError):
        dino_pairs(3)


@pytest.mark.parametrize("n_views", [8, 2])
def test_dino_cross_entropy_matches_loops(n_views: int) -> None:
    rng = np.random.default_rng(0)
    k, n = 5, 3
    s = rng.normal(size=(n_views, n, k))
    t = rng.normal(size=(2, n, k))
    c = np.broadcast_to(rng.normal(size=(1, 1, k)), (2, n, k))
    pairs = dino_pairs(n_views)
    assert len(pairs) == (14 if n_views == 8 else 2)
    ce, q = dino_cross_entropy(
        torch.tensor(s), torch.tensor(t) - torch.tensor(c.copy()), 0.1, 0.05, pairs
    )
    assert float(ce) / math.log(k) == pytest.approx(_ref_dino(s, t, c, 0.1, 0.05, pairs), rel=1e-9)
    assert torch.allclose(q.sum(-1), torch.ones(2, n, dtype=q.dtype))


def test_update_center_single() -> None:
    rng = np.random.default_rng(1)
    c = rng.normal(size=(1, 4))
    t = rng.normal(size=(6, 4))
    expected = [0.9 * c[0, j] + 0.1 * sum(t[r, j] for r in range(6)) / 6 for j in range(4)]
    got = update_center(torch.tensor(c), torch.tensor(t), 0.9)
    assert np.allclose(got.numpy()[0], expected)


def test_update_batch_centers_rule_clamp_and_absent() -> None:
    rng = np.random.default_rng(2)
    k, m = 3, 0.9
    centers = rng.normal(size=(4, k))
    rows = rng.normal(size=(8, k))
    ids = [0, 0, 0, 1, 1, 1, 1, 1]  # batch 2 and 3 absent
    shares = [0.5, 0.05, 0.25, 0.2]  # batch 1: r = (5/8)/0.05 = 12.5 -> (1-m)r = 1.25 -> clamp 1
    got = update_batch_centers(
        torch.tensor(centers), torch.tensor(rows), torch.tensor(ids), m, torch.tensor(shares)
    ).numpy()
    for d in range(4):
        members = [r for r in range(8) if ids[r] == d]
        if not members:
            assert np.array_equal(got[d], centers[d])
            continue
        mu = [sum(rows[r, j] for r in members) / len(members) for j in range(k)]
        r_d = (len(members) / 8) / shares[d]
        step = min((1 - m) * r_d, 1.0)
        for j in range(k):
            assert got[d, j] == pytest.approx(centers[d, j] + step * (mu[j] - centers[d, j]))
    # The clamped batch lands exactly on its step mean.
    assert np.allclose(got[1], rows[3:8].mean(0))


def _ref_barlow(
    t: np.ndarray, s: np.ndarray, tau_s: float, tau_t: float, pairs, lam: float, eps: float
):
    n, k = t.shape[1], t.shape[2]

    def bn(x: np.ndarray) -> list[list[float]]:
        out = [[0.0] * k for _ in range(n)]
        for j in range(k):
            col = [x[b, j] for b in range(n)]
            mean = sum(col) / n
            var = sum((v - mean) ** 2 for v in col) / n
            for b in range(n):
                out[b][j] = (col[b] - mean) / math.sqrt(var + eps)
        return out

    losses = []
    for i, v in pairs:
        a, z = bn(t[i] / tau_t), bn(s[v] / tau_s)
        cc = [[sum(a[b][j] * z[b][kk] for b in range(n)) / n for kk in range(k)] for j in range(k)]
        on = sum((cc[j][j] - 1) ** 2 for j in range(k)) / k
        off = sum(cc[j][kk] ** 2 for j in range(k) for kk in range(k) if j != kk) / (k * (k - 1))
        losses.append((1 - lam) * on + lam * off)
    return sum(losses) / len(losses) / ((1 - lam) + 0.01 * lam)


@pytest.mark.parametrize("algo", ["einsum", "gram", "auto"])
@pytest.mark.parametrize("cross", [False, True])
def test_barlow_loss_matches_loops(cross: bool, algo: str) -> None:
    rng = np.random.default_rng(3)
    n, k, v = 6, 4, 8
    t = rng.normal(size=(2, n, k))
    s = rng.normal(size=(v, n, k))
    pairs = dino_pairs(v, cross)
    got = barlow_loss(
        torch.tensor(t), torch.tensor(s), 0.1, 0.05, pairs, lam=0.95, eps=1e-5, algo=algo
    )
    assert float(got) == pytest.approx(_ref_barlow(t, s, 0.1, 0.05, pairs, 0.95, 1e-5), rel=1e-9)


def test_barlow_gram_and_einsum_agree_with_gradients() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 5, 12, dtype=torch.float64)
    grads, vals = [], []
    for algo in ("gram", "einsum"):
        s = torch.randn(8, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        s.requires_grad_(True)
        loss = barlow_loss(t, s, 0.1, 0.07, dino_pairs(8), algo=algo)
        loss.backward()
        vals.append(float(loss.detach()))
        grads.append(s.grad)
    assert vals[0] == pytest.approx(vals[1], rel=1e-12)
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


def test_barlow_loss_is_zero_for_perfectly_correlated_whitened_views() -> None:
    # Columns orthonormal after standardisation and identical student/teacher -> C = I -> l = 0.
    n, k = 8, 4
    h = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=float)
    x = np.concatenate([h, -h])  # 8 rows, each column mean 0, variance 1, columns uncorrelated
    t = torch.tensor(np.stack([x, x]))
    s = torch.tensor(np.stack([x * 0.1] * 2))  # s/τ_s with τ_s = 0.1 gives x again
    got = barlow_loss(t * 0.04, s, 0.1, 0.04, [(0, 1), (1, 0)], lam=0.95, eps=0.0)
    assert abs(float(got)) < 1e-12
    assert n == x.shape[0] and k == x.shape[1]


def _seed_barlow(t_c: torch.Tensor, s: torch.Tensor, tau_s: float, tau_t: float, pairs) -> float:
    """The seed's formula with torch's own BatchNorm1d (no affine, batch statistics, eps 1e-5)."""
    bn = torch.nn.BatchNorm1d(t_c.shape[-1], affine=False, track_running_stats=False)
    lam, n, k = 0.95, t_c.shape[1], t_c.shape[2]
    off = ~torch.eye(k, dtype=torch.bool)
    total = 0.0
    for i, v in pairs:
        c = bn(t_c[i] / tau_t).T @ bn(s[v] / tau_s) / n
        on_d = ((torch.diagonal(c) - 1) ** 2).mean()
        total += float((1 - lam) * on_d + lam * (c[off] ** 2).mean())
    return total / len(pairs) / ((1 - lam) + 0.01 * lam)


def test_barlow_scales_teacher_by_its_temperature_on_low_variance_logits() -> None:
    # Near the uniform teacher the centred logits vary by ~0.001 per prototype: BN's eps (1e-5)
    # is then comparable to the variance unless the logits are first divided by τ_t.
    g = torch.Generator().manual_seed(5)
    n, k, tau_s, tau_t = 16, 6, 0.1, 0.04
    base = torch.randn(n, k, generator=g, dtype=torch.float64)
    t_c = torch.stack([base, base + 0.3 * torch.randn(n, k, generator=g, dtype=torch.float64)])
    t_c = 0.001 * t_c  # per-prototype std ≈ 0.001
    s = torch.stack([base + 0.2 * torch.randn(n, k, generator=g, dtype=torch.float64)] * 2)
    pairs = [(0, 1), (1, 0)]
    got = float(barlow_loss(t_c, s, tau_s, tau_t, pairs, lam=0.95, eps=1e-5))
    seed = _seed_barlow(t_c, s, tau_s, tau_t, pairs)
    assert got == pytest.approx(seed, rel=1e-9)
    assert got == pytest.approx(
        _ref_barlow(t_c.numpy(), s.numpy(), tau_s, tau_t, pairs, 0.95, 1e-5), rel=1e-9
    )
    old = _seed_barlow(t_c, s, tau_s, 1.0, pairs)  # BN(t − c): the formula before the fix
    assert abs(got - old) > 0.2 * got


def test_byol_loss_matches_loops() -> None:
    rng = np.random.default_rng(4)
    p0, p1, z0, z1 = (rng.normal(size=(5, 3)) for _ in range(4))

    def cos(a, b):
        return sum(a * b) / math.sqrt(sum(a * a) * sum(b * b))

    ref = sum((2 - 2 * cos(p0[b], z1[b])) + (2 - 2 * cos(p1[b], z0[b])) for b in range(5)) / 5
    got = byol_loss(*(torch.tensor(x) for x in (p0, p1, z0, z1)))
    assert float(got) == pytest.approx(ref, rel=1e-9)
    same = byol_loss(torch.tensor(p0), torch.tensor(p1), torch.tensor(p1), torch.tensor(p0))
    assert float(same) == pytest.approx(0.0, abs=1e-12)
