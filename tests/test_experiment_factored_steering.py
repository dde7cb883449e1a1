import importlib.util
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(__file__)
EXPERIMENTS = os.path.join(HERE, "..", "experiments")


def _load():
    sys.path.insert(0, EXPERIMENTS)
    spec = importlib.util.spec_from_file_location("factored_steering", os.path.join(EXPERIMENTS, "factored_steering.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tiny_config_runs_end_to_end(tmp_path):
    mod = _load()
    out = tmp_path / "run"
    results = mod.main(["--preset", "tiny", "--out", str(out), "--steps", "20", "--n-eval", "40"])
    for name in ("config.json", "results.json", "report.md", "kl_factored_factor0.png", "kl_semi_factor1.png",
                 "forbidden_mass_semi.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["steps"] == 20 and saved["config"]["n_eval"] == 40
    n_scales = len(saved["config"]["scales"])
    for regime in ("factored", "semi"):
        res = results["regimes"][regime]
        assert res["pairs"], regime
        assert set(res["activation_r2"]) == {"direct_sum", "joint"}
        assert all(np.isfinite(v) and v <= 1.0 for v in res["activation_r2"].values())
        for pair in res["pairs"]:
            for method in mod.METHODS:
                m = pair["methods"][method]
                assert len(m["kl_steered"]) == n_scales
                # Scale 0 is the unsteered model: no effect on either factor.
                assert m["kl_steered"][0] < 1e-6 and m["kl_unsteered"][0] < 1e-6
                assert np.all(np.isfinite(m["kl_target"]))
    semi = results["regimes"]["semi"]["summary"]["centroid"]
    for block in ("P10", "P01"):
        total = np.add(np.add(semi[f"target_mass_{block}"], semi[f"allowed_mass_{block}"]), semi[f"forbidden_mass_{block}"])
        np.testing.assert_allclose(total, 1.0, rtol=1e-4)
    assert "Table 1" in (out / "report.md").read_text() and "Table 2" in (out / "report.md").read_text()


def test_config_overrides_from_the_command_line():
    mod = _load()
    cfg = mod.parse_config(mod.Config, ["--steps", "7", "--scales", "0,1", "--regimes", "semi"], presets=mod.PRESETS)
    assert cfg.steps == 7 and cfg.scales == (0.0, 1.0) and cfg.regimes == ("semi",)


def test_semi_regime_with_mass_on_the_mismatched_blocks(tmp_path):
    mod = _load()
    res = mod.main(["--preset", "tiny", "--out", str(tmp_path), "--regimes", "semi", "--steps", "20",
                    "--p-mismatched", "0.5"])["regimes"]["semi"]
    # p_matched 0.5 and p_mismatched 0.5 give the product prior: a factor's S1/SR classes see
    # the other factor at S0 as often as anywhere (about a half), not never as under eq. 2.26.
    shares = [v for k, v in res["other_factor_s0_share"].items() if not k.endswith("S0")]
    assert shares and all(0.2 < v < 0.8 for v in shares)
    assert res["p_mismatched"] == 0.5 and res["factor_swap_symmetric"]
    c = res["summary"]["centroid"]
    for block in ("P10", "P01"):
        total = np.add(np.add(c[f"target_mass_{block}"], c[f"allowed_mass_{block}"]), c[f"forbidden_mass_{block}"])
        np.testing.assert_allclose(total, 1.0, rtol=1e-4)
    assert "prior mass 0.5 on the mismatched blocks" in (tmp_path / "report.md").read_text()
