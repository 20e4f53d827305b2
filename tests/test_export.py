"""train.py --export and --generate (export.py).

Run alone: python -m pytest -q tests/test_export.py (test_all.py runs every topic)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import adapt
import checkpoints
import nanogpt_model as M
import train
from nanogpt_model import GPT, GPTConfig

from conftest import (
    FAST, llama_assert_close_rel, llama_meta_shaped_hf, llama_needs_hf, llama_needs_st, llama_tokens,
    llama_write_meta, randomize_, run_in_process,
)


# ----------------------------------------------------------------------------------------------
# Using the result outside this repo: train.py --export writes a merged HF directory (and, for LoRA,
# the PEFT format); --generate samples from a saved adapter. The references: transformers and PEFT loading what
# was written, the safetensors library and huggingface_hub's shard split, the base's own bytes, and the sample
# that the training run itself wrote.

EXPORT_BASE = "head_dim_mqa_linear"  # biases, one KV head, a separate head_dim, untied head: every tensor kind


def export_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)  # bit-identical, not just equal (-0.0, NaN)


def export_adapter_pt(base_dir, path, name, kwargs, model=None, targets=None):
    """Our model of base_dir with random, nonzero adapters (a zero B would test nothing), saved as train.py saves
    adapter.pt; returns (model, adapters)."""
    model = model if model is not None else M.load_llama(base_dir).eval()
    targets = targets or train.parse_targets(train.ADAPTERS[name].targets)
    adapters = train.inject(model, name, targets, kwargs)
    for i, a in enumerate(adapters.values()):
        randomize_(a, seed=i, std=0.1)
    torch.save({"adapter": name, "targets": targets, "kwargs": kwargs, "base": f"LLaMA ({base_dir})", "state": adapt.adapter_state(adapters)}, path)
    return model, adapters


@llama_needs_st
def test_export_write_safetensors_is_read_back_by_the_library_and_by_ours(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(0)
    sd = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(), "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
          "f64": torch.randn(1, generator=g).double(), "i64": torch.arange(-5, 5), "i32": torch.arange(6, dtype=torch.int32).view(2, 3),
          "i16": torch.arange(4, dtype=torch.int16), "i8": torch.arange(-3, 3, dtype=torch.int8), "u8": torch.arange(9, dtype=torch.uint8),
          "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
          "strided": torch.randn(4, 6, generator=g).t(), "bf16 odd": torch.randn(3, generator=g).bfloat16()}  # odd byte sizes
    M.write_safetensors(tmp_path / "a.safetensors", sd, metadata={"format": "pt", "note": "x"})
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    for got in (load_file(tmp_path / "a.safetensors"), M.read_safetensors(tmp_path / "a.safetensors")):
        assert got.keys() == sd.keys()
        for k in sd:
            assert got[k].dtype == sd[k].dtype and got[k].shape == sd[k].shape and torch.equal(export_bytes(got[k]), export_bytes(sd[k])), k
    # sharded: the same split as huggingface_hub's (what transformers' save_pretrained uses), a tensor over the limit alone
    from huggingface_hub import split_torch_state_dict_into_shards
    sd = {f"w{i}": torch.randn(n, generator=g).to(dt) for i, (n, dt) in enumerate([(40, torch.float32), (30, torch.bfloat16), (100, torch.float32),
                                                                                   (10, torch.float32), (60, torch.bfloat16), (5, torch.float16)])}
    files = M.write_hf_weights(tmp_path / "sharded", sd, max_shard_bytes=200) if (tmp_path / "sharded").mkdir() is None else None
    ref = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors", max_shard_size=200)
    assert files == [*ref.filename_to_tensors, "model.safetensors.index.json"] and len(files) > 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index == {"metadata": ref.metadata, "weight_map": ref.tensor_to_filename}
    for file, names in ref.filename_to_tensors.items():
        assert sorted(load_file(tmp_path / "sharded" / file)) == sorted(names)
    got = M.read_hf_weights(tmp_path / "sharded")
    assert got.keys() == sd.keys() and all(got[k].dtype == sd[k].dtype and torch.equal(export_bytes(got[k]), export_bytes(sd[k])) for k in sd)


@llama_needs_hf
@pytest.mark.parametrize("name, kwargs", [("lora", {}), ("genlora", {}), ("lrlora", {}), ("aurora", {"mode": "static"}),
                                          ("ranlora", {"activation": "identity"})])
def test_export_transformers_loads_the_merged_model(llama_hf_dirs, tmp_path, name, kwargs):
    """transformers' own LLaMA on the exported directory = our merged model (and the unmerged one, the trained function);
    every tensor not adapted is the base's, byte for byte; the adapted weights are the merged ones."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    base = llama_hf_dirs[EXPORT_BASE][1]
    model, adapters = export_adapter_pt(base, tmp_path / "adapter.pt", name, kwargs)
    assert train.main(["--init-from", str(base), "--export", str(tmp_path / "adapter.pt"), str(tmp_path / "out"), "--device", "cpu"]) == 0
    x = llama_tokens()
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        got, unmerged = hf(x).logits, model(x)
        adapt.put(model, {n: a.merged() for n, a in adapters.items()})
        llama_assert_close_rel(got, model(x), 1e-5)
        llama_assert_close_rel(got, unmerged, 1e-4)  # the merge check's tolerance
        assert (got - llama_hf_dirs[EXPORT_BASE][0](x).logits).abs().max() > 1e-2 * got.abs().max()  # the adapters matter
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    adapted = {f"model.{n}.weight" for n in adapters}
    assert after.keys() == before.keys() and adapted < after.keys() and all(after[k].dtype == before[k].dtype for k in after)
    for k in after.keys() - adapted:
        assert torch.equal(export_bytes(after[k]), export_bytes(before[k])), k
    for n, a in adapters.items():
        assert torch.equal(after[f"model.{n}.weight"], model.get_submodule(n).weight)
    assert (tmp_path / "out" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert (tmp_path / "out" / "peft").exists() == (name == "lora") and not list(tmp_path.glob("out.tmp*"))


@llama_needs_hf
def test_export_bf16_base_keeps_its_dtype_shards_and_copies_the_tokenizer(llama_hf_dirs, tmp_path, monkeypatch):
    """A bf16 checkpoint: the export is bf16, W0 + dW rounded once; sharded past the size limit; the tokenizer files copied."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM
    base = tmp_path / "base"
    shutil.copytree(llama_hf_dirs[EXPORT_BASE][1], base)
    save_file({k: v.bfloat16() for k, v in load_file(base / "model.safetensors").items()}, base / "model.safetensors", metadata={"format": "pt"})
    (base / "tokenizer.json").write_text('{"a tokenizer": "copied as it is"}')
    model, adapters = export_adapter_pt(base, tmp_path / "adapter.pt", "lora", {}, model=M.load_llama(base, dtype=torch.float32))
    monkeypatch.setattr(checkpoints, "SHARD_BYTES", 20_000)  # where write_hf_weights reads it
    assert train.main(["--init-from", str(base), "--export", str(tmp_path / "adapter.pt"), str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    before, after = load_file(base / "model.safetensors"), {k: v for s in shards for k, v in load_file(s).items()}
    assert after.keys() == before.keys() and {v.dtype for v in after.values()} == {torch.bfloat16}
    for k in after:
        n = k.removeprefix("model.").removesuffix(".weight")
        want = (before[k].float() + adapters[n].delta_weight()).bfloat16() if n in adapters else before[k]
        assert torch.equal(export_bytes(after[k]), export_bytes(want)), k
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)  # transformers follows the shard index
    assert all(torch.equal(p, after[k].float()) for k, p in hf.state_dict().items() if k in after)


@llama_needs_hf
def test_export_lora_peft_format_reproduces_our_logits(llama_hf_dirs, tmp_path):
    """PeftModel.from_pretrained(base, OUT_DIR/peft): HF PEFT's LoRA on transformers' LLaMA = our unmerged LoRA (tied head here)."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    base = llama_hf_dirs["mha_tied"][1]
    model, _ = export_adapter_pt(base, tmp_path / "adapter.pt", "lora", {"r": 4, "alpha": 12, "dropout": 0.05}, targets=["q", "v", "down"])
    assert train.main(["--init-from", str(base), "--export", str(tmp_path / "adapter.pt"), str(tmp_path / "out"), "--device", "cpu"]) == 0
    config = json.loads((tmp_path / "out" / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 12, ["down_proj", "q_proj", "v_proj"])
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "out" / "peft").eval()
    x = llama_tokens()
    with torch.no_grad():
        ours = model.eval()(x)
        llama_assert_close_rel(peft(x).logits, ours, 1e-5)
        with peft.disable_adapter():  # the adapter was loaded, not ignored
            assert (peft(x).logits - ours).abs().max() > 1e-2 * ours.abs().max()


def export_gpt_adapter_pt(path):
    model = GPT(GPTConfig())
    adapters = train.inject(model, "lora", ["q", "v"], {})
    torch.save({"adapter": "lora", "targets": ["q", "v"], "kwargs": {}, "base": "built-in GPT", "state": adapt.adapter_state(adapters)}, path)


@pytest.mark.parametrize("case", ["ranlora-gelu", "aurora-dynamic", "aurora-dynamic-no-metrics", "gpt", "meta", "missing", "not-adapter",
                                  "not-empty", "out-is-file", "both", "generate-missing"])
def test_export_refusals_are_one_line_before_the_base_loads_and_write_nothing(llama_hf_dirs, tmp_path, case, capsys, monkeypatch):
    base, out, pt = llama_hf_dirs[EXPORT_BASE][1], tmp_path / "out", tmp_path / "adapter.pt"
    if case.startswith(("ranlora", "aurora")):
        name, kwargs = case.split("-")[0], {}  # the defaults: GELU, dynamic
        export_adapter_pt(base, pt, name, kwargs)
        if case == "aurora-dynamic":  # the gap train.py's merge check measured, next to the adapter
            merge = {"max_abs_logit_diff": 6.04, "relative_diff": 0.21, "val_loss_unmerged": 2.261, "val_loss_merged": 2.269, "tokens": 2048}
            (tmp_path / "metrics.json").write_text(json.dumps({"merge": merge}))
    elif case == "gpt":
        export_gpt_adapter_pt(pt)
    elif case == "meta":
        base = tmp_path / "meta"
        llama_write_meta(llama_meta_shaped_hf(tied=False), base, tied=False)
        export_adapter_pt(base, pt, "lora", {}, model=M.load_llama(base))
    elif case == "not-adapter":
        torch.save({"model": {}}, pt)
    else:
        export_adapter_pt(base, pt, "lora", {})
    if case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    if case == "out-is-file":
        out.write_text("mine")
    argv = {"gpt": ["--export", str(pt), str(out)], "missing": ["--init-from", str(base), "--export", str(tmp_path / "nope.pt"), str(out)],
            "meta": ["--init-from", str(base), "--export", str(pt), str(out)],
            "both": ["--init-from", str(base), "--export", str(pt), str(out), "--generate", str(pt)],
            "generate-missing": ["--init-from", str(base), "--generate", str(tmp_path / "nope.pt")]}.get(case, ["--init-from", str(base), "--export", str(pt), str(out)])
    expected = {"ranlora-gelu": "has no weight-space update", "aurora-dynamic": "measured max |dlogits| 6.04 (relative 0.21), loss 2.2610 unmerged vs 2.2690 merged",
                "aurora-dynamic-no-metrics": "the gap was not measured", "gpt": "built-in GPT is not a HF architecture", "meta": "is a Meta checkpoint",
                "missing": "nope.pt", "not-adapter": "not an adapter.pt", "not-empty": "not an empty directory", "out-is-file": "not an empty directory",
                "both": "not allowed with", "generate-missing": "nope.pt"}[case]
    status, err = run_in_process([*argv, "--device", "cpu", "--out-dir", str(tmp_path / "runs")], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (status, err)
    if case.startswith("aurora"):
        assert "--allow-approximate" in lines[0]
    if case == "missing":
        assert "no such file" in lines[0].lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"adapter.pt", "meta", "metrics.json", "out"} & {p.name for p in tmp_path.iterdir()})
    assert case in ("not-empty", "out-is-file") or not out.exists()
    assert case != "not-empty" or [p.name for p in out.iterdir()] == ["keep.txt"]


