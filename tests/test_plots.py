"""plots.py.

Run alone: python -m pytest -q tests/test_plots.py (test_all.py runs every topic)."""
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import adapt
import plots
import train
from aurora import AuroRALinear
from genlora import GenLoRALinear
from lora import LoRALinear
from lrlora import LRLoRALinear
from ranlora import RanLoRALinear

from conftest import FAST, randomize_, tiny_gpt
from tests.test_aurora import aurora_sigma_ref
from tests.test_genlora import genlora_reference_factors


# ----------------------------------------------------------------------------------------------
# plots.py: what each method learned (learned.png)
# The figure is written after training and by --plot, and a run without matplotlib still succeeds. Where a figure
# plots a function, the drawn data is checked against the module's own output or an independent computation here.
# Run: python -m pytest -q test_all.py -k plot


def plot_lines_when_saved(monkeypatch):
    """{gid: y data} of every line of each figure plots.save writes, in order: what was drawn, read before it is a PNG."""
    drawn, real = [], plots.save

    def save(fig, path, plt, **kw):
        drawn.append({line.get_gid(): np.asarray(line.get_ydata(), dtype=np.float64) for ax in fig.axes for line in ax.lines if line.get_gid()})
        return real(fig, path, plt, **kw)

    monkeypatch.setattr(plots, "save", save)
    return drawn


@pytest.mark.slow
def test_plot_learned_png_after_training_and_again_from_the_saved_adapter(all_run, tiny_text, in_process, capsys, monkeypatch):
    """--plot draws the adapter saved in the file: its dW spectra are the ones the training run measured on the trained
    adapters (metrics.json), and RanLoRA's v (no weight-space dW) is the file's v."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    out, printed = all_run
    drawn = plot_lines_when_saved(monkeypatch)
    for name in train.ADAPTERS:
        png = out / name / plots.FIGURE
        m = json.loads((out / name / "metrics.json").read_text())
        assert m["plot"] == str(png) and "plot" in m["finish_s"] and not m["errors"], (name, m["plot"], m["errors"])
        assert f"saved {out / name}/adapter.pt, metrics.json, sample.txt, {plots.FIGURE}" in printed
        w, h = Image.open(png).size
        assert w > 800 and h > 200 and png.stat().st_size < 200_000, (name, w, h)
        png.unlink()  # --plot draws it again from adapter.pt alone, on the base and data given
        capsys.readouterr()
        assert in_process(["--plot", str(out / name / "adapter.pt"), "--data", tiny_text, *FAST]) == 0
        assert png.exists() and f"saved {png}" in capsys.readouterr().out, name
        lines = drawn[-1]
        if m["rank"]["per_module"] is None:  # RanLoRA with GELU: its v, for every module, as saved
            saved = torch.load(out / name / "adapter.pt")["state"]
            v = np.stack([saved[k].double().numpy() for k in saved if k.endswith(".v")])
            assert (np.abs(v - 1) > 1e-4).any()  # trained away from its init, v = 1
            for j in range(v.shape[1]):
                assert np.allclose(lines[f"v:{j}"], v[:, j], rtol=1e-6, atol=0), f"--plot {name}: the v drawn is not adapter.pt's v"
        for n, st in (m["rank"]["per_module"] or {}).items():
            assert max(st["spectrum"]) > 1e-5  # trained: a fresh adapter's dW would be 0 (or another one)
            assert np.allclose(lines[f"spectrum:{n}"], st["spectrum"], rtol=1e-4, atol=1e-6 * max(st["spectrum"])), \
                f"--plot {name}: the dW spectrum drawn for {n} is not that of the adapter saved in adapter.pt (as training measured it)"
    assert (out / "compare.png").exists()  # plot_compare, moved to plots.py, still draws


@pytest.mark.slow
def test_plot_lora_reference_is_the_same_folders_lora_run_or_a_note(all_run, tmp_path):
    """GenLoRA's figure compares against LoRA's dW from out/lora/adapter.pt: the values LoRA's own run measured."""
    out, _ = all_run
    lora = json.loads((out / "lora" / "metrics.json").read_text())
    spectra, note = plots.lora_reference(out / "genlora", lora["base"])
    assert note is None and spectra.keys() == lora["rank"]["per_module"].keys()
    for n, s in spectra.items():
        np.testing.assert_allclose(s, lora["rank"]["per_module"][n]["spectrum"], rtol=1e-4, atol=1e-6)
    spectra, note = plots.lora_reference(out / "genlora", "another base")
    assert spectra == {} and "another base" in note
    spectra, note = plots.lora_reference(tmp_path / "genlora", lora["base"])  # no lora/ next to it: said, not invented
    assert spectra == {} and "no LoRA run" in note
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter.pt").write_bytes(b"half a file")  # damaged: no comparison, and no failure
    spectra, note = plots.lora_reference(tmp_path / "genlora", lora["base"])
    assert spectra == {} and "unreadable" in note
    # a LoRA run at its own settings (r = 4, alpha = 3: scale 0.75, not the default 2): dW = (alpha / r) B A from the file
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g)
    (tmp_path / "custom" / "lora").mkdir(parents=True)
    torch.save({"adapter": "lora", "targets": ["q"], "kwargs": {"r": 4, "alpha": 3.0}, "base": "a base",
                "state": {"h.0.attn.q_proj.A": A, "h.0.attn.q_proj.B": B}}, tmp_path / "custom" / "lora" / "adapter.pt")
    spectra, note = plots.lora_reference(tmp_path / "custom" / "genlora", "a base")
    want = np.linalg.svd(0.75 * B.double().numpy() @ A.double().numpy(), compute_uv=False)
    assert note is None and list(spectra) == ["h.0.attn.q_proj"]
    np.testing.assert_allclose(spectra["h.0.attn.q_proj"], want, rtol=1e-5, atol=1e-6 * want[0], err_msg="LoRA's reference spectrum ignores the run's r or alpha")


