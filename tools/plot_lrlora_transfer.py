"""Dev-only: LR-LoRA's f(0) and f'(0) over training (train.py records them at each evaluation, summarized over the
modules), from the curve-*.json files of docs/study/lrlora-centred/, into docs/lrlora-transfer.png.

    python tools/plot_lrlora_transfer.py [docs/study/lrlora-centred] [docs/lrlora-transfer.png]
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import plots  # noqa: E402


def label(run):  # lrlora@lrlora-center__lr0.001__seed0 -> centred, lr 0.001
    entry, lr, _ = run.split("__")
    return f"{'centred' if 'lrlora-center' in entry else 'literal'}, identity start, lr {lr[2:]}"


def main(src="docs/study/lrlora-centred", dst="docs/lrlora-transfer.png"):
    plt = plots.pyplot()
    if plt is None:
        sys.exit("error: matplotlib is not installed (pip install matplotlib)")
    runs = [json.loads(p.read_text()) for p in sorted(Path(src).glob("curve-*.json"))]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, r in enumerate(runs):
        c = f"C{i}"
        steps = [0] + [p["step"] for p in r["curve"]]
        for ax, key in zip(axes, ("f0", "f_prime0")):
            at0 = 0.0 if key == "f0" else 1.0  # step 0: every run here starts from the identity a (f(0) = 0, f'(0) = 1)
            band = [(at0, at0, at0)] + [(p[key]["min"], p[key]["mean"], p[key]["max"]) for p in r["curve"]]
            lo, mean, hi = zip(*band)
            ax.fill_between(steps, lo, hi, color=c, alpha=0.2)
            ax.plot(steps, mean, color=c, label=f"{label(r['run'])}: {r['task_accuracy']:.1%}")
        axes[2].plot([p["step"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], color=c, label=label(r["run"]))
    axes[0].set(title="f(0), mean and min-max over the 210 modules", xlabel="step")
    axes[1].set(title="f'(0): the factor on LoRA's gradient for A, B", xlabel="step")
    axes[2].set(title="val loss", xlabel="step", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    print(plots.save(fig, Path(dst), plt, dpi=100, bbox_inches="tight"))


if __name__ == "__main__":
    main(*sys.argv[1:])
