"""GenLoRA: "Nonlinearity as Rank: Generative Low-Rank Adapter with Radial Basis Functions"
(Ouyang, Li, Wang, Luo, Hu, Song, Qin, Li and Li, 2026; arXiv:2602.05709).

LoRA stores its r basis vectors explicitly, r(m + n) numbers. GenLoRA keeps one latent
vector per factor, z_B (m) and z_A (n), and *generates* the basis vectors from them with r
pairs of small RBF generators (§3.1):

    b_i = f^B_i(z_B; θ^B_i),   a_i = f^A_i(z_A; θ^A_i)                       (Eq. 2)
    B = [b_1, ..., b_r],   A = [a_1, ..., a_r]^T                             (Eq. 3)
    ΔW = B A = Σ_i b_i a_i^T,   h = W0 x + ΔW x                              (Eq. 4)

Scale: Eq. 4 has no factor, so alpha=None means alpha = r: scale = alpha / r = 1 at every rank.
An explicit alpha gives scale = alpha / r, as LoRA.

A generator splits its latent z into G sub-vectors x_g of length d_g = d / G and maps each
with its own scalar function (§3.2-3.3):

    f_i(z) = concat(φ_{i,1}(x_1), ..., φ_{i,G}(x_G))                          (Eq. 5)
    x̂_g = (x_g − mean(x_g)) / (std(x_g) + ε)                                 (Eq. 6)
    φ_{i,g}(x_g) = w_b · SiLU(x̂_g) + F_RBF(x̂_g)                             (Eq. 7)
    φ_k(x̂) = exp(−((x̂ − μ_k) / h)²),  K centers μ_k uniform on [−3, 3]       (Eq. 8)
    F_RBF(x̂_g) = Σ_k w_k φ_k(x̂_g),   h = 6 / (K − 1), the grid spacing       (Eq. 9)

So each (generator i, group g) holds 1 + K scalars, stored as theta[g, :, i] = (w_b, w_1..w_K):
m + n + 2 r G (1 + K) trainable numbers per layer, not r(m + n). rank(ΔW) ≤ r still
(Prop. 3.1). Init (App. I.3): z_A Kaiming-uniform and θ_A ~ N(0, 1/d_g) per generator;
z_B = 0 and θ_B = 0, so B = 0 and ΔW = 0. The nonlinearity acts on parameters, not on
activations, so ΔW merges exactly into W0 (App. E).

groups=None is the paper's G = 16 where that leaves >= 2 entries per group of both latents, else
the largest G that divides in_features and out_features and does (1 for an 8 -> 3 layer).
The paper's ablations (Table 7, LLaMA-3-8B q,k,v at r = 8): freeze_latents="A" keeps z_A at its init
("Frozen Z_A", 0.59M), "B" keeps z_B ("Frozen Z_B", 0.79M), True keeps both and trains only the generators
("Frozen Z_A, Z_B", 0.39M). A frozen z_B stays 0, and Eq. 6 maps every entry of a zero-variance group to
x̂ = 0, so every generator returns one value per group: B is constant within each of the G groups of rows,
whatever the generators learn, and so is ΔW = B A (the m/G outputs of a group all get the same update row).
The two rows of Table 7 that freeze z_B are its lowest (61.26, and 60.63 with z_A frozen too): this may be
why. normalize=False drops Eq. 6, x̂_g = x_g (Table 4, "w.o. Norm").

The generators run in float32 (in the input's dtype if that is wider, e.g. float64), also under
autocast; only the two x-sized matmuls run in the activations' dtype.
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


def generate(z, theta, mu, groups: int, h: float, eps: float, normalize: bool = True, bmm=torch.bmm):
    """All r generators on one latent z (d,) with θ (G, 1+K, r): the (d, r) matrix whose column i is f_i(z), autocast off."""
    with torch.autocast(z.device.type, enabled=False):  # the parameter-side math stays in z's dtype under autocast
        if normalize:
            # Eqs. 5-6: split z into G groups, normalize each by its own mean and deviation: GroupNorm of one
            # sample, one fused kernel. Its ε sits inside the root, (x - μ)/sqrt(σ² + ε²): Eq. 6's (x - μ)/(σ + ε)
            # up to O(ε/σ), with a finite gradient at σ = 0 (z_B = 0 at init), where d√var/dvar is infinite and
            # a hand-written √var gives NaN. Not specified by the paper: population σ (as InstanceNorm, Alg. 1)
            x_hat = F.group_norm(z[None], groups, eps=eps ** 2).view(groups, -1)  # (G, d_g)
        else:
            x_hat = z.view(groups, -1)  # Table 4 "w.o. Norm": Eq. 5's groups, Eq. 6 dropped
        # Eqs. 7-8: the responses SiLU(x̂) and φ_1..φ_K(x̂) are computed once, shared by all r generators
        rbf = torch.exp(-((x_hat[..., None] - mu) / h) ** 2)  # (G, d_g, K)       Eq. 8
        basis = torch.cat([F.silu(x_hat)[..., None], rbf], dim=-1)  # (G, d_g, 1 + K)
        # Eqs. 7, 9 and 5: φ_{i,g} = w_b SiLU(x̂_g) + Σ_k w_k φ_k(x̂_g), groups concatenated along d
        return bmm(basis, theta).view(z.shape[0], -1)  # (G, d_g, r) -> (d, r)


class GenLoRALinear(nn.Module):
    exact_merge = True  # merged() reproduces forward() for every input: B and A are fixed matrices once trained
    eps = 1e-5  # ε of Eq. 6 (not specified by the paper: its value)
    paper_groups = 16  # G of the paper's main setting (App. I.3)
    fused = ("cuda",)  # devices where forward's generators run compiled (generated_factors, below); () for none

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = None, dropout: float = 0.0,
                 groups: int = None, num_centers: int = 15, freeze_latents=False, normalize: bool = True):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"GenLoRALinear: base must be a torch.nn.Linear, got {type(base).__module__}.{type(base).__name__}"
                            + CONV1D_HINT * (type(base).__name__ == "Conv1D"))
        m, n = base.out_features, base.in_features
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r={r!r}: the rank (number of generator pairs) must be an integer >= 1")
        # not specified by the paper: >= 2 entries per group, else Eq. 6 maps every entry to 0
        valid = [g for g in range(1, math.gcd(m, n) + 1) if m % g == n % g == 0 and min(m, n) // g >= 2]
        if groups is None and valid:  # the paper's 16 where it fits this layer, else the largest count that does
            groups = self.paper_groups if self.paper_groups in valid else valid[-1]
        if not isinstance(groups, int) or groups not in valid:
            raise ValueError(f"groups={groups!r}: must divide in_features={n} and out_features={m} leaving "
                             f">= 2 entries per group; valid: {valid}")
        if not isinstance(num_centers, int) or num_centers < 2:
            raise ValueError(f"num_centers={num_centers!r}: the RBF grid needs an integer >= 2 centers")
        if alpha == 0:  # scale 0: the update, and every adapter gradient, would be 0
            raise ValueError("alpha=0: scale = alpha / r = 0, so the adapter would train nothing; use alpha > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: must be in [0, 1)")
        if freeze_latents not in (False, True, "A", "B"):
            raise ValueError(f"freeze_latents={freeze_latents!r}: must be False, 'A', 'B' or True (both)")
        self.base = base.requires_grad_(False)  # W0 (and its bias) stay frozen
        self.alpha = r if alpha is None else alpha  # Eq. 4: ΔW = B A, scale 1 at every rank
        self.r, self.scale = r, self.alpha / r
        self.groups, self.num_centers = groups, num_centers
        self.freeze_latents = freeze_latents if freeze_latents in ("A", "B") else bool(freeze_latents)  # False, "A", "B", True
        self.normalize = bool(normalize)
        train_A, train_B = self.freeze_latents not in (True, "A"), self.freeze_latents not in (True, "B")
        # adapter parameters live in float32 whatever the base dtype: Adam on bf16 weights loses updates
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.z_B = nn.Parameter(torch.zeros(m, **kw), requires_grad=train_B)  # latent of B, zero (App. I.3)
        self.z_A = nn.Parameter(torch.empty(n, **kw), requires_grad=train_A)  # latent of A
        # not specified by the paper: Kaiming's a=√5 and fan_in = n (z_A as a 1×n matrix), as LoRA's A
        nn.init.kaiming_uniform_(self.z_A.view(1, n), a=math.sqrt(5))
        # θ[g, :, i] = (w_b, w_1, ..., w_K) of φ_{i,g} (Eqs. 7, 9), laid out (G, 1+K, r) so that Eq. 5 is one
        # batched matmul without copies. B side zero; A side N(0, 1/d_g), i.i.d. for every generator
        self.theta_B = nn.Parameter(torch.zeros(groups, 1 + num_centers, r, **kw))
        self.theta_A = nn.Parameter(torch.randn(groups, 1 + num_centers, r, **kw) / math.sqrt(n // groups))
        self.register_buffer("mu", torch.linspace(-3.0, 3.0, num_centers, **kw), persistent=False)  # Eq. 8
        self.h = 6.0 / (num_centers - 1)  # bandwidth = grid spacing (App. I.3)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def generate(self, z: torch.Tensor, theta: torch.Tensor, dtype=None) -> torch.Tensor:
        """All r generators on one latent z (d,): the (d, r) matrix whose column i is f_i(z), computed in dtype
        (default: the parameters' dtype) with autocast off."""
        dtype = dtype or z.dtype
        return generate(z.to(dtype), theta.to(dtype), self.mu.to(dtype), self.groups, self.h, self.eps, self.normalize)

    @property
    def B(self) -> torch.Tensor:
        return self.generate(self.z_B, self.theta_B)  # (out, r), column i = b_i     Eqs. 2-3

    @property
    def A(self) -> torch.Tensor:
        return self.generate(self.z_A, self.theta_A).T  # (r, in), row i = a_i      Eqs. 2-3

    def forward(self, x):
        # x -> A -> B: two thin matmuls, the (out x in) update is never built. The generators run in float32
        # (or x's dtype if wider); the small generated A and B are cast to the activations' dtype, as
        # autocast would, so the x-sized matmuls run there: a float32 copy of x per adapter cost more than GenLoRA
        # itself (bench.py, H100, bf16 LLaMA-1B: 437 -> 339 ms/step, 68.4 -> 54.4 GiB peak)
        ct = torch.promote_types(x.dtype, torch.float32)
        x2 = x.reshape(-1, x.shape[-1])
        h = self.base(x2)  # the second matmul adds into W0 x in place (addmm_, beta = 1, alpha = scale), as in lora.py
        if x.device.type in self.fused:  # the same generators, compiled: a few kernels a step instead of ~40 per layer
            A, B = _fused(generated_factors)(self.z_A, self.theta_A, self.z_B, self.theta_B, self.mu, self.groups,
                                             self.h, self.eps, self.normalize, ct, h.dtype)
        else:
            A, B = self.generate(self.z_A, self.theta_A, ct).T.to(h.dtype), self.generate(self.z_B, self.theta_B, ct).to(h.dtype)
        h.addmm_(F.linear(self.dropout(x2), A), B.T, alpha=self.scale)  # Eq. 4
        return h.view(*x.shape[:-1], -1)

    def delta_weight(self) -> torch.Tensor:
        with torch.autocast(self.z_A.device.type, enabled=False):  # float32 also when called under autocast
            return self.scale * (self.B @ self.A)  # ΔW = scale · B A (Eq. 4), float32

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new nn.Linear holding W0 + ΔW (cast once to the base dtype); the original is untouched."""
        w0 = self.base.weight
        out = nn.Linear(w0.shape[1], w0.shape[0], bias=self.base.bias is not None, device=w0.device, dtype=w0.dtype)
        out.weight.copy_((w0.float() + self.delta_weight()).to(w0.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out.requires_grad_(False)

    def extra_repr(self):
        return (f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, groups={self.groups}, "
                f"num_centers={self.num_centers}, freeze_latents={self.freeze_latents}, normalize={self.normalize}")


# Speed: on CUDA, forward generates A and B through generated_factors, compiled by torch.compile into a few kernels
# (the plain generators launch ~40 small kernels a layer). It is the same math as generate() above, with the one
# batched matmul written as a broadcast sum so that inductor fuses it; generate() stays the definition and the CPU path.

def _small_bmm(basis, theta):
    """torch.bmm as a broadcast product and sum over its 1 + K terms: a pointwise reduction that torch.compile fuses
    into the generator's one kernel, where a bmm would be a launch of its own (the fused path)."""
    return (basis[..., None] * theta[:, None]).sum(-2)


def generated_factors(z_A, theta_A, z_B, theta_B, mu, groups, h, eps, normalize, ct, dt):
    """A (r, in) and B (out, r), generated in ct and cast to dt: forward's parameter side, in one function, so that
    torch.compile can fuse all of it (GenLoRALinear.fused)."""
    gen = lambda z, theta: generate(z.to(ct), theta.to(ct), mu.to(ct), groups, h, eps, normalize, _small_bmm)
    return gen(z_A, theta_A).T.to(dt), gen(z_B, theta_B).to(dt)


_compiled = {}


def _fused(fn):
    """fn through torch.compile (inductor), one graph per layer shape and dtype (dynamic=False: the shapes are the
    layer's, never the batch's). Where compiling fails (CUDA without Triton, no C++ compiler), fn itself after one
    warning: the same math, unfused."""
    if fn not in _compiled:
        compiled = torch.compile(fn, dynamic=False)

        def first_call(*args):
            try:
                out, _compiled[fn] = compiled(*args), compiled
            except Exception as e:  # the compiler failed, not the math: fn itself raises again on a real error
                warnings.warn(f"genlora.py: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running unfused")
                out, _compiled[fn] = fn(*args), fn
            return out
        _compiled[fn] = first_call
    return _compiled[fn]
