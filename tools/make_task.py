"""Dev-only: the study's task data (issue 25), generated with reasoning-gym (pip install -r requirements-dev.txt),
written as plain files so that a machine without reasoning-gym (or a network) can train and score on them.

    python tools/make_task.py [--out out/task] [--tokens 3000000] [--eval 500]

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


if __name__ == "__main__":
    main()
