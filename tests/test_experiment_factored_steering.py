import importlib.util
import json
import os
import sys

import numpy as np
import pytest

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
    results = mod.main(["--preset", "tiny", "--out", str(out), "--train.steps", "20", "--n-eval", "40"])
    for name in ("config.json", "results.json", "report.md", "kl_factored_factor0.png", "kl_semi_factor1.png",
                 "forbidden_mass_semi.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["train"]["steps"] == 20 and saved["config"]["n_eval"] == 40
    assert saved["config"]["model"]["d_model"] == 16  # from the preset
    assert saved["regimes"]["factored"]["model_config"]["n_ctx"] == saved["config"]["train"]["seq_len"]
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
    cfg = mod.parse_config(mod.Config, ["--train.steps", "700", "--scales", "0,1", "--regimes", "semi",
                                        "--model.d-model", "24", "--train.grad-clip", "none"], presets=mod.PRESETS)
    assert cfg.train.steps == 700 and cfg.scales == (0.0, 1.0) and cfg.regimes == ("semi",)
    assert cfg.model.d_model == 24 and cfg.train.grad_clip is None
    assert cfg.train.batch_size == mod.Config().train.batch_size  # untouched fields keep their defaults
    tiny = mod.parse_config(mod.Config, ["--preset", "tiny", "--train.batch-size", "8"], presets=mod.PRESETS)
    assert tiny.train.batch_size == 8 and tiny.train.steps == 60 and tiny.model.d_model == 16
    with pytest.raises(SystemExit):  # a flat name of a nested field is not accepted
        mod.parse_config(mod.Config, ["--steps", "7"], presets=mod.PRESETS)


def test_report_is_the_template_filled_with_this_runs_numbers(tmp_path):
    mod = _load()
    sections = mod._sections()
    assert {"header", "regime", "table1", "magnitudes", "factored", "semi", "methods", "footer"} <= set(sections)
    # The prose lives in the template, not in the script.
    source = open(os.path.join(EXPERIMENTS, "factored_steering.py")).read()
    assert "Confounded classes" in sections["semi"] and "Confounded classes" not in source


def test_semi_regime_with_mass_on_the_mismatched_blocks(tmp_path):
    mod = _load()
    res = mod.main(["--preset", "tiny", "--out", str(tmp_path), "--regimes", "semi", "--train.steps", "20",
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


def test_nested_override_rederives_fields_derived_from_the_defaults():
    mod = _load()
    cfg = mod.parse_config(mod.Config, ["--model.d-model", "24"], presets=mod.PRESETS)
    assert cfg.model.d_head == 12  # d_model // n_heads for the new width, not the default's 32
    cfg = mod.parse_config(mod.Config, ["--model.d-model", "24", "--model.d-head", "5"], presets=mod.PRESETS)
    assert cfg.model.d_head == 5
