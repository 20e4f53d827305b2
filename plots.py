"""Pictures: what each adapter learned (learned.png, one figure per method, next to its metrics.json) and the
comparison of several methods (compare.png). matplotlib is optional: without it each entry point returns None
and train.py says how to get the figure.

The methods differ in where their nonlinearity sits and what it learns, so each figure draws that nonlinearity
where it acts: LR-LoRA's f on the entries of B A, AuroRA's sigma and RanLoRA's GELU on the activations A x of
validation batches (read by forward hooks), GenLoRA's generators on its latent entries. Below it, the singular
values of dW per module type, against LoRA's from the same output folder where that run exists. The curves come
from each module's own parameters, and wherever the module computes the plotted function itself (sigma, f through
dW, the generated B and A) the figure draws or marks the module's own output: the test suite checks the two agree."""
import io
import math
import os
import textwrap

import torch
import torch.nn as nn
import torch.nn.functional as F

import diagnostics
from adapt import TARGETS
from aurora import AuroRALinear, bspline
from genlora import GenLoRALinear
from lora import LoRALinear
from lrlora import LRLoRALinear, transfer
from ranlora import RanLoRALinear

FIGURE = "learned.png"
TITLES = {
    LoRALinear: "LoRA: ΔW = (α/r) B A",
    LRLoRALinear: "LR-LoRA: ΔW = (α/r) f(B A), one learned f(x) = Σ_k a_k sinc(b_k (x − g_k)) on every entry",
    AuroRALinear: "AuroRA: h = W0 x + (α/r) B σ(A x),  σ(z) = tanh(H tanh z) + W_s Σ_i Bspline(z_i)",
    GenLoRALinear: "GenLoRA: ΔW = (α/r) B A, column i of B and row i of A generated from a latent by φ_i,g",
    RanLoRALinear: "RanLoRA: h = W_P x + s B (v ⊙ GELU(A x)), started from W0's residual SVD part",
}


def pyplot():
    """matplotlib.pyplot on its file-only backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, path, plt, **kw):
    """fig as a PNG of 256 colours (a third of the bytes, no visible change on line plots), written atomically."""
    from PIL import Image  # a dependency of matplotlib itself

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kw)
    plt.close(fig)
    tmp = f"{path}.tmp{os.getpid()}"  # as train.py's atomic_save: a crash never leaves half a figure
    Image.open(buf).convert("RGB").quantize(256).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# what one adapter learned


def plot_adapter(model, adapters, batches, out, base=None, rank=None):
    """out/learned.png for the adapters in model (one method); batches are the validation batches whose
    activations it shows; LoRA's dW for comparison from out/../lora/adapter.pt when that was trained on the
    same base; rank: the rank report if already computed. Returns the figure's path, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    is_lora = isinstance(next(iter(adapters.values())), LoRALinear)
    fig = figure(model, adapters, batches, rank, None if is_lora else lora_reference(out, base))
    return save(fig, os.path.join(out, FIGURE), plt, dpi=90)


def figure(model, adapters, batches, rank=None, reference=None):
    """The figure: on top the method's nonlinearity where it acts, below dW's singular values per module type.
    reference: LoRA's spectra by module name, and a note where there are none (lora_reference)."""
    plt = pyplot()
    cls = type(next(iter(adapters.values())))
    draw = {LRLoRALinear: draw_lrlora, AuroRALinear: draw_aurora, GenLoRALinear: draw_genlora, RanLoRALinear: draw_ranlora}.get(cls)
    rank = rank or diagnostics.rank_report(adapters)
    kinds = len({n.rsplit(".", 1)[-1] for n in adapters})
    heights = ([5.6] if draw else []) + [3.2 if rank["per_module"] else 1.0]  # inches; a one-line note where there is no dW
    fig = plt.figure(figsize=(max(13, 2.6 * kinds), sum(heights)), layout="constrained")
    fig.suptitle(TITLES[cls], fontsize=13)
    rows = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    if draw:
        draw(rows[0], model, adapters, batches)
    draw_spectra(rows[-1], adapters, rank, reference)
    return fig


