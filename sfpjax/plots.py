"""PNG figures for belief geometry, training curves and parameter sweeps.

Every function draws on its own ``matplotlib.figure.Figure`` with the Agg canvas (no
``pyplot``, so no global figure registry, no GUI backend and nothing to close), writes a
PNG to ``path`` (creating parent folders) and returns ``path`` as a ``pathlib.Path``.
Inputs may be NumPy or JAX arrays.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from jaxtyping import ArrayLike, Float, Real
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_belief_simplex", "plot_lines", "plot_loss_curve", "plot_panels", "series_colors"]

_SQRT3_2 = math.sqrt(3.0) / 2.0


def _png_path(path) -> Path:
    path = Path(os.fspath(path))
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png (these plots are written as PNG), got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def _finite(x, name: str, fn: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{fn}: {name} has non-finite entries (NaN or inf).")
    return a


def _simplex_xy(b: np.ndarray) -> np.ndarray:
    """Barycentric coordinates on the 2-simplex -> the plane: vertices (0,0), (1,0), (1/2, sqrt3/2)."""
    return np.stack([b[:, 1] + 0.5 * b[:, 2], _SQRT3_2 * b[:, 2]], axis=-1)


def plot_belief_simplex(
    true_beliefs: Float[ArrayLike, "... d"],
    predicted_beliefs: Float[ArrayLike, "... _d"],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    point_size: float = 2.0,
) -> Path:
    """Side by side: the true beliefs and the probe's predictions, in belief-simplex coordinates.

    For ``d = 3`` each belief ``<<eta| = (eta_0, eta_1, eta_2)`` is drawn at its barycentric
    position in the 2-simplex (vertex ``i`` = the pure state ``i``) and colored by the RGB
    color ``(eta_0, eta_1, eta_2)`` of the *true* belief, in both panels (the familiar Mess3
    fractal). Predictions, which may leave the simplex, are drawn where they fall. For
    ``d > 3`` both panels are projected onto the first two principal components of the true
    beliefs (the title says so) and colored by the first three components rescaled to
    ``[0, 1]``; for ``d = 2`` beliefs are drawn along the 1-simplex at ``eta_1``.

    Args:
        true_beliefs: exact beliefs, shape ``(*batch, d)``.
        predicted_beliefs: probe predictions, same shape.
        path: output ``.png`` path.
        title: figure title.
        point_size: marker area.

    Returns:
        ``path``.

    >>> import numpy as np, sfpjax.plots, tempfile, os
    >>> eta = np.random.default_rng(0).dirichlet(np.ones(3), size=50)
    >>> out = sfpjax.plots.plot_belief_simplex(eta, eta, os.path.join(tempfile.mkdtemp(), "s.png"))
    >>> out.stat().st_size > 0
    True
    """
    fn = "plot_belief_simplex"
    T = _finite(true_beliefs, "true_beliefs", fn)
    P = _finite(predicted_beliefs, "predicted_beliefs", fn)
    if T.shape != P.shape or T.ndim < 1:
        raise ValueError(
            f"{fn}: true_beliefs and predicted_beliefs must have the same shape (*batch, d), got "
            f"{T.shape} and {P.shape}."
        )
    d = T.shape[-1]
    if d < 2:
        raise ValueError(f"{fn}: beliefs need d >= 2 states to plot, got d = {d}.")
    T = T.reshape(-1, d)
    P = P.reshape(-1, d)
    if T.shape[0] == 0:
        raise ValueError(f"{fn}: no beliefs to plot.")
    path = _png_path(path)
    suffix = ""
    if d == 3:
        xy_t, xy_p = _simplex_xy(T), _simplex_xy(P)
        colors = np.clip(T, 0.0, 1.0)
    elif d == 2:
        xy_t = np.stack([T[:, 1], np.zeros(len(T))], -1)
        xy_p = np.stack([P[:, 1], np.zeros(len(P))], -1)
        colors = np.stack([T[:, 0], np.zeros(len(T)), T[:, 1]], -1).clip(0.0, 1.0)
    else:
        mean = T.mean(0)
        _, _, Vt = np.linalg.svd(T - mean, full_matrices=False)
        comps = Vt[:3]
        zt, zp = (T - mean) @ comps.T, (P - mean) @ comps.T
        xy_t = np.pad(zt, ((0, 0), (0, max(0, 2 - zt.shape[1]))))[:, :2]
        xy_p = np.pad(zp, ((0, 0), (0, max(0, 2 - zp.shape[1]))))[:, :2]
        z = np.pad(zt, ((0, 0), (0, max(0, 3 - zt.shape[1]))))[:, :3]
        span = z.max(0) - z.min(0)
        colors = (z - z.min(0)) / np.where(span > 0, span, 1.0)
        suffix = f" (d={d}: projected onto the first 2 principal components of the true beliefs)"

    fig = Figure(figsize=(10, 4.8))
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, xy, name in ((axes[0], xy_t, "true beliefs"), (axes[1], xy_p, "probe predictions")):
        if d == 3:
            tri = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, _SQRT3_2], [0.0, 0.0]])
            ax.plot(tri[:, 0], tri[:, 1], color="0.6", lw=0.8)
        elif d == 2:
            ax.plot([0.0, 1.0], [0.0, 0.0], color="0.6", lw=0.8)
        ax.scatter(xy[:, 0], xy[:, 1], c=colors, s=point_size, linewidths=0)
        ax.set_title(name)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle((title or "belief geometry") + suffix, fontsize=10 if suffix else 12)
    return _save(fig, path)


def plot_loss_curve(
    steps: Real[ArrayLike, " n"] | Sequence[float | int],
    losses: Float[ArrayLike, " _n"] | Sequence[float | int],
    floor: float | None,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    logy: bool = False,
) -> Path:
    """Training loss against step, with the loss floor as a horizontal line.

    Args:
        steps: step numbers, shape ``(n,)``.
        losses: losses in nats, shape ``(n,)``.
        floor: the best achievable loss (e.g. the mean of ``myopic_entropies`` over the
            trained context positions), or ``None`` for no line.
        path: output ``.png`` path.
        title: figure title.
        logy: logarithmic loss axis.

    >>> import numpy as np, sfpjax.plots, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "loss.png")
    >>> sfpjax.plots.plot_loss_curve(np.arange(10), 1 + np.exp(-np.arange(10)), 1.0, p).exists()
    True
    """
    fn = "plot_loss_curve"
    x = _finite(steps, "steps", fn)
    y = _finite(losses, "losses", fn)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(
            f"{fn}: steps and losses must be non-empty 1-D arrays of the same length, got shapes "
            f"{x.shape} and {y.shape}."
        )
    if floor is not None and not math.isfinite(floor):
        raise ValueError(f"{fn}: floor must be a finite number or None, got {floor}.")
    path = _png_path(path)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(x, y, lw=1.2, label="loss")
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1.0, label=f"floor = {floor:.4f}")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_lines(
    x: Real[ArrayLike, " n"] | Sequence[float | int],
    ys: Mapping[str, Float[ArrayLike, " _n"] | Sequence[float | int]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    *,
    logy: bool = False,
    logx: bool = False,
    title: str | None = None,
) -> Path:
    """One labelled line per entry of ``ys`` against the shared ``x`` (e.g. KL against steering scale).

    >>> import numpy as np, sfpjax.plots, tempfile, os
    >>> s = np.linspace(0, 2, 5)
    >>> p = os.path.join(tempfile.mkdtemp(), "kl.png")
    >>> sfpjax.plots.plot_lines(s, {"steered": s**2, "spillover": 1e-3 * s}, p, "scale", "KL").exists()
    True
    """
    fn = "plot_lines"
    xv = _finite(x, "x", fn)
    if xv.ndim != 1 or xv.size == 0:
        raise ValueError(f"{fn}: x must be a non-empty 1-D array, got shape {xv.shape}.")
    if not ys:
        raise ValueError(f"{fn}: ys is empty; pass a dict label -> values.")
    series = {}
    for label, v in ys.items():
        v = _finite(v, f"ys[{label!r}]", fn)
        if v.shape != xv.shape:
            raise ValueError(f"{fn}: ys[{label!r}] has shape {v.shape}; expected {xv.shape} like x.")
        if logy and np.any(v <= 0):
            raise ValueError(f"{fn}: logy=True needs positive values; ys[{label!r}] has some <= 0.")
        series[label] = v
    path = _png_path(path)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, v in series.items():
        ax.plot(xv, v, marker="o", ms=3, lw=1.2, label=str(label))
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


# Colour-blind-safe qualitative palette (Okabe and Ito), then tab10's remaining hues.
_PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
            "#8c564b", "#7f7f7f", "#bcbd22", "#17becf")
_LINESTYLES = ("-", "--", ":", "-.")


def series_colors(names: Sequence[str]) -> dict[str, str]:
    """One distinct colour per name, in order, for use across several figures.

    Pass the same mapping to every figure of a report (``plot_panels(..., colors=...)``),
    so that a method has the same colour everywhere.

    >>> import sfpjax.plots
    >>> c = sfpjax.plots.series_colors(["centroid", "diff-means"])
    >>> c["centroid"] != c["diff-means"]
    True
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"series_colors: names must be distinct, got {names}.")
    if len(names) > len(_PALETTE):
        raise ValueError(f"series_colors: at most {len(_PALETTE)} distinct colours, got {len(names)} names.")
    return dict(zip(names, _PALETTE))


