"""bench.py.

Run alone: python -m pytest -q tests/test_bench.py (test_all.py runs every topic)."""
import json
import math

import pytest

import bench


# ----------------------------------------------------------------------------------------------
# bench.py
# bench.py end to end on its smallest preset (CPU, seconds): every variant runs and the JSON has the ratios.


def test_bench_tiny_writes_ratios(tmp_path):
    out = tmp_path / "bench.json"
    r = bench.main(["--preset", "tiny", "--reps", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["steps"].keys() == {"floor", *bench.ADAPTERS, *bench.SETTINGS}  # no transformers variants on the GPT preset
    for name, row in saved["steps"].items():
        for key in ("ms_step", "step_vs_lora", "step_vs_floor", "mem_vs_lora", "mem_vs_floor", "peak_mem_bytes", "first_step_s"):
            assert isinstance(row[key], float) or isinstance(row[key], int), (name, key, row[key])
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
    assert saved["steps"]["lora"]["step_vs_lora"] == 1.0 and saved["steps"]["floor"]["mem_vs_floor"] == 1.0
    lora, floor = saved["steps"]["lora"], saved["steps"]["floor"]
    for name, row in saved["steps"].items():  # each ratio is this variant's over the reference's, not the reverse
        for key, num, ref in (("step_vs_lora", "ms_step", lora), ("step_vs_floor", "ms_step", floor), ("mem_vs_lora", "peak_mem_bytes", lora),
                              ("mem_vs_floor", "peak_mem_bytes", floor)):
            assert row[key] == pytest.approx(row[num] / ref[num], rel=1e-9), f"bench {name}: {key} is not its {num} over the reference's"
    assert saved["steps"]["floor"]["trainable_params"] == 0 and saved["steps"]["lora"]["trainable_params"] > 0
    # the floor's backward is real: it saves activations, so its memory exceeds the weights alone
    weights = sum(p.numel() * p.element_size() for p in bench.build_base(bench.PRESETS["tiny"], bench.torch.device("cpu"),
                                                                         bench.torch.float32).parameters())
    assert saved["steps"]["floor"]["peak_mem_bytes"] > weights
    # merged models are plain Linears again; RanLoRA (GELU) has no merge and is timed unmerged
    assert "lora merged" in saved["inference"] and "ranlora (unmerged)" in saved["inference"]
    assert saved["ranlora_init"]["modules"] == 2 * 6 and saved["ranlora_init"]["wall_s"] > 0
    assert saved["checkpoint"]["load_s"] > 0 and saved["checkpoint"]["read_s"] > 0
    assert r["steps"]["lora"]["ms_step"] == saved["steps"]["lora"]["ms_step"]