def test_plot_without_matplotlib_the_run_succeeds_and_says_how(tmp_path, tiny_text, in_process, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert plots.pyplot() is None
    assert in_process(["--adapter", "lora,ranlora", "--data", tiny_text, *FAST, "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for name in ("lora", "ranlora"):
        assert (tmp_path / name / "adapter.pt").exists() and not (tmp_path / name / plots.FIGURE).exists()
        assert json.loads((tmp_path / name / "metrics.json").read_text())["plot"] is None
    assert printed.count(f"(pip install matplotlib for {plots.FIGURE})") == 2 and "pip install matplotlib for compare.png" in printed
    assert in_process(["--plot", str(tmp_path / "lora" / "adapter.pt"), *FAST]) == 2
    assert "--plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


def test_plot_failure_keeps_the_adapter(tmp_path, tiny_text, in_process, monkeypatch, capsys):
    monkeypatch.setattr(plots, "plot_adapter", lambda *a: 1 / 0)
    assert in_process(["--adapter", "lora", "--data", tiny_text, *FAST, "--out-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "error: lora: the plot step failed" in captured.err and "pip install" not in captured.out
    assert (tmp_path / "lora" / "adapter.pt").exists() and json.loads((tmp_path / "lora" / "metrics.json").read_text())["merge"]["passed"]


def plot_model(cls, targets, **kw):
    """A tiny GPT with the adapter in, every adapter parameter moved away from its init, and two token batches."""
    model = tiny_gpt()
    adapters = adapt.inject(model, cls, targets, kw)
    randomize_(model, std=0.3, trainable=True)  # the model is not frozen: every weight moves
    g = torch.Generator().manual_seed(0)
    return model, adapters, [(torch.randint(0, 256, (2, 32), generator=g), None) for _ in range(2)]


def plot_data(fig, gid):
    """x, y of the one line drawn with this gid, as float64 arrays."""
    found = [line for ax in fig.axes for line in ax.lines if line.get_gid() == gid]
    assert len(found) == 1, (gid, len(found))
    return tuple(np.asarray(v, dtype=np.float64) for v in found[0].get_data())


def plot_drawn(fig, prefix):
    """The module names (and channels) of the lines whose gid starts with prefix."""
    return [line.get_gid().split(":", 1)[1] for ax in fig.axes for line in ax.lines if (line.get_gid() or "").startswith(prefix + ":")]


def bottleneck_seen(model, adapters, batches):
    """{name: A x} on the batches, by a hook written here: the range a figure must span."""
    seen = {n: [] for n in adapters}
    hooks = [m.register_forward_hook(lambda m, args, out, n=n: seen[n].append((args[0] @ m.A.T).detach().reshape(-1, m.r))) for n, m in adapters.items()]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


@pytest.mark.parametrize("center", [False, True], ids=["literal", "centred"])
def test_plot_lrlora_f_is_the_layers_f_over_the_range_of_BA(center):
    plt = pytest.importorskip("matplotlib.pyplot")
    model, adapters, batches = plot_model(LRLoRALinear, ["q", "up"], center=center)
    fig = plots.figure(model, adapters, batches)
    drawn = plot_drawn(fig, "f")
    assert len(drawn) == 4
    for n in drawn:
        m = adapters[n]
        x, f = plot_data(fig, f"f:{n}")
        M = (m.B @ m.A).detach().double().flatten().numpy()
        assert x[0] == pytest.approx(min(M.min(), 0)) and x[-1] == pytest.approx(max(M.max(), 0))  # B A's range, 0 in it
        a, b, g = m.a.detach().double().numpy(), F.softplus(m.beta).detach().double().numpy(), m.g.double().numpy()
        np.testing.assert_allclose(f, (a * np.sinc(b * (x[:, None] - g))).sum(1), rtol=1e-9, atol=1e-12)  # Eq. 4 in numpy
        # the layer's own f, through its table: dW / scale at the entries of B A lies on the plotted curve (less f(0) if centred)
        f0 = (a * np.sinc(-b * g)).sum() if center else 0.0
        np.testing.assert_allclose(np.interp(M, x, f) - f0, (m.delta_weight() / m.scale).double().flatten().numpy(), rtol=0, atol=1e-4 * np.abs(f).max())
        x0, f0 = plot_data(fig, f"f0:{n}")
        assert x0[0] == 0 and f0[0] == pytest.approx((a * np.sinc(-b * g)).sum(), rel=1e-9)  # f(0): the all-ones term
    plt.close(fig)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_plot_aurora_fixed_plus_spline_is_the_modules_sigma_over_the_z_it_saw(mode):
    plt = pytest.importorskip("matplotlib.pyplot")
    model, adapters, batches = plot_model(AuroRALinear, ["q", "v"], mode=mode)
    fig = plots.figure(model, adapters, batches)
    seen = bottleneck_seen(model, adapters, batches) if mode == "dynamic" else {n: m.A.T.detach().double() for n, m in adapters.items()}
    drawn = plot_drawn(fig, "sigma")
    assert len(drawn) == 4  # two modules x two channels
    for key in drawn:
        n, j = key.rsplit(":", 1)
        m, j = adapters[n], int(j)
        t, sigma = plot_data(fig, f"sigma:{key}")
        _, fixed = plot_data(fig, f"fixed:{key}")
        _, spline = plot_data(fig, f"spline:{key}")
        np.testing.assert_allclose(fixed + spline, sigma, rtol=1e-5, atol=1e-6)  # the two parts make up sigma (float32, as the module)
        assert t[0] == pytest.approx(seen[n][:, j].min().item(), rel=1e-5) and t[-1] == pytest.approx(seen[n][:, j].max().item(), rel=1e-5)
        z = torch.zeros(len(t), m.r, dtype=torch.float64)
        z[:, j] = torch.from_numpy(t)
        np.testing.assert_allclose(sigma, m.sigma(z)[:, j].detach().numpy(), rtol=1e-5, atol=1e-6)  # the module's sigma
        H = m.H.detach().double().numpy()
        np.testing.assert_allclose(fixed, np.tanh(np.tanh(z.numpy()) @ H.T)[:, j], rtol=1e-5, atol=1e-6)  # tanh(H tanh z)
        every = slice(None, None, 40)  # the float64 Cox-de Boor reference, at a few points
        np.testing.assert_allclose(sigma[every], aurora_sigma_ref(z[every], m.H, m.W_s)[:, j].numpy(), rtol=1e-5, atol=1e-6)
    plt.close(fig)


def test_plot_genlora_generators_pass_through_the_generated_entries():
    plt = pytest.importorskip("matplotlib.pyplot")
    model, adapters, batches = plot_model(GenLoRALinear, ["q", "v"], groups=4)
    for m in adapters.values():
        m.eps = 0.0  # the module's normalization is then Eq. 6 as the reference writes it (see the GenLoRA tests)
    fig = plots.figure(model, adapters, batches)
    for side in ("B", "A"):
        drawn = plot_drawn(fig, f"phi_{side}")
        assert len(drawn) == 2 * 3  # two modules x three generators
        for key in drawn:
            n, i = key.rsplit(":", 1)
            m, i = adapters[n], int(i)
            x, phi = plot_data(fig, f"phi_{side}:{key}")
            xd, yd = plot_data(fig, f"points_{side}:{key}")
            z, theta = (m.z_B, m.theta_B) if side == "B" else (m.z_A, m.theta_A)
            d_g = z.shape[0] // m.groups
            ref = genlora_reference_factors(z, theta, m.groups, m.num_centers, 0.0)[:d_g, i]  # group 1, generator i, Eqs. 5-9
            np.testing.assert_allclose(yd, ref, rtol=1e-4, atol=1e-5)  # the dots: the entries of B (A) the module generates
            np.testing.assert_allclose(np.interp(xd, x, phi), yd, rtol=0, atol=2e-3 * np.abs(phi).max())  # the curve passes through them
            assert x[0] <= -3 and x[-1] >= 3
    plt.close(fig)


def test_plot_ranlora_gelu_over_the_range_of_Ax_and_v():
    plt = pytest.importorskip("matplotlib.pyplot")
    model, adapters, batches = plot_model(RanLoRALinear, ["q", "up"])
    fig = plots.figure(model, adapters, batches)
    seen = bottleneck_seen(model, adapters, batches)
    drawn = plot_drawn(fig, "act")
    assert len(drawn) == 3
    for n in drawn:
        z, y = plot_data(fig, f"act:{n}")
        assert z[0] == pytest.approx(seen[n].min().item(), rel=1e-5) and z[-1] == pytest.approx(seen[n].max().item(), rel=1e-5)
        np.testing.assert_allclose(y, 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2))), rtol=1e-5, atol=1e-6)  # exact GELU
    # v as each module applies it, recovered from its forward alone: the output is affine in v, so with y_e the output at
    # v = e_j (y_0 at v = 0), y - y_0 = sum_j v_j (y_e_j - y_0), solved for v by least squares
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    for i, m in enumerate(adapters.values()):
        at = lambda v: functional_call(m, {"v": v}, (x,)).detach().double().flatten().numpy()
        y0 = at(torch.zeros(2))
        basis = np.stack([at(torch.eye(2)[j]) - y0 for j in range(2)], 1)
        applied = np.linalg.lstsq(basis, at(m.v.detach()) - y0, rcond=None)[0]
        drawn_v = [plot_data(fig, f"v:{j}")[1][i] for j in range(2)]
        np.testing.assert_allclose(drawn_v, applied, rtol=1e-4, atol=1e-6, err_msg=f"the v drawn for module {i} is not the v its forward applies")
    plt.close(fig)


def test_plot_spectra_are_the_singular_values_of_each_modules_dW():
    plt = pytest.importorskip("matplotlib.pyplot")
    model, adapters, batches = plot_model(LoRALinear, ["q", "k", "up"])
    fig = plots.figure(model, adapters, batches)
    for n, m in adapters.items():
        _, s = plot_data(fig, f"spectrum:{n}")
        want = np.linalg.svd(m.delta_weight().detach().double().numpy(), compute_uv=False)[:64]
        np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-6 * want[0])  # below r: float32 noise, ~eps * sigma_1
    plt.close(fig)
