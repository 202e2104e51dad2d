"""The house rules of docs/architecture.md, checked on the source: small files and functions, no private-name imports
across modules, the seam respected, and every document a comment cites shipped in the repository."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "beamlora_ds")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _package_files():
    return sorted(os.path.join(PACKAGE, f) for f in os.listdir(PACKAGE) if f.endswith(".py"))


def _checked_files():
    """The library and the main entry point (the rules of issue 12 cover both)."""
    return _package_files() + [os.path.join(ROOT, "launch", "train.py")]


def _rel(path):
    return os.path.relpath(path, ROOT)


def _tree(path):
    with open(path) as f:
        return ast.parse(f.read(), filename=path)


@pytest.mark.parametrize("path", _checked_files(), ids=_rel)
def test_files_are_small(path):
    with open(path) as f:
        lines = len(f.readlines())
    assert lines <= MAX_FILE_LINES, f"{_rel(path)} has {lines} lines; split it by job (limit {MAX_FILE_LINES})"


@pytest.mark.parametrize("path", _checked_files(), ids=_rel)
def test_functions_are_short(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(_tree(path)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{_rel(path)}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def _private_imports(path):
    """`from x import _name` where x is one of our modules (importing a module's private name couples to its
    internals); names from third-party packages are outside this rule."""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").startswith("beamlora_ds")
            found += [f"from {'.' * node.level}{node.module or ''} import {a.name}" for a in node.names
                      if ours and a.name.startswith("_") and not a.name.startswith("__")]
    return found


@pytest.mark.parametrize("path", _checked_files(), ids=_rel)
def test_no_private_imports_across_modules(path):
    assert not _private_imports(path), f"{_rel(path)}: {_private_imports(path)}"


@pytest.mark.parametrize("name", ["beam.py", "layer.py", "config.py", "score_table.py"])
def test_pure_modules_do_not_import_deepspeed(name):
    """The algorithm stays pure torch; DeepSpeed lives behind the seam (docs/architecture.md)."""
    imported = set()
    for node in ast.walk(_tree(os.path.join(PACKAGE, name))):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "deepspeed" not in imported and "torch.distributed" not in imported


CITATION = re.compile(r"\b((?:docs/)?[A-Za-z_]+\.md)\b")
SOURCE_DIRS = ("beamlora_ds", "launch", "tests", "benchmarks", "examples", "scripts", "ds_configs", ".ci")


def _source_files():
    for folder in SOURCE_DIRS:
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                path = os.path.join(root, name)
                if (name.endswith((".py", ".sh", ".sbatch", ".json", ".cfg")) or name == "run") and \
                        path != os.path.abspath(__file__):
                    yield path


def test_cited_documents_exist():
    """A comment that cites a document cites one the repository ships (never a file outside it)."""
    missing = set()
    for path in _source_files():
        with open(path, errors="replace") as f:
            text = f.read()
        for cited in CITATION.findall(text):
            target = cited if cited.startswith("docs/") else os.path.join("docs", cited)
            if cited != "README.md" and not os.path.isfile(os.path.join(ROOT, target)):
                missing.add(f"{_rel(path)} cites {cited}")
        if "../shared" in text:
            missing.add(f"{_rel(path)} refers to ../shared")
    assert not missing, sorted(missing)
