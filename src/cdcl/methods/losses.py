"""Pure loss and centre-update functions of DINO, CDCL and BYOL (docs/design.md §5).

Shapes: student logits ``s`` (V, N, K) for V views of N images, teacher logits ``t`` (2, N, K)
for the two global views (teacher view 0 = global(A), 1 = global(B)). View order:
global(A), global(B), n_local × local(A), n_local × local(B).

Distributed: statistics over the global batch (Barlow BN and cross-correlation, centre sums and
counts) are summed over processes with ``dist_sum`` (differentiable all-reduce). Every process
then computes the *global* Barlow loss and its local-mean DINO loss; DDP's gradient averaging
turns that into exactly the gradient of 1 process × N·B (the all-reduce backward sums each
process's copy of the global term, DDP divides by N).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cdcl.models.heads import dist_gather, dist_sum, is_distributed


def teacher_temperature(
    epoch: float, warmup_temp: float = 0.04, temp: float = 0.07, warmup_epochs: float = 10
) -> float:
    """τ_t: linear from warmup_temp at epoch 0 to temp at warmup_epochs, then constant."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return float(temp)
    frac = max(float(epoch), 0.0) / float(warmup_epochs)
    return float(warmup_temp + (temp - warmup_temp) * frac)


def dino_pairs(n_views: int, only_cross_domain: bool = False) -> list[tuple[int, int]]:
    """(teacher view, student view) pairs.

    Default: every teacher global view i ∈ {0, 1} with every student view v ≠ i (2·(V−1) pairs;
    14 with 8 views, 2 with 2). ``only_cross_domain``: teacher global(A) with B's student views
    (global(B) and local(B)) and teacher global(B) with A's (global(A) and local(A)): 2·(1+n_local)
    pairs, 8 with 8 views.
    """
    if n_views < 2 or (n_views - 2) % 2:
        raise ValueError(f"{n_views} views: expected 2 global + 2·n_local local views")
    if not only_cross_domain:
        return [(i, v) for i in (0, 1) for v in range(n_views) if v != i]
    n_local = (n_views - 2) // 2
    local_a = list(range(2, 2 + n_local))
    local_b = list(range(2 + n_local, 2 + 2 * n_local))
    return [(0, v) for v in [1, *local_b]] + [(1, v) for v in [0, *local_a]]