def layer_of(name):
    return next((int(p) for p in name.split(".") if p.isdigit()), 0)  # layers.3.attn.q_proj -> 3


def short(name):
    return f"layer {layer_of(name)} {name.rsplit('.', 1)[-1]}"  # layers.3.attn.q_proj -> layer 3 q_proj


def spread(names, k):
    """k of the names evenly spread from first to last: a few depths and module types in one figure."""
    return [names[i] for i in sorted({round(j * (len(names) - 1) / max(1, k - 1)) for j in range(k)})]


def cpu(t):  # for drawing and the CPU-side formulas: float64 (after the copy: MPS has no float64)
    return t.detach().cpu().double()


@torch.no_grad()
def bottleneck_inputs(model, modules, batches):
    """{name: the (tokens, r) values A x that each module's nonlinearity sees on the batches}: forward pre-hooks,
    eval mode (no dropout), A cast to the activations' dtype as the modules' own forward does."""
    seen = {n: [] for n in modules}

    def hook(name):
        return lambda m, args: seen[name].append(F.linear(args[0], m.A.to(args[0].dtype)).float().flatten(0, -2).cpu())

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        for x, _ in batches:
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(v) for n, v in seen.items()}


@torch.no_grad()
def draw_lrlora(sub, model, adapters, batches):
    """f over the range of B A's entries for a few layers, the identity (what LoRA applies) for reference, and f(0)
    marked: every entry of B A that is 0 maps to f(0), the all-ones term of dW. The histogram shows where f acts."""
    names = spread(list(adapters), 4)
    axes = sub.subplots(2, len(names), sharex="col", gridspec_kw={"height_ratios": [2.2, 1]}, squeeze=False)
    for col, n in enumerate(names):
        m = adapters[n]
        M = cpu(m.B @ m.A).flatten()
        a, b, g = cpu(m.a), cpu(F.softplus(m.beta)), cpu(m.g)
        x = torch.linspace(min(M.min().item(), 0.0), max(M.max().item(), 0.0), 401, dtype=torch.float64)
        f, f0 = transfer(x, a, b, g), transfer(torch.zeros(1, dtype=torch.float64), a, b, g).item()
        ax = axes[0, col]
        ax.plot(x, x, ls="--", lw=1, color="0.55", label="identity (LoRA: f(x) = x)")
        ax.plot(x, f, lw=2, color="C0", label="learned f(x)", gid=f"f:{n}")
        ax.plot([0], [f0], "o", color="C3", ms=7, label="f(0): the all-ones term (subtracted if centred)", gid=f"f0:{n}")
        said = "centred: subtracted,\nnot in ΔW" if m.center else f"→ {m.scale * f0:+.3g} on every\nentry of ΔW"
        ax.annotate(f"f(0) = {f0:.3g}\n{said}", (0, f0), xytext=(0.04, 0.96),
                    textcoords="axes fraction", va="top", fontsize=8, color="C3", bbox=dict(fc="white", ec="none", alpha=0.8))
        ax.set_title(short(n), fontsize=10)
        ax.grid(alpha=0.3)
        hx = axes[1, col]
        hx.hist(M.numpy(), bins=80, color="C0", alpha=0.7, log=True)
        hx.set_xlabel("x = an entry of B A")
        hx.grid(alpha=0.3)
    axes[0, 0].set_ylabel("f(x)")
    axes[1, 0].set_ylabel("entries (log)")
    sub.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=9, loc="outside lower center", ncol=3)
    sub.suptitle("the learned transfer f over the range of B A's entries (a few layers); below: where those entries lie", fontsize=11)


def aurora_parts(m, z):
    """sigma's two parts at z (..., r): the fixed tanh(H tanh z) and the spline W_s sum_i Bspline(z_i) (Eq. 8),
    zero where an ablation drops one."""
    fixed = m.act(F.linear(m.act(z), m.H.to(z.dtype))) if m.fixed else torch.zeros_like(z)
    spline = F.linear(bspline(z).sum(-2), m.W_s.to(z.dtype)) if m.learnable else torch.zeros_like(z)
    return fixed, spline


