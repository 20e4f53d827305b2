"""The models the adapters are trained on.

1. GPT: a small nanoGPT-style decoder, byte-level by default, built in so that
   `python train.py` needs no download. Its projections are separate and named
   like LLaMA's (q_proj k_proj v_proj o_proj, up_proj down_proj), so one
   `--targets` list works on both models.
2. LLaMA: the LLaMA-3 architecture, a checkpoint loader (HF safetensors and Meta
   .pth) and the LLaMA-3 tokenizer through tiktoken.

Only torch, numpy and tiktoken at run time.
"""
import base64
import json
import math
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import tiktoken
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

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
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

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
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

    def forward(self, idx):
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # logits (B, T, vocab)

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
# LLaMA: architecture, checkpoint loader, LLaMA-3 tokenizer
# (everything below this line belongs to the LLaMA section)
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


def rope_cos_sin(cfg: LLaMAConfig, T, device, dtype):
    """cos and sin of position * frequency, (T, head_dim), computed in float32 then cast (as HF does).
    Computed per forward from the config, not kept as a buffer: nothing to lose to device="meta" or .to(bf16)."""
    freqs = torch.outer(torch.arange(T, device=device).float(), rope_inv_freq(cfg, device))
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

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
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

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
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

    def forward(self, idx):
        T = idx.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_position_embeddings {self.max_seq_len}")
        x = self.embed_tokens(idx)
        cos, sin = rope_cos_sin(self.config, T, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))  # logits (B, T, vocab)

    @property
    def max_seq_len(self):
        return self.config.max_position_embeddings


# ----------------------------------------------------------------------------------------------
# safetensors, read and written by hand: 8-byte little-endian header length N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data,
# which the tensors must cover exactly, back to back. Checked as strictly as the safetensors library
# (it rejects everything rejected here but duplicate names, which it silently resolves to the last).

_ST_DTYPES = {name: getattr(torch, attr) for name, attr in [
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"), ("I32", "int32"),
    ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"), ("U32", "uint32"),
    ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu")]
    if hasattr(torch, attr)}
_ST_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def _json_object_no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _is_uint(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors(path):
    """name -> tensor. Tensors view a private (copy-on-write) mmap of the file: no copy, no read until used,
    writes never reach the file. Any malformed file -> ValueError naming the file (and tensor)."""
    path = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{path}: {size} bytes, too short for the 8-byte safetensors header length")
        n = int.from_bytes(f.read(8), "little")
        if n > _ST_MAX_HEADER:
            raise ValueError(f"{path}: header length {n} is absurd (limit {_ST_MAX_HEADER}): not a safetensors file?")
        if 8 + n > size:
            raise ValueError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_json_object_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: header is a JSON {type(header).__name__}, not an object")
        meta = header.pop("__metadata__", None)  # optional; null is accepted by the library too
        if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
            raise ValueError(f"{path}: __metadata__ must map strings to strings")
        data_start, data_len = 8 + n, size - 8 - n
        entries = []
        for name, info in header.items():
            where = f"{path}: tensor {name!r}"
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                raise ValueError(f"{where}: entry must be an object with dtype, shape and data_offsets")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
                raise ValueError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(_ST_DTYPES)})")
            if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
                raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)
                    and offsets[0] <= offsets[1]):
                raise ValueError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
            dtype = _ST_DTYPES[dtype]
            nbytes = math.prod(shape) * dtype.itemsize
            if offsets[1] - offsets[0] != nbytes:
                raise ValueError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                                 f"shape {shape} of {info['dtype']} needs {nbytes}")
            if offsets[1] > data_len:
                raise ValueError(f"{where}: data_offsets {offsets} run past the end of the data ({data_len} bytes)")
            entries.append((offsets[0], offsets[1], name, dtype, shape))
        entries.sort(key=lambda e: e[:2])
        covered = 0
        for begin, end, name, _, _ in entries:  # back to back: no overlap, no gap
            if begin != covered:
                raise ValueError(f"{path}: tensor {name!r} starts at byte {begin} of the data, expected {covered} "
                                 f"({'overlaps the previous tensor' if begin < covered else 'leaves a gap'})")
            covered = end
        if covered != data_len:
            raise ValueError(f"{path}: the tensors cover {covered} of the {data_len} data bytes")
        # ACCESS_COPY = MAP_PRIVATE: writable tensors (torch wants that), the file itself is never changed
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if data_len else None
    out = {}
    for begin, end, name, dtype, shape in entries:
        if begin == end:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (data_start + begin) % dtype.itemsize == 0:  # aligned: a zero-copy view of the mapping
            out[name] = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                         offset=data_start + begin).view(shape)
        else:  # the format does not promise alignment; copy this one tensor rather than build a misaligned view
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=data_start + begin)
            out[name] = raw.clone().view(dtype).view(shape)
    return out


