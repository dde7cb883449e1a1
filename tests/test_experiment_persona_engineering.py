import csv
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import persona_engineering as pe  # noqa: E402


def test_tiny_preset_end_to_end(tmp_path):
    out = tmp_path / "pe"
    res = pe.main(["--preset", "tiny", "--out", str(out)])
    for name in ("results.json", "results.csv", "report.md", "pareto.png", "knobs.png"):
        assert (out / name).exists(), name
    # baseline (mixing 0.6, 2 sectors), mixing 0, 3 sectors; 2 seeds; 2 shape groups
    assert res["programs"] == 2
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2
    assert {(r["mixing"], r["sectors"], r["seed"]) for r in rows} == {
        (m, s, seed) for m, s in (("0.6", "2"), ("0.0", "2"), ("0.6", "3")) for seed in ("0", "1")}
    for r in rows:
        assert np.isfinite(float(r["aligned_excess"]))
        np.testing.assert_allclose(float(r["fidelity"]), np.exp(-float(r["aligned_excess"])), rtol=1e-6)
        np.testing.assert_allclose(float(r["robustness"]), 1 - (float(r["broad_after"]) - float(r["broad_before"])))
        assert 0.0 <= float(r["broad_after"]) <= 1.0
    assert json.loads((out / "results.json").read_text())["rows"][0]["seed"] == 0
    assert "Baseline" in (out / "report.md").read_text()


def test_grid_is_the_baseline_and_one_knob_moves():
    base, points = pe.grid_points(pe.Config())
    assert points[0] == base and len(set(points)) == len(points)
    for p in points[1:]:
        assert sum(getattr(p, k) != getattr(base, k) for k in pe.KNOBS) == 1
    assert len({p.shape_key for p in points}) == 5  # dims x3, sectors 3, entangled


def test_pareto_front_and_improvements():
    P = lambda m: pe.Point(m, "2:2", 2, 0.0, 0)
    means = [{"point": P(0.6), "fidelity": 0.9, "robustness": 0.5},
             {"point": P(0.0), "fidelity": 0.95, "robustness": 0.5},  # improves (ties robustness)
             {"point": P(0.3), "fidelity": 0.8, "robustness": 0.9},   # trade-off: front, no improvement
             {"point": P(0.9), "fidelity": 0.85, "robustness": 0.4}]  # dominated
    assert pe.pareto_front(means) == [1, 2]
    assert [m["point"] for m in pe.improvements(means, P(0.6))] == [P(0.0)]


def test_aligned_process_starts_in_the_aligned_persona():
    import jax.random as jr
    import sfpjax

    w = pe.build_world(pe.Config(), pe.Point(0.6, "2:2", 2, 0.0, 0))
    a = pe.aligned_process(w)
    prompts = sfpjax.eval_prompts(w, key=jr.key(0), n=4, length=4)
    world_a = w.with_prior(np.array([[float(w.prior[0, 0]), float(w.prior[0, 1])], [0.0, 0.0]])
                           / float(w.prior[0].sum()))
    np.testing.assert_allclose(a.eta0, world_a.process.eta0, rtol=1e-6)
    assert float(sfpjax.exact_em_rates(world_a, prompts).aligned_share) > 0.999
