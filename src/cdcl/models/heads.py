"""Projection heads (DINO, BYOL) and the cross-process helpers they need.

``dist_sum`` is a differentiable all-reduce (forward: sum over processes; backward: sum of the
gradients over processes), the identity without torch.distributed. With it, statistics over the
global batch (BatchNorm, Barlow cross-correlation) give N processes × B the same values and, after
DDP's gradient averaging, the same gradients as 1 process × N·B (see methods/losses.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def is_distributed() -> bool:
    """Whether a torch.distributed process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = x.detach().clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        g = grad.contiguous().clone()
        dist.all_reduce(g)
        return g


def dist_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all processes, differentiable (identity in a single process)."""
    return _AllReduceSum.apply(x) if is_distributed() else x


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor, dim: int) -> torch.Tensor:  # noqa: D102
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.detach().contiguous())
        ctx.dim, ctx.n = dim, x.shape[dim]  # type: ignore[attr-defined]
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        g = grad.contiguous().clone()
        dist.all_reduce(g)  # every process's copy of the loss contributes
        n = ctx.n  # type: ignore[attr-defined]
        return g.narrow(ctx.dim, dist.get_rank() * n, n), None  # type: ignore[attr-defined]


def dist_gather(x: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Concatenate ``x`` from all processes along ``dim`` (rank order), differentiably.

    Same convention as :func:`dist_sum` (backward sums the gradients of all processes). Returns
    ``x`` in a single process and None when the processes hold different sizes along ``dim``.
    """
    if not is_distributed():
        return x
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[dim]], dtype=torch.long))
    if len({int(t) for t in sizes}) != 1:
        return None
    return _AllGather.apply(x, dim)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are over the global batch (all processes).

    Works on CPU/gloo and GPU alike (unlike SyncBatchNorm); identical to BatchNorm1d in one
    process. Normalisation uses the biased variance, running_var the unbiased one, as torch does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (N, F) with global-batch statistics in training, running ones in eval."""
        if not self.training:
            return super().forward(x)
        n = torch.tensor(float(x.shape[0]), device=x.device)
        if is_distributed():
            dist.all_reduce(n)
        mean = dist_sum(x.sum(0)) / n
        xc = x - mean
        var = dist_sum((xc * xc).sum(0)) / n
        y = xc * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                unbiased = var.detach() * n / torch.clamp(n - 1, min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
                self.num_batches_tracked.add_(1)
        return y


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation W = g · v / ‖v‖ (rows); g frozen at 1
    when ``norm_last_layer`` (DINO's last layer)."""

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim), requires_grad=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) → (N, out)."""
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1).clamp_min(1e-12))[:, None]
        return F.linear(x, w)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """MLP D→hidden→hidden→bottleneck (GELU, optional BN), L2-normalise, weight-normed →K."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim, hidden_dim, hidden_dim]
        for a, b in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(a, b))
            if use_bn:
                layers.append(GlobalBatchNorm1d(b))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, D) → prototype logits (N, K)."""
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MLP(nn.Module):
    """BYOL projector/predictor: Linear → BN → ReLU → Linear (→ BN when ``out_bn``).

    The reference implementation's BYOL projector ends in a BN of its output (``out_bn=True``); its predictor does not.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, out_bn: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Linear(in_dim, hidden_dim),
            GlobalBatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        ]
        if out_bn:
            layers.append(GlobalBatchNorm1d(out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) → (N, out)."""
        return self.net(x)
