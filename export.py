"""A trained adapter outside this repo: the merged HF directory, the PEFT format.

    python train.py --init-from BASE --export out/lora/adapter.pt merged/    # train.py loads BASE and the adapter, then:

export() writes a HF LLaMA directory that transformers (or anything else that reads HF checkpoints) loads with no
code from here: BASE's config.json and tokenizer files, and BASE's tensors under their own names and dtypes, where
each adapted layer's weight is replaced by merged() (W0 + dW in float32, cast once to the checkpoint's dtype) and
every other tensor is copied bit for bit. For LoRA it also writes OUT_DIR/peft/: the adapter alone, in HF PEFT's
format, for PeftModel.from_pretrained(base, OUT_DIR/peft). The merge check of every training run is what makes
this exact; check() refuses, before the base loads, what it could not make exact.
"""
import json
import os
import shutil
from pathlib import Path

import torch.nn as nn

import adapt
import checkpoints
from lora import LoRALinear

# copied from BASE where present: what transformers' tokenizers and generate() read next to the weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json")


def check(adapters, base_dir, out_dir, adapter_pt, allow_approximate=False):
    """Every reason not to export, from the adapters alone (they may sit on the meta device): a ValueError saying
    it in one line. Returns a note when allow_approximate lets an approximate merge through, else None."""
    if base_dir is None:
        raise ValueError("the built-in GPT is not a HF architecture, nothing outside this repo would load it: "
                         "export a LLaMA adapter (--init-from DIR), or try this one with --generate")
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        # a Meta .pth base is refused, not converted: transformers' convert_llama_weights_to_hf.py does that, tokenizer included
        raise ValueError(f"{base_dir} is a Meta checkpoint (params.json + consolidated.00.pth): convert it to a HF directory "
                         "with transformers' convert_llama_weights_to_hf.py, then export against that")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir} exists and is not an empty directory: choose a new one")
    inexact = [a for a in adapters.values() if not a.exact_merge]
    if not inexact:
        return None
    a = inexact[0]
    try:
        a.delta_weight()
    except NotImplementedError as e:  # the adapter contract's "no weight-space form": nothing to merge
        raise ValueError(f"{e}; try this adapter with --generate") from None
    except RuntimeError:  # the update exists, but its math does not run on the meta device (autocast has no meta dtype)
        pass
    what = (f"{type(a).__name__} ({a.extra_repr()}) has no exact weight-space update: merged() approximates the forward "
            f"it was trained with ({measured_gap(adapter_pt)})")
    if not allow_approximate:
        raise ValueError(f"{what}; pass --allow-approximate to export it anyway, or try it unmerged with --generate")
    return f"note: {what}"


def measured_gap(adapter_pt):
    """The merge check's result in the metrics.json that train.py wrote next to adapter_pt, in words."""
    try:
        m = json.loads((Path(adapter_pt).parent / "metrics.json").read_text())["merge"]
        return (f"the merge check after training measured max |dlogits| {m['max_abs_logit_diff']:.3g} (relative {m['relative_diff']:.2g}), "
                f"loss {m['val_loss_unmerged']:.4f} unmerged vs {m['val_loss_merged']:.4f} merged on {m['tokens']} held-out tokens")
    except (OSError, ValueError, KeyError, TypeError):  # no metrics.json, or no merge result in it
        return "the gap was not measured: no merge result in a metrics.json next to the adapter"


def export(adapters, base_dir, out_dir):
    """Write out_dir from the HF directory base_dir and the adapters, loaded on that base (in float32, so that
    merged() rounds once, to the checkpoint's dtype). Returns the files written. Everything goes to a temporary
    directory next to out_dir, renamed at the end: a failure leaves nothing half-written."""
    base, out = Path(base_dir), Path(out_dir).resolve()  # resolved: a name to put the temporary directory next to
    raw = checkpoints.read_hf_weights(base)  # mapped from the files: each tensor is read when it is written
    hf_name = {n.removeprefix("model."): n for n in raw}  # our module names are HF's without the "model." prefix
    tensors = dict(raw)
    for name, a in adapters.items():  # only the adapted weights change; biases, norms, embeddings stay the base's bytes
        key = hf_name[f"{name}.weight"]
        tensors[key] = adapt.merged_layer(a).weight.detach().to(device="cpu", dtype=raw[key].dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = checkpoints.write_hf_weights(tmp, tensors)  # sharded past checkpoints.SHARD_BYTES
        for f in ("config.json", *TOKENIZER_FILES):  # the base's config, its dtype included: the tensors keep it
            if (base / f).is_file():
                shutil.copyfile(base / f, tmp / f)
                files.append(f)
        if all(isinstance(a, LoRALinear) for a in adapters.values()):
            (tmp / "peft").mkdir()
            config, lora = peft_lora(adapters, hf_name, base)
            (tmp / "peft" / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            checkpoints.write_safetensors(tmp / "peft" / "adapter_model.safetensors", lora, metadata={"format": "pt"})
            files += ["peft/adapter_config.json", "peft/adapter_model.safetensors"]
        if out.exists():
            out.rmdir()  # empty: check() refused any other
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def peft_lora(adapters, hf_name, base):
    """LoRA as HF PEFT saves it: adapter_config.json (PEFT's scale is lora_alpha / r, ours alpha / r) and the
    tensors under PEFT's names (its wrapper's prefix, the HF module, lora_A / lora_B; the adapter name "default"
    is left out on disk). One r and alpha for every layer, as train.py trains them."""
    a = next(iter(adapters.values()))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base.resolve()), "r": a.r,
              "lora_alpha": a.alpha, "lora_dropout": a.dropout.p if isinstance(a.dropout, nn.Dropout) else 0.0,
              "target_modules": sorted({n.rpartition(".")[2] for n in adapters}), "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "inference_mode": True}
    tensors = {}
    for name, a in adapters.items():
        module = "base_model.model." + hf_name[f"{name}.weight"].removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a.A.detach().cpu(), a.B.detach().cpu()
    return config, tensors