def _pair_index(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    ti = torch.tensor([p[0] for p in pairs], device=device)
    sv = torch.tensor([p[1] for p in pairs], device=device)
    return ti, sv


def dino_cross_entropy(
    student: torch.Tensor,
    teacher_centered: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    pairs: list[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over pairs and images of −Σ_k q_k log p_k; also returns q (2, N, K).

    q = softmax((t − c)/τ_t) (teacher, no gradient), log p = log_softmax(s/τ_s). Not divided
    by log K (callers do that, as the reference implementation does).
    """
    q = F.softmax(_full(teacher_centered.detach()) / teacher_temp, dim=-1)
    logp = F.log_softmax(_full(student) / student_temp, dim=-1)
    ti, sv = _pair_index(pairs, student.device)
    ce = -(q[ti] * logp[sv]).sum(-1)  # (P, N)
    return ce.mean(), q


def _full(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (bf16 autocast) are promoted: these sums need float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _global_count(n: int, device: torch.device) -> torch.Tensor:
    c = torch.tensor(float(n), device=device, dtype=torch.float64)
    if is_distributed():
        dist.all_reduce(c)
    return c


def batch_standardise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension standardisation over the (global) batch dim −2, no affine (BN in training)."""
    n = _global_count(x.shape[-2], x.device).to(x.dtype)
    mean = dist_sum(x.sum(-2, keepdim=True)) / n
    xc = x - mean
    var = dist_sum((xc * xc).sum(-2, keepdim=True)) / n
    return xc * torch.rsqrt(var + eps)


def barlow_loss(
    teacher_centered: torch.Tensor,
    student: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    pairs: list[tuple[int, int]],
    lam: float = 0.95,
    eps: float = 1e-5,
    algo: str = "auto",
) -> torch.Tensor:
    """CDCL's Barlow-Twins term, averaged over pairs and divided by (1−λ) + 0.01λ.

    Per pair (i, v): C = BN((t_i − c)/τ_t)ᵀ BN(s_v/τ_s) / N (global batch N),
    l = (1−λ)·mean_j (C_jj − 1)² + λ·mean_{j≠k} C_jk². The temperatures only matter through
    BN's eps, but that is the reference implementation's formula, and near the uniform teacher (per-prototype std
    ≪ 0.01) BN(t − c) would damp the teacher's low-variance dimensions instead.

    ``algo``: "einsum" forms all pairs' K×K matrices in one einsum (P·K² memory); "gram" uses
    Σ_jk C_jk² = Σ_nm (T Tᵀ)_nm (S Sᵀ)_nm / N², which costs N²K instead of NK² (same value; needs
    the features of all processes, gathered). "auto" takes "gram" when N < K.
    """
    teacher_centered, student = _full(teacher_centered.detach()), _full(student)
    # Under bf16 autocast the products would run in bf16: these sums need full precision.
    with torch.autocast(device_type=student.device.type, enabled=False):
        n = _global_count(student.shape[1], student.device).to(student.dtype)
        k = student.shape[-1]
        tn = batch_standardise(teacher_centered / teacher_temp, eps)  # (2, N, K)
        sn = batch_standardise(student / student_temp, eps)  # (V, N, K)
        ti, sv = _pair_index(pairs, student.device)
        diag = dist_sum(torch.einsum("pnk,pnk->pk", tn[ti], sn[sv])) / n  # C_jj, (P, K)
        use_gram = algo == "gram" or (algo == "auto" and float(n) < k)
        t_all = s_all = None
        if use_gram:
            t_all, s_all = dist_gather(tn, 1), dist_gather(sn, 1)
        if t_all is not None and s_all is not None:
            gt = torch.einsum("ink,imk->inm", t_all, t_all)  # (2, N, N)
            gs = torch.einsum("vnk,vmk->vnm", s_all, s_all)  # (V, N, N)
            sq = (gt[ti] * gs[sv]).sum((-2, -1)) / (n * n)  # Σ_jk C_jk², (P,)
        else:
            corr = dist_sum(torch.einsum("pnk,pnl->pkl", tn[ti], sn[sv])) / n  # (P, K, K)
            sq = (corr**2).sum((-2, -1))
        on = ((diag - 1) ** 2).mean(-1)
        off = (sq - (diag**2).sum(-1)) / max(k * (k - 1), 1)
        per_pair = (1 - lam) * on + lam * off
        return per_pair.mean() / ((1 - lam) + 0.01 * lam)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> torch.Tensor:
    """Single centre (1, K): c ← m·c + (1−m)·mean of all teacher rows (M, K) of the global step."""
    s = dist_sum(teacher.sum(0, keepdim=True).double())
    n = _global_count(teacher.shape[0], teacher.device)
    return (momentum * center.double() + (1 - momentum) * s / n).to(center.dtype)


@torch.no_grad()
def update_batch_centers(
    centers: torch.Tensor,
    teacher: torch.Tensor,
    batch_ids: torch.Tensor,
    momentum: float,
    batch_shares: torch.Tensor,
) -> torch.Tensor:
    """Per-batch centres (D, K): c_d ← c_d + min((1−m)·r_d, 1)·(μ_d − c_d) for batches present.

    μ_d = mean teacher logit of the rows (M, K) whose image is in batch d (``batch_ids`` (M,)),
    r_d = (share of d among this global step's rows) / (share of d in the training set).
    Sums and counts come from index_add and are all-reduced; absent batches stay unchanged.
    """
    d = centers.shape[0]
    sums = torch.zeros(d, teacher.shape[1], device=teacher.device, dtype=torch.float64)
    sums.index_add_(0, batch_ids, teacher.double())
    counts = torch.zeros(d, device=teacher.device, dtype=torch.float64)
    counts.index_add_(0, batch_ids, torch.ones_like(batch_ids, dtype=torch.float64))
    sums, counts = dist_sum(sums), dist_sum(counts)
    present = counts > 0
    mu = sums / counts.clamp_min(1)[:, None]
    r = (counts / counts.sum()) / batch_shares.to(counts).clamp_min(1e-12)
    step = torch.clamp((1 - momentum) * r, max=1.0) * present
    new = centers.double() + step[:, None] * (mu - centers.double())
    return new.to(centers.dtype)


def byol_loss(
    p0: torch.Tensor, p1: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor
) -> torch.Tensor:
    """Symmetric BYOL loss: mean over images of (2 − 2cos(p0, z1)) + (2 − 2cos(p1, z0)).

    p_v = online prediction of view v, z_v = target projection of view v (no gradient).
    """
    a = 2 - 2 * F.cosine_similarity(p0, z1.detach(), dim=-1)
    b = 2 - 2 * F.cosine_similarity(p1, z0.detach(), dim=-1)
    return (a + b).mean()


def log_k(k: int) -> float:
    """log K, the DINO loss of the uniform solution."""
    return math.log(k)
