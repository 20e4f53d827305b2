"""The frozen base model and the text to fine-tune it on: a LLaMA checkpoint (HF or Meta layout) or the built-in
GPT (pretrained once by train.py, then cached), its tokenizer, and --data (default: Python's pydoc topics) as
train and validation tokens. Every problem with the files is a UserError naming the file."""
import hashlib
import json
import os
import sys
import textwrap
from dataclasses import asdict

import torch

import data
import engine
from checkpoints import read_config
from config import UserError, log
from nanogpt_model import GPT, LLaMA, ByteTokenizer, GPTConfig, load_llama, load_tokenizer


def tokenizer(args):
    try:
        return load_tokenizer(args.init_from) if args.init_from else ByteTokenizer()
    except (OSError, ValueError) as e:
        raise UserError(f"--init-from {args.init_from}: {e}")


def read_data(args, s, tok):
    """--data (default: Python's pydoc topics) as train and validation tokens, and the number of files skipped."""
    try:
        text, skipped = data.read_texts(args.data) if args.data else (data.pydoc_topics(), 0)
        return (*data.split_tokens(tok.encode(text), s.block_size, "--data" if args.data else "pydoc topics"), skipped)
    except ValueError as e:
        raise UserError(e)


def base_cache(args):
    """Where the built-in GPT is cached, once per config for every run whatever --out-dir."""
    key = hashlib.sha1(json.dumps([asdict(GPTConfig()), args.base_steps, sys.version_info[:2]]).encode()).hexdigest()[:10]
    cache = os.environ.get("NONLINEAR_LORA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nonlinear-lora")
    return os.path.join(cache, f"gpt-{key}.pt")


def base_skeleton(args):
    """The base model built from its config alone, with no weights loaded (a LLaMA on the meta device): its shapes, for the checks."""
    if args.init_from is None:  # on the CPU: 0.84M parameters build in ms (meta costs 2 s of imports)
        return GPT(GPTConfig()), f"built-in GPT ({base_cache(args)})"
    hf, metas = os.path.join(args.init_from, "config.json"), [os.path.join(args.init_from, *p, "params.json") for p in ((), ("original",))]
    try:
        if not os.path.isfile(hf) and not any(map(os.path.isfile, metas)):
            raise ValueError("not a directory with config.json (HF) or params.json (Meta)")
        # a Meta config's vocabulary comes from its weights: here 1, it shapes no target
        cfg = read_config(hf if os.path.isfile(hf) else next(filter(os.path.isfile, metas)), vocab_size=1)
    except (OSError, ValueError) as e:
        raise UserError(f"--init-from {args.init_from}: {e}")
    with torch.device("meta"):
        return LLaMA(cfg), f"LLaMA ({args.init_from})"


def load_checkpoint(path, what):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or not a checkpoint at all: torch's first line, cut at a word boundary
        reason = textwrap.shorten(str(e).splitlines()[0] if str(e) else type(e).__name__, 100, placeholder=" ...")
        raise UserError(f"{path}: not a readable {what} (torch: {reason})")


def load_base(args, s, pretrain):
    """The frozen model to adapt: a LLaMA checkpoint, or the built-in GPT (pretrain(path) writes it once, then it is cached)."""
    try:
        if args.init_from is not None:
            return load_llama(args.init_from, device=s.device, dtype=getattr(torch, s.dtype))
    except (ValueError, OSError) as e:
        raise UserError(f"--init-from {args.init_from}: {e}")
    path = base_cache(args)
    if s.rank == 0 and not os.path.exists(path):
        # two commands started together on a fresh cache: the second waits for the first's base instead of pretraining too
        with engine.file_lock(path + ".lock", lambda: log(f"waiting for another process pretraining {path}")):
            if not os.path.exists(path):  # the process that held the lock may have written it
                pretrain(path)
    if s.distributed:
        torch.distributed.barrier()  # the other processes wait for rank 0's cache
    ckpt = load_checkpoint(path, "cached base model; delete it to pretrain again")
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(s.device)
