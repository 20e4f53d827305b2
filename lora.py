"""LoRA: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu, Shen, Wallis, Allen-Zhu, Li,
Wang, Wang and Chen, 2021; arXiv:2106.09685).

The baseline every nonlinear variant in this repository is compared against.
A frozen linear layer W0 gets a trainable low-rank update:

    h = W0 x + (alpha / r) * B A dropout(x)              (Eq. 3, scaled as in §4.1)

Scale: alpha is a constant in r (§4.1: "we simply set α to the first r we try and do not tune it"),
so scale = alpha / r falls as r grows: alpha = 16 gives 2 at r = 8 and 1 at r = 16. The value 16 is not
§4.1's (that would be alpha = the first r, scale 1): 16 with r = 8 is the LLM-Adapters convention (its
finetune.py defaults, the code GenLoRA builds on); HF PEFT's own LoraConfig default is alpha = 8.
r may exceed min(in, out), as in HF PEFT: the defaults fit any layer, and rank(dW) <= min(r, in, out).

A (r x in) starts Kaiming-uniform, B (out x r) starts at zero, so the wrapped
layer equals the base layer at initialization. The update lives in weight space,
dW = (alpha / r) * B A, so it merges exactly into W0 for inference.

This file imports only torch and can be copied alone into another project.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc) is a linear layer whose weight is stored transposed, (in, out)
CONV1D_HINT = ("; a transformers Conv1D (GPT-2) is the linear map x @ conv.weight + conv.bias: convert it exactly, then wrap: "
               "lin = nn.Linear(*conv.weight.shape); lin.weight.data = conv.weight.T.contiguous(); lin.bias.data = conv.bias")


class LoRALinear(nn.Module):
    exact_merge = True  # merged() reproduces forward() for every input

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear: base must be a torch.nn.Linear, got {type(base).__module__}.{type(base).__name__}"
                            + CONV1D_HINT * (type(base).__name__ == "Conv1D"))
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r={r!r}: the rank must be an integer >= 1")
        if alpha == 0:  # scale 0: the update, and every adapter gradient, would be 0
            raise ValueError("alpha=0: scale = alpha / r = 0, so the adapter would train nothing; use alpha > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: must be in [0, 1)")
        self.base = base.requires_grad_(False)  # W0 (and its bias) stay frozen
        self.r, self.alpha, self.scale = r, alpha, alpha / r  # §4.1: alpha constant in r (16: LLM-Adapters' value)
        # adapter parameters live in float32 whatever the base dtype: Adam on bf16 factors loses updates
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear and HF PEFT
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        # x -> A -> B: two thin matmuls, the (out x in) update is never built. They run in the activations'
        # dtype, the float32 factors cast down as autocast would: a float32 copy of x per adapter cost more than
        # LoRA itself (bench.py, bf16 LLaMA-1B: 448 -> 316 ms/step). The second matmul adds into W0 x in place,
        # in its own epilogue (addmm_, beta = 1, alpha = scale): no update-sized tensor, no separate add, no copy
        # (W0 x is a fresh tensor that the base layer's backward does not need)
        x2 = x.reshape(-1, x.shape[-1])
        h = self.base(x2)
        h.addmm_(F.linear(self.dropout(x2), self.A.to(h.dtype)), self.B.to(h.dtype).T, alpha=self.scale)
        return h.view(*x.shape[:-1], -1)

    def delta_weight(self) -> torch.Tensor:
        with torch.autocast(self.A.device.type, enabled=False):  # float32 also when called under autocast
            return self.scale * (self.B @ self.A)  # dW = (alpha / r) B A, float32

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new nn.Linear holding W0 + dW (cast once to the base dtype); the original is untouched."""
        w0 = self.base.weight
        out = nn.Linear(w0.shape[1], w0.shape[0], bias=self.base.bias is not None, device=w0.device, dtype=w0.dtype)
        out.weight.copy_((w0.float() + self.delta_weight()).to(w0.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out.requires_grad_(False)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}"
