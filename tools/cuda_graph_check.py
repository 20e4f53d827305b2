"""Dev-only, on a CUDA GPU: does train.py's captured step (one CUDA graph per step) train as the eager step does,
and does an interrupted graphed run resume bit for bit? CI has no GPU; this is the check for the real thing.

    python tools/cuda_graph_check.py [--init-from DIR] [--steps 30] [--adapters lora,genlora,...]

Without --init-from it writes a small random LLaMA (tools/random_llama.py --tiny) and uses it. For every adapter:
train.py eager (--no-cuda-graph) and graphed, same seed, with adapter dropout 0.05 (so the generator state matters):
the val loss of each and the largest difference between their trained adapter weights. Then one graphed run
interrupted after step 12 (as a second Ctrl-C would) and resumed, against the uninterrupted graphed run.
"""
import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import config  # noqa: E402
import train  # noqa: E402
from random_llama import main as random_llama  # noqa: E402


def weights(out, name):
    return torch.load(os.path.join(out, name, "adapter.pt"))["state"]


def metrics(out, name):
    with open(os.path.join(out, name, "metrics.json")) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init-from")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--adapters", default=",".join(config.ADAPTERS))
    a = p.parse_args()
    tmp = tempfile.mkdtemp()
    base = a.init_from or os.path.join(tmp, "llama")
    if not a.init_from:
        random_llama(base, tiny=True)
    common = ["--init-from", base, "--steps", str(a.steps), "--eval-interval", str(a.steps), "--dropout", "0.05", "--sample-tokens", "8",
              "--batch-size", str(a.batch_size), "--block-size", str(a.block_size)]
    ms = lambda m: 1e3 * a.batch_size * a.block_size / m["tokens_per_s"]  # the mean step, without the first (warm-up, capture)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {a.steps} steps on {base}")
    print("| adapter | val eager | val graphed | max abs diff of the trained weights | bit-identical | ms/step eager | graphed | speed-up |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for name in a.adapters.split(","):
        outs = {m: os.path.join(tmp, m) for m in ("eager", "graph")}
        assert train.main([*common, "--adapter", name, "--out-dir", outs["eager"], "--no-cuda-graph"]) == 0
        assert train.main([*common, "--adapter", name, "--out-dir", outs["graph"]]) == 0
        we, wg = weights(outs["eager"], name), weights(outs["graph"], name)
        diff = max((we[k].float() - wg[k].float()).abs().max().item() for k in we)
        me, mg = metrics(outs["eager"], name), metrics(outs["graph"], name)
        print(f"| {name} | {me['val_loss_after']:.6f} | {mg['val_loss_after']:.6f} | {diff:.3g} | {all(torch.equal(we[k], wg[k]) for k in we)} | "
              f"{ms(me):.1f} | {ms(mg):.1f} | {ms(me) / ms(mg):.2f}x |", flush=True)
    name, out = a.adapters.split(",")[0], os.path.join(tmp, "resumed")
    real = data.get_batch

    def interrupted(tokens, step, *args, **kw):
        if step == 12:
            raise KeyboardInterrupt  # a second Ctrl-C between steps: the checkpoint holds 12 whole steps
        return real(tokens, step, *args, **kw)

    data.get_batch = interrupted
    assert train.main([*common, "--adapter", name, "--out-dir", out]) == 130
    data.get_batch = real
    assert train.main([*common, "--adapter", name, "--out-dir", out]) == 0
    wr, wg = weights(out, name), weights(os.path.join(tmp, "graph"), name)
    print(f"{name}, graphed, interrupted after step 12 and resumed: bit-identical to the uninterrupted graphed run: "
          f"{all(torch.equal(wr[k], wg[k]) for k in wr)}")


if __name__ == "__main__":
    main()
