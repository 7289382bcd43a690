"""The paper's analysis figures (2, 4, 6, 7, 8) drawn from :class:`CellData`, PNG and PDF.

Each ``figure*`` function takes panels as ``(title, CellData or None)``; a ``None`` panel is
drawn as a "pending" box, and a figure whose panels are all ``None`` becomes a placeholder,
so the DAG output always exists. ``draw_figure*`` returns the matplotlib figure (the tests
inspect it); ``figure*`` draws and saves it. Sizes are fixed (no tight bounding box): a
figure's pixel size is its ``figsize * DPI``, which the tests check.

Legibility rules (docs/reports.md): every text is at least :data:`MIN_FONT` pt (at 100 dpi
the PNG shows it at that size at 100 %); every heatmap figure has one colour scale for all
its heatmaps (the panels are compared: before/after the Last LN, PVG vs MPVG) and a colourbar
for it; tokens × dimensions heatmaps have a token (y) and a dimension (x) axis as in the
paper's Figure 2; layer axes have whole-number ticks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mpvg.analysis.extract import CellData  # noqa: E402

DPI = 100
CMAP = "RdBu_r"        # signed values (activations, PE), symmetric around 0
NORM_CMAP = "viridis"  # token norms (non-negative)
MIN_FONT = 8           # pt; no text of a figure is smaller
STYLE = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": MIN_FONT,
         "ytick.labelsize": MIN_FONT, "legend.fontsize": MIN_FONT, "figure.titlesize": 11}
Panel = tuple  # (title, CellData | None)


def style():
    """The rc context every figure is drawn and saved in (font sizes >= MIN_FONT)."""
    return plt.rc_context(STYLE)


def save(fig, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` (no creation date, so rebuilds compare equal)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    with style():
        fig.savefig(png, dpi=DPI, metadata={"Software": None})
        fig.savefig(pdf, dpi=DPI, metadata={"CreationDate": None, "Creator": None, "Producer": None})
    plt.close(fig)
    return [png, pdf]


def placeholder(stem: Path, title: str, reasons: Sequence[str]) -> list[Path]:
    """A figure that says which inputs are pending (written when none of them exists)."""
    with style():
        fig = plt.figure(figsize=(8, 4.5))
        fig.text(0.5, 0.8, title, ha="center", va="center", fontsize=13, wrap=True)
        fig.text(0.5, 0.6, "pending", ha="center", va="center", fontsize=28, color="0.4")
        fig.text(0.5, 0.3, "\n".join(reasons)[:1500], ha="center", va="center", fontsize=MIN_FONT, wrap=True)
    return save(fig, stem)


def _pending(ax, text: str = "pending") -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="0.4", transform=ax.transAxes)


def shared_range(arrays: Sequence[Optional[np.ndarray]]) -> float:
    """max |value| over every given array (the symmetric colour range they share); 1.0 if none."""
    tops = [float(np.nanmax(np.abs(a))) for a in arrays if a is not None and a.size and np.isfinite(a).any()]
    top = max(tops, default=0.0)
    return top if top > 0 else 1.0


def _colorbar(fig, rect: Sequence[float], vmin: float, vmax: float, cmap: str, label: str):
    """A colourbar in its own axes at ``rect`` (figure fraction) for the range ``vmin``..``vmax``."""
    cax = fig.add_axes(rect)
    bar = fig.colorbar(ScalarMappable(norm=Normalize(vmin, vmax), cmap=cmap), cax=cax)
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=MIN_FONT)
    return bar


def _heat(ax, arr: Optional[np.ndarray], title: str, vmax: float, empty: str = "no PE") -> bool:
    """A tokens (y) x dimensions (x) heatmap on the shared range ±``vmax``; False if not drawn.

    Ticks mark the first and last token / dimension; :func:`_label_outer` names the axes.
    """
    ax.set_title(title, fontsize=MIN_FONT)
    if arr is None or arr.size == 0:
        _pending(ax, empty if arr is None else "n/a")
        return False
    n, d = arr.shape
    ax.imshow(arr, aspect="auto", interpolation="nearest", cmap=CMAP, vmin=-vmax, vmax=vmax)
    ax.set_xticks([0, d - 1])
    ax.set_yticks([0, n - 1])
    ax.tick_params(length=2, pad=1)
    return True


def _label_outer(axes: np.ndarray, drawn: np.ndarray) -> None:
    """Tick labels and axis names on the outer drawn heatmaps: the first of each row (token) and
    the lowest of each column (dimension); the inner ones keep their ticks without labels."""
    rows, cols = drawn.shape
    for i in range(rows):
        first = next((j for j in range(cols) if drawn[i, j]), None)
        for j in range(cols):
            if not drawn[i, j]:
                continue
            if j == first:
                axes[i, j].set_ylabel("token", labelpad=0)
            else:
                axes[i, j].set_yticklabels([])
    for j in range(cols):
        lowest = next((i for i in reversed(range(rows)) if drawn[i, j]), None)
        for i in range(rows):
            if not drawn[i, j]:
                continue
            if i == lowest:
                axes[i, j].set_xlabel("dimension", labelpad=0)
            else:
                axes[i, j].set_xticklabels([])


def _r(v: Optional[float]) -> str:
    return "r = n/a" if v is None or v != v else f"r = {v:+.3f}"


def _patch(d: CellData, arr: np.ndarray) -> np.ndarray:
    return arr[d.num_prefix:]


def draw_figure2(panels: Sequence[Panel]):
    """Per-layer heatmaps of the batch-mean token embedding LN_l(x_l) and of the PE term.

    One row of token maps per structure, plus a row of PE maps for a layer-wise one; the
    last column is the Last LN (LN(x_{L+1}) and the PE added after it). PE panels carry r.
    One colour scale for every panel.
    """
    depth = max((len(d.tokens) for _, d in panels if d is not None), default=0)
    rows = [(t, d, kind) for t, d in panels
            for kind in (("tokens", "pe") if d is None or any(p is not None for p in d.pos) else ("tokens",))]
    ncols = depth + 1

    def cell(d: Optional[CellData], kind: str, l: int):
        """(array, title) of one panel."""
        last = l == depth
        if kind == "tokens":
            arr = _patch(d, d.post) if last else (d.tokens[l] if l < len(d.tokens) else None)
            return arr, "Last LN" if last else f"layer {l}"
        arr = d.last_pe if last else (d.pos[l] if l < len(d.pos) else None)
        r = d.last_ln.get("corr_post_vs_pe") if last else (d.layer_corr[l] if l < len(d.layer_corr) else None)
        return arr, (_r(r) if arr is not None else "")

    vmax = shared_range([cell(d, kind, l)[0] for _, d, kind in rows if d is not None for l in range(ncols)])
    with style():
        width = 1.3 * ncols + 3.2  # 2.3 in on the left for the row names, 0.9 in on the right for the colourbar
        fig, axes = plt.subplots(len(rows), ncols, figsize=(width, 1.5 * len(rows) + 1.0), squeeze=False)
        drawn = np.zeros((len(rows), ncols), dtype=bool)
        for i, (title, d, kind) in enumerate(rows):
            axes[i, 0].annotate(f"{title}\n{'token embedding' if kind == 'tokens' else 'PE'}", xy=(-0.45, 0.5),
                                xycoords="axes fraction", ha="right", va="center", fontsize=9)
            for l in range(ncols):
                if d is None:
                    _pending(axes[i, l])
                    continue
                arr, label = cell(d, kind, l)
                drawn[i, l] = _heat(axes[i, l], arr, label, vmax)
        _label_outer(axes, drawn)
        fig.suptitle("Figure 2: mean token embedding (tokens × dimensions) and PE per layer; "
                     "r = correlation; one colour scale")
        fig.subplots_adjust(left=2.3 / width, right=1 - 0.9 / width, top=0.88, bottom=0.08,
                            wspace=0.12, hspace=0.55)
        _colorbar(fig, [1 - 0.7 / width, 0.12, 0.12 / width, 0.72], -vmax, vmax, CMAP, "value")
    return fig


def figure2(panels: Sequence[Panel], stem: Path) -> list[Path]:
    return save(draw_figure2(panels), stem)


def draw_figure4(series: dict):
    """Per-layer correlation between LN_l(x_l) and LN'_l(pos): ``{model: {method: [r or None]}}``."""
    models = list(series)
    with style():
        fig, axes = plt.subplots(1, len(models), figsize=(3.5 * len(models), 3.2), squeeze=False)
        for ax, model in zip(axes[0], models):
            methods = series[model]
            ax.set_title(model, fontsize=10)
            ax.axhline(0.0, color="0.7", lw=0.8)
            drawn = False
            depth = max((len(c) for c in methods.values() if c is not None), default=0)
            for method, corr in methods.items():
                if corr is None:
                    continue
                xs = [l for l, v in enumerate(corr) if v is not None]
                ax.plot(xs, [corr[l] for l in xs], marker="o", ms=3, label=method)
                drawn = True
            missing = [m for m, c in methods.items() if c is None]
            if not drawn:
                _pending(ax, "pending: " + ", ".join(missing))
                continue
            if missing:
                ax.text(0.02, 0.02, "pending: " + ", ".join(missing), transform=ax.transAxes,
                        fontsize=MIN_FONT, color="0.4")
            ax.set_xlim(-0.5, depth - 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(-1.05, 1.05)
            ax.set_xlabel(f"layer (0-{depth - 1})")
            ax.set_ylabel("correlation r")
            ax.legend()
        fig.suptitle("Figure 4: correlation of token embedding and PE after LN, per layer")
        fig.subplots_adjust(left=0.07, right=0.98, top=0.82, bottom=0.17, wspace=0.3)
    return fig


def figure4(series: dict, stem: Path) -> list[Path]:
    return save(draw_figure4(series), stem)


def draw_figure6(panels: Sequence[Panel], paper: Optional[dict] = None):
    """Last LN: heatmaps before/after, gamma and beta per dimension, their variances, cosine.

    ``paper`` maps a panel title to the paper's ``{"beta_var": .., "cos_last_ln": ..}``. All
    heatmaps share one colour scale; the gamma row shares its y axis, and so does the beta row.
    """
    paper = paper or {}
    vmax = shared_range([a for _, d in panels if d is not None for a in (d.pre, d.output)])
    with style():
        fig, axes = plt.subplots(4, len(panels), figsize=(4.2 * len(panels) + 0.8, 10.0), squeeze=False)
        for j, (title, d) in enumerate(panels):
            col = axes[:, j]
            if d is None:
                for ax in col:
                    _pending(ax)
                col[0].set_title(f"{title}\npending", fontsize=9)
                continue
            s = d.last_ln
            ref = paper.get(title, {})
            ref_txt = ", ".join(f"paper {k}={v:.4f}" for k, v in ref.items() if v is not None)
            # Each column labels its own token axis: (a) keeps the class token as row 0, GAP models have none.
            _heat(col[0], d.pre, "", vmax)
            _heat(col[1], d.output, "after the Last LN" + (" (+ PE)" if d.last_pe is not None else ""), vmax)
            for ax in col[:2]:
                ax.set_ylabel("token (0 = class token)" if d.num_prefix else "token", labelpad=0)
            col[0].set_xticklabels([])
            col[1].set_xlabel("dimension", labelpad=0)
            dims = np.arange(d.gamma.size)
            col[2].bar(dims, d.gamma, width=1.0, color="tab:blue")
            col[2].set_title(f"gamma: var = {s['gamma_var']:.4f}", fontsize=9)
            col[3].bar(dims, d.beta, width=1.0, color="tab:red")
            col[3].set_title(f"beta: var = {s['beta_var']:.4f}", fontsize=9)
            col[3].set_xlabel("dimension")
            col[0].set_title(f"{title}\ncos(before, after) = {s['cos_before_after']:.4f} ({s['pooling']})"
                             + (f"\n{ref_txt}" if ref_txt else "") + "\n\nbefore the Last LN ($x_{L+1}$)", fontsize=9)
        for row in (axes[2], axes[3]):
            shown = [ax for ax, (_, d) in zip(row, panels) if d is not None]
            for ax in shown[1:]:
                ax.sharey(shown[0])
        fig.suptitle("Figure 6: Last LN heatmaps (batch mean; one colour scale), gamma and beta, cosine similarity")
        width = 4.2 * len(panels) + 0.8
        fig.subplots_adjust(left=0.5 / width, right=1 - 0.9 / width, top=0.83, bottom=0.06, hspace=0.55,
                            wspace=0.2)
        _colorbar(fig, [1 - 0.7 / width, 0.53, 0.12 / width, 0.25], -vmax, vmax, CMAP, "value")
    return fig


def figure6(panels: Sequence[Panel], stem: Path, paper: Optional[dict] = None) -> list[Path]:
    return save(draw_figure6(panels, paper), stem)


def draw_figure7(panels: Sequence[Panel], samples: int = 4):
    """Per-token norm maps (sqrt(N) x sqrt(N)) before and after the Last LN, per sample image.

    Every norm map (before/after, each method, each image) shares one colour scale.
    """
    present = [d for _, d in panels if d is not None]
    n = min([samples] + [d.images.shape[0] for d in present]) if present else samples
    maps_all = [m[:n] for d in present for m in (d.pre_norms, d.post_norms) if m is not None]
    lo = min((float(m.min()) for m in maps_all), default=0.0)
    hi = max((float(m.max()) for m in maps_all), default=1.0)
    hi = hi if hi > lo else lo + 1.0
    ncols = 1 + 2 * len(panels)
    width = 1.9 * ncols + 0.9
    with style():
        fig, axes = plt.subplots(n, ncols, figsize=(width, 1.9 * n + 0.9), squeeze=False)
        for i in range(n):
            ref = present[0] if present else None
            if ref is not None:
                axes[i, 0].imshow(ref.images[i], interpolation="nearest")
                axes[i, 0].set_axis_off()
            else:
                _pending(axes[i, 0])
            if i == 0:
                axes[i, 0].set_title("image", fontsize=9)
            for j, (title, d) in enumerate(panels):
                for k, (name, maps) in enumerate((("before", None if d is None else d.pre_norms),
                                                   ("after", None if d is None else d.post_norms))):
                    ax = axes[i, 1 + 2 * j + k]
                    if maps is None:
                        _pending(ax)
                    else:
                        ax.imshow(maps[i], cmap=NORM_CMAP, vmin=lo, vmax=hi, interpolation="nearest")
                        ax.set_xticks([])
                        ax.set_yticks([])
                    if i == 0:
                        ax.set_title(f"{title}\n{name} Last LN", fontsize=9)
        fig.suptitle("Figure 7: token norms before / after the Last LN (same images, one colour scale)")
        fig.subplots_adjust(left=0.02, right=1 - 0.9 / width, top=1 - 0.9 / (1.9 * n + 0.9), bottom=0.02,
                            wspace=0.1, hspace=0.15)
        _colorbar(fig, [1 - 0.75 / width, 0.15, 0.12 / width, 0.6], lo, hi, NORM_CMAP, "token L2 norm")
    return fig


def figure7(panels: Sequence[Panel], stem: Path, samples: int = 4) -> list[Path]:
    return save(draw_figure7(panels, samples), stem)


def draw_figure8(panels: Sequence[Panel]):
    """Last-LN heatmaps: x_{L+1}, LN(x_{L+1}), the PE added after it, and their sum, with r.

    One colour scale for all eight heatmaps.
    """
    def arrays(d: CellData) -> list:
        return [_patch(d, d.pre), _patch(d, d.post), d.last_pe, _patch(d, d.output)]

    vmax = shared_range([a for _, d in panels if d is not None for a in arrays(d)])
    with style():
        fig, axes = plt.subplots(len(panels), 4, figsize=(13.0, 3.0 * len(panels) + 0.8), squeeze=False)
        drawn = np.zeros((len(panels), 4), dtype=bool)
        for i, (title, d) in enumerate(panels):
            row = axes[i]
            row[0].annotate(title, xy=(-0.2, 0.5), xycoords="axes fraction", ha="right", va="center",
                            fontsize=9, rotation=90)
            if d is None:
                for ax in row:
                    _pending(ax)
                continue
            s = d.last_ln
            titles = [f"before the Last LN\n{_r(s.get('corr_pre_vs_pe'))} with PE",
                      f"after the Last LN\n{_r(s.get('corr_post_vs_pe'))} with PE",
                      "PE added after the Last LN", "output (after LN + PE)"]
            for j, (arr, t) in enumerate(zip(arrays(d), titles)):
                drawn[i, j] = _heat(row[j], arr, t, vmax)
        _label_outer(axes, drawn)
        fig.suptitle("Figure 8: PE in the Last LN, layer-wise vs non-layer-wise (tokens × dimensions, "
                     "one colour scale)")
        fig.subplots_adjust(left=0.08, right=0.91, top=0.86, bottom=0.08, wspace=0.12, hspace=0.5)
        _colorbar(fig, [0.93, 0.15, 0.01, 0.65], -vmax, vmax, CMAP, "value")
    return fig


def figure8(panels: Sequence[Panel], stem: Path) -> list[Path]:
    return save(draw_figure8(panels), stem)
