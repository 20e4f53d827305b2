"""What train.py measures on a trained adapter: the rank of its dW, merged vs unmerged, and the table that
compares several methods (the pictures are in plots.py). Everything runs where the model lives, in float32."""
import time

import torch
import torch.nn.functional as F

from adapt import merged, put
from lrlora import LRLoRALinear, transfer_at_zero


# ----------------------------------------------------------------------------------------------
# rank diagnostics: what the papers' rank claims are about


def rank_stats(dw, threshold=0.005):
    """Numerical rank (singular values above 0.005, GenLoRA's Fig. 4), stable rank ||dW||_F^2 / ||dW||_2^2
    (LR-LoRA's Eq. 5) and energy sum(sigma^2) = ||dW||_F^2 (GenLoRA's Table 9) of one update."""
    s = singular_values(dw.detach().float())
    energy = torch.linalg.vector_norm(dw.detach(), dtype=torch.float64).item() ** 2
    return {"numerical_rank": int((s > threshold).sum()), "stable_rank": energy / s[0].item() ** 2 if s[0] > 0 else 0.0,
            "energy": energy, "spectrum": s[:64].tolist()}


def singular_values(dw, k=72):
    """dW's singular values in float32 on its device. Most methods' dW has rank <= r: the range of dW times k
    random vectors then holds all of dW (residual at float32 noise), and the small k x n projection has the
    same singular values, for a fraction of a full SVD's cost on a 2048 x 8192 weight. A dense dW (LR-LoRA's
    f(BA)) fails that check and takes the full SVD."""
    if min(dw.shape) <= 2 * k:
        return torch.linalg.svdvals(dw)
    omega = torch.randn(dw.shape[1], k, device=dw.device, generator=torch.Generator(dw.device).manual_seed(0))
    q = torch.linalg.qr(dw @ omega).Q
    proj = q.T @ dw
    captured = torch.linalg.matrix_norm(dw - q @ proj) <= 1e-5 * torch.linalg.matrix_norm(dw)
    return torch.linalg.svdvals(proj if captured else dw)


@torch.no_grad()
def transfer_point(adapters):
    """LR-LoRA's transfer where it acts, summarized over its modules (mean, min, max): f(0), the all-ones term of the
    literal dW (scale f(0) on every entry; subtracted when centred), f'(0), which scales LoRA's gradient for A and B,
    and the span max - min of B A's entries, the stretch of f that is used. Empty for the other methods."""
    per = [(*transfer_at_zero(m.a, F.softplus(m.beta), m.g), (lambda lo_hi: lo_hi[1] - lo_hi[0])(torch.aminmax(m.B @ m.A)))
           for m in adapters.values() if isinstance(m, LRLoRALinear)]
    if not per:
        return {}
    stats = torch.tensor([[float(v) for v in p] for p in per], dtype=torch.float64)
    return {key: {"mean": col.mean().item(), "min": col.min().item(), "max": col.max().item()}
            for key, col in zip(("f0", "f_prime0", "ba_span"), stats.T)}


APPROXIMATE = "the paper's static merge (AuroRA dynamic), an approximation: not the dW of the model trained"


@torch.no_grad()
def rank_report(adapters):
    """Per-module diagnostics and their means; a method with no weight-space dW says why instead. approximate: dW is
    an inexact merge's (AuroRA dynamic: the paper's static form), not the update of the model trained."""
    per_module = {}
    for n, a in adapters.items():
        try:
            per_module[n] = rank_stats(a.delta_weight())
        except NotImplementedError as e:
            return {"per_module": None, "mean": None, "reason": str(e)}
    mean = {k: sum(m[k] for m in per_module.values()) / len(per_module) for k in ("numerical_rank", "stable_rank", "energy")}
    return {"per_module": per_module, "mean": mean, "reason": None, "transfer": transfer_point(adapters),
            "approximate": not all(a.exact_merge for a in adapters.values())}


def rank_lines(rep, title):
    """The rank report as a table, one line per module and their mean."""
    if rep["reason"]:
        return [f"{title}: no weight-space dW. {rep['reason']}"]
    lines = [f"{title}: {'module':<28} {'num.rank':>8} {'stable rk':>9} {'energy':>9}"]
    for n, st in [*rep["per_module"].items(), ("mean", rep["mean"])]:
        lines.append(f"  {n:<28} {st['numerical_rank']:>8.4g} {st['stable_rank']:>9.2f} {st['energy']:>9.3g}")
    for key, what in (("f0", "f(0)"), ("f_prime0", "f'(0)"), ("ba_span", "span of B A")):
        if key in rep.get("transfer", {}):
            st = rep["transfer"][key]
            lines.append(f"  {what:<12} mean {st['mean']:+.4g}, min {st['min']:+.4g}, max {st['max']:+.4g} over the modules")
    return lines + ([f"  dW is {APPROXIMATE}"] if rep.get("approximate") else [])


# ----------------------------------------------------------------------------------------------
# the merge check


