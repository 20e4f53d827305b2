"""LR-LoRA: "Parameter-Efficient Fine-Tuning with Learnable Rank" (A. Garg, S. Lucey and H. Saratchandran, 2026;
arXiv:2606.04325).

LoRA's update B A has rank <= r. LR-LoRA passes it through a learnable element-wise transfer function f, so the
realized rank of the update is learned per layer (§3.3):

    W = W0 + dW,   dW = scale * f(B A),   scale = alpha / r                       (Eq. 1, §3.3)
    f(x) = sum_k a_k * sinc(b_k * (x - g_k)),   sinc(t) = sin(pi t) / (pi t)       (Eq. 4, §3.2)
    b_k = softplus(beta_k),   beta_k = ln(e - 1) at init, so b_k = 1               (§3.3, §4.1)
    srank(M) = ||M||_F^2 / ||M||_2^2                                               (Eq. 5)

K = grid_size fixed grid points g_k in [-grid_range, grid_range] (K = 50, range 3). A is Kaiming-uniform and B
zeros, as in LoRA; 2K extra scalars (a_k, beta_k) per module (K with learn_bandwidth=False, the paper's
fixed-bandwidth ablation, Table 3).

Centred by default (center=True, our deviation): dW = scale * (f(B A) - f(0)). Near B A = 0,
f(B A) ~ f(0) 11^T + f'(0) B A, and f(0) = sum_k a_k sinc(-b_k g_k) adds the same constant to every entry of dW:
an all-ones rank-one update the paper never discusses. Its gradient is the sum of all entries of dL/dW, large where
hidden states are not centred (RMSNorm models: LLaMA, SmolLM2), so from a = 0 Adam grows f(0) about ten times faster
than f'(0), and A, B (whose gradient is f'(0) times LoRA's) barely learn: on SmolLM2 the literal form scored 33% where
the centred one scored 85% (LoRA 88%). Subtracting f(0) removes that term and keeps dW = 0 at B = 0 for every a.
center=False with a_init="zero" is Eq. 4 as printed (a_k = 0 at init, so f = 0 and dW = 0; at init only the a_k get
gradient, App. E). a_init picks the start of a: "identity" (ours, the centred default: the least-norm a with f(0) = 0
and f'(0) = 1, so A and B get LoRA's gradient from the first step), "zero" (§3.3, the literal default), "small"
(Table 18's 0.1 small-start) or "random" (Table 3's random init). Centred, a = 0 is refused: at B = 0 both
f(B A) - f(0) and f'(B A) vanish, so no parameter would ever get a gradient.

Training merges once per step (App. C): W0 + dW is formed and the layer does one matmul, so the update merges
exactly. B A, f and dW stay float32 (or wider) under autocast; only W meets the activations' dtype.
This file imports only torch and can be copied alone into another project.
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc) is a linear layer whose weight is stored transposed, (in, out)
CONV1D_HINT = ("; a transformers Conv1D (GPT-2) is the linear map x @ conv.weight + conv.bias: convert it exactly, then wrap: "
               "lin = nn.Linear(*conv.weight.shape); lin.weight.data = conv.weight.T.contiguous(); lin.bias.data = conv.bias")


def transfer(M, a, b, g):
    """f(M) = sum_k a_k sinc(b_k (M - g_k)) (Eq. 4), summed directly: the definition the table approximates."""
    f = torch.zeros_like(M)
    for k in range(g.shape[0]):
        f = f + a[k] * torch.sinc(b[k] * (M - g[k]))  # torch.sinc is the normalized sinc, = 1 at t = 0
    return f


def _centred(f, M, a, b, g, center):
    return f(M, a, b, g) - f(M.new_zeros(()), a, b, g) if center else f(M, a, b, g)  # f(M) - f(0): the centred form


def basis_at_zero(b, g):
    """d f(0)/d a_k = sinc(-b_k g_k) and d f'(0)/d a_k = b_k sinc'(-b_k g_k), as two K-vectors (f is linear in a)."""
    z = -b * g
    return torch.sinc(z), b * torch.where(z == 0, 0.0, (torch.cos(math.pi * z) - torch.sinc(z)) / z)


def transfer_at_zero(a, b, g):
    """f(0) and f'(0) (Eq. 4): the all-ones term of the literal update, and the slope that scales LoRA's gradient for A, B."""
    s0, p0 = basis_at_zero(b, g)
    return s0 @ a, p0 @ a


def stable_rank(M: torch.Tensor) -> float:
    """||M||_F^2 / ||M||_2^2 (Eq. 5): the paper's continuous, threshold-free measure of an update's rank."""
    s = torch.linalg.svdvals(M.detach().double())
    return 0.0 if s[0] == 0 else float((s * s).sum() / (s[0] * s[0]))


class LRLoRALinear(nn.Module):
    exact_merge = True  # merged() reproduces forward() for every input: dW is a weight-space update

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 grid_size: int = 50, grid_range: float = 3.0, learn_bandwidth: bool = True,
                 center: bool = True, a_init: str = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LRLoRALinear: base must be a torch.nn.Linear, got {type(base).__module__}.{type(base).__name__}"
                            + CONV1D_HINT * (type(base).__name__ == "Conv1D"))
        if not isinstance(r, int) or r < 1:  # r above min(in, out) adds no rank but is valid, as in LoRA (defaults fit any layer)
            raise ValueError(f"r={r!r}: the rank must be an integer >= 1")
        if alpha == 0:  # scale 0: the update, and every adapter gradient, would be 0
            raise ValueError("alpha=0: scale = alpha / r = 0, so the adapter would train nothing; use alpha > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: must be in [0, 1)")
        if not isinstance(grid_size, int) or grid_size < 2:
            raise ValueError(f"grid_size={grid_size!r}: the number of grid points K must be an integer >= 2")
        if not 0.0 < grid_range < math.inf:
            raise ValueError(f"grid_range={grid_range!r}: the grid spans [-grid_range, grid_range], so it must be > 0")
        a_init = a_init or ("identity" if center else "zero")  # centred: ours (docstring); literal: the paper's zero start
        if a_init not in ("zero", "identity", "small", "random"):
            raise ValueError(f"a_init={a_init!r}: choose zero, identity, small or random")
        if center and a_init == "zero":  # f - f(0) and f' vanish at B A = 0 for a = 0: every gradient is 0 there
            raise ValueError("a_init='zero' with center=True: B = 0, a = 0 is a stationary point (no gradient reaches any "
                             "parameter); start a elsewhere (identity, small, random)")
        self.base = base.requires_grad_(False)  # W0 (and its bias) stay frozen
        self.r, self.alpha, self.scale, self.center, self.a_init = r, alpha, alpha / r, center, a_init
        kw = dict(device=base.weight.device, dtype=torch.float32)  # float32 whatever the base dtype
        self.A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # "chosen as in LoRA" (§3.3)
        # fixed grid g_k (§3.3). Not specified by the paper: where exactly. On a grid with mirror pairs (g, -g), in exact
        # arithmetic Adam keeps a mirror-symmetric from a = 0, so f'(0) = sum_k a_k b_k sinc'(-b_k g_k) = 0 and B = 0 gets
        # no gradient; in float32 rounding breaks the symmetry and Adam amplifies it, so B does move, but only from noise.
        # The points -R + (k + 1/4) 2R/K, all inside [-R, R], have no mirror pairs: B's gradient is of normal size from
        # the second step, without relying on rounding (App. E assumes the symmetry breaks)
        self.register_buffer("g", -grid_range + (2 * grid_range / grid_size) * (torch.arange(grid_size, **kw) + 0.25))
        # softplus(beta_k) = 1 (§3.3); learn_bandwidth=False keeps b_k = 1 (Table 3, "fixed bandwidth")
        self.beta = nn.Parameter(torch.full((grid_size,), math.log(math.e - 1), **kw), requires_grad=learn_bandwidth)
        self.a = nn.Parameter(self._a_start(a_init, F.softplus(self.beta.detach())))
        self.dropout = nn.Dropout(dropout)

    def _a_start(self, a_init, b):
        """The amplitudes at init. zero: f = 0 (§3.3). identity: C a = (0, 1) for C's rows d f(0)/d a and d f'(0)/d a, least
        norm (a = C^T (C C^T)^-1 (0, 1)). small: every a_k = 0.1, Table 18's "0.1 Small-start" (the paper does not say
        whether 0.1 is a constant or a random draw's scale: a constant here). random: a_k ~ N(0, 0.1^2), Table 3's
        "Random" (its scale unstated: Table 18's 0.1). Literal (center=False), the last two move dW off 0 at B = 0."""
        K = self.g.numel()
        if a_init == "zero":
            return torch.zeros(K, device=self.g.device)
        if a_init == "small":
            return torch.full((K,), 0.1, device=self.g.device)
        if a_init == "random":
            return 0.1 * torch.randn(K, device=self.g.device)
        C = torch.stack(basis_at_zero(b.double(), self.g.double()))  # 2 x K
        return (C.T @ torch.linalg.solve(C @ C.T, C.new_tensor([0.0, 1.0]))).float()

    @torch.compiler.disable  # its passes are compiled kernels of their own (CUDA), or sized by a host sync (CPU): run as it is
    def forward(self, x):
        b = F.softplus(self.beta)  # b_k > 0 (§3.3)
        dev = x.device.type
        x = x.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else x  # W meets x in x's dtype
        args = (self.A, self.B, self.a, b, self.g, self.scale, self.center)
        merged_linear = _direct if self.A.dtype == torch.float64 else _MergedSincLinear.apply
        if self.dropout.p == 0 or not self.training:  # App. C: one matmul with W0 + dW
            return merged_linear(x, self.base.weight, self.base.bias, *args)
        # App. C: input-side dropout on the LR-LoRA path, so the base path and the update path stay apart
        return self.base(x) + merged_linear(self.dropout(x), None, None, *args)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """dW = scale f(B A) (Eq. 1, 4; less f(0) if centred) through the same table as forward(), so merged() reproduces
        it; float32 or wider."""
        M, b = self.B @ self.A, F.softplus(self.beta)
        if M.dtype == torch.float64:  # as forward(): the definition itself
            return self.scale * _centred(transfer, M, self.a, b, self.g, self.center)
        lo, h, T = _grid(M, b)
        return _forward(M, None, lo, 1 / h, sinc_table(lo, h, T, self.a, b, self.g, self.center)[0], self.scale, M.dtype)

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
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, grid_size={self.g.numel()}, center={self.center}, a_init={self.a_init}"


# ---------------------------------------------------------------------------------------------------------------------
# Speed: f through one table a step. f is one scalar function for all out x in entries of B A, so each layer tabulates
# f and f' once per step on T equally spaced points over [min BA, max BA] (T x K sinc values in float64: tiny), and
# every entry takes f by linear interpolation between its two neighbouring points: on the CPU spaced at most
# 1 / (1024 b_max) apart, which bounds |f_table - f| by 3.9e-7 sum|a_k| (the bounds, and CUDA's fixed T = 4096: the LR-LoRA
# section of docs/methods.md); measured against the float64 direct sum, dW and every gradient agree within 1e-6
# relative. Backward: dL/d(BA) = scale dL/dW * f'(BA), with f' from its own exact table; dL/da, dL/db scatter dL/dW
# into the table slots (the adjoint of the lookup), then one T x K product. Nothing out x in is kept from forward to
# backward. On CUDA each element-wise pass is one torch.compile'd kernel; in float64 the layer takes the direct sum
# (exact, for gradcheck).

POINTS_PER_UNIT = 1024  # table spacing h <= 1 / (1024 b_max) on the CPU: the error bound above
FIXED_POINTS = 4096  # T on CUDA, where the table size must not depend on the data (no host sync): exact bound up to b_max span ~ 4
SCATTER_COPIES = 4096  # table copies the backward's scatter spreads over on a GPU (up to 2^20 slots in all)
EAGER_BLOCK = 2 ** 18  # entries per block of the eager element-wise passes (their temporaries: a few blocks)
MAX_POINTS = 2 ** 16  # reached only when b_max (max BA - min BA) > 64; beyond, h grows and the bound with it


def _grid(M, b, fixed=None):
    """The table's points t_j = lo + j h, j < T, over [min M, max M]: lo and h (0-d tensors on M's device) and T.

    fixed (default: on CUDA) takes T = FIXED_POINTS with no host sync, else T = ceil(1024 b_max (max M - min M)) + 1
    (read to the host: T is a size), so h <= 1 / (1024 b_max). docs/methods.md gives the bound for each.
    """
    lo, hi = torch.aminmax(M)
    if M.is_cuda if fixed is None else fixed:
        T = FIXED_POINTS
    else:
        span, b_max = torch.stack([hi - lo, b.max().to(M.dtype)]).tolist()
        T = min(MAX_POINTS, max(2, math.ceil(POINTS_PER_UNIT * b_max * span) + 1))
    return lo, ((hi - lo) / (T - 1)).clamp_min(torch.finfo(M.dtype).tiny), T  # B A constant (B = 0): any h > 0 will do


def sinc_table(lo, h, T, a, b, g, center=False):
    """f and f' at the table points, as each interval's two ends ((T - 1) x 2, lo's dtype), and the T x K pieces of
    the adjoint, in float64: d f(t_j)/d a_k = sinc(z_jk) and z_jk sinc'(z_jk) = (b_k / a_k) d f(t_j)/d b_k.
    center: f(t) - f(0) and its adjoint pieces, the row at t = 0 (computed as the others) subtracted from each."""
    t = lo.double() + h.double() * torch.arange(T, dtype=torch.float64, device=lo.device)
    a, b, g = a.double(), b.double(), g.double()
    z = b * (torch.cat([t, t.new_zeros(1)])[:, None] - g)  # the last row is t = 0
    s = torch.sinc(z)
    zds = torch.where(z == 0, 0.0, torch.cos(math.pi * z) - s)  # z sinc'(z); float64: the cancellation near 0 is < 1e-8
    p = (torch.where(z == 0, 0.0, zds / z) @ (a * b))[:T]  # f' = sum_k a_k b_k sinc'(z); unchanged by centring
    s, zds = (s[:T] - s[T:], zds[:T] - zds[T:]) if center else (s[:T], zds[:T])
    ends = lambda f: torch.stack([f[:-1], f[1:]], -1).to(lo.dtype)
    return ends(s @ a), ends(p), s, zds  # f = sum_k a_k sinc(z) (Eq. 4), less f(0) if centred


def _lookup(M, lo, inv_h, T):
    """Each entry's left table point i and its weight w in [0, 1]: M = t_i + w h."""
    u = ((M - lo) * inv_h).clamp(0, T - 1)
    i = u.floor().clamp(max=T - 2)  # an entry at the top end takes the last interval with w = 1
    return i.long(), u - i


def _interp(tab, i, w):
    """tab at M = t_i + w h by linear interpolation; tab is (T - 1, 2): each interval's two ends, one gather."""
    ends = tab[i]
    return torch.lerp(ends[..., 0], ends[..., 1], w)  # exact at the table points: B = 0 gives f(0) to the last bit


def _merge(W0, f, scale, dtype):
    return (scale * f if W0 is None else W0.to(f.dtype) + scale * f).to(dtype)  # App. C: W0 + dW, cast once


def _forward(M, W0, lo, inv_h, f_tab, scale, dtype):
    """W0 + scale f(M) (Eq. 1, 4), f interpolated from its table; W0 None gives scale f(M) alone."""
    return _merge(W0, _interp(f_tab, *_lookup(M, lo, inv_h, f_tab.shape[0] + 1)), scale, dtype)


def _backward(M, W0, G, lo, inv_h, f_tab, p_tab, scale, dtype, copies):
    """W (for dL/dx), dL/dM = scale G f'(M), and dL/d(f table): G's entries scattered onto the two ends of each interval."""
    T = f_tab.shape[0] + 1
    i, w = _lookup(M, lo, inv_h, T)
    W = _merge(W0, _interp(f_tab, i, w), scale, dtype)
    dF = scale * G.to(M.dtype)  # dL/df, entry-wise
    grad_M = dF * _interp(p_tab, i, w)  # f' from the exact f' table, not the slope of the interpolant
    # the adjoint of the lookup: each entry adds dF (1 - w) to slot i and dF w to slot i + 1. B A clusters in a few slots,
    # so entry e adds into copy (e mod copies) of the table: far fewer atomic adds contend for one address on a GPU
    slot = i.flatten()
    if copies > 1:
        slot = slot + T * (torch.arange(slot.numel(), device=M.device) % copies)
    acc = torch.zeros(copies * T, dtype=torch.float64, device=M.device)  # float64: many terms land in one slot
    acc = acc.index_add(0, slot, (dF * (1 - w)).flatten().double())
    acc = acc.index_add(0, slot + 1, (dF * w).flatten().double())
    return W, grad_M, acc.view(copies, T).sum(0)


_compiled = {}


def _fused(fn, device):
    """fn as one torch.compile'd (inductor) kernel on CUDA, where each element-wise pass over out x in is a trip
    through memory; eagerly elsewhere (the CPU, the float64 tests), and where compiling fails (CUDA without Triton),
    after one warning."""
    if device.type != "cuda":
        return fn
    if fn not in _compiled:
        compiled = torch.compile(fn, dynamic=True)

        def first_call(*args):
            try:
                out, _compiled[fn] = compiled(*args), compiled
            except Exception as e:  # the compiler failed, not the math: fn itself raises again on a real error
                warnings.warn(f"lrlora.py: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running unfused")
                out, _compiled[fn] = fn(*args), fn
            return out
        _compiled[fn] = first_call
    return _compiled[fn]


def _by_rows(fn, mats, *args):
    """fn on the out x in matrices `mats` (None allowed) and args. Eager, over blocks of EAGER_BLOCK entries, so its
    temporaries stay block-sized: out x in results are stitched back by rows, table-sized ones added. One call on CUDA."""
    M = mats[0]
    step = M.shape[0] if M.is_cuda else max(1, EAGER_BLOCK // M.shape[1])
    if step >= M.shape[0]:
        return _fused(fn, M.device)(*mats, *args)
    out = None
    for r in range(0, M.shape[0], step):
        part = fn(*[None if t is None else t[r:r + step] for t in mats], *args)
        part = part if isinstance(part, tuple) else (part,)
        if out is None:
            out = [torch.empty(M.shape, dtype=p.dtype, device=p.device) if p.dim() == 2 else torch.zeros_like(p) for p in part]
        for o, p in zip(out, part):
            if o.dim() == 2:
                o[r:r + step] = p
            else:
                o += p
    return out[0] if len(out) == 1 else tuple(out)


def _scatter_copies(T, device):
    return max(1, min(SCATTER_COPIES, 2 ** 20 // T)) if device.type == "cuda" else 1  # CPU index_add_ has no contention


class _MergedSincLinear(torch.autograd.Function):
    """y = x (W0 + scale f(B A))^T + bias, W0 and bias optional; forward keeps x and the small factors only."""

    @staticmethod
    def forward(ctx, x, W0, bias, A, B, a, b, g, scale, center):
        with torch.autocast(x.device.type, enabled=False):  # B A, the table and f in float32 (or wider) under autocast
            M = B @ A
            lo, h, T = _grid(M, b)
            W = _by_rows(_forward, [M, W0], lo, 1 / h, _fused(sinc_table, M.device)(lo, h, T, a, b, g, center)[0], scale, x.dtype)
        ctx.save_for_backward(x, W0, A, B, a, b, g, lo, h)
        ctx.scale, ctx.T, ctx.center = scale, T, center
        return F.linear(x, W, bias)  # one backbone-shaped matmul; as nn.Linear, so dW = 0 gives base(x) bit for bit

    @staticmethod
    def backward(ctx, gy):
        x, W0, A, B, a, b, g, lo, h = ctx.saved_tensors
        with torch.autocast(gy.device.type, enabled=False):
            M = B @ A  # recomputed: an r-rank matmul is cheaper than keeping out x in per layer until backward
            f_ends, p_ends, s, zds = _fused(sinc_table, M.device)(lo, h, ctx.T, a, b, g, ctx.center)  # forward's table, again
            G = gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(gy.dtype)  # dL/dW, the weight-gradient GEMM
            W, grad_M, grad_tab = _by_rows(_backward, [M, W0, G], lo, 1 / h, f_ends, p_ends, ctx.scale, gy.dtype,
                                           _scatter_copies(ctx.T, M.device))
            del G, M
            grad_x = gy @ W if ctx.needs_input_grad[0] else None
            grad_a = (s.T @ grad_tab).to(a.dtype)  # f(t_j) = sum_k a_k sinc(z_jk): the adjoint of the table, T x K
            grad_b = (a.double() / b.double() * (zds.T @ grad_tab)).to(b.dtype) if ctx.needs_input_grad[6] else None
            return grad_x, None, None, B.T @ grad_M, grad_M @ A.T, grad_a, grad_b, None, None, None


def _direct(x, W0, bias, A, B, a, b, g, scale, center):
    """The same layer with f by its definition (Eq. 4) and plain autograd: the path for float64, where exactness is
    the point (gradcheck); it keeps K out x in intermediates for backward, so it is not for training."""
    dW = scale * _centred(transfer, B @ A, a, b, g, center)
    return F.linear(x, dW if W0 is None else W0 + dW, bias)