@llama_needs_hf
def test_export_aurora_dynamic_with_allow_approximate_says_the_gap(llama_hf_dirs, tmp_path, capsys):
    from transformers import LlamaForCausalLM
    base = llama_hf_dirs[EXPORT_BASE][1]
    model, adapters = export_adapter_pt(base, tmp_path / "adapter.pt", "aurora", {})
    (tmp_path / "metrics.json").write_text(json.dumps({"merge": {"max_abs_logit_diff": 6.04, "relative_diff": 0.21, "val_loss_unmerged": 2.261,
                                                                 "val_loss_merged": 2.269, "tokens": 2048}}))
    capsys.readouterr()
    assert train.main(["--init-from", str(base), "--export", str(tmp_path / "adapter.pt"), str(tmp_path / "out"), "--allow-approximate", "--device", "cpu"]) == 0
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(note) == 1 and "AuroRALinear" in note[0] and "mode=dynamic" in note[0] and "max |dlogits| 6.04" in note[0], note
    x = llama_tokens()
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()(x).logits
        unmerged = model(x)
        adapt.put(model, {n: adapt.merged_layer(a) for n, a in adapters.items()})
        llama_assert_close_rel(got, model(x), 1e-5)  # the paper's static form, as merged() builds it
        assert (got - unmerged).abs().max() > 1e-3 * unmerged.abs().max()  # which is not the trained function: hence the flag


