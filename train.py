"""Fine-tune a model with one adapter, verify merged vs unmerged, save the adapter.

    python train.py --adapter genlora                  # built-in GPT, built-in data, no download
    python train.py --adapter lora --data notes/ --steps 1000
    python train.py --adapter ranlora --init-from ~/Llama-3.2-1B --data corpus.txt
    python train.py --adapter all                      # every adapter, one table, compare.png
    torchrun --standalone --nproc_per_node=2 train.py --adapter lora    # data parallel

With no --init-from the base is the built-in byte-level GPT, pretrained once on the Python standard library's
code and cached in ~/.cache/nonlinear-lora/; with no --data it is fine-tuned on Python's language reference.
The file reads in the order it runs: command line -> prepare (every cheap check, then the base and the data,
once) -> wrap (a fresh copy of the base per adapter) -> train (one loop, which also pretrains the built-in
GPT) -> finish (save first, then sample, rank diagnostics, merge check) -> compare.
"""
import argparse
import contextlib
import copy
import difflib
import hashlib
import importlib
import inspect
import json
import math
import os
import signal
import sys
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import adapt
import data
import diagnostics
import export
import plots
import task
from checkpoints import read_json
from nanogpt_model import GPT, LLaMA, ByteTokenizer, GPTConfig, LLaMAConfig, generate, load_llama, load_tokenizer


@dataclass(frozen=True)
class Adapter:  # one adapter file: its class, and train.py's defaults for it (add a field here for a new per-method default)
    file: str
    cls: str
    targets: str  # from its paper, where the model has those projections (the built-in GPT has no gate_proj)
    lr: float  # on the built-in GPT: chosen so that the default run is stable
    llm_lr: float  # with --init-from (a real LLM): measured on SmolLM2-135M (below)
    # with --init-from: linear warm-up over this many steps (below 1: this fraction of --steps), then linear decay to 0,
    # as the papers train LLMs; 100 steps is the LLM-Adapters harness (Hu et al., 2023) that GenLoRA, AuroRA and RanLoRA
    # train in, and in which their LoRA baselines ran: LoRA gets it too
    llm_warmup: float = 100
    kwargs: dict = field(default_factory=dict)  # constructor keywords passed unless a flag gives another value


# llm_lr: the best of the lr grid 1e-5 ... 1e-2 (half-decades) in the SmolLM2-135M study of docs/results.md (1,000 steps of the
# chain_sum task, 3 seeds at the best; tools/study.py), each at its paper's rank and targets; the papers' own LLM lrs were
# 3-30x too small there (LoRA 3e-4, LR-LoRA 1e-4, AuroRA 3e-4, RanLoRA 1e-4; GenLoRA's 5e-3 was close)
ADAPTERS = {
    "lora": Adapter("lora", "LoRALinear", "q,k,v,o,gate,up,down", 1e-3, 3e-3),  # 1e-2 diverged in the study
    "genlora": Adapter("genlora", "GenLoRALinear", "q,k,v", 5e-3, 3e-3),
    # LR-LoRA centred (f(BA) - f(0), a from f(0) = 0, f'(0) = 1; docs/results.md): on SmolLM2 val 1.1244, 85.3% at 3e-3 against
    # the literal Eq. 4's 1.2391, 33.3% at its best 3e-4 (--no-lrlora-center); warm-up: App. E.1's ratio 0.10
    "lrlora": Adapter("lrlora", "LRLoRALinear", "q,k,v,o,gate,up,down", 1e-3, 3e-3, llm_warmup=0.1, kwargs={"center": True}),
    "aurora": Adapter("aurora", "AuroRALinear", "q,k,v,up,down", 1e-2, 1e-2),  # the study's best was its largest lr: higher untried
    "ranlora": Adapter("ranlora", "RanLoRALinear", "q,k,v,up,down", 3e-3, 1e-2),  # as AuroRA: 1e-2 the grid's edge
}
FINISH_STEPS = ("task", "sample", "rank", "merge", "plot")  # after the last step, each failing alone (see finish)
LLM_DROPOUT = 0.05  # with --init-from: the adapter dropout all four papers use on LLMs (the built-in GPT: the adapter's own)
# command-line dest -> adapter constructor keyword, passed when the adapter's __init__ takes it
ADAPTER_KWARGS = ("r", "alpha", "dropout", "groups", "num_centers", "freeze_latents", "normalize", "grid_size", "grid_range",
                  "learn_bandwidth", "center", "a_init", "mode", "fixed", "learnable", "fixed_activation", "activation", "modulation", "init")
WARMUP, GRAD_CLIP = 20, 1.0  # the built-in GPT's linear warm-up steps (--init-from: the adapter's llm_warmup) and gradient-norm clip
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
DISTRIBUTED = "LOCAL_RANK" in os.environ  # started by torchrun (even with one process: DDP all the same)


class UserError(Exception):  # a mistake in the command line or the input files: one line, no traceback, exit 2
    pass


class Interrupted(Exception):  # Ctrl-C or SIGTERM: the run stopped at a step boundary, its checkpoint saved; exit 130
    pass


def log(*a):
    if RANK == 0:
        tqdm.write(" ".join(str(x) for x in a))


# ----------------------------------------------------------------------------------------------
# command line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and exit 2, like every other user mistake (not usage + error)
        raise UserError(message)


def flag(dest):
    """The command-line flag that sets args.<dest> (--rank for r), for messages."""
    return next(a.option_strings[0] for a in parser()._actions if a.dest == dest)


def parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default="genlora", help=f"one of {', '.join(ADAPTERS)} (any case: GenLoRA, LR-LoRA); a comma list or 'all' trains each and compares them (default: %(default)s)")
    p.add_argument("--data", nargs="+", help="text files, folders or globs to fine-tune on (default: Python's pydoc topics)")
    p.add_argument("--init-from", help="a LLaMA checkpoint directory, HF or Meta layout (default: the built-in GPT)")
    p.add_argument("--targets", help=f"comma-separated subset of {','.join(adapt.TARGETS)} (default: the adapter's paper)")
    p.add_argument("--rank", dest="r", type=int, help="adapter rank (default: the adapter's)")
    p.add_argument("--alpha", type=float, help="scale = alpha / rank (default: the adapter's)")
    p.add_argument("--dropout", type=float, help="dropout on the adapter input (default: 0.05 with --init-from, else the adapter's)")
    m = p.add_argument_group("method-specific (default: the adapter's)")
    m.add_argument("--groups", type=int, help="GenLoRA: groups per latent")
    m.add_argument("--num-centers", type=int, help="GenLoRA: RBF centers per generator")
    m.add_argument("--freeze-latents", nargs="?", const="both", choices=["A", "B", "both"], help="GenLoRA variant (Table 7): keep z_A, z_B or both (no value: both) at their init")
    m.add_argument("--no-normalize", dest="normalize", action="store_const", const=False, help="GenLoRA variant (Table 4): drop Eq. 6")
    m.add_argument("--grid-size", type=int, help="LR-LoRA: sinc basis functions")
    m.add_argument("--grid-range", type=float, help="LR-LoRA: the sinc grid spans [-range, range]")
    m.add_argument("--fixed-bandwidth", dest="learn_bandwidth", action="store_const", const=False, help="LR-LoRA variant (Table 3): b_k = 1, not learned")
    m.add_argument("--lrlora-center", dest="center", action=argparse.BooleanOptionalAction,
                   help="LR-LoRA: dW = scale (f(BA) - f(0)), no all-ones term (ours; the default); --no-lrlora-center: Eq. 4 as printed")
    m.add_argument("--lrlora-init", dest="a_init", choices=["zero", "identity", "small", "random"],
                   help="LR-LoRA: the amplitudes' start: zero (the paper's; literal only), identity (f(0) = 0, f'(0) = 1; the "
                        "centred default), small (Table 18: 0.1) or random (Table 3)")
    m.add_argument("--mode", choices=["dynamic", "static"], help="AuroRA: dynamic (paper default) or static (AuroRA-S)")
    m.add_argument("--no-fixed", dest="fixed", action="store_const", const=False, help="AuroRA ablation: drop the fixed nonlinearity")
    m.add_argument("--no-learnable", dest="learnable", action="store_const", const=False, help="AuroRA ablation: drop the learnable spline")
    m.add_argument("--fixed-activation", choices=["tanh", "leaky_relu", "sigmoid"], help="AuroRA variant (Table 5): the activation in F")
    m.add_argument("--activation", choices=["gelu", "relu", "tanh", "identity"], help="RanLoRA: nonlinearity on A x")
    m.add_argument("--no-modulation", dest="modulation", action="store_const", const=False, help="RanLoRA variant (Table 6, w/o v)")
    m.add_argument("--ranlora-init", dest="init", choices=["residual", "literal", "principal", "kaiming"],
                   help="RanLoRA: residual SVD init with s B A = W_R, literal (Eq. 7 as printed: s B A = s W_R), principal (Table 16: "
                        "the largest triplets) or kaiming (Table 6, w/o rai)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, help="global batch, split across torchrun processes (default: 32 on the built-in GPT, 8 on LLaMA)")
    p.add_argument("--block-size", type=int, help="tokens per sequence (default: 128 on the built-in GPT, its fixed context; 256 on LLaMA)")
    p.add_argument("--lr", type=float, help="peak learning rate, 0 allowed (default: the adapter's in train.ADAPTERS, lr or with --init-from llm_lr)")
    p.add_argument("--eval-interval", type=int, help="evaluate and checkpoint every N steps (default: steps/20, at least 15)")
    p.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation (default: %(default)s)")
    p.add_argument("--base-steps", type=int, default=600, help="pretraining steps of the built-in GPT, done once and cached (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto, a GPU if there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="autocast dtype (default: auto, bfloat16 on a GPU that has it, else float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="on CUDA with one process each training step is one captured CUDA graph, replayed (a small model "
                        "otherwise waits on Python to launch its kernels); this runs the same step eagerly, e.g. to debug or "
                        "profile it, or for a model whose step cannot be captured")
    p.add_argument("--seed", type=int, default=1337, help="seed of the adapter init and of the batches (default: %(default)s)")
    p.add_argument("--out-dir", default="out", help="results go to OUT_DIR/<adapter>/ (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in OUT_DIR/<adapter>/ (without it, the run refuses)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT_DIR/<adapter>/ holds an interrupted run")
    p.add_argument("--prompt", default="The ", help="start of the generated sample (default: %(default)r)")
    p.add_argument("--sample-tokens", type=int, default=200, help="length of the generated sample (default: %(default)s)")
    p.add_argument("--task-eval", metavar="FILE", help="a task file (tools/make_task.py): greedy exact-match accuracy on its problems "
                                                       "before and after training, into metrics.json (task.py)")
    p.add_argument("--skip", default="", type=lambda v: [w for w in v.split(",") if w], metavar="LIST",
                   help="what not to run after the last step, a comma list of " + ", ".join(FINISH_STEPS) + " (tools/study.py skips sample,plot)")
    saved = p.add_mutually_exclusive_group()  # a saved adapter.pt on its base, instead of training
    saved.add_argument("--rank-report", metavar="ADAPTER_PT", help="print the rank diagnostics of a saved adapter.pt and exit")
    saved.add_argument("--plot", metavar="ADAPTER_PT", help=f"draw what a saved adapter.pt learned into {plots.FIGURE} next to it (its activations from --data) and exit")
    saved.add_argument("--generate", metavar="ADAPTER_PT", help="print a sample (--prompt, --sample-tokens, --seed) from a saved adapter.pt on its base and exit")
    saved.add_argument("--export", nargs=2, metavar=("ADAPTER_PT", "OUT_DIR"), help="merge a saved adapter.pt into its --init-from base as a HF directory, and exit")
    p.add_argument("--allow-approximate", action="store_true", help="--export an adapter whose merge only approximates it (AuroRA dynamic)")
    return p


def parse_args(argv=None):
    args = parser().parse_args(argv)
    args.names = [adapter_key(n) for n in args.adapter.split(",") if n.strip()] or [adapter_key(args.adapter)]
    if "all" in args.names and len(args.names) > 1:
        raise UserError(f"--adapter {args.adapter}: 'all' already trains every adapter; give it alone, or a list of names")
    twice = next((n for i, n in enumerate(args.names) if n in args.names[:i]), None)
    if twice:
        raise UserError(f"--adapter {args.adapter}: {twice} is named twice")
    args.names = list(ADAPTERS) if args.names == ["all"] else args.names
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = args.device.partition(":")
    available = {"cpu": not index, "mps": not index and torch.backends.mps.is_available(),
                 "cuda": torch.cuda.is_available() and (not index or index.isdigit() and int(index) < torch.cuda.device_count())}
    if not available.get(kind):
        raise UserError(f"--device {args.device}: not available here (torch {torch.__version__} sees {torch.cuda.device_count()} CUDA GPUs; "
                        f"MPS {'yes' if torch.backends.mps.is_available() else 'no'})")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    for k in ("steps", "batch_size", "block_size", "eval_interval", "eval_iters", "base_steps", "sample_tokens", "r", "groups", "num_centers",
              "grid_size"):  # counts: checked as given, before a default replaces a None (an `x or default` would swallow 0)
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UserError(f"--{'rank' if k == 'r' else k.replace('_', '-')} {getattr(args, k)}: must be at least 1")
    if args.alpha is not None and not 0 < args.alpha < math.inf:
        raise UserError(f"--alpha {args.alpha:g}: must be above 0 (scale = alpha / rank)")
    if args.block_size is None:
        args.block_size = 256 if args.init_from else 128
    if args.batch_size is None:
        args.batch_size = 8 if args.init_from else 32
    if args.init_from and args.dropout is None:
        args.dropout = LLM_DROPOUT
    if args.freeze_latents == "both":  # GenLoRALinear(freeze_latents=True)
        args.freeze_latents = True
    # about 20 evaluations a run, never closer than 15 steps (the default run's interval): each one (--eval-iters batches
    # and a checkpoint) costs 3-4 training steps, so evaluating stays under ~25% of a run's time, short runs included
    args.eval_interval = max(15, args.steps // 20) if args.eval_interval is None else args.eval_interval
    if set(args.skip) - set(FINISH_STEPS):
        raise UserError(f"--skip {','.join(args.skip)}: choose from {', '.join(FINISH_STEPS)}")
    if args.lr is not None and not args.lr >= 0:
        raise UserError(f"--lr {args.lr:g}: must be 0 or more")
    if args.batch_size % WORLD:
        raise UserError(f"--batch-size {args.batch_size}: must divide evenly across {WORLD} processes")
    return args


def adapter_key(name):
    """--adapter's name as a key of ADAPTERS (or 'all'): any case, '-' and '_' ignored (GenLoRA, LR-LoRA, lr_lora); a typo
    is an error that suggests the closest name."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key in ADAPTERS or key == "all":
        return key
    close = difflib.get_close_matches(key, [*ADAPTERS, "all"], n=1)
    raise UserError(f"--adapter {name.strip()}: unknown adapter{f' (did you mean {close[0]}?)' if close else ''}; "
                    f"choose from {', '.join(ADAPTERS)}, or all")


# ----------------------------------------------------------------------------------------------
# prepare: every check that is cheap, before the work that is not; then the base and the data, once


@dataclass
class Job:  # one adapter's run, resolved before any expensive work
    name: str
    targets: list
    kwargs: dict
    lr: float
    out: str  # <out-dir>/<name>
    signature: dict  # what must match for an interrupted run to resume
    schedule: tuple = (WARMUP, "cosine")  # (warm-up steps, decay): see schedule()
    resume: bool = False  # out/<name>/ holds an interrupted run with this signature


def prepare(args):
    """Check everything that can be checked from the command line, the files and the model's config alone
    (no weights, no pretraining), then load the base and tokenize the data once for every adapter."""
    skeleton, base_desc = base_skeleton(args)
    if args.block_size > skeleton.max_seq_len:
        what = "the built-in GPT's context is fixed at" if args.init_from is None else "the model's context is"
        raise UserError(f"--block-size {args.block_size}: {what} {skeleton.max_seq_len} tokens")
    jobs = []
    for name in args.names:
        targets, kwargs = parse_targets(ADAPTERS[name].targets if args.targets is None else args.targets), adapter_kwargs(name, args)
        inject(copy.deepcopy(skeleton), name, targets, kwargs, quiet=True)  # on the meta device: bad ranks, groups, targets
        lr = args.lr if args.lr is not None else ADAPTERS[name].llm_lr if args.init_from else ADAPTERS[name].lr
        sched = schedule(name, args)
        signature = {"adapter": name, "targets": targets, "kwargs": kwargs, "lr": lr, "steps": args.steps, "batch_size": args.batch_size,
                     "block_size": args.block_size, "seed": args.seed, "data": args.data, "base": base_desc, "world": WORLD, "schedule": list(sched)}
        jobs.append(Job(name, targets, kwargs, lr, os.path.join(args.out_dir, name), signature, schedule=sched))
        ckpt, done = os.path.join(jobs[-1].out, "ckpt.pt"), os.path.join(jobs[-1].out, "adapter.pt")
        if os.path.exists(ckpt) and not args.no_resume:  # never overwrite a result silently: resume it, or ask
            saved = load_checkpoint(ckpt, "checkpoint (pass --no-resume to start over)").get("signature")
            if saved != signature:
                diff = ", ".join(sorted(k for k in signature if saved.get(k) != signature[k]))
                raise UserError(f"{ckpt} holds an interrupted run with other settings ({diff}): repeat its command, pass --no-resume to start over, or use another --out-dir")
            jobs[-1].resume = True
        elif os.path.exists(done) and not args.overwrite:
            raise UserError(f"{done} holds a finished run: pass --overwrite to replace it, or choose another --out-dir")
    try:
        tok = load_tokenizer(args.init_from) if args.init_from else ByteTokenizer()
    except (OSError, ValueError) as e:
        raise UserError(f"--init-from {args.init_from}: {e}")
    try:
        args.task_problems = task.load(args.task_eval)["problems"] if args.task_eval else None
    except ValueError as e:
        raise UserError(f"--task-eval {e}")
    if not tok.encode(args.prompt, bos=True):
        raise UserError(f"--prompt {args.prompt!r}: must give at least one token")
    train_data, val_data, skipped = read_data(args, tok)
    if skipped:
        log(f"data: skipped {skipped} file(s) that are not UTF-8 text")
    base = load_base(args)
    base.requires_grad_(False)
    val_batches = data.eval_batches(val_data, args.eval_iters, args.batch_size, args.block_size)
    val_before = evaluate(base, val_batches, args) if RANK == 0 else None
    args.task_before = task_accuracy(base, {}, tok, args) if args.task_eval and RANK == 0 else None  # the base model's (step 0)
    if DISTRIBUTED:
        torch.distributed.barrier()  # every process has decided whether to resume before rank 0 replaces a checkpoint
    return base, base_desc, tok, train_data, val_batches, val_before, jobs


def read_data(args, tok):
    """--data (default: Python's pydoc topics) as train and validation tokens, and the number of files skipped."""
    try:
        text, skipped = data.read_texts(args.data) if args.data else (data.pydoc_topics(), 0)
        return (*data.split_tokens(tok.encode(text), args.block_size, "--data" if args.data else "pydoc topics"), skipped)
    except ValueError as e:
        raise UserError(e)


def base_skeleton(args):
    """The base model built from its config alone, with no weights loaded (a LLaMA on the meta device): its shapes, for the checks."""
    if args.init_from is None:
        cfg = GPTConfig()
        key = hashlib.sha1(json.dumps([asdict(cfg), args.base_steps, sys.version_info[:2]]).encode()).hexdigest()[:10]
        cache = os.environ.get("NONLINEAR_LORA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nonlinear-lora")
        args.base_path = os.path.join(cache, f"gpt-{key}.pt")  # once per config for every run, whatever --out-dir
        return GPT(cfg), f"built-in GPT ({args.base_path})"  # on the CPU: 0.84M parameters build in ms (meta costs 2 s of imports)
    hf, metas = os.path.join(args.init_from, "config.json"), [os.path.join(args.init_from, *p, "params.json") for p in ((), ("original",))]
    try:
        if not os.path.isfile(hf) and not any(map(os.path.isfile, metas)):
            raise ValueError("not a directory with config.json (HF) or params.json (Meta)")
        cfg = (LLaMAConfig.from_hf(read_json(hf)) if os.path.isfile(hf) else  # the vocabulary shapes no target:
               LLaMAConfig.from_meta(read_json(next(filter(os.path.isfile, metas))), vocab_size=1))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--init-from {args.init_from}: {e}")
    with torch.device("meta"):
        return LLaMA(cfg), f"LLaMA ({args.init_from})"


def load_checkpoint(path, what):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or not a checkpoint at all: torch's first line, cut at a word boundary
        reason = textwrap.shorten(str(e).splitlines()[0] if str(e) else type(e).__name__, 100, placeholder=" ...")
        raise UserError(f"{path}: not a readable {what} (torch: {reason})")


def load_base(args):
    """The frozen model to adapt: a LLaMA checkpoint, or the built-in GPT (pretrained once, then cached)."""
    try:
        if args.init_from is not None:
            return load_llama(args.init_from, device=args.device, dtype=getattr(torch, args.dtype))
    except (ValueError, OSError) as e:
        raise UserError(f"--init-from {args.init_from}: {e}")
    if not os.path.exists(args.base_path) and RANK == 0:
        # two commands started together on a fresh cache: the second waits for the first's base instead of pretraining too
        with file_lock(args.base_path + ".lock", lambda: log(f"waiting for another process pretraining {args.base_path}")):
            if not os.path.exists(args.base_path):
                pretrain_gpt(args)
    if DISTRIBUTED:
        torch.distributed.barrier()  # the other processes wait for rank 0's cache
    ckpt = load_checkpoint(args.base_path, "cached base model; delete it to pretrain again")
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(args.device)


def pretrain_gpt(args):
    """The built-in GPT, pretrained on the stdlib's code with the fine-tuning loop itself, so it resumes alike."""
    cfg = GPTConfig()
    torch.manual_seed(1337)  # the same base for every --seed: it is cached once per config
    model = GPT(cfg).to(args.device)
    train_data, val_data = data.split_tokens(list(data.stdlib_code().encode("utf-8")), cfg.block_size, "stdlib corpus")
    val = data.eval_batches(val_data, 5, 32, cfg.block_size)
    loop = Loop(steps=args.base_steps, lr=2e-3, batch_size=32, block_size=cfg.block_size, seed=1337, eval_interval=100,
                cuda_graph=args.cuda_graph and args.device.startswith("cuda"))
    opt = torch.optim.AdamW(model.parameters(), lr=loop.lr, betas=(0.9, 0.95), weight_decay=0.1)
    seconds = args.base_steps * seconds_per_step(model, train_data, loop, args)
    log(f"pretraining the built-in GPT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) once on the stdlib's code: "
        f"{args.base_steps} steps, about {f'{seconds / 60:.1f} min' if seconds >= 90 else f'{seconds:.1f} s'} here (3 steps timed); "
        f"Ctrl-C keeps its progress; cached at {args.base_path}")
    ckpt = args.base_path + ".ckpt"
    train(model, opt, train_data, val, loop, args, ckpt, {"base": args.base_path}, "pretrain", os.path.exists(ckpt), world=1, rank=0)
    atomic_save({"config": asdict(cfg), "model": model.state_dict()}, args.base_path)
    os.remove(args.base_path + ".ckpt")


def seconds_per_step(model, tokens, loop, args, n=3):
    """A training step's time on this machine: n steps (train.Step, eagerly) of a throwaway copy of model (the run's
    weights untouched), after one untimed warm-up step."""
    model = copy.deepcopy(model).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=0.0)
    optimizer_on_device(opt, args.device)
    step_fn = Step(model, opt, params, args, (loop.batch_size, loop.block_size), cuda_graph=False)
    ix = torch.linspace(0, len(tokens) - loop.block_size - 2, loop.batch_size).long()  # one batch, not the run's: no get_batch
    x, y = data.windows(tokens, ix, loop.block_size)
    for step in range(n + 1):
        if step == 1:
            sync(args.device)
            t0 = time.perf_counter()
        step_fn(x, y, 0.0, step)
    sync(args.device)
    return (time.perf_counter() - t0) / n


# ----------------------------------------------------------------------------------------------
# wrap: adapters into a fresh copy of the base


def adapter_class(name):
    return getattr(importlib.import_module(ADAPTERS[name].file), ADAPTERS[name].cls)


def adapter_kwargs(name, args):
    """Constructor keywords from the flags the user gave; a flag the adapter does not take is an error
    (when comparing several adapters, a method's flag applies to its own method only)."""
    params = inspect.signature(adapter_class(name).__init__).parameters
    given = [k for k in ADAPTER_KWARGS if getattr(args, k, None) is not None]
    for k in given if len(args.names) == 1 else []:
        if k not in params:
            raise UserError(f"{flag(k)} does not apply to --adapter {name}")
    return {**ADAPTERS[name].kwargs, **{k: getattr(args, k) for k in given if k in params}}


def parse_targets(spec):
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in targets if t not in adapt.TARGETS]
    if bad or not targets:
        raise UserError(f"--targets {spec!r}: {'unknown target ' + ', '.join(bad) if bad else 'no target'} (choose from {','.join(adapt.TARGETS)})")
    return targets


def inject(model, name, targets, kwargs, quiet=False):
    """Wrap every nn.Linear named <target>_proj in the adapter; the one place adapters enter a model."""
    try:
        wrapped = adapt.inject(model, adapter_class(name), targets, kwargs)
    except ValueError as e:
        raise UserError(f"--adapter {name} on {e}")
    if not wrapped:
        raise UserError(f"--targets {','.join(targets)}: no module of this model matches")
    missing = [t for t in targets if not any(k.endswith(f".{t}_proj") for k in wrapped)]
    if missing and not quiet:
        log(f"note: this model has no {', '.join(t + '_proj' for t in missing)}")
    return wrapped


def load_adapter(model, path, quiet=False):
    """Wrap a base model as recorded in adapter.pt and load the saved weights onto it, strictly."""
    ckpt = load_checkpoint(path, "adapter file")
    if not (isinstance(ckpt, dict) and {"adapter", "targets", "kwargs", "state"} <= ckpt.keys() and ckpt["adapter"] in ADAPTERS):
        raise UserError(f"{path}: not an adapter.pt written by train.py")
    adapters = inject(model, ckpt["adapter"], ckpt["targets"], ckpt["kwargs"], quiet)
    try:
        adapt.load_strict(adapt.adapter_state(adapters, keep_vars=True), ckpt["state"])
    except ValueError as e:
        raise UserError(f"{path}: {e}")
    return adapters, ckpt


def wrap(base, job, args, several, val_batches):
    """A fresh copy of the base (when comparing) with the adapter in; what the wrapping itself changed and cost."""
    model = copy.deepcopy(base) if several else base
    model.eval()
    x = val_batches[0][0][:4].to(args.device)
    with torch.no_grad(), autocast(args):
        ref_logits = model(x).float()
    torch.manual_seed(args.seed)
    sync(args.device)
    t = time.perf_counter()
    adapters = inject(model, job.name, job.targets, job.kwargs)
    sync(args.device)
    info = {"init_seconds": time.perf_counter() - t}  # the adapters' own init: RanLoRA's decompositions dominate it
    with torch.no_grad(), autocast(args):
        info["init_gap_max_abs_logit_diff"] = (model(x).float() - ref_logits).abs().max().item()
    return model, adapters, info


# ----------------------------------------------------------------------------------------------
# train: one loop for fine-tuning and for pretraining the built-in GPT


@dataclass
class Loop:
    steps: int
    lr: float
    batch_size: int
    block_size: int
    seed: int
    eval_interval: int
    compile: bool = False
    warmup: int = WARMUP
    decay: str = "cosine"  # after the warm-up: "cosine" to 10% of the peak, or "linear" to 0 (see lr_factor)
    cuda_graph: bool = False  # capture the step once, replay it (CUDA, one process)


@dataclass
class TrainState:
    """A run's progress; with the weights and the optimizer's state it is all a checkpoint holds (batches are a function of the step)."""
    step: int = 0  # steps completed
    curve: list = field(default_factory=list)  # {"step", "train_loss", "val_loss"} at every evaluation
    train_s: float = 0.0  # time in training steps, without each process's first step (warm-up) unless it is the only one
    tokens: int = 0  # tokens of the timed steps, all processes


def autocast(args):
    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=args.device.split(":")[0], dtype=getattr(torch, args.dtype))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def task_accuracy(model, adapters, tok, args):
    """--task-eval: greedy exact-match accuracy on the task file's problems (task.py), exact merges merged."""
    with merged_where_exact(model, adapters):
        return task.accuracy(model, tok, args.task_problems, args.device, lambda: autocast(args))


@torch.no_grad()
def evaluate(model, batches, args):
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(args):
            logits = model(x.to(args.device))
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(args.device).flatten()).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def lr_factor(step, steps, warmup=WARMUP, decay="cosine"):
    """Linear warm-up over `warmup` steps (the first step already at 1/warmup), then cosine decay to 10% of the peak,
    or linear decay to 0 (HF's get_linear_schedule_with_warmup, the papers' LLM schedule: the last step at 1/(steps - warmup))."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 1.0 - t if decay == "linear" else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def schedule(name, args):
    """(warm-up steps, decay) of a fine-tuning run. With --init-from: the adapter's paper schedule, linear warm-up over
    its llm_warmup then linear decay to 0, the warm-up capped at 10% of the run (the papers train for thousands of
    steps; at 1,000 steps and more the cap changes nothing, below it a run would otherwise mostly warm up).
    On the built-in GPT: WARMUP steps, then cosine to 10%."""
    if not args.init_from:
        return WARMUP, "cosine"
    w = ADAPTERS[name].llm_warmup
    return max(1, min(round(w * args.steps if w < 1 else w), args.steps // 10)), "linear"


@contextlib.contextmanager
def file_lock(path, waiting=lambda: None):
    """One process at a time inside: an exclusive lock on the file at path (created if need be), waited for, released
    when the block ends or the process dies. waiting() is called once if another process holds it. Where the
    platform has no fcntl (Windows), no lock: two processes started together may then both do the work."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written file (.json as JSON, .txt as text)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    if path.endswith((".json", ".txt")):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1) if path.endswith(".json") else f.write(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def stop_on_signal():
    """Ctrl-C (or SIGTERM, from torchrun or a scheduler) asks the loop to stop at the next step boundary, so a
    checkpoint holds exactly the steps completed, wherever in a step the signal came. A second Ctrl-C stops at once."""
    flag = argparse.Namespace(set=False)

    def handle(signum, frame):
        if flag.set:
            raise KeyboardInterrupt
        flag.set = True
        log("stopping after this step (Ctrl-C again to stop at once)")

    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)} if threading.current_thread() is threading.main_thread() else {}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def optimizer_on_device(opt, device):
    """AdamW as the step reads it: the lr a float64 tensor (the arithmetic of a Python float), set in place before every
    step, so that a captured graph sees each new value; on CUDA capturable, its step counts on the device too."""
    cuda = device.startswith("cuda")
    for g in opt.param_groups:
        g["lr"], g["capturable"] = torch.tensor(float(g["lr"]), dtype=torch.float64, device=device), cuda
    for st in opt.state.values():  # a resumed checkpoint's, saved on this or another device
        if "step" in st:
            st["step"] = st["step"].to(device=device if cuda else "cpu", dtype=torch.float32)


