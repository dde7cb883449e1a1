import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest

import sfpjax.plots as plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def _beliefs(n, d, seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(d), size=n)


@pytest.mark.parametrize("d", [2, 3, 5])
def test_plot_belief_simplex_writes_png(tmp_path, d):
    eta = _beliefs(40, d)
    pred = eta + 0.01 * np.random.default_rng(1).normal(size=eta.shape)
    figs_before = plt.get_fignums()
    out = plots.plot_belief_simplex(
        jnp.asarray(eta.reshape(4, 10, d)), pred.reshape(4, 10, d), tmp_path / "sub" / "simplex.png",
        title="Mess3",
    )
    assert out == tmp_path / "sub" / "simplex.png"
    assert _is_png(out)
    assert plt.get_fignums() == figs_before  # nothing left open in pyplot


def test_simplex_coordinates_put_vertices_on_the_triangle():
    xy = plots._simplex_xy(np.eye(3))
    np.testing.assert_allclose(xy, [[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]], atol=1e-15)
    np.testing.assert_allclose(plots._simplex_xy(np.full((1, 3), 1 / 3)), [[0.5, np.sqrt(3) / 6]])


def test_plot_loss_curve_and_lines(tmp_path):
    steps = np.arange(20)
    loss = 1.0 + np.exp(-0.3 * steps)
    assert _is_png(plots.plot_loss_curve(steps, loss, 1.0, tmp_path / "loss.png", title="t"))
    assert _is_png(plots.plot_loss_curve(steps, loss, None, str(tmp_path / "loss2.png"), logy=True))
    s = np.linspace(0.0, 2.0, 6)
    out = plots.plot_lines(
        s, {"steered": s**2 + 1e-4, "spillover": 1e-4 * (1 + s)}, tmp_path / "kl.png", "scale", "KL",
        logy=True,
    )
    assert _is_png(out)


def test_plots_reject_bad_inputs(tmp_path):
    eta = _beliefs(10, 3)
    with pytest.raises(ValueError, match="must end in .png"):
        plots.plot_belief_simplex(eta, eta, tmp_path / "x.pdf")
    with pytest.raises(ValueError, match="same shape"):
        plots.plot_belief_simplex(eta, eta[:5], tmp_path / "x.png")
    with pytest.raises(ValueError, match="d >= 2"):
        plots.plot_belief_simplex(eta[:, :1], eta[:, :1], tmp_path / "x.png")
    bad = eta.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="predicted_beliefs has non-finite"):
        plots.plot_belief_simplex(eta, bad, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same length"):
        plots.plot_loss_curve(np.arange(3), np.ones(4), 0.5, tmp_path / "x.png")
    with pytest.raises(ValueError, match="floor must be"):
        plots.plot_loss_curve(np.arange(3), np.ones(3), float("nan"), tmp_path / "x.png")
    with pytest.raises(ValueError, match="expected \\(3,\\) like x"):
        plots.plot_lines(np.arange(3), {"a": np.ones(4)}, tmp_path / "x.png", "x", "y")
    with pytest.raises(ValueError, match="ys is empty"):
        plots.plot_lines(np.arange(3), {}, tmp_path / "x.png", "x", "y")
    with pytest.raises(ValueError, match="logy=True needs positive"):
        plots.plot_lines(np.arange(3), {"a": np.zeros(3)}, tmp_path / "x.png", "x", "y", logy=True)
    assert not (tmp_path / "x.png").exists()


def test_plot_heatmap_writes_png(tmp_path):
    import numpy as np

    import sfpjax.plots

    p = sfpjax.plots.plot_heatmap(np.arange(6.0).reshape(2, 3), tmp_path / "h.png", extent=(0, 1, 0, 1), xlabel="a")
    assert p.exists() and p.stat().st_size > 0
    with pytest.raises(ValueError, match="2-D"):
        sfpjax.plots.plot_heatmap(np.arange(3.0), tmp_path / "bad.png")


def test_plot_panels_small_multiples_and_shared_colours(tmp_path):
    import sfpjax.plots as plots

    x = np.linspace(0.0, 2.0, 5)
    methods = ["centroid", "diff-means", "belief-pinv", "centroid-ln"]
    colors = plots.series_colors(methods)
    assert len(set(colors.values())) == len(methods)
    assert plots.series_colors(methods) == colors  # the same mapping in every figure
    panels = {m: {"steered": x + i + 1.0, "other": 0.1 * x + 1e-3} for i, m in enumerate(methods)}
    p = plots.plot_panels(x, panels, tmp_path / "kl.png", "scale", "KL", colors=colors, logy=True, title="t")
    assert p.stat().st_size > 0
    with pytest.raises(ValueError, match="no colour for panels"):
        plots.plot_panels(x, panels, tmp_path / "a.png", "s", "KL", colors={"centroid": "red"})
    with pytest.raises(ValueError, match="logy=True needs positive"):
        plots.plot_panels(x, {"a": {"s": x}}, tmp_path / "b.png", "s", "KL", logy=True)
    with pytest.raises(ValueError, match=r"expected \(5,\)"):
        plots.plot_panels(x, {"a": {"s": x[:3]}}, tmp_path / "c.png", "s", "KL")
    with pytest.raises(ValueError, match="distinct"):
        plots.series_colors(["a", "a"])
