"""Fine-tune a model with one adapter, verify merged vs unmerged, save the adapter.

    python train.py --adapter genlora                  # built-in GPT, built-in data, no download
    python train.py --adapter lora --data notes/ --steps 1000
    python train.py --adapter ranlora --init-from ~/Llama-3.2-1B --data corpus.txt
    torchrun --standalone --nproc_per_node=2 train.py --adapter lora    # data parallel

With no --init-from, the base model is the built-in byte-level GPT, pretrained once on the
Python standard library's own top-level modules (code) and cached under <out-dir>/base/.
With no --data, it is fine-tuned on Python's language reference (pydoc_data.topics, prose).
Both corpora ship with CPython, so the default run needs nothing but this repository.
"""
import argparse
import contextlib
import glob
import hashlib
import importlib
import inspect
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nanogpt_model import GPT, ByteTokenizer, GPTConfig, generate

# The adapter registry: name -> (file, class, default targets, default lr). One line per adapter file.
# Targets follow each paper where the model has those projections (the built-in GPT has no gate_proj).
ADAPTERS = {
    "lora": ("lora", "LoRALinear", "q,k,v,o,gate,up,down", 1e-3),
    "genlora": ("genlora", "GenLoRALinear", "q,k,v", 5e-3),  # the paper's commonsense lr
    "lrlora": ("lrlora", "LRLoRALinear", "q,k,v,o,gate,up,down", 1e-3),
    "aurora": ("aurora", "AuroRALinear", "q,k,v,up,down", 1e-2),  # the paper: 5e-3 to 1.5e-2 for small models
    "ranlora": ("ranlora", "RanLoRALinear", "q,k,v,up,down", 3e-3),
}
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # --targets names; module names are <t>_proj
# CLI flag -> adapter constructor keyword, used when the adapter's __init__ takes that keyword
ADAPTER_KWARGS = ("r", "alpha", "dropout", "groups", "num_centers", "grid_size", "grid_range", "mode", "fixed", "learnable", "activation")
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
DISTRIBUTED = "LOCAL_RANK" in os.environ  # started by torchrun (even with one process: DDP all the same)


class UserError(Exception):
    """A mistake in the command line or the input files: reported in one line, no traceback."""


def log(*a):
    if RANK == 0:
        tqdm.write(" ".join(str(x) for x in a))


# ----------------------------------------------------------------------------------------------
# data


def stdlib_code():
    """The top-level *.py modules of the running Python's standard library (about 4.7 MB)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return "\n\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files)


def pydoc_topics():
    """Python's language reference as plain prose (about 0.46 MB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_texts(specs):
    """Text from files, folders (recursively) and globs; one clear error for anything missing or empty."""
    files = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(p for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True) if os.path.isfile(p))
        elif os.path.isfile(spec):
            found = [spec]
        else:
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not found:
            raise UserError(f"--data {spec}: no such file, folder or matching glob")
        files += found
    texts, skipped = [], 0
    for f in files:
        raw = open(f, "rb").read()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            skipped += 1  # a folder may hold images or binaries: only text files are data
    text = "\n\n".join(t for t in texts if t)
    if not text.strip():
        raise UserError(f"--data {' '.join(specs)}: no text found ({len(files)} file(s), {skipped} not UTF-8 text)")
    if skipped:
        log(f"data: skipped {skipped} file(s) that are not UTF-8 text")
    return text


def split_tokens(ids, block_size, what):
    """90% train / 10% validation; each split must hold at least one block plus its target."""
    data = torch.tensor(ids, dtype=torch.long)
    n = int(0.9 * len(data))
    if min(n, len(data) - n) < block_size + 1:
        need = math.ceil((block_size + 1) / 0.1)
        raise UserError(f"{what}: {len(data)} tokens is too short for block size {block_size} (need at least {need} tokens, or a smaller --block-size)")
    return data[:n], data[n:]


def windows(data, ix, block_size):
    """The block_size-token windows starting at ix, and the same shifted by one: inputs and targets."""
    return torch.stack([data[i : i + block_size] for i in ix]), torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])


