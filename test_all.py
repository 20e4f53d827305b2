"""The test suite: python -m pytest -q test_all.py

Each test compares against something independent of the code under test: a float64
recomputation written plainly here, HF PEFT / transformers where installed, numpy.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import train
from lora import LoRALinear
from nanogpt_model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()


def randomize_(module, std=0.1, seed=1):
    """Give every adapter parameter a nonzero value, so merge tests compare something real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


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
    for r in (0, -1, 17):
        with pytest.raises(ValueError, match="r="):
            LoRALinear(nn.Linear(16, 32), r=r)


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


FAST = ["--steps", "6", "--base-steps", "5", "--eval-interval", "3", "--eval-iters", "2", "--batch-size", "4",
        "--block-size", "32", "--sample-tokens", "8", "--device", "cpu"]


def run_train(*args, cwd=HERE):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_train_end_to_end_lora(tmp_path, tiny_text):
    r = run_train("--adapter", "lora", "--data", tiny_text, "--out-dir", str(tmp_path), *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.load(open(tmp_path / "lora" / "metrics.json"))
    for k in ("adapter", "trainable_params", "total_params", "val_loss_before", "val_loss_after", "steps", "tokens_per_s"):
        assert k in m, k
    assert m["adapter"] == "lora" and m["steps"] == 6 and 0 < m["trainable_params"] < m["total_params"]
    assert m["merge"]["exact"] is True and m["merge"]["passed"] is True
    assert m["merge"]["max_abs_logit_diff"] < 1e-4 and abs(m["merge"]["val_loss_merged"] - m["merge"]["val_loss_unmerged"]) < 1e-5
    assert m["init_gap_max_abs_logit_diff"] == 0.0
    assert not (tmp_path / "lora" / "ckpt.pt").exists()  # a finished run leaves no resume checkpoint

    # the saved adapter loads back onto a fresh base and reproduces the trained model's loss
    args = train.parse_args(["--adapter", "lora", "--data", tiny_text, "--out-dir", str(tmp_path), *FAST])
    model, tok, _ = train.load_base(args)
    adapters, ckpt = train.load_adapter(model, str(tmp_path / "lora" / "adapter.pt"))
    assert set(ckpt["state"]) == {f"{n}.{k}" for n in adapters for k in ("A", "B")}
    _, val = train.split_tokens(tok.encode(open(tiny_text).read()), args.block_size, "data")
    torch.testing.assert_close(train.evaluate(model, train.eval_batches(val, args), args), m["val_loss_after"], rtol=1e-5, atol=1e-5)


def test_train_resumes_an_interrupted_run_exactly(tmp_path, tiny_text, monkeypatch):
    common = ["--adapter", "lora", "--data", tiny_text, *FAST]
    assert train.main([*common, "--out-dir", str(tmp_path / "straight")]) == 0

    calls = {"n": 0}
    real = train.get_batch

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # Ctrl-C during step 5
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "get_batch", interrupting)
    with pytest.raises(SystemExit) as e:
        train.main([*common, "--out-dir", str(tmp_path / "resumed")])
    assert e.value.code == 130 and (tmp_path / "resumed" / "lora" / "ckpt.pt").exists()
    monkeypatch.setattr(train, "get_batch", real)
    assert train.main([*common, "--out-dir", str(tmp_path / "resumed")]) == 0

    a = torch.load(tmp_path / "straight" / "lora" / "adapter.pt")["state"]
    b = torch.load(tmp_path / "resumed" / "lora" / "adapter.pt")["state"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["missing", "empty", "short", "adapter", "target", "nomatch", "rank", "flag", "corrupt"])
