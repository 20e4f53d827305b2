"""Dev-only: how many times does torch.compile (inductor) compile an adapter's fused function when the token count
changes from batch to batch, as with batches padded to their longest sequence? Runs on the CPU (inductor's C++
backend; the layers' fused branch is switched on for the CPU), so it needs a C++ compiler but no GPU.

    python tools/compile_count.py [--lengths 5,6,7,9,12,16,20,33]

For AuroRA (dynamic and static) and RanLoRA: one forward and backward per length; prints the number of graphs dynamo
compiled, the wall time, and the largest difference from the plain path.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import aurora  # noqa: E402
import ranlora  # noqa: E402

LAYERS = {"aurora": lambda: aurora.AuroRALinear(nn.Linear(64, 48)),
          "aurora_static": lambda: aurora.AuroRALinear(nn.Linear(64, 48), mode="static"),
          "ranlora": lambda: ranlora.RanLoRALinear(nn.Linear(64, 48))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="5,6,7,9,12,16,20,33")
    p.add_argument("--static", action="store_true", help="compile with dynamic=False (one graph per shape), to compare")
    args = p.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.static:
        compile_ = torch.compile
        torch.compile = lambda fn, **kw: compile_(fn, **{**kw, "dynamic": False})
    print(f"torch {torch.__version__}, {len(lengths)} token counts {lengths}, batch 2{', dynamic=False' * args.static}")
    for name, make in LAYERS.items():
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        layer = make()
        with torch.no_grad():
            layer.B.normal_()  # away from B = 0, where the adapter adds nothing to compare
        t0, worst = time.perf_counter(), 0.0
        for n in lengths:
            x = torch.randn(2, n, 64)
            type(layer).fused = ("cpu",)
            got = layer(x)
            got.sum().backward()
            type(layer).fused = ("cuda",)
            worst = max(worst, (got - layer(x)).abs().max().item())
        print(f"{name}: {counters['stats']['unique_graphs']} compiled graphs for {len(lengths)} token counts, "
              f"{time.perf_counter() - t0:.1f} s, max |fused - plain| {worst:.1e}")


if __name__ == "__main__":
    main()
