"""The house rules of the layout: imports point down, the floors that must not load torch don't,
and a new op is one file."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "workloads", "reports")
FIXTURES = Path(__file__).parent / "fixtures" / "check"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(path): path
            for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name refers to (a module, or an object of one)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (at any depth of the file, lazy ones included)."""
    modules = _project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                imported = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in imported:
                owner = _owner(target, modules)
                if owner and owner != name:
                    targets.add(owner)
        graph[name] = targets
    return graph


# The floors of the architecture, top first: a module may import its own floor
# and the floors below it. reports/ sits beside the measuring floors and reads only records.
FLOORS = (
    ("commands", ("bench.commands",)),
    ("run", ("bench.run", "bench.distributed", "bench.serve")),
    ("ops", ("bench.ops", "bench.registry", "bench.peers")),
    ("models", ("bench.models",)),
    ("embeddings", ("bench.embeddings", "bench.references", "bench.compare_outputs")),
    ("workloads", ("workloads",)),
    ("records", ("bench.records", "bench")),
)
FLOOR_NAMES = [floor for floor, _ in FLOORS]


def _floor(module: str) -> str:
    """The floor of a module in the architecture's plan (reports are their own)."""
    if module == "reports" or module.startswith("reports."):
        return "reports"
    for floor, prefixes in FLOORS:
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return floor
    raise AssertionError(f"{module}: on no floor of the plan; add it to FLOORS")


def _package_parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:index]) for index in range(1, len(parts))}