def write_safetensors(path, tensors, metadata=None):
    """Write name -> tensor as a safetensors file that read_safetensors and the safetensors library read back
    bit for bit. As the library lays it out: widest dtypes first, then by name, and the header padded with
    spaces to 8 bytes, so every tensor starts at a multiple of its own size (our reader maps it without a copy)."""
    codes = {dtype: code for code, dtype in _ST_DTYPES.items()}
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header, offset = {"__metadata__": dict(metadata)} if metadata else {}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in codes:
            raise ValueError(f"{path}: tensor {name!r} is {t.dtype}, which safetensors cannot store")
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * t.element_size()]}
        offset = header[name]["data_offsets"][1]
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in order:  # one tensor at a time, as raw bytes: a mapped base tensor is read once, never copied whole
            f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


# ----------------------------------------------------------------------------------------------
# the checkpoint loader


def load_llama(path, device="cpu", dtype=None):
    """A LLaMA from a HF directory (config.json + model.safetensors or its shard index) or a Meta directory
    (params.json + consolidated.00.pth; also found under original/). dtype=None keeps the checkpoint's dtype.
    The model is built on the meta device and takes the loaded tensors as they are (same dtype, same device:
    no copy), so memory stays close to one copy of the weights."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such checkpoint directory")
    if (root / "config.json").is_file():
        cfg, tensors, names = _read_hf(root)
    elif (root / "params.json").is_file() or (root / "original" / "params.json").is_file():
        cfg, tensors, names = _read_meta(root if (root / "params.json").is_file() else root / "original")
    else:
        raise ValueError(f"{root}: unknown checkpoint layout: expected config.json + model.safetensors (HF) "
                         "or params.json + consolidated.00.pth (Meta)")
    return _assemble(cfg, tensors, names, root, device, dtype)


def _read_hf(root):
    try:
        cfg = LLaMAConfig.from_hf(json.loads((root / "config.json").read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{root / 'config.json'}: {e if isinstance(e, ValueError) else f'bad or missing key {e}'}") from None
    raw = read_hf_weights(root)
    tensors, names = {}, {}
    for name, t in raw.items():
        ours = name.removeprefix("model.")
        if ours.endswith("rotary_emb.inv_freq"):  # old transformers saved this derived buffer
            continue
        tensors[ours], names[ours] = t, name
    return cfg, tensors, names


# a HF directory's weights: model.safetensors, or shards listed by model.safetensors.index.json
SHARD_BYTES = 5 * 2**30  # write_hf_weights starts a new shard past this (5 GiB, a common size of the Hub's LLaMA shards)


def read_hf_weights(root):
    """name -> tensor of a HF directory, the names as in its files (model.layers.0...), each shard checked against the index."""
    root = Path(root)
    single, index = root / "model.safetensors", root / "model.safetensors.index.json"
    if single.is_file():
        raw = read_safetensors(single)
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ValueError(f"{index}: not a shard index (expected {{\"weight_map\": {{tensor: file}}}})") from None
        raw = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise ValueError(f"{index}: shard name {shard!r} is not a plain file name")
            if not (root / shard).is_file():
                raise FileNotFoundError(f"{root / shard}: shard listed in {index.name} is missing")
            for name, t in read_safetensors(root / shard).items():
                if weight_map.get(name) != shard:
                    raise ValueError(f"{root / shard}: tensor {name} is not assigned to this shard by {index.name}")
                raw[name] = t
        if weight_map.keys() - raw.keys():
            name = sorted(weight_map.keys() - raw.keys())[0]
            raise ValueError(f"{root / weight_map[name]}: tensor {name} listed in {index.name} is not in the file")
    elif (root / "pytorch_model.bin").is_file() or (root / "pytorch_model.bin.index.json").is_file():
        raise ValueError(f"{root}: only pytorch_model.bin (a pickle) found; this loader reads safetensors only")
    else:
        raise FileNotFoundError(f"{root}: config.json but no model.safetensors or model.safetensors.index.json")
    return raw


def write_hf_weights(root, tensors, max_shard_bytes=None):
    """Write name -> tensor into the directory root as read_hf_weights (and transformers) read it: model.safetensors,
    or past max_shard_bytes (default SHARD_BYTES) model-0000i-of-0000n.safetensors shards, split as transformers'
    save_pretrained splits them (huggingface_hub), with model.safetensors.index.json. Returns the names of the files written."""
    root, shards, current, size, max_shard_bytes = Path(root), [], [], 0, max_shard_bytes or SHARD_BYTES
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if n > max_shard_bytes:  # a tensor over the limit gets a shard of its own; the one being filled stays open
            shards.append([name])
            continue
        if size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current or not shards:
        shards.append(current)
    files = ["model.safetensors"] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file, names in zip(files, shards):
        write_safetensors(root / file, {n: tensors[n] for n in names}, metadata={"format": "pt"})  # transformers wants "pt"
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        files.append("model.safetensors.index.json")
    return files


# Meta name -> ours; q/k additionally get their rows permuted
_META_NAMES = [(r"tok_embeddings\.", "embed_tokens."), (r"output\.", "lm_head."),
               (r"attention\.w([qkvo])\.", r"self_attn.\1_proj."), (r"feed_forward\.w1\.", "mlp.gate_proj."),
               (r"feed_forward\.w2\.", "mlp.down_proj."), (r"feed_forward\.w3\.", "mlp.up_proj."),
               (r"attention_norm\.", "input_layernorm."), (r"ffn_norm\.", "post_attention_layernorm.")]


def _meta_to_half_split(w, n_heads):
    """Meta's RoPE rotates adjacent pairs (x0, x1), (x2, x3), ... of each head; ours (HF's) rotates
    (x_i, x_{i+d/2}). Reordering each head's output rows to [even rows, odd rows] makes the two equal.
    For k the heads are the KV heads."""
    out, d_in = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def _read_meta(root):
    shards = sorted(root.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{root}: params.json but no consolidated.00.pth")
    if len(shards) > 1:
        raise ValueError(f"{root}: {len(shards)} model-parallel shards (consolidated.*.pth) are not supported, only "
                         "single-file Meta checkpoints (LLaMA-3 1B/3B/8B); load the HF layout of this model instead")
    try:
        raw = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
        assert isinstance(raw, dict) and all(isinstance(t, torch.Tensor) for t in raw.values())
    except Exception as e:  # weights_only: never unpickles code; anything odd is reported, not run
        raise ValueError(f"{shards[0]}: not a state dict of tensors ({type(e).__name__}: {e})") from None
    try:
        params = json.loads((root / "params.json").read_text())
    except ValueError as e:
        raise ValueError(f"{root / 'params.json'}: not valid JSON ({e})") from None
    if "tok_embeddings.weight" not in raw:
        raise ValueError(f"{shards[0]}: tensor tok_embeddings.weight is missing")
    try:
        cfg = LLaMAConfig.from_meta(params, vocab_size=raw["tok_embeddings.weight"].shape[0],
                                    tie_word_embeddings="output.weight" not in raw)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{root / 'params.json'}: {e if isinstance(e, ValueError) else f'missing key {e}'}") from None
    tensors, names = {}, {}
    for name, t in raw.items():
        if name == "rope.freqs":  # LLaMA-2 files carry their RoPE table; we derive it from params.json
            continue
        ours = name
        for pattern, repl in _META_NAMES:
            ours = re.sub(pattern, repl, ours)
        kind = re.search(r"self_attn\.([qk])_proj\.weight$", ours)
        heads = {"q": cfg.num_attention_heads, "k": cfg.num_key_value_heads}[kind[1]] if kind else None
        if heads and t.ndim == 2 and t.shape[0] == heads * cfg.head_dim:  # a wrong shape is reported below
            t = _meta_to_half_split(t, heads)
        tensors[ours], names[ours] = t, name
    return cfg, tensors, names


def _assemble(cfg, tensors, names, root, device, dtype):
    with torch.device("meta"):  # shapes only: no memory, no init
        model = LLaMA(cfg)
    expected = {name: p.shape for name, p in model.named_parameters()}  # a tied head is listed once, as embed_tokens
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{root}: tensor {name} is missing from the checkpoint")
        if tensors[name].shape != shape:
            raise ValueError(f"{root}: tensor {names[name]} has shape {tuple(tensors[name].shape)}, "
                             f"the config expects {tuple(shape)}")
        if not tensors[name].is_floating_point():
            raise ValueError(f"{root}: tensor {names[name]} is {tensors[name].dtype}: quantized checkpoints are not supported")
    unexpected = sorted(tensors.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"{root}: unexpected tensor {names[unexpected[0]]} ({len(unexpected)} in all): not a plain LLaMA")
    dtype = dtype or tensors["embed_tokens.weight"].dtype
    # .to() returns the mmap-backed tensor itself when dtype and device already match
    model.load_state_dict({n: tensors[n].to(device=device, dtype=dtype) for n in expected}, strict=False, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced the shared Parameter; share the new one again
        model.lm_head.weight = model.embed_tokens.weight
    return model


# ----------------------------------------------------------------------------------------------
# LLaMA-3 tokenizer: tiktoken BPE with Meta's split pattern and 256 special tokens after the 128000 ranks

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama-models' llama3/tokenizer.py: these 12, then <|reserved_special_token_2|> ... _245|>
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]

_TIKTOKEN_MAX_CHARS = 400_000  # one tiktoken call at most (llama-models: larger inputs can panic)
_MAX_RUN = 25_000  # longest run of whitespace or non-whitespace per call (tiktoken issue 195: quadratic time)


def _safe_pieces(text):
    """Cut text where llama-models' Tokenizer.encode cuts it (so ids match Meta's exactly): into 400k-char
    windows, and inside each window every run of whitespace or non-whitespace after each _MAX_RUN chars."""
    for w in range(0, len(text), _TIKTOKEN_MAX_CHARS):
        window, start = text[w:w + _TIKTOKEN_MAX_CHARS], 0
        for run in re.finditer(r"\s+|\S+", window):  # re's \s is str.isspace(), what Meta's loop tests
            for cut in range(run.start() + _MAX_RUN, run.end(), _MAX_RUN):
                yield window[start:cut]
                start = cut
        yield window[start:]


class Llama3Tokenizer:
    """LLaMA-3's tokenizer.model: one "base64(token bytes) rank" line per token."""

    def __init__(self, path):
        path = Path(path)
        ranks = {}
        with open(path, "rb") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}: line {i} is not 'base64 rank': not a LLaMA-3 (tiktoken) tokenizer.model; "
                                     "sentencepiece files (LLaMA-1/2) are not supported") from None
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
        self.special_tokens = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]

    def encode(self, text, bos=False, eos=False):
        """Special-token text such as "<|eot_id|>" inside `text` is encoded as ordinary text (Meta's default)."""
        ids = [i for piece in _safe_pieces(text) for i in self.enc.encode_ordinary(piece)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


# HF tokenizer.json of the byte-level BPE kind (GPT-2, LLaMA-3, SmolLM2) -> tiktoken

_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_level_alphabet():
    """GPT-2's bytes_to_unicode, inverted: the printable character that stands for each byte in tokenizer.json."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)})
    return {c: b for b, c in chars.items()}


class HFTokenizer:
    """A HF tokenizer.json of the byte-level BPE kind as a tiktoken Encoding. tiktoken merges the adjacent pair
    whose concatenation has the lowest rank, HF the pair listed first in `merges`, so a token's rank is the
    index of the first merge that makes it; ranks are mapped back to the file's ids after encoding.
    Added/special tokens inside `text` are encoded as ordinary text, as Llama3Tokenizer does.
    A byte missing from the vocab (SmolLM2's lacks 21, e.g. the control character 0x13) becomes the model's unk token,
    consecutive ones fused as fuse_unk says, or is dropped where there is no unk token, as HF does (HF then also lets
    its neighbours merge across the gap, which happens only around such bytes)."""

    SUPPORTED = ("byte-level BPE tokenizer.json: no normalizer (or an empty Sequence), pre_tokenizer ByteLevel(use_regex=true) or "
                 "Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)], no byte_fallback to <0xNN> tokens")

    def __init__(self, path):
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            self._build(spec, path)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a supported tokenizer ({e}); supported: {self.SUPPORTED}") from None

    def _build(self, spec, path):
        model, pre, norm = spec["model"], spec.get("pre_tokenizer") or {}, spec.get("normalizer")
        # transformers 5.17 converts SmolLM2's GGUF with an empty normalizer Sequence and byte_fallback on (5.24: null and
        # off), the vocab and merges identical: an empty Sequence changes no text, and byte_fallback only sends a piece
        # missing from the vocab to <0xNN> tokens, of which a byte-level vocab has none (it falls back to unk then)
        empty_norm = norm is None or norm == {"type": "Sequence", "normalizers": []}
        fallback = model.get("byte_fallback") and any(re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) for t in model.get("vocab", {}))
        if model.get("type") != "BPE" or fallback or not empty_norm or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError("model is not plain byte-level BPE (or has a normalizer)")
        steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        if [p.get("type") for p in steps] == ["ByteLevel"] and steps[0].get("use_regex", True):
            pattern = _GPT2_PATTERN
        elif ([p.get("type") for p in steps] == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"]
              and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and not steps[1].get("use_regex")):
            pattern = steps[0]["pattern"]["Regex"]
        else:
            raise ValueError(f"pre_tokenizer {[p.get('type') for p in steps]} is not supported")
        if any(p.get("add_prefix_space") for p in steps if p.get("type") == "ByteLevel"):
            raise ValueError("ByteLevel add_prefix_space=true is not supported")
        alphabet = _byte_level_alphabet()
        vocab = model["vocab"]
        to_bytes = {tok: bytes(alphabet[c] for c in tok) for tok in vocab}  # KeyError: not byte-level
        # single bytes first; bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF) may be absent from the vocab
        ranks = {}
        for b in range(256):
            if bytes([b]) in to_bytes.values():
                ranks[bytes([b])] = len(ranks)
        for merge in model["merges"]:  # "a b" (older files) or ["a", "b"]
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            ranks.setdefault(to_bytes[a] + to_bytes[b], len(ranks))
        if model.get("ignore_merges"):  # HF then takes a pre-token found whole in the vocab as is: tiktoken does too
            for tok in vocab:
                ranks.setdefault(to_bytes[tok], len(ranks))
        id_of = {bytes_: vocab[tok] for tok, bytes_ in to_bytes.items()}
        if not ranks.keys() <= id_of.keys():
            raise ValueError(f"byte or merged token {next(iter(ranks.keys() - id_of.keys()))!r} is not in the vocab")
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        # bytes missing from the vocab: ranks of their own after every merge (no merge holds them), read as unk or dropped
        self._missing = len(ranks)
        for b in range(256):
            ranks.setdefault(bytes([b]), len(ranks))
        unk = model.get("unk_token")
        self._unk_id, self._fuse_unk = (vocab.get(unk, added.get(unk)) if unk else None), bool(model.get("fuse_unk"))
        self.enc = tiktoken.Encoding(name=path.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self._id_of_rank = [0] * len(ranks)
        for token, rank in ranks.items():
            self._id_of_rank[rank] = id_of.get(token, -1)
        self._bytes_of_id = {i: to_bytes[tok] for tok, i in vocab.items()}
        self._bytes_of_id.update({i: text.encode("utf-8") for text, i in added.items()})  # added tokens are literal
        self.special_tokens = added
        self.vocab_size = max(self._bytes_of_id) + 1
        config = path.with_name("tokenizer_config.json")  # names the bos/eos tokens, where present
        config = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}

        def token_id(key):
            tok = config.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return added.get(tok, vocab.get(tok)) if tok else None
        self.bos_id, self.eos_id = token_id("bos_token"), token_id("eos_token")

    def encode(self, text, bos=False, eos=False):
        ranks = self.enc.encode_ordinary(text)
        if ranks and max(ranks) >= self._missing:  # a byte the vocab lacks: unk, or nothing
            ids, previous = [], False
            for r in ranks:
                missing = r >= self._missing
                if not missing:
                    ids.append(self._id_of_rank[r])
                elif self._unk_id is not None and not (previous and self._fuse_unk):
                    ids.append(self._unk_id)
                previous = missing
        else:
            ids = [self._id_of_rank[r] for r in ranks]
        return [self.bos_id] * bool(bos and self.bos_id is not None) + ids + [self.eos_id] * bool(eos and self.eos_id is not None)

    def decode(self, ids):
        return b"".join(self._bytes_of_id[int(i)] for i in ids).decode("utf-8", errors="replace")


def load_tokenizer(path):
    """The tokenizer of a checkpoint directory: original/tokenizer.model or tokenizer.model (LLaMA-3),
    else a byte-level BPE tokenizer.json. `path` may also name the file itself."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "original" / "tokenizer.model", path / "tokenizer.model",
                                                  path / "tokenizer.json"]
    for c in candidates:
        if c.is_file():
            return HFTokenizer(c) if c.suffix == ".json" else Llama3Tokenizer(c)
    raise FileNotFoundError(f"{path}: no tokenizer (looked for original/tokenizer.model, tokenizer.model, tokenizer.json)")
