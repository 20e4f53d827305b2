"""LR-LoRA (lrlora.py).

Run alone: python -m pytest -q tests/test_lrlora.py (test_all.py runs every topic)."""
import contextlib
import copy
import math
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import diagnostics
import train
from lora import LoRALinear
from lrlora import LRLoRALinear, stable_rank

from conftest import HERE, randomize_, run_script


# ----------------------------------------------------------------------------------------------
# LR-LoRA
# Tests for lrlora.py (LR-LoRA). References are written plainly here, in float64, from the paper's Eq. 4 and 5.


def lrlora_f_reference(M, a, beta, g):
    """Eq. 4 the obvious way, in float64: an (out, in, K) tensor of sinc terms, summed."""
    return (a * torch.sinc(F.softplus(beta) * (M[..., None] - g))).sum(-1)


def lrlora_moved(layer, seed=0, scale=0.5):
    """Give every adapter parameter a nonzero value, as after some training (|B A| up to about 3 at scale 0.5): randomize_
    drawing A, B, a, beta in that order, in float64, with beta shifted by 0.5."""
    return randomize_(layer, std=scale, seed=seed, names=("A", "B", "a", "beta"), dtype=torch.float64, add={"beta": 0.5})


def lrlora_rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(r=2.0), dict(grid_size=1), dict(grid_size=4.0),
                                    dict(grid_range=0.0), dict(grid_range=-3.0), dict(dropout=1.0), dict(dropout=-0.1)])
def test_lrlora_bad_arguments_raise(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        LRLoRALinear(nn.Linear(8, 8), **kwargs)


def test_lrlora_parameter_count_grid_and_init_values():
    layer = LRLoRALinear(nn.Linear(2048, 8192, device="meta"))
    lora = LoRALinear(nn.Linear(2048, 8192, device="meta"))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert count(layer) == count(lora) + 2 * 50  # a_k and beta_k (§3.3, App. G)
    fixed = LRLoRALinear(nn.Linear(2048, 8192, device="meta"), learn_bandwidth=False)
    assert count(fixed) == count(lora) + 50  # Table 3's fixed bandwidth: the amplitudes alone
    small = LRLoRALinear(nn.Linear(6, 4), r=2, center=False)  # Eq. 4 as printed: a = 0
    assert torch.allclose(F.softplus(small.beta), torch.ones(50)) and (small.a == 0).all()
    g = small.g.double()
    assert g.min() > -3 and g.max() < 3 and torch.allclose(g.diff(), torch.full((49,), 6 / 50, dtype=torch.float64))
    assert (g[:, None] + g[None, :]).abs().min() > 0.01  # no mirror pairs (g, -g), 0 included


def test_lrlora_init_is_the_base_and_gradient_flow_follows_app_e():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LRLoRALinear(base, r=4, center=False)  # App. E's init is the literal form's: a = 0
    x = torch.randn(8, 16)
    assert (layer.delta_weight() == 0).all()
    assert torch.equal(layer(x), base(x))
    opt = torch.optim.Adam([layer.A, layer.B, layer.a, layer.beta], lr=1e-3)

    def step():
        opt.zero_grad()
        (layer(x) - 1).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in [("A", layer.A), ("B", layer.B), ("a", layer.a), ("beta", layer.beta)]}
        opt.step()
        return grads

    g1 = step()  # f is linear in a: only the amplitudes move first
    assert (g1["a"] != 0).all()
    assert (g1["A"] == 0).all() and (g1["B"] == 0).all() and (g1["beta"] == 0).all()
    g2 = step()  # a != 0 now: the bandwidths get gradient, and dL/dM = G f'(BA) reaches B (A waits for B != 0)
    assert (g2["beta"] != 0).any() and (g2["A"] == 0).all()
    # a real gradient, of the order lr * |A| against a's (about 5e-5 here): the grid has no mirror pairs (next test)
    assert g2["B"].abs().max() > 1e-6 * g2["a"].abs().max()
    g3 = step()
    assert (g3["A"] != 0).any()


