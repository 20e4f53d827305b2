"""RanLoRA (ranlora.py).

Run alone: python -m pytest -q tests/test_ranlora.py (test_all.py runs every topic)."""
import copy
import io
import math
import os
import shutil
import textwrap

import pytest
import torch
import torch.nn as nn

from ranlora import RanLoRALinear

from conftest import HERE, run_script


# ----------------------------------------------------------------------------------------------
# RanLoRA
# Tests for ranlora.py (RanLoRA: "Residual-Aware Nonlinear LoRA", Luo et al., 2026, §3). Run: python -m pytest -q test_all.py -k ranlora
#
# References are independent of the module: float64 SVDs and GELU written out here, the original
# nn.Linear kept untouched, and the paper's parameter formula r(in + out) + r (§3.5).


RANLORA_HERE = HERE


def ranlora_linear(out_f, in_f, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def ranlora_spaced_linear(out_f, in_f, seed=0):
    """A Linear whose singular values are well separated (1, 2, ..., k), so the r smallest
    singular directions are well defined and a float32 SVD finds them to ~1e-6."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    U, _ = torch.linalg.qr(torch.randn(out_f, k, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(in_f, k, dtype=torch.float64, generator=g))
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_((U * torch.arange(1, k + 1, dtype=torch.float64)) @ V.T)
    return lin


def ranlora_smallest_triplets_f64(W, r):
    """Reference: the r smallest singular triplets of W from a float64 SVD, signs fixed the way
    the module documents it (largest |entry| of each left vector positive)."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    U, S, Vh = U[:, -r:], S[-r:], Vh[-r:]
    sign = torch.stack([torch.sign(U[U[:, i].abs().argmax(), i]) for i in range(r)])
    return U * sign, S, Vh * sign[:, None]


def ranlora_projector(M):
    """Orthogonal projector onto the column space of M: independent of signs and of the basis."""
    Q, _ = torch.linalg.qr(M.double())
    return Q @ Q.T


def ranlora_gelu64(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def ranlora_n_trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("shape", [(48, 80), (96, 40), (64, 64)])
@pytest.mark.parametrize("r", [1, 2, 5])
def test_ranlora_init_splits_W0_exactly_and_leaves_caller_untouched(shape, r):
    base = ranlora_linear(*shape)
    W0 = base.weight.detach().clone()
    a = RanLoRALinear(base, r=r, alpha=2 * r)
    # Eq. 6 with Eq. 7: W_P + s B A == W0 in float32
    rebuilt = a.base.weight + a.scale * (a.B @ a.A)
    assert (rebuilt - W0).abs().max() <= 1e-5 * W0.abs().max()
    assert (a.base.weight - W0).abs().max() > 0  # W_P really differs from W0 (W_R was removed)
    # the caller's layer is not touched: same weight values, still trainable as before
    assert torch.equal(base.weight, W0) and base.weight.requires_grad
    assert a.base is not base and not a.base.weight.requires_grad and not a.base.bias.requires_grad
    assert torch.equal(a.base.bias, base.bias)
    assert torch.equal(a.v, torch.ones(r))


@pytest.mark.parametrize("shape", [(40, 72), (72, 40)])
def test_ranlora_A_B_span_the_r_smallest_singular_directions(shape):
    r = 3
    base = ranlora_spaced_linear(*shape)
    a = RanLoRALinear(base, r=r)
    U, S, Vh = ranlora_smallest_triplets_f64(base.weight, r)
    # subspace comparison through projectors: invariant to signs and rotations inside the span
    assert (ranlora_projector(a.B) - U @ U.T).abs().max() < 1e-5
    assert (ranlora_projector(a.A.T) - Vh.T @ Vh).abs().max() < 1e-5
    # and the residual carries exactly the r smallest singular values: s B A = W_R (Eq. 5)
    got = torch.linalg.svdvals((a.scale * a.B @ a.A).double())[:r]
    assert torch.allclose(got, S, rtol=1e-5)  # both descending
    # W_P keeps the rest of the spectrum and has r zeros where the residual was removed
    assert torch.linalg.svdvals(a.base.weight.double())[-r:].max() < 1e-4


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_ranlora_smallest_directions_exact_on_a_trained_like_spectrum(shape):
    """Singular values decaying geometrically from 1 to 1e-3, as in trained weights: the small end is
    crowded (gaps ~1e-4 of the largest). Measured sin θ to the float64 SVD: this module ~3e-8 (float32
    rounding of the result); a float32 SVD 5e-5 to 7e-5; the same Gram route in float32 0.3 to 0.6."""
    r, k = 2, min(shape)
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, dtype=torch.float64, generator=g))
    base = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        base.weight.copy_((U * torch.logspace(0, -3, k, dtype=torch.float64)) @ V.T)
    a = RanLoRALinear(base, r=r)
    U_r, S_r, Vh_r = ranlora_smallest_triplets_f64(base.weight, r)  # of the float32 weight the module saw
    assert (ranlora_projector(a.B) - U_r @ U_r.T).abs().max() < 1e-6
    assert (ranlora_projector(a.A.T) - Vh_r.T @ Vh_r).abs().max() < 1e-6
    torch.testing.assert_close(torch.linalg.svdvals((a.scale * a.B @ a.A).double())[:r], S_r, rtol=1e-6, atol=0)