def get_batch(data, batch_size, block_size, gen):
    """batch_size random windows; every rank draws the same global batch and keeps its own slice."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)
    return windows(data, ix.chunk(WORLD)[RANK] if WORLD > 1 else ix, block_size)


def eval_batches(data, args):
    """A fixed set of validation batches, so before, after, merged and unmerged see the same tokens."""
    gen = torch.Generator().manual_seed(1234)
    ix = torch.randint(len(data) - args.block_size - 1, (args.eval_iters, args.batch_size), generator=gen)
    return [windows(data, row, args.block_size) for row in ix]


# ----------------------------------------------------------------------------------------------
# models


def autocast(args):
    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=args.device.split(":")[0], dtype=getattr(torch, args.dtype))


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


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint (.json: as JSON)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    if path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or not a checkpoint at all
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); delete it or choose another --out-dir")


def pretrained_gpt(args):
    """The built-in GPT, pretrained on the stdlib's code once and cached (a few minutes on a laptop CPU)."""
    cfg = GPTConfig(block_size=max(128, args.block_size))
    key = hashlib.sha1(json.dumps([asdict(cfg), args.base_steps, args.seed, sys.version_info[:2]]).encode()).hexdigest()[:10]
    path = os.path.join(args.out_dir, "base", f"gpt-{key}.pt")
    if not os.path.exists(path) and RANK == 0:
        pretrain_gpt(cfg, path, args)
    if DISTRIBUTED:
        torch.distributed.barrier()  # other ranks wait for rank 0's cache
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(args.device), ByteTokenizer(), f"built-in GPT ({path})"


def pretrain_gpt(cfg, path, args):
    torch.manual_seed(args.seed)
    model = GPT(cfg).to(args.device)
    train, val = split_tokens(list(stdlib_code().encode("utf-8")), cfg.block_size, "stdlib corpus")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    log(f"pretraining the built-in GPT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on the stdlib's code, {args.base_steps} steps; cached at {path}")
    bar = tqdm(range(args.base_steps), desc="pretrain", dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = 2e-3 * lr_factor(step, args.base_steps)
        ix = torch.randint(len(train) - cfg.block_size - 1, (32,), generator=gen)
        x, y = (t.to(args.device) for t in windows(train, ix, cfg.block_size))
        with autocast(args):
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    atomic_save({"config": asdict(cfg), "model": model.state_dict()}, path)


def lr_factor(step, steps, warmup=20):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def load_base(args):
    """The frozen model to adapt and its tokenizer."""
    if args.init_from is None:
        return pretrained_gpt(args)
    from nanogpt_model import load_llama, load_tokenizer

    if not os.path.isdir(args.init_from):
        raise UserError(f"--init-from {args.init_from}: not a directory")
    try:
        model = load_llama(args.init_from, device=args.device, dtype=getattr(torch, args.dtype))
        tok = load_tokenizer(args.init_from)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"--init-from {args.init_from}: {e}")
    return model, tok, f"LLaMA ({args.init_from})"


# ----------------------------------------------------------------------------------------------
# adapters


def adapter_class(name):
    if name not in ADAPTERS:
        raise UserError(f"--adapter {name}: unknown adapter (choose from {', '.join(ADAPTERS)})")
    file, cls, _, _ = ADAPTERS[name]
    return getattr(importlib.import_module(file), cls)


def adapter_kwargs(name, args, strict=True):
    """Constructor keywords from the flags the user gave; a flag the adapter does not take is an error
    (when comparing several adapters, strict=False: a method flag applies to its own method only)."""
    params = inspect.signature(adapter_class(name).__init__).parameters
    kwargs = {}
    for k in ADAPTER_KWARGS:
        v = getattr(args, k, None)
        if v is None:
            continue
        if k not in params:
            if not strict:
                continue
            raise UserError(f"--{k.replace('_', '-')} does not apply to --adapter {name}")
        kwargs[k] = v
    return kwargs


def parse_targets(spec):
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise UserError(f"--targets {spec}: unknown target {', '.join(bad) or '(empty)'} (choose from {','.join(TARGETS)})")
    return targets