@pytest.mark.parametrize("grid,stalls", [("symmetric", True), ("default", False)])
def test_lrlora_b_moves_only_on_a_grid_without_mirror_pairs(grid, stalls):
    """float64, Adam from a = 0: on linspace(-3, 3, K) a stays mirror-symmetric, f'(0) = 0 and B = 0 gets only
    rounding-level gradient; on the default grid B's gradient is of normal size (order lr |A|) within 2 steps."""
    torch.manual_seed(0)
    layer = LRLoRALinear(nn.Linear(16, 12), r=4, center=False).double()
    if grid == "symmetric":
        with torch.no_grad():
            layer.g.copy_(torch.linspace(-3, 3, 50, dtype=torch.float64))
    x = torch.randn(8, 16, dtype=torch.float64)
    opt = torch.optim.Adam([layer.a, layer.beta], lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        (layer(x) - 1).square().mean().backward()
        opt.step()
    ratio = (layer.B.grad.abs().max() / layer.a.grad.abs().max()).item()
    assert (ratio < 1e-9) if stalls else (ratio > 1e-6), ratio


def lrlora_check_against_float64(layer, x, tol=1e-5, guard=contextlib.nullcontext, **kw):
    """The float32 table path against Eq. 4 summed directly in float64: output, dW and the gradients of x, A, B, a, beta.
    Errors relative to the literal form's quantities: the table errs by an absolute amount (the bound in docs/methods.md, in
    sum|a_k|), so centring, which makes dW and dL/da smaller, must not make that error larger."""
    names = ["A", "B", "a", "beta"]
    gy = None

    def reference(center):
        nonlocal gy
        ref = [x.detach().double().requires_grad_()] + [getattr(layer, n).detach().double().requires_grad_() for n in names]
        xd, A, B, a, beta = ref
        f = lrlora_f_reference(B @ A, a, beta, layer.g.double())
        if center:  # f(BA) - f(0), f(0) summed the same obvious way
            f = f - lrlora_f_reference(torch.zeros((), dtype=torch.float64), a, beta, layer.g.double())
        W = layer.base.weight.double() + layer.scale * f
        y_ref = F.linear(xd, W, None if layer.base.bias is None else layer.base.bias.double())
        gy = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        return [y_ref, W - layer.base.weight.double()] + list(torch.autograd.grad(y_ref, ref, gy))

    want, scale_of = reference(layer.center), reference(False)
    with guard():
        y = layer(x)
        got = [y, layer.delta_weight()] + list(torch.autograd.grad(y, [x] + [getattr(layer, n) for n in names], gy.float()))
    for name, g_, w, s_ in zip(["y", "dW", "x", "A", "B", "a", "beta"], got, want, scale_of):
        err = ((g_.double() - w).norm() / s_.norm()).item()
        assert g_.dtype == torch.float32 and err < tol, (name, err)


@pytest.mark.parametrize("center", [False, True], ids=["literal", "centred"])
@pytest.mark.parametrize("fixed", [False, True], ids=["sized-by-span", "fixed-T-no-host-sync"])
@pytest.mark.parametrize("shape,bias,scale", [((20, 12), True, 0.5), ((64, 48), False, 0.5), ((256, 192), True, 0.05)])
def test_lrlora_table_matches_float64_direct_sum(shape, bias, scale, fixed, center, monkeypatch):
    """Both ways of sizing the table: by the span, with a host sync (the CPU's), and fixed T = FIXED_POINTS (CUDA's,
    which a CUDA graph can capture), here on the CPU with every read-back to the host made an error."""
    import lrlora
    torch.manual_seed(1)
    layer = lrlora_moved(LRLoRALinear(nn.Linear(*shape, bias=bias), r=3, center=center), scale=scale)
    with torch.no_grad():  # entries of B A exactly 0 (a zero row of B), and min / max: the table's two ends
        layer.B[0] = 0
    x = torch.randn(2, 5, shape[0], requires_grad=True)
    grid, sizes = lrlora._grid, []
    monkeypatch.setattr(lrlora, "_grid", lambda M, b: sizes.append(grid(M, b, fixed=fixed)[2]) or grid(M, b, fixed=fixed))

    @contextlib.contextmanager
    def no_host_reads():  # what a CUDA graph cannot capture: a tensor's value read by Python
        with monkeypatch.context() as m:
            for name in ("tolist", "item", "__float__", "__int__", "__bool__", "__index__"):
                m.setattr(torch.Tensor, name, lambda *a: pytest.fail("the fixed-size table read a value back to the host"))
            yield

    lrlora_check_against_float64(layer, x, guard=no_host_reads if fixed else contextlib.nullcontext)
    assert (set(sizes) == {lrlora.FIXED_POINTS}) == fixed


def test_lrlora_table_is_exact_at_its_points_and_ends():
    import lrlora
    torch.manual_seed(2)
    layer = lrlora_moved(LRLoRALinear(nn.Linear(32, 24), r=2))
    M, b = (layer.B @ layer.A).detach(), F.softplus(layer.beta.detach())
    lo, h, T = lrlora._grid(M, b)
    t = lo.double() + h.double() * torch.arange(T, dtype=torch.float64)
    pts = t.float()  # entries exactly at table points (as float32 rounds them), the two ends included
    f_ends = lrlora.sinc_table(lo, h, T, layer.a, b, layer.g)[0]
    got = lrlora._forward(pts, None, lo, 1 / h, f_ends, 1.0, torch.float64)
    want = lrlora_f_reference(pts.double(), layer.a.detach().double(), layer.beta.detach().double(), layer.g.double())
    ulp = torch.finfo(torch.float32).eps * want.abs().max()  # the table is float32
    assert T > 1000 and abs(got[0] - want[0]) < 4 * ulp and abs(got[-1] - want[-1]) < 4 * ulp
    assert (got - want).abs().max() < 1e-5 * want.abs().max()


def lrlora_one_sinc_at(z_center, b=2.5, n=800):
    """A layer whose dW is f(B A) alone (W0 = 0, scale 1, A = 1, one amplitude a_k = 1, every b_k = b), with the 2n + 1
    entries of B A spaced h/16 around g_k + z_center / b, h = 1 / (1024 b) the CPU table spacing: however the table
    is laid over them, some entry sits within h/32 of each midpoint between two table points, where interpolation errs most.
    Only the layer's parameters are set: the table's internals are not used."""
    k = 25
    layer = LRLoRALinear(nn.Linear(1, 2 * n + 1, bias=False), r=1, alpha=1.0, center=False)
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.A.fill_(1.0)
        layer.beta.fill_(math.log(math.expm1(b)))  # softplus(beta) = b
        layer.a.zero_()
        layer.a[k] = 1.0
        center = layer.g[k].double() + z_center / b
        layer.B[:, 0] = (center + torch.arange(-n, n + 1, dtype=torch.float64) / (16 * 1024 * b)).float()
    M = (layer.B @ layer.A).detach().double().requires_grad_()  # the float32 entries, exactly
    f_ref = lrlora_f_reference(M, layer.a.detach().double(), layer.beta.detach().double(), layer.g.double())  # Eq. 4, float64
    return layer, M, f_ref, F.softplus(layer.beta).max().item()


def test_lrlora_table_f_within_its_error_bound_at_the_midpoints():
    """The bound in docs/methods.md |f_table - f| <= pi^2 / (24 * 1024^2) sum|a_k| (h^2/8 max|f''|), where it is reached: at the
    midpoints near the peak of one sinc term, where |f''| = b^2 pi^2 / 3 is largest. dW and forward, against the float64
    direct sum, within the bound plus 2 float32 ulps of sum|a_k| (the table's float32 values): 1.1x the bound measured at
    1024 points per unit; a 2x coarser table errs 4x as much (4.1x, fails), one that ignored b_max 6.25x."""
    layer, M, f_ref, _ = lrlora_one_sinc_at(0.0)
    sum_a = layer.a.detach().abs().sum().item()
    tol = math.pi ** 2 / (24 * 1024 ** 2) * sum_a + 2 * torch.finfo(torch.float32).eps * sum_a
    for what, got in (("delta_weight()", layer.delta_weight()), ("forward", layer(torch.ones(1, 1)).T)):
        err = (got.double() - f_ref.detach()).abs().max().item()
        assert err < tol, f"LR-LoRA's table: {what} errs {err:.3g} at the midpoints between table points, over docs/methods.md's " \
                          f"bound + float32 rounding {tol:.3g}: the table is coarser than h = 1/(1024 b_max)"


def test_lrlora_table_f_prime_within_its_error_bound_at_the_midpoints():
    """The bound in docs/methods.md on the interpolated f' (dL/d(B A)): 9.2e-7 b_max sum|a_k| (h^2/8 max|f'''|), at the midpoints
    where |sinc'''| peaks (z = 0.599: 7.38, its bound pi^3/4 = 7.75). dL/dB with dL/dy = 1, x = 1, A = 1 is f'(B A) itself:
    against float64 autograd of Eq. 4, within the bound plus 2 float32 ulps of max|f'| <= pi/2 b_max sum|a_k|.
    Measured: 1.03x the bound at 1024 points per unit, 3.9x at 512 (fails)."""
    z = torch.linspace(0.3, 0.9, 6001, dtype=torch.float64, requires_grad=True)
    d = torch.sinc(z)
    for _ in range(3):  # sinc''' by autograd, to find where it peaks
        (d,) = torch.autograd.grad(d.sum(), z, create_graph=True)
    z_star = z[d.abs().argmax()].item()
    layer, M, f_ref, b_max = lrlora_one_sinc_at(z_star)
    sum_a = layer.a.detach().abs().sum().item()
    layer(torch.ones(1, 1)).sum().backward()
    (want,) = torch.autograd.grad(f_ref.sum(), M)
    tol = 9.24e-7 * b_max * sum_a + 2 * torch.finfo(torch.float32).eps * math.pi / 2 * b_max * sum_a
    err = (layer.B.grad.double() - want).abs().max().item()
    assert err < tol, f"LR-LoRA's table: dL/dB = f'(B A) errs {err:.3g} at the midpoints, over the bound in docs/methods.md + float32 " \
                      f"rounding {tol:.3g}: the f' table is coarser than h = 1/(1024 b_max)"


@pytest.mark.parametrize("center", [False, True], ids=["literal", "centred"])
def test_lrlora_float64_uses_the_direct_sum_and_passes_gradcheck(center):
    torch.manual_seed(2)
    layer = lrlora_moved(LRLoRALinear(nn.Linear(5, 4), r=2, grid_size=5, center=center)).double()
    layer.B.data[0] = 0  # M = 0 exactly in a row
    args = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True)]
    args += [getattr(layer, n).detach().clone().requires_grad_() for n in ("A", "B", "a", "beta")]
    fn = lambda x, A, B, a, beta: functional_call(layer, {"A": A, "B": B, "a": a, "beta": beta}, (x,))
    assert torch.autograd.gradcheck(fn, args)
    dropped = LRLoRALinear(nn.Linear(5, 4), r=2, dropout=0.2).double().eval()
    assert torch.autograd.gradcheck(lambda x: dropped(x), args[:1])


