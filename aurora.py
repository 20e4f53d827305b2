"""AuroRA: "AuroRA: Breaking Low-Rank Bottleneck of LoRA with Nonlinear Mapping"
(Dong, Zhu, Song and Wang, 2025; arXiv:2505.18738).

AuroRA puts an Adaptive Nonlinear Layer (ANL) sigma between LoRA's two projectors:

    h = W0 x + scale * B sigma(A x)                                  (Eq. 4, training)
    sigma(z) = F(z) + L(z)                                           (Eq. 5)
    F(z) = tanh(H tanh(z))         fixed nonlinearity, H is r x r    (Eq. 6)
    L(z) = W_s s(z),  s(z) = sum_i Bspline(z_i) in R^8               (Eq. 7; W_s is r x 8, see below)
    sigma(z) = tanh(H tanh(z)) + W_s sum_i Bspline(z_i)              (Eq. 8)

Scale: scale = alpha / r with alpha = 2r, so scale = 2 at every rank: App. G sets r = 2 and
"correspondingly" alpha = 4, and the RanLoRA paper runs AuroRA at r = 2..16 with alpha = 2r
(its Tables 12, 15). alpha=None means 2r; an explicit alpha still wins.

A (r x in) is Kaiming-uniform and B (out x r) zero, so the wrapped layer equals the base layer
at initialization. The ANL adds r^2 + 8r scalars per module (H and W_s): 20 at the paper's r = 2.

We deviate from Eq. 7 in W_s's shape. Eq. 7 states w_s in R^r (one weight per channel), but its s(z) is
in R^8 (the 8 basis values summed over the r channels), so w_s . s(z) has no consistent shape as printed.
We take W_s in R^(r x 8), as the public efficient-KAN-style code does: each output channel gets its own mix
of the 8 basis values. The published counts cannot tell the two apart: r x 8 adds 14 scalars per module
at r = 2 (ViT-Large q,v: 197,568 against 196,896; LLaMA-3-8B q,k,v,up,down: 3,542,144 against
3,539,904), and the paper prints 197K and 3.5M.

Inference (App. B): the paper merges the static form dW = scale * B sigma(A), sigma applied to
each column of A, and runs h = W0 x + B sigma(A) x (Eq. 9). For the paper's default
mode="dynamic" (train on B sigma(A x)) that merge is NOT exact, because sigma(A x) != sigma(A) x
for a nonlinear sigma: exact_merge is False and delta_weight() returns the paper's merge.
mode="static" (the paper's AuroRA-S, Table 7) trains on B sigma(A) x itself and merges exactly.
The ablations: fixed=False (w/o F, no H) and learnable=False (w/o L, no W_s) (Table 4);
fixed_activation="leaky_relu" (AuroRA-lr) or "sigmoid" (AuroRA-sm) in place of tanh in F (Table 5).

sigma and B sigma(A) run in float32 (in the input's dtype if that is wider, e.g. float64), also
under autocast; only the x-sized matmuls run in the activations' dtype.
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

# not specified by the paper: the spline (efficient-KAN's defaults): cubic B-splines, 5 uniform
# intervals on [-1, 1], the knots extended by 3 on each side -> 5 + 3 = 8 basis functions
GRID_LO, GRID_HI, INTERVALS = -1.0, 1.0, 5
NUM_BASIS = INTERVALS + 3
# F(z) = act(H act(z)) (Eq. 6; Table 5). not specified by the paper: LeakyReLU's slope, torch's default 0.01
FIXED_ACTIVATIONS = {"tanh": torch.tanh, "leaky_relu": F.leaky_relu, "sigmoid": torch.sigmoid}


def bspline(z: torch.Tensor) -> torch.Tensor:
    """The 8 cubic B-spline basis functions at z: (...,) -> (..., 8).

    On a uniform grid (spacing h) basis j is the cardinal cubic B-spline centred on knot t_{j+2}
    (centres -1.4, -1.0, ..., 1.4; support [-2.2, 2.2] in all). In the distance y = |z - c_j| / h:
        beta(y) = ((2 - y)_+^3 - 4 (1 - y)_+^3) / 6
    the closed form of the Cox-de Boor recursion: one element-wise expression, no loop, exactly 0
    for y >= 2 (no cancellation for large |z|), and the 8 values sum to 1 on [-1, 1].
    """
    h = (GRID_HI - GRID_LO) / INTERVALS
    centres = GRID_LO + h * torch.arange(-1, NUM_BASIS - 1, device=z.device, dtype=z.dtype)
    y = ((z.unsqueeze(-1) - centres) / h).abs()
    return (F.relu(2 - y) ** 3 - 4 * F.relu(1 - y) ** 3) / 6


def anl(z, H, W_s, act, linear=F.linear):
    """sigma(z) = F(z) + L(z) (Eqs. 5-8) on the last axis of z (..., r), in z's dtype, autocast off; H None drops F
    ("w/o F"), W_s None drops L ("w/o L")."""
    with torch.autocast(z.device.type, enabled=False):
        # F(z) = act(H act(z)), Eq. 6 with tanh (Table 5: LeakyReLU, Sigmoid); dropped for "w/o F" (Table 4)
        F_z = act(linear(act(z), H.to(z.dtype))) if H is not None else 0.0
        # L(z) = W_s s(z), Eq. 7; dropped for "w/o L". s(z) sums the r channels' 8 basis values (as Eq. 7
        # writes it). Deviation: W_s is r x 8 (each output channel its own mix), Eq. 7 states R^r (docstring)
        L_z = linear(bspline(z).sum(-2), W_s.to(z.dtype)) if W_s is not None else 0.0
        return F_z + L_z  # sigma(z) = F(z) + L(z), Eqs. 5 and 8


class AuroRALinear(nn.Module):
    exact_merge = False  # merged() reproduces forward() for every input: not for the default mode="dynamic" (set per instance)
    fused = ("cuda",)  # devices where training's sigma runs compiled (anl_cast, below); () for none

    def __init__(self, base: nn.Linear, r: int = 2, alpha: float = None, dropout: float = 0.0,
                 mode: str = "dynamic", fixed: bool = True, learnable: bool = True, fixed_activation: str = "tanh"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"AuroRALinear: base must be a torch.nn.Linear, got {type(base).__module__}.{type(base).__name__}"
                            + CONV1D_HINT * (type(base).__name__ == "Conv1D"))
        if not isinstance(r, int) or r < 1 or r > min(base.in_features, base.out_features):
            raise ValueError(f"r={r!r}: the rank must be an integer in [1, {min(base.in_features, base.out_features)}]")
        if alpha == 0:  # scale 0: the update, and every adapter gradient, would be 0
            raise ValueError("alpha=0: scale = alpha / r = 0, so the adapter would train nothing; use alpha > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: must be in [0, 1)")
        if mode not in ("dynamic", "static"):
            raise ValueError(f"mode={mode!r}: choose 'dynamic' (train on B sigma(Ax)) or 'static' (train on B sigma(A) x)")
        if not (fixed or learnable):
            raise ValueError("fixed=False, learnable=False: sigma would be 0; keep at least one part of the ANL")
        if fixed_activation not in FIXED_ACTIVATIONS:
            raise ValueError(f"fixed_activation={fixed_activation!r}: choose from {', '.join(FIXED_ACTIVATIONS)} (Table 5)")
        self.base = base.requires_grad_(False)  # W0 (and its bias) stay frozen
        self.alpha = 2 * r if alpha is None else alpha  # App. G: r = 2, alpha = 4; scale 2 at every rank
        self.r, self.scale = r, self.alpha / r
        self.mode, self.fixed, self.learnable = mode, bool(fixed), bool(learnable)
        self.fixed_activation, self.act = fixed_activation, FIXED_ACTIVATIONS[fixed_activation]
        self.exact_merge = mode == "static"  # the static form is linear in x, the dynamic one is not
        # adapter parameters live in float32 whatever the base dtype: Adam on bf16 factors loses updates
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.A = nn.Parameter(torch.empty(r, base.in_features, **kw))  # P_down
        self.B = nn.Parameter(torch.zeros(base.out_features, r, **kw))  # P_up, zero: h = W0 x at init
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as LoRA
        if self.fixed:  # P_self of Eq. 6
            self.H = nn.Parameter(torch.empty(r, r, **kw))
            nn.init.xavier_normal_(self.H)  # not specified by the paper: Xavier-normal
        if self.learnable:  # spline weights of Eq. 7, one row of 8 per output channel (Eq. 7 states R^r: docstring)
            self.W_s = nn.Parameter(torch.empty(r, NUM_BASIS, **kw))
            nn.init.uniform_(self.W_s, -0.1, 0.1)  # not specified by the paper: U(-0.1, 0.1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def sigma(self, z: torch.Tensor) -> torch.Tensor:
        """The ANL on the last axis of z (..., r) -> (..., r), in z's dtype (autocast off)."""
        return anl(z, self.H if self.fixed else None, self.W_s if self.learnable else None, self.act)

    def forward(self, x):
        # the x-sized matmuls run in the activations' dtype (float32 factors cast down, as autocast would);
        # sigma acts on the small (..., r) tensor in float32, or in x's dtype if wider
        x2 = x.reshape(-1, x.shape[-1])
        h = self.base(x2)
        x_, dt, ct = self.dropout(x2), h.dtype, torch.promote_types(x.dtype, torch.float32)
        H, W_s = (self.H if self.fixed else None), (self.W_s if self.learnable else None)
        fused = x.device.type in self.fused and torch.is_grad_enabled()  # training: inference needs no compile wait
        sigma = _fused(anl_cast) if fused else lambda z, *a: anl(z.to(ct), *a[:3]).to(dt)
        if self.mode == "dynamic":
            u = sigma(F.linear(x_, self.A.to(dt)), H, W_s, self.act, ct, dt)  # sigma(A x): input-dependent, Eq. 4
        else:
            u = F.linear(x_, sigma(self.A.T, H, W_s, self.act, ct, dt).T)  # sigma(A) x: sigma on each column of A, Eq. 9
        # the second matmul adds into W0 x in place (addmm_, beta = 1, alpha = scale): no update-sized tensor or add
        h.addmm_(u, self.B.to(dt).T, alpha=self.scale)
        return h.view(*x.shape[:-1], -1)

    def delta_weight(self) -> torch.Tensor:
        # dW = scale * B sigma(A), Eq. 3: exact for mode="static"; for "dynamic" it is the paper's
        # static inference form (App. B.1), an approximation of B sigma(A x): see exact_merge.
        # Note sigma(0) = W_s s(0) != 0, so this dW carries the rank-one term B sigma(0) 1^T
        with torch.autocast(self.A.device.type, enabled=False):  # float32 also when called under autocast
            return self.scale * (self.B @ self.sigma(self.A.T).T)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new nn.Linear holding W0 + dW (cast once to the base dtype); the original is untouched. For mode="dynamic"
        that is the paper's static approximation (App. B), with a warning."""
        if not self.exact_merge:
            warnings.warn("AuroRA mode='dynamic': merged() holds the paper's static approximation W0 + scale B sigma(A) "
                          "(App. B), not the trained W0 x + scale B sigma(A x), so outputs change; keep the adapter at "
                          "inference, or train with mode='static' (AuroRA-S), whose merge is exact", stacklevel=2)
        w0 = self.base.weight
        out = nn.Linear(w0.shape[1], w0.shape[0], bias=self.base.bias is not None, device=w0.device, dtype=w0.dtype)
        out.weight.copy_((w0.float() + self.delta_weight()).to(w0.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out.requires_grad_(False)

    def extra_repr(self):
        return (f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, mode={self.mode}, "
                f"fixed={self.fixed}, learnable={self.learnable}, fixed_activation={self.fixed_activation}")


# Speed: on CUDA, training runs sigma through anl_cast, compiled by torch.compile into one or two kernels (the plain
# sigma launches ~20 small kernels). It is the same math as anl() above, with the small matmuls written as broadcast
# sums so that inductor fuses them; anl() stays the definition and the CPU path.

def _small_linear(x, W):
    """F.linear(x, W) for a small W (r x r, r x 8) as a broadcast product and sum: a pointwise reduction that
    torch.compile fuses with sigma's other passes, where a matmul would be a launch of its own (the fused path)."""
    return (x.unsqueeze(-2) * W).sum(-1)


def anl_cast(z, H, W_s, act, ct, dt):
    """sigma(z) computed in ct and cast to dt, in one function so that torch.compile fuses it (AuroRALinear.fused)."""
    return anl(z.to(ct), H, W_s, act, _small_linear).to(dt)


_compiled = {}


def _fused(fn):
    """fn through torch.compile (inductor), compiled once per function, with automatic dynamic shapes: a second token
    count compiles once more, into a kernel for any count (not one per count: batches padded to their longest sequence
    vary in length). Where compiling fails (CUDA without Triton, no C++ compiler), fn itself after one warning."""
    if fn not in _compiled:
        compiled = torch.compile(fn, dynamic=None)

        def first_call(*args):
            try:
                out, _compiled[fn] = compiled(*args), compiled
            except Exception as e:  # the compiler failed, not the math: fn itself raises again on a real error
                warnings.warn(f"aurora.py: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running unfused")
                out, _compiled[fn] = fn(*args), fn
            return out
        _compiled[fn] = first_call
    return _compiled[fn]
