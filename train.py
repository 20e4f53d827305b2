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
GPT; the step itself is engine.Step) -> finish (save first, then sample, rank diagnostics, merge check) -> main.
"""
import contextlib
import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

import adapt
import base
import data
import diagnostics
import engine
import export
import plots
import task
from base import base_skeleton, load_checkpoint, read_data, tokenizer
from config import ADAPTERS, FINISH_STEPS, WARMUP, UserError, adapter_class, adapter_kwargs, log, parse_args, parse_targets, schedule, setup
from engine import atomic_save, autocast, evaluate, sync
from nanogpt_model import GPT, GPTConfig, generate


class Interrupted(Exception):  # Ctrl-C or SIGTERM: the run stopped at a step boundary, its checkpoint saved; exit 130
    pass


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


@dataclass
class Prepared:  # what every adapter's run shares: the base, the data, and the base's scores
    base: nn.Module
    base_desc: str
    tok: object
    train_data: torch.Tensor
    val_batches: list
    val_before: float | None
    problems: list | None  # --task-eval's
    task_before: dict | None
    jobs: list


def prepare(args, s, locks):
    """Check everything that can be checked from the command line, the files and the model's config alone
    (no weights, no pretraining), claim each adapter's output folder (its lock held in locks until the run ends),
    then load the base and tokenize the data once for every adapter."""
    skeleton, base_desc = base_skeleton(args)
    if s.block_size > skeleton.max_seq_len:
        what = "the built-in GPT's context is fixed at" if args.init_from is None else "the model's context is"
        raise UserError(f"--block-size {s.block_size}: {what} {skeleton.max_seq_len} tokens")
    jobs = []
    for name in s.names:
        targets, kwargs = parse_targets(ADAPTERS[name].targets if args.targets is None else args.targets), adapter_kwargs(name, args, s)
        inject(copy.deepcopy(skeleton), name, targets, kwargs, quiet=True)  # on the meta device: bad ranks, groups, targets
        lr = args.lr if args.lr is not None else ADAPTERS[name].llm_lr if args.init_from else ADAPTERS[name].lr
        sched = schedule(name, args)
        signature = {"adapter": name, "targets": targets, "kwargs": kwargs, "lr": lr, "steps": args.steps, "batch_size": s.batch_size,
                     "block_size": s.block_size, "seed": args.seed, "data": args.data, "base": base_desc, "world": s.world, "schedule": list(sched)}
        jobs.append(Job(name, targets, kwargs, lr, os.path.join(args.out_dir, name), signature, schedule=sched))
    tok = tokenizer(args)
    try:
        problems = task.load(args.task_eval)["problems"] if args.task_eval else None
    except ValueError as e:
        raise UserError(f"--task-eval {e}")
    if not tok.encode(args.prompt, bos=True):
        raise UserError(f"--prompt {args.prompt!r}: must give at least one token")
    train_data, val_data, skipped = read_data(args, s, tok)
    if skipped:
        log(f"data: skipped {skipped} file(s) that are not UTF-8 text")
    for job in jobs:
        claim(job, args, s, locks)
    frozen = load_base(args, s).requires_grad_(False)
    val_batches = data.eval_batches(val_data, args.eval_iters, s.batch_size, s.block_size)
    first = s.rank == 0
    val_before = evaluate(frozen, val_batches, s.device, s.dtype) if first else None
    task_before = task_accuracy(frozen, {}, tok, problems, s) if problems and first else None  # the base model's (step 0)
    if s.distributed:
        torch.distributed.barrier()  # every process has decided whether to resume before rank 0 replaces a checkpoint
    return Prepared(frozen, base_desc, tok, train_data, val_batches, val_before, problems, task_before, jobs)


def claim(job, args, s, locks):
    """Make <out-dir>/<adapter>/ this run's own, before any work: a folder it can write, locked for as long as the run
    lasts (one run at a time: a second is refused, not queued), with no finished run in it unless --overwrite, and an
    interrupted one resumed only with the same settings. Locked first, then looked into: two runs started together
    cannot both find it empty."""
    def busy():
        raise UserError(f"{job.out} is in use by another run: wait for it to end, or choose another --out-dir")

    if s.rank == 0:  # the process that writes it
        try:
            locks.enter_context(engine.file_lock(os.path.join(job.out, ".lock"), busy))
        except OSError as e:  # a file where a folder should be, no permission, a read-only disk: not a traceback after training
            raise UserError(f"--out-dir {args.out_dir}: cannot write {job.out} ({e.strerror or e})")
    ckpt, done = os.path.join(job.out, "ckpt.pt"), os.path.join(job.out, "adapter.pt")
    if os.path.exists(ckpt) and not args.no_resume:  # never overwrite a result silently: resume it, or ask
        saved = load_checkpoint(ckpt, "checkpoint (pass --no-resume to start over)").get("signature")
        if saved != job.signature:
            diff = ", ".join(sorted(k for k in job.signature if saved.get(k) != job.signature[k]))
            raise UserError(f"{ckpt} holds an interrupted run with other settings ({diff}): repeat its command, pass --no-resume to start over, or use another --out-dir")
        job.resume = True
    elif os.path.exists(done) and not args.overwrite:
        raise UserError(f"{done} holds a finished run: pass --overwrite to replace it, or choose another --out-dir")


def load_base(args, s):
    """base.load_base, the built-in GPT pretrained the first time by this file's own loop (pretrain_gpt)."""
    return base.load_base(args, s, lambda path: pretrain_gpt(args, s, path))


