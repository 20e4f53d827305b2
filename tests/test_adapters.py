"""The adapter contract: every adapter and mode, the same checks.

Run alone: python -m pytest -q tests/test_adapters.py (test_all.py runs every topic)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import train
from aurora import AuroRALinear
from genlora import GenLoRALinear
from lora import LoRALinear
from lrlora import LRLoRALinear
from ranlora import RanLoRALinear

from conftest import randomize_, tiny_gpt


# ----------------------------------------------------------------------------------------------
# Every adapter: the papers' scale rules, float32 adapter math under autocast, float64, defaults on any layer.
# Each mode of each adapter, in one place; the references are the papers' rules written out here,
# the ops torch actually ran (recorded below autocast), torch.autograd.gradcheck, and float64 recomputation.

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402  (records the ops torch runs)

# (name, class, constructor keywords): every adapter and mode this repository has, lrlora excepted (its own issue)
ADAPTER_MODES = [
    ("lora", LoRALinear, {}),
    ("genlora", GenLoRALinear, {}),
    ("genlora-frozen-latents", GenLoRALinear, dict(freeze_latents=True)),
    ("genlora-no-norm", GenLoRALinear, dict(normalize=False)),
    *[(f"aurora-{mode}-{act}", AuroRALinear, dict(mode=mode, fixed_activation=act))
      for mode in ("dynamic", "static") for act in ("tanh", "leaky_relu", "sigmoid")],
    *[(f"aurora-{mode}-{part}", AuroRALinear, dict(mode=mode, **{part: False}))
      for mode in ("dynamic", "static") for part in ("fixed", "learnable")],
    *[(f"ranlora-{act}", RanLoRALinear, dict(activation=act)) for act in ("gelu", "identity", "relu", "tanh")],
    ("ranlora-no-v", RanLoRALinear, dict(modulation=False)),
    ("ranlora-kaiming", RanLoRALinear, dict(init="kaiming")),
    ("ranlora-identity-no-v-kaiming", RanLoRALinear, dict(activation="identity", modulation=False, init="kaiming")),
]
ADAPTER_IDS = [name for name, _, _ in ADAPTER_MODES]

@pytest.mark.parametrize("name, rule", [
    ("lora", lambda r: 16 / r),  # LoRA §4.1: alpha constant in r; 16 is LLM-Adapters' value (r = 8, alpha = 16)
    ("genlora", lambda r: 1.0),  # GenLoRA Eq. 4: ΔW = B A, no factor
    ("aurora", lambda r: 2.0),  # AuroRA App. G: r = 2, alpha = 4 "correspondingly"; alpha = 2r (RanLoRA Tables 12, 15)
    ("ranlora", lambda r: 2.0),  # RanLoRA App. C.3: s = 2; alpha = 2r̂ (Tables 12, 15)
])
def test_scale_follows_each_papers_rule_at_every_rank(name, rule):
    """train.py --rank N passes only r: each method then gets its paper's scale at N; --alpha still wins."""
    for r in (1, 2, 4, 8):
        model = tiny_gpt()
        model.requires_grad_(False)
        for kwargs, want in (({"r": r}, rule(r)), ({"r": r, "alpha": 3.0}, 3.0 / r)):
            adapters = train.inject(copy.deepcopy(model), name, ["q", "v"], kwargs)
            assert all(a.scale == pytest.approx(want) for a in adapters.values()), (name, kwargs)


