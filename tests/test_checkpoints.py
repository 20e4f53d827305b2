"""Checkpoint files (checkpoints.py): loader errors, memory, read_safetensors.

Run alone: python -m pytest -q tests/test_checkpoints.py (test_all.py runs every topic)."""
import json
import random
import struct
import textwrap
from pathlib import Path

import pytest
import torch

import nanogpt_model as M

from conftest import FAST, llama_needs_hf, llama_needs_st, run_in_process, run_script


# ----------------------------------------------------------------------------------------------
# loader errors: one clear line naming the file or tensor


def llama_save(d, cfg, sd):
    from safetensors.torch import save_file
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(sd, d / "model.safetensors")


@llama_needs_hf
@llama_needs_st
def test_llama_loader_errors(llama_hf_dirs, tmp_path):
    from safetensors.torch import load_file
    _, good = llama_hf_dirs["gqa_untied_llama3"]
    cfg, sd = json.loads((good / "config.json").read_text()), load_file(good / "model.safetensors")

    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        M.load_llama(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        M.load_llama(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.load_llama(tmp_path / "noweights")

    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    llama_save(tmp_path / "missing", cfg, missing)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight is missing"):
        M.load_llama(tmp_path / "missing")

    untied_no_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    llama_save(tmp_path / "nohead", cfg, untied_no_head)
    with pytest.raises(ValueError, match=r"lm_head\.weight is missing"):
        M.load_llama(tmp_path / "nohead")

    wrong = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})
    llama_save(tmp_path / "wrong", cfg, wrong)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(64, 64\), the config expects \(32, 64\)"):
        M.load_llama(tmp_path / "wrong")

    quantized = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 64, dtype=torch.int8)})  # right shape, int8
    llama_save(tmp_path / "quantized", cfg, quantized)
    with pytest.raises(ValueError, match=r"k_proj\.weight is torch\.int8: quantized checkpoints are not supported"):
        M.load_llama(tmp_path / "quantized")

    extra = dict(sd, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    llama_save(tmp_path / "extra", cfg, extra)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_norm\.weight"):
        M.load_llama(tmp_path / "extra")

    llama_save(tmp_path / "mistral", dict(cfg, model_type="mistral"), sd)
    with pytest.raises(ValueError, match="model_type='mistral' is not supported"):
        M.load_llama(tmp_path / "mistral")

    (tmp_path / "meta2").mkdir()
    (tmp_path / "meta2" / "params.json").write_text("{}")
    for i in range(2):
        torch.save({}, tmp_path / "meta2" / f"consolidated.0{i}.pth")
    with pytest.raises(ValueError, match="2 model-parallel shards"):
        M.load_llama(tmp_path / "meta2")


def test_llama_broken_config_json_names_the_file(tmp_path, capsys, monkeypatch, train_cache):
    """A config.json (HF) or params.json (Meta) that is not JSON: load_llama's error names the file, and so does
    train.py's one line (its first look at --init-from, which reads the config before any weights)."""
    monkeypatch.setenv("NONLINEAR_LORA_CACHE", train_cache)
    for name in ("config.json", "params.json"):
        d = tmp_path / name.removesuffix(".json")
        d.mkdir()
        (d / name).write_text('{"vocab_size": 10,')
        if name == "params.json":
            torch.save({}, d / "consolidated.00.pth")  # the Meta loader reads params.json after finding its shard
        with pytest.raises(ValueError) as parser:
            json.loads((d / name).read_text())
        problem = f"{d / name}: not valid JSON ({parser.value})"  # the file, then the parser's reason
        with pytest.raises(ValueError) as e:
            M.load_llama(d)
        assert str(e.value) == problem
        status, err = run_in_process(["--adapter", "lora", "--init-from", str(d), *FAST, "--out-dir", str(tmp_path / "out")], capsys, monkeypatch)
        assert status == 2 and err.strip().splitlines() == [f"error: --init-from {d}: {problem}"], (status, err)


def test_checkpoints_config_missing_key_names_the_file_and_the_key(tmp_path, capsys, monkeypatch, train_cache):
    """A config.json (HF) or params.json (Meta) without a key the model needs: load_llama and train.py's one line name
    the file and the key (train.py said only `error: --init-from DIR: 'num_attention_heads'`)."""
    monkeypatch.setenv("NONLINEAR_LORA_CACHE", train_cache)
    for name, spec, key in (("config.json", {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1}, "num_attention_heads"),
                            ("params.json", {"dim": 8, "n_layers": 1}, "n_heads")):
        d = tmp_path / name.removesuffix(".json")
        d.mkdir()
        (d / name).write_text(json.dumps(spec))
        if name == "params.json":
            torch.save({}, d / "consolidated.00.pth")
        problem = f"{d / name}: missing key '{key}'"
        with pytest.raises(ValueError) as e:
            M.load_llama(d)
        assert str(e.value) == problem
        status, err = run_in_process(["--adapter", "lora", "--init-from", str(d), *FAST, "--out-dir", str(tmp_path / "out")], capsys, monkeypatch)
        assert status == 2 and err.strip().splitlines() == [f"error: --init-from {d}: {problem}"], (status, err)


# ----------------------------------------------------------------------------------------------
# memory: a bf16 checkpoint stays bf16 and is not copied


LLAMA__MEMORY_CHILD = textwrap.dedent("""
    import json, sys, torch
    import nanogpt_model as M
    torch.set_num_threads(1)
    def kb(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1])
    M.load_llama(sys.argv[1]).float()(torch.zeros(1, 4, dtype=torch.long))  # warm up torch's own allocations
    out = {}
    for dtype in (None, torch.float32):
        anon0 = kb("RssAnon")
        model = M.load_llama(sys.argv[2], dtype=dtype)
        with torch.no_grad():
            model(torch.randint(0, 32000, (1, 8)))  # touches every weight
        out[str(dtype)] = {"anon_kb": kb("RssAnon") - anon0, "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    print(json.dumps(out))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RssAnon")
@llama_needs_hf
@pytest.mark.slow
def test_llama_bf16_load_is_one_mapped_copy(llama_hf_dirs, tmp_path):
    """RssAnon counts private memory (copies, conversions) but not file pages mapped from the page cache.
    Loading a 66 MB bf16 checkpoint and running it must add well under one copy of private memory; loading
    it as float32 (a conversion, asked for) adds two copies' worth, which shows the measure can fail."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    d = tmp_path / "bf16"
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": (32000, 512), "lm_head.weight": (32000, 512), "model.norm.weight": (512,),
          **{f"model.layers.0.{n}": s for n, s in [
              ("self_attn.q_proj.weight", (512, 512)), ("self_attn.k_proj.weight", (128, 512)),
              ("self_attn.v_proj.weight", (128, 512)), ("self_attn.o_proj.weight", (512, 512)),
              ("mlp.gate_proj.weight", (512, 512)), ("mlp.up_proj.weight", (512, 512)), ("mlp.down_proj.weight", (512, 512)),
              ("input_layernorm.weight", (512,)), ("post_attention_layernorm.weight", (512,))]}}
    sd = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in sd.items()}
    save_file(sd, d / "model.safetensors")
    weights_kb = sum(t.numel() * 2 for t in sd.values()) / 1024
    _, small = llama_hf_dirs["mha_tied"]
    out = run_script("-c", LLAMA__MEMORY_CHILD, str(small), str(d))
    assert out.returncode == 0, out.stderr[-2000:]
    kept, upcast = json.loads(out.stdout.strip().splitlines()[-1]).values()
    assert kept["dtypes"] == ["torch.bfloat16"] and upcast["dtypes"] == ["torch.float32"]
    assert kept["anon_kb"] < 0.15 * weights_kb, (kept, weights_kb)
    assert upcast["anon_kb"] > 1.8 * weights_kb, (upcast, weights_kb)


