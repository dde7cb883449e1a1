import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import accelerator_suite  # noqa: E402


def test_tiny_suite_writes_every_section(tmp_path):
    out = tmp_path / "suite.json"
    res = accelerator_suite.main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["mode"] == "tiny" and saved["device"] == res["device"]
    assert [r["process"] for r in saved["beliefs"]] == ["Mess3", "Mess3 x Mess3"]
    for r in saved["beliefs"]:
        assert r["sfpjax"]["updates_per_s"] > 0 and r["vmap_scan"]["updates_per_s"] > 0
        assert r["sfpjax_over_vmap_scan"] > 0
    assert saved["training"]["tokens_per_s"] > 0
    assert [r["K"] for r in saved["stacked"]] == [2]
    assert saved["stacked"][0]["train_run_s"] > 0 and saved["stacked"][0]["finetune_run_s"] > 0
    assert saved["sweep"]["points"] == 4 and saved["sweep"]["points_per_s"] > 0
