"""Adapters in a model, for any adapter class here (LoRALinear, GenLoRALinear, ...): wrap the layers named
<target>_proj, keep and load the adapters' own weights strictly, swap merged layers in and out (the one place that does).
A problem (a rank that does not fit, a file that does not match) is a ValueError naming it."""
import contextlib
import inspect
import warnings

import torch
import torch.nn as nn

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # module names are <t>_proj, in the built-in GPT and in LLaMA


def inject(model, cls, targets, kwargs):
    """Replace every nn.Linear named <target>_proj by cls(that layer, **kwargs); {dotted name: adapter}."""
    wanted, wrapped = {f"{t}_proj" for t in targets}, {}
    r = kwargs.get("r", inspect.signature(cls.__init__).parameters["r"].default)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in wanted and isinstance(child, nn.Linear):
                where = f"{parent_name}.{child_name} ({child.out_features}x{child.in_features})"
                if isinstance(r, int) and r > min(child.in_features, child.out_features):  # rank(B A) <= min(in, out) anyway
                    raise ValueError(f"{where}: r={r} exceeds min(in, out) = {min(child.in_features, child.out_features)}: a higher rank adds no rank, only cost")
                try:
                    adapter = cls(child, **kwargs)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                setattr(parent, child_name, adapter)
                wrapped[f"{parent_name}.{child_name}"] = adapter
    return wrapped


def adapter_state(adapters, keep_vars=False):
    """Adapter weights only: each adapter's state minus its frozen base layer, under the model's names."""
    return {f"{n}.{k}": v if keep_vars else v.detach().cpu() for n, a in adapters.items() for k, v in a.state_dict(keep_vars=True).items() if not k.startswith("base.")}


def load_strict(live, saved):
    """Copy saved tensors into the model's own (name -> tensor); a missing, unexpected or mis-shaped name is an error naming it."""
    missing, unexpected = sorted(live.keys() - saved.keys()), sorted(saved.keys() - live.keys())
    if missing or unexpected:
        which = f"the model has {missing[0]}, the file does not" if missing else f"the file has {unexpected[0]}, the model does not"
        raise ValueError(f"does not match the model: {which} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for k, t in live.items():
        if saved[k].shape != t.shape:
            raise ValueError(f"does not match the model: {k} is {tuple(saved[k].shape)} in the file, {tuple(t.shape)} in the model")
    with torch.no_grad():
        for k, t in live.items():
            t.copy_(saved[k])


def put(model, modules):
    """Place each module at its dotted name in model (a merged Linear, a base layer, or the adapter back)."""
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


def merged_layer(adapter):
    """adapter.merged(), without the warning an inexact merge gives (AuroRA dynamic): the callers here take the
    approximation on purpose and measure or announce its gap themselves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return adapter.merged()


@contextlib.contextmanager
def merged(model, adapters, exact_only=True):
    """The model with each adapter merged into a plain Linear (exact_only: only those whose merge is exact), the
    adapters put back after. Merged layers run at the base model's speed (LR-LoRA's forward rebuilds its dense
    f(BA) on every call: 200 generated tokens took 44 s on the CPU unmerged). A method with no weight-space merge
    raises NotImplementedError (exact_only=False) before anything is swapped."""
    layers = {n: merged_layer(a) for n, a in adapters.items() if a.exact_merge or not exact_only}
    put(model, layers)
    try:
        yield layers
    finally:
        put(model, {n: adapters[n] for n in layers})