# ----------------------------------------------------------------------------------------------
# read_safetensors: equal to the library on valid files, ValueError on every malformed one


def llama_raw_file(path, header, data=b"", header_bytes=None):
    h = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def llama_assert_same(ours, ref):
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape and torch.equal(ours[k], ref[k]), k


@llama_needs_st
def test_llama_read_safetensors_valid_files_equal_library(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(0)
    sd = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
          "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(), "f64": torch.randn(1, generator=g).double(),
          "i64": torch.arange(-5, 5), "i8": torch.arange(-3, 3, dtype=torch.int8), "u8": torch.arange(9, dtype=torch.uint8),
          "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
          "i32": torch.arange(6, dtype=torch.int32).view(2, 3), "i16": torch.arange(4, dtype=torch.int16)}
    save_file(sd, tmp_path / "a.safetensors", metadata={"format": "pt"})
    ours = M.read_safetensors(tmp_path / "a.safetensors")
    llama_assert_same(ours, load_file(tmp_path / "a.safetensors"))
    llama_assert_same(ours, sd)
    # the format does not promise alignment: a float32 tensor at an odd offset is still read right
    f = llama_raw_file(tmp_path / "odd.safetensors", {"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                                                 "x": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}},
                  b"\x07" + struct.pack("<2f", 1.5, -2.25))
    llama_assert_same(M.read_safetensors(f), load_file(f))
    # writes to a loaded tensor stay private: the file is not changed
    ours["f32"].zero_()
    llama_assert_same(M.read_safetensors(tmp_path / "a.safetensors"), sd)


def llama_f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


LLAMA_MALFORMED = {  # name -> (header dict, data) or raw file bytes
    "empty file": b"",
    "shorter than the length field": b"\x05\x00\x00",
    "header length past end": struct.pack("<Q", 1000) + b"{}",
    "absurd header length": struct.pack("<Q", 2**63) + b"{}",
    "invalid json": struct.pack("<Q", 9) + b'{"a": [1,',
    "invalid utf-8": struct.pack("<Q", 4) + b"\xff\xfe{}",
    "deeply nested json": struct.pack("<Q", 200000) + b"[" * 200000,
    "header is a list": ([1, 2], b""),
    "unknown dtype": ({"a": {"dtype": "F12", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "size does not match shape": ({"a": llama_f32([3], 0, 8)}, bytes(8)),
    "offsets span more than the shape": ({"a": llama_f32([1], 0, 8)}, bytes(8)),  # the other way: 8 bytes for 4
    "offsets out of range": ({"a": llama_f32([2], 8, 16)}, bytes(8)),
    "offsets reversed": ({"a": llama_f32([0], 8, 0)}, bytes(8)),
    "overlapping tensors": ({"a": llama_f32([2], 0, 8), "b": llama_f32([2], 4, 12)}, bytes(12)),
    "gap between tensors": ({"a": llama_f32([1], 0, 4), "b": llama_f32([1], 8, 12)}, bytes(12)),
    "trailing bytes not covered": ({"a": llama_f32([2], 0, 8)}, bytes(12)),
    "negative dimension": ({"a": llama_f32([-2], 0, 8)}, bytes(8)),
    "float offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}, bytes(8)),
    "boolean dimension": ({"a": llama_f32([True, 2], 0, 8)}, bytes(8)),
    "three offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, bytes(8)),
    "missing data_offsets": ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "entry not an object": ({"a": "F32"}, bytes(8)),
    "metadata not an object": ({"__metadata__": [], "a": llama_f32([2], 0, 8)}, bytes(8)),
    "metadata not strings": ({"__metadata__": {"k": 1}, "a": llama_f32([2], 0, 8)}, bytes(8)),
    "overflowing shape": ({"a": llama_f32([2**62, 2**62], 0, 8)}, bytes(8)),
}


@llama_needs_st
@pytest.mark.parametrize("case", LLAMA_MALFORMED)
def test_llama_read_safetensors_rejects_malformed(tmp_path, case):
    from safetensors.torch import load_file
    spec = LLAMA_MALFORMED[case]
    f = tmp_path / "bad.safetensors"
    if isinstance(spec, bytes):
        f.write_bytes(spec)
    else:
        llama_raw_file(f, *spec)
    with pytest.raises(ValueError, match=str(f).replace("\\", "\\\\")):
        M.read_safetensors(f)
    with pytest.raises(Exception):  # the library agrees that the file is malformed
        load_file(f)


def test_llama_read_safetensors_names_tensor_and_rejects_duplicates(tmp_path):
    f = llama_raw_file(tmp_path / "x.safetensors", {"ok": llama_f32([1], 0, 4), "layers.7.w": llama_f32([5], 4, 12)}, bytes(12))
    with pytest.raises(ValueError, match=r"tensor 'layers\.7\.w'.*needs 20"):
        M.read_safetensors(f)
    # the library keeps the last of two equal names; a file that says two things is rejected here
    h = b'{"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}, "a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        M.read_safetensors(llama_raw_file(tmp_path / "d.safetensors", None, bytes(4), header_bytes=h))


@llama_needs_st
def test_llama_read_safetensors_random_corruption(tmp_path):
    """Seeded fuzzing: truncations and byte flips of a valid file. Ours raises only ValueError, and whatever
    it accepts the library accepts too, with equal tensors (never less strict than the library)."""
    from safetensors.torch import load_file, save_file
    save_file({"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int16), "h": torch.randn(3).bfloat16()},
              tmp_path / "ok.safetensors")
    good = (tmp_path / "ok.safetensors").read_bytes()
    hlen = 8 + struct.unpack("<Q", good[:8])[0]
    rng = random.Random(0)
    accepted = 0
    for trial in range(400):
        data = bytearray(good)
        if trial % 4 == 0:
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 3)):
                pos = rng.randrange(hlen)  # the header, where the structure lives
                data[pos] = rng.choice([rng.randrange(256), ord(rng.choice('0123456789[]{},:"'))])
        f = tmp_path / f"f{trial}.safetensors"
        f.write_bytes(bytes(data))
        try:
            ours = M.read_safetensors(f)
        except ValueError:
            continue
        accepted += 1
        llama_assert_same(ours, load_file(f))
    assert accepted < 400