def test_import_graph_has_no_circle():
    graph = import_graph()
    # A package's __init__ importing its own children is how packages work, not a circle.
    edges = {name: {target for target in targets if name not in _package_parents(target)}
             for name, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges.get(name, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [name, target]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if state.get(target) is None:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(edges):
        if state.get(name) is None:
            visit(name, [name])


def test_imports_only_point_down():
    def may_import(floor: str, target: str) -> bool:
        if floor == "reports":
            return target in ("reports", "records")
        if target == "reports":
            return floor == "commands"  # only the top floor renders reports
        return FLOOR_NAMES.index(target) >= FLOOR_NAMES.index(floor)

    wrong = [f"{name} -> {target}" for name, targets in import_graph().items()
             for target in targets if not may_import(_floor(name), _floor(target))]
    assert wrong == []


def test_the_import_checks_can_fail(monkeypatch):
    graph = import_graph()
    graph["bench.records"] = {"bench.run.sweep"}
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: graph)
    with pytest.raises(AssertionError):
        test_imports_only_point_down()
    with pytest.raises(pytest.fail.Exception):
        test_import_graph_has_no_circle()


def _imported_module(node: ast.ImportFrom, package: str) -> str:
    """The module an ImportFrom names, relative levels resolved against the importer's package."""
    base = node.module or ""
    if not node.level:
        return base
    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
    return ".".join(parts + ([base] if base else []))


def _dotted(node: ast.expr) -> list[str]:
    """a.b.c of an attribute chain as ["a", "b", "c"]; [] if it does not start at a name."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id] + names[::-1] if isinstance(node, ast.Name) else []


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(modules: dict[str, Path]) -> list[str]:
    """Uses of another project module's _private name: `from m import _x`, or `m._x` on a
    module bound by an import (import a.b, import a.b as m, from a import b)."""
    found = []
    for name, path in sorted(modules.items()):
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound: dict[str, str] = {}  # a local name -> the dotted path it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
            elif isinstance(node, ast.ImportFrom):
                source = _imported_module(node, package)
                owner = _owner(source, modules)
                for alias in node.names:
                    if owner and owner != name and _private(alias.name):
                        found.append(f"{name}: from {source} import {alias.name}")
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        for node in ast.walk(tree):
            chain = _dotted(node) if isinstance(node, ast.Attribute) else []
            if not chain or chain[0] not in bound:
                continue
            dotted = bound[chain[0]].split(".") + chain[1:]
            for length in range(len(dotted) - 1, 0, -1):
                prefix = ".".join(dotted[:length])
                if prefix in modules:
                    if prefix != name and _private(dotted[length]):
                        found.append(f"{name}: {prefix}.{dotted[length]}")
                    break
    return sorted(set(found))


def test_no_module_uses_another_modules_private_names():
    assert private_imports(_project_modules()) == []


def test_the_private_name_check_can_fail(tmp_path):
    files = {"pkg.low": "def _hidden():\n    return 1\n\ndef shown():\n    return _hidden()\n",
             "pkg.by_name": "from pkg.low import _hidden, shown\n",
             "pkg.by_attribute": "import pkg.low\n\nvalue = pkg.low._hidden()\n",
             "pkg.by_alias": "from pkg import low as lower\n\nvalue = lower._hidden()\n",
             "pkg.relative": "from .low import _hidden\n",
             "pkg.fine": "from pkg.low import shown\nimport pkg.low\n\nvalue = pkg.low.shown()\n"}
    modules = {}
    for module, text in files.items():
        path = tmp_path / (module.replace(".", "/") + ".py")
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        modules[module] = path
    assert private_imports(modules) == [
        "pkg.by_alias: pkg.low._hidden", "pkg.by_attribute: pkg.low._hidden",
        "pkg.by_name: from pkg.low import _hidden", "pkg.relative: from pkg.low import _hidden"]


def _loads_torch(code: str) -> bool:
    check = f"{code}\nimport sys\nsys.exit(7 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode in (0, 7), result.stderr
    return result.returncode == 7


def test_records_and_the_check_command_load_no_torch(tmp_path):
    assert not _loads_torch("import bench.records")
    # The full check command line on two committed runs, through run_bench.py's entry point.
    code = textwrap.dedent(f"""
        from bench.commands import main
        code = main(["check", "--baseline", {str(FIXTURES / 'baseline_run')!r},
                     "--candidate", {str(FIXTURES / 'candidate_run')!r},
                     "--out-dir", {str(tmp_path / 'verdicts')!r}])
        assert code in (0, 1, 2), code  # any verdict: the point is what got imported
    """)
    assert not _loads_torch(code)
    assert _loads_torch("import bench.run.timing")  # the probe itself can tell


THROWAWAY_OP = '''
"""A throw-away op written by tests/test_layout.py: one file, no other edit."""

import torch

from bench.registry import Op, Prepared, impl, register_op

register_op(Op("{name}", "test op: doubles the dense features", lambda workload, options: [{{}}],
               memory_factor=123.0, report_order=5))


@impl("{name}", "double", ("fp32",), baseline=True)
def build_double(context):
    """2 x the dense features."""
    values = torch.rand(context.workload.batch_size, 4, generator=torch.Generator().manual_seed(0))
    return Prepared(run=lambda: values * 2, reference=lambda: values.double() * 2,
                    samples=context.workload.batch_size, flops=values.numel(),
                    bytes_moved=2 * values.numel() * 4)
'''


def _with_op_directory(directory, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run Python code in a fresh process whose registry also scans directory for ops."""
    prelude = f"from bench import registry\nregistry.add_op_directory({str(directory)!r})\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _command(directory, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """run_bench.py's entry point with argv, its registry also scanning directory."""
    return _with_op_directory(directory, f"""
        import sys
        from bench.commands import main
        sys.exit(main({argv!r}))
    """, timeout)


@pytest.mark.slow
def test_a_new_op_is_one_file(tmp_path):
    name = f"throwaway_{uuid.uuid4().hex[:8]}"
    # The registry's search path takes an extra directory: the op file stays out of bench/ops.
    op_directory = tmp_path / "ops"
    op_directory.mkdir()
    (op_directory / f"{name}.py").write_text(THROWAWAY_OP.format(name=name), encoding="utf-8")
    listed = _command(op_directory, ["--list"])
    assert listed.returncode == 0, listed.stderr
    assert name in listed.stdout and "double*" in listed.stdout
    # Without the directory the op does not exist: the search path is what found it.
    assert name not in subprocess.run([sys.executable, "run_bench.py", "--list"], cwd=ROOT,
                                      capture_output=True, text=True, timeout=300).stdout
    # The memory check uses the op's declared factor (123 x the smoke tables' bytes).
    memory = _with_op_directory(op_directory, f"""
        from bench.run.sweep import estimate_bytes
        from workloads.presets import preset
        spec = preset("smoke")
        table_bytes = sum(table.rows for table in spec.tables) * spec.dim * 4
        assert estimate_bytes(spec, ["{name}"]) == 123.0 * table_bytes
    """)
    assert memory.returncode == 0, memory.stderr
    # The planner and a worker (told of the directory) run it, and the report shows it.
    out = tmp_path / "out"
    swept = _command(op_directory, ["--workload", "smoke", "--ops", name, "--precision", "fp32",
                                    "--min-run-time", "0.05", "--out", str(out),
                                    "--run-id", "new-op"], timeout=600)
    assert swept.returncode == 0, swept.stderr
    from bench.records import read_rows

    (row,) = read_rows(out / "new-op" / "results.csv")
    assert (row.op, row.impl, row.status) == (name, "double", "ok"), row.error
    assert name in (out / "new-op" / "report" / "summary.md").read_text()
    assert not list((ROOT / "bench" / "ops").glob("throwaway_*"))
