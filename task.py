"""A task metric besides the val loss: exact-match accuracy of greedy answers to generated problems.

The problems come from reasoning-gym (tools/make_task.py writes them, on a machine that has it; nothing here
needs it). One problem is one line of text, `<question> = <answer>`: the training text is such lines, and a
problem is asked as the line break that precedes every line in that text, then `<question> =`. The model's
answer is what it generates greedily up to the next line break, scored by exact match after normalization.

    train.py --init-from DIR --data task.txt --task-eval task_eval.json    # accuracy before and after, in metrics.json
"""
import json
import time
from decimal import Decimal, InvalidOperation

import torch

import commonsense


def line(question, answer):  # one problem of the training text
    return f"{question} = {answer}\n"


def prompt(question):  # a problem asked: what precedes its answer in the training text
    return f"\n{question} ="


def normalize(text):
    """The answer in a generated text: its first line, stripped, without thousands commas; a number in canonical
    form ("+01,000.00" -> "1000", "-0" -> "0"), anything else as it is. reasoning-gym's chain_sum scores 1.0 exactly
    when these agree (its score_answer tolerates the same sign, zeros, commas and decimals: a test checks)."""
    s = text.split("\n", 1)[0].strip().replace(",", "")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return s
    if not d.is_finite():
        return s
    d = d.normalize() if d else Decimal(0)  # "-0", "0.00" -> "0"
    return str(d.quantize(1)) if d == d.to_integral_value() else format(d, "f")


def exact_match(generated, answer):
    return normalize(generated) == normalize(answer)


def load(path):
    """A task file: JSON with "problems": [{"question", "answer"}, ...] (and what made it, for the record), or a
    commonsense evaluation file ("format": "commonsense", commonsense.check)."""
    bad = lambda e: ValueError(f"{path}: not a task file ({type(e).__name__}: {e}); tools/make_task.py writes one")  # noqa: E731
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise bad(e) from None
    if isinstance(spec, dict) and spec.get("format") == "commonsense":
        commonsense.check(spec, path)  # its ValueError names the file and the problem
        return spec
    try:
        problems = spec["problems"]
        if not problems or not all(isinstance(p["question"], str) and isinstance(p["answer"], str) for p in problems):
            raise ValueError("no problems, or a problem without a string question and answer")
    except (ValueError, KeyError, TypeError) as e:
        raise bad(e) from None
    return spec


@torch.no_grad()
def accuracy(model, tok, problems, device, autocast, batch_size=512):
    """Greedy answers to every problem, scored: {"accuracy", "correct", "n", "seconds", "examples"}. Commonsense
    problems (multiple choice) go to commonsense.score, whose result has "accuracy" (its headline metric) too.

    The models here take no attention mask, so prompts are batched by token length (no padding) and each new token
    runs the whole prefix again (no KV cache: answers are a few tokens). A batch stops once every row has produced a
    line break, or after the longest answer's token count + 2 new tokens."""
    if "requests" in problems[0]:
        return commonsense.score(model, tok, problems, device, autocast)
    was_training = model.training
    model.eval()
    t = time.perf_counter()
    ids = [tok.encode(prompt(p["question"])) for p in problems]
    max_new = max(len(tok.encode(f" {p['answer']}\n")) for p in problems) + 2
    limit = getattr(model, "max_seq_len", None)
    if limit is not None and max(map(len, ids)) + max_new > limit:
        raise ValueError(f"a prompt of {max(map(len, ids))} tokens + {max_new} new ones exceeds the model's context ({limit})")
    newline = {}  # token id -> whether its text holds a line break
    out = [None] * len(problems)
    by_len = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    for rows in by_len.values():
        for k in range(0, len(rows), batch_size):
            chunk = rows[k : k + batch_size]
            idx = torch.tensor([ids[i] for i in chunk], device=device)
            done = torch.zeros(len(chunk), dtype=torch.bool)
            new = []
            for _ in range(max_new):
                with autocast():
                    nxt = model(idx)[:, -1, :].float().argmax(-1)
                idx = torch.cat([idx, nxt[:, None]], dim=1)
                new.append(nxt.cpu())
                for j, n in enumerate(new[-1].tolist()):
                    if n not in newline:
                        newline[n] = "\n" in tok.decode([n])
                    done[j] |= newline[n]
                if done.all():
                    break
            gen = torch.stack(new, 1).tolist()
            for j, i in enumerate(chunk):
                out[i] = tok.decode(gen[j])
    model.train(was_training)
    ok = [exact_match(g, p["answer"]) for g, p in zip(out, problems)]
    examples = [{"question": p["question"], "answer": p["answer"], "generated": g.split("\n", 1)[0]} for g, p in zip(out[:5], problems)]
    return {"accuracy": sum(ok) / len(ok), "correct": sum(ok), "n": len(ok), "seconds": time.perf_counter() - t, "examples": examples}