@llama_needs_hf
def test_export_failure_midway_leaves_nothing(llama_hf_dirs, tmp_path, monkeypatch):
    base = llama_hf_dirs[EXPORT_BASE][1]
    export_adapter_pt(base, tmp_path / "adapter.pt", "lora", {})

    def disk_full(path, *a, **k):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_safetensors", disk_full)  # export.py and write_hf_weights call it there
    with pytest.raises(OSError, match="No space left"):
        train.main(["--init-from", str(base), "--export", str(tmp_path / "adapter.pt"), str(tmp_path / "out"), "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pt"]


@pytest.mark.parametrize("name", ["lora", "ranlora"])  # mergeable, and not (RanLoRA's GELU stays at inference)
@pytest.mark.slow
def test_generate_from_a_saved_adapter_prints_what_training_sampled(tmp_path, tiny_text, in_process, capsys, name):
    """--generate on a saved adapter.pt = the sample the training run took from the model in memory, same prompt and seed."""
    sampling = ["--prompt", "def ", "--sample-tokens", "40", "--seed", "3"]
    assert in_process(["--adapter", name, "--data", tiny_text, *FAST, "--lr", "1e-2", *sampling, "--out-dir", str(tmp_path)]) == 0
    pt = tmp_path / name / "adapter.pt"
    capsys.readouterr()
    assert in_process(["--generate", str(pt), *FAST, *sampling]) == 0
    printed = capsys.readouterr().out  # after a note, where the model lacks one of the adapter's targets
    sample = (tmp_path / name / "sample.txt").read_text()
    assert f"\n{printed}".endswith(f"\n{sample}\n") and sample.startswith("def ") and len(sample) > 30
    # the adapter was applied: the same command with B = 0 (LoRA: the base; RanLoRA: its init) prints something else
    ckpt = torch.load(pt)
    torch.save({**ckpt, "state": {k: v * 0 if k.endswith(".B") else v for k, v in ckpt["state"].items()}}, tmp_path / "zero.pt")
    assert in_process(["--generate", str(tmp_path / "zero.pt"), *FAST, *sampling]) == 0
    assert capsys.readouterr().out != printed
