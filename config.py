"""What a run is, settled before any work: the adapters and train.py's defaults for each (ADAPTERS), the command
line (parse_args: the flags as given, never changed after), and what they mean on this machine and in this process
(setup: a Setup, built once). A mistake in any of it is a UserError: one line, no traceback, exit 2."""
import argparse
import difflib
import importlib
import inspect
import math
import os
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import adapt
import plots

DOC = """Fine-tune a model with one adapter, verify merged vs unmerged, save the adapter."""


class UserError(Exception):  # a mistake in the command line or the input files: one line, no traceback, exit 2
    pass


def log(*a):  # on the first process only
    if not (torch.distributed.is_initialized() and torch.distributed.get_rank()):
        tqdm.write(" ".join(str(x) for x in a))


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
    # the literal Eq. 4's 1.2391, 33.3% at its best 3e-4 (--no-lrlora-center); warm-up: App. E.1's ratio 0.10. center=True is
    # the class's default too, written out so that every adapter.pt records its form (older files may predate the default)
    "lrlora": Adapter("lrlora", "LRLoRALinear", "q,k,v,o,gate,up,down", 1e-3, 3e-3, llm_warmup=0.1, kwargs={"center": True}),
    "aurora": Adapter("aurora", "AuroRALinear", "q,k,v,up,down", 1e-2, 1e-2),  # the study's best was its largest lr: higher untried
    "ranlora": Adapter("ranlora", "RanLoRALinear", "q,k,v,up,down", 3e-3, 1e-2),  # as AuroRA: 1e-2 the grid's edge
}
FINISH_STEPS = ("task", "sample", "rank", "merge", "plot")  # after the last step, each failing alone (see finish)
LLM_DROPOUT = 0.05  # with --init-from: the adapter dropout all four papers use on LLMs (the built-in GPT: the adapter's own)
# command-line dest -> adapter constructor keyword, passed when the adapter's __init__ takes it
ADAPTER_KWARGS = ("r", "alpha", "dropout", "groups", "num_centers", "freeze_latents", "normalize", "grid_size", "grid_range",
                  "learn_bandwidth", "center", "a_init", "mode", "fixed", "learnable", "fixed_activation", "activation", "modulation", "init")
WARMUP = 20  # the built-in GPT's linear warm-up steps (--init-from: the adapter's llm_warmup)


def adapter_class(name):
    return getattr(importlib.import_module(ADAPTERS[name].file), ADAPTERS[name].cls)


# ----------------------------------------------------------------------------------------------
# the command line: the flags as given (never changed after), and what they mean here (Setup, built once)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and exit 2, like every other user mistake (not usage + error)
        raise UserError(message)


def flag(dest):
    """The command-line flag that sets args.<dest> (--rank for r), for messages."""
    return next(a.option_strings[0] for a in parser()._actions if a.dest == dest)


def parser():
    p = ArgumentParser(description=DOC)
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
    p.add_argument("--lr", type=float, help="peak learning rate, 0 allowed (default: the adapter's in config.ADAPTERS, lr or with --init-from llm_lr)")
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
    p.add_argument("--out-dir", default="out", help="results go to OUT_DIR/<adapter>/, one run at a time (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in OUT_DIR/<adapter>/ (without it, the run refuses)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT_DIR/<adapter>/ holds an interrupted run")
    p.add_argument("--prompt", default="The ", help="start of the generated sample (default: %(default)r)")
    p.add_argument("--sample-tokens", type=int, default=200, help="length of the generated sample (default: %(default)s)")
    p.add_argument("--task-eval", metavar="FILE", help="a task file (tools/make_task.py): greedy exact-match accuracy on its problems "
                                                       "(task.py), or on a commonsense evaluation file both its scorers (commonsense.py), "
                                                       "before and after training, into metrics.json")
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
    # checked as given, before a default replaces a None (an `x or default` would swallow 0). A value under which a run
    # would train nothing, or fail mid-run, is refused here: 0 steps, batch, block or rank; --alpha 0 (scale 0);
    # --dropout 1 (the adapter sees only zeros); --lr inf (a nan loss). Not --lr 0: the untrained baseline, asked for by
    # name, which still evaluates, merges and saves (so --steps 0 is not needed for it, and is refused as a slip)
    for k in ("steps", "batch_size", "block_size", "eval_interval", "eval_iters", "base_steps", "sample_tokens", "r", "groups", "num_centers",
              "grid_size"):  # counts
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UserError(f"--{'rank' if k == 'r' else k.replace('_', '-')} {getattr(args, k)}: must be at least 1")
    if args.alpha is not None and not 0 < args.alpha < math.inf:
        raise UserError(f"--alpha {args.alpha:g}: must be above 0 (scale = alpha / rank)")
    if args.lr is not None and not 0 <= args.lr < math.inf:
        raise UserError(f"--lr {args.lr:g}: must be 0 or more, and finite")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UserError(f"--dropout {args.dropout:g}: must be at least 0 and below 1 (1 would drop every input of the adapter)")
    if set(args.skip) - set(FINISH_STEPS):
        raise UserError(f"--skip {','.join(args.skip)}: choose from {', '.join(FINISH_STEPS)}")
    return args


