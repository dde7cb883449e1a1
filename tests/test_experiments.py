"""Every experiment config runs end to end on a tiny setting."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def test_belief_geometry_tiny(tmp_path):
    import belief_geometry

    rows = belief_geometry.main(["--preset", "tiny", "--out", str(tmp_path)])
    assert [r["process"] for r in rows] == ["mess3", "rrxor"]
    results = json.loads((tmp_path / "results.json").read_text())
    for r in results["results"]:
        assert set(r["probe_r2"]) == {"blocks.0.hook_resid_post", "ln_final.hook_normalized", "concat(resid_post)"}
        assert all(-1.0 <= v <= 1.0 for v in r["probe_r2"].values())
        # the floor is the exact myopic entropy: loss can only exceed it up to sampling noise
        assert r["excess_mean_pct"] > -5.0
        assert (tmp_path / f"{r['process']}_simplex.png").stat().st_size > 0
        assert (tmp_path / f"{r['process']}_loss.png").stat().st_size > 0
    assert (tmp_path / "summary.md").read_text().startswith("# Belief geometry")


def test_mess3_sweep_tiny_and_resume(tmp_path):
    import mess3_sweep

    out = mess3_sweep.main(["--preset", "tiny", "--out", str(tmp_path)])
    assert out["exact_points"] == 16 and len(out["training"]) == 2
    table = (tmp_path / "exact" / "results.csv").read_text()
    for row in out["training"]:
        assert row["excess_mean_pct"] > -5.0
    for name in ("entropy_rate_bound", "distinct_beliefs", "belief_spread"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    # A rerun into the same folder resumes: the exact table is unchanged.
    mess3_sweep.main(["--preset", "tiny", "--out", str(tmp_path), "--train-steps", "20"])
    assert (tmp_path / "exact" / "results.csv").read_text() == table
