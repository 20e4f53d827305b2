"""Write a LLaMA checkpoint with random weights in the HF layout (config.json, model.safetensors, and a byte-level
tokenizer.json), for timing train.py --init-from where no real checkpoint can be downloaded.

    python tools/random_llama.py OUT_DIR            # the LLaMA-3.2-1B shape, bf16 (2.5 GB)
    python tools/random_llama.py OUT_DIR --tiny     # the same code path at toy size, for checking it on a CPU

Only torch and this repository: safetensors is written by nanogpt_model.write_safetensors, and
the tokenizer maps each byte to one token (ids 0-255), so any text encodes with no merges file.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nanogpt_model import LLaMA, LLaMAConfig, _byte_level_alphabet, write_safetensors  # noqa: E402

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, tie_word_embeddings=True)


def main(out, tiny=False):
    cfg = TINY if tiny else LLAMA_32_1B
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LLaMA(LLaMAConfig(**cfg))
    tensors = {}
    for name, p in model.named_parameters():  # GPT-2-style init: the loss starts near ln(vocab), as a pretrained model's would be finite
        t = torch.ones(p.shape) if p.ndim == 1 else torch.randn(p.shape) * 0.02
        tensors["model." + name] = t.to(torch.float32 if tiny else torch.bfloat16)
    path = os.path.join(out, "model.safetensors")
    write_safetensors(path + ".tmp", tensors, metadata={"format": "pt"})
    os.replace(path + ".tmp", path)  # a half-written checkpoint never passes for a whole one
    hf = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, **cfg}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    vocab = {c: b for c, b in _byte_level_alphabet().items()}
    tok = {"version": "1.0", "normalizer": None, "added_tokens": [], "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
           "model": {"type": "BPE", "vocab": vocab, "merges": [], "byte_fallback": False}}
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    print(f"wrote {out}: {sum(t.numel() for t in tensors.values()) / 1e9:.3f}B parameters, {'tiny' if tiny else 'LLaMA-3.2-1B'} shape")


if __name__ == "__main__":
    main(sys.argv[1], tiny="--tiny" in sys.argv[2:])
