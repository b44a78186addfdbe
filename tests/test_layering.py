"""The import rules of the architecture guide, checked by reading each module's imports."""

import ast
import json

from conftest import REPO

# third-party package -> the only distrain modules allowed to import it
OWNERS = {
    "mlflow": {"tracking", "serving"},
    "lightgbm": {"ensemble", "serving"},
    "accelerate": {"parallel"},
    "deepspeed": {"zero"},
}


def runtime_imports(path):
    """Imports outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_heavy_dependencies_are_imported_in_one_place():
    for path in sorted((REPO / "distrain").glob("*.py")):
        used = runtime_imports(path)
        for package, owners in OWNERS.items():
            if package in used:
                assert path.stem in owners, f"{path.name} imports {package}; only {sorted(owners)} may"


def test_nothing_imports_the_cli_and_ensemble_needs_no_torch():
    for path in sorted((REPO / "distrain").glob("*.py")):
        if path.stem in ("cli", "run"):
            continue
        modules = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
        assert not modules & {"distrain.cli", "distrain.run"}, path.name
    assert "torch" not in runtime_imports(REPO / "distrain" / "ensemble.py")
    assert "torch" not in runtime_imports(REPO / "distrain" / "metrics.py")


def test_status_reads_a_run_directory_without_heavy_imports(tmp_path):
    """`distrain status` is what people run in a loop while jobs train: it must not pay for torch, timm,
    scikit-learn or MLflow (8.7 s when it did; 0.3 s without)."""
    import subprocess
    import sys

    from distrain.config import dump_yaml, load_config

    run_dir = tmp_path / "runs" / "digits"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(load_config(REPO / "configs" / "digits.yaml")))
    (run_dir / "folds.json").write_text("{}")
    code = (
        "import sys, json; from distrain.cli import main; rc = main(['status', '--run-dir', sys.argv[1], '--json']);"
        "print(json.dumps({'rc': rc, 'heavy': [m for m in ('torch', 'timm', 'sklearn', 'mlflow', 'accelerate') "
        "if m in sys.modules]}))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, result = proc.stdout.strip().rsplit("\n", 1)
    assert json.loads(result) == {"rc": 0, "heavy": []}
    assert json.loads(status)["counts"] == {"pending": 10, "running": 0, "done": 0, "failed": 0}
