"""House rules as a test: modules ≤ 400 lines, functions ≤ 50 lines, ray.remote applied in one place."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "rayuid").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


def test_modules_and_functions_stay_small():
    long_files = [f"{p.relative_to(ROOT)}: {n}" for p in SOURCES if (n := len(p.read_text().splitlines())) > 400]
    long_funcs = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 50:
                    long_funcs.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long_files, long_files
    assert not long_funcs, long_funcs


def test_ray_remote_is_applied_in_one_module_at_most():
    users = {p.relative_to(ROOT).as_posix() for p in SOURCES if "ray.remote" in p.read_text()}
    assert len(users) <= 1, users
