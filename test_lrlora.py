"""Tests for lrlora.py (LR-LoRA). References are written plainly here, in float64, from the paper's Eq. 4 and 5."""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from lora import LoRALinear
from lrlora import LRLoRALinear, stable_rank

HERE = os.path.dirname(os.path.abspath(__file__))


def f_reference(M, a, beta, g):
    """Eq. 4 the obvious way: an (out, in, K) tensor, sin(pi t) / (pi t) written out (no exact zeros in t here)."""
    t = F.softplus(beta) * (M[..., None] - g)
    return (a * torch.sin(math.pi * t) / (math.pi * t)).sum(-1)


def moved(layer, seed=0):
    """Give every adapter parameter a nonzero value, as after some training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.A, layer.B, layer.a, layer.beta):
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        layer.beta.add_(0.5)
    return layer


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(r=9), dict(r=2.0), dict(grid_size=1), dict(grid_size=4.0),
                                    dict(grid_range=0.0), dict(grid_range=-3.0), dict(dropout=1.0), dict(dropout=-0.1)])
def test_bad_arguments_raise(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        LRLoRALinear(nn.Linear(8, 8), **kwargs)


def test_parameter_count_and_init_values_on_meta():
    layer = LRLoRALinear(nn.Linear(2048, 8192, device="meta"))
    lora = LoRALinear(nn.Linear(2048, 8192, device="meta"))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert count(layer) == count(lora) + 2 * 50  # a_k and beta_k (§3.3, App. G)
    small = LRLoRALinear(nn.Linear(6, 4), r=2)
    assert torch.allclose(F.softplus(small.beta), torch.ones(50)) and (small.a == 0).all()
    assert torch.allclose(small.g, torch.tensor(np.linspace(-3, 3, 51)[:-1], dtype=torch.float32))  # [-3, 3): spacing 6/50


def test_init_is_the_base_and_gradient_flow_follows_app_e():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LRLoRALinear(base, r=4)
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
    # B's gradient is real, not rounding noise: f'(0) = sum_k a_k b_k sinc'(-b_k g_k) would vanish exactly on a grid
    # symmetric about 0 (a stays mirror-symmetric), so the grid leaves out +3 and the unpaired point -3 keeps
    # f'(0) of the order of lr * |sinc'(3)| = lr / 3
    x0 = torch.zeros((), dtype=torch.float64, requires_grad=True)
    a, b, g = layer.a.detach().double(), F.softplus(layer.beta.detach()).double(), layer.g.double()
    (f_prime_0,) = torch.autograd.grad((a * torch.sinc(b * (x0 - g))).sum(), x0)
    assert abs(f_prime_0) > 0.1 * 1e-3
    assert g2["B"].abs().max() > 1e-6 * g2["a"].abs().max()  # rounding noise on a symmetric grid: < 1e-9 (next test)
    g3 = step()
    assert (g3["A"] != 0).any()


def test_symmetric_grid_would_stall_b():
    """Why the grid is not symmetric: on linspace(-3, 3, K), B = 0 gets only rounding-level gradient after a step."""
    torch.manual_seed(0)
    layer = LRLoRALinear(nn.Linear(16, 12), r=4).double()
    with torch.no_grad():
        layer.g.copy_(torch.linspace(-3, 3, 50, dtype=torch.float64))
    x = torch.randn(8, 16, dtype=torch.float64)
    opt = torch.optim.Adam([layer.a, layer.beta], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        (layer(x) - 1).square().mean().backward()
        opt.step()
    assert layer.B.grad.abs().max() < 1e-9 * layer.a.grad.abs().max()


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_float64_reference(bias):
    torch.manual_seed(1)
    layer = moved(LRLoRALinear(nn.Linear(20, 12, bias=bias), r=3, grid_size=7)).double()
    x = torch.randn(2, 5, 20, dtype=torch.float64, requires_grad=True)
    names = ["A", "B", "a", "beta"]
    ref_params = [getattr(layer, n).detach().clone().requires_grad_() for n in names]
    A, B, a, beta = ref_params
    W = layer.base.weight + layer.scale * f_reference(B @ A, a, beta, layer.g)
    y_ref = F.linear(x, W, layer.base.bias)
    gy = torch.randn_like(y_ref)
    ref_grads = torch.autograd.grad(y_ref, [x] + ref_params, gy)
    y = layer(x)
    grads = torch.autograd.grad(y, [x] + [getattr(layer, n) for n in names], gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), W - layer.base.weight, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    layer32 = layer.float()  # the default float32 adapter agrees with the float64 reference to float32 precision
    torch.testing.assert_close(layer32(x.float()).double(), y_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grid_size,zero_B", [(6, False), (5, True)])
def test_gradcheck(grid_size, zero_B):
    # grid_size 5 puts g_k = 0 on the grid and B = 0 makes M = 0: t = 0 exactly, where sinc is 0/0 naively
    torch.manual_seed(2)
    layer = moved(LRLoRALinear(nn.Linear(5, 4), r=2, grid_size=grid_size)).double()
    if zero_B:
        layer.B.data.zero_()
    args = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True)]
    args += [getattr(layer, n).detach().clone().requires_grad_() for n in ("A", "B", "a", "beta")]
    fn = lambda x, A, B, a, beta: functional_call(layer, {"A": A, "B": B, "a": a, "beta": beta}, (x,))
    assert torch.isfinite(fn(*args)).all()
    assert torch.autograd.gradcheck(fn, args)


def test_compiled_passes_match_eager(monkeypatch):
    # the path CUDA takes (lrlora.COMPILE: torch.compile of the two passes, fused by inductor), here on its CPU backend
    import lrlora
    torch.manual_seed(8)
    layer = moved(LRLoRALinear(nn.Linear(64, 48), r=3, grid_size=6))  # 48 x 64 = 3 blocks of 1024
    x = torch.randn(2, 7, 64, requires_grad=True)
    gy = torch.randn(2, 7, 48)
    params = [x, layer.A, layer.B, layer.a, layer.beta]
    want = [layer(x)] + list(torch.autograd.grad(layer(x), params, gy))
    monkeypatch.setattr(lrlora, "COMPILE", True)
    try:
        y = layer(x)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler on this machine
        pytest.skip(f"torch.compile unavailable: {e}")
    got = [y] + list(torch.autograd.grad(y, params, gy))
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


def test_dropout_path_is_base_plus_dropped_input_times_delta():
    torch.manual_seed(3)
    layer = moved(LRLoRALinear(nn.Linear(10, 6), r=2, dropout=0.3, grid_size=9)).double()
    x = torch.randn(7, 10, dtype=torch.float64)
    torch.manual_seed(4)
    y = layer(x)
    torch.manual_seed(4)
    A, B, a, beta = (getattr(layer, n) for n in ("A", "B", "a", "beta"))
    dW = layer.scale * f_reference(B @ A, a, beta, layer.g)
    y_ref = layer.base(x) + F.dropout(x, 0.3) @ dW.T
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, [A, B, a, beta], gy), torch.autograd.grad(y_ref, [A, B, a, beta], gy),
                               rtol=1e-10, atol=1e-10)
    layer.eval()  # dropout is off in eval, so the layer merges once again
    torch.testing.assert_close(layer(x), layer.base(x) + x @ dW.T, rtol=1e-12, atol=1e-12)


def test_merged_equals_unmerged_float32():
    torch.manual_seed(5)
    base = nn.Linear(48, 40)
    w0 = base.weight.detach().clone()
    layer = moved(LRLoRALinear(base, r=4)).eval()
    x = torch.randn(9, 48)
    merged = layer.merged()
    assert torch.equal(base.weight, w0)  # the original is untouched
    assert layer.delta_weight().abs().max() > 0.1
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(merged.weight, w0 + layer.delta_weight())  # W0 + dW, cast once


def test_rank_of_delta_exceeds_r_while_lora_stays_at_r():
    torch.manual_seed(6)
    numerical_rank = lambda M: int((torch.linalg.svdvals(M.double()) > 1e-6 * torch.linalg.svdvals(M.double())[0]).sum())
    lr = moved(LRLoRALinear(nn.Linear(32, 24), r=2))
    lora = LoRALinear(nn.Linear(32, 24), r=2)
    nn.init.normal_(lora.B)
    assert numerical_rank(lr.delta_weight().detach()) > 2  # the point of the method (§3.3)
    assert numerical_rank(lora.delta_weight().detach()) <= 2


def test_f_of_zero_is_an_all_ones_rank_one_term():
    # B = 0 but a moved: every entry of BA is 0, so dW = scale f(0) 1 1^T, stable rank exactly 1 (README note)
    layer = moved(LRLoRALinear(nn.Linear(32, 24), r=4))
    layer.B.data.zero_()
    a, b, g = layer.a.detach().double(), F.softplus(layer.beta.detach().double()), layer.g.double()
    t = -b * g  # the grid holds g = 0, where sinc = 1
    f0 = sum(a[k] * (math.sin(math.pi * t[k]) / (math.pi * t[k]) if t[k] != 0 else 1.0) for k in range(50))
    dW = layer.delta_weight().detach()
    torch.testing.assert_close(dW.double(), torch.full((24, 32), layer.scale * float(f0), dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert abs(stable_rank(dW) - 1) < 1e-6


def test_stable_rank_matches_numpy():
    M = np.random.default_rng(0).standard_normal((30, 20))
    want = np.linalg.norm(M, "fro") ** 2 / np.linalg.norm(M, 2) ** 2
    assert abs(stable_rank(torch.tensor(M, dtype=torch.float32)) - want) < 1e-5 * want
    assert stable_rank(torch.zeros(3, 4)) == 0.0


def test_nothing_out_by_in_is_saved_for_backward():
    # per layer, forward keeps x and the small factors only: W0 + dW is rebuilt in backward (App. C: transient)
    layer = moved(LRLoRALinear(nn.Linear(256, 192), r=4, grid_size=8))
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


MEMORY_PROBE = """
import sys, torch, torch.nn as nn
from lrlora import LRLoRALinear
def kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
n, K = 2048, int(sys.argv[1])
layer = LRLoRALinear(nn.Linear(n, n), grid_size=K)
with torch.no_grad():
    layer.B.normal_(); layer.a.normal_()
