"""Analysis maths on inputs with known answers, figures from synthetic data, `mpvg analyze`."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mpvg.analysis import stats
from mpvg.analysis.analyze import FIG2, Loader, find_cell, run_analysis, summary_tables, write_summary
from mpvg.analysis.extract import CellData, summarize
from mpvg.analysis import figures
from mpvg.config import expand_cells, load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def layer_norm(x, gamma, beta, eps=1e-6):
    mu = x.mean(axis=-1, keepdims=True)
    sd = np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    return (x - mu) / sd * gamma + beta


def synthetic_outputs(batch=6, side=4, dim=24, depth=5, prefix=0, with_last_pe=True, seed=0):
    """A forward_analysis-like dict whose PE counterbalances the tokens more with depth.

    Layer l > 0 gets ``pos_l = -(l / (depth - 1)) * m_l + (1 - l / (depth - 1)) * noise`` where
    ``m_l`` is the batch mean of ``LN_l(x_l)``: r goes from about 0 towards exactly -1.
    """
    rng = np.random.default_rng(seed)
    n = prefix + side * side
    base = rng.normal(size=(n, dim))
    base[:, 3] += 6.0  # one high-value dimension, as the paper's heatmaps show
    tokens, pos = [], []
    for l in range(depth):
        t = (1 + 0.2 * l) * base + 0.3 * rng.normal(size=(batch, n, dim))
        tokens.append(t)
        if l == 0:
            pos.append(None)
            continue
        w = l / (depth - 1)
        p = -w * t.mean(axis=0) + (1 - w) * rng.normal(size=(n, dim))
        pos.append(p[None, prefix:])  # PE term without a class-token row
    gamma = 1.0 + 0.1 * rng.normal(size=dim)
    beta = 0.5 * rng.normal(size=dim)
    pre = base * 2 + 0.3 * rng.normal(size=(batch, n, dim))
    post = layer_norm(pre, gamma, beta)
    last = -layer_norm(base[None, prefix:], 1.0, 0.0) if with_last_pe else None
    images = rng.normal(size=(batch, 3, 8 * side, 8 * side))
    out = {"layer_inputs": tokens, "layer_tokens": tokens, "layer_pos": pos, "pre_last_ln": pre,
           "post_last_ln": post, "last_ln_pe": last, "num_prefix_tokens": prefix}
    return out, gamma, beta, images


def synthetic_cell(cell="c", **kw) -> CellData:
    out, gamma, beta, images = synthetic_outputs(**kw)
    return summarize(cell, out, gamma, beta, images, samples=3)


# ----------------------------------------------------------------------------- stats

def test_pearson_known_values():
    x = np.arange(12.0).reshape(3, 4)
    assert stats.pearson(x, -x) == pytest.approx(-1.0)
    assert stats.pearson(x, 2 * x + 3) == pytest.approx(1.0)
    assert math.isnan(stats.pearson(x, np.ones_like(x)))
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])
    assert stats.pearson(a, b) == pytest.approx(0.5)  # by hand: cov 0.5 / (1 * 1)
    with pytest.raises(ValueError, match="shapes differ"):
        stats.pearson(np.zeros(3), np.zeros(4))


def test_pe_built_to_cancel_tokens_gives_minus_one():
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(5, 1 + 9, 8))          # batch 5, class token + 3x3 patches
    cancel = -tokens.mean(axis=0)[None, 1:]           # PE term without the class-token row
    r = stats.layer_correlations([tokens, tokens], [None, cancel], num_patches=9)
    assert r[0] is None
    assert r[1] == pytest.approx(-1.0)


def test_variance_by_hand():
    v = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert stats.variance(v) == pytest.approx(5 / 3)
    assert stats.variance(v, ddof=0) == pytest.approx(5 / 4)
    with pytest.raises(ValueError):
        stats.variance([1.0])


def test_cosine_similarity_known_vectors():
    assert stats.cosine_similarity([1, 0], [0, 1]) == pytest.approx(0.0)
    assert stats.cosine_similarity([1, 1], [2, 2]) == pytest.approx(1.0)
    assert stats.cosine_similarity([1, 0], [1, 1]) == pytest.approx(1 / math.sqrt(2))
    assert stats.cosine_similarity([1, 2], [-1, -2]) == pytest.approx(-1.0)
    assert math.isnan(stats.cosine_similarity([0, 0], [1, 2]))


def test_token_norms_and_grid():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(stats.token_norms(x), [5, 0, 1, 2])
    with_cls = np.vstack([[[100.0, 0.0]], x])  # class token first is dropped
    np.testing.assert_allclose(stats.norm_grid(with_cls, num_patches=4), [[5, 0], [1, 2]])
    batch = np.stack([x, 2 * x])
    np.testing.assert_allclose(stats.norm_grid(batch)[1], [[10, 0], [2, 4]])
    with pytest.raises(ValueError, match="square"):
        stats.norm_grid(x[:3])


def test_last_ln_summary_pooling_and_pe():
    pre = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])     # (1, 3, 2)
    post = np.array([[[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])
    gamma, beta = np.array([1.0, 3.0]), np.array([0.0, 2.0])
    cls = stats.last_ln_summary(pre, post, gamma, beta, num_prefix=1)
    assert cls["cos_before_after"] == pytest.approx(1 / math.sqrt(2))   # row 0: [1,0] vs [1,1]
    assert cls["gamma_var"] == pytest.approx(2.0) and cls["beta_var"] == pytest.approx(2.0)
    gap = stats.last_ln_summary(pre, post, gamma, beta, num_prefix=0)
    # token means: [1/3, 2/3] vs [2/3, 2/3]
    expect = (2 / 9 + 4 / 9) / (math.sqrt(5 / 9) * math.sqrt(8 / 9))
    assert gap["cos_before_after"] == pytest.approx(expect)
    pe = np.tile([4 / 3, -5 / 3], (3, 1))  # output mean becomes [2, -1], orthogonal to [1/3, 2/3]
    with_pe = stats.last_ln_summary(pre, post, gamma, beta, num_prefix=0, last_pe=pe)
    assert with_pe["cos_before_after"] == pytest.approx(0.0, abs=1e-12)
    assert with_pe["cos_before_after_ln_only"] == pytest.approx(expect)


def test_add_last_pe_for_one_token_models():
    post = np.zeros((2, 1, 3))  # CeiT: the Last LN sees the LCA token only
    pe = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    np.testing.assert_allclose(stats.add_last_pe(post, pe, 1)[0, 0], [2, 2, 2])
    with pytest.raises(ValueError, match="tokens after the Last LN"):
        stats.add_last_pe(np.zeros((4, 3)), pe, 1)


# ----------------------------------------------------------------------------- extraction

def test_summarize_synthetic_counterbalancing():
    d = synthetic_cell(prefix=1)
    assert d.layer_corr[0] is None
    assert d.layer_corr[-1] == pytest.approx(-1.0)
    assert d.layer_corr[1] > d.layer_corr[2] > d.layer_corr[3]   # more opposed with depth
    assert d.tokens[0].shape == (16, 24) and d.pre.shape == (17, 24)
    assert d.pre_norms.shape == (3, 4, 4) and d.images.shape == (3, 32, 32, 3)
    assert d.images.min() >= 0 and d.images.max() <= 1
    assert d.last_ln["pooling"] == "class token"
    np.testing.assert_allclose(d.output[1:], d.post[1:] + d.last_pe)
    assert d.numbers()["layer_correlations"] == d.layer_corr


# ----------------------------------------------------------------------------- figures

def _size(path: Path) -> tuple:
    with Image.open(path) as im:
        im.load()
        return im.size


def test_figures_open_with_expected_size(tmp_path):
    gap, cls = synthetic_cell("gap"), synthetic_cell("cls", prefix=1)
    nope = synthetic_cell("nope", with_last_pe=False)
    paths = figures.figure2([("(a)", None), ("(b) PVG", nope), ("(b) MPVG", gap)], tmp_path / "f2")
    # rows: (a) pending shows tokens+PE rows, PVG 2, MPVG 2 -> 6 rows; depth 5 + Last LN = 6 columns
    assert _size(paths[0]) == (round((1.3 * 6 + 3.2) * figures.DPI), round((1.5 * 6 + 1.0) * figures.DPI))
    p4 = figures.figure4({"A": {"PVG": gap.layer_corr, "MPVG": None}, "B": {"PVG": None}}, tmp_path / "f4")
    assert _size(p4[0]) == (700, 320)
    p6 = figures.figure6([("(a)", cls), ("(b)", nope), ("(c)", None)], tmp_path / "f6", {"(a)": {"cos_last_ln": 0.46}})
    assert _size(p6[0]) == (1340, 1000)
    p7 = figures.figure7([("PVG", nope), ("MPVG", gap)], tmp_path / "f7", samples=3)
    assert _size(p7[0]) == (round((1.9 * 5 + 0.9) * 100), round((1.9 * 3 + 0.9) * 100))
    p8 = figures.figure8([("(a)", gap), ("(b)", None)], tmp_path / "f8")
    assert _size(p8[0]) == (1300, round((3.0 * 2 + 0.8) * 100))
    ph = figures.placeholder(tmp_path / "ph", "Figure X", ["no checkpoint"])
    assert _size(ph[0]) == (800, 450)
    for p in [*paths, *p4, *p6, *p7, *p8, *ph]:
        assert p.stat().st_size > 1000
        if p.suffix == ".pdf":
            assert p.read_bytes().startswith(b"%PDF")


def _drawn(fig):
    """Render ``fig`` as save() does (in the figures' style) so every tick label exists."""
    with figures.style():
        fig.canvas.draw()
    return fig


def _maps(fig) -> list:
    """The data images (2-D arrays; not the RGB sample pictures) outside the colourbars."""
    return [im for ax in fig.axes if not hasattr(ax, "_colorbar") for im in ax.get_images()
            if im.get_array().ndim == 2]


def _colorbars(fig) -> list:
    return [ax._colorbar for ax in fig.axes if hasattr(ax, "_colorbar")]


def _fonts_at_least(fig, pt: float) -> list:
    """Every visible, non-empty text (titles, labels, tick labels, legends) smaller than ``pt``."""
    import matplotlib.text

    return [(t.get_text(), t.get_fontsize()) for t in fig.findobj(matplotlib.text.Text)
            if t.get_visible() and t.get_text().strip() and t.get_fontsize() < pt]


def test_figures_are_legible():
    """Colourbars, one shared colour range where panels are compared, token/dimension axes,
    whole-number layer ticks and no text under 8 pt, on the drawn figures."""
    import matplotlib.pyplot as plt

    gap, cls = synthetic_cell("gap"), synthetic_cell("cls", prefix=1)
    nope = synthetic_cell("nope", with_last_pe=False)
    big = synthetic_cell("big", seed=3)
    big.pre = big.pre * 10  # a larger x_{L+1}: the shared range must follow it into every panel
    heat_figs = {
        "figure2": figures.draw_figure2([("(a)", None), ("(b) PVG", nope), ("(b) MPVG", gap)]),
        "figure6": figures.draw_figure6([("(a)", cls), ("(b)", nope), ("(c)", big)], {"(a)": {"cos_last_ln": 0.46}}),
        "figure8": figures.draw_figure8([("(a)", big), ("(b)", gap)]),
        "figure7": figures.draw_figure7([("PVG", nope), ("MPVG", big)], samples=3),
    }
    for name, fig in heat_figs.items():
        _drawn(fig)
        maps = _maps(fig)
        assert maps, name
        clims = {tuple(round(v, 9) for v in im.get_clim()) for im in maps}
        assert len(clims) == 1, f"{name}: panels on different colour ranges {clims}"
        (bar,) = _colorbars(fig)
        assert (round(bar.norm.vmin, 9), round(bar.norm.vmax, 9)) == clims.pop(), name
        assert _fonts_at_least(fig, figures.MIN_FONT) == [], name
    lo, hi = heat_figs["figure6"].axes[0].get_images()[0].get_clim()
    assert hi == pytest.approx(float(np.abs(np.concatenate([big.pre.ravel(), big.output.ravel()])).max())) and lo == -hi
    lo7, hi7 = _maps(heat_figs["figure7"])[0].get_clim()
    assert lo7 == pytest.approx(min(float(nope.post_norms.min()), float(big.post_norms.min()), float(nope.pre_norms.min()), float(big.pre_norms.min())))

    # Token (y) and dimension (x) axes on the tokens x dimensions heatmaps, as in the paper's Figure 2.
    for name in ("figure2", "figure6", "figure8"):
        fig = heat_figs[name]
        axes = [im.axes for im in _maps(fig)]
        for ax in axes:
            n, d = ax.get_images()[0].get_array().shape
            assert list(ax.get_xticks()) == [0, d - 1] and list(ax.get_yticks()) == [0, n - 1], name
        assert {ax.get_xlabel() for ax in axes} >= {"dimension"}, name
        assert any(ax.get_ylabel().startswith("token") for ax in axes), name
    f6_labels = {im.axes.get_ylabel() for im in _maps(heat_figs["figure6"])}
    assert f6_labels == {"token (0 = class token)", "token"}  # (a) keeps the class token as row 0

    # Whole-number layer ticks, also for a 4-layer model (the old axis showed 1.5, 2.5).
    fig4 = _drawn(figures.draw_figure4({"DeiT-Ti": {"PVG": gap.layer_corr, "MPVG": cls.layer_corr},
                                        "DeiT-S": {"PVG": [None, 0.1, 0.2, 0.3], "MPVG": [None, 0.0, -0.1, None]}}))
    for ax in fig4.axes:
        lo, hi = ax.get_xlim()
        labels = [t.get_text().replace("\u2212", "-") for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
        assert labels and all(re.fullmatch(r"-?\d+", x) for x in labels), labels
    assert [t.get_text() for t in fig4.axes[1].get_xticklabels() if 0 <= t.get_position()[0] <= 3] == ["0", "1", "2", "3"]
    assert _fonts_at_least(fig4, figures.MIN_FONT) == []
    plt.close("all")


# ----------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def tiny_params():
    return load_params(PARAMS)


def test_find_cell_by_effective_pe(tiny_params):
    cells = expand_cells(tiny_params)
    assert find_cell(cells, tiny_params, "DeiT-Ti", "MPVG", {}) == "in1k-deit_ti-mpvg"
    assert find_cell(cells, tiny_params, "DeiT-Ti", "MPVG", {"last_ln_pe": 0}) == "in1k-deit_ti-mpvg"
    assert find_cell(cells, tiny_params, "DeiT-Ti", "PVG", {"pool": "token"}) == "in1k-deit_ti-pvg-token"
    assert find_cell(cells, tiny_params, "DeiT-Ti", "PVG", {"hierarchical": False}) is None


def _touch_checkpoint(runs: Path, cid: str, seed: int = 0) -> None:
    path = runs / "train" / cid / f"seed{seed}" / "checkpoint.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"stand-in: the analyzer below does not read it")


def test_run_analysis_pending_partial_and_rebuild(tmp_path, tiny_params):
    cells = expand_cells(tiny_params)
    runs = tmp_path / "runs"
    fake = {"in1k-deit_ti-pvg": synthetic_cell(), "in1k-deit_ti-mpvg": synthetic_cell(seed=1)}
    calls = []

    def analyzer(cid, path):
        calls.append(cid)
        if cid not in fake:
            raise ValueError("broken checkpoint")
        return fake[cid]

    empty = run_analysis(tiny_params, cells, runs, tmp_path / "f0", analyzer)
    assert {v["status"] for v in empty["figures"].values()} == {"pending"}
    assert (tmp_path / "f0" / "figure2.png").is_file() and not calls
    assert "no checkpoint" in empty["missing"]["in1k-deit_ti-pvg"]

    for cid in ("in1k-deit_ti-pvg", "in1k-deit_ti-mpvg", "in1k-deit_s-pvg"):
        _touch_checkpoint(runs, cid)
    res = run_analysis(tiny_params, cells, runs, tmp_path / "f1", analyzer)
    assert res["figures"]["figure7"]["status"] == "complete"
    assert res["figures"]["figure2"]["status"] == "partial"
    assert res["figures"]["figure4"]["status"] == "partial"
    assert res["missing"]["in1k-deit_s-pvg"].startswith("skipped: ValueError: broken checkpoint")
    assert sorted(calls) == sorted(["in1k-deit_ti-pvg", "in1k-deit_ti-mpvg", "in1k-deit_s-pvg"])  # once each
    on_disk = json.loads((tmp_path / "f1" / "analysis.json").read_text())
    assert on_disk["cells"]["in1k-deit_ti-pvg"]["layer_correlations"][-1] == pytest.approx(-1.0)
    assert on_disk["figures"]["figure6"]["paper"]["(b) PVG, GAP"] == {"beta_var": 0.2387, "cos_last_ln": 0.2995}
    write_summary(res, tmp_path / "f1", tiny_params)
    md = (tmp_path / "f1" / "analysis.md").read_text()
    assert "| (c) MPVG | 0.0193 |" in md and "in1k-deit_ti-mpvg" in md
    assert md.count("Scale: tiny.") == 1  # the page's scale notice, once

    again = run_analysis(tiny_params, cells, runs, tmp_path / "f2", analyzer)
    assert again == res
    assert (tmp_path / "f1" / "analysis.json").read_bytes() == (tmp_path / "f2" / "analysis.json").read_bytes()


def test_loader_falls_back_to_second_candidate(tmp_path, tiny_params):
    cells = expand_cells(tiny_params)
    _touch_checkpoint(tmp_path, "in1k-deit_ti-default")  # no GAP-only checkpoint: original Default used
    loader = Loader(tiny_params, cells, tmp_path, lambda cid, p: synthetic_cell(cid))
    cid, data, note = loader.get(FIG2[0])
    assert cid == "in1k-deit_ti-default" and data.cell == "in1k-deit_ti-default" and note == ""


def test_summary_tables_render_as_pipe_tables():
    result = {"figures": {"figure6": {"status": "partial", "panels": [], "paper": {"(c) MPVG": {"beta_var": 0.0193}},
                                      "ours": {"(c) MPVG": {"beta_var": 0.01, "cos_last_ln": float("nan")}}}},
              "cells": {"x": {"layers": 2, "layer_correlations": [None, -0.5]}}}
    status, appendix, corr = summary_tables(result)
    assert appendix.rows[0][1].text == "0.0193" and appendix.rows[0][4].text == "—"
    assert [e.text for e in corr.rows[0]] == ["x", "—", "-0.5000"]


def test_analyze_command_end_to_end_on_tiny_models(tmp_path, monkeypatch):
    """Real tiny DeiT-Ti checkpoints and tiny images through `mpvg analyze`."""
    import timm
    import torch

    import mpvg.models  # noqa: F401
    from mpvg.cli import main
    from mpvg.config import resolve_run
    from mpvg.data.tiny import make_tiny
    from mpvg.run.checkpoint import save_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    params = load_params("params.yaml")
    make_tiny(tmp_path / "data" / "tiny", "imagenet")
    for cid in ("in1k-deit_ti-pvg", "in1k-deit_ti-mpvg"):
        spec = resolve_run(params, cid)
        torch.manual_seed(0)
        model = timm.create_model(spec.model_name, **spec.model_kwargs)
        save_checkpoint(spec.run_dir(0) / "checkpoint.pt", {"model": model.state_dict()})
    assert main(["analyze", "--runs", "runs", "--out", "out", "--batch-size", "8", "--samples", "2"]) == 0
    res = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert res["figures"]["figure7"]["status"] == "complete"
    assert res["figures"]["figure8"]["status"] == "partial"
    cell = res["cells"]["in1k-deit_ti-mpvg"]
    assert cell["batch_size"] == 8 and cell["layers"] == 12 and cell["layer_correlations"][0] is None
    assert all(isinstance(v, float) for v in cell["layer_correlations"][1:])
    assert "corr_post_vs_pe" in cell["last_ln"] and "corr_post_vs_pe" not in res["cells"]["in1k-deit_ti-pvg"]["last_ln"]
    assert _size(tmp_path / "out" / "figure7.png") == (1040, round((1.9 * 2 + 0.9) * 100))
    assert res["figures"]["figure2"]["heading"] == "Figure 2: token embedding and PE per layer"
    assert "One colour scale" in res["figures"]["figure2"]["caption"]
