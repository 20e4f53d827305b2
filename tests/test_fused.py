"""The fused (CUDA) paths of the adapters compute what the plain PyTorch definitions compute.

On CUDA, GenLoRA, AuroRA and RanLoRA run their parameter-side or bottleneck math through torch.compile'd functions
(genlora.generated_factors, aurora.anl_cast, ranlora.modulate), written so that inductor fuses them (the small
matmuls as broadcast sums). Here those functions run eagerly on the CPU, in float32, against the plain path:
forward and every gradient. tools/fused_check.py checks the compiled kernels themselves on a GPU.

    python -m pytest -q tests/test_fused.py
"""
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import aurora  # noqa: E402
import genlora  # noqa: E402
import lrlora  # noqa: E402
import ranlora  # noqa: E402


def grads(out, params, seed):
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, params, gy)


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("normalize", [True, False])
def test_genlora_generated_factors_equal_the_generators(normalize):
    torch.manual_seed(0)
    layer = genlora.GenLoRALinear(nn.Linear(24, 36), r=3, groups=4, num_centers=5, normalize=normalize)
    with torch.no_grad():  # away from the zero init of z_B, theta_B
        layer.z_B.normal_()
        layer.theta_B.normal_()
    params = [layer.z_A, layer.theta_A, layer.z_B, layer.theta_B]
    A, B = genlora.generated_factors(*params[:2], *params[2:], layer.mu, layer.groups, layer.h, layer.eps,
                                     layer.normalize, torch.float32, torch.float32)
    want_A, want_B = layer.A, layer.B
    close(A, want_A)
    close(B, want_B)
    for g, w in zip(grads(A.sum(1, keepdim=True) * B.sum(0), params, 1), grads(want_A.sum(1, keepdim=True) * want_B.sum(0), params, 1)):
        close(g, w)


@pytest.mark.parametrize("kw", [{}, {"fixed": False}, {"learnable": False}, {"fixed_activation": "sigmoid"}])
def test_aurora_anl_cast_equals_sigma(kw):
    torch.manual_seed(1)
    layer = aurora.AuroRALinear(nn.Linear(16, 12), r=3, **kw)
    z = (2 * torch.randn(40, 3)).requires_grad_()  # past the spline grid's [-2.2, 2.2] too
    H, W_s = getattr(layer, "H", None), getattr(layer, "W_s", None)
    params = [z] + [p for p in (H, W_s) if p is not None]
    got = aurora.anl_cast(z, H, W_s, layer.act, torch.float32, torch.float32)
    want = layer.sigma(z)
    close(got, want)
    for g, w in zip(grads(got, params, 2), grads(want, params, 2)):
        close(g, w)


def test_ranlora_modulate_equals_the_bottleneck():
    torch.manual_seed(2)
    layer = ranlora.RanLoRALinear(nn.Linear(16, 12), r=3)
    with torch.no_grad():
        layer.v.normal_()
    z = torch.randn(20, 3, requires_grad=True)
    got = ranlora.modulate(z, layer.v, layer.act, torch.float32, torch.float32)
    want = layer.v * nn.functional.gelu(z)  # Eq. 8's v ⊙ GELU(A x), written out
    close(got, want)
    for g, w in zip(grads(got, [z, layer.v], 3), grads(want, [z, layer.v], 3)):
        close(g, w)


def test_fused_flags_are_on_and_the_cpu_takes_the_plain_path(monkeypatch):
    # on the CPU forward never calls the compiler: _fused is not reached
    assert genlora.GenLoRALinear.fused == aurora.AuroRALinear.fused == ranlora.RanLoRALinear.fused == ("cuda",)
    for mod in (genlora, aurora, ranlora):
        monkeypatch.setattr(mod, "_fused", lambda fn: pytest.fail("compiled on the CPU"))
    torch.manual_seed(3)
    x = torch.randn(2, 5, 16)
    for layer in (genlora.GenLoRALinear(nn.Linear(16, 8), r=2), aurora.AuroRALinear(nn.Linear(16, 8)),
                  aurora.AuroRALinear(nn.Linear(16, 8), mode="static"), ranlora.RanLoRALinear(nn.Linear(16, 8))):
        layer(x).sum().backward()