@pytest.mark.parametrize("center", [False, True], ids=["literal", "centred"])
def test_lrlora_table_adjoint_is_the_exact_gradient_of_the_table_path(center):
    """In float64 the table path's dL/dx, dL/da and dL/db are the exact derivatives of what it computes (the scatter
    is the adjoint of the lookup); dL/dA, dL/dB use the exact f' by design, so they are checked against Eq. 4 above."""
    import lrlora
    torch.manual_seed(3)
    layer = lrlora_moved(LRLoRALinear(nn.Linear(6, 5), r=2, grid_size=6)).double()
    A, B, g = layer.A.detach(), layer.B.detach(), layer.g
    fn = lambda x, a, beta: lrlora._MergedSincLinear.apply(x, layer.base.weight, layer.base.bias, A, B, a,
                                                          F.softplus(beta), g, layer.scale, center)
    args = [torch.randn(3, 6, dtype=torch.float64, requires_grad=True), layer.a.detach().clone().requires_grad_(),
            layer.beta.detach().clone().requires_grad_()]
    assert torch.autograd.gradcheck(fn, args)


def test_lrlora_compiled_passes_and_scatter_copies_match_eager(monkeypatch):
    # the path CUDA takes (each element-wise pass one torch.compile'd kernel, the scatter spread over table copies),
    # here on the compiler's CPU backend
    import lrlora
    torch.manual_seed(8)
    layer = lrlora_moved(LRLoRALinear(nn.Linear(64, 48), r=3, grid_size=6))
    x = torch.randn(2, 7, 64, requires_grad=True)
    gy = torch.randn(2, 7, 48)
    params = [x, layer.A, layer.B, layer.a, layer.beta]
    want = [layer(x)] + list(torch.autograd.grad(layer(x), params, gy))
    compiled = {}
    monkeypatch.setattr(lrlora, "_fused", lambda fn, device: compiled.setdefault(fn, torch.compile(fn, dynamic=True)))
    monkeypatch.setattr(lrlora, "_scatter_copies", lambda T, device: 5)
    y = layer(x)
    got = [y] + list(torch.autograd.grad(y, params, gy))
    assert set(compiled) == {lrlora.sinc_table, lrlora._forward, lrlora._backward}  # the table and both passes, as on CUDA
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-6 * w.abs().max().item())


