"""Dev-only, on a CUDA GPU: do the adapters' fused paths (torch.compile'd, selected on CUDA by each class's `fused`
attribute; LR-LoRA's compiled sinc table and element-wise passes) compute what the plain PyTorch paths compute? CI has no GPU.

    python tools/fused_check.py

For each adapter on SmolLM2-135M's layer shapes (576 -> 576, 576 -> 192, 576 -> 1536, 1536 -> 576), float32, 2048 tokens:
one forward and backward with fused on and with it off, from the same weights and inputs; the largest relative
difference of the output and of every gradient (x and each trainable parameter). Then the same in bfloat16
activations (as bench.py and train.py run), where the two paths may round differently. Exits 1 if a float32
difference passes 1e-5.
"""
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import aurora  # noqa: E402
import genlora  # noqa: E402
import lrlora  # noqa: E402
import ranlora  # noqa: E402

FUSED_LRLORA = lrlora._fused
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
ADAPTERS = {  # name: (class, kwargs, the class (or module) whose `fused` switches the path)
    "genlora": (genlora.GenLoRALinear, {"r": 8}),
    "aurora": (aurora.AuroRALinear, {"r": 2}),
    "aurora_static": (aurora.AuroRALinear, {"r": 2, "mode": "static"}),
    "ranlora": (ranlora.RanLoRALinear, {"r": 2}),
    "lrlora": (lrlora.LRLoRALinear, {"r": 8}),
}


def set_fused(cls, on):
    if cls is lrlora.LRLoRALinear:  # its table and element-wise passes: compiled on CUDA, or all eager
        lrlora._fused = FUSED_LRLORA if on else (lambda fn, device: fn)
    else:
        cls.fused = ("cuda",) if on else ()


def run(layer, x, seed):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator(x.device).manual_seed(seed), device=x.device, dtype=y.dtype)
    y.backward(gy)
    named = [("x", x)] + [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    return [("out", y.detach())] + [(f"d{n}", p.grad) for n, p in named]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main():
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| adapter | shape | dtype | worst output/gradient | rel. difference fused vs plain |")
    print("| --- | --- | --- | --- | ---: |")
    bad = []
    for name, (cls, kw) in ADAPTERS.items():
        for n_in, n_out in SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                torch.manual_seed(0)
                layer = cls(nn.Linear(n_in, n_out, device=dev, dtype=dtype), **kw)
                with torch.no_grad():  # away from the zero inits, as after some training
                    for pn, p in layer.named_parameters():
                        if p.requires_grad and pn in ("B", "z_B", "theta_B", "a"):
                            p.normal_(0.0, 0.01 if name == "lrlora" else 0.5)
                x = torch.randn(2048, n_in, device=dev, dtype=dtype)
                set_fused(cls, False)
                want = run(layer, x, 1)
                set_fused(cls, True)
                got = run(layer, x, 1)
                diffs = [(rel(g, w), n) for (n, g), (_, w) in zip(got, want)]
                worst, what = max(diffs)
                if dtype == torch.float32 and not worst <= 1e-5:
                    bad.append((name, n_in, n_out))
                print(f"| {name} | {n_in} -> {n_out} | {str(dtype)[6:]} | {what} | {worst:.2e} |", flush=True)
    print("fused = plain in float32 (every output and gradient within 1e-5 relative):", not bad, bad or "")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
