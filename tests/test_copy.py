"""Each adapter file copied alone into another project, used as the README's "Using one adapter in your own project"
says, on transformers' LlamaForCausalLM, Qwen2ForCausalLM (biased q, k, v) and GPT2LMHeadModel (Conv1D layers).

The README's two code blocks run as printed: the first (wrap, adapter_weights, merge) verbatim; the second with its
import and its adapter line swapped for the method's, the call taken from the README's "Each method's call". One
subprocess runs the five in turn, each from a folder holding only its file, on tiny random models saved with
save_pretrained and loaded afresh (from_pretrained) wherever the README says load_model().

Run alone: python -m pytest -q tests/test_copy.py (test_all.py runs every topic)."""
import json
import os
import re
import shutil

import pytest
import torch

from conftest import HERE, llama_needs_hf, run_script

COPY_SECTION = "## Using one adapter in your own project"
COPY_ADAPTERS = {"lora": "LoRALinear", "genlora": "GenLoRALinear", "lrlora": "LRLoRALinear", "aurora": "AuroRALinear",
                 "ranlora": "RanLoRALinear"}
COPY_RANK = {"lora": 8, "genlora": 8, "lrlora": 8, "aurora": 2, "ranlora": 2}  # AuroRA's and RanLoRA's papers: 2
COPY_EXACT = {"lora": True, "genlora": True, "lrlora": True, "aurora": False, "ranlora": False}  # at their defaults
# each family's layers to wrap in the float32 checks, how many that makes, and how many the README's default targets
# (q_proj, k_proj, v_proj, c_attn) make in its second block
COPY_FAMILIES = {
    "llama": (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 14, 6),
    "qwen2": (("q_proj", "k_proj", "v_proj"), 6, 6),  # Qwen2's q, k, v have biases
    "gpt2": (("c_attn", "c_proj", "c_fc"), 8, 2),  # Conv1D; c_proj is both the attention's (square) and the MLP's
}