def test_lrlora_eager_blocks_stitch_back_to_the_whole(monkeypatch):
    import lrlora
    torch.manual_seed(10)
    layer = lrlora_moved(LRLoRALinear(nn.Linear(32, 40), r=3))
    x = torch.randn(3, 32, requires_grad=True)
    gy = torch.randn(3, 40)
    params = [x, layer.A, layer.B, layer.a, layer.beta]
    want = [layer(x)] + list(torch.autograd.grad(layer(x), params, gy))
    monkeypatch.setattr(lrlora, "EAGER_BLOCK", 7 * 32)  # blocks of 7 rows, the last one 5
    y = layer(x)
    got = [y] + list(torch.autograd.grad(y, params, gy))
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-6, atol=1e-7 * w.abs().max().item())


def test_lrlora_inside_a_compiled_model_runs_and_matches_eager():
    # train.py --compile and bench.py --compile wrap whole models: the table's host sync runs outside the graph
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), lrlora_moved(LRLoRALinear(nn.Linear(32, 8), r=2)))
    x = torch.randn(4, 16)
    compiled = torch.compile(net)
    y, y_eager = compiled(x), net(x)
    torch.testing.assert_close(y, y_eager)
    params = [p for p in net.parameters() if p.requires_grad]
    for g_, w in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(y_eager.square().sum(), params)):
        torch.testing.assert_close(g_, w)