@torch.no_grad()
def draw_aurora(sub, model, adapters, batches):
    """sigma's output channel j along input channel j (the others at 0) over the range it saw, split into its two
    parts; grey dots: sigma_j at validation tokens, every channel as it came (the spread is the other channels' share)."""
    names = spread(list(adapters), 2)
    r = adapters[names[0]].r
    dynamic = adapters[names[0]].mode == "dynamic"  # static mode (AuroRA-S): sigma acts on the columns of A, not on A x
    seen = bottleneck_inputs(model, {n: adapters[n] for n in names}, batches) if dynamic else {n: adapters[n].A.T.detach().float().cpu() for n in names}
    cols = [(n, j) for n in names for j in range(min(r, 2))]
    axes = sub.subplots(2, len(cols), sharex="col", gridspec_kw={"height_ratios": [2.2, 1]}, squeeze=False)
    for col, (n, j) in enumerate(cols):
        m, z = adapters[n], seen[n]
        dev = m.A.device
        t = torch.linspace(z[:, j].min().item(), z[:, j].max().item(), 401)  # float32: the module's own precision, on its device
        Z = torch.zeros(len(t), r)
        Z[:, j] = t
        sigma, (fixed, spline) = cpu(m.sigma(Z.to(dev))), (cpu(p) for p in aurora_parts(m, Z.to(dev)))
        some = z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:1500]]
        ax = axes[0, col]
        ax.scatter(some[:, j], cpu(m.sigma(some.to(dev)))[:, j], s=3, color="0.75", rasterized=True, label="σ_j at validation tokens" if dynamic else "σ_j at A's columns")
        ax.plot(t, sigma[:, j], lw=2.2, color="k", label="σ_j = fixed + spline", gid=f"sigma:{n}:{j}")
        ax.plot(t, fixed[:, j], lw=1.5, color="C0", label="fixed: tanh(H tanh z)_j", gid=f"fixed:{n}:{j}")
        ax.plot(t, spline[:, j], lw=1.5, color="C1", label="spline: (W_s Σ_i Bspline(z_i))_j", gid=f"spline:{n}:{j}")
        ax.set_title(f"{short(n)}, channel {j + 1}", fontsize=10)
        ax.grid(alpha=0.3)
        hx = axes[1, col]
        hx.hist(z[:, j].numpy(), bins=80, color="0.45", alpha=0.8)
        hx.set_xlabel(f"z_{j + 1} = (A x)_{j + 1}, validation tokens" if dynamic else f"z_{j + 1}: entries of A's row {j + 1}")
        hx.grid(alpha=0.3)
    axes[0, 0].set_ylabel("σ_j(z_j e_j), other channels 0")
    axes[1, 0].set_ylabel("count")
    sub.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=9, loc="outside lower center", ncol=4, markerscale=3)
    where = "over the range of A x on validation batches" if dynamic else "over the entries of A (static mode: σ(A) x)"
    sub.suptitle(f"σ per output channel {where} (the first {min(r, 2)} of r = {r} channels); below: the histogram of z", fontsize=11)


