import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import em_reversal  # noqa: E402


def test_tiny_preset_end_to_end(tmp_path):
    out = tmp_path / "rev"
    em_reversal.main(["--preset", "tiny", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["worlds"]) == {"correlated"}
    for wname, e in saved["worlds"].items():
        for name in (f"reversal_broad_{wname}_full.png", f"reversal_collateral_{wname}_lora.png",
                     f"spillover_{wname}.png", f"overlaps_{wname}.png"):
            assert (out / name).exists(), name
        for ft in ("full", "lora"):
            rv = e["reversal"][ft]
            assert set(rv["sweeps"]) == set(em_reversal.METHODS)
            # Scale 0 is the unsteered fine-tuned model for every method (same sampling key).
            for sw in rv["sweeps"].values():
                assert len(sw["broad"]) == 3
                assert sw["broad"][0] == rv["finetuned"]["broad"]
                assert abs(sw["domain_kl_reference"][0] - rv["finetuned"]["domain_kl_reference"]) < 1e-5
                assert all(0.0 <= b <= 1.0 for b in sw["broad"])
            # The random control has the norm of the mean difference.
            assert abs(rv["norms"]["random"] - rv["norms"]["diff_means"]) < 1e-4 * max(1.0, rv["norms"]["diff_means"])
            assert set(rv["ablation"]) == {"diff_means", "random", "diff_means (mean)", "random (mean)"}
            assert rv["ablation"]["diff_means"]["value"] == 0.0
        names = e["geometry"]["names"]
        assert "steering_vector" in names and "persona_probe" in names
        assert any(n.endswith("mlp.W_out.B") for n in names)
        ov = np.asarray(e["geometry"]["overlap"])
        np.testing.assert_allclose(np.diag(ov), 1.0)
        assert ((ov >= -1e-9) & (ov <= 1 + 1e-9)).all()
        assert 0.0 <= e["sae"]["metrics"]["pretrained"]["fvu"]
    report = (out / "report.md").read_text()
    assert "78-90%" in report and "Spillover asymmetry" in report