def plot_panels(
    x: Real[ArrayLike, " n"] | Sequence[float | int],
    panels: Mapping[str, Mapping[str, Float[ArrayLike, " _n"] | Sequence[float | int]]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    *,
    colors: Mapping[str, str] | None = None,
    logy: bool = False,
    title: str | None = None,
    ncols: int = 3,
) -> Path:
    """Small multiples: one panel per entry of ``panels`` (e.g. one per steering method).

    Each panel draws its series (e.g. ``"steered factor"`` and ``"other factor"``) in the
    panel's colour, told apart by line style; the same series name has the same style in
    every panel, and every panel shares the x and y axes, so panels compare by position.

    Args:
        x: the shared x values ``(n,)``.
        panels: panel title -> {series name -> values ``(n,)``}.
        colors: panel title -> colour (default `series_colors` of the panel titles); give
            one mapping to every figure of a report to keep a colour per method.
        logy: logarithmic y axis (values must be positive).
        ncols: panels per row.

    >>> import numpy as np, sfpjax.plots, tempfile, os
    >>> s = np.linspace(0, 2, 5)
    >>> p = os.path.join(tempfile.mkdtemp(), "kl.png")
    >>> panels = {"centroid": {"steered": s**2, "other": 0.1 * s}, "diff-means": {"steered": s, "other": 0 * s}}
    >>> sfpjax.plots.plot_panels(s, panels, p, "scale", "KL").exists()
    True
    """
    fn = "plot_panels"
    xv = _finite(x, "x", fn)
    if xv.ndim != 1 or xv.size == 0:
        raise ValueError(f"{fn}: x must be a non-empty 1-D array, got shape {xv.shape}.")
    if not panels or any(not series for series in panels.values()):
        raise ValueError(f"{fn}: panels must be a non-empty dict of non-empty dicts, panel -> series -> values.")
    colors = dict(series_colors(list(panels)) if colors is None else colors)
    missing = [k for k in panels if k not in colors]
    if missing:
        raise ValueError(f"{fn}: colors has no colour for panels {missing}.")
    names = list(dict.fromkeys(name for series in panels.values() for name in series))
    if len(names) > len(_LINESTYLES):
        raise ValueError(f"{fn}: at most {len(_LINESTYLES)} series per panel, got {names}.")
    style = dict(zip(names, _LINESTYLES))
    data = {}
    for panel, series in panels.items():
        for name, v in series.items():
            v = _finite(v, f"panels[{panel!r}][{name!r}]", fn)
            if v.shape != xv.shape:
                raise ValueError(f"{fn}: panels[{panel!r}][{name!r}] has shape {v.shape}; expected {xv.shape} like x.")
            if logy and np.any(v <= 0):
                raise ValueError(f"{fn}: logy=True needs positive values; panels[{panel!r}][{name!r}] has some <= 0.")
            data[panel, name] = v
    path = _png_path(path)
    ncols = max(1, min(int(ncols), len(panels)))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.6 * nrows + 0.6))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, (panel, series) in zip(axes, panels.items()):
        for name in series:
            ax.plot(xv, data[panel, name], color=colors[panel], ls=style[name], marker="o", ms=2.5, lw=1.2, label=name)
        ax.set_title(panel, color=colors[panel], fontsize=10)
        if logy:
            ax.set_yscale("log")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[(nrows - 1) * ncols:]:
        ax.set_xlabel(xlabel)
    for ax in axes[::ncols]:
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_heatmap(
    values: Real[ArrayLike, "..."],
    path: str | os.PathLike,
    *,
    extent: tuple[float | int, ...] | None = None,
    xlabel: str = "",
    ylabel: str = "",
    title: str | None = None,
) -> Path:
    """A 2-D grid of values (e.g. a statistic over a parameter sweep) as a colour map.

    ``values[i, j]`` is drawn at row ``i`` (y axis, increasing upwards) and column ``j``;
    ``extent = (x_min, x_max, y_min, y_max)`` labels the axes with parameter values.

    >>> import numpy as np, sfpjax.plots, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "h.png")
    >>> sfpjax.plots.plot_heatmap(np.arange(12.0).reshape(3, 4), p, extent=(0, 1, 0, 0.5)).exists()
    True
    """
    fn = "plot_heatmap"
    v = _finite(values, "values", fn)
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"{fn}: values must be a non-empty 2-D array, got shape {v.shape}.")
    path = _png_path(path)
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    im = ax.imshow(v, origin="lower", aspect="auto", extent=extent, cmap="viridis")
    fig.colorbar(im, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return _save(fig, path)