# ---------------------------------------------------------------- the layers' fused branch, taken on the CPU
# Each layer takes its fused branch on the devices in its class's `fused` tuple (CUDA only, normally). With "cpu" in it
# and _fused returning the function itself, forward runs the fused function eagerly: the same Python a GPU user's
# compiled kernels are traced from. Compared with the plain branch where a bug could hide: at the init point (GenLoRA's
# zero-variance groups, z_B = 0 with theta_B moved; AuroRA and RanLoRA at B = 0) and in bfloat16 as autocast feeds it.
FUSED_LAYERS = {
    "genlora": (genlora, lambda: genlora.GenLoRALinear(nn.Linear(24, 36), r=3, groups=4, num_centers=5)),
    "aurora": (aurora, lambda: aurora.AuroRALinear(nn.Linear(24, 36), r=3)),
    "aurora_static": (aurora, lambda: aurora.AuroRALinear(nn.Linear(24, 36), r=3, mode="static")),
    "ranlora": (ranlora, lambda: ranlora.RanLoRALinear(nn.Linear(24, 36), r=3)),
    "ranlora_kaiming": (ranlora, lambda: ranlora.RanLoRALinear(nn.Linear(24, 36), r=3, init="kaiming")),  # B = 0
}


def fused_run(layer, x, bf16, seed=4):
    """Output, dL/dx and dL/d(every trainable parameter) of one forward and backward, under CPU autocast if bf16."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype))
    named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    return [("out", y.detach()), ("dx", x.grad)] + [(f"d{n}", p.grad) for n, p in named]


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("name", FUSED_LAYERS)
def test_fused_branch_equals_the_plain_branch_at_init_and_in_bf16(name, bf16, monkeypatch):
    mod, make = FUSED_LAYERS[name]
    torch.manual_seed(5)
    layer = make()
    if name == "genlora":  # z_B = 0 (init): every group of z_B has zero variance, Eq. 6's worst case; theta_B moved
        with torch.no_grad():
            layer.theta_B.normal_()
    x = torch.randn(2, 7, 24)
    monkeypatch.setattr(type(layer), "fused", ())
    want = fused_run(layer, x, bf16)
    monkeypatch.setattr(type(layer), "fused", ("cpu",))
    monkeypatch.setattr(mod, "_fused", lambda fn: fn)  # the fused function itself, eagerly
    got = fused_run(layer, x, bf16)
    assert want[0][1].dtype == (torch.bfloat16 if bf16 else torch.float32)
    for (n, g), (_, w) in zip(got, want):
        assert g.dtype == w.dtype and torch.isfinite(g).all(), (name, n)
        if bf16:  # the two branches may round the small bottleneck differently by one bf16 ulp, then it propagates
            tol = 2 ** -7 * max(1.0, w.abs().max().item())
            torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=tol, msg=lambda m: f"{name} {n}: {m}")
        else:
            close(g, w)


def test_fused_functions_round_once_to_bf16():
    """What autocast feeds the fused functions on CUDA: bf16 in, math in float32 (ct), bf16 out (dt), so each output is
    the float32 result rounded once (at most 1 bf16 ulp from the float64 reference; math in bf16 errs several)."""
    torch.manual_seed(6)
    ulp = lambda t: 2.0 ** (torch.floor(torch.log2(t.abs().clamp_min(1e-30))) - 7)  # one bf16 ulp at t
    z = (2 * torch.randn(64, 3)).to(torch.bfloat16).requires_grad_()
    layer = aurora.AuroRALinear(nn.Linear(16, 12), r=3)
    got = aurora.anl_cast(z, layer.H, layer.W_s, layer.act, torch.float32, torch.bfloat16)
    want = aurora.anl(z.double(), layer.H.double(), layer.W_s.double(), layer.act)
    assert got.dtype == torch.bfloat16 and ((got.double() - want).abs() <= ulp(want) + 1e-30).all()
    dz, = torch.autograd.grad(got.float().sum(), z)
    dz_want, = torch.autograd.grad(aurora.anl(z.float(), layer.H, layer.W_s, layer.act).sum(), z)
    assert dz.dtype == torch.bfloat16 and torch.equal(dz, dz_want)  # the gradient of the cast: float32, rounded once
    r = ranlora.RanLoRALinear(nn.Linear(16, 12), r=3)
    got = ranlora.modulate(z, r.v, r.act, torch.float32, torch.bfloat16)
    want = r.v.double() * nn.functional.gelu(z.double())  # float32's GELU is 0 below z ~ -5.5: the 1e-6
    assert got.dtype == torch.bfloat16 and ((got.double() - want).abs() <= ulp(want) + 1e-6).all()
    g = genlora.GenLoRALinear(nn.Linear(24, 36), r=3, groups=4, num_centers=5)
    A, B = genlora.generated_factors(g.z_A, g.theta_A, g.z_B, g.theta_B, g.mu, g.groups, g.h, g.eps, g.normalize,
                                     torch.float32, torch.bfloat16)
    A_want = g.generate(g.z_A, g.theta_A, torch.float64).T
    assert A.dtype == B.dtype == torch.bfloat16 and ((A.double() - A_want).abs() <= ulp(A_want) + 1e-30).all()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["aurora", "ranlora"])
def test_fused_varying_token_counts_compile_once_more_not_once_per_count(name, monkeypatch, fresh_dynamo):
    """Batches padded to their longest sequence vary in length. Automatic dynamic shapes: the first count compiles a
    static graph, the second one graph for any count, and no count after compiles again (dynamic=False: one per count,
    until dynamo's recompile limit). Counted with a backend that records each graph dynamo hands it."""
    mod, make = FUSED_LAYERS[name]
    graphs, real_compile = [], torch.compile

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting, **kw))
    monkeypatch.setattr(mod, "_compiled", {})
    layer = make()
    monkeypatch.setattr(type(layer), "fused", ("cpu",))
    for length in (5, 6, 7, 9, 12, 3):
        layer(torch.randn(2, length, 24)).sum().backward()
    assert len(graphs) == 2, f"{name}: {len(graphs)} compiles for 6 token counts"


