"""docs/fidelity.md and docs/design.md cite this package as `path::symbol` (a module-level function, class or
constant, or `Class.method`); each must exist, so that a doc never points at moved or renamed code."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"`((?:mokd_scale|tools|tests)/[\w/]+\.py)::([\w.]+)`")
DOCS = ("docs/fidelity.md", "docs/design.md")


def defined_names(tree: ast.AST) -> dict[str, ast.AST]:
    names = {}
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if isinstance(target, ast.Name):
                    names[target.id] = node
    return names


def resolves(path: str, symbol: str) -> bool:
    file = REPO / path
    if not file.is_file():
        return False
    node: ast.AST = ast.parse(file.read_text())
    for part in symbol.split("."):
        node = defined_names(node).get(part)
        if node is None:
            return False
    return True


@pytest.mark.parametrize("doc", DOCS)
def test_every_symbol_a_doc_cites_exists(doc):
    text = (REPO / doc).read_text()
    references = REFERENCE.findall(text)
    assert len(references) >= 10, f"{doc} cites too few symbols for this test to mean anything"
    stale = [f"{path}::{symbol}" for path, symbol in references if not resolves(path, symbol)]
    assert not stale, f"{doc} points at code that does not exist: " + ", ".join(stale)


def test_docs_cite_no_line_numbers():
    for doc in DOCS:
        lines = re.findall(r"`(?:mokd_scale|tools|tests)/[\w/]+\.py:\d+`", (REPO / doc).read_text())
        assert not lines, f"{doc} cites line numbers (they move with every edit): {lines[:3]}"


def test_the_checker_rejects_what_does_not_exist():
    assert resolves("mokd_scale/train/step.py", "Step.__call__")
    assert not resolves("mokd_scale/train/step.py", "Step.no_such_method")
    assert not resolves("mokd_scale/no_such_file.py", "Step")