def inject(model, name, targets, kwargs):
    """Wrap every nn.Linear named <target>_proj in the adapter; the one place adapters enter a model."""
    cls, wanted, wrapped = adapter_class(name), {f"{t}_proj" for t in targets}, {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in wanted and isinstance(child, nn.Linear):
                try:
                    adapter = cls(child, **kwargs)
                except ValueError as e:
                    raise UserError(f"--adapter {name} on {parent_name}.{child_name} ({child.out_features}x{child.in_features}): {e}")
                setattr(parent, child_name, adapter)
                wrapped[f"{parent_name}.{child_name}"] = adapter
    if not wrapped:
        raise UserError(f"--targets {','.join(targets)}: no module of this model matches")
    missing = [t for t in targets if not any(k.endswith(f".{t}_proj") for k in wrapped)]
    if missing:
        log(f"note: this model has no {', '.join(t + '_proj' for t in missing)}")
    return wrapped


def adapter_state(adapters):
    """Adapter weights only: each adapter's state minus its frozen base layer."""
    return {f"{n}.{k}": v.detach().cpu() for n, a in adapters.items() for k, v in a.state_dict().items() if not k.startswith("base.")}


def load_adapter(model, path):
    """Wrap a fresh base model as recorded in adapter.pt and load the saved weights onto it."""
    ckpt = load_checkpoint(path)
    adapters = inject(model, ckpt["adapter"], ckpt["targets"], ckpt["kwargs"])
    state = ckpt["state"]
    for n, a in adapters.items():
        own = {k[len(n) + 1 :]: v for k, v in state.items() if k.startswith(n + ".")}
        a.load_state_dict(own, strict=False)  # strict=False: base.* is the model's own, not in the file
    return adapters, ckpt


@contextlib.contextmanager
def swapped(model, adapters, replacements):
    """Temporarily put replacements[name] where each adapter sits, e.g. its merged Linear or its base."""
    def put(name, module):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)

    for n, a in adapters.items():
        put(n, replacements[n])
    try:
        yield
    finally:
        for n, a in adapters.items():
            put(n, a)


# ----------------------------------------------------------------------------------------------
# the merge check


@torch.no_grad()
def tokens_per_s(model, x, reps=3):
    model(x)  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return reps * x.numel() / (time.perf_counter() - t)


@torch.no_grad()
def merge_check(model, adapters, batches, args):
    """Merged vs unmerged, eval mode, float32, on the held-out batches.

    Exact methods must agree to 1e-4 relative on the logits; approximate ones report their gap;
    a method with no weight-space form says why and what keeping the adapter costs at inference.
    """
    model.float().eval()  # training is over: compare in float32
    fp32 = argparse.Namespace(**{**vars(args), "dtype": "float32"})
    x = batches[0][0].to(args.device)
    val_unmerged = evaluate(model, batches, fp32)
    exact = all(a.exact_merge for a in adapters.values())
    try:
        merged = {n: a.merged() for n, a in adapters.items()}
    except NotImplementedError as e:
        with_adapter = tokens_per_s(model, x)
        with swapped(model, adapters, {n: a.base for n, a in adapters.items()}):
            without = tokens_per_s(model, x)
        return {"exact": False, "max_abs_logit_diff": None, "relative_diff": None, "val_loss_unmerged": val_unmerged,
                "val_loss_merged": None, "reason": str(e), "inference_tokens_per_s": {"with_adapter": with_adapter, "base_layers_only": without}}
    unmerged_logits = model(x)
    with swapped(model, adapters, merged):
        diff = (model(x) - unmerged_logits).abs().max().item()
        val_merged = evaluate(model, batches, fp32)
    rel = diff / unmerged_logits.abs().max().item()
    reason = None if exact else "approximate: merged() is the method's static inference form, not its training-time forward"
    return {"exact": exact, "max_abs_logit_diff": diff, "relative_diff": rel, "val_loss_unmerged": val_unmerged,
            "val_loss_merged": val_merged, "reason": reason, "passed": (rel <= 1e-4) if exact else None}


def report_merge(m):
    if m["max_abs_logit_diff"] is None:
        log(f"merge: none. {m['reason']}")
        t = m["inference_tokens_per_s"]
        log(f"  the adapter stays at inference: {t['with_adapter']:,.0f} tokens/s with it vs {t['base_layers_only']:,.0f} without ({t['base_layers_only'] / t['with_adapter']:.2f}x)")
        return
    kind = "exact" if m["exact"] else "approximate (the paper's static inference form)"
    log(f"merge ({kind}): max |dlogits| = {m['max_abs_logit_diff']:.3g} (relative {m['relative_diff']:.2g}), "
        f"val loss unmerged {m['val_loss_unmerged']:.4f} vs merged {m['val_loss_merged']:.4f}")


