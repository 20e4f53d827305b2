"""The study: task.py, tools/make_task.py, tools/study.py.

Run alone: python -m pytest -q tests/test_study.py (test_all.py runs every topic)."""
import contextlib
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import nanogpt_model as M
import task

from conftest import HERE, run_script


# ----------------------------------------------------------------------------------------------
# the study (issue 25): the task metric (task.py, tools/make_task.py), the runner (tools/study.py)

sys.path.insert(0, os.path.join(HERE, "tools"))
import study  # noqa: E402

# (generated text, reference answer, exact match?): checked by hand, then against reasoning-gym's own chain_sum scorer
TASK_CASES = [("214", "214", True), (" 214 ", "214", True), ("+214", "214", True), ("0214", "214", True), ("214.0", "214", True),
              ("1,888", "1888", True), ("1e3", "1000", True), ("-0", "0", True), ("-4", "-4", True), ("214\n7 + 3 = 10", "214", True),
              ("4", "-4", False), ("- 4", "-4", False), ("\u22124", "-4", False), ("2140", "214", False), ("21", "214", False),
              ("214.5", "214", False), ("", "214", False), ("  \n214", "214", False), ("two hundred", "214", False), ("-103", "103", False)]


@pytest.mark.parametrize("generated,answer,match", TASK_CASES)
def test_task_exact_match_agrees_with_reasoning_gym(generated, answer, match):
    """task.exact_match: the first line, stripped, numbers compared in canonical form; reasoning-gym's chain_sum gives
    that first line a full score (1.0) exactly when it matches (it gives partial credit below 1 to '2140' for '214')."""
    import reasoning_gym

    assert task.exact_match(generated, answer) is match
    ds = reasoning_gym.create_dataset("chain_sum", size=1, seed=0)
    assert (ds.score_answer(generated.split("\n", 1)[0], {"answer": answer}) == 1.0) is match


class ScriptedModel(nn.Module):
    """A byte-level 'model' that answers each '\\n<question> =' prompt with a scripted text, one byte per call
    (greedy: the argmax of its logits), and records which questions each call saw."""

    def __init__(self, replies):
        super().__init__()
        self.replies, self.calls = replies, []

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 256)
        batch = []
        for b, row in enumerate(idx.tolist()):
            question, _, said = bytes(row).decode()[1:].partition(" =")
            batch.append(question)
            reply = self.replies[question] + "\n" * 8
            logits[b, -1, reply.encode()[len(said.encode())]] = 1.0
        self.calls.append(tuple(batch))
        return logits


def test_task_accuracy_batches_by_prompt_length_and_stops_at_the_line_break():
    problems = [{"question": q, "answer": a} for q, a in [("1 + 2", "3"), ("3 - 5", "-2"), ("10 + 20", "30"), ("40 - 17", "23"), ("9 + 9", "18")]]
    # 4 of 5 right: '2' is not '-2'; what follows the line break does not count; ' 23.00' never ends its line
    replies = {"1 + 2": " 3", "3 - 5": " 2", "10 + 20": " 30\n10 + 20 = 31", "40 - 17": " 23.00", "9 + 9": " 18"}
    model = ScriptedModel(replies)
    r = task.accuracy(model, M.ByteTokenizer(), problems, "cpu", contextlib.nullcontext, batch_size=2)
    assert (r["correct"], r["n"], r["accuracy"]) == (4, 5, 0.8)
    assert [e["generated"] for e in r["examples"]] == [" 3", " 2", " 30", " 23.00", " 18"]
    # prompts of equal length share a batch of at most batch_size; a batch stops when every row has ended its line
    # (' 3\n', ' 2\n': 3 calls; ' 18\n': 4) or at the cap, the longest answer's tokens + 2 (' -2\n': 4 + 2 = 6)
    runs = [(c, sum(1 for _ in g)) for c, g in itertools.groupby(model.calls)]
    assert runs == [(("1 + 2", "3 - 5"), 3), (("9 + 9",), 4), (("10 + 20", "40 - 17"), 6)]


@pytest.fixture(scope="module")
def study_task(tmp_path_factory):
    """A small task for the built-in GPT: 'a + b = c' lines (train and validation text) and a task file."""
    d = tmp_path_factory.mktemp("task")
    rng = random.Random(0)
    pairs = [(rng.randrange(100), rng.randrange(100)) for _ in range(4000)]
    (d / "train.txt").write_text("".join(task.line(f"{a} + {b}", str(a + b)) for a, b in pairs))
    (d / "eval.json").write_text(json.dumps({"problems": [{"question": f"{a} + {b}", "answer": str(a + b)} for a, b in pairs[:6]]}))
    return d