class RecordOps(TorchDispatchMode):
    """Every aten op torch runs, after autocast has picked its dtype: (name, input shapes, output shape, dtype)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.is_floating_point():
                self.ops.append((func.overloadpacket.__name__, [tuple(t.shape) for t in ins], tuple(o.shape), o.dtype))
        return out


# ops that move or reshape values without arithmetic: they may run in any dtype
NO_ARITHMETIC = {"_to_copy", "view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
                 "clone", "detach", "alias", "select", "slice", "as_strided", "copy_", "cat", "lift_fresh", "split",
                 "unbind", "empty", "empty_like", "zeros_like", "ones_like", "_reshape_alias"}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmm_"}


def low_precision_small_math(ops, tokens, n_in, n_out):
    """The arithmetic ops that ran in bfloat16 but are not one of the x-sized ones: a matmul that reads x (tokens
    x in) or writes an activation (tokens x out), or the final sum base(x) + adapter (tokens x out)."""
    bad = []
    for name, in_shapes, out_shape, dtype in ops:
        if dtype != torch.bfloat16 or name in NO_ARITHMETIC:
            continue
        writes_activation = math.prod(out_shape) == tokens * n_out and out_shape[-1] == n_out
        x_sized = name in MATMULS and (writes_activation or (tokens, n_in) in in_shapes) or name == "add" and writes_activation
        if not x_sized:
            bad.append((name, in_shapes, out_shape))
    return bad


@pytest.mark.parametrize("name, cls, kw", ADAPTER_MODES, ids=ADAPTER_IDS)
def test_adapter_small_tensor_math_runs_in_float32_under_autocast(name, cls, kw):
    """Under torch.autocast(bfloat16) only the x-sized matmuls may run in bf16: GenLoRA's generators, AuroRA's
    F.linear(., H) / F.linear(., W_s) / splines, RanLoRA's GELU and v stay float32. Fails if any of them runs in
    bf16 (autocast lowers every matmul it sees, so each needs autocast off around it)."""
    torch.manual_seed(0)
    n_in, n_out, tokens = 24, 20, 35  # widths unlike r, G, d_g, 8 and K + 1, so no small tensor passes for x
    m = randomize_(cls(nn.Linear(n_in, n_out), **kw), std=0.5, seed=0)
    x = torch.randn(5, 7, n_in)
    with torch.autocast("cpu", dtype=torch.bfloat16), RecordOps() as rec:
        y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert low_precision_small_math(rec.ops, tokens, n_in, n_out) == []
    ran_in_float32 = {op for op, _, _, dtype in rec.ops if dtype == torch.float32}
    if cls is GenLoRALinear:
        expected = {"bmm", "exp", "silu"}  # Eqs. 7-9: the RBF responses and the generators' batched matmul
    elif cls is AuroRALinear:  # sigma: F.linear(., H) / F.linear(., W_s), the activation, the splines
        expected = {"mm"} | ({"relu", "pow"} if m.learnable else set()) | ({m.fixed_activation} if m.fixed else set())
    elif cls is RanLoRALinear:  # GELU (or the Table 7 activation) and v
        expected = ({m.activation} - {"identity"}) | ({"mul"} if m.modulation else set())
    else:
        expected = set()  # LoRA: no small math (its scale is the second matmul's alpha)
    assert expected <= ran_in_float32, (expected - ran_in_float32)  # the small math did run, in float32
    if m.exact_merge or cls is AuroRALinear:  # delta_weight() exists: float32 too when called under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16), RecordOps() as rec:
            dW = m.delta_weight()
        assert dW.dtype == torch.float32 and all(d == torch.float32 for *_, d in rec.ops)


@pytest.mark.parametrize("cls, kw", [(LoRALinear, {}), (GenLoRALinear, {}), (LRLoRALinear, {}), (AuroRALinear, {}),
                                     (AuroRALinear, dict(mode="static")), (RanLoRALinear, {})],
                         ids=["lora", "genlora", "lrlora", "aurora-dynamic", "aurora-static", "ranlora"])
def test_adapter_under_torch_compile_matches_eager(cls, kw):
    """--compile (train.py and bench.py) runs every adapter through torch.compile: the compiled forward and every
    gradient equal eager's (on the compiler's CPU backend; CUDA takes the same graphs)."""
    torch.manual_seed(0)
    m = randomize_(cls(nn.Linear(16, 12), **kw), std=0.2, seed=0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    grads = []
    for fn in (m, torch.compile(m)):
        y = fn(x)
        grads.append((y, *torch.autograd.grad(y.square().sum(), [x, *[p for p in m.parameters() if p.requires_grad]])))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)  # float32 reassociation in the fused kernels


@pytest.mark.parametrize("name, cls, kw", ADAPTER_MODES, ids=ADAPTER_IDS)
def test_adapter_float64_forward_backward_and_gradcheck(name, cls, kw):
    """.double() then forward/backward work, and torch.autograd.gradcheck passes for the input and every trainable
    parameter, B nonzero: the small-tensor math runs in the input's dtype when that is wider than float32."""
    torch.manual_seed(0)
    if cls is GenLoRALinear:
        kw = dict(kw, r=2)  # fewer generator weights to perturb; groups=None gives 2 on 6 -> 4
    m = randomize_(cls(nn.Linear(6, 4), **kw), std=0.5, seed=0).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    with RecordOps() as rec:
        y = m(x)
        y.pow(2).sum().backward()
    assert y.dtype == torch.float64 and x.grad is not None
    assert all(dtype == torch.float64 for *_, dtype in rec.ops), {op for op, *_, d in rec.ops if d != torch.float64}
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_(True) for n, p in m.named_parameters() if p.requires_grad]
    assert "B" in names or "theta_B" in names
    fn = lambda x, *ps: functional_call(m, dict(zip(names, ps)), (x,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.detach().requires_grad_(True), *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [LoRALinear, GenLoRALinear, AuroRALinear, RanLoRALinear, LRLoRALinear],
                         ids=["lora", "genlora", "aurora", "ranlora", "lrlora"])
@pytest.mark.parametrize("widths", [(32, 64, 16), (8, 3)], ids=["32-64-16", "8-3"])
def test_adapter_defaults_fit_small_and_non_square_layers(cls, widths):
    """Each adapter with its defaults only, around every layer of a small net: it builds, trains (the loss falls),
    and, where the method merges exactly, merges to the same outputs."""
    torch.manual_seed(0)
    layers = [cls(nn.Linear(a, b)) for a, b in zip(widths, widths[1:])]
    net = nn.Sequential(*[mod for layer in layers for mod in (layer, nn.Tanh())][:-1])
    x, y = torch.randn(64, widths[0]), torch.randn(64, widths[-1])
    lr = 1e-3 if cls is LRLoRALinear else 1e-2  # LR-LoRA's amplitudes diverge at 1e-2 (README)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(30):
        loss = (net(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    for layer in layers:
        if layer.exact_merge:
            z = torch.randn(4, layer.base.in_features)
            torch.testing.assert_close(layer.merged()(z), layer(z), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the base must be an nn.Linear
ALL_CLASSES = [LoRALinear, GenLoRALinear, LRLoRALinear, AuroRALinear, RanLoRALinear]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_adapters_refuse_a_base_that_is_not_linear_and_the_conv1d_hint_is_exact(cls):
    """transformers' Conv1D (GPT-2) holds its weight transposed: wrapping it as if it were a Linear would train the
    transpose (or fail on a missing attribute). One TypeError naming the type; for Conv1D, the conversion, which run as
    printed gives an nn.Linear equal to the Conv1D."""
    from transformers.pytorch_utils import Conv1D
    with pytest.raises(TypeError, match=rf"^{cls.__name__}: base must be a torch.nn.Linear, got torch.nn.modules.conv.Conv2d$"):
        cls(nn.Conv2d(3, 4, 1))
    conv = Conv1D(12, 8)  # nx = 8 inputs, nf = 12 outputs; weight (8, 12)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    with pytest.raises(TypeError, match=r"got transformers\.pytorch_utils\.Conv1D; .*convert it exactly") as e:
        cls(conv)
    code = str(e.value).split("then wrap: ")[1]
    scope = {"nn": nn, "conv": conv}
    exec(code.replace("; ", "\n"), scope)
    x = torch.randn(5, 8)
    assert isinstance(scope["lin"], nn.Linear) and torch.allclose(scope["lin"](x), conv(x), atol=1e-6)
    cls(scope["lin"])  # and it wraps


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_adapters_refuse_alpha_zero(cls):
    """alpha = 0 is scale 0: the update and every adapter gradient would be 0, a run that trains nothing and says nothing."""
    with pytest.raises(ValueError, match=r"^alpha=0: scale"):
        cls(nn.Linear(8, 8), alpha=0)
    cls(nn.Linear(8, 8), alpha=-1.0)  # a negative scale flips the update's sign: trainable, so allowed
