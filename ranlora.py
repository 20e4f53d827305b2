"""RanLoRA: "RanLoRA: Residual-aware Nonlinear Low-Rank Adaptation" (Xu Luo, Yongbin Liu,
Chunping Ouyang and Ying Yu, 2026; ACL Anthology), §3.

Residual-aware initialization (§3.2). The pretrained weight is split by its SVD

    W0 = U S V^T                                                         (Eq. 3)
    W_R = U_r S_r V_r^T     the r smallest singular triplets (residual)  (Eq. 5)
    W_P = W0 - W_R          the principal part, frozen                   (Eqs. 4, 6)
    B = U_r (S_r/s)^1/2,  A = (S_r/s)^1/2 V_r^T,  so s * B A = W_R       (Eq. 7, scale s)

Eq. 7 as printed has no division by s: B = U_r S_r^1/2, A = S_r^1/2 V_r^T, so s B A = s W_R
(init="literal"; W_P = W0 - W_R all the same). The paper is silent on which it means. With s = 2 the
literal reading cancels the first-order init gap (s GELU'(0) = 2 * 1/2 = 1: s B GELU(A x) ~ B A x = W_R x);
ours (init="residual", the default) makes the linear path s B A equal W_R instead. init="principal" is
Table 16's principal-aware init: the r LARGEST triplets go to A, B (scale-aware as the default) and the
frozen base keeps W0 minus them.

Architecture (§3.3): a nonlinearity and a learnable modulation vector v in the bottleneck

    h = W_P x + s * B (v ⊙ GELU(A x))                                    (Eq. 8)

with s = alpha / r. Scale: alpha = 2r at every rank (Tables 12, 15: alpha = 2r̂ for r̂ = 2..16),
so s = 2 (App. C.3); alpha=None means 2r, an explicit alpha still wins. Trainable: A, B, v, i.e.
r(in + out) + r scalars (§3.5). GELU is the paper's choice; ReLU and Tanh are its Table 7, and
activation="identity" is its "w/o act" ablation (Table 6). Table 6's other ablations:
modulation=False ("w/o v": no v, h = W_P x + s B GELU(A x)) and init="kaiming" ("w/o rai": no SVD,
A Kaiming-uniform, B = 0, the base W0 kept as it is, as LoRA; the layer then starts as the base).

At init the layer is NOT exactly the pretrained one: it computes W0 x + s B (GELU(A x) - A x)
(literal: W0 x + B (s GELU(A x) - A x)). init_gap(x) returns that difference. GELU acts on the activations A x, so there is no
weight-space update to merge: exact_merge is False and delta_weight() raises. With
activation="identity", dW = s B diag(v) A on top of W_P merges exactly.

A x -> GELU -> v runs in float32 (in the input's dtype if that is wider, e.g. float64), also under
autocast; only the x-sized matmuls run in the activations' dtype.
This file imports only torch and the standard library and can be copied alone into another project.
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc) is a linear layer whose weight is stored transposed, (in, out)
CONV1D_HINT = ("; a transformers Conv1D (GPT-2) is the linear map x @ conv.weight + conv.bias: convert it exactly, then wrap: "
               "lin = nn.Linear(*conv.weight.shape); lin.weight.data = conv.weight.T.contiguous(); lin.bias.data = conv.bias")

# Eq. 8, Tables 6-7; not specified by the paper: which GELU; the exact (erf) one, torch's and HF's default
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "identity": nn.Identity}
INITS = ("residual", "literal", "principal", "kaiming")  # §3.2 with s B A = W_R; Eq. 7 as printed; Table 16; Table 6 "w/o rai"


def singular_triplets(W: torch.Tensor, r: int, largest: bool = False):
    """U_r (m x r), S_r (r,) descending, V_r^T (r x n): the r smallest singular triplets of W (Eqs. 3, 5), or the r
    largest (Table 16's principal-aware init), and W's largest singular value. float32 in and out."""
    if W.device.type not in ("mps", "meta"):  # MPS has no float64 and meta no values: both take the SVD below
        # torch has no partial SVD, but the smaller Gram matrix has the same small end, M^T M = V S^2 V^T, and
        # its eigh is faster (one CPU thread: 1.7-4x). Formed in float64 because squaring the spectrum in
        # float32 loses its small end (wrong directions on a trained-like spectrum); in float64, sin θ ~1e-10
        # to a float64 SVD (a float32 SVD: ~1e-4): the same triplets as an SVD of W0, more accurate
        tall = W.shape[0] >= W.shape[1]
        M = W.double() if tall else W.double().T  # (large x small)
        lam, V = torch.linalg.eigh(M.T @ M)  # eigenvalues ascending
        pick = slice(lam.numel() - r, None) if largest else slice(0, r)
        S_r, V_r, S_max = lam[pick].clamp_min(0).sqrt().flip(0), V[:, pick].flip(1), lam[-1].sqrt()
        # u_i = M v_i / s_i, unless s_i^2 sits at the float64 Gram's rounding level (W rank-deficient): then u_i
        # is arbitrary and the SVD picks one
        if lam[pick].min() > lam[-1] * max(W.shape) * torch.finfo(torch.float64).eps:
            U_r = M @ V_r / S_r
            U_r, Vh_r = (U_r, V_r.T) if tall else (V_r, U_r.T)
            return U_r.float(), S_r.float(), Vh_r.float(), S_max.float()
    # thin SVD: full_matrices=False skips the larger square factor Eq. 3 writes (822 MB for LLaMA-3-8B's down_proj)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # Eq. 3, S descending
    pick = slice(0, r) if largest else slice(S.numel() - r, None)
    return U[:, pick], S[pick], Vh[pick], S[0]


def modulate(z, v, act, ct, dt):
    """v ⊙ act(z) (Eq. 8's bottleneck; act(z) alone if v is None), computed in ct and cast to dt."""
    z = z.to(ct)
    return (act(z) if v is None else v.to(ct) * act(z)).to(dt)


class RanLoRALinear(nn.Module):
    exact_merge = False  # merged() reproduces forward() for every input: not for the default GELU (set per instance)
    fused = ("cuda",)  # devices where training's v ⊙ GELU runs compiled (modulate, below); () for none

    def __init__(self, base: nn.Linear, r: int = 2, alpha: float = None, dropout: float = 0.0, activation: str = "gelu",
                 modulation: bool = True, init: str = "residual"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"RanLoRALinear: base must be a torch.nn.Linear, got {type(base).__module__}.{type(base).__name__}"
                            + CONV1D_HINT * (type(base).__name__ == "Conv1D"))
        m, n = base.out_features, base.in_features
        if not isinstance(r, int) or r < 1 or r > min(m, n):
            raise ValueError(f"r={r!r}: the rank must be an integer in [1, {min(m, n)}]")
        if alpha == 0:  # scale 0: the update, and every adapter gradient, would be 0
            raise ValueError("alpha=0: scale = alpha / r = 0, so the adapter would train nothing; use alpha > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: must be in [0, 1)")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: unknown activation (choose from {', '.join(ACTIVATIONS)})")
        if init not in INITS:
            raise ValueError(f"init={init!r}: choose 'residual' (the paper's SVD init, §3.2, s B A = W_R), 'literal' (Eq. 7 as "
                             "printed, s B A = s W_R), 'principal' (Table 16, the largest triplets) or 'kaiming' (Table 6 'w/o rai')")
        self.alpha = 2 * r if alpha is None else alpha  # alpha = 2r: s = 2 at every rank (App. C.3, Tables 12, 15)
        self.r, self.scale, self.activation = r, self.alpha / r, activation
        self.modulation, self.init = bool(modulation), init
        self.exact_merge = activation == "identity"  # identity: h = (W_P + s B diag(v) A) x, a plain linear map

        W0 = base.weight.detach().float()
        # W_R = init_scale * B A at init: s (residual, principal) or 1 (literal Eq. 7, so that s B A = s W_R)
        self.init_scale = 1.0 if init == "literal" else self.scale
        if init != "kaiming":  # residual-aware initialization (§3.2), where the weight lives (GPU when there is one)
            # the r smallest singular triplets (Eq. 5); principal: the r largest (Table 16)
            U_r, S_r, Vh_r, S_max = singular_triplets(W0, r, largest=init == "principal")
            # not specified by the paper: the sign of each pair (u_i, v_i). GELU is not odd, so the sign changes
            # the model; make the largest |entry| of each u_i positive so every library and device agree
            sign = U_r.gather(0, U_r.abs().argmax(0, keepdim=True)).sign()
            U_r, Vh_r = U_r * sign, Vh_r * sign.T
            W_R = (U_r * S_r) @ Vh_r  # Eq. 5
            # W_P is the complement of W_R, so W0 = W_P + W_R holds exactly (Eq. 6); Eq. 4's printed
            # indices (m = d_out - r - 1) would drop one more triplet
            W_P = W0 - W_R
            root = (S_r / self.init_scale).clamp_min(0).sqrt()  # scale-aware Eq. 7: s * B A = U_r S_r V_r^T (literal: B A)
            B, A = U_r * root, root[:, None] * Vh_r  # (out x r), (r x in), Eq. 7
        else:  # Table 6 "w/o rai": A Kaiming-uniform, B = 0, as LoRA (and AuroRA); the base keeps W0
            W_P, B, A = W0, W0.new_zeros(m, r), W0.new_empty(r, n)  # float32, on the weight's device
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # not specified by the paper: a = √5, as LoRA and nn.Linear
        # not specified by the paper: W_P goes into a NEW frozen Linear (base dtype, bias copied); the
        # caller's layer is left untouched, so it can still serve as the reference "base" model
        self.base = torch.nn.utils.skip_init(nn.Linear, n, m, bias=base.bias is not None, device=W0.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.base.weight.copy_(W_P)  # Eq. 4 / 6 (W0 itself for init="kaiming"), cast once to the base dtype
            if base.bias is not None:
                self.base.bias.copy_(base.bias)
        self.base.requires_grad_(False)
        # adapter parameters live in float32 whatever the base dtype: Adam on bf16 factors loses updates
        self.B, self.A = nn.Parameter(B), nn.Parameter(A)
        # not specified by the paper: v = 1. modulation=False is Table 6's "w/o v": no v at all
        self.v = nn.Parameter(W0.new_ones(r)) if modulation else None
        self.act = ACTIVATIONS[activation]()
        # not specified by the paper: where dropout goes; as LoRA, on the adapter path's input
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init in ("residual", "literal") and W0.device.type != "meta" and S_r.max() <= S_max * max(m, n) ** 0.5 * torch.finfo(torch.float32).eps:
            # float32 rounding level: the residual directions are noise, and A = B = 0 would be a stationary point
            warnings.warn(f"RanLoRA: the {r} smallest singular values of this {m}x{n} weight are at rounding level (rank-deficient): "
                          "the residual directions are arbitrary and A, B start at (almost) zero")

    def forward(self, x):
        # the x-sized matmuls run in the activations' dtype (float32 factors cast down, as autocast would); GELU and v
        # on the small (..., r) tensor in float32, or in x's dtype if wider (element-wise: autocast leaves them be)
        x2 = x.reshape(-1, x.shape[-1])
        h = self.base(x2)  # W_P x; s B (v ⊙ GELU(A x)) is added into it in place (addmm_, beta = 1, alpha = s)
        dt, ct = h.dtype, torch.promote_types(x.dtype, torch.float32)
        z = F.linear(self.dropout(x2), self.A.to(dt))  # A x
        gate = _fused(modulate) if x.device.type in self.fused and torch.is_grad_enabled() else modulate  # training only
        h.addmm_(gate(z, self.v, self.act, ct, dt), self.B.to(dt).T, alpha=self.scale)  # W_P x + s B (v ⊙ GELU(A x)) (Eq. 8)
        return h.view(*x.shape[:-1], -1)

    @torch.no_grad()
    def init_gap(self, x) -> torch.Tensor:
        """B (v ⊙ (s act(A x) - k A x)) in float32, k = init_scale: what the nonlinearity adds to the linear residual path.

        Before training (v = 1, k B A = W_R) this is exactly forward(x) - W0 x, the gap between the wrapped layer
        and the pretrained one; it is zero for init="kaiming" (B = 0) and for activation="identity" unless literal."""
        with torch.autocast(x.device.type, enabled=False):
            z = F.linear(x.to(self.A.dtype), self.A)
            u = self.scale * self.act(z) - self.init_scale * z
            return F.linear(u if self.v is None else self.v * u, self.B)

    def delta_weight(self) -> torch.Tensor:
        if not self.exact_merge:
            raise NotImplementedError(
                f"RanLoRA with activation={self.activation!r} has no weight-space update: {self.activation} acts on the "
                f"activations A x, so B (v ⊙ {self.activation}(A x)) depends on x and equals dW x for no fixed dW; "
                "the adapter stays at inference (activation='identity', the paper's 'w/o act', merges exactly)")
        with torch.autocast(self.A.device.type, enabled=False):  # float32 also when called under autocast
            return self.scale * ((self.B if self.v is None else self.B * self.v) @ self.A)  # dW = s B diag(v) A, on W_P

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new nn.Linear holding W_P + dW (cast once to the base dtype); raises where there is no dW."""
        dW, w = self.delta_weight(), self.base.weight
        out = nn.Linear(w.shape[1], w.shape[0], bias=self.base.bias is not None, device=w.device, dtype=w.dtype)
        out.weight.copy_((w.float() + dW).to(w.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out.requires_grad_(False)

    def extra_repr(self):
        return (f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, activation={self.activation}, "
                f"modulation={self.modulation}, init={self.init}")


# Speed: on CUDA, training runs v ⊙ GELU through modulate compiled by torch.compile: one kernel where the plain
# expression launches several. The same function is the plain path on the CPU.

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
                warnings.warn(f"ranlora.py: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running unfused")
                out, _compiled[fn] = fn(*args), fn
            return out
        _compiled[fn] = first_call
    return _compiled[fn]
