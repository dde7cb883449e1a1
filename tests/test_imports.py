"""The package's shape: imports run down the stages only, and never reach a private name."""

import ast
import pathlib

import sfpjax

ROOT = pathlib.Path(sfpjax.__file__).parent
# A stage may import from stages of lower rank and from the shared internals (rank -1).
RANK = {"_numerics": -1, "_io": -1, "processes": 0, "sweep": 0, "model": 0, "inference": 1, "training": 2,
        "analysis": 3}


def _relative_imports():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                here = list(parts[:-1])
                base = here[: len(here) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                yield path, parts, target, [a.name for a in node.names]


def test_no_module_imports_a_private_name():
    offenders = [(str(p.relative_to(ROOT)), ".".join(t), n) for p, _, t, names in _relative_imports()
                 for n in names if n.startswith("_")]
    assert not offenders, f"private names imported across modules (give them an internal public name): {offenders}"


def test_imports_run_down_the_stages():
    upward = []
    for path, parts, target, _ in _relative_imports():
        if len(parts) < 2 or not target:  # the top-level package re-exports every stage
            continue
        stage, dest = parts[0], target[0]
        if dest == stage:
            continue
        assert stage in RANK and dest in RANK, f"{path}: unknown stage {stage!r} or {dest!r}; add it to RANK"
        if RANK[dest] >= RANK[stage]:
            upward.append((str(path.relative_to(ROOT)), ".".join(target)))
    assert not upward, f"imports that run up (or across) a stage: {upward}"


def test_every_stage_name_is_public_from_the_top():
    for stage in ("processes", "inference", "model", "training", "analysis", "sweep"):
        module = getattr(sfpjax, stage)
        for name in module.__all__ if hasattr(module, "__all__") else [n for n in vars(module) if not n.startswith("_")]:
            if isinstance(getattr(module, name), type(sfpjax)):
                continue
            assert getattr(sfpjax, name) is getattr(module, name), f"sfpjax.{name} is not sfpjax.{stage}.{name}"