# ----------------------------------------------------------------------------------------------
# rank diagnostics: what the papers' rank claims are about


def rank_stats(dw, threshold=0.005):
    """Numerical rank (singular values above 0.005, GenLoRA's Fig. 4), stable rank ||dW||_F^2 / ||dW||_2^2
    (LR-LoRA's Eq. 5) and energy sum(sigma^2) (GenLoRA's Table 9) of one update, from a float64 SVD."""
    s = torch.linalg.svdvals(dw.detach().double().cpu())
    energy = (s**2).sum().item()
    return {"numerical_rank": int((s > threshold).sum()), "stable_rank": energy / s[0].item() ** 2 if s[0] > 0 else 0.0,
            "energy": energy, "spectrum": s[:64].tolist()}


def rank_report(adapters):
    """Per-module diagnostics and their means; a method with no weight-space dW says why instead."""
    per_module = {}
    for n, a in adapters.items():
        try:
            with torch.no_grad():
                per_module[n] = rank_stats(a.delta_weight())
        except NotImplementedError as e:
            return {"per_module": None, "mean": None, "reason": str(e)}
    mean = {k: sum(m[k] for m in per_module.values()) / len(per_module) for k in ("numerical_rank", "stable_rank", "energy")}
    return {"per_module": per_module, "mean": mean, "reason": None}


# ----------------------------------------------------------------------------------------------
# one fine-tuning run


