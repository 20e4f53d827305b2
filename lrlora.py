"""LR-LoRA: Parameter-Efficient Fine-Tuning with Learnable Rank (Learnable Rank LoRA).

LoRA's update B A has rank <= r. LR-LoRA passes it through a learnable element-wise
transfer function f, so the realized rank of the update is learned per layer (§3.3):

    W = W0 + dW,   dW = scale * f(B A),   scale = alpha / r                       (Eq. 1, §3.3)
    f(x) = sum_k a_k * sinc(b_k * (x - g_k)),   sinc(t) = sin(pi t) / (pi t)       (Eq. 4, §3.2)
    b_k = softplus(beta_k),   beta_k = ln(e - 1) at init, so b_k = 1               (§3.3, §4.1)
    srank(M) = ||M||_F^2 / ||M||_2^2                                               (Eq. 5)

K = grid_size fixed grid points g_k, uniform on [-grid_range, grid_range) (K = 50 on [-3, 3]);
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
        f = f + a[k] * torch.sinc(b[k] * (M - g[k]))  # torch.sinc is the normalized sinc, = 1 at t = 0
    return f


# The two passes below are written for torch.compile (inductor): a Python loop over k of element-wise ops on
# one chunk of M, which inductor unrolls into ONE kernel that reads M (and G) once, keeps the K terms in
# registers and writes W (and dL/dM) once, the 2K sums of backward being block reductions inside that kernel.
# Run eagerly (CPU, the float64 tests) the same code is the plain reference, on chunks so temporaries stay small.
def _merge_pass(M, W0, a, b, g, scale, dtype):
    """Forward on a chunk: W0 + scale f(M) (Eq. 1, 4), cast once to dtype; W0 None gives scale f(M) alone."""
    f = transfer(M, a, b, g)  # Eq. 4, the same sums as delta_weight(), so merged() matches forward() bit for bit
    return (scale * f if W0 is None else W0.to(f.dtype) + scale * f).to(dtype)  # App. C: merge once per step


def _sinc_basis(M, W0, G, a, b, g, scale, dtype):
    """Backward on a chunk, M and G = dL/dW viewed as (blocks, block): one pass over the grid.

    Returns W (as _merge_pass, for dL/dx), dL/dM = scale G f'(M), and per block the K partial sums
    scale sum G sinc(t) (= dL/da_k) and scale sum G (cos u - sinc(t)), t = b_k (M - g_k), u = pi t.
    sin u and cos u are computed once per (element, k) and shared by f, f' and both sums.
    """
    f, fprime, grad_a, grad_b = torch.zeros_like(M), torch.zeros_like(M), [], []
    G = scale * G.to(M.dtype)  # dL/df
    # not specified by the paper: below |u| = (30 eps)^(1/4) Taylor terms replace sin(u)/u (0/0 at t = 0) and
    # (cos u - sinc)/u (cancellation); their errors, u^3/30 and eps/u, balance there (fp32 ~3e-6, fp64 ~3e-13)
    tiny = (30 * torch.finfo(M.dtype).eps) ** 0.25
    for k in range(g.shape[0]):
        u = (M - g[k]) * (math.pi * b[k])
        near0, inv_u = u.abs() < tiny, 1 / u
        sinc = torch.where(near0, 1 - u * u / 6, torch.sin(u) * inv_u)  # sinc(t)
        u_slope = torch.cos(u) - sinc  # u d/du (sin u / u)
        f = f + a[k] * sinc  # f(M) (Eq. 4)
        fprime = fprime + (math.pi * a[k] * b[k]) * torch.where(near0, u * (-1 / 3), u_slope * inv_u)  # f'(M)
        grad_a.append((G * sinc).sum(1))  # dL/da_k = sum G sinc(t)
        grad_b.append((G * u_slope).sum(1))  # dL/db_k = a_k / b_k sum G u sinc'(u), summed by the caller
    W = (scale * f if W0 is None else W0.to(f.dtype) + scale * f).to(dtype)
    return W, G * fprime, torch.stack([torch.stack(grad_a, 1), torch.stack(grad_b, 1)], 1)  # sums: (blocks, 2, K)


COMPILE = False  # True: torch.compile the two passes (one fused kernel each; the first call compiles for minutes)
_compiled = {}


def _over_rows(fn, M, mats, *args):
    """fn on row chunks of M and the other out x in matrices; 2-D outputs come back out x in, 3-D (block sums) stacked.

    Eager: chunks of 2^20 entries, so the loop temporaries stay chunk-sized. Compiled: the whole matrix in one
    launch, viewed as (blocks, 1024) so the sums are short per-block reductions (one graph for every layer shape:
    the number of blocks is marked dynamic).
    """
    compiled = COMPILE
    if compiled and fn not in _compiled:
        _compiled[fn] = torch.compile(fn, options={"max_fusion_size": 1024})  # inductor's default, 64, splits the 2K sums
    rows, parts = M.shape[0] if compiled else max(1, 2 ** 20 // M.shape[1]), []
    for i in range(0, M.shape[0], rows):
        n = min(rows, M.shape[0] - i) * M.shape[1]
        blk = 1024 if n % 1024 == 0 else M.shape[1]
        chunk = [None if t is None else t[i:i + rows].reshape(-1, blk) for t in (M, *mats)]
        if compiled:
            for t in chunk:
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        out = (_compiled[fn] if compiled else fn)(*chunk, *args)
        parts.append([o.view(-1, M.shape[1]) if o.ndim == 2 else o for o in (out if isinstance(out, tuple) else (out,))])
    return [p[0] if len(p) == 1 else torch.cat(p) for p in zip(*parts)]


class _MergedSincLinear(torch.autograd.Function):
    """y = x (W0 + scale f(B A))^T + bias, W0 and bias optional, with a backward that keeps a few out x in matrices alive.

    Plain autograd would save every per-k intermediate (K dense matrices) and the merged W of every layer
    until backward. Here forward saves only x and the small factors; backward recomputes M = B A and makes
    one pass over the grid (_sinc_basis). Peak, whatever K: M and dL/dM in float32, dL/dW and W in the
    activations' dtype, plus chunk-sized temporaries when eager (test_all.py measures it).
    """

    @staticmethod
    def forward(ctx, x, W0, bias, A, B, a, b, g, scale):
        W, = _over_rows(_merge_pass, B @ A, [W0], a, b, g, scale, x.dtype)  # dW = scale f(BA) (Eq. 4), merged
        ctx.save_for_backward(x, W0, A, B, a, b, g)
        ctx.scale = scale
        # one backbone-shaped matmul in the activations' dtype; F.linear as nn.Linear, so dW = 0 gives base(x) bit for bit
        return F.linear(x, W, bias)

    @staticmethod
    def backward(ctx, gy):
        x, W0, A, B, a, b, g = ctx.saved_tensors
        M = B @ A  # recomputed: an r-rank matmul is cheaper than keeping out x in per layer until backward
        G = gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # dL/dW, the weight-gradient GEMM
        W, grad_M, sums = _over_rows(_sinc_basis, M, [W0, G], a, b, g, ctx.scale, gy.dtype)
        del G
        grad_a, grad_b = sums.sum(0)
        grad_x = gy @ W if ctx.needs_input_grad[0] else None
        return grad_x, None, None, B.T @ grad_M, grad_M @ A.T, grad_a, a / b * grad_b, None, None


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
        # fixed grid g_k (§3.3). Not specified by the paper: its right end. On a grid symmetric about 0 (linspace),
        # f'(0) = sum_k a_k b_k sinc'(-b_k g_k) is exactly 0 while a stays mirror-symmetric, which it does under
        # Adam from a = 0, so B = 0 (then A) would move only through rounding noise; K points spaced 2R/K from -R,
        # R itself left out, break that symmetry by construction (App. E assumes it breaks)
        self.register_buffer("g", -grid_range + (2 * grid_range / grid_size) * torch.arange(grid_size, **kw))
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
