"""The import rules of the architecture guide, checked by reading every module's imports (function-level
imports included; `if TYPE_CHECKING:` blocks excluded except by the layer-order check, which counts them)."""

import ast
import json

from conftest import REPO

PACKAGE = REPO / "distrain"

# third-party package -> the only distrain subpackages allowed to import it
OWNERS = {
    "mlflow": {"tracking", "serving"},  # serving: the pyfunc model is an mlflow.pyfunc.PythonModel
    "lightgbm": {"ensembles"},
    "accelerate": {"distributed"},
    "deepspeed": {"distributed"},
}
TORCH_FREE = {"study", "ensembles", "config"}
TORCH_FREE_EXCEPTIONS = {"distrain.config.lookups"}  # looks names up in timm

LAYERS = [
    {"errors", "names"},
    {"fsutil", "console", "interrupts"},
    {"tasks"},
    {"config"},
    {"study"},
    {"data"},
    {"distributed"},
    {"tracking"},  # the training loop logs through a Tracker; tracking knows nothing of ensembles
    {"training"},
    {"ensembles"},
    {"serving"},
    {"orchestration"},
    {"deploy"},
    {"run"},
    {"cli"},
]
"""The declared layer order, bottom first: a unit (a subpackage, or a top-level module) imports only itself and
units of lower layers; units of one layer do not import each other."""


def module_name(path):
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def runtime_imports(path, type_only=False):
    """(third-party top-level names, distrain modules) imported outside `if TYPE_CHECKING:` blocks (inside them
    too with `type_only`)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING" and not type_only:
            skip |= {id(n) for n in ast.walk(node)}
    third_party, ours = set(), set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("distrain"):
                ours.add(name)
            else:
                third_party.add(name.split(".")[0])
    return third_party, ours


def modules():
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def subpackage(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""  # "" for top-level modules (cli, run, config, errors, ...)


def import_graph(type_only=False):
    """distrain module -> the distrain modules it imports (names resolved to existing modules)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        _, ours = runtime_imports(path, type_only)
        graph[name] = {m for m in ours if m in known and m != name and m != "distrain"}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_heavy_dependencies_are_imported_by_their_owners_only():
    for name, path in modules().items():
        third_party, _ = runtime_imports(path)
        for package, owners in OWNERS.items():
            if package in third_party:
                assert subpackage(name) in owners, f"{name} imports {package}; only {sorted(owners)} may"


def test_study_and_ensembles_need_no_torch():
    checked = 0
    for name, path in modules().items():
        if subpackage(name) in TORCH_FREE and name not in TORCH_FREE_EXCEPTIONS:
            third_party, ours = runtime_imports(path)
            assert "torch" not in third_party, f"{name} imports torch"
            checked += 1
    assert checked >= 10


def test_nothing_imports_the_cli():
    for name, path in modules().items():
        if name in ("distrain.cli",):
            continue
        _, ours = runtime_imports(path)
        assert "distrain.cli" not in ours, name


def test_no_import_cycles_between_modules_or_subpackages():
    graph = import_graph(type_only=True)  # a type-only cycle is a cycle of the design all the same
    assert sum(len(v) for v in graph.values()) > 50  # the graph was really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    packages = {}
    for module, targets in graph.items():
        packages.setdefault(subpackage(module) or module, set()).update(
            subpackage(t) or t for t in targets if (subpackage(t) or t) != (subpackage(module) or module)
        )
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_is_longer_than_80_lines():
    too_long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long


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


def unit(module):
    """The layering unit of a module: its subpackage, or the top-level module's own name."""
    return subpackage(module) or module.split(".")[1]


def layer_violations(graph):
    """'a -> b' for every import of a unit from a higher layer or from another unit of its own layer."""
    layer_of = {name: i for i, names in enumerate(LAYERS) for name in names}
    bad = []
    for module, targets in graph.items():
        for target in targets:
            a, b = unit(module), unit(target)
            if a != b and layer_of[b] >= layer_of[a]:
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def test_every_unit_has_a_declared_layer():
    units = {unit(m) for m in modules() if m != "distrain"}
    declared = set().union(*LAYERS)
    assert units <= declared, f"units without a layer in LAYERS: {sorted(units - declared)}"


