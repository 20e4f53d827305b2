"""LR-LoRA on one large layer (default 8192 x 2048, 16 x 1024 bf16 tokens): forward + backward time against the
frozen layer and LoRA, with B = 0 (every entry of B A in one table slot) and with a trained-like B; and the table
path's accuracy against a float64 direct sum (Eq. 4) on a small layer, on this device.

    python tools/lrlora_layer_bench.py [--out OUT] [--inn IN] [--tokens N] [--copies 1,4096]
"""
import argparse, os, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lrlora
from lrlora import LRLoRALinear, transfer
from lora import LoRALinear

p = argparse.ArgumentParser()
p.add_argument("--out", type=int, default=8192)
p.add_argument("--inn", type=int, default=2048)
p.add_argument("--tokens", type=int, default=16 * 1024)
p.add_argument("--copies", default="1,4096")
p.add_argument("--reps", type=int, default=20)
args = p.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
rel = lambda a, b: ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()

# accuracy: the device's table path (compiled on CUDA) against the float64 direct sum, a moved small layer
torch.manual_seed(0)
layer = LRLoRALinear(nn.Linear(256, 192), r=4).to(dev)
with torch.no_grad():
    for q in (layer.A, layer.B, layer.a, layer.beta):
        q.copy_(0.5 * torch.randn(q.shape))
x = torch.randn(4, 256, device=dev, requires_grad=True)
ps = [x, layer.A, layer.B, layer.a, layer.beta]
t0 = time.perf_counter()
y = layer(x)
gy = torch.randn_like(y)
got = [y] + list(torch.autograd.grad(y, ps, gy))
torch.cuda.synchronize() if dev.type == "cuda" else None
print(f"first call (compiles the passes): {time.perf_counter() - t0:.1f} s")
ref_p = [q.detach().cpu().double().requires_grad_() for q in ps]
xd, A, B, a, beta = ref_p
W = layer.base.weight.detach().cpu().double() + layer.scale * transfer(B @ A, a, F.softplus(beta), layer.g.cpu().double())
yr = F.linear(xd, W, layer.base.bias.detach().cpu().double())
want = [yr] + list(torch.autograd.grad(yr, ref_p, gy.cpu().double()))
print("accuracy vs float64 direct sum (relative):", {n: f"{rel(g, w):.1e}" for n, g, w in zip(["y", "x", "A", "B", "a", "beta"], got, want)})


def timeit(fn, reps):
    for _ in range(3):
        fn()
    if dev.type != "cuda":
        t = time.perf_counter(); [fn() for _ in range(reps)]; return (time.perf_counter() - t) / reps * 1e3
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]


dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
base = nn.Linear(args.inn, args.out, bias=False, device=dev, dtype=dt)
xb = torch.randn(args.tokens, args.inn, device=dev, dtype=dt)
gyb = torch.randn(args.tokens, args.out, device=dev, dtype=dt)


def step(mod, params):
    xx = xb.detach().requires_grad_()
    torch.autograd.backward(mod(xx), gyb)
    for q in params:
        q.grad = None


rows = {"frozen": timeit(lambda: step(base.requires_grad_(False), []), args.reps)}
lo = LoRALinear(base, r=8)
rows["lora"] = timeit(lambda: step(lo, [lo.A, lo.B]), args.reps)
for copies in [int(c) for c in args.copies.split(",")]:
    lrlora.SCATTER_COPIES = copies
    for bname, bstd in (("B=0", 0.0), ("B~N(0,1e-2)", 1e-2), ("B~N(0,0.3)", 0.3)):
        torch.manual_seed(0)
        lr = LRLoRALinear(base, r=8)
        with torch.no_grad():
            lr.a.normal_(0, 0.01)
            lr.B.normal_(0, bstd) if bstd else None
        M = (lr.B @ lr.A).detach()
        T = lrlora._grid(M, F.softplus(lr.beta.detach()))[2]  # the table's point count this layer uses
        rows[f"lrlora copies={copies} {bname} T={T}"] = timeit(lambda: step(lr, [lr.A, lr.B, lr.a, lr.beta]), args.reps)
print(f"one layer {args.out} x {args.inn}, {args.tokens} tokens, {dt}, forward+backward, median of {args.reps}, {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}")
for k, v in rows.items():
    print(f"  {k:45s} {v:8.2f} ms   {v / rows['lora']:5.2f}x LoRA   {v / rows['frozen']:5.2f}x frozen")
