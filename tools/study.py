"""A study (issue 25): the grid {adapter} x {lr} x {seed} of train.py runs under one protocol, then (--best-seeds)
more seeds at each adapter's best lr; one table (OUT/study.md) and every run's record (OUT/study.json).

    python tools/study.py --adapters lora,genlora,lora@r=2@targets=q+k+v --lrs 1e-4,3e-4,1e-3 --seeds 0 \\
        --best-seeds 0,1,2 --out out/study [--gpus N] [--per-gpu K] [--plot] -- --init-from DIR --data ... --steps 1000

Each run is train.py itself in a subprocess (its own out-dir under OUT/runs/, its log next to it), on the GPUs it
sees (K at a time on each, CUDA_VISIBLE_DEVICES set per run), on the CPU where there is none. An adapter entry is
NAME[@KEY=VALUE]...: KEY a train.py flag without its dashes (r is --rank, init is --ranlora-init, a flag that takes
no value stands alone: genlora@freeze-latents), '+' for the commas inside a value (targets=q+k+v). That is how a
LoRA at another rank and targets (the same trainable parameters as another method) joins the grid.

Resumable: a run whose metrics.json exists is never run again, and neither is a failed one (recorded with its last
line; --retry-failed runs those again); an interrupted run resumes from its checkpoint (train.py's own). Run the same
command again to continue; once everything is done it prints the table without training. A change of the train.py
flags under the same OUT is refused (the runs would not be comparable).
"""
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import config  # noqa: E402  (ADAPTERS, parse_args: the grid is checked by train.py's own rules)
import engine  # noqa: E402  (atomic_save)

SPEC_FLAGS = {"r": "--rank", "init": "--ranlora-init"}  # entry key -> train.py flag where the names differ
OWN_FLAGS = ("--adapter", "--lr", "--seed", "--out-dir")  # set per run by the study
TASK_METRIC = "task accuracy"  # chain_sum's exact match; a task whose scorer names its metric (commonsense.py) shows that name
SKIP = "sample,plot"  # after the last step, not needed for the table (train.py --skip; the merge check and rank report stay)