def run(args, name):
    """Fine-tune one adapter on args.data and return its metrics (also written to <out-dir>/<name>/)."""
    out = os.path.join(args.out_dir, name)
    ckpt_path, t_start = os.path.join(out, "ckpt.pt"), time.time()
    targets, kwargs = parse_targets(args.targets or ADAPTERS[name][2]), adapter_kwargs(name, args, strict=not args.comparing)
    lr = args.lr or ADAPTERS[name][3]
    model, tok, base_desc = load_base(args)
    model.requires_grad_(False)
    if args.block_size > model.max_seq_len:
        raise UserError(f"--block-size {args.block_size}: the model's context is {model.max_seq_len} tokens")
    text = read_texts(args.data) if args.data else pydoc_topics()
    train_data, val_data = split_tokens(tok.encode(text), args.block_size, "--data" if args.data else "pydoc topics")
    val_batches = eval_batches(val_data, args)
    val_before = evaluate(model, val_batches, args) if RANK == 0 else None
    model.eval()
    with torch.no_grad(), autocast(args):
        ref_logits = model(val_batches[0][0][:4].to(args.device)).float()

    torch.manual_seed(args.seed)
    t_init = time.perf_counter()
    adapters = inject(model, name, targets, kwargs)
    if "cuda" in args.device:
        torch.cuda.synchronize()
    init_seconds = time.perf_counter() - t_init  # the adapters' own init: RanLoRA's decompositions dominate it
    with torch.no_grad(), autocast(args):
        init_gap = (model(val_batches[0][0][:4].to(args.device)).float() - ref_logits).abs().max().item()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    log(f"{name} on {base_desc}: {len(adapters)} modules, {adapters[next(iter(adapters))].extra_repr()}")
    log(f"trainable params {n_train:,} of {n_total:,} ({100 * n_train / n_total:.3f}%); "
        f"train {len(train_data):,} / val {len(val_data):,} tokens; val loss before {val_before:.4f}" if RANK == 0 else "")
    log(f"init gap: max |dlogits| wrapped vs base = {init_gap:.3g}" + (" (the adapter starts exactly at the base model)" if init_gap == 0 else ""))
    val_at_init = val_before
    if init_gap > 0 and RANK == 0:  # the method's starting point is not the base model (RanLoRA): what that costs
        val_at_init = evaluate(model, val_batches, args)
        log(f"val loss with the adapter at init {val_at_init:.4f} (base model {val_before:.4f})")
    log(f"adapter init: {init_seconds:.2f} s for {len(adapters)} modules")

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    signature = {"adapter": name, "targets": targets, "kwargs": kwargs, "lr": lr, "batch_size": args.batch_size, "block_size": args.block_size,
                 "seed": args.seed, "data": args.data, "base": base_desc, "world": WORLD}
    start, curve, train_time, tokens = 0, [], 0.0, 0
    if os.path.exists(ckpt_path) and not args.no_resume:
        ck = load_checkpoint(ckpt_path)
        if ck["signature"] != signature:
            diff = sorted(k for k in signature if ck["signature"].get(k) != signature[k])
            raise UserError(f"{ckpt_path} holds an interrupted run with other settings ({', '.join(diff)}): repeat its command, pass --no-resume to start over, or use another --out-dir")
        for n, a in adapters.items():
            a.load_state_dict({k[len(n) + 1 :]: v for k, v in ck["state"].items() if k.startswith(n + ".")}, strict=False)
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        start, curve, train_time, tokens = ck["step"], ck["curve"], ck["train_time"], ck["tokens"]
        log(f"resuming the interrupted run from step {start} ({ckpt_path})")

    def save_ckpt(step):
        if RANK == 0:
            atomic_save({"signature": signature, "step": step, "state": adapter_state(adapters), "opt": opt.state_dict(), "gen": gen.get_state(),
                         "torch_rng": torch.get_rng_state(), "curve": curve, "train_time": train_time, "tokens": tokens}, ckpt_path)

    fwd = model
    if DISTRIBUTED:  # gradients of the adapter parameters only: frozen weights are not registered for sync
        fwd = nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if "cuda" in args.device else None)
    if args.compile:
        fwd = torch.compile(fwd)
    model.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=name, disable=RANK != 0, dynamic_ncols=True)
    done = start  # steps completed: what a checkpoint written on interrupt holds
    try:
        for step in bar:
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, args.steps)
            x, y = get_batch(train_data, args.batch_size, args.block_size, gen)
            with autocast(args):
                logits = fwd(x.to(args.device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(args.device).flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            loss_v = loss.item()  # syncs the device, so the step time below is real
            train_time += time.perf_counter() - t0
            tokens += x.numel() * WORLD
            bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{tokens / train_time:,.0f}")
            if not math.isfinite(loss_v):
                raise UserError(f"step {step}: the loss is {loss_v}; lower --lr (now {lr:g})")
            if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
                val = evaluate(model, val_batches, args) if RANK == 0 else None
                curve.append({"step": step + 1, "train_loss": loss_v, "val_loss": val})
                if RANK == 0:
                    bar.write(f"step {step + 1}: train loss {loss_v:.4f}, val loss {val:.4f}")
                save_ckpt(step + 1)
    except KeyboardInterrupt:
        save_ckpt(done)
        log(f"interrupted after step {done}: run the same command again to resume from {ckpt_path}")
        raise SystemExit(130)
    bar.close()
    if RANK != 0:
        return None

    val_after = curve[-1]["val_loss"] if curve else evaluate(model, val_batches, args)
    atomic_save({"adapter": name, "targets": targets, "kwargs": kwargs, "base": base_desc, "state": adapter_state(adapters)}, os.path.join(out, "adapter.pt"))
    model.eval()
    prompt = torch.tensor([tok.encode(args.prompt, bos=True)], device=args.device)
    torch.manual_seed(args.seed)
    with autocast(args):
        out_ids = generate(model, prompt, args.sample_tokens, stop_id=tok.eos_id)[0].tolist()
    sample = tok.decode(out_ids[1:] if tok.bos_id is not None and out_ids[0] == tok.bos_id else out_ids)  # without the BOS marker
    rank = rank_report(adapters)
    merge = merge_check(model, adapters, val_batches, args)
    metrics = {"adapter": name, "targets": targets, "kwargs": kwargs, "base": base_desc, "trainable_params": n_train, "total_params": n_total,
               "init_gap_max_abs_logit_diff": init_gap, "init_seconds": init_seconds, "val_loss_before": val_before, "val_loss_at_init": val_at_init, "val_loss_after": val_after, "steps": args.steps, "lr": lr,
               "tokens_per_s": tokens / max(train_time, 1e-9), "wall_s": time.time() - t_start, "merge": merge, "rank": rank, "curve": curve, "sample": sample}
    with open(os.path.join(out, "sample.txt"), "w") as f:
        f.write(sample)
    atomic_save(metrics, os.path.join(out, "metrics.json"))
    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)  # the run is complete: adapter.pt and metrics.json hold its result
    log(f"val loss {val_before:.4f} -> {val_after:.4f}; {metrics['tokens_per_s']:,.0f} tokens/s")
    report_merge(merge)
    log(f"sample: {sample!r}"[:400])
    log(f"saved {out}/adapter.pt, metrics.json, sample.txt")
    return metrics



# ----------------------------------------------------------------------------------------------
# comparing methods: one table, compare.json, compare.png


def merge_summary(m):
    if m["max_abs_logit_diff"] is None:
        return "none (stays at inference)"
    return "exact" if m["exact"] else f"gap {m['max_abs_logit_diff']:.2g}"


def compare(results, args):
    """One row per method: parameters, loss, speed, merge and the rank diagnostics of its dW."""
    head = f"{'method':<9} {'trainable':>10} {'val before':>10} {'val after':>9} {'tok/s':>8}  {'merge':<26} {'num.rank':>8} {'stable rk':>9} {'energy':>9}"
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        mean = m["rank"]["mean"]
        ranks = f"{mean['numerical_rank']:>8.1f} {mean['stable_rank']:>9.2f} {mean['energy']:>9.3g}" if mean else f"{'no weight-space dW':>28}"
        lines.append(f"{name:<9} {m['trainable_params']:>10,} {m['val_loss_before']:>10.4f} {m['val_loss_after']:>9.4f} {m['tokens_per_s']:>8,.0f}  {merge_summary(m['merge']):<26} {ranks}")
    log("\n" + "\n".join(lines))
    log("rank columns: mean over adapted modules of dW's singular values > 0.005, ||dW||_F^2/||dW||_2^2, sum of sigma^2")
    path = os.path.join(args.out_dir, "compare.json")
    atomic_save({"steps": args.steps, "seed": args.seed, "data": args.data, "table": lines, "methods": results}, path)
    log(f"saved {path}")
    plot_compare(results, os.path.join(args.out_dir, "compare.png"))


def plot_compare(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no plot: pip install matplotlib to get compare.png (val-loss curves and dW spectra)")
        return
    kinds = sorted({n.rpartition(".")[2] for m in results.values() if m["rank"]["per_module"] for n in m["rank"]["per_module"]})
    fig, axes = plt.subplots(1, 1 + len(kinds), figsize=(4 * (1 + len(kinds)), 3.4), squeeze=False)
    for name, m in results.items():
        axes[0, 0].plot([c["step"] for c in m["curve"]], [c["val_loss"] for c in m["curve"]], marker=".", label=name)
        for ax, kind in zip(axes[0, 1:], kinds):
            spectra = [torch.tensor(s["spectrum"]) for n, s in (m["rank"]["per_module"] or {}).items() if n.endswith(kind)]
            if spectra:
                k = min(len(s) for s in spectra)
                ax.semilogy(torch.stack([s[:k] / s[0].clamp_min(1e-30) for s in spectra]).mean(0), label=name)
    axes[0, 0].set(title="val loss", xlabel="step")
    axes[0, 0].legend()
    for ax, kind in zip(axes[0, 1:], kinds):
        ax.set(title=f"{kind}: sigma_i / sigma_1 of dW", xlabel="i", ylim=(1e-4, 1.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"saved {path}")


def report_saved_adapter(args):
    """--rank-report: the rank diagnostics of a saved adapter.pt, on the base it was trained on."""
    if not os.path.isfile(args.rank_report):
        raise UserError(f"--rank-report {args.rank_report}: no such file")
    model, _, _ = load_base(args)
    model.requires_grad_(False)
    adapters, ckpt = load_adapter(model, args.rank_report)
    rep = rank_report(adapters)
    if rep["reason"]:
        log(f"{ckpt['adapter']}: no weight-space dW. {rep['reason']}")
        return
    log(f"{ckpt['adapter']} ({args.rank_report}): {'module':<28} {'num.rank':>8} {'stable rk':>9} {'energy':>9}")
    for n, st in rep["per_module"].items():
        log(f"  {n:<28} {st['numerical_rank']:>8} {st['stable_rank']:>9.2f} {st['energy']:>9.3g}")
    mean = rep["mean"]
    log(f"  {'mean':<28} {mean['numerical_rank']:>8.1f} {mean['stable_rank']:>9.2f} {mean['energy']:>9.3g}")


# ----------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapter", default="genlora", help=f"one of {', '.join(ADAPTERS)}; a comma list or 'all' trains each and compares them")
    p.add_argument("--data", nargs="+", help="text files, folders or globs to fine-tune on (default: Python's pydoc topics)")
    p.add_argument("--init-from", help="a LLaMA checkpoint directory (HF or Meta layout); default: the built-in GPT")
    p.add_argument("--targets", help=f"comma-separated subset of {','.join(TARGETS)} (default: the adapter's paper)")
    p.add_argument("--rank", dest="r", type=int, help="adapter rank (default: the adapter's)")
    p.add_argument("--alpha", type=float, help="scale = alpha / rank (default: the adapter's)")
    p.add_argument("--dropout", type=float, help="dropout on the adapter input (default: the adapter's)")
    m = p.add_argument_group("method-specific (default: the adapter's)")
    m.add_argument("--groups", type=int, help="GenLoRA: groups per latent")
    m.add_argument("--num-centers", type=int, help="GenLoRA: RBF centers per generator")
    m.add_argument("--grid-size", type=int, help="LR-LoRA: sinc basis functions")
    m.add_argument("--grid-range", type=float, help="LR-LoRA: the sinc grid spans [-range, range]")
    m.add_argument("--mode", choices=["dynamic", "static"], help="AuroRA: dynamic (paper default) or static (AuroRA-S)")
    m.add_argument("--no-fixed", dest="fixed", action="store_const", const=False, help="AuroRA ablation: drop the fixed nonlinearity")
    m.add_argument("--no-learnable", dest="learnable", action="store_const", const=False, help="AuroRA ablation: drop the learnable spline")
    m.add_argument("--activation", choices=["gelu", "relu", "tanh", "identity"], help="RanLoRA: nonlinearity on A x")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, help="global batch, split across torchrun processes (default: 32 on the built-in GPT, 8 on LLaMA)")
    p.add_argument("--block-size", type=int, help="tokens per sequence (default: 128 on the built-in GPT, 256 on LLaMA)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the adapter's registry value)")
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--eval-iters", type=int, default=10)
    p.add_argument("--base-steps", type=int, default=600, help="pretraining steps of the built-in GPT (cached)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bfloat16 on a GPU that has it, else float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", default="out")
    p.add_argument("--no-resume", action="store_true", help="start over even if an interrupted run's checkpoint exists")
    p.add_argument("--prompt", default="The ", help="start of the generated sample")
    p.add_argument("--sample-tokens", type=int, default=200)
    p.add_argument("--rank-report", metavar="ADAPTER_PT", help="print the rank diagnostics of a saved adapter.pt and exit")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if args.block_size is None:
        args.block_size = 256 if args.init_from else 128
    if args.batch_size is None:
        args.batch_size = 8 if args.init_from else 32
    for k in ("steps", "batch_size", "block_size", "eval_interval", "eval_iters", "base_steps"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} {getattr(args, k)}: must be at least 1")
    if args.batch_size % WORLD:
        raise UserError(f"--batch-size {args.batch_size}: must divide evenly across {WORLD} processes")
    return args


def setup_distributed(args):
    """Under torchrun: one process per device, NCCL on CUDA, gloo on the CPU."""
    if not DISTRIBUTED:
        return
    if args.device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")


def main(argv=None):
    try:
        args = parse_args(argv)
        names = list(ADAPTERS) if args.adapter == "all" else [n.strip() for n in args.adapter.split(",") if n.strip()]
        for n in names:
            adapter_class(n)  # an unknown adapter fails before any work
        args.comparing = len(names) > 1
        for n in names if args.compile else []:  # an adapter's own compiled kernels (LR-LoRA's sinc passes)
            module = importlib.import_module(ADAPTERS[n][0])
            if hasattr(module, "COMPILE"):
                module.COMPILE = True
        setup_distributed(args)
        if args.rank_report:
            report_saved_adapter(args)
            return 0
        results = {}
        for n in names:
            torch.manual_seed(args.seed)
            results[n] = run(args, n)
        if args.comparing and RANK == 0:
            compare(results, args)
        failed = [n for n, m in results.items() if m and m["merge"].get("passed") is False]
        for n in failed:
            print(f"error: {n}: merge check failed: merged and unmerged logits differ by {results[n]['merge']['relative_diff']:.2g} relative (> 1e-4)", file=sys.stderr)
        return 1 if failed else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if DISTRIBUTED and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