def test_lrlora_keeps_float32_under_autocast():
    # B A, the table and f in float32 even under bf16 autocast: W is W0 + dW computed in float32, cast once to bf16
    torch.manual_seed(4)
    layer = lrlora_moved(LRLoRALinear(nn.Linear(64, 48), r=4), scale=0.05)
    x = torch.randn(6, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    W = (layer.base.weight + layer.delta_weight()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.to(torch.bfloat16), W, layer.base.bias.to(torch.bfloat16)))
    with torch.no_grad():  # the same sums in bf16 (what autocast would do to B @ A) give another W
        M16 = layer.B.bfloat16() @ layer.A.bfloat16()
    assert not torch.equal((layer.base.weight + layer.scale * lrlora_f_reference(
        M16.double(), layer.a.double(), layer.beta.double(), layer.g.double())).to(torch.bfloat16), W)
    y.float().sum().backward()
    assert layer.A.grad.dtype == torch.float32 and torch.isfinite(layer.A.grad).all()


def test_lrlora_dropout_path_is_base_plus_dropped_input_times_delta():
    torch.manual_seed(3)
    layer = lrlora_moved(LRLoRALinear(nn.Linear(10, 6), r=2, dropout=0.3, grid_size=9, center=False))
    x = torch.randn(7, 10)
    torch.manual_seed(4)
    y = layer(x)
    torch.manual_seed(4)
    x_dropped = F.dropout(x, 0.3).double()
    A, B, a, beta = (getattr(layer, n).detach().double().requires_grad_() for n in ("A", "B", "a", "beta"))
    dW = layer.scale * lrlora_f_reference(B @ A, a, beta, layer.g.double())
    y_ref = layer.base(x).double() + x_dropped @ dW.T
    assert lrlora_rel(y, y_ref) < 1e-5
    gy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, [layer.A, layer.B, layer.a, layer.beta], gy),
                         torch.autograd.grad(y_ref, [A, B, a, beta], gy.double())):
        assert lrlora_rel(got, want) < 1e-5
    layer.eval()  # dropout is off in eval, so the layer merges once again
    assert lrlora_rel(layer(x), layer.base(x).double() + x.double() @ dW.T) < 1e-5


@pytest.mark.parametrize("center", [False, True], ids=["literal", "centred"])
def test_lrlora_merged_equals_unmerged_float32(center):
    torch.manual_seed(5)
    base = nn.Linear(48, 40)
    w0 = base.weight.detach().clone()
    layer = lrlora_moved(LRLoRALinear(base, r=4, center=center)).eval()
    x = torch.randn(9, 48)
    merged = layer.merged()
    assert torch.equal(base.weight, w0)  # the original is untouched
    assert layer.delta_weight().abs().max() > 0.1
    assert torch.equal(merged(x), layer(x))  # the same table, the same sums: bit for bit
    assert torch.equal(merged.weight, w0 + layer.delta_weight())  # W0 + dW, cast once
    assert torch.equal(layer.merged().weight, merged.weight)  # merging twice gives the same layer


