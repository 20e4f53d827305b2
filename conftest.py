"""Shared fixtures and helpers of the test suite (tests/*.py, and test_all.py, which runs them all).

Fixtures here are session-scoped where they are expensive (the tiny text, the built-in GPT's test cache and its
pretraining, the tiny HF checkpoints, SmolLM2's conversion): made once per run, whichever topics run.
Each test file imports the helpers it uses by name (`from conftest import randomize_, tiny_gpt`).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import nanogpt_model as M
import train
from nanogpt_model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))  # the repository root
torch.set_num_threads(1)  # one thread, as the suite always ran (the LLaMA tests set it at import)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()


def randomize_(module, std=0.1, seed=1, names=None, dtype=None, add=None, trainable=False):
    """Give adapter parameters random N(0, std^2) values, so merge and gradient tests compare something real (B is zero
    at init, which would hide bugs). By default every parameter of every adapter layer in module (a layer with a .base)
    except its frozen base layer's, frozen latents included, in the order the layer registers them. The differences
    between the tests' needs are parameters: names, only these and in this order; dtype, the dtype the values are drawn
    in (then cast to the parameter's); add, {name: constant} added after the draw; trainable=True, every parameter that
    requires grad instead, base layers included (a model left unfrozen, as the figure tests build it). Returns the module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if trainable:
            for p in [p for p in module.parameters() if p.requires_grad]:
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype or p.dtype) * std)
            return module
        for m in [m for m in module.modules() if isinstance(getattr(m, "base", None), nn.Module)]:
            base = {id(p) for p in m.base.parameters()}
            params = [getattr(m, n) for n in names] if names else [p for p in m.parameters() if id(p) not in base]
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype or p.dtype) * std)
            for n, c in (add or {}).items():
                getattr(m, n).add_(c)
    return module


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:40_000])
    return str(path)


@pytest.fixture(scope="session")
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


def run_script(script, *args, cache=None, cwd=HERE, env=None, wait=True, timeout=600):
    """python <script> args in a subprocess, as a user runs it: script a file of the repository ("train.py",
    "tools/study.py"), or "-c" / "-m" with the code / module as the first of args. One torch thread (OMP_NUM_THREADS=1);
    cache: NONLINEAR_LORA_CACHE (the built-in GPT's test cache); env: more variables, None removing one. Returns the
    CompletedProcess (text, captured); wait=False, the running Popen (stdout, stderr piped)."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", **({"NONLINEAR_LORA_CACHE": cache} if cache else {})}
    for k, v in (env or {}).items():
        full.pop(k, None) if v is None else full.__setitem__(k, v)
    cmd = [sys.executable, script if script in ("-c", "-m") else os.path.join(HERE, script), *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full, cwd=cwd)
    return subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=cwd, timeout=timeout)


def adapter_weights(out_dir, name="lora"):
    return torch.load(Path(out_dir) / name / "adapter.pt")["state"]

def run_in_process(argv, capsys, monkeypatch):
    """train.main on argv with the expensive steps made to fail: a user mistake must be caught before them."""
    def expensive(*a, **k):
        raise AssertionError("expensive work started before the input was checked")

    monkeypatch.setattr(train, "load_base", expensive)
    monkeypatch.setattr(train, "pretrain_gpt", expensive)
    capsys.readouterr()
    status = train.main(argv)
    return status, capsys.readouterr().err


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


@pytest.fixture(scope="session")
def llama_hf_dirs(tmp_path_factory):
    """name -> (HF model, directory written by save_pretrained)."""
    out = {}
    for name, kw in LLAMA_CONFIGS.items():
        model = llama_hf_model(**kw)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d, safe_serialization=True)
        out[name] = (model, d)
    return out

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

def llama_pydoc_text():
    import pydoc_data.topics
    return "".join(pydoc_data.topics.topics.values())

@pytest.fixture(scope="session")
def llama_smollm2_dir():
    if llama_optional("gguf") is None or llama_optional("transformers") is None:
        pytest.skip("needs gguf and transformers")
    sys.path.insert(0, str(Path(HERE) / "tools"))
    import smollm2_to_hf
    try:
        smollm2_to_hf.gguf_file()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return smollm2_to_hf.convert()  # cached after the first call


@pytest.fixture(scope="session")
def llama_smollm2_models(llama_smollm2_dir):
    from transformers import LlamaForCausalLM
    return M.load_llama(llama_smollm2_dir).eval(), LlamaForCausalLM.from_pretrained(llama_smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def all_run(tmp_path_factory, tiny_text, train_cache):
    """train.py --adapter all on the FAST settings, in a subprocess, once for the comparison test (tests/test_train.py) and
    the figure tests (tests/test_plots.py): (output folder, what the run printed)."""
    out = tmp_path_factory.mktemp("all_run")
    r = run_script("train.py", "--adapter", "all", "--data", tiny_text, "--out-dir", str(out), *FAST, cache=train_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout + r.stderr


def pytest_collection_modifyitems(config, items):
    """`pytest .` (test_all.py and tests/ both named) would run each test twice: test_all.py's copy is kept."""
    via_all = {(item.function, item.name) for item in items if item.path.name == "test_all.py" and hasattr(item, "function")}
    twice = [item for item in items if item.path.name != "test_all.py" and (getattr(item, "function", None), item.name) in via_all]
    if twice:
        config.hook.pytest_deselected(items=twice)
        twice = set(twice)
        items[:] = [item for item in items if item not in twice]