@torch.no_grad()
def draw_genlora(sub, model, adapters, batches):
    """A few generators' scalar functions phi_{i,g} over [-3, 3] with their SiLU and RBF parts, and the d_g latent
    entries each is evaluated at (dots: the module's own generated entries of B or A)."""
    names = spread(list(adapters), 2)
    axes = sub.subplots(1, 2 * len(names), squeeze=False)[0]
    g = 0  # the first group: every group has its own phi_{i,g}, all alike in kind
    for ax, (n, side) in zip(axes, [(n, s) for n in names for s in ("B", "A")]):
        m = adapters[n]
        z, theta = (m.z_B, m.theta_B) if side == "B" else (m.z_A, m.theta_A)
        d_g = z.shape[0] // m.groups
        groups = F.group_norm(cpu(z)[None], m.groups, eps=m.eps ** 2) if m.normalize else cpu(z)  # Eq. 6 as the module
        x_hat = groups.view(m.groups, d_g)[g]
        generated = cpu(m.generate(z, theta))[g * d_g:(g + 1) * d_g]  # column i: phi_{i,g} at the entries x_hat
        x = torch.linspace(min(-3.0, x_hat.min().item()), max(3.0, x_hat.max().item()), 301, dtype=torch.float64)
        rbf = torch.exp(-((x[:, None] - cpu(m.mu)) / m.h) ** 2)  # Eq. 8
        for i in range(min(m.r, 3)):
            w = cpu(theta[g, :, i])
            silu, bumps = w[0] * F.silu(x), rbf @ w[1:]  # Eq. 7: w_b SiLU(x) + sum_k w_k phi_k(x)
            ax.plot(x, silu + bumps, lw=2, color=f"C{i}", label=f"φ_{i + 1},{g + 1}", gid=f"phi_{side}:{n}:{i}")
            ax.plot(x, silu, lw=1, ls="--", color=f"C{i}")
            ax.plot(x, bumps, lw=1, ls=":", color=f"C{i}")
            ax.plot(x_hat, generated[:, i], "o", ms=5, color=f"C{i}", mec="k", mew=0.5, gid=f"points_{side}:{n}:{i}")
        what = "b_i (column i of B)" if side == "B" else "a_i (row i of A)"
        ax.set_title(f"{short(n)}: {what}", fontsize=10)
        ax.set_xlabel(f"x̂ (z_{side}, group {g + 1}: {d_g} entries)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("φ_i,g(x̂)")
    axes[0].legend(fontsize=8, loc="best")
    sub.suptitle("a few generators φ_i,g (solid) = w_b SiLU(x̂) (dashed) + Σ_k w_k exp(−((x̂−μ_k)/h)²) (dotted); "
                 "dots: the generated entries, the only points where φ is used", fontsize=11)


@torch.no_grad()
def draw_ranlora(sub, model, adapters, batches):
    """GELU(z) against z over the range of A x on validation batches (where GELU departs from the linear map
    the residual init started from), with the histogram of z per channel; and v, the learned modulation, for every module."""
    names = spread(list(adapters), 3)
    seen = bottleneck_inputs(model, {n: adapters[n] for n in names}, batches)
    grid = sub.add_gridspec(2, len(names) + 1, height_ratios=[2.2, 1], width_ratios=[1] * len(names) + [1.5])
    for col, n in enumerate(names):
        m, z = adapters[n], seen[n]
        ax = sub.add_subplot(grid[0, col])
        hx = sub.add_subplot(grid[1, col], sharex=ax)
        t = torch.linspace(z.min().item(), z.max().item(), 401)
        ax.plot(t, t, ls="--", lw=1, color="0.55", label="z (no activation)")
        ax.plot(t, cpu(m.act(t.to(m.A.device))), lw=2, color="C0", label=f"{m.activation.upper()}(z)", gid=f"act:{n}")
        ax.set_title(short(n), fontsize=10)
        ax.grid(alpha=0.3)
        for j in range(min(m.r, 4)):  # more would hide one another
            hx.hist(z[:, j].numpy(), bins=60, histtype="step", lw=1.3, color=f"C{j + 1}", label=f"channel {j + 1}", gid=f"z:{n}:{j}")
        hx.set_xlabel("z = A x, validation tokens")
        hx.grid(alpha=0.3)
        if col == 0:
            ax.set_ylabel("activation")
            hx.set_ylabel("count")
            ax.legend(fontsize=8, loc="lower right")  # GELU's empty corner
            hx.legend(fontsize=7)
    vax = sub.add_subplot(grid[:, -1])
    mods = list(adapters)
    if adapters[mods[0]].v is None:
        vax.axis("off")
        vax.text(0.5, 0.5, "no v: modulation=False\n(Table 6, w/o v)", ha="center", va="center")
    else:
        v = torch.stack([cpu(adapters[n].v) for n in mods])
        for j in range(v.shape[1]):
            vax.plot(range(len(mods)), v[:, j], "o", color=f"C{j + 1}", label=f"v_{j + 1}", gid=f"v:{j}")
        vax.axhline(1.0, ls="--", lw=1, color="0.55", label="init: v = 1")
        every = max(1, len(mods) // 24)  # a LLaMA has 100-odd modules: a readable subset of the names
        vax.set_xticks(range(0, len(mods), every), [short(n) for n in mods[::every]], rotation=90, fontsize=7)
        vax.set(title="v, the modulation of each channel", ylabel="v_j")
        vax.title.set_fontsize(10)
        vax.legend(fontsize=8)
        vax.grid(alpha=0.3)
    sub.suptitle("the nonlinearity where it acts: over the range of A x on validation batches (a few modules); right: v", fontsize=11)


def draw_spectra(sub, adapters, rank, reference):
    """The singular values of dW per module type, one line per layer; LoRA's for the same modules in grey."""
    per_module = rank["per_module"]
    if per_module is None:  # RanLoRA with GELU: no weight-space dW
        ax = sub.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "\n".join(textwrap.wrap(f"No singular values to draw: {rank['reason']}", 150)), ha="center", va="center", fontsize=9)
        return
    ref, note = reference or ({}, None)
    kinds = [f"{t}_proj" for t in TARGETS if any(n.endswith(f".{t}_proj") for n in per_module)]
    axes = sub.subplots(1, len(kinds), squeeze=False, sharey=True)[0]
    everything = [s for st in per_module.values() for s in st["spectrum"]] + [s for sp in ref.values() for s in sp]
    top = max(everything + [1e-30])
    floor = min(1e-4 * top, 1e-3)  # four decades, and the 0.005 threshold in view
    layers = sorted({layer_of(n) for n in per_module})
    import matplotlib  # there: figure() got it from pyplot()
    from matplotlib.ticker import MaxNLocator

    cmap = matplotlib.colormaps["viridis"]  # early layers dark, late ones light
    colors = {k: cmap(0.9 * i / max(1, len(layers) - 1)) for i, k in enumerate(layers)}
    r = next(iter(adapters.values())).r
    shown = 0
    for ax, kind in zip(axes, kinds):
        for n, st in per_module.items():
            if n.endswith("." + kind):
                s = st["spectrum"]
                ax.semilogy(range(1, len(s) + 1), s, marker=".", ms=4, lw=1.3, color=colors[layer_of(n)], label=f"layer {layer_of(n)}", gid=f"spectrum:{n}")
                shown = max(shown, sum(v > floor for v in s), sum(v > floor for v in ref.get(n, [])))
                if n in ref:
                    ax.semilogy(range(1, len(ref[n]) + 1), ref[n], ls="--", lw=1, color="0.5", label="LoRA (same folder), same module", gid=f"lora:{n}")
        ax.axhline(0.005, ls=":", lw=1, color="C3", label="0.005: numerical-rank threshold")
        ax.axvline(r, ls="-.", lw=1, color="0.3", label=f"r = {r}")
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("i")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if note:  # no LoRA to compare with: say so where its lines would be
        axes[0].text(0.97, 0.95, note, transform=axes[0].transAxes, ha="right", va="top", fontsize=8, style="italic")
    for ax in axes:
        ax.set(ylim=(floor, 2 * top), xlim=(0.5, max(shown, r) + 1.5))
    axes[0].set_ylabel("σ_i of ΔW")
    unique = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())}
    order = sorted(unique, key=lambda lab: (not lab.startswith("layer"), lab.startswith("0.0"), lab))  # layers, LoRA, r, threshold
    sub.legend([unique[k] for k in order], order, fontsize=8, loc="outside right upper")
    what = "ΔW = (α/r) B σ(A), the paper's merge," if isinstance(next(iter(adapters.values())), AuroRALinear) else "ΔW"
    sub.suptitle(f"singular values of {what} per module type, one line per layer", fontsize=11)