def pretrain_gpt(args, s, path):
    """The built-in GPT, pretrained on the stdlib's code with the fine-tuning loop itself, so it resumes alike."""
    cfg = GPTConfig()
    torch.manual_seed(1337)  # the same base for every --seed: it is cached once per config
    model = GPT(cfg).to(s.device)
    train_data, val_data = data.split_tokens(list(data.stdlib_code().encode("utf-8")), cfg.block_size, "stdlib corpus")
    val = data.eval_batches(val_data, 5, 32, cfg.block_size)
    loop = Loop(steps=args.base_steps, lr=2e-3, batch_size=32, block_size=cfg.block_size, seed=1337, eval_interval=100,
                cuda_graph=args.cuda_graph and s.device.startswith("cuda"))
    opt = torch.optim.AdamW(model.parameters(), lr=loop.lr, betas=(0.9, 0.95), weight_decay=0.1)
    ix = torch.linspace(0, len(train_data) - cfg.block_size - 2, 32).long()  # one batch, not the run's: no get_batch
    seconds = args.base_steps * engine.seconds_per_step(model, *data.windows(train_data, ix, cfg.block_size), s.device, s.dtype)
    log(f"pretraining the built-in GPT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) once on the stdlib's code: "
        f"{args.base_steps} steps, about {f'{seconds / 60:.1f} min' if seconds >= 90 else f'{seconds:.1f} s'} here (3 steps timed); "
        f"Ctrl-C keeps its progress; cached at {path}")
    ckpt = path + ".ckpt"
    train(model, opt, train_data, val, loop, dataclasses.replace(s, rank=0, world=1), ckpt, {"base": path}, "pretrain", os.path.exists(ckpt))
    atomic_save({"config": asdict(cfg), "model": model.state_dict()}, path)
    os.remove(ckpt)


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


def wrap(frozen, job, s, several, val_batches):
    """A fresh copy of the base (when comparing) with the adapter in; what the wrapping itself changed and cost."""
    model = copy.deepcopy(frozen) if several else frozen
    model.eval()
    x = val_batches[0][0][:4].to(s.device)
    with torch.no_grad(), autocast(s.device, s.dtype):
        ref_logits = model(x).float()
    torch.manual_seed(job.signature["seed"])
    sync(s.device)
    t = time.perf_counter()
    adapters = inject(model, job.name, job.targets, job.kwargs)
    sync(s.device)
    info = {"init_seconds": time.perf_counter() - t}  # the adapters' own init: RanLoRA's decompositions dominate it
    with torch.no_grad(), autocast(s.device, s.dtype):
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


