"""The one training step: what train.py runs and bench.py times. Forward under autocast, the loss in float32,
backward, gradient-norm clip, AdamW; on CUDA with one process the whole step is one captured CUDA graph, replayed
(a small model otherwise waits on Python to launch its thousands of kernels). Also the pieces a step needs around
it: the lr schedule, the device's clock (sync), autocast, the validation loss, atomic saves, a file lock, stopping on
Ctrl-C at a step boundary.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import signal
import threading
import time

import torch
import torch.nn.functional as F

GRAD_CLIP = 1.0  # gradient-norm clip of every run (all four papers' LLM setups)


def lr_factor(step, steps, warmup, decay="cosine"):
    """Linear warm-up over `warmup` steps (the first step already at 1/warmup), then cosine decay to 10% of the peak,
    or linear decay to 0 (HF's get_linear_schedule_with_warmup, the papers' LLM schedule: the last step at 1/(steps - warmup))."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 1.0 - t if decay == "linear" else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def autocast(device, dtype):
    """bf16/fp16 autocast on device; nothing in float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def sync(device):  # the host waits for the device: before reading a clock
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def evaluate(model, batches, device, dtype):
    """The mean float32 cross-entropy over fixed (x, y) batches, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(device, dtype):
            logits = model(x.to(device))
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def optimizer_on_device(opt, device):
    """AdamW as the step reads it: the lr a tensor, set in place before every step, so that a captured graph sees each
    new value. On the CPU a float64 lr (the arithmetic of a Python float). On CUDA the fused kernel, one launch for all
    tensors (torch's capturable multi-tensor path divides tensor by tensor: LoRA's graphed step on SmolLM2's shape
    took 27.7 ms with it, 24.0 ms fused; docs/speed.md), which takes a float32 lr; its step counts on the device."""
    cuda = str(device).startswith("cuda")
    for g in opt.param_groups:  # after any load_state_dict, which brings back the saved group's settings
        g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32 if cuda else torch.float64, device=device)
        g["capturable"] = g["fused"] = cuda  # capturable: a CUDA graph may record the step (fused takes precedence over foreach)
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
    and replayed: one launch instead of thousands. fwd(x) gives the logits; opt None trains nothing (backward only:
    bench.py's frozen floor). A step that cannot be captured runs eagerly, with one note (`note`)."""

    def __init__(self, fwd, opt, params, device, dtype, batch_shape, cuda_graph, note=print):
        self.fwd, self.opt, self.params, self.device, self.dtype, self.note = fwd, opt, params, device, dtype, note
        self.x = torch.zeros(batch_shape, dtype=torch.long, device=device)
        self.y = torch.zeros_like(self.x)
        self.cuda_graph, self.graph, self.updating = cuda_graph, None, False
        if opt is not None:
            optimizer_on_device(opt, device)

    def loss_and_grads(self):
        with autocast(self.device, self.dtype):
            logits = self.fwd(self.x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), self.y.flatten())
        loss.backward()
        return loss

    def update(self):
        if self.opt is not None:
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
        for g in self.opt.param_groups if self.opt is not None else []:
            g["lr"].fill_(lr)
        if self.cuda_graph and self.graph is None:
            try:
                self.graph, self.loss = capture(self.whole, self.params, self.opt)
            except RuntimeError as e:  # e.g. a model that reads a value to the host mid-step: the same step, eagerly
                self.note(f"note: the training step could not be captured as a CUDA graph ({str(e).splitlines()[0][:160]}); running it eagerly")
                self.cuda_graph = False
                self.zero_grad()
        torch.manual_seed(seed)  # dropout's masks: a function of (seed, step), replayed or not (the graph reads this state)
        if self.graph is not None:
            self.updating = True  # the weights and the step count change together
            self.graph.replay()
            return self.loss
        loss = self.loss_and_grads()
        self.updating = True
        self.update()
        self.zero_grad()
        return loss

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def seconds_per_step(model, x, y, device, dtype, n=3):
    """A training step's time on this machine: n steps (Step, eagerly, at lr 0) of a throwaway copy of model (its
    weights untouched), after one untimed warm-up step."""
    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    step = Step(model, torch.optim.AdamW(params, lr=0.0), params, device, dtype, tuple(x.shape), cuda_graph=False)
    for i in range(n + 1):
        if i == 1:
            sync(device)
            t0 = time.perf_counter()
        step(x, y, 0.0, i)
    sync(device)
    return (time.perf_counter() - t0) / n


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written file (.json as JSON, .txt as text),
    and a write that fails (a full disk, Ctrl-C) leaves the old file as it was and no temporary one behind."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if path.endswith((".json", ".txt")):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=1) if path.endswith(".json") else f.write(obj)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: the rename never happened
            os.remove(tmp)


@contextlib.contextmanager
def stop_on_signal(note=print):
    """Ctrl-C (or SIGTERM, from torchrun or a scheduler) asks the loop to stop at the next step boundary, so a
    checkpoint holds exactly the steps completed, wherever in a step the signal came. A second Ctrl-C stops at once."""
    flag = argparse.Namespace(set=False)

    def handle(signum, frame):
        if flag.set:
            raise KeyboardInterrupt
        flag.set = True
        note("stopping after this step (Ctrl-C again to stop at once)")

    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)} if threading.current_thread() is threading.main_thread() else {}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def file_lock(path, waiting=lambda: None):
    """One process at a time inside: an exclusive lock on the file at path (created if need be), waited for, released
    when the block ends or the process dies. waiting() is called once if another process holds it; raising there
    refuses instead of waiting (train.py's output folders). Where the platform has no fcntl (Windows), no lock: two
    processes started together may then both do the work."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # on every platform: a folder that cannot be made fails here
    try:
        import fcntl
    except ImportError:
        yield
        return
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
