"""The fused (CUDA) paths of the adapters compute what the plain PyTorch definitions compute.

On CUDA, GenLoRA, AuroRA and RanLoRA run their parameter-side or bottleneck math through torch.compile'd functions
(genlora.generated_factors, aurora.anl_cast, ranlora.modulate), written so that inductor fuses them (the small
matmuls as broadcast sums). Here those functions run eagerly on the CPU, in float32, against the plain path:
forward and every gradient. tools/fused_check.py checks the compiled kernels themselves on a GPU.

    python -m pytest -q tests/test_fused.py
"""
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import aurora  # noqa: E402
import genlora  # noqa: E402
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