STUDY_FAST = ["--steps", "4", "--base-steps", "5", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "4", "--block-size", "32", "--device", "cpu"]


def processes_mentioning(text):
    """Pids of the running processes whose command line holds text (the runs of one study, by its folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(pid))
        except OSError:
            pass
    return found


def launches(out):  # how often each run was started: one '$ <command>' line in its log per start
    return {p.parent.name: p.read_text().count("\n$ ") for p in sorted(Path(out).glob("runs/*/log.txt"))}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills the study and finds its runs through /proc")
@pytest.mark.slow
def test_study_grid_records_every_run_resumes_after_a_kill_and_then_only_prints(tmp_path, study_task, train_cache):
    """A 2 x 2 x 1 grid on the built-in GPT: kill the study (SIGKILL) once its first run has finished; run it again:
    the finished run is not repeated, the others finish (an interrupted one from its checkpoint, or again where it was
    stopped after saving its adapter); every record holds what the table needs; a third identical command starts
    nothing and prints the table."""
    out = tmp_path / "study"
    grid = ["--adapters", "lora,ranlora", "--lrs", "1e-3,3e-3", "--seeds", "0", "--out", str(out), "--"]
    flags = [*grid, "--data", str(study_task / "train.txt"), "--task-eval", str(study_task / "eval.json"), *STUDY_FAST]
    proc = run_script("tools/study.py", *flags, cache=train_cache, wait=False)
    deadline = time.time() + 300
    while not list(out.glob("runs/*/run.json")) and time.time() < deadline and proc.poll() is None:  # the study's 'done'
        time.sleep(0.2)
    proc.kill()
    proc.communicate()
    first = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json") if (p.parent.parent / "run.json").is_file()}
    assert 1 <= len(first) < 4, "the first run should have finished, not the whole grid"
    while processes_mentioning(str(out)) and time.time() < deadline:  # its runs got SIGTERM (parent death signal)
        time.sleep(0.2)
    assert not processes_mentioning(str(out))
    r = run_script("tools/study.py", "--per-gpu", "2", *flags, cache=train_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in first} == first  # finished runs untouched
    assert all(launches(out)[p.parent.parent.name] == 1 for p in first)
    records = json.loads((out / "study.json").read_text())["records"]
    assert sorted((r["adapter"], r["lr"], r["seed"]) for r in records) == [("lora", 1e-3, 0), ("lora", 3e-3, 0), ("ranlora", 1e-3, 0), ("ranlora", 3e-3, 0)]
    for rec in records:
        assert rec["status"] == "done" and rec["rank"] == (8 if rec["adapter"] == "lora" else 2) and rec["trainable_params"] > 0
        assert [s for s, _ in rec["val_curve"]] == [2, 4] and rec["val_loss"] == rec["val_curve"][-1][1]
        assert 0 <= rec["task_accuracy"] <= 1 and 0 <= rec["task_accuracy_before"] <= 1
        assert rec["tokens_per_s"] > 0 and rec["wall_s"] > 0 and rec["schedule"] == {"warmup": 20, "decay": "cosine"}
    started = launches(out)
    md = (out / "study.md").read_text()
    assert "4 of 4 runs done" in md and md in r.stdout + "\n" and "| lora |" in md and "| ranlora |" in md
    again = run_script("tools/study.py", *flags, cache=train_cache)
    assert again.returncode == 0 and "4 of 4 runs done" in again.stdout and "study:" not in again.stderr
    assert launches(out) == started and sum(started.values()) <= 5  # 4 runs, the one the kill stopped started twice


@pytest.mark.slow
def test_study_failed_run_is_recorded_with_its_last_line_and_the_study_goes_on(tmp_path, study_task, train_cache, monkeypatch, capsys):
    monkeypatch.setenv("NONLINEAR_LORA_CACHE", train_cache)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    flags = ["--adapters", "lora@r=999,lora@r=4", "--lrs", "1e-3", "--per-gpu", "2", "--out", str(out), "--",
             "--data", str(study_task / "train.txt"), *STUDY_FAST]
    assert study.main(flags) == 0
    recs = {rec["entry"]: rec for rec in json.loads((out / "study.json").read_text())["records"]}
    assert recs["lora@r=999"]["status"] == "failed" and recs["lora@r=4"]["status"] == "done"
    assert recs["lora@r=999"]["last_line"].startswith("error: --adapter lora on") and "r=999 exceeds" in recs["lora@r=999"]["last_line"]
    assert "r=999 exceeds" in (out / "study.md").read_text()
    assert study.main(flags) == 0 and set(launches(out).values()) == {1}  # not run again
    assert study.main(["--retry-failed", *flags]) == 0
    assert launches(out) == {"lora@r=4__lr0.001__seed0": 1, "lora@r=999__lr0.001__seed0": 2}


@pytest.mark.parametrize("flags,message", [
    (["--adapters", "lora,dora", "--lrs", "1e-3"], "--adapters lora,dora: unknown adapter 'dora'".replace("lora,dora", "dora")),
    (["--adapters", "lora", "--lrs", "1e-3,0"], "--lrs 1e-3,0: 0 is not a learning rate above 0"),
    (["--adapters", "lora", "--lrs=1e-3,-1e-3"], "--lrs 1e-3,-1e-3: -0.001 is not a learning rate above 0"),
    (["--adapters", ",", "--lrs", "1e-3"], "--adapters ',': empty list"),
    (["--adapters", "lora", "--lrs", ""], "--lrs '': empty list"),
    (["--adapters", "lora", "--lrs", "1e-3", "--seeds", "0,x"], "--seeds 0,x: not a comma list of integers"),
    (["--adapters", "lora@rank=two", "--lrs", "1e-3"], "--adapters lora@rank=two: argument --rank: invalid int value"),
    (["--adapters", "lora", "--lrs", "1e-3", "--", "--lr", "1"], "--lr after --: the study sets"),
    (["--adapters", "lora", "--lrs", "1e-3", "--", "--steps", "0"], "--adapters lora with the train.py flags --steps 0: --steps 0: must be at least 1"),
])
def test_study_bad_grid_is_one_error_line_before_any_run(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(study, "launch", lambda *a: pytest.fail("a run started"))
    argv = flags[: flags.index("--")] + ["--out", str(tmp_path / "s")] + flags[flags.index("--"):] if "--" in flags else flags + ["--out", str(tmp_path / "s")]
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert not (tmp_path / "s").exists()


def test_study_table_best_lr_mean_std_and_the_lora_at_the_same_budget():
    """The summary from records alone: the best lr by the first seeds' mean val loss (a diverged lr never wins), mean ±
    std over every seed at it, and each method's LoRA on the same targets with the closest trainable parameters."""
    def rec(entry, lr, seed, val=None, params=100, targets=("q", "v"), acc=0.5, status="done"):
        return {"entry": entry, "adapter": entry.split("@")[0], "lr": lr, "seed": seed, "status": status, "val_loss": val, "task_accuracy": acc,
                "trainable_params": params, "rank": 2, "targets": list(targets), "tokens_per_s": 1000.0, "init_gap_max_abs_logit_diff": 0.0,
                "val_loss_at_init": 3.0, "wall_s": 10.0, "last_line": "error: step 3: the loss is nan; lower --lr (now 0.01)"}
    records = [rec("genlora", 1e-3, 0, 2.0), rec("genlora", 3e-3, 0, 1.9), rec("genlora", 1e-2, 0, status="diverged"),
               rec("genlora", 3e-3, 1, 1.7), rec("genlora", 3e-3, 2, 1.8, acc=0.8),
               rec("lora", 1e-3, 0, 1.85, params=400, targets="qkvo"), rec("lora", 3e-3, 0, 1.95, params=400, targets="qkvo"),
               rec("lora", 1e-2, 0, 1.99, params=400, targets="qkvo"),
               rec("lora@r=1", 1e-3, 0, 2.1, params=90), rec("lora@r=1", 3e-3, 0, 2.2, params=90), rec("lora@r=1", 1e-2, 0, status="pending"),
               rec("lora@r=4", 1e-3, 0, 1.6, params=400), rec("lora@r=4", 3e-3, 0, 1.7, params=400), rec("lora@r=4", 1e-2, 0, 1.8, params=400)]
    lrs = [1e-3, 3e-3, 1e-2]
    s = study.summarize(records, ["genlora", "lora", "lora@r=1", "lora@r=4"], lrs, [0])
    g = s["genlora"]
    assert g["best_lr"] == 3e-3 and g["seeds"] == [0, 1, 2] and g["complete"] and not s["lora@r=1"]["complete"]
    assert g["val_loss"][0] == pytest.approx(1.8) and g["val_loss"][1] == pytest.approx(0.1)  # 1.9, 1.7, 1.8
    assert g["task_accuracy"][0] == pytest.approx(0.6) and g["sweep"][1e-2]["diverged"] == 1 and g["sweep"][1e-2]["val_loss"] is None
    assert s["lora"]["best_lr"] == 1e-3 and s["lora"]["val_loss"] == (1.85, None)
    assert study.matched_lora("genlora", s) == "lora@r=1" and study.matched_lora("lora@r=4", s) is None  # same targets, closest count
    md = "\n".join(study.table(records, s, lrs, ["# t"]))
    assert "| genlora | 2.0000 | **1.9000** | div | 0.003 |" in md and "| lora@r=1 | **2.1000** | 2.2000 | … | 0.001 |" in md
    assert "1.8000 ± 0.1000" in md and "60.0 ± 17.3%" in md and "lora@r=1: -0.3000, +10.0 pt" in md