def copy_readme():
    """The README's copy section: its two python blocks and each class's call from "Each method's call"."""
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    assert COPY_SECTION in text, f"README.md has no section {COPY_SECTION!r}"
    section = text.split(COPY_SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, f"the README's copy section has {len(blocks)} python blocks, the test expects 2"
    bullet = re.search(r"^- \*\*Each method's call\*\*:(.*?)(?=^- |\Z)", section, re.S | re.M)
    assert bullet, "the README's copy section has no bullet '- **Each method's call**:'"
    calls = re.findall(r"`((\w+Linear)\(layer[^`]*\))`", bullet.group(1))
    assert sorted(cls for _, cls in calls) == sorted(COPY_ADAPTERS.values()), f"the README's calls: {calls}"
    calls = {cls: call for call, cls in calls}
    return blocks[0], blocks[1], calls


def copy_usage(block, module, cls, call):
    """The README's second block for another adapter: its import and its adapter line, nothing else, swapped."""
    imp = re.search(r"^from (\w+) import (\w+Linear)", block, re.M)
    assert imp, "the README's second block has no `from <file> import <Class>` line"
    line = re.search(rf"^adapter = lambda layer: ({imp.group(2)}\(layer[^)]*\))", block, re.M)
    assert line, "the README's second block has no `adapter = lambda layer: <call>` line"
    block = block.replace(imp.group(0), f"from {module} import {cls}", 1)
    return block.replace(line.group(1), call, 1)


# The subprocess: what a user's project does with one copied file, for each of the five in turn (one process: importing
# transformers costs 1-4 s of CPU a process). Each file sits alone in its own folder, which is the working directory
# and the only one of the repository's on sys.path while it runs; the files imported before it are forgotten, so an
# import of a sibling file would fail. Prints one JSON line per adapter and model family.
COPY_HARNESS = r"""
import importlib, json, os, sys, warnings
import torch
import transformers
RUNS, FAMILIES, MODELS = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]

{block1}

CLASSES = dict(llama="LlamaForCausalLM", qwen2="Qwen2ForCausalLM", gpt2="GPT2LMHeadModel")
ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
logits = lambda model: model(ids).logits.float()
gap = lambda a, b: (a - b).abs().max().item()

def fit(model, steps, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    return losses

for run in RUNS:
    module, folder = run["module"], run["folder"]
    os.chdir(folder)
    sys.path.insert(0, folder)
    for other in RUNS:
        sys.modules.pop(other["module"], None)
    assert os.listdir(".") == [module + ".py"], os.listdir(".")  # the file alone
    cls = getattr(importlib.import_module(module), run["cls"])
    assert os.path.dirname(os.path.abspath(sys.modules[module].__file__)) == folder  # the copy, not the repository's
    adapter = eval("lambda layer: " + run["call"], {{run["cls"]: cls}})  # the README's call for this class
    count = lambda model: sum(isinstance(m, cls) for m in model.modules())
    for family, targets in FAMILIES.items():
        torch.manual_seed(0)
        path = os.path.join(MODELS, family)
        load_model = lambda: getattr(transformers, CLASSES[family]).from_pretrained(path, dtype=torch.float32)
        r = dict(module=module, family=family)
        # float32: init, training, adapter weights saved and loaded into a fresh copy, merge, generate
        ref = logits(load_model().eval())
        model = wrap(load_model(), adapter, targets).eval()
        r["wrapped"], r["init_gap"] = count(model), gap(logits(model), ref)
        r["rank"] = next(m for m in model.modules() if isinstance(m, cls)).r
        r["trainable_float32"] = all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        r["losses"] = fit(model.train(), 8, run["lr"])
        trained = logits(model.eval())
        saved = adapter_weights(model)
        trainable = {{n for n, p in model.named_parameters() if p.requires_grad}}
        r["saved_keys"], r["saved_all_trainable"] = len(saved), set(saved) == trainable
        torch.save(saved, "adapter.pt")
        fresh = wrap(load_model(), adapter, targets).eval()
        missing, unexpected = fresh.load_state_dict(torch.load("adapter.pt"), strict=False)
        os.remove("adapter.pt")
        r["unexpected"] = list(unexpected)  # missing: the frozen base model's weights, none that trains
        r["missing_trainable"] = sorted(set(missing) & {{n for n, p in fresh.named_parameters() if p.requires_grad}})
        r["bases_equal"] = all(torch.equal(a.base.weight, b.base.weight)  # RanLoRA: W_P = W0 - W_R, rebuilt from W0
                               for a, b in zip(model.modules(), fresh.modules()) if isinstance(a, cls))
        r["load_gap"] = gap(logits(fresh), trained)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # merge() never calls an inexact merged() (AuroRA's warns)
            merged = merge(model)
        r["left"], r["merge_gap"], r["scale"] = count(merged), gap(logits(merged), trained), trained.abs().max().item()
        r["generated"] = list(merged.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape)
        # the README's second block as printed (bf16, the default targets); train() is a few AdamW steps, and merge()
        # notes the logits of the loaded model before it merges
        seen = {{}}
        def train(model):
            seen["factors"] = sorted({{str(p.dtype) for p in model.parameters() if p.requires_grad}})
            seen["losses"] = fit(model.train(), 4, run["lr"])
            seen["trained"] = logits(model.eval())
        def noting_merge(model):
            seen["loaded"] = logits(model.eval())
            return merge(model)
        namespace = dict(globals(), load_model=load_model, train=train, merge=noting_merge)
        exec(run["usage"], namespace)
        os.remove("adapter.pt")
        final = namespace["model"]
        r["bf16_factors"], r["bf16_losses"], r["bf16_left"] = seen["factors"], seen["losses"], count(final)
        r["bf16_load_gap"], r["bf16_merge_gap"] = gap(seen["loaded"], seen["trained"]), gap(logits(final), seen["trained"])
        r["bf16_generated"] = list(final.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape)
        # the README's why: cast after wrapping, and the factors are bf16 too
        after = wrap(load_model(), adapter).to(torch.bfloat16)
        r["cast_after_wrap"] = sorted({{str(p.dtype) for p in after.parameters() if p.requires_grad}})
        try:
            wrap(load_model(), adapter, ("no_such_layer",))
            r["nothing_wrapped"] = None
        except ValueError as e:
            r["nothing_wrapped"] = str(e)
        print(json.dumps(r), flush=True)
    sys.path.remove(folder)
"""


def copy_models(folder):
    """Tiny random LLaMA, Qwen2 and GPT-2 (2 layers, width 32, vocab 96, no dropout) saved with save_pretrained, weights
    drawn large enough that the logits vary and every bias matters."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    models = {"llama": LlamaForCausalLM(LlamaConfig(**common)), "qwen2": Qwen2ForCausalLM(Qwen2Config(**common)),
              "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                 bos_token_id=0, eos_token_id=0, pad_token_id=0))}
    torch.manual_seed(0)
    for name, model in models.items():
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.ndim == 2:
                    p.normal_(0, 1.0 if "embed" in pname else 0.3 if pname.startswith("transformer.w") else 0.25)
                elif pname.endswith("bias"):
                    p.normal_(0, 0.2)
        model.save_pretrained(os.path.join(folder, name))
    return folder


@pytest.fixture(scope="module")
def copy_runs(tmp_path_factory):
    """{adapter: {family: what the subprocess measured}}."""
    block1, block2, calls = copy_readme()
    models = copy_models(str(tmp_path_factory.mktemp("copy_models")))
    runs = []
    for module, cls in COPY_ADAPTERS.items():
        folder = str(tmp_path_factory.mktemp(f"copy_{module}"))
        shutil.copy(os.path.join(HERE, f"{module}.py"), folder)
        runs.append(dict(module=module, cls=cls, call=calls[cls], folder=folder, lr=1e-2,
                         usage=copy_usage(block2, module, cls, calls[cls])))
    p = run_script("-c", COPY_HARNESS.format(block1=block1), json.dumps(runs),
                   json.dumps({f: list(t[0]) for f, t in COPY_FAMILIES.items()}), models,
                   cwd=models, env={"PYTHONPATH": None}, timeout=300)  # no file of the repository importable
    assert p.returncode == 0, f"the copied files' run failed:\n{p.stderr[-4000:]}"
    out = {}
    for r in map(json.loads, [line for line in p.stdout.splitlines() if line.startswith("{")]):
        out.setdefault(r["module"], {})[r["family"]] = r
    return out


@llama_needs_hf
@pytest.mark.slow
@pytest.mark.parametrize("module", list(COPY_ADAPTERS))
def test_copy_file_alone_on_llama_qwen2_gpt2(copy_runs, module):
    """The README's loop wraps every family (GPT-2 through the Conv1D conversion), training lowers the loss, the saved
    adapter weights reproduce the trained model in a fresh wrap of a fresh copy, the merge is exact where exact_merge
    says so and leaves no adapter, generate() runs; in bf16, cast first then wrap keeps the factors float32."""
    for family, (_, n, n_default) in COPY_FAMILIES.items():
        r, where = copy_runs[module][family], f"{module} on {family}"
        assert r["wrapped"] == n, f"{where}: {r['wrapped']} layers wrapped, expected {n}"
        assert r["rank"] == COPY_RANK[module], f"{where}: the README's call gives r={r['rank']}"
        if module != "ranlora":  # every other adapter starts at the base model; a wrong conversion would show here
            assert r["init_gap"] <= 1e-5, f"{where}: the wrapped model at init is {r['init_gap']:.2e} from the base"
        assert r["trainable_float32"], where
        assert r["losses"][-1] < 0.95 * r["losses"][0], f"{where}: the loss did not fall: {r['losses']}"
        assert r["saved_all_trainable"] and r["saved_keys"] > 0, where
        assert not r["unexpected"] and not r["missing_trainable"], (where, r["unexpected"], r["missing_trainable"])
        assert r["bases_equal"], f"{where}: the fresh wrap's base weights differ from the trained model's"
        assert r["load_gap"] == 0, f"{where}: the loaded adapter's logits differ by {r['load_gap']:.2e}"
        if COPY_EXACT[module]:
            assert r["left"] == 0, f"{where}: {r['left']} adapters left after merge()"
            assert r["merge_gap"] <= 1e-5 * max(1, r["scale"]), f"{where}: merged logits {r['merge_gap']:.2e} from the trained model's"
        else:  # kept as they are: the model is unchanged
            assert r["left"] == n and r["merge_gap"] == 0, (where, r["left"], r["merge_gap"])
        assert r["generated"] == [2, 7] and r["bf16_generated"] == [2, 7], where
        # the README's second block, bf16: the model's default targets (GPT-2: c_attn), the factors float32
        assert r["bf16_left"] == (0 if COPY_EXACT[module] else n_default), f"{where}: {r['bf16_left']} adapters after merge"
        assert r["bf16_factors"] == ["torch.float32"], f"{where}: cast first, then wrap: factors {r['bf16_factors']}"
        assert r["bf16_losses"][-1] < r["bf16_losses"][0], f"{where}: bf16 loss {r['bf16_losses']}"
        assert r["bf16_load_gap"] == 0, f"{where}: bf16, the loaded adapter's logits differ by {r['bf16_load_gap']:.2e}"
        assert r["bf16_merge_gap"] <= (0.05 * r["scale"] if COPY_EXACT[module] else 0), where  # bf16 rounding
        assert r["cast_after_wrap"] == ["torch.bfloat16"], f"{where}: {r['cast_after_wrap']}"  # the README's why
        assert r["nothing_wrapped"] and "no_such_layer" in r["nothing_wrapped"] and "print(model)" in r["nothing_wrapped"]


def test_copy_readme_stays_short_and_states_no_figure_that_drifts():
    """The README stays within 250 lines (issue 38), its methods table names each file without a line count (the
    counts went stale as the files changed), and it cites the papers, never the project's copies of them."""
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) <= 250, f"README.md has {len(text.splitlines())} lines: move detail to docs/"
    table = [line for line in text.splitlines() if line.startswith("| ") and ".py`" in line and "the update" not in line]
    assert len(table) >= 5 and not [line for line in table if re.search(r"\.py` \(\d+\)", line)], table
    papers = ["shared/", "genlora.md", "genlora-summary.txt", "lrlora.txt", "aurora.txt", "ranlora.md"]
    assert not [name for name in papers if name in text], "the README points to the papers' files, not the papers"