def lora_reference(out, base):
    """LoRA's singular values per module from the same output folder (out/../lora/adapter.pt), and None; where
    there is no such run on the same base, no values and a note saying why."""
    path = os.path.join(os.path.dirname(os.path.abspath(out)), "lora", "adapter.pt")
    if not os.path.isfile(path):
        return {}, "no LoRA run in this\noutput folder to compare"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # damaged or half-copied: the figure goes on without it (train.py's loader says why, if asked)
        return {}, "the LoRA run in this output\nfolder is unreadable: not compared"
    if not isinstance(ckpt, dict) or ckpt.get("adapter") != "lora" or ckpt.get("base") != base:
        return {}, "the LoRA run in this output\nfolder has another base: not compared"
    spectra = {}
    for n in {k.rsplit(".", 1)[0] for k in ckpt["state"]}:
        A, B = ckpt["state"][f"{n}.A"], ckpt["state"][f"{n}.B"]
        layer = LoRALinear(nn.Linear(A.shape[1], B.shape[0], device="meta"), **ckpt["kwargs"])  # its own scale alpha / r
        layer.load_state_dict({"A": A, "B": B}, strict=False, assign=True)
        spectra[n] = diagnostics.singular_values(layer.delta_weight())[:64].tolist()
    return spectra, None