def test_ranlora_identity_equals_base_at_init_and_merges_exactly_after_training():
    torch.manual_seed(0)
    base = ranlora_linear(24, 40)
    a = RanLoRALinear(base, r=2, alpha=4, activation="identity")
    assert a.exact_merge
    x = torch.randn(16, 40)
    with torch.no_grad():
        ref = base(x)
        assert (a(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert a.init_gap(x).abs().max() == 0
    target = nn.Linear(40, 24)
    opt = torch.optim.Adam([a.A, a.B, a.v], lr=1e-2)
    B0, v0 = a.B.detach().clone(), a.v.detach().clone()
    for _ in range(10):
        loss = (a(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (a.B - B0).abs().max() > 1e-3 and (a.v - v0).abs().max() > 1e-3  # trained, v != 1
    with torch.no_grad():
        merged = a.merged()
        out = a(x)
        assert (merged(x) - out).abs().max() <= 1e-5 * out.abs().max()
        # independent float64: W_P + s B diag(v) A
        W = a.base.weight.double() + a.scale * (a.B.double() * a.v.double()) @ a.A.double()
        ref64 = x.double() @ W.T + a.base.bias.double()
        assert (out.double() - ref64).abs().max() <= 1e-5 * ref64.abs().max()
    assert merged.weight.dtype == base.weight.dtype and not merged.weight.requires_grad


@pytest.mark.parametrize("activation", ["gelu", "relu", "tanh"])
def test_ranlora_nonlinear_activations_have_no_merge(activation):
    a = RanLoRALinear(ranlora_linear(16, 24), activation=activation)
    assert a.exact_merge is False
    with pytest.raises(NotImplementedError, match="activations"):
        a.delta_weight()
    with pytest.raises(NotImplementedError, match=activation):
        a.merged()
    assert RanLoRALinear.exact_merge is False  # the class default describes the default (GELU)


def test_ranlora_gelu_init_gap_matches_an_independent_float64_recomputation():
    torch.manual_seed(1)
    base = ranlora_spaced_linear(32, 48, seed=1)
    a = RanLoRALinear(base)  # defaults: r=2, alpha=4, GELU
    x = torch.randn(20, 48)
    with torch.no_grad():
        measured = a(x) - base(x)  # wrapped layer vs the untouched pretrained layer
    U, S, Vh = ranlora_smallest_triplets_f64(base.weight, 2)
    s = 4 / 2
    B64, A64 = U * (S / s).sqrt(), (S / s).sqrt()[:, None] * Vh  # Eq. 7, scale-aware
    z = x.double() @ A64.T
    expected = s * (ranlora_gelu64(z) - z) @ B64.T  # W_P x + s B GELU(A x) - W0 x
    assert expected.abs().max() > 1e-2  # the gap is real at init: GELU is not the identity
    tol = 1e-4 * expected.abs().max()
    assert (measured.double() - expected).abs().max() <= tol
    assert (a.init_gap(x).double() - expected).abs().max() <= tol


def test_ranlora_literal_init_is_eq7_as_printed():
    """init="literal": B = U_r S_r^1/2, A = S_r^1/2 V_r^T with no division by s, so s B A = s W_R; the base is
    W_P = W0 - W_R as in the default, whose factors are the literal ones divided by sqrt(s)."""
    base = ranlora_spaced_linear(40, 64)
    W0 = base.weight.detach().double()
    lit, ours = RanLoRALinear(base, init="literal"), RanLoRALinear(base)
    U, S, Vh = ranlora_smallest_triplets_f64(base.weight, 2)
    W_R = (U * S) @ Vh
    assert lit.scale == ours.scale == 2.0 and lit.init_scale == 1.0 and ours.init_scale == 2.0
    torch.testing.assert_close(lit.B.double(), U * S.sqrt(), rtol=0, atol=1e-5)  # Eq. 7 printed
    torch.testing.assert_close(lit.A.double(), S.sqrt()[:, None] * Vh, rtol=0, atol=1e-5)
    torch.testing.assert_close(lit.scale * (lit.B @ lit.A).double(), lit.scale * W_R, rtol=0, atol=1e-5)  # s B A = s W_R
    torch.testing.assert_close(lit.base.weight.double(), W0 - W_R, rtol=0, atol=1e-5)  # W_P = W0 - W_R (Eq. 6)
    torch.testing.assert_close(lit.base.weight, ours.base.weight)
    torch.testing.assert_close(lit.B, ours.B * 2.0**0.5)
    torch.testing.assert_close(ours.scale * (ours.B @ ours.A).double(), W_R, rtol=0, atol=1e-5)  # ours: s B A = W_R


@pytest.mark.parametrize("shape", [(40, 72), (72, 40)])
def test_ranlora_principal_init_takes_the_r_largest_triplets(shape):
    """Table 16's principal-aware init: A, B on the r largest singular directions, s B A = their part of W0,
    the frozen base keeps the rest of the spectrum (W0's top r singular values gone)."""
    r = 3
    base = ranlora_spaced_linear(*shape)
    a = RanLoRALinear(base, r=r, init="principal")
    U, S, Vh = torch.linalg.svd(base.weight.double(), full_matrices=False)
    k = min(shape)
    assert (ranlora_projector(a.B) - U[:, :r] @ U[:, :r].T).abs().max() < 1e-5
    assert (ranlora_projector(a.A.T) - Vh[:r].T @ Vh[:r]).abs().max() < 1e-5
    torch.testing.assert_close(torch.linalg.svdvals((a.scale * a.B @ a.A).double())[:r], S[:r], rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.linalg.svdvals(a.base.weight.double())[: k - r], S[r:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((a.base.weight + a.scale * a.B @ a.A).double(), base.weight.double(), rtol=0, atol=1e-4)
    x = torch.randn(5, shape[1])
    with torch.no_grad():  # init_gap is forward - W0 x for this init too
        torch.testing.assert_close(a.init_gap(x), a(x) - base(x), rtol=0, atol=1e-4)


def test_ranlora_literal_init_cancels_the_first_order_init_gap():
    """On a random layer: the default's gap s B (GELU(A x) - A x) ~ -W_R x / 2 is first order in x; the literal
    reading's B (2 GELU(A x) - A x) is second order (2 GELU'(0) = 1), so it shrinks as eps^2 when x -> eps x."""
    torch.manual_seed(0)
    base = ranlora_linear(48, 64).double()
    x = torch.randn(32, 64, dtype=torch.float64)
    gap = {}
    for init in ("residual", "literal"):
        a = RanLoRALinear(base, init=init).double()
        with torch.no_grad():
            gap[init] = [(a(eps * x) - base(eps * x)).abs().max().item() for eps in (1e-1, 1e-2)]
            assert (a.init_gap(x) - (a(x) - base(x))).abs().max() < 1e-6  # init_gap measures the same thing
    assert 8 < gap["residual"][0] / gap["residual"][1] < 12  # first order: x 1/10
    assert 80 < gap["literal"][0] / gap["literal"][1] < 120  # second order: x 1/100
    assert gap["literal"][1] < gap["residual"][1] / 50


def test_ranlora_adapter_state_round_trip_reproduces_outputs():
    """As train.py does: save the state minus base.*, wrap a fresh copy of the base again (re-running
    the SVD, hence the same W_P), load A, B, v."""
    torch.manual_seed(2)
    base = ranlora_linear(24, 40)
    fresh = copy.deepcopy(base)
    a = RanLoRALinear(base)
    x = torch.randn(8, 40)
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    for _ in range(5):
        loss = a(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v for k, v in a.state_dict().items() if not k.startswith("base.")}
    assert set(state) == {"A", "B", "v"}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = RanLoRALinear(fresh)
    assert not torch.allclose(b.v, a.v)  # the fresh wrap really starts elsewhere
    b.load_state_dict(torch.load(buf, weights_only=True), strict=False)
    assert torch.equal(b.base.weight, a.base.weight)
    with torch.no_grad():
        assert torch.allclose(b(x), a(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 12), (30, 7), (64, 64)])
@pytest.mark.parametrize("r", [1, 2, 4])
def test_ranlora_trainable_parameters_are_r_times_in_plus_out_plus_r(shape, r):
    a = RanLoRALinear(ranlora_linear(*shape), r=r)
    m, n = shape
    assert ranlora_n_trainable(a) == r * (m + n) + r  # §3.5: A, B and v
    assert {k for k, p in a.named_parameters() if p.requires_grad} == {"A", "B", "v"}


def ranlora_llama_count(hidden, intermediate, kv, layers, r):
    """The module's own trainable count on each distinct q,k,v,up,down shape (meta device, no SVD data)."""
    shapes = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
    per_shape = {}
    for out_f, in_f in set(shapes.values()):
        a = RanLoRALinear(nn.Linear(in_f, out_f, bias=False, device="meta"), r=r, alpha=2 * r)
        per_shape[out_f, in_f] = ranlora_n_trainable(a)
    total = layers * sum(per_shape[s] for s in shapes.values())
    formula = layers * sum(r * (o + i) + r for o, i in shapes.values())  # §3.5, written independently
    assert total == formula
    return total


def test_ranlora_paper_parameter_counts():
    # Table 2: LLaMA-3-8B, q,k,v,up,down, r=2 -> printed "3.5M"
    n = ranlora_llama_count(hidden=4096, intermediate=14336, kv=1024, layers=32, r=2)
    assert n == 3_539_264 and round(n / 1e6, 1) == 3.5
    # Table 5: LLaMA-2-7B (no GQA), q,k,v,up,down, r=8 -> printed "14.1M". The exact count is 14,025,984,
    # which rounds to 14.0M: the paper's 14.1M (shared with AuroRA's row) is 0.5% off, so assert within 1%
    n = ranlora_llama_count(hidden=4096, intermediate=11008, kv=4096, layers=32, r=8)
    assert n == 14_025_984 and abs(n - 14.1e6) / 14.1e6 < 0.01


def test_ranlora_rank_deficient_and_tiny_singular_values_give_no_nan():
    torch.manual_seed(3)
    base = nn.Linear(32, 24)
    with torch.no_grad():  # rank 3: the smallest singular values are exactly zero
        base.weight.copy_(torch.randn(24, 3) @ torch.randn(3, 32))
    with pytest.warns(UserWarning, match="rank-deficient"):
        a = RanLoRALinear(base)
    x = torch.randn(4, 32)
    assert all(torch.isfinite(t).all() for t in (a.A, a.B, a.base.weight, a(x)))
    assert (a.base.weight - base.weight).abs().max() <= 1e-5 * base.weight.abs().max()
    tiny = ranlora_spaced_linear(24, 32)
    with torch.no_grad():
        tiny.weight.mul_(1e-30)  # singular values 1e-30 ... 2.4e-29: float32 still represents them
    b = RanLoRALinear(tiny)
    assert all(torch.isfinite(t).all() for t in (b.A, b.B, b.base.weight, b(x)))


def test_ranlora_bfloat16_base_keeps_its_dtype_adapter_stays_float32():
    base = ranlora_linear(24, 40).to(torch.bfloat16)
    a = RanLoRALinear(base)
    assert a.base.weight.dtype == torch.bfloat16 and a.A.dtype == a.B.dtype == a.v.dtype == torch.float32
    # W_P = W0 - W_R rounded once to bf16 (unit roundoff 2^-8): adding W_R back gives W0 up to that rounding
    W0, W_R = base.weight.float(), a.scale * a.B @ a.A
    err = (a.base.weight.float() + W_R - W0).abs()
    assert (err <= (W0 - W_R).abs() * 2**-8 * 1.001 + 1e-7).all()
    assert a(torch.randn(3, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,word", [(dict(r=0), "r=0"), (dict(r=17), "r=17"), (dict(dropout=1.0), "dropout"),
                                         (dict(activation="swish"), "gelu, relu, tanh, identity"),
                                         (dict(init="pissa"), "init='pissa'.*residual.*kaiming")])
def test_ranlora_bad_arguments_raise_value_error(kwargs, word):
    with pytest.raises(ValueError, match=word):
        RanLoRALinear(ranlora_linear(16, 24), **kwargs)


def test_ranlora_without_modulation_has_no_v_and_computes_eq8_without_it():
    """Table 6 "w/o v": h = W_P x + s B GELU(A x), r(in + out) parameters, checked against float64."""
    base = ranlora_spaced_linear(32, 48)
    a = RanLoRALinear(base, modulation=False)
    assert a.v is None and {k for k, p in a.named_parameters() if p.requires_grad} == {"A", "B"}
    assert ranlora_n_trainable(a) == 2 * (32 + 48) and "v" not in a.state_dict()
    with torch.no_grad():
        a.A.mul_(3.0)  # move A off its init, so that a v = 1 left in by mistake would still not hide
    x = torch.randn(10, 48)
    z = x.double() @ a.A.double().T
    want = x.double() @ a.base.weight.double().T + a.base.bias.double() + 2.0 * ranlora_gelu64(z) @ a.B.double().T
    assert (a(x).double() - want).abs().max() <= 1e-5 * want.abs().max()
    ident = RanLoRALinear(ranlora_linear(16, 24), activation="identity", modulation=False)
    torch.testing.assert_close(ident.merged()(x[:, :24]), ident(x[:, :24]), rtol=1e-5, atol=1e-5)


def test_ranlora_kaiming_init_is_lora_init_on_the_untouched_base():
    """Table 6 "w/o rai": no SVD; A Kaiming-uniform, B = 0, the base keeps W0 bit for bit, so the layer starts
    exactly at the pretrained one even with GELU."""
    base = ranlora_spaced_linear(40, 64)
    W0 = base.weight.detach().clone()
    torch.manual_seed(0)
    a = RanLoRALinear(base, init="kaiming")
    assert torch.equal(a.base.weight, W0) and torch.equal(base.weight, W0) and not a.base.weight.requires_grad
    assert torch.equal(a.B, torch.zeros(40, 2)) and torch.equal(a.v, torch.ones(2))
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=√5) on fan_in = 64: U(-1/√64, 1/√64), as LoRA's A
    assert a.A.abs().max() <= bound and a.A.std() > 0.8 * bound / math.sqrt(3)
    residual = RanLoRALinear(base)  # the default starts A on the smallest singular directions instead
    assert (ranlora_projector(a.A.T) - ranlora_projector(residual.A.T)).abs().max() > 0.1
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.equal(a(x), base(x)) and a.init_gap(x).abs().max() == 0
    loss = a(x).pow(2).sum()
    loss.backward()
    assert a.B.grad.abs().max() > 0 and a.A.grad.abs().max() == 0  # LoRA's gradient flow: B first


@pytest.mark.slow
def test_ranlora_self_contained_copy_trains_in_an_empty_folder(tmp_path):
    """ranlora.py alone, copied into an empty folder, trains a toy model in a fresh interpreter."""
    shutil.copy(os.path.join(RANLORA_HERE, "ranlora.py"), tmp_path / "ranlora.py")
    script = textwrap.dedent("""
        import os, torch, torch.nn as nn
        import ranlora
        assert os.path.dirname(os.path.abspath(ranlora.__file__)) == os.getcwd(), ranlora.__file__
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
        x, y = torch.randn(64, 16), torch.randn(64, 4)
        for act in ("gelu", "identity"):
            model = nn.Sequential(ranlora.RanLoRALinear(net[0], activation=act), nn.GELU(), ranlora.RanLoRALinear(net[2], activation=act))
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            first = None
            for _ in range(30):
                loss = (model(x) - y).pow(2).mean()
                first = first if first is not None else loss.item()
                opt.zero_grad(); loss.backward(); opt.step()
            assert loss.item() < first, (act, first, loss.item())
            if act == "identity":
                merged = nn.Sequential(model[0].merged(), nn.GELU(), model[2].merged())
                with torch.no_grad():
                    assert (merged(x) - model(x)).abs().max() < 1e-5
        print("ok")
    """)
    out = run_script("-c", script, cwd=tmp_path, env={"PYTHONPATH": None}, timeout=120)  # only the copy is importable
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
