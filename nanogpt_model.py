"""The models the adapters are trained on.

1. GPT: a small nanoGPT-style decoder, byte-level by default, built in so that
   `python train.py` needs no download. Its projections are separate and named
   like LLaMA's (q_proj k_proj v_proj o_proj, up_proj down_proj), so one
   `--targets` list works on both models.
2. LLaMA: the LLaMA-3 architecture. Its checkpoint loader (HF safetensors and Meta
   .pth) is in checkpoints.py, the LLaMA-3 and tokenizer.json tokenizers in
   llama_tokenizer.py; both are re-exported at the end of this file.

Only torch, numpy and tiktoken at run time.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


# ----------------------------------------------------------------------------------------------
# tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 symbols, nothing to download, any text round-trips."""

    vocab_size = 256
    bos_id = eos_id = None

    def encode(self, text, bos=False, eos=False):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# a key-value cache, shared by both models' attention


class KVCache:
    """Every layer's keys and values of the tokens a model has seen, so that a forward of new tokens attends to them
    without computing them again: the choices of a multiple-choice question scored after one pass over the question,
    greedy decoding one token a step (commonsense.py). model(idx, cache=c) appends idx's keys and values.
    pad, a (B,) tensor: each row's first pad[b] tokens are left padding (sequences of different lengths in one batch):
    no token attends to them, and each row's positions count from its first real token."""

    def __init__(self, pad=None):
        self.kv, self.length, self.pad = {}, 0, pad  # layer -> (k, v) of shape (B, kv heads, length, head dim); tokens so far

    def rows(self, index):
        """A cache whose row i is this one's row index[i] (several choices continuing one question)."""
        c = KVCache(None if self.pad is None else self.pad[index])
        c.kv, c.length = {i: (k[index], v[index]) for i, (k, v) in self.kv.items()}, self.length
        return c

    def positions(self, T, device):
        """The positions of the next T tokens, (1, T), or (B, T) with padding."""
        p = torch.arange(self.length, self.length + T, device=device)[None]
        return p if self.pad is None else (p - self.pad[:, None]).clamp(min=0)


def attend(q, k, v, cache, layer, enable_gqa=False):
    """Causal attention of q over k, v, after the cached keys and values of the same layer when there is a cache."""
    if cache is None or layer not in cache.kv and cache.pad is None:  # nothing before, no padding: plain causal attention
        if cache is not None:
            cache.kv[layer] = (k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if layer in cache.kv:
        k, v = (torch.cat(t, dim=2) for t in zip(cache.kv[layer], (k, v)))
    cache.kv[layer] = (k, v)
    T, S = q.shape[2], k.shape[2]  # new token i (position S - T + i) sees the keys at positions up to its own
    key, query = torch.arange(S, device=q.device)[None, :], torch.arange(S - T, S, device=q.device)[:, None]
    mask = key <= query
    if cache.pad is not None:  # padding is no key, except to itself: a query with no key at all is NaN on some kernels
        mask = ((mask & (key >= cache.pad[:, None, None])) | (key == query))[:, None]  # (B, 1, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


# ----------------------------------------------------------------------------------------------
# the built-in GPT


@dataclass
class GPTConfig:
    vocab_size: int = 256  # bytes
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        # separate projections (not nanoGPT's fused c_attn) so adapters target q, k, v one by one
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:  # inference only: no attention dropout
            y = attend(q, k, v, cache, layer)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.down_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT with LLaMA-style projection names: learned positions, LayerNorm, GELU, tied head."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, cache=None, keep=None):
        """Logits (B, T, vocab); with a KVCache, idx continues the tokens cached; with keep, a (B, T) bool mask, only
        the kept positions' logits, (kept, vocab) in row-major order (the head is a large share of a small model's work)."""
        start = cache.length if cache is not None else 0
        T = start + idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device) if cache is None else cache.positions(idx.shape[1], idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.layers):
            x = block(x, cache, i)
        if cache is not None:
            cache.length = T
        return self.lm_head(self.ln_f(x if keep is None else x[keep]))

    @property
    def max_seq_len(self):
        return self.config.block_size


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.8, top_k=50, stop_id=None):
    """Sample a continuation of idx (1, T) from any model here that returns logits (B, T, vocab)."""
    # each token is a new sequence length, and cuDNN's attention builds a plan for every new length (a first
    # 32-token sample on the 1B shape took 2.9 s on an H200, 0.7 s once planned): generate with the others
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        for _ in range(max_new_tokens):
            logits = model(idx[:, -model.max_seq_len:])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits[logits < kth] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)
            idx = torch.cat([idx, nxt], dim=1)
            if stop_id is not None and nxt.item() == stop_id:
                break
    return idx


# ----------------------------------------------------------------------------------------------
# LLaMA: the architecture (its checkpoint loader is in checkpoints.py, its tokenizers in llama_tokenizer.py)
#
# The module tree mirrors HF's LlamaForCausalLM without its `model.` prefix, so a HF tensor name
# maps to ours by dropping that prefix (model.layers.3.self_attn.q_proj.weight -> layers.3.self_attn.
# q_proj.weight) and adapters find q_proj ... down_proj by name. RoPE uses HF's half-split layout;
# Meta checkpoints have their q/k rows permuted into it at load time.