# ----------------------------------------------------------------------------------------------
# comparing methods


def plot_compare(results, path):
    """The val-loss curves large on top; below, a grid with one panel per module type: the normalized spectrum
    of dW (mean over layers); one legend for all. Returns None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    per_module = {name: (m["rank"] or {}).get("per_module") or {} for name, m in results.items()}
    kinds = [f"{t}_proj" for t in TARGETS if any(n.endswith(f".{t}_proj") for pm in per_module.values() for n in pm)]
    cols = min(3, max(1, len(kinds)))
    rows = math.ceil(len(kinds) / cols)
    fig = plt.figure(figsize=(12, 5 + 2.8 * rows))
    grid = fig.add_gridspec(1 + rows, cols, height_ratios=[2.2] + [1] * rows, hspace=0.55, wspace=0.25)
    colors = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    ax = fig.add_subplot(grid[0, :])
    for name, m in results.items():
        steps, losses = [0] + [c["step"] for c in m["curve"]], [m["val_loss_at_init"]] + [c["val_loss"] for c in m["curve"]]
        label = name if per_module[name] else f"{name} (no weight-space ΔW: no spectrum)"
        ax.plot(steps, losses, marker="o", ms=3, lw=1.8, color=colors[name], label=label)
    ax.set(title="validation loss (one colour per method in every panel)", xlabel="step", ylabel="loss (nats per token)")
    ax.legend(ncol=len(results), loc="upper right", fontsize=10)
    ax.grid(alpha=0.3)
    spectra = {(name, kind): [torch.tensor(s["spectrum"]) for n, s in pm.items() if n.endswith("." + kind)] for name, pm in per_module.items() for kind in kinds}
    shown = max([int((s / s[0].clamp_min(1e-30) > 1e-4).sum()) for ss in spectra.values() for s in ss] or [1])
    for i, kind in enumerate(kinds):
        sax = fig.add_subplot(grid[1 + i // cols, i % cols])
        for name in results:
            ss = spectra.get((name, kind))
            if ss:
                k = min(len(s) for s in ss)
                mean = torch.stack([s[:k] / s[0].clamp_min(1e-30) for s in ss]).mean(0)
                sax.semilogy(range(1, k + 1), mean, marker=".", color=colors[name])
        sax.set(title=f"{kind}: σ_i / σ_1 of ΔW, mean over layers", xlabel="i", ylim=(1e-4, 1.5), xlim=(0.5, shown + 1.5))
        sax.title.set_fontsize(10)
        sax.grid(alpha=0.3)
    return save(fig, path, plt, dpi=100, bbox_inches="tight")