def test_make_task_writes_consecutive_seeds_without_the_eval_expressions(tmp_path):
    """tools/make_task.py: the training text is reasoning-gym's problems of seeds 0, 1, 2, ... in order (each seed
    once: blocks that restarted near seed 0 made near copies), less those whose expression an eval problem has; the eval
    problems come from EVAL_SEED on; every line is task.line and every eval problem a {question, answer} task.py reads."""
    import reasoning_gym
    import make_task

    make_task.main(["--out", str(tmp_path), "--tokenizer", "bytes", "--tokens", "170000", "--eval", "20"])  # 2 blocks of 10,000
    spec = task.load(tmp_path / "chain_sum_eval.json")
    ds = reasoning_gym.create_dataset("chain_sum", size=20_020, seed=0, **make_task.CONFIG)
    want_eval = [{"question": x["metadata"]["expression"], "answer": x["answer"]}
                 for x in reasoning_gym.create_dataset("chain_sum", size=20, seed=make_task.EVAL_SEED, **make_task.CONFIG)]
    assert spec["problems"] == want_eval
    held_out = {p["question"] for p in want_eval}
    want = "".join(task.line(x["metadata"]["expression"], x["answer"]) for x in list(ds)[:20_000] if x["metadata"]["expression"] not in held_out)
    assert (tmp_path / "chain_sum.txt").read_text() == want
    assert spec["training_text"]["problems"] == want.count("\n") < 20_000 and spec["in_training_text"] == 0