@torch.no_grad()
def merge_check(model, adapters, x, y):
    """Merged vs unmerged, eval mode, float32, on the model's device, on a few held-out sequences x (enough to
    see a 1e-4 difference, cheap on a 1B model). Exact methods must agree to 1e-4 relative on the logits;
    approximate ones report their gap; a method with no weight-space form says why and what keeping it costs."""
    model.float().eval()  # training is over: compare in float32
    unmerged = model(x)
    loss = lambda logits: F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    exact = all(a.exact_merge for a in adapters.values())
    try:
        with merged(model, adapters, exact_only=False):
            merged_logits = model(x)
    except NotImplementedError as e:
        with_adapter = tokens_per_s(model, x)
        put(model, {n: a.base for n, a in adapters.items()})
        without = tokens_per_s(model, x)
        put(model, adapters)
        return {"exact": False, "max_abs_logit_diff": None, "relative_diff": None, "val_loss_unmerged": loss(unmerged), "val_loss_merged": None,
                "tokens": x.numel(), "reason": str(e), "inference_tokens_per_s": {"with_adapter": with_adapter, "base_layers_only": without}}
    diff = (merged_logits - unmerged).abs().max().item()
    rel = diff / unmerged.abs().max().item()
    reason = None if exact else "approximate: merged() is the method's static inference form, not its training-time forward"
    return {"exact": exact, "max_abs_logit_diff": diff, "relative_diff": rel, "val_loss_unmerged": loss(unmerged), "val_loss_merged": loss(merged_logits),
            "tokens": x.numel(), "reason": reason, "passed": (rel <= 1e-4) if exact else None}


def tokens_per_s(model, x, reps=3):
    model(x)  # warm-up
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        model(x)
    sync()
    return reps * x.numel() / (time.perf_counter() - t)


def merge_line(m):
    if m["max_abs_logit_diff"] is None:
        t = m["inference_tokens_per_s"]
        return (f"merge: none. {m['reason']}\n  the adapter stays at inference: {t['with_adapter']:,.0f} tokens/s with it vs "
                f"{t['base_layers_only']:,.0f} without ({t['base_layers_only'] / t['with_adapter']:.2f}x)")
    kind = "exact" if m["exact"] else "approximate (the paper's static inference form)"
    return (f"merge ({kind}): max |dlogits| = {m['max_abs_logit_diff']:.3g} (relative {m['relative_diff']:.2g}), "
            f"loss unmerged {m['val_loss_unmerged']:.4f} vs merged {m['val_loss_merged']:.4f} ({m['tokens']} held-out tokens)")


# ----------------------------------------------------------------------------------------------
# comparing methods: one table (the figure: plots.plot_compare)


def finish_lines(m, out, figure, skipped_plot):
    """What train.py prints after a run: the losses and speed, task accuracy, the merge check, the sample, what it saved."""
    lines = [f"val loss {m['val_loss_before']:.4f} -> {m['val_loss_after']:.4f}; {m['tokens_per_s']:,.0f} tokens/s; "
             f"after the last step: {', '.join(f'{k} {v:.2f} s' for k, v in m['finish_s'].items())}"]
    if m.get("task"):
        lines.append(f"task accuracy {m['task_before']['accuracy']:.1%} -> {m['task']['accuracy']:.1%} "
                     f"({m['task']['n']} problems of {m['task_file']}, {m['task']['seconds']:.1f} s)")
    if m["merge"]:
        lines.append(merge_line(m["merge"]))
    if m["sample"] is not None:
        lines.append(f"sample: {m['sample']!r}"[:400])
    fig = f", {figure}" if m["plot"] else "" if "plot" in m["errors"] or skipped_plot else f" (pip install matplotlib for {figure})"
    return lines + [f"saved {out}/adapter.pt, metrics.json" + (", sample.txt" if m["sample"] is not None else "") + fig]



def compare_table(results):
    """One row per method: parameters, loss, speed, merge and the rank diagnostics of its dW, marked * where that dW
    is an inexact merge's; then the notes under the table."""
    head = f"{'method':<9} {'trainable':>10} {'val before':>10} {'val after':>9} {'tok/s':>8}  {'merge':<26} {'num.rank':>8} {'stable rk':>9} {'energy':>9}"
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        mean, merge = (m["rank"] or {}).get("mean"), m["merge"]
        ranks = f"{mean['numerical_rank']:>8.1f} {mean['stable_rank']:>9.2f} {mean['energy']:>9.3g}" if mean else f"{'no weight-space dW':>28}"
        merge = ("(merge check failed)" if merge is None else "none (stays at inference)" if merge["max_abs_logit_diff"] is None
                 else "exact" if merge["exact"] else f"gap {merge['max_abs_logit_diff']:.2g}")
        mark = " *" if mean and m["rank"].get("approximate") else ""
        lines.append(f"{name:<9} {m['trainable_params']:>10,} {m['val_loss_before']:>10.4f} {m['val_loss_after']:>9.4f} {m['tokens_per_s']:>8,.0f}  {merge:<26} {ranks}{mark}")
    notes = ["rank columns: mean over adapted modules of dW's singular values > 0.005, ||dW||_F^2/||dW||_2^2, sum of sigma^2"]
    return lines + notes + [f"* rank columns of {APPROXIMATE}"] * any(line.endswith(" *") for line in lines)

