"""LR-LoRA: Parameter-Efficient Fine-Tuning with Learnable Rank (Learnable Rank LoRA).

LoRA's update B A has rank <= r. LR-LoRA passes it through a learnable element-wise
transfer function f, so the realized rank of the update is learned per layer (§3.3):

    W = W0 + dW,   dW = scale * f(B A),   scale = alpha / r                       (Eq. 1, §3.3)
    f(x) = sum_k a_k * sinc(b_k * (x - g_k)),   sinc(t) = sin(pi t) / (pi t)       (Eq. 4, §3.2)
    b_k = softplus(beta_k),   beta_k = ln(e - 1) at init, so b_k = 1               (§3.3, §4.1)
    srank(M) = ||M||_F^2 / ||M||_2^2                                               (Eq. 5)

K = grid_size fixed grid points g_k, uniform on [-grid_range, grid_range] (K = 50 on [-3, 3]);
amplitudes a_k = 0 at init, so f = 0 and dW = 0: the wrapped layer starts as the base layer.
A is Kaiming-uniform, B zeros, as in LoRA; 2K extra scalars (a_k, beta_k) per module. At init
only the a_k get gradient (f is linear in a); once a != 0, A and B get it too (App. E).

Training merges once per step (App. C): W0 + dW is formed and the layer does one matmul.
dW is a dense out x in matrix, so f is evaluated one grid point at a time into out x in
accumulators (never an (out, in, K) tensor), and nothing out x in is kept from forward to
backward: backward recomputes B A and f, as App. C says the dense matrix is only transient.
Once a != 0, f(0) = sum_k a_k sinc(-b_k g_k) != 0: f adds a constant to every entry of dW,
an all-ones rank-one term, which is one way the stable rank moves below or above r.

This file imports only torch and can be copied alone into another project.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def transfer(M, a, b, g):
    """f(M) = sum_k a_k sinc(b_k (M - g_k)) (Eq. 4), one grid point at a time into one out x in accumulator."""
    f = torch.zeros_like(M)
    for k in range(g.shape[0]):
        f.addcmul_(torch.sinc(b[k] * (M - g[k])), a[k])  # torch.sinc is the normalized sinc, = 1 at t = 0
    return f


def _grid_point(M, G, f, fprime, a_k, b_k, g_k):
    """One grid point of backward: adds a_k sinc(t) to f and d/dM of it to fprime, returns dL/da_k and dL/db_k.

    t = b_k (M - g_k), u = pi t; sinc and its slope share one sin and one cos. A function of its own, so its
    out x in temporaries are freed on return, before the next grid point allocates its own.
    """
    u = (M - g_k).mul_(math.pi * b_k)
    # not specified by the paper: below |u| = (30 eps)^(1/4) Taylor terms replace sin(u)/u (0/0 at t = 0) and
    # (cos u - sinc)/u (cancellation); their errors, u^3/30 and eps/u, balance there (fp32 ~3e-6, fp64 ~3e-13)
    near0 = u.abs() < (30 * torch.finfo(u.dtype).eps) ** 0.25
    sinc = torch.where(near0, 1 - u * u / 6, torch.sin(u) / u)  # sinc(t)
    f.addcmul_(sinc, a_k)  # f(M) (Eq. 4), for W in dL/dx
    grad_a_k = torch.vdot(G.view(-1), sinc.view(-1))  # dL/da_k = sum G sinc(t)
    u_slope = torch.cos(u).sub_(sinc)  # u d/du (sin u / u) = cos u - sinc
    del sinc
    grad_b_k = a_k / b_k * torch.vdot(G.view(-1), u_slope.view(-1))  # dL/db_k = a_k sum G sinc'(t) (M - g_k)
    slope = torch.where(near0, u * (-1 / 3), u_slope.div_(u))  # d/du (sin u / u)
    fprime.addcmul_(slope, math.pi * a_k * b_k)  # f'(M) = sum_k a_k b_k sinc'(t) (Eq. 4)
    return grad_a_k, grad_b_k


class _MergedSincLinear(torch.autograd.Function):
    """y = x (W0 + scale f(B A))^T + bias, W0 and bias optional, with a backward that keeps a few out x in matrices alive.

    Plain autograd would save every per-k intermediate (K dense matrices) and the merged W of every layer
    until backward. Here forward saves only x and the small factors; backward recomputes M = B A and makes
    one pass over the grid, where sinc and its slope share one sin and one cos. Peak: about 9 out x in
    matrices in the adapter's dtype, whatever K (M, dL/df, f, f', ~5 loop temporaries; test_lrlora.py
    measures it). A fused kernel (torch.compile / Triton) would loop over k per element in registers: one
    read of M and G, one write of f and f', and 2K block reductions, instead of ~17 eager passes per k.
    """

    @staticmethod
    def forward(ctx, x, W0, bias, A, B, a, b, g, scale):
        W = scale * transfer(B @ A, a, b, g)  # dW = scale f(BA) (Eq. 4), in the adapter's dtype
        if W0 is not None:
            W = W0.to(W.dtype) + W  # App. C: merge once per step; the same sum, cast once, as merged()
        ctx.save_for_backward(x, W0, A, B, a, b, g)
        ctx.scale = scale
        # one backbone-shaped matmul in the activations' dtype; F.linear as nn.Linear, so dW = 0 gives base(x) bit for bit
        return F.linear(x, W.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, gy):
        x, W0, A, B, a, b, g = ctx.saved_tensors
        M = B @ A  # recomputed: an r-rank matmul is cheaper than keeping out x in per layer until backward
        G = ctx.scale * (gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1])).to(M.dtype)  # dL/df
        f, fprime = torch.zeros_like(M), torch.zeros_like(M)  # f(M) and f'(M), accumulated over the grid
        grad_a, grad_b = zip(*[_grid_point(M, G, f, fprime, a[k], b[k], g[k]) for k in range(g.shape[0])])
        grad_M = G * fprime  # dL/dM, M = B A
        grad_x = None
        if ctx.needs_input_grad[0]:
            W = ctx.scale * f if W0 is None else W0.to(f.dtype) + ctx.scale * f
            grad_x = gy @ W.to(gy.dtype)
        return grad_x, None, None, B.T @ grad_M, grad_M @ A.T, torch.stack(grad_a), torch.stack(grad_b), None, None


def stable_rank(M: torch.Tensor) -> float:
    """||M||_F^2 / ||M||_2^2 (Eq. 5): the paper's continuous, threshold-free measure of an update's rank."""
    s = torch.linalg.svdvals(M.detach().double())
    return 0.0 if s[0] == 0 else float((s * s).sum() / (s[0] * s[0]))


class LRLoRALinear(nn.Module):
    exact_merge = True  # dW is a weight-space update: merged() reproduces forward() for every input

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 grid_size: int = 50, grid_range: float = 3.0):
        super().__init__()
        if not isinstance(r, int) or r < 1 or r > min(base.in_features, base.out_features):
            raise ValueError(f"r={r!r}: the rank must be an integer in [1, {min(base.in_features, base.out_features)}]")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: must be in [0, 1)")
        if not isinstance(grid_size, int) or grid_size < 2:
            raise ValueError(f"grid_size={grid_size!r}: the number of grid points K must be an integer >= 2")
        if not 0.0 < grid_range < math.inf:
            raise ValueError(f"grid_range={grid_range!r}: the grid spans [-grid_range, grid_range], so it must be > 0")
        self.base = base.requires_grad_(False)  # W0 (and its bias) stay frozen
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        kw = dict(device=base.weight.device, dtype=torch.float32)  # float32 whatever the base dtype
        self.A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # "chosen as in LoRA" (§3.3)
        self.register_buffer("g", torch.linspace(-grid_range, grid_range, grid_size, **kw))  # fixed grid g_k (§3.3)
        self.a = nn.Parameter(torch.zeros(grid_size, **kw))  # amplitudes a_k = 0: f = 0 at init (§3.3)
        self.beta = nn.Parameter(torch.full((grid_size,), math.log(math.e - 1), **kw))  # softplus(beta_k) = 1 (§3.3)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        b = F.softplus(self.beta)  # b_k > 0 (§3.3)
        args = (self.A, self.B, self.a, b, self.g, self.scale)
        if self.dropout.p == 0 or not self.training:  # App. C: one matmul with W0 + dW
            return _MergedSincLinear.apply(x, self.base.weight, self.base.bias, *args)
        # App. C: input-side dropout on the LR-LoRA path, so the base path and the update path stay apart
        return self.base(x) + _MergedSincLinear.apply(self.dropout(x), None, None, *args)

    def delta_weight(self) -> torch.Tensor:
        # differentiable, but through K dense intermediates: use it for merging and diagnostics, not training
        return self.scale * transfer(self.B @ self.A, self.a, F.softplus(self.beta), self.g)  # Eq. 4, float32

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new nn.Linear holding W0 + dW (cast once to the base dtype); the original is untouched."""
        w0 = self.base.weight
        out = nn.Linear(w0.shape[1], w0.shape[0], bias=self.base.bias is not None, device=w0.device, dtype=w0.dtype)
        dW = self.delta_weight()
        out.weight.copy_((w0.to(dW.dtype) + dW).to(w0.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out.requires_grad_(False)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, grid_size={self.g.numel()}"