def test_study_per_set_tables_take_the_base_row_from_step_0_and_average_the_seeds():
    """A task scored per set (commonsense): one table per scorer metric, the base model's row from the runs' step-0
    scores, each adapter's cells the mean ± std over its seeds at its best lr; a task scored as one set adds none."""
    def rec(seed, acc):
        sets = {"arc_easy": {"acc": acc, "generate": acc / 2}, "boolq": {"acc": 1 - acc, "generate": 0.5}}
        before = {"arc_easy": {"acc": 0.25, "generate": 0.0}, "boolq": {"acc": 0.5, "generate": 0.125}}
        return {"entry": "lora", "lr": 1e-3, "seed": seed, "status": "done", "val_loss": 1.0 + seed, "task_accuracy": acc,
                "tokens_per_s": 1.0, "init_gap_max_abs_logit_diff": 0.0, "val_loss_at_init": 2.0, "wall_s": 1.0,
                "trainable_params": 10, "rank": 8, "targets": ["q"],
                "task_sets": {**sets, "macro": {m: (sets["arc_easy"][m] + sets["boolq"][m]) / 2 for m in ("acc", "generate")}},
                "task_sets_before": {**before, "macro": {"acc": 0.375, "generate": 0.0625}}}
    records = [rec(0, 0.5), rec(1, 0.7)]
    summary = study.summarize(records, ["lora"], [1e-3], [0])  # best lr 1e-3 (seed 0), then both seeds at it
    lines = study.set_tables(records, summary)
    acc = lines[lines.index("## Per set: acc, at each adapter's best lr (%, mean ± std over seeds)") + 2:][:4]
    assert acc == ["| adapter | arc_easy | boolq | macro |", "| --- | ---: | ---: | ---: |",
                   "| base model | 25.0% | 50.0% | 37.5% |", "| lora | 60.0 ± 14.1% | 40.0 ± 14.1% | 50.0 ± 0.0% |"]
    assert "| base model | 0.0% | 12.5% | 6.2% |" in lines and len([x for x in lines if x.startswith("## Per set")]) == 2
    assert study.set_tables([{**records[0], "task_sets": {}}], summary) == []  # chain_sum: one set, no per-set tables
    assert study.per_set({"accuracy": 0.5}) == {}