def test_lrlora_rank_of_delta_exceeds_r_while_lora_stays_at_r():
    torch.manual_seed(6)
    numerical_rank = lambda M: int((torch.linalg.svdvals(M.double()) > 1e-6 * torch.linalg.svdvals(M.double())[0]).sum())
    lr = lrlora_moved(LRLoRALinear(nn.Linear(32, 24), r=2))
    lora = LoRALinear(nn.Linear(32, 24), r=2)
    nn.init.normal_(lora.B)
    assert numerical_rank(lr.delta_weight().detach()) > 2  # the point of the method (§3.3)
    assert numerical_rank(lora.delta_weight().detach()) <= 2


def test_lrlora_f_of_zero_is_an_all_ones_rank_one_term():
    # B = 0 but a moved: every entry of BA is 0, so dW = scale f(0) 1 1^T, stable rank exactly 1 (README note)
    layer = lrlora_moved(LRLoRALinear(nn.Linear(32, 24), r=4, center=False))
    layer.B.data.zero_()
    a, b, g = layer.a.detach().double(), F.softplus(layer.beta.detach().double()), layer.g.double()
    t = -b * g  # no grid point is 0, so sin(pi t) / (pi t) is defined
    f0 = sum(a[k] * math.sin(math.pi * t[k]) / (math.pi * t[k]) for k in range(50))
    dW = layer.delta_weight().detach()
    torch.testing.assert_close(dW.double(), torch.full((24, 32), layer.scale * float(f0), dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert abs(stable_rank(dW) - 1) < 1e-6


def test_lrlora_centred_has_no_all_ones_term_and_is_the_literal_minus_f0():
    """center=True: with B A = 0 (B = 0, a moved) dW is exactly 0, where the literal form gives scale f(0) 1 1^T; with
    B A != 0 the centred dW is the literal dW less that all-ones term, entry by entry."""
    torch.manual_seed(11)
    lit = lrlora_moved(LRLoRALinear(nn.Linear(32, 24), r=4, center=False))
    cen = LRLoRALinear(nn.Linear(32, 24), r=4, center=True)
    cen.load_state_dict(lit.state_dict())
    a, b, g = lit.a.detach().double(), F.softplus(lit.beta.detach().double()), lit.g.double()
    f0 = lrlora_f_reference(torch.zeros((), dtype=torch.float64), a, lit.beta.detach().double(), g).item()
    assert abs(f0) > 0.05  # a real all-ones term to remove
    torch.testing.assert_close(cen.delta_weight().double(), lit.delta_weight().double() - lit.scale * f0, rtol=1e-5, atol=1e-6)
    c64, l64 = copy.deepcopy(cen).double(), copy.deepcopy(lit).double()  # float64: the direct sum, the same relation
    x64 = torch.randn(6, 32, dtype=torch.float64)
    torch.testing.assert_close(c64(x64), l64(x64) - l64.scale * f0 * x64.sum(-1, keepdim=True), rtol=1e-10, atol=1e-10)
    x = torch.randn(6, 32)
    for layer in (lit, cen):
        layer.B.data.zero_()
    assert (cen.delta_weight() == 0).all() and torch.equal(cen(x), cen.base(x))  # the base layer, bit for bit
    assert torch.allclose(lit.delta_weight().double(), torch.full((24, 32), lit.scale * f0, dtype=torch.float64), rtol=1e-6)
    import lrlora
    f0_, fp0 = lrlora.transfer_at_zero(a, b, g)  # the diagnostics' f(0) is the one Eq. 4 gives
    assert abs(f0_.item() - f0) < 1e-12 and fp0.item() != 0


def test_lrlora_a_init_identity_is_the_least_norm_a_with_f0_zero_and_slope_one():
    import lrlora
    layer = LRLoRALinear(nn.Linear(16, 12), r=4, center=True)
    assert layer.a_init == "identity"  # the centred default
    a, b, g = layer.a.detach().double(), F.softplus(layer.beta.detach().double()), layer.g.double()
    f = lambda t: lrlora_f_reference(t, a, layer.beta.detach().double(), g)
    eps = 1e-4  # f'(0) by a central difference of Eq. 4, independent of the layer's own sinc'
    assert abs(f(torch.zeros((), dtype=torch.float64)).item()) < 1e-6
    assert abs((f(torch.tensor(eps, dtype=torch.float64)) - f(torch.tensor(-eps, dtype=torch.float64))).item() / (2 * eps) - 1) < 1e-5
    C = torch.stack(lrlora.basis_at_zero(b, g))
    want = torch.linalg.pinv(C) @ torch.tensor([0.0, 1.0], dtype=torch.float64)  # least norm, by the pseudo-inverse
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-7)
    assert torch.equal(LRLoRALinear(nn.Linear(16, 12), r=4, center=False).a, torch.zeros(50))  # literal: the paper's zero start


def test_lrlora_centred_identity_start_gives_A_and_B_lora_gradient_at_once():
    """From a with f'(0) = 1, B gets dL/dB = scale dL/dW A^T at the first step, as LoRA's B does; centred from a = 0
    nothing would move (every gradient 0 at B A = 0), so that start is refused."""
    torch.manual_seed(12)
    base = nn.Linear(16, 12)
    layer, lora = LRLoRALinear(base, r=4, center=True), LoRALinear(base, r=4, alpha=16)
    lora.A.data.copy_(layer.A.data)
    x = torch.randn(8, 16)
    for m in (layer, lora):
        (m(x) - 1).square().mean().backward()
    torch.testing.assert_close(layer.B.grad, lora.B.grad, rtol=1e-4, atol=1e-7)
    assert layer.a.grad.abs().max() == 0  # f(BA) - f(0) has no a-gradient at B A = 0
    with pytest.raises(ValueError, match="stationary"):
        LRLoRALinear(base, r=4, center=True, a_init="zero")


@pytest.mark.parametrize("a_init", ["small", "random"])
def test_lrlora_other_starts_of_a(a_init):
    """Table 18's small start (every a_k = 0.1) and Table 3's random one: centred they start at the base layer; literal
    they do not (scale f(0) on every entry at B = 0)."""
    torch.manual_seed(13)
    base = nn.Linear(16, 12)
    x = torch.randn(5, 16)
    cen, lit = LRLoRALinear(base, r=4, center=True, a_init=a_init), LRLoRALinear(base, r=4, center=False, a_init=a_init)
    assert (cen.a == 0.1).all() if a_init == "small" else 0.05 < cen.a.std() < 0.2
    assert torch.equal(cen(x), base(x)) and not torch.allclose(lit(x), base(x))
    with pytest.raises(ValueError, match="a_init"):
        LRLoRALinear(base, r=4, a_init="ones")


def test_lrlora_train_flags_choose_the_form_and_the_start():
    kwargs = lambda name, *f: (lambda a: train.adapter_kwargs(name, a, train.setup(a)))(train.parse_args(["--adapter", name, "--device", "cpu", *f]))
    assert kwargs("lrlora")["center"] is True  # the study's better form is train.py's default
    assert kwargs("lrlora", "--no-lrlora-center")["center"] is False
    assert kwargs("lrlora", "--lrlora-init", "small")["a_init"] == "small"
    with pytest.raises(train.UserError, match="--lrlora-center does not apply to --adapter lora"):
        kwargs("lora", "--lrlora-center")


def test_lrlora_transfer_point_reports_f0_slope_and_span_over_modules():
    torch.manual_seed(14)
    mods = {"l0.q_proj": lrlora_moved(LRLoRALinear(nn.Linear(12, 10), r=2), seed=1),
            "l1.q_proj": lrlora_moved(LRLoRALinear(nn.Linear(12, 10), r=2), seed=2), "lora": LoRALinear(nn.Linear(4, 4))}
    got = diagnostics.transfer_point(mods)
    f0s = [lrlora_f_reference(torch.zeros((), dtype=torch.float64), m.a.detach().double(), m.beta.detach().double(),
                              m.g.double()).item() for m in list(mods.values())[:2]]
    spans = [(lambda M: (M.max() - M.min()).item())(m.B.detach() @ m.A.detach()) for m in list(mods.values())[:2]]
    assert got["f0"]["min"] == pytest.approx(min(f0s), rel=1e-5) and got["f0"]["max"] == pytest.approx(max(f0s), rel=1e-5)
    assert got["ba_span"]["mean"] == pytest.approx(sum(spans) / 2, rel=1e-5)
    assert diagnostics.transfer_point({"lora": LoRALinear(nn.Linear(4, 4))}) == {}
    lines = diagnostics.rank_lines(diagnostics.rank_report(dict(list(mods.items())[:2])), "t")
    assert any(l.strip().startswith("f(0)") for l in lines) and any("span of B A" in l for l in lines)


def test_lrlora_stable_rank_matches_numpy():
    M = np.random.default_rng(0).standard_normal((30, 20))
    want = np.linalg.norm(M, "fro") ** 2 / np.linalg.norm(M, 2) ** 2
    assert abs(stable_rank(torch.tensor(M, dtype=torch.float32)) - want) < 1e-5 * want
    assert stable_rank(torch.zeros(3, 4)) == 0.0


def test_lrlora_nothing_out_by_in_is_saved_for_backward():
    # per layer, forward keeps x and the small factors only: W0 + dW is rebuilt in backward (App. C: transient)
    layer = lrlora_moved(LRLoRALinear(nn.Linear(256, 192), r=4, grid_size=8))
    x = torch.randn(3, 256, requires_grad=True)
    own = {t.data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    saved = []

    def pack(t):
        if t.data_ptr() not in own and t.data_ptr() != x.data_ptr():
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert sum(saved) < 256 * 192 // 4, saved


LRLORA_MEMORY_PROBE = """
import sys, torch, torch.nn as nn
from lrlora import LRLoRALinear
def kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
n, K = 2048, int(sys.argv[1])
layer = LRLoRALinear(nn.Linear(n, n), grid_size=K)
with torch.no_grad():
    layer.B.normal_(0, 0.1); layer.a.normal_()
x = torch.randn(4, n, requires_grad=True)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
before = kib("VmRSS")
layer(x).sum().backward()
print((kib("VmHWM") - before) / (n * n * 4 / 1024))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.slow
def test_lrlora_peak_memory_of_forward_backward_is_a_few_dense_matrices():
    # glibc mmaps every block over 64 KiB and unmaps it on free, so the peak resident size is the peak of live tensors
    probes = [run_script("-c", LRLORA_MEMORY_PROBE, str(K), env={"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": HERE}, timeout=120)
              for K in (2, 50)]
    assert all(p.returncode == 0 for p in probes), [p.stderr[-2000:] for p in probes]
    peaks = [float(p.stdout) for p in probes]
    # out x in float32 matrices at peak (16 MiB each here); an (out, in, K) tensor would be 50+
    assert max(peaks) < 10, peaks
    assert abs(peaks[0] - peaks[1]) < 1, peaks  # independent of the number of grid points


def test_lrlora_state_dict_round_trip():
    torch.manual_seed(7)
    base = nn.Linear(16, 8)
    layer = lrlora_moved(LRLoRALinear(base, r=2))
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("base.")}
    assert set(state) == {"A", "B", "a", "beta", "g"}
    fresh = LRLoRALinear(base, r=2)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert all(k.startswith("base.") for k in missing) and not unexpected
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.slow
def test_lrlora_self_contained_copy_trains_and_merges(tmp_path):
    shutil.copy(os.path.join(HERE, "lrlora.py"), tmp_path)
    script = textwrap.dedent("""
        import torch, torch.nn as nn
        from lrlora import LRLoRALinear
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        X, Y = torch.randn(64, 8), torch.randn(64, 4)
        net[0], net[2] = LRLoRALinear(net[0], r=2), LRLoRALinear(net[2], r=2)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(30):
            loss = (net(X) - Y).square().mean()
            opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        assert losses[-1] < losses[0], losses
        merged = nn.Sequential(net[0].merged(), nn.Tanh(), net[2].merged())
        assert torch.equal(merged(X), net(X))
        print("ok")
    """)
    out = run_script("-c", script, cwd=tmp_path, env={"PYTHONPATH": None}, timeout=120)  # only the copy is importable
    assert out.stdout.strip() == "ok", out.stderr


def test_lrlora_class_defaults_are_the_form_train_py_runs():
    """A file copied alone trains as train.py's LR-LoRA does: LRLoRALinear(base) is the centred form with the identity
    start, the same module train.py builds from its defaults; center=False is Eq. 4 as printed (a = 0)."""
    import config
    args = config.parse_args(["--adapter", "lrlora"])
    kw = config.adapter_kwargs("lrlora", args, config.setup(args))
    base = nn.Linear(16, 12)
    ours, trains = LRLoRALinear(base), LRLoRALinear(base, **kw)
    assert ours.extra_repr() == trains.extra_repr() and torch.equal(ours.a, trains.a)
    assert ours.center and ours.a_init == "identity"
    printed = LRLoRALinear(base, center=False)
    assert printed.a_init == "zero" and torch.equal(printed.a, torch.zeros(50))
