"""What each adapter costs: one training step against plain LoRA and against the frozen model.

    python bench.py --preset cpu                    # built-in GPT (GPTConfig defaults), block 128, batch 32
    python bench.py --preset gpu --out bench.json   # LLaMA-3.2-1B shape, random weights, bf16, 16 x 1024 tokens

For every variant, one training step is timed after warm-up, CUDA events on a GPU and perf_counter
on the CPU, and the median of many is kept: engine.Step, the step train.py runs (forward under
autocast, the loss in float32, backward, gradient-norm clip, AdamW; --cuda-graph: captured once and
replayed, as train.py does on CUDA). The
variants take turns within each repetition (the order rotates), so clock and thermal drift hit
all of them alike. Variants:
  floor    the frozen model with no adapter. Nothing trains, so to keep backward meaningful the
           embedding output is made a leaf that requires grad: backward then runs through every
           layer (activation gradients only, no weight gradients, no optimizer step).
  lora, genlora, lrlora, aurora, ranlora   each adapter on every projection (q,k,v,o,gate,up,down)
           (with train.py's defaults for it, config.ADAPTERS), AdamW on the adapter parameters only.
  hf_floor, peft   (GPU preset, if transformers and peft import) transformers.LlamaForCausalLM of the
           same shape, frozen as above, and with HF PEFT's LoRA (same r, alpha, targets).
Peak memory per variant is what the variant alone would hold: the bytes it keeps resident (weights,
buffers, adapter parameters, optimizer state) plus the rise of torch.cuda.max_memory_allocated over
one step. On the CPU torch keeps no allocation counter: there the second term is the bytes saved
for backward (unique storages through saved_tensors_hooks), a lower bound that ignores transients.
Also measured: merged-model inference tokens/s against the base model, RanLoRA's init (its SVDs)
for the whole model, and LLaMA checkpoint loading (nanogpt_model.load_llama) against reading the files.
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn

import adapt
import config
import engine
from engine import sync
from nanogpt_model import GPT, GPTConfig, LLaMA, LLaMAConfig, load_llama

ADAPTERS = ("lora", "genlora", "lrlora", "aurora", "ranlora")
TARGETS = list(adapt.TARGETS)  # every projection; the built-in GPT has no gate: inject says so
PRESETS = {
    # name: model, batch, block, dtype, ranks, repetitions, warm-up steps
    "tiny": dict(model="gpt", gpt=dict(n_layer=2, n_head=2, n_embd=32, block_size=32), batch=4, block=32,
                 dtype="float32", reps=3, warmup=1, ckpt=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256)),
    "cpu": dict(model="gpt", gpt={}, batch=32, block=128, dtype="float32", reps=15, warmup=2,
                ckpt=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=32000)),
    "gpu": dict(model="llama", llama={}, batch=16, block=1024, dtype="bfloat16", reps=10, warmup=2, ckpt={}),
    # SmolLM2-135M's shape (576 wide, 30 layers) at the README's SmolLM2 batch: small layers, where launches dominate
    "gpu-small": dict(model="llama", llama=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
                      batch=8, block=256, dtype="bfloat16", reps=10, warmup=2, ckpt={}),
    # the GPU preset's code path at toy size, for checking it anywhere
    "tiny-llama": dict(model="llama", llama=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, vocab_size=256), batch=2, block=32, dtype="float32",
                       reps=3, warmup=1, ckpt=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)),
}
RANKS = {"lora": 8, "genlora": 8, "lrlora": 8, "aurora": 2, "ranlora": 2}  # the settings; alpha: class defaults
SETTINGS = {"aurora_static": ("aurora", {"mode": "static"})}  # variants that are an adapter with other settings (AuroRA-S)
LR = 1e-5  # the steps' learning rate: small, so that hundreds of timed steps leave the weights near where they began


T0 = time.perf_counter()


def progress(msg):
    """What bench.py is doing, as it does it (stderr; a full GPU run takes minutes)."""
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def resident_storages(model, opt=None):
    """{storage: bytes} of what a variant keeps between steps: parameters, buffers, optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    if opt is not None:
        tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return seen


@contextlib.contextmanager
def saved_storages(seen):
    """Collects {storage: bytes} of what autograd saves for backward (the CPU's stand-in for peak activations)."""

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