def adapter_names(spec):
    """--adapter as a list of ADAPTERS keys: any case, '-' and '_' ignored (GenLoRA, LR-LoRA, lr_lora), 'all' alone;
    a typo is an error that suggests the closest name, a name given twice an error too."""
    names = []
    for name in [n.strip() for n in spec.split(",") if n.strip()] or [spec]:
        key = name.lower().replace("-", "").replace("_", "")
        if key not in ADAPTERS and key != "all":
            close = difflib.get_close_matches(key, [*ADAPTERS, "all"], n=1)
            raise UserError(f"--adapter {name}: unknown adapter{f' (did you mean {close[0]}?)' if close else ''}; choose from {', '.join(ADAPTERS)}, or all")
        if key in names:
            raise UserError(f"--adapter {spec}: {key} is named twice")
        names.append(key)
    if "all" in names and len(names) > 1:
        raise UserError(f"--adapter {spec}: 'all' already trains every adapter; give it alone, or a list of names")
    return list(ADAPTERS) if names == ["all"] else names


@dataclass(frozen=True)
class Setup:  # what the flags mean on this machine and in this process, derived once from them and the environment
    names: list  # the adapters to train, in order
    device: str
    dtype: str  # autocast dtype: float32 is none
    batch_size: int  # global
    block_size: int
    dropout: float | None  # None: the adapter's own
    eval_interval: int
    rank: int = 0  # torchrun's process index and count; distributed: started by torchrun (even one process: DDP all the same)
    world: int = 1
    distributed: bool = False


def setup(args, env=os.environ):
    names, world, device = adapter_names(args.adapter), int(env.get("WORLD_SIZE", 1)), args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = device.partition(":")
    available = {"cpu": not index, "mps": not index and torch.backends.mps.is_available(),
                 "cuda": torch.cuda.is_available() and (not index or index.isdigit() and int(index) < torch.cuda.device_count())}
    if not available.get(kind):
        raise UserError(f"--device {device}: not available here (torch {torch.__version__} sees {torch.cuda.device_count()} CUDA GPUs; "
                        f"MPS {'yes' if torch.backends.mps.is_available() else 'no'})")
    if "LOCAL_RANK" in env and kind == "cuda":  # under torchrun: one process per GPU
        device = f"cuda:{env['LOCAL_RANK']}"
    dtype = "bfloat16" if args.dtype == "auto" and kind == "cuda" and torch.cuda.is_bf16_supported() else "float32" if args.dtype == "auto" else args.dtype
    batch_size = args.batch_size or (8 if args.init_from else 32)
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size}: must divide evenly across {world} processes")
    # about 20 evaluations a run, never closer than 15 steps (the default run's interval): each one (--eval-iters batches
    # and a checkpoint) costs 3-4 training steps, so evaluating stays under ~25% of a run's time, short runs included
    return Setup(names, device, dtype, batch_size, args.block_size or (256 if args.init_from else 128),
                 LLM_DROPOUT if args.init_from and args.dropout is None else args.dropout,
                 args.eval_interval or max(15, args.steps // 20), int(env.get("RANK", 0)), world, "LOCAL_RANK" in env)


def schedule(name, args):
    """(warm-up steps, decay) of a fine-tuning run. With --init-from: the adapter's paper schedule, linear warm-up over
    its llm_warmup then linear decay to 0, the warm-up capped at 10% of the run (the papers train for thousands of
    steps; at 1,000 steps and more the cap changes nothing, below it a run would otherwise mostly warm up).
    On the built-in GPT: WARMUP steps, then cosine to 10%."""
    if not args.init_from:
        return WARMUP, "cosine"
    w = ADAPTERS[name].llm_warmup
    return max(1, min(round(w * args.steps if w < 1 else w), args.steps // 10)), "linear"


def adapter_kwargs(name, args, s):
    """Constructor keywords: the adapter's defaults in ADAPTERS, then the flags the user gave; a flag the adapter does not
    take is an error (when comparing several adapters, a method's flag applies to its own method only)."""
    params = inspect.signature(adapter_class(name).__init__).parameters
    given = {k: getattr(args, k) for k in ADAPTER_KWARGS if getattr(args, k, None) is not None}
    if s.dropout is not None:
        given["dropout"] = s.dropout  # with --init-from: LLM_DROPOUT unless --dropout says otherwise
    if given.get("freeze_latents") == "both":
        given["freeze_latents"] = True  # GenLoRALinear(freeze_latents=True)
    for k in given if len(s.names) == 1 else []:
        if k not in params:
            raise UserError(f"{flag(k)} does not apply to --adapter {name}")
    return {**ADAPTERS[name].kwargs, **{k: v for k, v in given.items() if k in params}}


def parse_targets(spec):
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in targets if t not in adapt.TARGETS]
    if bad or not targets:
        raise UserError(f"--targets {spec!r}: {'unknown target ' + ', '.join(bad) if bad else 'no target'} (choose from {','.join(adapt.TARGETS)})")
    return targets

