"""The paper's analysis figures (2, 4, 6, 7, 8) drawn from :class:`CellData`, PNG and PDF.

Each ``figure*`` function takes panels as ``(title, CellData or None)``; a ``None`` panel is
drawn as a "pending" box, and a figure whose panels are all ``None`` becomes a placeholder,
so the DAG output always exists. Sizes are fixed (no tight bounding box): a figure's pixel
size is its ``figsize * DPI``, which the tests check.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mpvg.analysis.extract import CellData  # noqa: E402

DPI = 100
CMAP = "RdBu_r"
Panel = tuple  # (title, CellData | None)


def save(fig, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` (no creation date, so rebuilds compare equal)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    fig.savefig(png, dpi=DPI, metadata={"Software": None})
    fig.savefig(pdf, dpi=DPI, metadata={"CreationDate": None, "Creator": None, "Producer": None})
    plt.close(fig)
    return [png, pdf]


def placeholder(stem: Path, title: str, reasons: Sequence[str]) -> list[Path]:
    """A figure that says which inputs are pending (written when none of them exists)."""
    fig = plt.figure(figsize=(8, 4.5))
    fig.text(0.5, 0.8, title, ha="center", va="center", fontsize=13, wrap=True)
    fig.text(0.5, 0.6, "pending", ha="center", va="center", fontsize=28, color="0.4")
    fig.text(0.5, 0.3, "\n".join(reasons)[:1500], ha="center", va="center", fontsize=8, wrap=True)
    return save(fig, stem)


def _pending(ax, text: str = "pending") -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="0.4", transform=ax.transAxes)


def _heat(ax, arr: Optional[np.ndarray], title: str = "", empty: str = "no PE") -> None:
    """A tokens x dims heatmap, colour range symmetric around 0 at the panel's max |value|."""
    if arr is None or arr.size == 0:
        _pending(ax, empty if arr is None else "n/a")
        ax.set_title(title, fontsize=7)
        return
    m = float(np.nanmax(np.abs(arr))) or 1.0
    ax.imshow(arr, aspect="auto", interpolation="nearest", cmap=CMAP, vmin=-m, vmax=m)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _r(v: Optional[float]) -> str:
    return "r = n/a" if v is None or v != v else f"r = {v:+.3f}"


def _patch(d: CellData, arr: np.ndarray) -> np.ndarray:
    return arr[d.num_prefix:]


def figure2(panels: Sequence[Panel], stem: Path) -> list[Path]:
    """Per-layer heatmaps of the batch-mean token embedding LN_l(x_l) and of the PE term.

    One row of token maps per structure, plus a row of PE maps for a layer-wise one; the
    last column is the Last LN (LN(x_{L+1}) and the PE added after it). PE panels carry r.
    """
    depth = max((len(d.tokens) for _, d in panels if d is not None), default=0)
    rows = [(t, d, kind) for t, d in panels
            for kind in (("tokens", "pe") if d is None or any(p is not None for p in d.pos) else ("tokens",))]
    ncols = depth + 1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.3 * ncols + 1.2, 1.35 * len(rows) + 0.8), squeeze=False)
    for i, (title, d, kind) in enumerate(rows):
        axes[i, 0].annotate(f"{title}\n{'token embedding' if kind == 'tokens' else 'PE'}", xy=(-0.15, 0.5),
                            xycoords="axes fraction", ha="right", va="center", fontsize=7)
        for l in range(ncols):
            ax = axes[i, l]
            last = l == depth
            if d is None:
                _pending(ax)
                continue
            if kind == "tokens":
                arr = _patch(d, d.post) if last else (d.tokens[l] if l < len(d.tokens) else None)
                _heat(ax, arr, "Last LN" if last else f"layer {l}")
            else:
                arr = d.last_pe if last else (d.pos[l] if l < len(d.pos) else None)
                r = d.last_ln.get("corr_post_vs_pe") if last else (d.layer_corr[l] if l < len(d.layer_corr) else None)
                _heat(ax, arr, _r(r) if arr is not None else "")
    fig.suptitle("Figure 2: mean token embedding (tokens x dims) and PE per layer; r = correlation", fontsize=10)
    fig.subplots_adjust(left=0.14, right=0.99, top=0.9, bottom=0.03, wspace=0.08, hspace=0.45)
    return save(fig, stem)