def test_imports_follow_the_declared_layer_order_type_only_ones_included():
    graph = import_graph(type_only=True)
    assert layer_violations(graph) == []


def test_a_planted_upward_import_fails_the_layer_check():
    graph = import_graph(type_only=True)
    graph["distrain.study.plan"] = graph["distrain.study.plan"] | {"distrain.training.loop"}
    graph["distrain.tracking.base"] = graph["distrain.tracking.base"] | {"distrain.ensembles.report"}
    graph["distrain.ensembles.combine"] = graph["distrain.ensembles.combine"] | {"distrain.serving.predictor"}
    assert layer_violations(graph) == ["distrain.ensembles.combine -> distrain.serving.predictor",
                                       "distrain.study.plan -> distrain.training.loop",
                                       "distrain.tracking.base -> distrain.ensembles.report"]  # fmt: skip


def test_no_public_function_takes_more_than_8_parameters():
    """Components take their config section (`EnsembleConfig`, `SchedulerConfig`, ...), not its fields one by one."""
    too_many = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                if len(params) > 8:
                    too_many.append(f"{name}.{node.name}: {len(params)}")
    assert not too_many, too_many


def task_mentions(tree: ast.AST, task_names: set[str]) -> list[str]:
    """Where code branches on a task by its name: a comparison with, or a dict key of, a task's name; a `.task`
    compared with string constants; an identifier that contains a task's name."""
    found = []

    def is_name(node):
        return isinstance(node, ast.Constant) and node.value in task_names

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            consts = [e for o in operands for e in (o.elts if isinstance(o, (ast.Tuple, ast.List, ast.Set)) else [o])]
            if any(is_name(c) for c in consts) or (
                any(isinstance(o, ast.Attribute) and o.attr == "task" for o in operands)
                and any(isinstance(c, ast.Constant) and isinstance(c.value, str) for c in consts)
            ):
                found.append(f"line {node.lineno}: compares with a task name")
        elif isinstance(node, ast.Dict) and any(is_name(k) for k in node.keys):
            found.append(f"line {node.lineno}: a dict keyed by task names")
        elif isinstance(node, ast.match_case) and any(is_name(n) for n in ast.walk(node.pattern)):
            found.append(f"line {node.pattern.lineno}: matches a task name")
        identifier = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "arg", None)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            identifier = node.name
        if isinstance(identifier, str) and any(t in identifier.lower() for t in task_names):
            found.append(f"line {node.lineno}: identifier {identifier!r}")
    return found


def test_no_module_outside_tasks_branches_on_a_task():
    """The rest of distrain reaches a task through the `Task` interface only (tasks/base.py), never by its name."""
    from distrain.tasks import TASKS

    assert {"multiclass", "binary", "multilabel"} <= set(TASKS)
    offences = {}
    for name, path in modules().items():
        if not (name == "distrain.tasks" or name.startswith("distrain.tasks.")):
            offences[name] = task_mentions(ast.parse(path.read_text()), set(TASKS))
    assert not {k: v for k, v in offences.items() if v}, {k: v for k, v in offences.items() if v}


def test_the_task_name_check_finds_each_way_of_branching():
    planted = (
        "if cfg.task == 'binary':\n    pass\n"
        "weights = {'multilabel': 1}\n"
        "def multiclass_head():\n    pass\n"
        "x = cfg.task in ('a', 'b')\n"
        "y = labels.ndim == 2\n"  # asking the data is not naming a task
    )
    found = task_mentions(ast.parse(planted), {"multiclass", "binary", "multilabel"})
    assert sorted(f.split(":")[0] for f in found) == ["line 1", "line 3", "line 4", "line 6"], found