@dataclass
class LLaMAConfig:
    """Field names are HF config.json keys. Defaults: LLaMA-3.2-1B."""

    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int = 8  # GQA: each KV head serves num_attention_heads // num_key_value_heads query heads
    head_dim: int = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict = None  # None, {"rope_type": "linear", "factor"} or {"rope_type": "llama3", "factor",
    #                            "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}: RoPE needs an even head dimension")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_type={kind!r} is not supported; supported: default, linear, llama3")

    @classmethod
    def from_hf(cls, cfg: dict):
        """From a HF config.json dict. RoPE settings come from `rope_parameters` (transformers >= 5) or from
        top-level `rope_theta` + `rope_scaling` (older files; `type` was the old name of `rope_type`)."""
        if cfg.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type={cfg['model_type']!r} is not supported; only 'llama' (LLaMA 1-3, SmolLM, ...)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported; LLaMA uses 'silu'")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))  # 10000: HF LlamaConfig's default
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        if rope.pop("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=None if kind == "default" else {"rope_type": kind, **rope},
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),  # LlamaConfig's default
            attention_bias=cfg.get("attention_bias", False), mlp_bias=cfg.get("mlp_bias", False))

    @classmethod
    def from_meta(cls, params: dict, vocab_size=None, tie_word_embeddings=False):
        """From Meta's params.json (llama-models' ModelArgs), whose FFN width is derived, not stored."""
        dim, heads = params["dim"], params["n_heads"]
        hidden = int(2 * 4 * dim / 3)  # ModelArgs / FeedForward: 2/3 of 4*dim, times the multiplier, rounded up
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        multiple_of = params.get("multiple_of", 256)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        scaled = params.get("use_scaled_rope", False)
        # llama-models' apply_scaling: factor 8, low 1, high 4, old context 8192 (LLaMA-3.1); newer params.json
        # files may carry rope_scaling_factor / rope_high_freq_factor
        scaling = {"rope_type": "llama3", "factor": float(params.get("rope_scaling_factor") or 8.0), "low_freq_factor": 1.0,
                   "high_freq_factor": float(params.get("rope_high_freq_factor") or 4.0),
                   "original_max_position_embeddings": 8192} if scaled else None
        vocab = params.get("vocab_size", -1)
        return cls(
            vocab_size=vocab if vocab > 0 else vocab_size, hidden_size=dim, intermediate_size=hidden,
            num_hidden_layers=params["n_layers"], num_attention_heads=heads,
            num_key_value_heads=params.get("n_kv_heads") or heads, head_dim=params.get("head_dim"),
            rms_norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=scaling, max_position_embeddings=params.get("max_seq_len", 131072 if scaled else 8192),
            tie_word_embeddings=tie_word_embeddings)


def rope_inv_freq(cfg: LLaMAConfig, device=None):
    """RoPE frequencies theta^(-2i/d), i < d/2, with LLaMA-3.1's long-context rescaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":  # position interpolation: every frequency slowed by the factor
        return inv_freq / s["factor"]
    # llama3: wavelengths shorter than old_context/high_freq_factor stay, longer than old_context/low_freq_factor
    # are slowed by `factor`, in between blend smoothly (llama-models apply_scaling, HF _compute_llama3_parameters)
    factor, low, high, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(cfg: LLaMAConfig, T, device, dtype, positions=None):
    """cos and sin of position * frequency, (T, head_dim) for positions 0 ... T - 1 (or positions' shape + (head_dim,)),
    computed in float32 then cast (as HF does).
    Computed per forward from the config, not kept as a buffer: nothing to lose to device="meta" or .to(bf16)."""
    pos = torch.arange(T, device=device) if positions is None else positions
    freqs = pos.float()[..., None] * rope_inv_freq(cfg, device)  # torch.outer's products, for any shape of positions
    emb = torch.cat((freqs, freqs), dim=-1)  # half-split layout: dim i pairs with dim i + head_dim/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # rotate each (x_i, x_{i+d/2}) pair by position*freq_i


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x):
        h = x.float()  # normalize in float32 whatever the model dtype; bf16 squares lose too much
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LLaMAAttention(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(D, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, D, bias=bias)

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, cache, layer, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LLaMAMLP(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        D, H, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(D, H, bias=bias)
        self.up_proj = nn.Linear(D, H, bias=bias)
        self.down_proj = nn.Linear(H, D, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LLaMABlock(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LLaMAAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LLaMAMLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    """LLaMA 1-3 decoder: RMSNorm, RoPE (+ llama3 scaling), GQA, SwiGLU, tied or untied head."""

    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LLaMABlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, idx, cache=None, keep=None):
        """Logits (B, T, vocab); cache and keep as GPT.forward's (a KVCache to continue, a bool mask of the positions
        whose logits are wanted)."""
        start = cache.length if cache is not None else 0
        T = start + idx.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_position_embeddings {self.max_seq_len}")
        x = self.embed_tokens(idx)
        if cache is None:
            cos, sin = rope_cos_sin(self.config, T, x.device, x.dtype)
        else:  # (1 or B, 1, new tokens, head dim): each row's own positions, broadcast over the heads
            cos, sin = (t[:, None] for t in rope_cos_sin(self.config, T, x.device, x.dtype, cache.positions(idx.shape[1], x.device)))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.length = T
        return self.lm_head(self.norm(x if keep is None else x[keep]))

    @property
    def max_seq_len(self):
        return self.config.max_position_embeddings


# re-exported: the docs, scripts and tests import these from here, where they lived before the split
from checkpoints import (SHARD_BYTES, load_llama, read_hf_weights, read_safetensors,  # noqa: E402,F401
                         write_hf_weights, write_safetensors)
from llama_tokenizer import (LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, HFTokenizer, Llama3Tokenizer,  # noqa: E402,F401
                             _byte_level_alphabet, load_tokenizer)
