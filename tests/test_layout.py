"""The package layout is the design: stages as packages, imports flowing one way, no cycles, module paths that
resolve. Read from the source with ``ast`` (nothing is imported), so a violation names the file and the line."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rayuid"

# Lowest first. A module may import modules of lower layers and of its own unit (package or base module) only.
LAYERS = [
    ["rayuid.logs", "rayuid.precision", "rayuid.seeds"],       # base: import nothing of rayuid
    ["rayuid.feedback"],                                       # personas, simulated users, judges, IFEval, PrefEval
    ["rayuid.config"],                                         # the job schema (validates persona names)
    ["rayuid.records"],                                        # what a run leaves behind (written atomically)
    ["rayuid.data"],                                           # what a run reads
    ["rayuid.sdpo"],                                           # the method (pure torch)
    ["rayuid.offline", "rayuid.personal"],                     # single-process loop; per-user adapters
    ["rayuid.system"],                                         # the Ray system and its one driver loop
    ["rayuid.cli"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: dict[str, Path], name: str | None = None) -> list[tuple[int, str]]:
    """(line, imported rayuid module) for every import in ``path``, including lazy and TYPE_CHECKING ones."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name and target != "rayuid":
                out.append((node.lineno, target))
    return out


def unit_of(module: str) -> tuple[int, str]:
    """(layer index, unit) of a module: its stage package, or the base/top module itself."""
    for level, units in enumerate(LAYERS):
        for unit in units:
            if module == unit or module.startswith(unit + "."):
                return level, unit
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS in tests/test_layout.py")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for _, t in imports(p, known)} for m, p in known.items()}


def test_every_module_sits_in_a_stage_package():
    loose = [m for m in modules() if m.count(".") == 1 and m != "rayuid.__init__"
             and m not in {u for layer in LAYERS for u in layer if u.count(".") == 1}]
    assert not loose, f"modules directly under rayuid/ that are not base or cli: {loose}"


def violations(module: str, found: list[tuple[int, str]]) -> list[str]:
    """Imports of ``module`` that go up a layer or sideways into another unit of its own layer."""
    level, unit = unit_of(module)
    bad = []
    for line, target in found:
        t_level, t_unit = unit_of(target)
        if t_unit != unit and t_level >= level:
            bad.append(f"{module}:{line} imports {target} (layer {t_level} >= {level})")
    return bad


def test_imports_flow_one_way():
    known = modules()
    bad = [v for m, p in known.items() if m != "rayuid" for v in violations(m, imports(p, known))]
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_a_planted_upward_import_is_reported(tmp_path):
    """The check reads what it should: a lazy import of the Ray driver inside the method's package is found."""
    planted = tmp_path / "losses.py"
    planted.write_text("import torch\n\n\ndef f():\n    from rayuid.system import driver\n")
    found = imports(planted, modules(), name="rayuid.sdpo.losses")
    assert found == [(5, "rayuid.system.driver")]
    assert violations("rayuid.sdpo.losses", found) == ["rayuid.sdpo.losses:5 imports rayuid.system.driver (layer 7 >= 5)"]
    assert violations("rayuid.system.driver", [(1, "rayuid.sdpo.losses")]) == []


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module are import cycles."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop(); on.discard(w); comp.append(w)
                        if w == v:
                            break
                    out.append(comp)
    return out


def test_no_import_cycles():
    cycles = [sorted(c) for c in strongly_connected(graph()) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_finder_finds_a_cycle():
    assert sorted(map(sorted, strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}))) == \
        [["a", "b", "c"], ["d"]]


MODULE_PATH = re.compile(r"""["'`](rayuid(?:\.[A-Za-z_]\w*)+)["'`]""")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("where", ["rayuid", "jobs", "cluster", "tests", "benchmarks", "pyproject.toml", "README.md"])
def test_module_path_strings_resolve(where):
    """Strings naming rayuid objects (vLLM's worker_extension_cls, entry points, docs) import after the move."""
    files = [ROOT / where] if (ROOT / where).is_file() else [p for p in (ROOT / where).rglob("*") if p.is_file()
                                                             and p.suffix in (".py", ".yaml", ".yml", ".toml", ".md")]
    bad = []
    for path in files:
        for dotted in MODULE_PATH.findall(path.read_text()):
            if not _resolves(dotted):
                bad.append(f"{path.relative_to(ROOT)}: {dotted}")
    assert not bad, "module paths that do not import:\n" + "\n".join(bad)
