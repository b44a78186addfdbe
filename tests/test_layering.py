"""The import rules of the architecture guide, checked by reading each module's imports."""
import ast

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
