import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import trait_monitoring  # noqa: E402


def test_tiny_preset_end_to_end(tmp_path):
    out = tmp_path / "tm"
    res = trait_monitoring.main(["--preset", "tiny", "--out", str(out)])
    for name in ("results.json", "report.md", "drift_trajectories.png", "pc1_loadings.png", "roc_held_out.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 7 * 2
    assert saved["trait_names"] == ["misaligned", "misaligned_marker", "domain_D", "misaligned_elsewhere",
                                    "persona_uncertain", "predictable", "trigger_seen"]
    for run in saved["runs"]:
        np.testing.assert_array_equal(run["drift"][0], 0.0)  # step 0 is the reference
        assert all(0.0 <= e <= 1.0 for e in run["em"])
    assert set(saved["monitors"]) == {"alignment7", "pc1", "norm", "pca7", "sae7", "random7"}
    assert 0.0 < saved["pc1_explained"] <= 1.0
    assert "seed 004" in (out / "report.md").read_text()
    assert res["steps"] == [0, 5, 10]