def test_fused_falls_back_to_the_plain_path_where_torch_compile_fails(monkeypatch):
    """A copied file on a GPU without Triton (inductor's CUDA backend): torch.compile raises at the first call. The plain
    function runs instead, with one warning, and nothing is compiled again. LR-LoRA's table likewise (asked for CUDA)."""
    def no_triton(fn, **kw):
        def run(*args):
            raise RuntimeError("Cannot find a working triton installation")
        return run
    monkeypatch.setattr(torch, "compile", no_triton)
    x = torch.randn(2, 5, 24)
    for name, (mod, make) in FUSED_LAYERS.items():
        torch.manual_seed(7)
        layer = make()
        monkeypatch.setattr(mod, "_compiled", {})
        monkeypatch.setattr(type(layer), "fused", ())
        want = layer(x)
        monkeypatch.setattr(type(layer), "fused", ("cpu",))
        with pytest.warns(UserWarning, match="torch.compile failed .*triton.*running unfused"):
            got = layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: the plain function is kept
            again = layer(x)
        close(got, want)
        close(again, want)
    monkeypatch.setattr(lrlora, "_compiled", {})
    b, g = torch.ones(5), torch.linspace(-3, 3, 5)
    args = (torch.tensor(-1.0), torch.tensor(0.5), 5, torch.randn(5), b, g)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        got = lrlora._fused(lrlora.sinc_table, torch.device("cuda"))(*args)
    for t, w in zip(got, lrlora.sinc_table(*args)):
        assert torch.equal(t, w)