x = torch.randn(4, n, requires_grad=True)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
before = kib("VmRSS")
layer(x).sum().backward()
print((kib("VmHWM") - before) / (n * n * 4 / 1024))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_of_forward_backward_is_a_few_dense_matrices():
    # glibc mmaps every block over 64 KiB and unmaps it on free, so the peak resident size is the peak of live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", PYTHONPATH=HERE)
    peaks = [float(subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(K)], env=env, capture_output=True, text=True,
                                  check=True, timeout=120).stdout) for K in (2, 8)]
    # the module states about 9 out x in float32 matrices (16 MiB each here); an (out, in, K) tensor would be 12+
    assert max(peaks) < 10, peaks
    assert abs(peaks[0] - peaks[1]) < 1, peaks  # independent of the number of grid points


def test_state_dict_round_trip():
    torch.manual_seed(7)
    base = nn.Linear(16, 8)
    layer = moved(LRLoRALinear(base, r=2))
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("base.")}
    assert set(state) == {"A", "B", "a", "beta", "g"}
    fresh = LRLoRALinear(base, r=2)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert all(k.startswith("base.") for k in missing) and not unexpected
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), layer(x))


def test_self_contained_copy_trains_and_merges(tmp_path):
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
        assert torch.allclose(merged(X), net(X), rtol=1e-5, atol=1e-6)
        print("ok")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
