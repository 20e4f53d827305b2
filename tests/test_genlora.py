"""GenLoRA (genlora.py).

Run alone: python -m pytest -q tests/test_genlora.py (test_all.py runs every topic)."""
import math
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from genlora import GenLoRALinear

from conftest import HERE, randomize_, run_script


# ----------------------------------------------------------------------------------------------
# GenLoRA
# Tests for genlora.py (GenLoRA, Ouyang et al. 2025). Run: python -m pytest -q test_all.py -k genlora


def genlora_fit_random_targets(m, steps, opt, seed=0):
    """Regress the wrapped layer onto a random linear map: a task ΔW must move towards."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(m.base.out_features, m.base.in_features, generator=g)
    for _ in range(steps):
        x = torch.randn(64, m.base.in_features, generator=g)
        loss = (m(x) - x @ target.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def genlora_reference_factors(z, theta, groups, num_centers, eps, normalize=True):
    """Eqs. 5-9 in float64 numpy, one generator and one group at a time: the (d, r) matrix [f_1(z) .. f_r(z)].
    normalize=False drops Eq. 6 (Table 4, "w.o. Norm")."""
    z, theta = z.detach().double().numpy(), theta.detach().double().numpy()
    r, d = theta.shape[2], z.shape[0]
    d_g = d // groups
    mu = np.array([-3.0 + 6.0 * k / (num_centers - 1) for k in range(num_centers)])  # uniform centers on [-3, 3]
    h = mu[1] - mu[0]  # the grid spacing
    out = np.zeros((d, r))
    for i in range(r):
        for g in range(groups):
            x = z[g * d_g:(g + 1) * d_g]  # Eq. 5
            x_hat = (x - x.mean()) / (x.std() + eps) if normalize else x  # Eq. 6 as printed
            w_b, w = theta[g, 0, i], theta[g, 1:, i]  # θ[g, :, i] = (w_b, w_1..w_K)
            phi = w_b * x_hat / (1.0 + np.exp(-x_hat))  # w_b * SiLU(x_hat), Eq. 7
            for k in range(num_centers):
                phi = phi + w[k] * np.exp(-(((x_hat - mu[k]) / h) ** 2))  # Eqs. 8-9
            out[g * d_g:(g + 1) * d_g, i] = phi
    return out


# ---------------------------------------------------------------------------------------------- init


def test_genlora_init_delta_zero_and_output_unchanged():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    m = GenLoRALinear(base, r=4, groups=8)
    assert torch.equal(m.delta_weight(), torch.zeros(48, 64))
    assert torch.equal(m.B, torch.zeros(48, 4))
    x = torch.randn(3, 7, 64)
    assert torch.equal(m(x), base(x))
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["z_B", "z_A", "theta_B", "theta_A"]


def test_genlora_init_distributions_follow_app_I3():
    torch.manual_seed(0)
    m = GenLoRALinear(nn.Linear(4096, 1024, bias=False), r=64, groups=16)
    d_g = 4096 // 16
    assert torch.equal(m.z_B, torch.zeros(1024)) and torch.equal(m.theta_B, torch.zeros_like(m.theta_B))
    assert abs(m.theta_A.std().item() * math.sqrt(d_g) - 1.0) < 0.03  # N(0, 1/d_g): 16384 samples
    assert abs(m.theta_A.mean().item()) < 0.03 / math.sqrt(d_g)
    assert m.z_A.abs().max() <= 1 / math.sqrt(4096) and m.z_A.std() > 0.5 / math.sqrt(3 * 4096)  # Kaiming-uniform
    # the r A-side generators are drawn independently: the generated A has full rank r at init
    assert torch.linalg.matrix_rank(m.A.double()) == 64


def test_genlora_gradients_at_init_finite_and_reach_theta_B():
    torch.manual_seed(0)
    m = GenLoRALinear(nn.Linear(32, 32), r=4, groups=4)
    m(torch.randn(8, 32)).pow(2).sum().backward()
    for name in ("z_A", "z_B", "theta_A", "theta_B"):
        assert torch.isfinite(getattr(m, name).grad).all(), name
    rbf_grad = m.theta_B.grad[:, 1:]
    assert (rbf_grad != 0).any()  # B-side RBF weights learn first, as B-side weights in LoRA
    # x_hat_B = 0 at init and SiLU(0) = 0, so w_b of the B side has no gradient yet; A gets none while B = 0
    assert torch.equal(m.theta_B.grad[:, 0], torch.zeros(4, 4))
    assert torch.equal(m.theta_A.grad, torch.zeros_like(m.theta_A))


def test_genlora_zero_variance_group_gives_finite_nonzero_latent_gradient():
    """Eq. 6 at σ = 0 (z_B = 0 at init) with trained generator weights: the ε must keep the gradient finite."""
    torch.manual_seed(0)
    m = randomize_(GenLoRALinear(nn.Linear(32, 32), r=4, groups=4), std=1.0, seed=0)
    with torch.no_grad():
        m.z_B.zero_()
        m.z_A[:8] = 0.5  # one constant group on the A side too
    m(torch.randn(8, 32)).pow(2).sum().backward()
    for name in ("z_A", "z_B", "theta_A", "theta_B"):
        g = getattr(m, name).grad
        assert torch.isfinite(g).all() and (g != 0).any(), name
    assert torch.isfinite(m.B).all() and torch.isfinite(m.A).all()


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adam(p, lr=1e-2), lambda p: torch.optim.SGD(p, lr=1e-2)],
                         ids=["adam", "sgd"])
def test_genlora_every_parameter_group_trains_after_one_step(make_opt):
    torch.manual_seed(0)
    m = GenLoRALinear(nn.Linear(32, 32), r=4, groups=4)
    opt = make_opt([p for p in m.parameters() if p.requires_grad])
    target = torch.randn(32, 32)

    def step():
        x = torch.randn(16, 32)
        opt.zero_grad()
        (m(x) - x @ target.T).pow(2).mean().backward()
        grads = {n: getattr(m, n).grad.clone() for n in ("z_A", "z_B", "theta_A", "theta_B")}
        opt.step()
        return grads

    step()
    grads = step()  # one optimizer step later: B != 0, so every group has a gradient
    for name, g in grads.items():
        assert torch.isfinite(g).all() and (g != 0).any(), name
    grads = step()  # and once z_B has moved, w_b of the B side (SiLU(x_hat_B) != 0) too
    assert (grads["theta_B"][:, 0] != 0).any()
    for name in ("z_A", "z_B", "theta_A", "theta_B"):
        assert torch.isfinite(getattr(m, name)).all()


# ---------------------------------------------------------------------------------------------- structure


def test_genlora_rank_bounded_by_r_and_reached_after_training():
    """Prop. 3.1: rank(ΔW) <= r however nonlinear the generators; the r generated vectors are not degenerate."""
    torch.manual_seed(0)
    r = 4
    m = GenLoRALinear(nn.Linear(64, 64), r=r, groups=8)
    genlora_fit_random_targets(m, 60, torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2))
    s = torch.linalg.svdvals(m.delta_weight().double())
    assert s[0] > 1e-2  # it moved
    assert (s > 1e-6 * s[0]).sum().item() == r  # exactly r nonzero singular values
    assert s[r] < 1e-5 * s[0]


def test_genlora_factors_match_float64_recomputation_of_the_equations():
    torch.manual_seed(0)
    G, K = 4, 7
    m = randomize_(GenLoRALinear(nn.Linear(24, 16), r=3, alpha=6, groups=G, num_centers=K), std=1.0, seed=0).double()
    m.eps = 0.0  # at ε = 0 the module's normalization and Eq. 6 as printed are the same function
    B = genlora_reference_factors(m.z_B, m.theta_B, G, K, eps=0.0)
    A = genlora_reference_factors(m.z_A, m.theta_A, G, K, eps=0.0).T
    np.testing.assert_allclose(m.B.detach().numpy(), B, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.A.detach().numpy(), A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.delta_weight().detach().numpy(), 2.0 * B @ A, rtol=1e-12, atol=1e-12)
    x = torch.randn(5, 24, dtype=torch.float64)
    want = m.base(x).detach().numpy() + 2.0 * x.numpy() @ (B @ A).T
    np.testing.assert_allclose(m(x).detach().numpy(), want, rtol=1e-12, atol=1e-12)
    # with the default ε the normalization differs from (x - μ)/(σ + ε) only by O(ε/σ): σ ~ 1 here
    del m.eps
    B_paper = genlora_reference_factors(m.z_B, m.theta_B, G, K, eps=1e-5)
    np.testing.assert_allclose(m.B.detach().numpy(), B_paper, rtol=1e-4, atol=1e-4)


def test_genlora_merged_equals_unmerged_float32():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    w0 = base.weight.detach().clone()
    m = randomize_(GenLoRALinear(base, r=8, groups=16), std=1.0, seed=0)
    assert m.delta_weight().abs().max() > 0.1
    x = torch.randn(10, 64)
    merged = m.merged()
    assert merged is not base and torch.equal(base.weight, w0) and torch.equal(merged.bias, base.bias)
    torch.testing.assert_close(merged(x), m(x), rtol=1e-5, atol=1e-5)


def test_genlora_low_precision_base_keeps_float32_adapter():
    """bf16 base: generators and parameters stay float32, the x-sized matmuls run in bf16. Both bf16 forms
    (unmerged and merged) must match a float64 evaluation of Eq. 4 to within a few bf16 roundings."""
    torch.manual_seed(0)
    base = nn.Linear(32, 32).to(torch.bfloat16)
    m = randomize_(GenLoRALinear(base, r=2, groups=4), std=1.0, seed=0)
    assert m.theta_A.dtype == m.z_B.dtype == m.A.dtype == m.B.dtype == torch.float32
    with torch.no_grad():  # B is linear in θ_B: make ΔW as large as W0, so an error in either path shows
        m.theta_B.mul_(base.weight.float().abs().max() / m.delta_weight().abs().max())
    x = torch.randn(16, 32).to(torch.bfloat16)
    # float64 reference, written plainly: W0, b and x are bf16 values (exact in float64), A and B from Eqs. 5-9
    B = torch.from_numpy(genlora_reference_factors(m.z_B, m.theta_B, 4, 15, eps=m.eps))
    A = torch.from_numpy(genlora_reference_factors(m.z_A, m.theta_A, 4, 15, eps=m.eps)).T
    base_out = x.double() @ base.weight.double().T + base.bias.double()
    adapter_out = m.scale * (x.double() @ A.T) @ B.T
    ref = base_out + adapter_out
    # bf16 keeps 8 significant bits: one rounding errs by at most u = 2^-8 (0.39%) of the value rounded. The
    # bf16 forward rounds A, x A^T, s B, (x A^T)(s B)^T, W0 x + b and the final sum (sums accumulate in
    # float32), each adding <= u of a term no larger than ~max|ref| here: allow 4u of max|ref|. Measured over
    # 300 seeds: <= 1.5u unmerged, 1.1u merged; a float32 adapter path gives less. Relative to max|ref|, not
    # per element: an output near 0 from cancellation keeps the absolute error of its terms
    tol = 4 * 2**-8 * ref.abs().max()
    assert base_out.abs().max() > 10 * tol and adapter_out.abs().max() > 10 * tol  # the bound sees either path
    with torch.no_grad():
        y, y_merged = m(x), m.merged()(x)
    assert y.dtype == y_merged.dtype == torch.bfloat16
    assert (y.double() - ref).abs().max() <= tol
    assert (y_merged.double() - ref).abs().max() <= tol


def test_genlora_parameter_counts_llama3_8b_qkv():
    """App. G / Tables 2, 7, 8: LLaMA-3-8B, 32 layers, q (4096->4096), k and v (4096->1024)."""
    shapes = [(4096, 4096), (4096, 1024), (4096, 1024)] * 32

    def count(r, exact=False, **kw):
        total = 0
        for n_in, n_out in shapes:
            m = GenLoRALinear(nn.Linear(n_in, n_out, bias=False, device="meta"), r=r, groups=16, **kw)
            total += sum(p.numel() for p in m.parameters() if p.requires_grad)
        return total if exact else round(total / 1e6, 2)

    assert count(8) == 0.98
    assert count(32) == 2.16
    assert count(64) == 3.74
    # Table 7, r = 8, g = 16: generators 96 * 2*8*16*16 = 393,216, z_A 96 * 4096 = 393,216, z_B 32 * 6144 = 196,608
    assert count(8, exact=True) == 983_040 and count(8) == 0.98
    assert count(8, exact=True, freeze_latents=True) == 393_216 and count(8, freeze_latents=True) == 0.39  # Frozen Z_A, Z_B
    assert count(8, exact=True, freeze_latents="A") == 589_824 and count(8, freeze_latents="A") == 0.59  # Frozen Z_A
    assert count(8, exact=True, freeze_latents="B") == 786_432 and count(8, freeze_latents="B") == 0.79  # Frozen Z_B
    assert count(8, normalize=False) == 0.98  # Table 4 keeps the count: Eq. 6 has no parameters
    lora_r8 = sum(8 * (n_in + n_out) for n_in, n_out in shapes)  # the LoRA row the paper compares with
    assert round(lora_r8 / 1e6, 2) == 4.72


@pytest.mark.parametrize("kwargs, arg", [
    (dict(r=0), "r="), (dict(r=2.5), "r="),
    (dict(groups=5), "groups="), (dict(groups=0), "groups="), (dict(groups=24), "groups="),  # does not divide in=64
    (dict(groups=32), "groups="),  # divides in (64) but not out (48)
    (dict(groups=16.0), "groups="),
    (dict(num_centers=1), "num_centers="), (dict(dropout=1.0), "dropout="),
])
def test_genlora_bad_arguments_raise_value_error(kwargs, arg):
    with pytest.raises(ValueError, match=arg) as e:
        GenLoRALinear(nn.Linear(64, 48), **kwargs)
    if arg == "groups=":
        assert "valid: [1, 2, 4, 8, 16]" in str(e.value)
    with pytest.raises(ValueError, match="groups=16"):  # out=16 in 16 groups: one entry per group
        GenLoRALinear(nn.Linear(64, 16), groups=16)


@pytest.mark.parametrize("n_in, n_out, groups", [(4096, 4096, 16), (4096, 1024, 16), (32, 64, 16), (64, 16, 8),
                                                 (64, 48, 16), (24, 20, 4), (8, 3, 1), (3, 8, 1)])
def test_genlora_default_groups_is_16_where_it_fits_else_the_largest_that_does(n_in, n_out, groups):
    m = GenLoRALinear(nn.Linear(n_in, n_out, device="meta"))
    assert m.groups == groups and m.theta_A.shape == (groups, 16, 8)
    # the rule, written independently: G divides both widths and leaves >= 2 entries per group
    fits = [g for g in range(1, 17) if n_in % g == 0 and n_out % g == 0 and min(n_in, n_out) // g >= 2]
    assert groups == (16 if 16 in fits else max(fits))
    with pytest.raises(ValueError, match="groups="):  # a layer too narrow for any group: a clear error
        GenLoRALinear(nn.Linear(8, 1))


@pytest.mark.parametrize("freeze, frozen", [(True, {"z_A", "z_B"}), ("A", {"z_A"}), ("B", {"z_B"})])
def test_genlora_freeze_latents_trains_only_the_rest(freeze, frozen):
    """Table 7's frozen-latent variants: a frozen latent gets no gradient and keeps its init (and is saved, so a reload
    reproduces); every other parameter gets a gradient and moves. A frozen z_B = 0 makes B constant per group (Eq. 6)."""
    torch.manual_seed(0)
    m = GenLoRALinear(nn.Linear(32, 24), r=4, groups=4, freeze_latents=freeze)
    before, trained = {n: p.detach().clone() for n, p in m.named_parameters()}, {"z_A", "z_B", "theta_A", "theta_B"} - frozen
    genlora_fit_random_targets(m, 3, torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2))
    assert {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().max() > 0} == trained  # last step's
    assert {n for n, p in m.named_parameters() if not torch.equal(p, before[n])} == trained
    assert (m.B.view(4, 6, 4).std(dim=1).max() == 0) == ("z_B" in frozen) and m.delta_weight().abs().max() > 0
    assert {"z_A", "z_B", "theta_A", "theta_B"} <= set(m.state_dict())


def test_genlora_normalize_makes_A_invariant_to_the_scale_of_z_A_and_without_it_not():
    """Eq. 6 normalizes each group: A(c z_A + t) = A(z_A) for c > 0. normalize=False (Table 4, "w.o. Norm") feeds
    z_A to the generators as it is, so A changes, and it equals the float64 reference with x̂ = x."""
    torch.manual_seed(0)
    for normalize in (True, False):
        m = randomize_(GenLoRALinear(nn.Linear(32, 24), r=4, normalize=normalize), std=1.0, seed=0)
        A = m.A.detach().clone()
        with torch.no_grad():
            m.z_A.mul_(3.0).add_(0.5)
        if normalize:
            torch.testing.assert_close(m.A, A, rtol=1e-5, atol=1e-5)
        else:
            assert (m.A - A).abs().max() > 0.1
            want = genlora_reference_factors(m.z_A, m.theta_A, m.groups, 15, eps=0.0, normalize=False).T
            np.testing.assert_allclose(m.A.detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_genlora_state_dict_round_trip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    base = nn.Linear(32, 32)
    m = GenLoRALinear(base, r=4, groups=4)
    genlora_fit_random_targets(m, 5, torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2))
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("base.")}
    assert sorted(sd) == ["theta_A", "theta_B", "z_A", "z_B"]
    torch.save(sd, tmp_path / "adapter.pt")
    torch.manual_seed(1)  # a different init, overwritten by the load
    m2 = GenLoRALinear(base, r=4, groups=4)
    res = m2.load_state_dict(torch.load(tmp_path / "adapter.pt", weights_only=True), strict=False)
    assert not res.unexpected_keys and all(k.startswith("base.") for k in res.missing_keys)
    x = torch.randn(6, 32)
    assert torch.equal(m2(x), m(x))


@pytest.mark.slow
def test_genlora_file_works_copied_alone(tmp_path):
    """The adapter file, alone in an empty folder, trains and merges a toy model."""
    shutil.copy(os.path.join(HERE, "genlora.py"), tmp_path)
    script = textwrap.dedent("""
        import os, torch, torch.nn as nn
        import genlora
        assert os.path.dirname(os.path.abspath(genlora.__file__)) == os.getcwd()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).requires_grad_(False)
        net[0] = genlora.GenLoRALinear(net[0], r=4, groups=4)
        net[2] = genlora.GenLoRALinear(net[2], r=2, groups=2)
        x, y = torch.randn(256, 16), torch.randn(256, 4)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(100):
            loss = (net(x) - y).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        assert losses[-1] < 0.9 * losses[0], losses
        merged = nn.Sequential(net[0].merged(), nn.ReLU(), net[2].merged())
        assert torch.allclose(merged(x), net(x), rtol=1e-5, atol=1e-5)
        print("ok", losses[0], losses[-1])
    """)
    p = run_script("-c", script, cwd=tmp_path, env={"PYTHONPATH": None}, timeout=120)  # only the copy is importable
    assert p.returncode == 0 and p.stdout.startswith("ok"), p.stdout + p.stderr