class GridError(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# the grid


def parse_entry(entry):
    """'lora@r=2@targets=q+k+v' -> ('lora', ['--rank', '2', '--targets', 'q,k,v'])."""
    name, *opts = entry.split("@")
    if name not in config.ADAPTERS:
        raise GridError(f"--adapters {entry}: unknown adapter {name!r} (choose from {', '.join(config.ADAPTERS)})")
    flags = []
    for o in opts:
        key, eq, value = o.partition("=")
        if not key:
            raise GridError(f"--adapters {entry}: empty option (write NAME@KEY=VALUE, e.g. lora@r=2)")
        flags += [SPEC_FLAGS.get(key, "--" + key.replace("_", "-"))] + ([value.replace("+", ",")] if eq else [])
    return name, flags


def split_list(flag, text, kind):
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise GridError(f"{flag} {text!r}: empty list")
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise GridError(f"{flag} {text}: not a comma list of {'numbers' if kind is float else 'integers'}") from None
    return list(dict.fromkeys(values))  # in order, without repeats


def check_grid(args, train_flags):
    """Every entry, lr and seed, and the train.py flags, checked before any run starts; GridError names the first problem."""
    entries = [e.strip() for e in (args.adapters or "").split(",") if e.strip()]
    if not entries:
        raise GridError(f"--adapters {args.adapters!r}: empty list")
    lrs, seeds = split_list("--lrs", args.lrs, float), split_list("--seeds", args.seeds, int)
    best_seeds = split_list("--best-seeds", args.best_seeds, int) if args.best_seeds else []
    bad = [lr for lr in lrs if not (lr > 0 and math.isfinite(lr))]
    if bad:
        raise GridError(f"--lrs {args.lrs}: {bad[0]:g} is not a learning rate above 0")
    own = [f for f in train_flags if f.split("=")[0] in OWN_FLAGS]
    if own:
        raise GridError(f"{own[0]} after --: the study sets {', '.join(OWN_FLAGS)} for each run")
    specs = {}
    for e in dict.fromkeys(entries):
        name, flags = parse_entry(e)
        try:  # train.py's own command-line rules, on the command each run would get
            config.setup(config.parse_args(["--adapter", name, "--lr", "1", "--device", "cpu", *flags, *train_flags]))
        except config.UserError as err:
            raise GridError(f"--adapters {e}" + (f" with the train.py flags {' '.join(train_flags)}" if train_flags else "") + f": {err}") from None
        specs[e] = (name, flags)
    return specs, lrs, seeds, best_seeds


# ----------------------------------------------------------------------------------------------
# runs


def run_key(entry, lr, seed):
    return f"{entry}__lr{lr:g}__seed{seed}"


def run_dir(out, entry, lr, seed):
    return Path(out) / "runs" / run_key(entry, lr, seed)


def metrics_path(out, entry, lr, seed, name):
    return run_dir(out, entry, lr, seed) / name / "metrics.json"


def finished(path):
    """train.py writes metrics.json twice: right after saving the adapter, and complete (with wall_s) at the very end."""
    try:
        return "wall_s" in json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False


def state(out, entry, spec, lr, seed):
    """'done' (a complete metrics.json), 'failed' (failed.json) or None (to run, or to resume from its checkpoint)."""
    if finished(metrics_path(out, entry, lr, seed, spec[0])):
        return "done"
    return "failed" if (run_dir(out, entry, lr, seed) / "failed.json").is_file() else None


def last_line(log):
    """The line that says why a run failed: its last `error:` line, else its last non-empty one (progress bars aside)."""
    try:
        lines = [ln.strip() for ln in Path(log).read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(empty log)"])[-1][:500]


def command(spec, lr, seed, rdir, train_flags):
    name, flags = spec
    # stopped after saving its adapter but before its metrics were complete: train.py refuses a finished run unless told
    again = ["--overwrite"] if (rdir / name / "adapter.pt").is_file() and not finished(rdir / name / "metrics.json") else []
    return [sys.executable, str(ROOT / "train.py"), "--adapter", name, "--lr", f"{lr!r}", "--seed", str(seed), "--out-dir", str(rdir),
            "--skip", SKIP, *flags, *train_flags, *again]


def devices(args):
    """One slot per worker: (label, CUDA_VISIBLE_DEVICES value or None for the CPU)."""
    n = args.gpus
    if n is None:
        import torch

        n = torch.cuda.device_count()
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or [str(i) for i in range(n)]
    if n > len(visible):
        raise GridError(f"--gpus {n}: only {len(visible)} GPU(s) visible")
    if n == 0:
        return [("cpu", None)] * args.per_gpu
    return [(f"cuda {visible[g]}", visible[g]) for g in range(n) for _ in range(args.per_gpu)]


def set_parent_death_signal():  # Linux: if the study dies (even by SIGKILL), its runs get SIGTERM: they checkpoint and stop
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch(spec, entry, lr, seed, slot, args, train_flags):
    rdir = run_dir(args.out, entry, lr, seed)
    rdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_MININTERVAL": "10", "PYTHONUNBUFFERED": "1"}  # a log line every 10 s, not every step
    if slot[1] is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot[1]
    elif args.per_gpu > 1 and "OMP_NUM_THREADS" not in env:  # several runs on the CPU share its cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.per_gpu))
    cmd = command(spec, lr, seed, rdir, train_flags)
    log = open(rdir / "log.txt", "a")
    log.write(f"\n$ {' '.join(cmd)}  # on {slot[0]}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    log.flush()
    # its own session: a Ctrl-C at the terminal reaches the study, which stops each run once (SIGTERM)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                            start_new_session=True, preexec_fn=set_parent_death_signal if sys.platform.startswith("linux") else None)
    log.close()
    return proc


def finish_run(proc, started, spec, entry, lr, seed, args):
    """Record a run that ended: its wall time next to metrics.json, or failed.json with its last line."""
    rdir = run_dir(args.out, entry, lr, seed)
    wall = time.time() - started
    if finished(metrics_path(args.out, entry, lr, seed, spec[0])):
        engine.atomic_save({"wall_s": wall, "returncode": proc.returncode}, str(rdir / "run.json"))
        if args.drop_adapters:
            (rdir / spec[0] / "adapter.pt").unlink(missing_ok=True)
        return "done"
    if proc.returncode in (130, -signal.SIGINT, -signal.SIGTERM):  # interrupted: its checkpoint resumes it next time
        return None
    line = last_line(rdir / "log.txt")
    engine.atomic_save({"returncode": proc.returncode, "last_line": line, "wall_s": wall,
                       "diverged": "the loss is" in line}, str(rdir / "failed.json"))
    return "failed"


# ----------------------------------------------------------------------------------------------
# records and the table


def record(out, entry, spec, lr, seed):
    rdir = run_dir(out, entry, lr, seed)
    rec = {"entry": entry, "adapter": spec[0], "lr": lr, "seed": seed, "dir": str(rdir)}
    m_path = metrics_path(out, entry, lr, seed, spec[0])
    if finished(m_path):
        m = json.loads(m_path.read_text())
        run = json.loads((rdir / "run.json").read_text()) if (rdir / "run.json").is_file() else {}
        task_after, task_before = m.get("task") or {}, m.get("task_before") or {}
        rec.update(status="done", rank=m["kwargs"].get("r", default_rank(spec[0])), targets=m["targets"], kwargs=m["kwargs"],
                   trainable_params=m["trainable_params"], val_loss_before=m["val_loss_before"], val_loss_at_init=m["val_loss_at_init"],
                   init_gap_max_abs_logit_diff=m["init_gap_max_abs_logit_diff"], val_curve=[[c["step"], c["val_loss"]] for c in m["curve"]],
                   val_loss=m["val_loss_after"], task_accuracy=task_after.get("accuracy"), task_accuracy_before=task_before.get("accuracy"),
                   task_metric=task_after.get("metric") or task_before.get("metric") or TASK_METRIC,
                   task_sets=per_set(task_after), task_sets_before=per_set(task_before),
                   tokens_per_s=m["tokens_per_s"], wall_s=run.get("wall_s", m.get("wall_s")), train_wall_s=m.get("wall_s"),
                   schedule=m.get("schedule"), steps=m["steps"], errors=m.get("errors") or {}, finish_s=m.get("finish_s"))
    elif (rdir / "failed.json").is_file():
        f = json.loads((rdir / "failed.json").read_text())
        rec.update(status="diverged" if f.get("diverged") else "failed", last_line=f["last_line"], returncode=f["returncode"], wall_s=f.get("wall_s"))
    else:
        rec.update(status="pending")
    return rec


def per_set(result):
    """{set: {scorer metric: accuracy}} of a task result scored per set (commonsense.py: acc, acc_norm, generate), the
    macro average as the set "macro"; {} for a task scored as one set (chain_sum)."""
    sets = {t: {m: v["acc"] for m, v in r.items() if isinstance(v, dict) and "acc" in v} for t, r in (result.get("tasks") or {}).items()}
    return {**sets, "macro": {m: v["acc"] for m, v in result["macro"].items()}} if sets else {}


def default_rank(name):
    import inspect

    return inspect.signature(config.adapter_class(name).__init__).parameters["r"].default


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def summarize(records, entries, lrs, first_seeds):
    """Per entry: its val loss at each lr (mean over the first seeds), its best lr, and mean ± std over every seed at it."""
    out = {}
    for e in entries:
        runs = [r for r in records if r["entry"] == e]
        sweep = {}
        for lr in lrs:
            at = [r for r in runs if r["lr"] == lr and r["seed"] in first_seeds]
            done = [r["val_loss"] for r in at if r["status"] == "done" and math.isfinite(r["val_loss"])]
            sweep[lr] = {"val_loss": mean_std(done)[0], "n": len(done), "diverged": sum(r["status"] == "diverged" for r in at),
                         "failed": sum(r["status"] == "failed" for r in at), "pending": sum(r["status"] == "pending" for r in at)}
        scored = {lr: s["val_loss"] for lr, s in sweep.items() if s["val_loss"] is not None}
        best = min(scored, key=scored.get) if scored else None
        at_best = [r for r in runs if r["lr"] == best and r["status"] == "done"]
        info = next((r for r in runs if r["status"] == "done"), None)
        out[e] = {"sweep": sweep, "best_lr": best, "complete": not any(s["pending"] for s in sweep.values()),
                  "seeds": sorted(r["seed"] for r in at_best),
                  "val_loss": mean_std([r["val_loss"] for r in at_best]), "task_accuracy": mean_std([r["task_accuracy"] for r in at_best]),
                  "sets": {t: {m: mean_std([r["task_sets"].get(t, {}).get(m) for r in at_best]) for m in v}
                           for r in at_best[:1] for t, v in (r.get("task_sets") or {}).items()},
                  "tokens_per_s": mean_std([r["tokens_per_s"] for r in at_best])[0],
                  "init_gap": mean_std([r["init_gap_max_abs_logit_diff"] for r in at_best])[0],
                  "val_loss_at_init": mean_std([r["val_loss_at_init"] for r in at_best])[0],
                  "wall_s": mean_std([r["wall_s"] for r in at_best])[0],
                  "trainable_params": info and info["trainable_params"], "rank": info and info["rank"], "targets": info and info["targets"]}
    return out


def pm(ms, digits, pct=False):
    m, s = ms
    if m is None:
        return "–"
    f = (lambda v: f"{100 * v:.{digits}f}") if pct else (lambda v: f"{v:.{digits}f}")
    return f(m) + (f" ± {f(s)}" if s is not None else "") + ("%" if pct else "")


def matched_lora(e, summary):
    """The LoRA entry on the same targets whose trainable parameters are closest to e's (None for LoRA itself)."""
    s = summary[e]
    if e.split("@")[0] == "lora" or not s["targets"]:
        return None
    cands = [o for o in summary if o.split("@")[0] == "lora" and summary[o]["targets"] == s["targets"] and summary[o]["trainable_params"]]
    return min(cands, key=lambda o: abs(math.log(summary[o]["trainable_params"] / s["trainable_params"])), default=None)


def task_metric(records):
    return next((r["task_metric"] for r in records if r.get("task_metric")), TASK_METRIC)


def table(records, summary, lrs, header):
    lines = header + ["", "## Final val loss at each lr (mean over the first seeds; div: diverged, fail: failed, …: not run yet)", ""]
    lines += ["| adapter | " + " | ".join(f"{lr:g}" for lr in lrs) + " | best lr |", "| --- |" + " ---: |" * (len(lrs) + 1)]
    for e, s in summary.items():
        cells = []
        for lr in lrs:
            c = s["sweep"][lr]
            v = "–" if c["val_loss"] is None else f"{c['val_loss']:.4f}" + (f" (n={c['n']})" if c["n"] > 1 else "")
            cells.append(f"**{v}**" if lr == s["best_lr"] else "div" if c["diverged"] and c["val_loss"] is None else
                         "fail" if c["failed"] and c["val_loss"] is None else "…" if c["pending"] and c["val_loss"] is None else v)
        best = "–" if s["best_lr"] is None else f"{s['best_lr']:g}"
        lines.append(f"| {e} | " + " | ".join(cells) + f" | {best} |")
    lines += ["", "## At each adapter's best lr (mean ± std over seeds)", "",
              f"| adapter | r | targets | trainable params | best lr | seeds | val loss | {task_metric(records)} | vs LoRA at this budget "
              "(Δ val, Δ acc) | init gap max Δlogit | val at init | tokens/s | run wall s |",
              "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for e, s in summary.items():
        ml = matched_lora(e, summary)
        vs = "–"
        if ml and summary[ml]["val_loss"][0] is not None and s["val_loss"][0] is not None:
            da = (s["task_accuracy"][0] - summary[ml]["task_accuracy"][0]) if None not in (s["task_accuracy"][0], summary[ml]["task_accuracy"][0]) else None
            vs = f"{ml}: {s['val_loss'][0] - summary[ml]['val_loss'][0]:+.4f}" + ("" if da is None else f", {100 * da:+.1f} pt")
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {e} | {fmt(s['rank'], '')} | {','.join(s['targets'] or []) or '–'} | {fmt(s['trainable_params'], ',')} | "
                     f"{fmt(s['best_lr'], 'g')} | {','.join(map(str, s['seeds'])) or '–'} | {pm(s['val_loss'], 4)} | {pm(s['task_accuracy'], 1, pct=True)} | {vs} | "
                     f"{fmt(s['init_gap'], '.3g')} | {fmt(s['val_loss_at_init'], '.4f')} | {fmt(s['tokens_per_s'], ',.0f')} | {fmt(s['wall_s'], '.0f')} |")
    lines += set_tables(records, summary)
    failed = [r for r in records if r["status"] in ("failed", "diverged")]
    if failed:
        lines += ["", "## Runs that did not finish", ""] + [f"- {r['entry']} lr {r['lr']:g} seed {r['seed']}: {r['status']}: `{r['last_line']}`" for r in failed]
    errors = [r for r in records if r["status"] == "done" and r.get("errors")]
    if errors:
        lines += ["", "## Runs with a failed step after training (their results stand)", ""]
        lines += [f"- {r['entry']} lr {r['lr']:g} seed {r['seed']}: {k}: `{v[:200]}`" for r in errors for k, v in r["errors"].items()]
    return lines


def set_tables(records, summary):
    """For a task scored per set (commonsense): one table per scorer metric, a column per set and the macro average,
    the base model's row (step 0) above each adapter's at its best lr, in % (mean ± std over seeds)."""
    done = [r for r in records if r["status"] == "done" and r.get("task_sets")]
    if not done:
        return []
    sets = list(dict.fromkeys(t for r in done for t in r["task_sets"]))
    base = done[0]["task_sets_before"]
    lines = []
    for m in dict.fromkeys(m for r in done for v in r["task_sets"].values() for m in v):
        lines += ["", f"## Per set: {m}, at each adapter's best lr (%, mean ± std over seeds)", "",
                  "| adapter | " + " | ".join(sets) + " |", "| --- |" + " ---: |" * len(sets),
                  "| base model | " + " | ".join(pm((base.get(t, {}).get(m), None), 1, pct=True) for t in sets) + " |"]
        lines += [f"| {e} | " + " | ".join(pm(s["sets"].get(t, {}).get(m, (None, None)), 1, pct=True) for t in sets) + " |"
                  for e, s in summary.items()]
    return lines


def header_lines(args, train_flags, records):
    done = [r for r in records if r["status"] == "done"]
    base = [f"{done[0]['val_loss_before']:.4f}" if done else "–", f"{100 * done[0]['task_accuracy_before']:.1f}%" if done and done[0]["task_accuracy_before"] is not None else "–"]
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return [f"# Study: {len(done)} of {len(records)} runs done", "",
            f"{time.strftime('%Y-%m-%d')}, {device_name(args)}, commit {commit or '?'}. ",
            f"train.py flags: `{' '.join(train_flags) or '(defaults)'}`; each run also gets `--adapter --lr --seed --out-dir --skip {SKIP}`. ",
            f"The base model: val loss {base[0]}, {task_metric(records)} {base[1]} (step 0)."]


def device_name(args):
    if args.gpus == 0:
        return platform.processor() or "CPU"
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.split("\n")
        names = [n.strip() for n in names if n.strip()]
        return f"{len(names)} x {names[0]}" if names else "CPU"
    except (OSError, subprocess.SubprocessError):
        return "CPU"


def plot(summary, records, path):
    """Final val loss against lr, one line per adapter; the val curves at each adapter's best lr (mean over seeds); where
    the runs scored a task, its metric against lr (mean over the runs at each lr)."""
    import plots

    plt = plots.pyplot()
    if plt is None:
        return None
    scored = any(r.get("task_accuracy") is not None for r in records)
    fig, (a, b, *t) = plt.subplots(1, 3 if scored else 2, figsize=(21 if scored else 14, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (e, s) in enumerate(summary.items()):
        c = colors[i % len(colors)]
        pts = [(lr, v["val_loss"]) for lr, v in s["sweep"].items() if v["val_loss"] is not None]
        if pts:
            a.plot(*zip(*pts), marker="o", color=c, label=e)
        div = [lr for lr, v in s["sweep"].items() if v["val_loss"] is None and (v["diverged"] or v["failed"])]
        if div and pts:
            a.plot(div, [max(p[1] for p in pts)] * len(div), "x", color=c, ms=9)
        curves = [r["val_curve"] for r in records if r["entry"] == e and r["lr"] == s["best_lr"] and r["status"] == "done"]
        if curves:
            k = min(map(len, curves))
            steps = [p[0] for p in curves[0][:k]]
            vals = [sum(cv[j][1] for cv in curves) / len(curves) for j in range(k)]
            b.plot([0] + steps, [curves and s["val_loss_at_init"]] + vals, color=c, label=f"{e} (lr {s['best_lr']:g}, {len(curves)} seed(s))")
        acc = {}
        for r in records:
            if r["entry"] == e and r["status"] == "done" and r.get("task_accuracy") is not None:
                acc.setdefault(r["lr"], []).append(100 * r["task_accuracy"])
        if t and acc:
            t[0].plot(sorted(acc), [sum(acc[lr]) / len(acc[lr]) for lr in sorted(acc)], marker="o", color=c, label=e)
    if t:
        t[0].set(xscale="log", xlabel="peak learning rate", ylabel=f"{task_metric(records)}, %", title=f"{task_metric(records)} against lr")
    a.set(xscale="log", xlabel="peak learning rate", ylabel="final val loss", title="final val loss against lr (x: diverged or failed)")
    b.set(xlabel="step", ylabel="val loss", title="val loss at each adapter's best lr (mean over seeds)")
    for ax in (a, b, *t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return plots.save(fig, path, plt, dpi=100, bbox_inches="tight")


def write_outputs(args, train_flags, specs, lrs, seeds, best_seeds):
    grid = [(e, lr, s) for e in specs for lr in lrs for s in seeds]
    summary0 = summarize([record(args.out, e, specs[e], lr, s) for e, lr, s in grid], list(specs), lrs, seeds)
    extra = [(e, summary0[e]["best_lr"], s) for e in specs if summary0[e]["complete"] and summary0[e]["best_lr"] is not None for s in best_seeds if s not in seeds]
    records = [record(args.out, e, specs[e], lr, s) for e, lr, s in grid + extra]
    summary = summarize(records, list(specs), lrs, seeds)
    lines = table(records, summary, lrs, header_lines(args, train_flags, records))
    out = Path(args.out)
    engine.atomic_save({"train_flags": train_flags, "adapters": list(specs), "lrs": lrs, "seeds": seeds, "best_seeds": best_seeds,
                       "records": records, "summary": {e: {**s, "sweep": {f"{lr:g}": v for lr, v in s["sweep"].items()}} for e, s in summary.items()}},
                      str(out / "study.json"))
    tmp = out / f"study.md.tmp{os.getpid()}"  # (engine.atomic_save writes text only to .txt)
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out / "study.md")
    return lines, records, summary


# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = config.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s --adapters A,B --lrs X,Y --seeds 0,1 --out DIR [options] -- <train.py flags>")
    p.add_argument("--adapters", required=True, help="comma list of NAME[@KEY=VALUE]... entries (see the top of this file)")
    p.add_argument("--lrs", required=True, help="comma list of peak learning rates (train.py --lr)")
    p.add_argument("--seeds", default="0", help="comma list of seeds for the lr sweep (default: %(default)s)")
    p.add_argument("--best-seeds", help="comma list of seeds to run at each adapter's best lr once its sweep is done (those already run are kept)")
    p.add_argument("--out", required=True, help="the study's folder: runs/, study.json, study.md")
    p.add_argument("--gpus", type=int, help="GPUs to use, the first N visible (default: all visible; 0: the CPU)")
    p.add_argument("--per-gpu", type=int, default=1, help="runs at a time on each GPU (or on the CPU) (default: %(default)s)")
    p.add_argument("--plot", action="store_true", help="OUT/study.png: val loss against lr, and the val curves at each best lr (matplotlib)")
    p.add_argument("--drop-adapters", action="store_true", help="delete each finished run's adapter.pt (keeps OUT small: metrics only)")
    p.add_argument("--retry-failed", action="store_true", help="run the failed and diverged runs again")
    p.add_argument("--dry-run", action="store_true", help="print the runs still to do and their commands, run nothing")
    args = p.parse_args(argv)
    if args.per_gpu < 1 or (args.gpus is not None and args.gpus < 0):
        raise GridError(f"--per-gpu {args.per_gpu} / --gpus {args.gpus}: must be at least 1 / 0")
    return args, train_flags


def stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    procs = {}
    old = signal.signal(signal.SIGTERM, stop)
    try:
        args, train_flags = parse_args(argv)
        specs, lrs, seeds, best_seeds = check_grid(args, train_flags)
        out = Path(args.out)
        cfg = out / "study_config.json"
        if cfg.is_file() and json.loads(cfg.read_text())["train_flags"] != train_flags:
            raise GridError(f"{args.out} holds a study run with other train.py flags ({' '.join(json.loads(cfg.read_text())['train_flags'])}): "
                            "use another --out")
        slots = devices(args)
        if not args.dry_run:
            out.mkdir(parents=True, exist_ok=True)
            engine.atomic_save({"train_flags": train_flags}, str(cfg))
        if args.retry_failed and not args.dry_run:
            for f in out.glob("runs/*/failed.json"):
                f.unlink()
        pending = [(e, lr, s) for e in specs for lr in lrs for s in seeds if state(out, e, specs[e], lr, s) is None]
        staged = set()  # entries whose best-lr seeds are queued

        def stage_two():  # once an entry's sweep is done: its best lr's other seeds
            if not best_seeds:
                return
            summary = summarize([record(out, e, specs[e], lr, s) for e in specs for lr in lrs for s in seeds], list(specs), lrs, seeds)
            for e, s in summary.items():
                if e not in staged and s["complete"]:  # (every lr failed: no best lr, nothing to add)
                    staged.add(e)
                    pending.extend((e, s["best_lr"], sd) for sd in best_seeds if s["best_lr"] is not None and sd not in seeds
                                   and state(out, e, specs[e], s["best_lr"], sd) is None)

        stage_two()

        def todo():  # queued, and the best-lr seeds of the entries whose sweeps are still running
            return len(pending) + sum(len([sd for sd in best_seeds if sd not in seeds]) for e in specs if e not in staged)

        todo_total = todo()
        if args.dry_run:
            for e, lr, s in pending:
                print(" ".join(command(specs[e], lr, s, run_dir(out, e, lr, s), train_flags)))
            print(f"{len(pending)} run(s) to do now" + (f", up to {todo_total - len(pending)} more at the best lrs" if todo_total > len(pending) else ""))
            return 0
        from tqdm import tqdm

        free = list(range(len(slots)))
        bar = tqdm(total=todo_total, desc="study", unit="run", dynamic_ncols=True, disable=todo_total == 0)
        while pending or procs:
            while pending and free:
                e, lr, s = pending.pop(0)
                slot = free.pop(0)
                procs[slot] = (launch(specs[e], e, lr, s, slots[slot], args, train_flags), time.time(), e, lr, s)
            time.sleep(0.2)
            for slot, (proc, started, e, lr, s) in list(procs.items()):
                if proc.poll() is None:
                    continue
                del procs[slot]
                free.append(slot)
                result = finish_run(proc, started, specs[e], e, lr, s, args)
                if result is None:  # stopped from outside, its checkpoint saved: it resumes next time
                    bar.write(f"{e} lr {lr:g} seed {s}: interrupted (run the study again to resume it)")
                    continue
                bar.update(1)
                if result == "failed":
                    bar.write(f"{e} lr {lr:g} seed {s}: failed: {last_line(run_dir(out, e, lr, s) / 'log.txt')}")
                stage_two()
                bar.total = bar.n + len(procs) + todo()
                bar.refresh()
                write_outputs(args, train_flags, specs, lrs, seeds, best_seeds)
        bar.close()
        lines, records, summary = write_outputs(args, train_flags, specs, lrs, seeds, best_seeds)
        if args.plot:
            png = plot(summary, records, str(out / "study.png"))
            lines.append("" if png else "(--plot: pip install matplotlib for study.png)")
        print("\n".join(lines))
        return 0
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except config.UserError as e:  # study.py's own command line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        for proc, *_ in procs.values():  # each run checkpoints at its next step boundary and stops
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, started, e, lr, s in procs.values():
            proc.wait()
            finish_run(proc, started, specs[e], e, lr, s, args)  # one that finished meanwhile is recorded
        try:  # the table so far
            print("\n".join(write_outputs(args, train_flags, specs, lrs, seeds, best_seeds)[0]))
        except Exception as e:  # noqa: BLE001 (stopping: the runs' own files hold everything)
            print(f"(no table: {type(e).__name__}: {e})", file=sys.stderr)
        print("study interrupted: run the same command again to continue (finished runs are kept, interrupted ones resume)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
