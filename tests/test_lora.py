"""LoRA (lora.py): the plain baseline, against float64 and HF PEFT.

Run alone: python -m pytest -q tests/test_lora.py (test_all.py runs every topic)."""

import pytest
import torch
import torch.nn as nn

import train
from lora import LoRALinear

from conftest import randomize_, tiny_gpt


# ----------------------------------------------------------------------------------------------
# LoRA


def test_lora_init_is_the_base_layer():
    base = nn.Linear(16, 12)
    lora = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 5, 16)
    assert torch.equal(lora(x), base(x))
    assert torch.count_nonzero(lora.delta_weight()) == 0
    assert lora.A.abs().sum() > 0  # A random, B zero: the update starts at zero but can move


def test_lora_forward_matches_float64_recomputation():
    base = nn.Linear(16, 12).double()
    lora = LoRALinear(base, r=4, alpha=8)
    randomize_(lora)
    x = torch.randn(7, 16, dtype=torch.float64)
    A, B = lora.A.double(), lora.B.double()
    expected = x @ base.weight.T + base.bias + (8 / 4) * (x @ A.T) @ B.T
    torch.testing.assert_close(lora(x).double(), expected, rtol=1e-6, atol=1e-6)


def test_lora_only_adapter_parameters_get_gradients():
    model = tiny_gpt()
    model.requires_grad_(False)
    adapters = train.inject(model, "lora", ["q", "v"], {"r": 2})
    model(torch.randint(0, 256, (2, 16))).sum().backward()
    for name, p in model.named_parameters():
        is_adapter = name.endswith((".A", ".B"))
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
    assert len(adapters) == 4  # 2 layers x (q, v)


def test_lora_merge_is_exact_idempotent_and_leaves_base_untouched():
    base = nn.Linear(32, 24)
    w0 = base.weight.detach().clone()
    lora = LoRALinear(base, r=4, alpha=8)
    randomize_(lora)
    x = torch.randn(10, 32)
    m1, m2 = lora.merged(), lora.merged()
    torch.testing.assert_close(m1(x), lora(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(m1.weight, m2.weight) and torch.equal(m1.bias, base.bias)
    assert torch.equal(base.weight, w0)  # merging builds a new Linear: no in-place drift
    assert m1.weight is not base.weight


def test_lora_bad_rank_is_a_value_error():
    for r in (0, -1, 2.5):
        with pytest.raises(ValueError, match="r="):
            LoRALinear(nn.Linear(16, 32), r=r)


def test_lora_rank_above_the_layer_width_fits_and_dW_rank_stays_bounded():
    """r = 8 (the default) on an 8 -> 3 layer: allowed, as in HF PEFT, so the defaults fit any layer;
    rank(dW) <= min(r, in, out) = 3 however B and A train."""
    lora = LoRALinear(nn.Linear(8, 3))
    randomize_(lora)
    assert lora.r == 8 and lora.A.shape == (8, 8) and lora.B.shape == (3, 8)
    assert torch.linalg.matrix_rank(lora.delta_weight().double()) == 3
    x = torch.randn(5, 8)
    torch.testing.assert_close(lora.merged()(x), lora(x), rtol=1e-5, atol=1e-5)


def test_lora_matches_hf_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30))
    ref = peft.get_peft_model(nn.Sequential(nn.Linear(20, 30)), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["0"]))
    ref.base_model.model[0].base_layer.load_state_dict(model[0].state_dict())
    ours = LoRALinear(model[0], r=4, alpha=12)
    randomize_(ours)
    with torch.no_grad():
        ref.base_model.model[0].lora_A["default"].weight.copy_(ours.A)
        ref.base_model.model[0].lora_B["default"].weight.copy_(ours.B)
    x = torch.randn(5, 20)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    merged = ref.merge_and_unload()
    torch.testing.assert_close(ours.merged().weight, merged[0].weight, rtol=1e-6, atol=1e-6)
