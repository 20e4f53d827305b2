"""train.py end to end: the training step, resume after Ctrl-C, the pretraining cache, bad input, the command line, DDP, --adapter all, --init-from.

Run alone: python -m pytest -q tests/test_train.py (test_all.py runs every topic)."""
import argparse
import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import nanogpt_model as M
import data
import diagnostics
import engine
import plots
import train
from lora import LoRALinear
from nanogpt_model import GPTConfig

from conftest import (
    FAST, HERE, LLAMA_CONFIGS, adapter_weights, llama_hf_model, llama_needs_hf, llama_needs_llama_models,
    llama_pydoc_text, run_in_process, run_script,
)


# ----------------------------------------------------------------------------------------------
# train.py end to end

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


@pytest.mark.parametrize("name", ["adapter.pt", "metrics.json"])
def test_train_atomic_save_failing_midway_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, monkeypatch, name):
    """A save that fails halfway (a full disk, Ctrl-C): the file saved before is intact and no partial or temporary
    file is left beside it. The write is torch.save's (.pt) or json.dump's (.json): each writes a part, then raises."""
    path = tmp_path / name
    engine.atomic_save({"old": 1}, str(path))
    before = path.read_bytes()

    def torch_half(obj, f):
        with open(f, "wb") as fh:
            fh.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    def json_half(obj, f, **kw):
        f.write('{"new": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_half)
    monkeypatch.setattr(json, "dump", json_half)
    with pytest.raises(OSError, match="No space"):
        engine.atomic_save({"new": 2}, str(path))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_end_to_end_lora(tmp_path, tiny_text, train_cache, monkeypatch, capsys):
    """One run through the real command line (a subprocess); the second and third run, in this process, check
    only that a finished run is not replaced without --overwrite."""
    r = run_script("train.py", "--adapter", "lora", "--data", tiny_text, "--out-dir", str(tmp_path), *FAST, cache=train_cache)
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
    capsys.readouterr()
    assert train.main(["--adapter", "lora", "--data", tiny_text, "--out-dir", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err.strip().splitlines()[-1], err[-2000:]
    assert train.main(["--adapter", "lora", "--data", tiny_text, "--out-dir", str(tmp_path), "--overwrite", "--lr", "0", *FAST]) == 0
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
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_two_commands_on_a_fresh_cache_pretrain_once(tmp_path, tiny_text):
    """Started together, two train.py runs on an empty cache: one pretrains, the other waits for its base (a lock),
    then both fine-tune on the same cached file; nothing half-written is left."""
    cache = tmp_path / "cache"
    argv = [*FAST, "--base-steps", "60", "--data", tiny_text, "--skip", "sample,plot"]
    procs = [run_script("train.py", "--adapter", "lora", *argv, "--out-dir", str(tmp_path / f"o{i}"), cache=str(cache), wait=False)
             for i in range(2)]
    logs = ["".join(p.communicate(timeout=600)) for p in procs]  # stdout and stderr: the log lines are on either
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("pretraining the built-in GPT" in log for log in logs) == 1, logs
    assert [f.name for f in cache.iterdir() if f.suffix == ".pt"] and not [f for f in cache.iterdir() if ".tmp" in f.name or f.suffix == ".ckpt"]
    m = [json.load(open(tmp_path / f"o{i}" / "lora" / "metrics.json")) for i in range(2)]
    assert m[0]["val_loss_before"] == m[1]["val_loss_before"]  # the same base


@pytest.mark.slow
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


@pytest.mark.parametrize("case", ["a file", "under a file", "adapter folder a file", "in use"])
def test_train_out_dir_unwritable_or_in_use_is_one_line_before_any_work(tmp_path, tiny_text, in_process, capsys, monkeypatch, case):
    """--out-dir is claimed before any work (it was first written after training: a traceback, the steps lost): a folder
    that cannot be made is one line, and so is <out-dir>/<adapter>/ locked by another run (here this process holds the
    lock; the two-process case: test_train_two_runs_on_one_out_dir_never_overwrite_each_other). The tests run as root,
    for whom a chmod'ed folder stays writable: a path under a regular file fails for everyone (NotADirectoryError)."""
    (tmp_path / "f").write_text("a file")
    out = {"a file": tmp_path / "f", "under a file": tmp_path / "f" / "out"}.get(case, tmp_path / "out")
    if case == "adapter folder a file":
        out.mkdir()
        (out / "lora").write_text("a file")
    held = engine.file_lock(str(out / "lora" / ".lock")) if case == "in use" else contextlib.nullcontext()
    with held:
        status, err = run_in_process([*FAST, "--data", tiny_text, "--adapter", "lora", "--out-dir", str(out)], capsys, monkeypatch)
    lines = err.strip().splitlines()
    expected = f"{out / 'lora'} is in use by another run" if case == "in use" else f"--out-dir {out}: cannot write {out / 'lora'}"
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), (status, err)


@pytest.mark.slow
def test_train_two_runs_on_one_out_dir_never_overwrite_each_other(tmp_path, tiny_text, train_cache, in_process, capsys, monkeypatch):
    """Two commands with other settings (--rank 4 in a subprocess, --rank 16 in this process) on one --out-dir: while
    the first trains, the second is one error line before any work (the folder's lock), and once the first has
    finished, one line too (--overwrite); the first's adapter is never replaced. The first is paused (SIGSTOP) while it
    holds the lock, so the two overlap whatever the machine's speed."""
    argv = ["--adapter", "lora", "--data", tiny_text, "--out-dir", str(tmp_path), *FAST, "--skip", "sample,plot"]
    first = run_script("train.py", *argv, "--rank", "4", cache=train_cache, env={"PYTHONUNBUFFERED": "1"}, wait=False)
    try:
        started = next((line for line in first.stdout if line.startswith("lora on ")), None)  # printed after the claim
        assert started, first.stderr.read()[-3000:]
        os.kill(first.pid, signal.SIGSTOP)
        status, err = run_in_process([*argv, "--rank", "16"], capsys, monkeypatch)
        os.kill(first.pid, signal.SIGCONT)
        assert status == 2 and err.strip().splitlines() == [
            f"error: {tmp_path / 'lora'} is in use by another run: wait for it to end, or choose another --out-dir"], err
        assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
        first.communicate()
    saved = (tmp_path / "lora" / "adapter.pt").read_bytes()
    assert torch.load(tmp_path / "lora" / "adapter.pt")["kwargs"]["r"] == 4
    status, err = run_in_process([*argv, "--rank", "16"], capsys, monkeypatch)
    assert status == 2 and "holds a finished run: pass --overwrite" in err and (tmp_path / "lora" / "adapter.pt").read_bytes() == saved, err


@pytest.mark.slow
def test_train_command_line_mistakes_are_one_line_in_a_subprocess(tmp_path):
    """The real command line: argparse's own errors, a GPU that is not there; one line, exit 2, no traceback, fast."""
    for argv, expected in ((["--steps"], "--steps"), (["--no-such-flag"], "--no-such-flag"), (["--device", "cuda"], "--device cuda")):
        t = time.perf_counter()
        r = run_script("train.py", *argv, "--out-dir", str(tmp_path), cache=str(tmp_path / "cache"))
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


@pytest.mark.parametrize("argv, expected", [
    (["--alpha", "0"], "--alpha 0: must be above 0"), (["--alpha", "inf"], "--alpha inf"),  # scale 0; inf: a nan loss
    (["--dropout", "1"], "--dropout 1: must be"), (["--dropout", "-0.1"], "--dropout -0.1"),
    (["--lr", "inf"], "--lr inf"), (["--lr", "nan"], "--lr nan"), (["--targets", ","], "no target"),
    (["--adapter", "aurora", "--no-fixed", "--no-learnable"], "sigma would be 0"),  # AuroRA's sigma = 0: B gets no gradient
    (["--adapter", "lrlora", "--lrlora-init", "zero"], "stationary point"),  # centred from a = 0: every gradient is 0
    (["--adapter", "lrlora", "--grid-range", "0"], "grid_range=0")])
def test_train_settings_that_would_train_nothing_are_one_line(tmp_path, tiny_text, in_process, capsys, monkeypatch, argv, expected):
    """A setting under which the run would train nothing, or end in a nan loss, is one `error:` line before any work, as
    a zero count is (test_train_zero_or_negative_count_is_one_line_naming_the_flag). --lr 0 stays: the untrained
    baseline, asked for by name."""
    status, err = run_in_process([*FAST, "--out-dir", str(tmp_path), "--data", tiny_text, "--adapter", "lora", *argv], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (status, err)
    assert train.parse_args(["--lr", "0"]).lr == 0


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


@pytest.mark.slow
def test_train_help_has_help_for_every_flag_and_no_doubled_defaults():
    p = run_script("train.py", "--help", timeout=120)
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


@pytest.mark.slow
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
    r = run_script("train.py", "--rank-report", str(tmp_path / "not an adapter.pt"), "--out-dir", str(tmp_path), *FAST, cache=os.environ["NONLINEAR_LORA_CACHE"])
    assert r.returncode == 2 and "not an adapter.pt" in r.stderr and "delete" not in r.stderr, r.stderr


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, tiny_text, train_cache):
    """DDP over gloo on the CPU: 2 processes x half the batch == 1 process x the whole batch."""
    common = ["--adapter", "lora", "--data", tiny_text, *FAST]
    one = run_script("train.py", *common, "--out-dir", str(tmp_path / "one"), cache=train_cache)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(HERE, "train.py"),
                     *common, "--out-dir", str(tmp_path / "two"), cache=train_cache)
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
    for name, W in cases.items():
        s = np.linalg.svd(W, compute_uv=False)
        st = diagnostics.rank_stats(torch.tensor(W))  # float32 singular values, as on the model's device
        assert st["numerical_rank"] == int((s > 0.005).sum()), name
        assert st["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-5), name
        assert st["energy"] == pytest.approx((W**2).sum(), rel=1e-9), name
        np.testing.assert_allclose(st["spectrum"], s[:64], rtol=1e-4, atol=1e-6 * s[0])
    assert diagnostics.rank_stats(torch.ones(20, 30))["stable_rank"] == pytest.approx(1.0)  # all-ones: rank one
    assert diagnostics.rank_stats(torch.eye(25))["stable_rank"] == pytest.approx(25.0)
    assert diagnostics.rank_stats(torch.tensor(cases["rank3"]))["numerical_rank"] == 3
    assert diagnostics.rank_stats(torch.tensor(cases["tiny"]))["numerical_rank"] == 0  # all below the 0.005 threshold


def test_train_rank_report_f_prime0_is_the_slope_of_f_with_moved_bandwidths():
    """The rank report's f'(0) of LR-LoRA (diagnostics.transfer_point; --rank-report prints it) against a central
    difference of f itself (lrlora.transfer, the direct sum of Eq. 4), once the bandwidths b_k = softplus(beta_k) and
    the amplitudes have moved off their init: at b_k = 1 a formula that lost its b_k factor would agree."""
    import lrlora
    from lrlora import LRLoRALinear

    mods = {}
    for i in range(2):
        torch.manual_seed(i)
        m = LRLoRALinear(nn.Linear(12, 10), r=2)
        with torch.no_grad():
            m.beta.add_(0.5 * torch.randn_like(m.beta))  # b_k from about 0.6 to 1.6
            m.a.normal_(0.0, 0.3)
            m.B.normal_(0.0, 0.1)
        mods[f"layers.{i}.q_proj"] = m
    eps, slopes = 1e-4, []
    for m in mods.values():
        a, b, g = m.a.detach().double(), F.softplus(m.beta.detach().double()), m.g.double()
        f = lambda t: lrlora.transfer(torch.tensor(t, dtype=torch.float64), a, b, g).item()
        slopes.append((f(eps) - f(-eps)) / (2 * eps))
    assert (F.softplus(mods["layers.0.q_proj"].beta) - 1).abs().max() > 0.3 and min(map(abs, slopes)) > 0.1  # a real test
    rep = diagnostics.rank_report(mods)
    got = rep["transfer"]["f_prime0"]
    for key, want in (("min", min(slopes)), ("max", max(slopes)), ("mean", sum(slopes) / 2)):
        assert got[key] == pytest.approx(want, rel=1e-4), (key, got, slopes)
    assert any(line.strip().startswith(f"f'(0)        mean {got['mean']:+.4g}") for line in diagnostics.rank_lines(rep, "t"))


@pytest.mark.slow
def test_adapter_all_compares_every_method(all_run, tmp_path, train_cache):
    """--adapter all (the run shared with the figure tests: all_run) writes compare.json, its table and compare.png."""
    out, printed = all_run
    cmp = json.load(open(out / "compare.json"))
    assert list(cmp["methods"]) == list(train.ADAPTERS)
    rows = [line.split()[0] for line in cmp["table"][2:]]
    assert rows == list(train.ADAPTERS) and all(row in printed for row in cmp["table"])
    # AuroRA dynamic's rank columns are of its approximate static merge, not of the model trained: marked, with a note
    assert [line.split()[0] for line in cmp["table"][2:] if line.endswith(" *")] == ["aurora"]
    assert f"* rank columns of {diagnostics.APPROXIMATE}" in printed.splitlines()
    assert [n for n, m in cmp["methods"].items() if f"  dW is {diagnostics.APPROXIMATE}" in diagnostics.rank_lines(m["rank"], n)] == ["aurora"]
    for name, m in cmp["methods"].items():
        assert isinstance(m["init_seconds"], float) and m["init_seconds"] > 0  # wrapping timed (RanLoRA: its decompositions)
        if m["merge"]["max_abs_logit_diff"] is None:  # RanLoRA with GELU: no weight-space dW
            assert m["rank"]["mean"] is None and m["rank"]["reason"]
        else:
            n_modules = GPTConfig().n_layer * len(set(m["targets"]) - {"gate"})  # the built-in GPT has no gate_proj
            assert 0 < m["rank"]["mean"]["stable_rank"] and len(m["rank"]["per_module"]) == n_modules
    if plots.pyplot() is None:  # a run without matplotlib says how to get the figure (CI installs it: the figure is required there)
        assert "pip install matplotlib for compare.png" in printed
    else:
        from PIL import Image

        assert (out / "compare.png").exists(), "matplotlib is installed, yet --adapter all drew no compare.png"
        assert min(Image.open(out / "compare.png").size) > 500 and "pip install matplotlib" not in printed

    rep = run_script("train.py", "--rank-report", str(out / "genlora" / "adapter.pt"), "--out-dir", str(tmp_path / "elsewhere"), *FAST, cache=train_cache)
    assert rep.returncode == 0, rep.stderr[-2000:]
    mean_line = [ln for ln in (rep.stdout + rep.stderr).splitlines() if ln.strip().startswith("mean")][0]
    assert float(mean_line.split()[2]) == pytest.approx(cmp["methods"]["genlora"]["rank"]["mean"]["stable_rank"], rel=1e-2)
    assert "pretraining the built-in GPT" not in rep.stdout + rep.stderr  # the cached base, found from another --out-dir

# ----------------------------------------------------------------------------------------------
# train.py --init-from: fine-tuning real LLaMA-architecture checkpoints

LLAMA_INIT_FROM_FAST = ["--steps", "6", "--eval-interval", "3", "--eval-iters", "2", "--batch-size", "2", "--block-size", "48",
                  "--sample-tokens", "6", "--device", "cpu"]


@llama_needs_hf
@llama_needs_llama_models
@pytest.mark.slow
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
    bad = run_script("train.py", "--init-from", str(tmp_path / "nowhere"), "--adapter", "lora", "--out-dir", str(tmp_path / "out"), *LLAMA_INIT_FROM_FAST, timeout=900)
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


@pytest.mark.slow
def test_llama_train_init_from_smollm2_every_adapter(llama_smollm2_dir, tmp_path):
    """Real pretrained weights, every adapter on q and v (to keep CI short), a small slice of the pydoc topics text,
    train.py's --init-from defaults (each adapter's llm_lr, dropout 0.05, its paper's schedule): the val loss falls for each."""
    data = tmp_path / "data.txt"
    data.write_text(llama_pydoc_text()[:30_000])
    r = run_script("train.py", "--init-from", str(llama_smollm2_dir), "--adapter", "all", "--targets", "q,v", "--data", str(data),
                    "--out-dir", str(tmp_path / "out"), "--skip", "plot", *LLAMA_INIT_FROM_FAST, timeout=900,
                    env={"OMP_NUM_THREADS": "2"})  # the suite's heaviest run, alone: both cores; the figures: test_plots.py
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