def train(model, opt, tokens, val_batches, loop, s, ckpt_path, signature, desc, resume, on_eval=lambda: {}):
    """Train what requires grad in model for loop.steps; with resume, continue the run saved in ckpt_path.
    on_eval() adds its keys to each evaluation's point of the curve."""
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
        if s.rank == 0:
            atomic_save({"signature": signature, "state": asdict(state), "weights": {n: p.detach().cpu() for n, p in live.items()},
                         "opt": opt.state_dict()}, ckpt_path)

    fwd = model
    if s.world > 1:  # gradients of the trainable parameters only: frozen weights are not registered for sync
        fwd = nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if "cuda" in s.device else None)
    if loop.compile:
        fwd = torch.compile(fwd)
    model.train()
    step_fn = engine.Step(fwd, opt, params, s.device, s.dtype, (loop.batch_size // s.world, loop.block_size), loop.cuda_graph and s.world == 1, log)
    bar = tqdm(range(state.step, loop.steps), initial=state.step, total=loop.steps, desc=desc, disable=s.rank != 0, dynamic_ncols=True)
    start = state.step
    with engine.stop_on_signal(log) as stop:
        try:
            for step in bar:
                flag = torch.tensor([float(stop.set)], device=s.device)
                if s.world > 1:  # every process stops at the same step, or the others wait in DDP's all-reduce forever
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                if flag.item():
                    break
                t0 = time.perf_counter()
                x, y = data.get_batch(tokens, step, loop.batch_size, loop.block_size, loop.seed, s.world, s.rank)
                loss = step_fn(x, y, loop.lr * engine.lr_factor(step, loop.steps, loop.warmup, loop.decay), data.step_seed(loop.seed, step, s.rank))
                state.step, step_fn.updating = step + 1, False
                loss_v = loss.item()  # syncs the device, so the step time below is real
                if step > start or state.step == loop.steps:  # each process's first step is warm-up (allocator, kernels)
                    state.train_s += time.perf_counter() - t0
                    state.tokens += x.numel() * s.world
                bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{state.tokens / max(state.train_s, 1e-9):,.0f}")
                if not math.isfinite(loss_v):
                    raise UserError(f"step {step}: the loss is {loss_v}; lower --lr (now {loop.lr:g})")
                if state.step % loop.eval_interval == 0 or state.step == loop.steps:
                    val = evaluate(model, val_batches, s.device, s.dtype) if s.rank == 0 else None
                    state.curve.append({"step": state.step, "train_loss": loss_v, "val_loss": val, **on_eval()})
                    if s.rank == 0:
                        bar.write(f"{desc} step {state.step}: train loss {loss_v:.4f}, val loss {val:.4f}")
                    save()
        except KeyboardInterrupt:  # a second Ctrl-C: stop now; the state is whole unless it came inside opt.step()
            if not step_fn.updating:
                save()
            raise Interrupted(f"stopped during step {state.step + 1}: run the same command again to resume from step {state.step} ({ckpt_path})")
    bar.close()
    if state.step < loop.steps:
        save()
        if s.world > 1:
            torch.distributed.barrier()  # no process exits before rank 0 has saved: torchrun would stop it mid-write
        raise Interrupted(f"interrupted after step {state.step}: run the same command again to resume from {ckpt_path}")
    return state


# ----------------------------------------------------------------------------------------------
# finish: save first; task accuracy, sampling, rank diagnostics, the merge check and the figure after, each failing alone


def finish(model, adapters, job, args, s, prep, metrics):
    """Save the adapter, then the diagnostics; a failure in one is one `error:` line, never the lost adapter."""
    metrics.update({"sample": None, "rank": None, "merge": None, "plot": None, "errors": {}, "finish_s": {}})
    t = time.perf_counter()
    atomic_save({"adapter": job.name, "targets": job.targets, "kwargs": job.kwargs, "base": prep.base_desc, "state": adapt.adapter_state(adapters)},
                os.path.join(job.out, "adapter.pt"))
    if os.path.exists(os.path.join(job.out, "ckpt.pt")):
        os.remove(os.path.join(job.out, "ckpt.pt"))  # the run is complete: adapter.pt holds its result
    atomic_save(metrics, os.path.join(job.out, "metrics.json"))
    metrics["finish_s"]["save"] = time.perf_counter() - t
    # the merge check's held-out sequences, about 2,048 tokens: plenty to see a 1e-4 gap (8 x 1024 took 1 s on a 1B model)
    x, y = (t[: max(1, min(8, 2048 // s.block_size))].to(s.device) for t in prep.val_batches[0])
    steps = {"task": lambda: task_accuracy(model, adapters, prep.tok, prep.problems, s), "sample": lambda: sample(model, adapters, prep.tok, args, s),
             "rank": lambda: diagnostics.rank_report(adapters), "merge": lambda: diagnostics.merge_check(model, adapters, x, y),
             "plot": lambda: plots.plot_adapter(model, adapters, prep.val_batches, job.out, prep.base_desc, metrics["rank"])}
    for what in [w for w in FINISH_STEPS if w not in args.skip and (w != "task" or prep.problems)]:
        t = time.perf_counter()
        try:
            metrics[what] = steps[what]()
        except Exception as e:  # the adapter is saved: say what failed and go on
            metrics["errors"][what] = f"{type(e).__name__}: {e}"
            print(f"error: {job.name}: the {what} step failed after training ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  f"the adapter is saved in {job.out}/adapter.pt", file=sys.stderr)
        sync(s.device)
        metrics["finish_s"][what] = time.perf_counter() - t
    metrics["wall_s"] = time.time() - metrics.pop("t_start")
    if metrics["sample"] is not None:
        atomic_save(metrics["sample"], os.path.join(job.out, "sample.txt"))
    atomic_save(metrics, os.path.join(job.out, "metrics.json"))
    log("\n".join(diagnostics.finish_lines(metrics, job.out, plots.FIGURE, "plot" in args.skip)))
    return metrics


def task_accuracy(model, adapters, tok, problems, s):
    """--task-eval: greedy exact-match accuracy on the task file's problems (task.py), exact merges merged."""
    with adapt.merged(model, adapters):
        return task.accuracy(model, tok, problems, s.device, lambda: autocast(s.device, s.dtype))


@torch.no_grad()
def sample(model, adapters, tok, args, s):
    """A text sample, exact merges merged."""
    model.eval()
    with adapt.merged(model, adapters):
        prompt = torch.tensor([tok.encode(args.prompt, bos=True)], device=s.device)
        torch.manual_seed(args.seed)
        with autocast(s.device, s.dtype):
            ids = generate(model, prompt, args.sample_tokens, stop_id=tok.eos_id)[0].tolist()
    return tok.decode(ids[1:] if tok.bos_id is not None and ids[0] == tok.bos_id else ids)  # without the BOS marker


# ----------------------------------------------------------------------------------------------
# one adapter, start to end; the commands on a saved adapter; main


def run(job, args, s, prep):
    """Wrap, train and finish one adapter; its metrics (rank 0) or None (other processes)."""
    t_start = time.time()
    model, adapters, info = wrap(prep.base, job, s, len(s.names) > 1, prep.val_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    info.update(trainable_params=n_train, total_params=n_total, val_loss_before=prep.val_before, val_loss_at_init=prep.val_before)
    if s.rank == 0:
        if info["init_gap_max_abs_logit_diff"] > 0:  # RanLoRA does not start at the base model: what that costs
            info["val_loss_at_init"] = evaluate(model, prep.val_batches, s.device, s.dtype)
        log(f"{job.name} on {prep.base_desc}: {len(adapters)} modules, {next(iter(adapters.values())).extra_repr()}")
        log(f"trainable params {n_train:,} of {n_total:,} ({100 * n_train / n_total:.3f}%); train {len(prep.train_data):,} / val "
            f"{sum(x.numel() for x, _ in prep.val_batches):,} tokens; adapter init {info['init_seconds']:.2f} s; init gap max |dlogits| "
            f"{info['init_gap_max_abs_logit_diff']:.3g}; val loss {prep.val_before:.4f} before, {info['val_loss_at_init']:.4f} at init")
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)
    loop = Loop(args.steps, job.lr, s.batch_size, s.block_size, args.seed, s.eval_interval, args.compile, *job.schedule,
                args.cuda_graph and s.device.startswith("cuda"))
    state = train(model, opt, prep.train_data, prep.val_batches, loop, s, os.path.join(job.out, "ckpt.pt"), job.signature, job.name, job.resume,
                  on_eval=lambda: diagnostics.transfer_point(adapters))
    if s.rank != 0:
        return None
    metrics = {"adapter": job.name, "targets": job.targets, "kwargs": job.kwargs, "base": prep.base_desc, **info, "t_start": t_start,
               "schedule": {"warmup": job.schedule[0], "decay": job.schedule[1]}, "steps": args.steps, "lr": job.lr,
               "val_loss_after": state.curve[-1]["val_loss"], "tokens_per_s": state.tokens / max(state.train_s, 1e-9), "curve": state.curve,
               **({"task_file": args.task_eval, "task_before": prep.task_before, "task": None} if prep.problems else {})}
    return finish(model, adapters, job, args, s, prep, metrics)


def use_saved_adapter(args, s):
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
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}: {e}")
    tok = (args.generate or args.plot) and tokenizer(args)
    if args.generate and not tok.encode(args.prompt, bos=True):
        raise UserError(f"--prompt {args.prompt!r}: must give at least one token")
    if ckpt["base"] != base_desc:  # another base, or the same one by another path: say so, the shapes fit
        log(f"note: {path} was trained on {ckpt['base']}, this is {base_desc}")
    if note:
        log(note)
    s = dataclasses.replace(s, dtype="float32") if args.export else s  # merged from the checkpoint's exact values, rounded once to its dtype
    model = load_base(args, s).requires_grad_(False)
    adapters, _ = load_adapter(model, path)
    if args.rank_report:
        log("\n".join(diagnostics.rank_lines(diagnostics.rank_report(adapters), f"{ckpt['adapter']} ({path})")))
    elif args.plot:  # the activations shown: the validation batches of training
        batches = data.eval_batches(read_data(args, s, tok)[1], args.eval_iters, s.batch_size, s.block_size)
        log(f"saved {plots.plot_adapter(model, adapters, batches, os.path.dirname(os.path.abspath(path)), ckpt['base'])}")
    elif args.generate:
        print(sample(model, adapters, tok, args, s))
    else:
        log(f"saved {args.export[1]}: {', '.join(export.export(adapters, args.init_from, args.export[1]))}")


def compare(results, args):
    """One table (also in compare.json) and one figure for several methods trained alike."""
    lines = diagnostics.compare_table(results)
    log("\n" + "\n".join(lines))
    atomic_save({"steps": args.steps, "seed": args.seed, "data": args.data, "table": lines[:2 + len(results)], "methods": results},
                os.path.join(args.out_dir, "compare.json"))  # the table: its head and rows, without the notes
    png = os.path.join(args.out_dir, "compare.png")
    log(f"saved {args.out_dir}/compare.json" + (f", {png}" if plots.plot_compare(results, png) else " (pip install matplotlib for compare.png)"))


def main(argv=None, env=os.environ):
    locks = contextlib.ExitStack()  # the output folders this run owns (claim), released when it ends
    try:
        args = parse_args(argv)
        s = setup(args, env)
        if s.distributed:  # under torchrun: one process per device, NCCL on CUDA, gloo on the CPU
            if s.device.startswith("cuda"):
                torch.cuda.set_device(s.device)
            torch.distributed.init_process_group("nccl" if s.device.startswith("cuda") else "gloo")
        if args.rank_report or args.plot or args.generate or args.export:
            use_saved_adapter(args, s)
            return 0
        prep = prepare(args, s, locks)
        results = {job.name: run(job, args, s, prep) for job in prep.jobs}
        if s.rank != 0:
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
        locks.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