def run_undone(step, params, opt=None):
    """Run step() once and undo what it did to the trainable weights and the optimizer's state: a CUDA graph's warm-up
    (AdamW's lazy state, cuBLAS handles, compiled kernels), which must not change the run."""
    tensors = lambda: params + [t for s in (opt.state.values() if opt else []) for t in s.values() if torch.is_tensor(t)]
    saved = {t: t.detach().clone() for t in tensors()}
    step()
    with torch.no_grad():
        for t in tensors():
            t.copy_(saved[t]) if t in saved else t.zero_()  # state the warm-up created: AdamW's starts at zeros
    for p in params:
        p.grad = None  # so the captured backward allocates the gradients, in the graph's memory


def capture(step, params, opt=None):
    """step() recorded into a CUDA graph, after one undone warm-up step on a side stream (as capture requires):
    (graph, what step returned, in the graph's memory, refilled by every replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_undone(step, params, opt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


class Step:
    """One training step: forward, float32 loss, backward, gradient clip, AdamW, on the batch in the buffers x, y.
    Everything a step varies is a tensor it reads: the batch (copied in), the lr (AdamW's lr tensor) and dropout's
    generator (seeded per step from (seed, step)). So the same step runs eagerly or, with cuda_graph, is captured once
    and replayed: one launch instead of thousands."""

    def __init__(self, fwd, opt, params, args, batch_shape, cuda_graph):
        self.fwd, self.opt, self.params, self.args = fwd, opt, params, args
        self.x = torch.zeros(batch_shape, dtype=torch.long, device=args.device)
        self.y = torch.zeros_like(self.x)
        self.cuda_graph, self.graph, self.updating = cuda_graph, None, False

    def loss_and_grads(self):
        with autocast(self.args):
            logits = self.fwd(self.x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), self.y.flatten())
        loss.backward()
        return loss

    def update(self):
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.opt.step()

    def whole(self):  # what the graph captures
        loss = self.loss_and_grads()
        self.update()
        return loss

    def __call__(self, x, y, lr, seed):
        """The loss of one step on (x, y) at this lr, dropout seeded with seed; the weights updated."""
        self.x.copy_(x)
        self.y.copy_(y)
        for g in self.opt.param_groups:
            g["lr"].fill_(lr)
        if self.cuda_graph and self.graph is None:
            try:
                self.graph, self.loss = capture(self.whole, self.params, self.opt)
            except RuntimeError as e:  # e.g. a model that reads a value to the host mid-step: the same step, eagerly
                log(f"note: the training step could not be captured as a CUDA graph ({str(e).splitlines()[0][:160]}); running it eagerly")
                self.cuda_graph = False
                self.opt.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # dropout's masks: a function of (seed, step), replayed or not (the graph reads this state)
        if self.graph is not None:
            self.updating = True  # the weights and the step count change together
            self.graph.replay()
            return self.loss
        loss = self.loss_and_grads()
        self.updating = True
        self.update()
        self.opt.zero_grad(set_to_none=True)
        return loss


def train(model, opt, tokens, val_batches, loop, args, ckpt_path, signature, desc, resume, world=WORLD, rank=RANK):
    """Train what requires grad in model for loop.steps; with resume, continue the run saved in ckpt_path."""
    params = [p for g in opt.param_groups for p in g["params"]]
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = TrainState()
    if resume:
        ck = load_checkpoint(ckpt_path, "checkpoint")
        assert ck["signature"] == signature, "prepare() compares signatures first"
        adapt.load_strict(live, ck["weights"])  # the signature matched: so do the names and shapes
        opt.load_state_dict(ck["opt"])
        state = TrainState(**ck["state"])
        log(f"{desc}: resuming the interrupted run from step {state.step} ({ckpt_path})")

    def save():
        if rank == 0:
            atomic_save({"signature": signature, "state": asdict(state), "weights": {n: p.detach().cpu() for n, p in live.items()},
                         "opt": opt.state_dict()}, ckpt_path)

    optimizer_on_device(opt, args.device)
    fwd = model
    if world > 1:  # gradients of the trainable parameters only: frozen weights are not registered for sync
        fwd = nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if "cuda" in args.device else None)
    if loop.compile:
        fwd = torch.compile(fwd)
    model.train()
    step_fn = Step(fwd, opt, params, args, (loop.batch_size // world, loop.block_size), loop.cuda_graph and world == 1)
    bar = tqdm(range(state.step, loop.steps), initial=state.step, total=loop.steps, desc=desc, disable=rank != 0, dynamic_ncols=True)
    start = state.step
    with stop_on_signal() as stop:
        try:
            for step in bar:
                flag = torch.tensor([float(stop.set)], device=args.device)
                if world > 1:  # every process stops at the same step, or the others wait in DDP's all-reduce forever
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                if flag.item():
                    break
                t0 = time.perf_counter()
                x, y = data.get_batch(tokens, step, loop.batch_size, loop.block_size, loop.seed, world, rank)
                loss = step_fn(x, y, loop.lr * lr_factor(step, loop.steps, loop.warmup, loop.decay), data.step_seed(loop.seed, step, rank))
                state.step, step_fn.updating = step + 1, False
                loss_v = loss.item()  # syncs the device, so the step time below is real
                if step > start or state.step == loop.steps:  # each process's first step is warm-up (allocator, kernels)
                    state.train_s += time.perf_counter() - t0
                    state.tokens += x.numel() * world
                bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{state.tokens / max(state.train_s, 1e-9):,.0f}")
                if not math.isfinite(loss_v):
                    raise UserError(f"step {step}: the loss is {loss_v}; lower --lr (now {loop.lr:g})")
                if state.step % loop.eval_interval == 0 or state.step == loop.steps:
                    val = evaluate(model, val_batches, args) if rank == 0 else None
                    # LR-LoRA's f(0), f'(0) and span of B A at each evaluation: how the all-ones term grows (or not)
                    state.curve.append({"step": state.step, "train_loss": loss_v, "val_loss": val, **diagnostics.transfer_point(dict(model.named_modules()))})
                    if rank == 0:
                        bar.write(f"{desc} step {state.step}: train loss {loss_v:.4f}, val loss {val:.4f}")
                    save()
        except KeyboardInterrupt:  # a second Ctrl-C: stop now; the state is whole unless it came inside opt.step()
            if not step_fn.updating:
                save()
            raise Interrupted(f"stopped during step {state.step + 1}: run the same command again to resume from step {state.step} ({ckpt_path})")
    bar.close()
    if state.step < loop.steps:
        save()
        if world > 1:
            torch.distributed.barrier()  # no process exits before rank 0 has saved: torchrun would stop it mid-write
        raise Interrupted(f"interrupted after step {state.step}: run the same command again to resume from {ckpt_path}")
    return state


# ----------------------------------------------------------------------------------------------
# finish: save first; sampling, rank diagnostics and the merge check after, each failing alone


def finish(model, adapters, job, args, tok, base_desc, val_batches, info, state):
    """Save the adapter, then the diagnostics; a failure in one is one `error:` line, never the lost adapter."""
    metrics = {"adapter": job.name, "targets": job.targets, "kwargs": job.kwargs, "base": base_desc, **info, "steps": args.steps, "lr": job.lr,
               "val_loss_after": state.curve[-1]["val_loss"], "tokens_per_s": state.tokens / max(state.train_s, 1e-9), "curve": state.curve,
               "sample": None, "rank": None, "merge": None, "plot": None, "errors": {}, "finish_s": {}}
    if args.task_eval:
        metrics.update(task_file=args.task_eval, task_before=args.task_before, task=None)
    t = time.perf_counter()
    atomic_save({"adapter": job.name, "targets": job.targets, "kwargs": job.kwargs, "base": base_desc, "state": adapt.adapter_state(adapters)},
                os.path.join(job.out, "adapter.pt"))
    if os.path.exists(os.path.join(job.out, "ckpt.pt")):
        os.remove(os.path.join(job.out, "ckpt.pt"))  # the run is complete: adapter.pt holds its result
    atomic_save(metrics, os.path.join(job.out, "metrics.json"))
    metrics["finish_s"]["save"] = time.perf_counter() - t
    # the merge check's held-out sequences, about 2,048 tokens: plenty to see a 1e-4 gap (8 x 1024 took 1 s on a 1B model)
    x, y = (t[: max(1, min(8, 2048 // args.block_size))].to(args.device) for t in val_batches[0])
    steps = [("task", lambda: task_accuracy(model, adapters, tok, args))] if args.task_eval else []
    for what, fn in steps + [("sample", lambda: sample(model, adapters, tok, args)), ("rank", lambda: diagnostics.rank_report(adapters)),
                     ("merge", lambda: diagnostics.merge_check(model, adapters, x, y)),
                     ("plot", lambda: plots.plot_adapter(model, adapters, val_batches, job.out, base_desc, metrics["rank"]))]:
        if what in args.skip:
            continue
        t = time.perf_counter()
        try:
            metrics[what] = fn()
        except Exception as e:  # the adapter is saved: say what failed and go on
            metrics["errors"][what] = f"{type(e).__name__}: {e}"
            print(f"error: {job.name}: the {what} step failed after training ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  f"the adapter is saved in {job.out}/adapter.pt", file=sys.stderr)
        sync(args.device)
        metrics["finish_s"][what] = time.perf_counter() - t
    metrics["wall_s"] = time.time() - info["t_start"]
    if metrics["sample"] is not None:
        atomic_save(metrics["sample"], os.path.join(job.out, "sample.txt"))
    atomic_save(metrics, os.path.join(job.out, "metrics.json"))
    log(f"val loss {metrics['val_loss_before']:.4f} -> {metrics['val_loss_after']:.4f}; {metrics['tokens_per_s']:,.0f} tokens/s; "
        f"after the last step: {', '.join(f'{k} {v:.2f} s' for k, v in metrics['finish_s'].items())}")
    if metrics.get("task"):
        log(f"task accuracy {metrics['task_before']['accuracy']:.1%} -> {metrics['task']['accuracy']:.1%} "
            f"({metrics['task']['n']} problems of {args.task_eval}, {metrics['task']['seconds']:.1f} s)")
    if metrics["merge"]:
        log(diagnostics.merge_line(metrics["merge"]))
    if metrics["sample"] is not None:
        log(f"sample: {metrics['sample']!r}"[:400])
    figure = f", {plots.FIGURE}" if metrics["plot"] else "" if "plot" in metrics["errors"] or "plot" in args.skip else f" (pip install matplotlib for {plots.FIGURE})"
    log(f"saved {job.out}/adapter.pt, metrics.json" + (", sample.txt" if metrics["sample"] is not None else "") + figure)
    return metrics


@contextlib.contextmanager
def merged_where_exact(model, adapters):
    """The model with each adapter whose merge is exact merged into a plain Linear: the same function at the base
    model's speed for generating (LR-LoRA's forward rebuilds its dense f(BA) on every call: 200 tokens took 44 s
    on the CPU that way); the adapters are put back after."""
    merged = {n: a.merged() for n, a in adapters.items() if a.exact_merge}
    adapt.put(model, merged)
    try:
        yield
    finally:
        adapt.put(model, {n: adapters[n] for n in merged})


@torch.no_grad()
def sample(model, adapters, tok, args):
    """A text sample, exact merges merged."""
    model.eval()
    with merged_where_exact(model, adapters):
        prompt = torch.tensor([tok.encode(args.prompt, bos=True)], device=args.device)
        torch.manual_seed(args.seed)
        with autocast(args):
            ids = generate(model, prompt, args.sample_tokens, stop_id=tok.eos_id)[0].tolist()
    return tok.decode(ids[1:] if tok.bos_id is not None and ids[0] == tok.bos_id else ids)  # without the BOS marker


# ----------------------------------------------------------------------------------------------
# one adapter, start to end


def run(job, base, base_desc, tok, train_data, val_batches, val_before, args):
    """Wrap, train and finish one adapter; its metrics (rank 0) or None (other processes)."""
    t_start = time.time()
    model, adapters, info = wrap(base, job, args, len(args.names) > 1, val_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    info.update(t_start=t_start, trainable_params=n_train, total_params=n_total, val_loss_before=val_before, val_loss_at_init=val_before)
    if RANK == 0:
        if info["init_gap_max_abs_logit_diff"] > 0:  # RanLoRA does not start at the base model: what that costs
            info["val_loss_at_init"] = evaluate(model, val_batches, args)
        log(f"{job.name} on {base_desc}: {len(adapters)} modules, {next(iter(adapters.values())).extra_repr()}")
        log(f"trainable params {n_train:,} of {n_total:,} ({100 * n_train / n_total:.3f}%); train {len(train_data):,} / val "
            f"{sum(x.numel() for x, _ in val_batches):,} tokens; adapter init {info['init_seconds']:.2f} s; init gap max |dlogits| "
            f"{info['init_gap_max_abs_logit_diff']:.3g}; val loss {val_before:.4f} before, {info['val_loss_at_init']:.4f} at init")
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)
    info["schedule"] = {"warmup": job.schedule[0], "decay": job.schedule[1]}
    loop = Loop(args.steps, job.lr, args.batch_size, args.block_size, args.seed, args.eval_interval, args.compile, *job.schedule,
                args.cuda_graph and args.device.startswith("cuda"))
    state = train(model, opt, train_data, val_batches, loop, args, os.path.join(job.out, "ckpt.pt"), job.signature, job.name, job.resume)
    return finish(model, adapters, job, args, tok, base_desc, val_batches, info, state) if RANK == 0 else None


def use_saved_adapter(args):
    """--rank-report, --plot, --generate, --export: a saved adapter.pt on the base it was trained on."""
    flag, path = next((f, p) for f, p in (("--rank-report", args.rank_report), ("--plot", args.plot), ("--generate", args.generate),
                                          ("--export", args.export and args.export[0])) if p)
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    if args.plot and not plots.pyplot():
        raise UserError("--plot needs matplotlib: pip install matplotlib")
    skeleton, base_desc = base_skeleton(args)
    adapters, ckpt = load_adapter(copy.deepcopy(skeleton), path, quiet=True)  # a wrong file fails before the base loads
    try:
        note = args.export and export.check(adapters, args.init_from, args.export[1], path, args.allow_approximate)
        tok = (args.generate or args.plot) and (load_tokenizer(args.init_from) if args.init_from else ByteTokenizer())
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}: {e}")
    if args.generate and not tok.encode(args.prompt, bos=True):
        raise UserError(f"--prompt {args.prompt!r}: must give at least one token")
    if ckpt["base"] != base_desc:  # another base, or the same one by another path: say so, the shapes fit
        log(f"note: {path} was trained on {ckpt['base']}, this is {base_desc}")
    if note:
        log(note)
    args.dtype = "float32" if args.export else args.dtype  # merged from the checkpoint's exact values, rounded once to its dtype
    model = load_base(args).requires_grad_(False)
    adapters, _ = load_adapter(model, path)
    if args.rank_report:
        log("\n".join(diagnostics.rank_lines(diagnostics.rank_report(adapters), f"{ckpt['adapter']} ({path})")))
    elif args.plot:  # the activations shown: the validation batches of training
        batches = data.eval_batches(read_data(args, tok)[1], args.eval_iters, args.batch_size, args.block_size)
        log(f"saved {plots.plot_adapter(model, adapters, batches, os.path.dirname(os.path.abspath(path)), ckpt['base'])}")
    elif args.generate:
        print(sample(model, adapters, tok, args))
    else:
        log(f"saved {args.export[1]}: {', '.join(export.export(adapters, args.init_from, args.export[1]))}")


def compare(results, args):
    """One table (also in compare.json) and one figure for several methods trained alike."""
    lines = diagnostics.compare_table(results)
    log("\n" + "\n".join(lines))
    atomic_save({"steps": args.steps, "seed": args.seed, "data": args.data, "table": lines[:-1], "methods": results}, os.path.join(args.out_dir, "compare.json"))
    png = os.path.join(args.out_dir, "compare.png")
    log(f"saved {args.out_dir}/compare.json" + (f", {png}" if plots.plot_compare(results, png) else " (pip install matplotlib for compare.png)"))


def main(argv=None):
    try:
        args = parse_args(argv)
        if DISTRIBUTED:  # under torchrun: one process per device, NCCL on CUDA, gloo on the CPU
            if args.device.startswith("cuda"):
                args.device = f"cuda:{os.environ['LOCAL_RANK']}"
                torch.cuda.set_device(args.device)
            torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.rank_report or args.plot or args.generate or args.export:
            use_saved_adapter(args)
            return 0
        base, base_desc, tok, train_data, val_batches, val_before, jobs = prepare(args)
        results = {job.name: run(job, base, base_desc, tok, train_data, val_batches, val_before, args) for job in jobs}
        if RANK != 0:
            return 0
        if len(results) > 1:
            compare(results, args)
        failed = [n for n, m in results.items() if m["errors"] or (m["merge"] or {}).get("passed") is False]
        for n in failed:
            if (results[n]["merge"] or {}).get("passed") is False:
                print(f"error: {n}: merge check failed: merged and unmerged logits differ by {results[n]['merge']['relative_diff']:.2g} relative (> 1e-4)", file=sys.stderr)
        return 1 if failed else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        log(str(e))
        return 130
    finally:
        if DISTRIBUTED and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