def test_train_bad_input_is_one_clear_line(tmp_path, tiny_text, case):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("too short for a block")
    base = ["--out-dir", str(tmp_path), *FAST]
    argv = {
        "missing": ["--data", str(tmp_path / "nope.txt")],
        "empty": ["--data", str(empty)],
        "short": ["--data", str(short)],
        "adapter": ["--adapter", "nosuch", "--data", tiny_text],
        "target": ["--adapter", "lora", "--targets", "q,zz", "--data", tiny_text],
        "nomatch": ["--adapter", "lora", "--targets", "gate", "--data", tiny_text],  # the GPT has no gate_proj
        "rank": ["--adapter", "lora", "--rank", "100000", "--data", tiny_text],
        "flag": ["--adapter", "lora", "--groups", "4", "--data", tiny_text],
        "corrupt": ["--adapter", "lora", "--data", tiny_text],
    }[case]
    if case == "corrupt":  # an interrupted run's checkpoint that was damaged on disk
        (tmp_path / "lora").mkdir()
        (tmp_path / "lora" / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = run_train(*argv, *base)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    expected = {"missing": "nope.txt", "empty": "no text", "short": "too short", "adapter": "unknown adapter", "target": "zz",
                "nomatch": "no module", "rank": "r=100000", "flag": "--groups", "corrupt": "ckpt.pt"}[case]
    assert expected in lines[-1]


def test_torchrun_two_processes_match_one_process(tmp_path, tiny_text):
    """DDP over gloo on the CPU: 2 processes x half the batch == 1 process x the whole batch."""
    common = ["--adapter", "lora", "--data", tiny_text, *FAST]
    one = run_train(*common, "--out-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
             "tiny": 1e-4 * rng.standard_normal((10, 10))}
    for name, M in cases.items():
        s = np.linalg.svd(M, compute_uv=False)
        st = train.rank_stats(torch.tensor(M))
        assert st["numerical_rank"] == int((s > 0.005).sum()), name
        assert st["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9), name
        assert st["energy"] == pytest.approx((M**2).sum(), rel=1e-9), name
    assert train.rank_stats(torch.ones(20, 30))["stable_rank"] == pytest.approx(1.0)  # all-ones: rank one
    assert train.rank_stats(torch.eye(25))["stable_rank"] == pytest.approx(25.0)
    assert train.rank_stats(torch.tensor(cases["rank3"]))["numerical_rank"] == 3
    assert train.rank_stats(torch.tensor(cases["tiny"]))["numerical_rank"] == 0  # all below the 0.005 threshold


def test_adapter_all_compares_every_method(tmp_path, tiny_text):
    r = run_train("--adapter", "all", "--data", tiny_text, "--out-dir", str(tmp_path), *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    cmp = json.load(open(tmp_path / "compare.json"))
    assert list(cmp["methods"]) == list(train.ADAPTERS)
    rows = [line.split()[0] for line in cmp["table"][2:]]
    assert rows == list(train.ADAPTERS) and all(row in r.stdout + r.stderr for row in cmp["table"])
    for name, m in cmp["methods"].items():
        if m["merge"]["max_abs_logit_diff"] is None:  # RanLoRA with GELU: no weight-space dW
            assert m["rank"]["mean"] is None and m["rank"]["reason"]
        else:
            n_modules = GPTConfig().n_layer * len(set(m["targets"]) - {"gate"})  # the built-in GPT has no gate_proj
            assert 0 < m["rank"]["mean"]["stable_rank"] and len(m["rank"]["per_module"]) == n_modules
    assert (tmp_path / "compare.png").exists() or "pip install matplotlib" in r.stdout + r.stderr

    rep = run_train("--rank-report", str(tmp_path / "genlora" / "adapter.pt"), "--data", tiny_text, "--out-dir", str(tmp_path), *FAST)
    assert rep.returncode == 0, rep.stderr[-2000:]
    mean_line = [ln for ln in (rep.stdout + rep.stderr).splitlines() if ln.strip().startswith("mean")][0]
    assert float(mean_line.split()[2]) == pytest.approx(cmp["methods"]["genlora"]["rank"]["mean"]["stable_rank"], rel=1e-2)