def figure4(series: dict, stem: Path) -> list[Path]:
    """Per-layer correlation between LN_l(x_l) and LN'_l(pos): ``{model: {method: [r or None]}}``."""
    models = list(series)
    fig, axes = plt.subplots(1, len(models), figsize=(3.5 * len(models), 3.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        methods = series[model]
        ax.set_title(model, fontsize=10)
        ax.axhline(0.0, color="0.7", lw=0.8)
        drawn = False
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
            ax.text(0.02, 0.02, "pending: " + ", ".join(missing), transform=ax.transAxes, fontsize=7, color="0.4")
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("layer")
        ax.set_ylabel("correlation")
        ax.legend(fontsize=7)
    fig.suptitle("Figure 4: correlation of token embedding and PE after LN, per layer", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.82, bottom=0.16, wspace=0.3)
    return save(fig, stem)


def figure6(panels: Sequence[Panel], stem: Path, paper: Optional[dict] = None) -> list[Path]:
    """Last LN: heatmaps before/after, gamma and beta per dimension, their variances, cosine.

    ``paper`` maps a panel title to the paper's ``{"beta_var": .., "cos_last_ln": ..}``.
    """
    paper = paper or {}
    fig, axes = plt.subplots(4, len(panels), figsize=(4.2 * len(panels), 9.0), squeeze=False)
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
        _heat(col[0], d.pre, "before the Last LN (x_{L+1})")
        _heat(col[1], d.output, "after the Last LN" + (" (+ PE)" if d.last_pe is not None else ""))
        dims = np.arange(d.gamma.size)
        col[2].bar(dims, d.gamma, width=1.0, color="tab:blue")
        col[2].set_title(f"gamma: var = {s['gamma_var']:.4f}", fontsize=8)
        col[3].bar(dims, d.beta, width=1.0, color="tab:red")
        col[3].set_title(f"beta: var = {s['beta_var']:.4f}", fontsize=8)
        col[3].set_xlabel("dimension")
        col[0].set_title(f"{title}\ncos(before, after) = {s['cos_before_after']:.4f} ({s['pooling']})"
                         + (f"\n{ref_txt}" if ref_txt else "") + "\n\nbefore the Last LN", fontsize=8)
    fig.suptitle("Figure 6: Last LN heatmaps (batch mean), gamma and beta, cosine similarity", fontsize=10)
    fig.subplots_adjust(left=0.04, right=0.99, top=0.84, bottom=0.06, hspace=0.5, wspace=0.15)
    return save(fig, stem)


def figure7(panels: Sequence[Panel], stem: Path, samples: int = 4) -> list[Path]:
    """Per-token norm maps (sqrt(N) x sqrt(N)) before and after the Last LN, per sample image."""
    present = [d for _, d in panels if d is not None]
    n = min([samples] + [d.images.shape[0] for d in present]) if present else samples
    ncols = 1 + 2 * len(panels)
    fig, axes = plt.subplots(n, ncols, figsize=(1.9 * ncols, 1.9 * n + 0.7), squeeze=False)
    for i in range(n):
        ref = present[0] if present else None
        if ref is not None:
            axes[i, 0].imshow(ref.images[i], interpolation="nearest")
            axes[i, 0].set_axis_off()
        else:
            _pending(axes[i, 0])
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
        for j, (title, d) in enumerate(panels):
            for k, (name, maps) in enumerate((("before", None if d is None else d.pre_norms),
                                               ("after", None if d is None else d.post_norms))):
                ax = axes[i, 1 + 2 * j + k]
                if maps is None:
                    _pending(ax)
                else:
                    ax.imshow(maps[i], cmap="viridis", interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{title}\n{name} Last LN", fontsize=8)
    fig.suptitle("Figure 7: token norms before / after the Last LN (same images)", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.86, bottom=0.02, wspace=0.1, hspace=0.15)
    return save(fig, stem)


def figure8(panels: Sequence[Panel], stem: Path) -> list[Path]:
    """Last-LN heatmaps: x_{L+1}, LN(x_{L+1}), the PE added after it, and their sum, with r."""
    fig, axes = plt.subplots(len(panels), 4, figsize=(12.0, 2.9 * len(panels) + 0.6), squeeze=False)
    for i, (title, d) in enumerate(panels):
        row = axes[i]
        row[0].annotate(title, xy=(-0.08, 0.5), xycoords="axes fraction", ha="right", va="center",
                        fontsize=8, rotation=90)
        if d is None:
            for ax in row:
                _pending(ax)
            continue
        s = d.last_ln
        _heat(row[0], _patch(d, d.pre), f"before the Last LN\n{_r(s.get('corr_pre_vs_pe'))} with PE")
        _heat(row[1], _patch(d, d.post), f"after the Last LN\n{_r(s.get('corr_post_vs_pe'))} with PE")
        _heat(row[2], d.last_pe, "PE added after the Last LN")
        _heat(row[3], _patch(d, d.output), "output (after LN + PE)")
    fig.suptitle("Figure 8: PE in the Last LN, layer-wise vs non-layer-wise (tokens x dims)", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.86, bottom=0.03, wspace=0.1, hspace=0.45)
    return save(fig, stem)