class Variant:
    """One model to time: its trainable parameters, its optimizer, and its training step (engine.Step, eager)."""

    def __init__(self, name, model, dtype, batch_shape, logits_of=None, adapters=None, embedding=None):
        self.name, self.model, self.adapters, self.dtype, self.batch_shape = name, model, adapters or {}, dtype, batch_shape
        self.fwd = (lambda x: logits_of(model, x)) if logits_of else model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.device = str(next(model.parameters()).device)
        self.opt = torch.optim.AdamW(self.params, lr=LR) if self.params else None  # None: the floor trains nothing
        self.step = self.new_step(cuda_graph=False)
        if embedding is not None:  # the floor: make the embedding output a leaf that needs grad
            embedding.register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
        self.times, self.peak, self.first_s = [], None, None
        self.graph_times, self.graph_error = [], None

    def new_step(self, cuda_graph, note=print):
        return engine.Step(self.fwd, self.opt, self.params, self.device, self.dtype, self.batch_shape, cuda_graph, note)

    def run(self, x, y):
        return self.step(x, y, LR, 0)


def timed(fn, device):
    """Seconds one call of fn takes: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_peak(v, x, y, device):
    """Bytes the variant alone would hold at the peak of one step (see the module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        v.run(x, y)
        sync(device)
        return sum(resident_storages(v.model, v.opt).values()) + torch.cuda.max_memory_allocated(device) - before
    saved = {}
    with saved_storages(saved):  # what forward saves (backward saves nothing: no double backward)
        v.run(x, y)
    resident = resident_storages(v.model, v.opt)  # after the step: AdamW's state exists
    return sum(resident.values()) + sum(b for s, b in saved.items() if s not in resident)


def build_base(cfg, device, dtype):
    """The random-weights base model; LLaMA weights drawn N(0, 0.02) as GPT-2/LLaMA initializers do."""
    torch.manual_seed(0)
    if cfg["model"] == "gpt":
        model = GPT(GPTConfig(**{**cfg["gpt"], "block_size": cfg["block"]}))
    else:
        model = LLaMA(LLaMAConfig(**cfg["llama"]))  # defaults: LLaMA-3.2-1B (hidden 2048, 16 layers, 32/8 heads, 8192, tied)
        for p in model.parameters():
            nn.init.normal_(p, 0.0, 0.02) if p.ndim == 2 else nn.init.ones_(p)
    return model.to(device=device, dtype=dtype).requires_grad_(False)


def share_copy(model):
    """A structural copy of the model whose frozen tensors are the original's (no second copy of the weights)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def embedding_of(model):
    return model.wte if isinstance(model, GPT) else model.embed_tokens


def hf_variants(base, device, dtype, batch_shape, targets, r, alpha):
    """transformers.LlamaForCausalLM of the base's shape: frozen (hf_floor) and with HF PEFT's LoRA (peft)."""
    out, notes = [], []
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        return out, [f"hf_floor/peft skipped: {e}"]
    c = base.config
    hcfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                       num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True,
                       max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta, attn_implementation="sdpa")
    with torch.device(device):
        hf = LlamaForCausalLM(hcfg).to(dtype)
    hf.requires_grad_(False)
    logits = lambda m, x: m(input_ids=x, use_cache=False).logits
    missing, unexpected = hf.load_state_dict({"model." + k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head: tied
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    floor = share_copy(hf)  # before PEFT wraps hf in place
    kw = dict(dtype=str(dtype).removeprefix("torch."), batch_shape=batch_shape, logits_of=logits)
    out.append(Variant("hf_floor", floor, embedding=floor.model.embed_tokens, **kw))
    try:
        import peft
        lcfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=[f"{t}_proj" for t in targets])
        out.append(Variant("peft", peft.get_peft_model(hf, lcfg), **kw))
        notes.append(f"transformers {transformers.__version__}, peft {peft.__version__} (adapter weights "
                     f"{next(p for p in out[-1].model.parameters() if p.requires_grad).dtype})")
    except ImportError as e:
        notes.append(f"peft skipped: {e}")
    return out, notes


def bench_steps(variants, x, y, device, reps, warmup):
    for v in variants:  # warm-up: allocator, cuBLAS handles, torch.compile
        progress(f"warm-up and peak memory: {v.name}")
        for i in range(warmup):
            t = time.perf_counter()
            v.run(x, y)
            sync(device)
            if i == 0:  # with --compile: the first compile (of this variant's graphs) is in it
                v.first_s = time.perf_counter() - t
    sync(device)
    for v in variants:
        v.peak = measure_peak(v, x, y, device)
    for i in range(reps):  # interleaved, the order rotating each repetition so drift cancels
        progress(f"timing: repetition {i + 1} of {reps}, {len(variants)} variants")
        for v in variants[i % len(variants):] + variants[: i % len(variants)]:
            v.times.append(timed(lambda: v.run(x, y), device))


def bench_graphs(variants, x, y, device, reps):
    """Each variant's step captured as one CUDA graph (engine.Step with cuda_graph, as train.py runs it), then its
    steps timed (the batch copied in, the lr filled, one replay). A graph keeps its activations' memory for good, so
    the variants take turns whole (one graph alive at a time: the 1B shape holds ~50 GiB a graph), not interleaved as
    the eager steps are. A variant that cannot be captured keeps the reason."""
    for v in variants:
        progress(f"the step as one CUDA graph: {v.name}, {reps} replays")
        notes = []
        step = v.new_step(cuda_graph=True, note=notes.append)
        step(x, y, LR, 0)  # captures (after an undone warm-up step), then replays once
        if step.graph is None:
            v.graph_error = notes[0] if notes else "not captured"
            continue
        v.graph_times = [timed(lambda: step(x, y, LR, 0), device) for _ in range(reps)]
        step = None  # its graph's memory freed before the next variant's capture
        for p in v.params:
            p.grad = None
        torch.cuda.empty_cache()


@torch.no_grad()
def bench_inference(models, x, device, reps):
    """Median seconds of one forward pass (eval, no grad) for each model, interleaved."""
    times = {n: [] for n in models}
    for m in models.values():
        m.eval()(x)
    for i in range(reps):
        for n, m in models.items():
            times[n].append(timed(lambda: m(x), device))
    return {n: statistics.median(t) for n, t in times.items()}


def merged_copy(v):
    """The variant's model with every adapter replaced by its merged() Linear; None if it has no merge."""
    try:
        merged = {n: adapt.merged_layer(a) for n, a in v.adapters.items()}
    except NotImplementedError as e:
        return None, str(e).split(":")[0]
    model = share_copy(v.model)
    adapt.put(model, merged)
    return model, None


def bench_checkpoint(cfg, device, dtype, tmp):
    """Write a random LLaMA checkpoint (HF layout, safetensors) and time load_llama against reading its bytes."""
    from safetensors.torch import save_file
    lcfg = LLaMAConfig(**cfg["ckpt"])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LLaMA(lcfg).to(dtype)
    state = {"model." + k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    hf = {"model_type": "llama", "vocab_size": lcfg.vocab_size, "hidden_size": lcfg.hidden_size,
          "intermediate_size": lcfg.intermediate_size, "num_hidden_layers": lcfg.num_hidden_layers,
          "num_attention_heads": lcfg.num_attention_heads, "num_key_value_heads": lcfg.num_key_value_heads,
          "rms_norm_eps": lcfg.rms_norm_eps, "rope_theta": lcfg.rope_theta, "tie_word_embeddings": True,
          "max_position_embeddings": lcfg.max_position_embeddings, "hidden_act": "silu"}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f)
    path = os.path.join(tmp, "model.safetensors")
    save_file(state, path, metadata={"format": "pt"})  # as transformers writes it
    del model, state
    nbytes = os.path.getsize(path)
    buf = bytearray(nbytes)
    reads, loads = [], []
    for _ in range(3):  # the page cache is warm after the first write: both sides read from memory
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            f.readinto(buf)
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        m = load_llama(tmp, device=device, dtype=dtype)
        for p in m.parameters():  # on the CPU the tensors map the file lazily: touch every byte
            p.sum()
        sync(device)
        loads.append(time.perf_counter() - t)
        del m
    return {"bytes": nbytes, "config": cfg["ckpt"] or "LLaMA-3.2-1B", "read_s": min(reads), "load_s": min(loads),
            "load_vs_read": min(loads) / min(reads), "device": str(device)}


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--device", default=None, help="default: cuda for the gpu presets, else cpu")
    p.add_argument("--variants", default="floor," + ",".join(ADAPTERS) + ",aurora_static,hf_floor,peft")
    p.add_argument("--reps", type=int, help="timed steps per variant (default: the preset's)")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block of every model")
    p.add_argument("--cuda-graph", action="store_true", help="also time each variant's step captured as one CUDA graph (as train.py runs it)")
    p.add_argument("--profile", metavar="FILE", help="write a torch.profiler table of one step per variant here")
    p.add_argument("--skip", default="", help="comma list of extras to skip: inference,svd,checkpoint")
    p.add_argument("--out", metavar="JSON", help="write the results here")
    args = p.parse_args(argv)
    cfg = PRESETS[args.preset]
    device = torch.device(args.device or ("cuda" if args.preset.startswith("gpu") else "cpu"))
    dtype, reps = getattr(torch, cfg["dtype"]), args.reps or cfg["reps"]
    wanted, skip = args.variants.split(","), set(args.skip.split(","))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 stays float32
    t_start = time.perf_counter()

    progress(f"building the {args.preset} preset's base model on {device}")
    base = build_base(cfg, device, dtype)
    shape = (f"GPT {base.config.n_layer}x{base.config.n_embd}" if cfg["model"] == "gpt" else
             f"LLaMA ({base.config.num_hidden_layers} layers, hidden {base.config.hidden_size}{', the 3.2-1B shape' if not cfg['llama'] else ''})")
    g = torch.Generator().manual_seed(0)
    V = base.config.vocab_size
    x = torch.randint(V, (cfg["batch"], cfg["block"]), generator=g).to(device)
    y = torch.randint(V, (cfg["batch"], cfg["block"]), generator=g).to(device)
    notes, results = [], {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                          f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__, "model": shape,
                          "dtype": cfg["dtype"], "tokens_per_step": x.numel(), "targets": TARGETS, "ranks": RANKS,
                          "compile": args.compile, "reps": reps}

    variants = []
    if "floor" in wanted:
        m = share_copy(base)
        variants.append(Variant("floor", m, cfg["dtype"], x.shape, embedding=embedding_of(m)))
    for name in [n for n in wanted if n in config.ADAPTERS or n in SETTINGS]:
        progress(f"wrapping the base with {name}")
        adapter, kwargs = SETTINGS.get(name, (name, {}))
        m = share_copy(base)
        torch.manual_seed(0)
        sync(device)
        t = time.perf_counter()
        adapters = adapt.inject(m, config.adapter_class(adapter), TARGETS, {**config.ADAPTERS[adapter].kwargs, "r": RANKS[adapter], **kwargs})
        sync(device)
        if name.startswith("ranlora"):  # every target weight's SVD, as the adapter runs it (on the weight's device)
            results["ranlora_init"] = {"modules": len(adapters), "wall_s": time.perf_counter() - t}
        if name.startswith("lrlora"):  # as after some training: f != 0, and B A spread over a dozen table slots
            for a in adapters.values():
                nn.init.normal_(a.a, 0.0, 0.01)
                nn.init.normal_(a.B, 0.0, 0.01)
        variants.append(Variant(name, m, cfg["dtype"], x.shape, adapters=adapters))
    if cfg["model"] == "llama" and {"hf_floor", "peft"} & set(wanted):
        hv, n = hf_variants(base, device, dtype, x.shape, TARGETS, RANKS["lora"], 16)
        variants += [v for v in hv if v.name in wanted]
        notes += n
    if args.compile:  # regional: each transformer block compiled, one compiled graph serves all (same code, same shapes)
        torch._dynamo.config.recompile_limit = 64  # each variant is another graph of the same Block.forward
        for v in variants:
            for name, mod in v.model.named_modules():
                if name.rpartition(".")[2] == "layers" and isinstance(mod, nn.ModuleList):
                    for layer in mod:
                        layer.compile()
    for v in variants:
        for pm in v.model.parameters():  # no trainable tensor may sit in bf16 (e.g. a tied head)
            assert not pm.requires_grad or pm.dtype == torch.float32, (v.name, pm.dtype)

    bench_steps(variants, x, y, device, reps, cfg["warmup"])
    if args.cuda_graph:
        if device.type != "cuda":
            raise SystemExit("error: --cuda-graph needs a CUDA device")
        bench_graphs(variants, x, y, device, reps)
    results["cuda_graph"] = args.cuda_graph
    by = {v.name: v for v in variants}
    med = {v.name: statistics.median(v.times) for v in variants}
    rows = {}
    for v in variants:
        floor = "hf_floor" if v.name in ("peft", "hf_floor") else "floor"  # HF's rows: vs our LoRA, and vs HF's own floor
        rows[v.name] = {"ms_step": 1e3 * med[v.name], "ms_min": 1e3 * min(v.times), "ms_max": 1e3 * max(v.times),
                        "peak_mem_bytes": v.peak, "trainable_params": v.trainable, "first_step_s": v.first_s,
                        "step_vs_lora": ratio(med[v.name], med.get("lora")),
                        "step_vs_floor": ratio(med[v.name], med.get("floor")),
                        "mem_vs_lora": ratio(v.peak, by["lora"].peak if "lora" in by else None),
                        "mem_vs_floor": ratio(v.peak, by["floor"].peak if "floor" in by else None)}
        if v.name in ("peft", "hf_floor"):
            rows[v.name]["step_vs_hf_floor"] = ratio(med[v.name], med.get("hf_floor"))
        if args.cuda_graph:
            gmed = {u.name: statistics.median(u.graph_times) for u in variants if u.graph_times}
            g = gmed.get(v.name)
            rows[v.name].update(graph_ms_step=g and 1e3 * g, graph_error=v.graph_error, graph_vs_lora=ratio(g, gmed.get("lora")),
                                graph_vs_floor=ratio(g, gmed.get(floor)), eager_vs_graph=ratio(med[v.name], g))
    results["steps"] = rows

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        with open(args.profile, "w") as f:
            for v in variants:
                with profile(activities=acts) as prof:
                    v.run(x, y)
                    sync(device)
                ev = prof.key_averages()
                kernels = sum(e.count for e in ev if e.device_type.name == "CUDA") if device.type == "cuda" else None
                f.write(f"\n===== {v.name}: {1e3 * med[v.name]:.1f} ms/step, device kernels per step: {kernels}\n")
                f.write(ev.table(sort_by=sort, row_limit=25, max_name_column_width=60) + "\n")

    if "inference" not in skip:  # merged models are plain Linears again: they should run as the base does
        progress("inference: merged models against the base")
        for v in variants:
            v.opt = v.step = None  # AdamW's state freed
        models, merge_notes = {"base": base}, {}
        for v in variants:
            if v.adapters:
                mm, why = merged_copy(v)
                if mm is None:
                    merge_notes[v.name] = why
                    models[f"{v.name} (unmerged)"] = v.model
                else:
                    models[f"{v.name} merged"] = mm
        inf = bench_inference(models, x, device, max(3, reps // 2))
        results["inference"] = {n: {"tokens_per_s": x.numel() / s, "vs_base": inf["base"] / s} for n, s in inf.items()}
        results["inference_notes"] = merge_notes
        del models
    if "checkpoint" not in skip:
        progress("checkpoint: load_llama against reading the file")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results["checkpoint"] = bench_checkpoint(cfg, device, dtype, tmp)
            except Exception as e:  # the loader is another file's business: report, do not lose the step table
                notes.append(f"checkpoint bench failed: {type(e).__name__}: {e}")
    results["notes"] = notes
    results["total_s"] = time.perf_counter() - t_start
    print_table(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def print_table(r):
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b and b > 2**30 else (f"{b / 2**20:.1f} MiB" if b else "n/a")
    f2 = lambda v: "—" if v is None else f"{v:.2f}x"
    print(f"\n{r['model']}, {r['dtype']}, {r['tokens_per_step']} tokens/step, {r['device']}, torch {r['torch']}"
          f"{', compiled' if r['compile'] else ''}; median of {r['reps']} interleaved steps")
    print("| variant | trainable | ms/step | vs LoRA | vs floor | peak mem | mem vs LoRA | mem vs floor | first step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, s in r["steps"].items():
        vs_floor = s["step_vs_floor"] if n not in ("peft", "hf_floor") else s.get("step_vs_hf_floor")
        print(f"| {n} | {s['trainable_params']:,} | {s['ms_step']:.1f} | {f2(s['step_vs_lora'])} | {f2(vs_floor)} | "
              f"{gib(s['peak_mem_bytes'])} | {f2(s['mem_vs_lora'])} | {f2(s['mem_vs_floor'])} | {s['first_step_s']:.1f} s |")
    if r.get("cuda_graph"):
        print("\nthe same steps, each captured as one CUDA graph and replayed (median of as many replays, one variant at a time):")
        print("| variant | graphed ms/step | vs LoRA | vs floor | eager / graphed |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for n, s in r["steps"].items():
            if s["graph_ms_step"] is None:
                print(f"| {n} | capture failed: {s['graph_error']} | | | |")
            else:
                print(f"| {n} | {s['graph_ms_step']:.1f} | {f2(s['graph_vs_lora'])} | {f2(s['graph_vs_floor'])} | {f2(s['eager_vs_graph'])} |")
    if "inference" in r:
        print("\ninference (eval, no grad): " + "; ".join(f"{n} {s['tokens_per_s']:,.0f} tok/s ({s['vs_base']:.2f}x)"
                                                        for n, s in r["inference"].items()))
    if "ranlora_init" in r:
        i = r["ranlora_init"]
        print(f"RanLoRA init: {i['modules']} modules, {i['wall_s']:.2f} s (adapt.inject wall, decompositions included)")
    if "checkpoint" in r:
        c = r["checkpoint"]
        print(f"checkpoint: {gib(c['bytes'])}: load_llama to {c['device']} {c['load_s']:.3f} s, "
              f"reading the file {c['read_s']:.3f} s ({c['load_vs_read']:.2f}x)")
    for n in r.get("notes", []):
        print("note:", n)
    print(f"total {r['total_s']:.0f} s")


if __name__ == "__main__":
    main()
