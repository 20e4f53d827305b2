"""Dev-only, run once (issue 39): commonsense.py's log-likelihoods against lm-evaluation-harness's own HFLM.loglikelihood
on the same requests and the same converted checkpoint (pip install lm-eval; see requirements-dev.txt).

    python tools/lm_eval_check.py --init-from DIR --eval out/commonsense/commonsense_eval.json [--limit 10]

Prints the largest difference of a request's summed log-probability, and how many items' acc and acc_norm choices agree.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import commonsense  # noqa: E402
import task  # noqa: E402
from nanogpt_model import load_llama, load_tokenizer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init-from", required=True, help="a converted HF checkpoint directory (tools/smollm2_to_hf.py)")
    p.add_argument("--eval", required=True, help="an evaluation file (tools/make_task.py commonsense)")
    p.add_argument("--limit", type=int, default=10, help="the first N problems of each set (default: %(default)s)")
    args = p.parse_args(argv)
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    seen, problems = {}, []
    for q in task.load(args.eval)["problems"]:
        if len(seen.setdefault(q["task"], [])) < args.limit:
            seen[q["task"]].append(q)
            problems.append(q)
    t = time.perf_counter()
    ours = commonsense.loglikelihoods(load_llama(args.init_from).eval(), load_tokenizer(args.init_from), problems, "cpu", contextlib.nullcontext)
    t_ours = time.perf_counter() - t
    lm = HFLM(pretrained=args.init_from, device="cpu", dtype="float32", batch_size=8)
    reqs = [Instance("loglikelihood", doc={}, arguments=(c, x), idx=j) for q in problems for j, (c, x) in enumerate(q["requests"])]
    t = time.perf_counter()
    flat = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    t_ref = time.perf_counter() - t
    ref, k = [], 0
    for q in problems:
        ref.append(flat[k : k + len(q["requests"])])
        k += len(q["requests"])
    diff = max(abs(a - b) for x, y in zip(ours, ref) for a, b in zip(x, y))
    argmax = lambda v: max(range(len(v)), key=v.__getitem__)  # noqa: E731
    same = sum(argmax(x) == argmax(y) for x, y in zip(ours, ref))
    norm = lambda v, q: [s / max(1, len(c)) for s, c in zip(v, q["choices"])]  # noqa: E731
    same_norm = sum(argmax(norm(x, q)) == argmax(norm(y, q)) for x, y, q in zip(ours, ref, problems))
    print(f"{len(problems)} problems ({len(reqs)} requests, {len(seen)} sets), torch {torch.__version__}, lm-eval {version()}: "
          f"max |ours - HFLM| of a request's log-likelihood {diff:.2e}; acc choice agrees on {same}/{len(problems)}, "
          f"acc_norm on {same_norm}/{len(problems)}; ours {t_ours:.1f} s, HFLM {t_ref:.1f} s")


def version():
    from importlib.metadata import version as v

    return v("lm-eval")


if __name__ == "__main__":
    main()
