import importlib.util
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(__file__)
EXPERIMENTS = os.path.join(HERE, "..", "experiments")


def _load():
    sys.path.insert(0, EXPERIMENTS)
    spec = importlib.util.spec_from_file_location("rl_composition", os.path.join(EXPERIMENTS, "rl_composition.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tiny_preset_runs_end_to_end(tmp_path):
    mod = _load()
    out = tmp_path / "run"
    results = mod.main(["--preset", "tiny", "--out", str(out), "--rl-steps", "4", "--checkpoint-every", "2"])
    for name in ("config.json", "results.json", "report.md", "rl_gates.png", "rl_product.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["rl_steps"] == 4
    for task in ("gates", "product"):
        res = results["tasks"][task]
        K = 2 * saved["config"]["seeds"]
        assert res["which"] == [0] * (K // 2) + [1] * (K // 2)
        assert [c["step"] for c in res["signature"]] == [0, 2, 4]
        first = res["signature"][0]["runs"]
        # Step 0 is the reference itself: no KL, no residual.
        assert all(abs(r["kl_to_reference"]) < 1e-6 and r["symbol_reweighting_residual"] < 1e-6 for r in first)
        for ck in res["signature"]:
            for r in ck["runs"]:
                assert 0.0 <= r["expected_reward"] <= r["max_reward"] + 1e-9
                assert r["reward_tilt_residual"] >= -1e-9 and r["symbol_reweighting_residual"] >= -1e-9
        assert len(res["history"]["reward"]) == 4 and len(res["history"]["reward"][0]) == K
        assert res["composite_latent"] in res["probes"][0]
        for probe in res["probes"]:
            for v in probe.values():
                assert np.isfinite(v["r2_before"]) and v["r2_after"] <= 1.0 and 0.0 <= v["overlap"] <= 1.0 + 1e-9
    assert "Table 1" in (out / "report.md").read_text()
