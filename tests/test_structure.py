"""The house rules of docs/architecture.md, checked on the source: the folders are the layers and import only the
layers below them, no import cycle, no private name used across modules, every third-party internal in its one named
place, the method free of any platform, small files and functions, every document a comment cites shipped. Each
rule is also run on planted violations, so a rule that could not fail would show here."""
import ast
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "beamlora_ds"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60

# Each layer (a folder of beamlora_ds/, or a top-level module) and the layers it may import besides itself: who imports
# whom goes one way, method <- backends <- the rest, as docs/architecture.md draws it. testing/ is the floor
# (standard library only): its crash points may be called from anywhere.
LAYERS = {
    "testing": set(),
    "method": {"testing"},
    "backends": {"method", "testing"},
    "loading": {"backends", "method", "testing"},
    "checkpointing": {"backends", "method", "testing"},
    "telemetry": {"backends"},
    "export": {"checkpointing", "loading", "backends", "method", "testing"},
    "integrations": {"export", "checkpointing", "backends", "method"},
    "train": {"loading", "checkpointing", "telemetry", "backends", "method", "testing"},
    "adapt": {"backends", "method"},
}
# What the method may import from outside the standard library: torch, but no process group and no platform.
METHOD_FORBIDDEN = ("torch.distributed", "deepspeed", "transformers", "bitsandbytes", "peft", "megatron", "accelerate")
# Third-party private names (and patched methods) live in one named place each (docs/platform.md lists them).
INTERNALS = {
    "beamlora_ds/backends/deepspeed/internals.py": "DeepSpeed",
    "beamlora_ds/backends/megatron/internals.py": "megatron-core",
    "beamlora_ds/loading/cpu_repacking.py": "bitsandbytes",
    "beamlora_ds/integrations/hf_trainer.py": "transformers.Trainer",
}
# Private attribute names a module may use on objects it does not define: our own markers on other libraries'
# objects anywhere, and torch's in-place write counter (a Tensor attribute autograd itself relies on) where the
# score table reads it (docs/platform.md lists both).
ALLOWED_PRIVATE = re.compile(r"^_beamlora_\w+$")
ALLOWED_PRIVATE_IN = {"beamlora_ds/method/score_table.py": {"_version"}}


# ---------------------------------------------------------------------------------------------- the source
def read_sources(root=ROOT):
    """{relative path: source} of the package and launch/train.py."""
    sources = {}
    for folder, _, names in os.walk(os.path.join(root, PACKAGE)):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    sources[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    with open(os.path.join(root, "launch", "train.py")) as f:
        sources["launch/train.py"] = f.read()
    return sources


def module_of(path):
    """beamlora_ds/backends/torch_access.py -> beamlora_ds.backends.torch_access (a package's __init__: itself)."""
    name = path[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def layer_of(module):
    """The layer a module of ours belongs to (None for the package's __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path, source, ours):
    """(line, imported module, imported name or None, the name it is bound to, is ours) for every import in the
    file, function-level included; `from pkg import sub` imports the submodule pkg.sub when it is one of `ours`."""
    package = module_of(path) if path.endswith("__init__.py") else module_of(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None, a.asname or a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in ours else base, None if sub in ours else a.name,
                              a.asname or a.name))
    return [(line, target, name, bound, target == PACKAGE or target.startswith(PACKAGE + "."))
            for line, target, name, bound in found]


# ---------------------------------------------------------------------------------------------- the rules
def layer_violations(sources):
    ours = {module_of(p) for p in sources if p.startswith(PACKAGE)}
    found = []
    for path, source in sources.items():
        if not path.startswith(PACKAGE + "/") or path == f"{PACKAGE}/__init__.py":
            continue
        layer = layer_of(module_of(path))
        for line, target, _, _, is_ours in imports(path, source, ours):
            if not is_ours:
                continue
            other = layer_of(target)
            if other is None or (other != layer and other not in LAYERS.get(layer, set())):
                found.append(f"{path}:{line}: {layer}/ imports {target} ({other or 'the public API'}), which "
                             f"it may not (it may import {sorted(LAYERS.get(layer, set()))})")
    return found


def import_cycles(sources):
    """Groups of our modules that import each other, directly or around a loop (Tarjan's algorithm)."""
    ours = {module_of(p) for p in sources if p.startswith(PACKAGE)}
    graph = {module_of(p): {t for _, t, _, _, is_ours in imports(p, s, ours) if is_ours and t != module_of(p)}
             for p, s in sources.items() if p.startswith(PACKAGE)}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def private_names_across_modules(sources):
    """`from <ours> import _name`, and `<one of our modules>._name`, anywhere (function-level included)."""
    ours = {module_of(p) for p in sources if p.startswith(PACKAGE)}
    found = []
    for path, source in sources.items():
        modules = set()  # names this file binds to one of our modules
        for line, target, name, bound, is_ours in imports(path, source, ours):
            if not is_ours:
                continue
            if name is None:
                modules.add(bound)
            elif name.startswith("_") and not name.startswith("__"):
                found.append(f"{path}:{line}: imports the private name {name} from {target}")
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path}:{node.lineno}: uses {node.value.id}.{node.attr}, a private name of another "
                             "module")
    return found


def third_party_internals(sources):
    """Private names of other libraries (in an import, read as an attribute, or named in getattr/hasattr/setattr)
    outside the one place INTERNALS names for them. `self._x` counts as another library's unless the file itself
    defines `_x` (an inherited private attribute is the base class's internal)."""
    found = []
    for path, source in sources.items():
        if path in INTERNALS:
            continue
        tree = ast.parse(source)
        own, allowed = defined_private_names(tree), ALLOWED_PRIVATE_IN.get(path, set())
        for node in ast.walk(tree):
            for name in private_names_used(node, own):
                if name not in allowed and not ALLOWED_PRIVATE.match(name):
                    found.append(f"{path}:{node.lineno}: relies on the private name {name}; third-party internals "
                                 f"live in {sorted(INTERNALS)}")
    return found


def defined_private_names(tree) -> set:
    """Private names a file defines: functions, classes, assignments to a name or to self./cls. attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        names.add(t.id)
                    elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"):
                        names.add(t.attr)
    return {n for n in names if n.startswith("_")}


def private_names_used(node, own: set) -> list:
    """The private names `node` uses that are not the file's own: every dotted part of a third-party import, an
    attribute (of self/cls: unless the file defines it), a name given to getattr/hasattr/setattr/delattr."""
    names = []
    if isinstance(node, ast.Import):
        names = [part for a in node.names if not a.name.startswith(PACKAGE) for part in a.name.split(".")]
    elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith(PACKAGE):
        names = (node.module or "").split(".") + [a.name for a in node.names]
    elif isinstance(node, ast.Attribute):
        on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        names = [] if on_self and node.attr in own else [node.attr]
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1
          and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        names = [node.args[1].value]
    return [n for n in names if n.startswith("_") and not n.startswith("__")]


def platform_imports_in_the_method(sources):
    """A platform module imported by method/ (function-level included), reached as an attribute chain
    (`torch.distributed.all_reduce`), or loaded by importlib from a string; or any of our layers above it."""
    found = []
    for path, source in sources.items():
        if not path.startswith(f"{PACKAGE}/method/"):
            continue
        for node in ast.walk(ast.parse(source)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute):
                names = [dotted(node)]
            elif (isinstance(node, ast.Call) and dotted(node.func) in ("importlib.import_module", "import_module",
                                                                        "__import__") and node.args
                  and isinstance(node.args[0], ast.Constant)):
                names = [str(node.args[0].value)]
            for name in names:
                if any(name == f or name.startswith(f + ".") for f in METHOD_FORBIDDEN + (PACKAGE,)) and not (
                        name.startswith(f"{PACKAGE}.method") or name.startswith(f"{PACKAGE}.testing")):
                    found.append(f"{path}:{node.lineno}: the method reaches {name}")
    return found


def dotted(node) -> str:
    """`a.b.c` for an attribute chain on a name, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id] + parts[::-1]) if isinstance(node, ast.Name) else ""


def non_stdlib_imports_in_testing(sources):
    """testing/ is the floor every layer may call: the standard library only (and itself)."""
    found = []
    for path, source in sources.items():
        if not path.startswith(f"{PACKAGE}/testing/"):
            continue
        for line, target, _, _, is_ours in imports(path, source, {module_of(p) for p in sources}):
            top = target.split(".")[0]
            if (is_ours and not target.startswith(f"{PACKAGE}.testing")) or (
                    not is_ours and top not in sys.stdlib_module_names and top != "__future__"):
                found.append(f"{path}:{line}: testing/ imports {target}")
    return found


def oversized(sources):
    found = []
    for path, source in sources.items():
        lines = len(source.splitlines())
        if lines > MAX_FILE_LINES:
            found.append(f"{path} has {lines} lines; split it by job (limit {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path}: {node.name} has {length} lines (limit {MAX_FUNCTION_LINES})")
    return found


RULES = (layer_violations, import_cycles, private_names_across_modules, third_party_internals,
         platform_imports_in_the_method, non_stdlib_imports_in_testing, oversized)


# ---------------------------------------------------------------------------------------------- the tree
@pytest.fixture(scope="module")
def sources():
    return read_sources()


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_the_tree_keeps_the_rule(sources, rule):
    assert not rule(sources)


def test_the_folders_are_the_layers_of_the_architecture():
    """`ls beamlora_ds/` shows the layers docs/architecture.md describes, one to one, and every layer's folder
    is explained there."""
    entries = {e[:-3] if e.endswith(".py") else e for e in os.listdir(os.path.join(ROOT, PACKAGE))
               if not e.startswith((".", "__pycache__"))}
    assert entries == set(LAYERS) | {"__init__"}
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        architecture = f.read()
    for layer in LAYERS:
        shown = f"`{layer}/`" if os.path.isdir(os.path.join(ROOT, PACKAGE, layer)) else f"`{layer}.py`"
        assert shown in architecture, f"docs/architecture.md does not describe {shown}"


# ---------------------------------------------------------------------------------------------- planted violations
PLANTED = {
    "beamlora_ds/__init__.py": "",
    "beamlora_ds/method/__init__.py": "",
    "beamlora_ds/method/layer.py": ("import torch.distributed as dist\nfrom ..backends import wrappers\n"
                                    "from .algorithm import _helper\n"),
    "beamlora_ds/method/algorithm.py": ("def _helper():\n    from . import layer\n    return layer._private\n"),
    "beamlora_ds/method/controller.py": ("import importlib\nimport torch\n\n\nclass C(torch.nn.Module):\n"
                                        "    def f(self):\n        torch.distributed.barrier()\n"
                                        "        importlib.import_module('deepspeed.comm')\n"
                                        "        self._mine = 1\n        return self._parameters, self._mine\n"),
    "beamlora_ds/backends/__init__.py": "",
    "beamlora_ds/backends/wrappers.py": ("import torch._dynamo\n\n\ndef f(param):\n"
                                         "    from deepspeed.runtime import _private_fn\n"
                                         "    return getattr(param, '_hp_mapping', None) or param._z3_optimizer\n"),
    "beamlora_ds/backends/deepspeed/__init__.py": "",
    "beamlora_ds/backends/deepspeed/internals.py": "def f(param):\n    return param._hp_mapping\n",
    "beamlora_ds/testing/__init__.py": "",
    "beamlora_ds/testing/launcher.py": "import json\n\n\ndef f():\n    import torch\n    return torch, json\n",
    "beamlora_ds/export/__init__.py": "",
    "beamlora_ds/export/live.py": "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "    return x\n",
    "beamlora_ds/export/merge.py": "x = 1\n" * (MAX_FILE_LINES + 1),
    "launch/train.py": "",
}


@pytest.mark.parametrize("rule, expected", [
    (layer_violations, ["method/layer.py:2: method/ imports beamlora_ds.backends.wrappers"]),
    (import_cycles, [["beamlora_ds.method.algorithm", "beamlora_ds.method.layer"]]),
    (private_names_across_modules, ["method/layer.py:3: imports the private name _helper",
                                    "method/algorithm.py:3: uses layer._private"]),
    (third_party_internals, ["backends/wrappers.py:1: relies on the private name _dynamo",
                             "backends/wrappers.py:5: relies on the private name _private_fn",
                             "backends/wrappers.py:6: relies on the private name _hp_mapping",
                             "backends/wrappers.py:6: relies on the private name _z3_optimizer",
                             "method/controller.py:10: relies on the private name _parameters"]),
    (platform_imports_in_the_method, ["method/layer.py:1: the method reaches torch.distributed",
                                      "method/controller.py:7: the method reaches torch.distributed.barrier",
                                      "method/controller.py:8: the method reaches deepspeed.comm"]),
    (non_stdlib_imports_in_testing, ["testing/launcher.py:5: testing/ imports torch"]),
    (oversized, ["export/live.py: f has 62 lines", "export/merge.py has 401 lines"]),
])
def test_each_rule_finds_a_planted_violation(rule, expected):
    """The checks themselves: each finds what was planted, and nothing it should let pass (the private names the
    internals file may use, a private attribute the class defines itself)."""
    found = rule(PLANTED)
    for item in expected:
        assert any(item == f or (isinstance(item, str) and item in f) for f in found), (item, found)
    assert not any(str(f).startswith("beamlora_ds/backends/deepspeed/internals.py") for f in found)
    assert not any("_mine" in str(f) for f in found)


# ---------------------------------------------------------------------------------------------- documents
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
                missing.add(f"{os.path.relpath(path, ROOT)} cites {cited}")
        if "../shared" in text:
            missing.add(f"{os.path.relpath(path, ROOT)} refers to ../shared")
    assert not missing, sorted(missing)


SOURCE_CITATION = re.compile(r"(?<![\w./-])((?:[A-Za-z_]\w*/)+\w+\.py)\b")


def _cited_source_exists(cited: str, shipped: list) -> bool:
    """`cited` (a path like `backends/flat_runs.py`) names a file of this repository (its path, or the tail of one),
    or a file inside the installed third-party package its first part names (`deepspeed/launcher/runner.py`)."""
    if any(rel == cited or rel.endswith("/" + cited) for rel in shipped):
        return True
    import importlib.util

    package = cited.split("/")[0]
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None:  # a package not installed here (megatron without the extra): cannot be checked
        return True
    places = list(spec.submodule_search_locations or [])
    return any(os.path.isfile(os.path.join(place, *cited.split("/")[1:])) for place in places)


MODULE_CITATION = re.compile(r"(?<![\w.])(beamlora_ds(?:\.\w+)+)(?![\w\"])")  # not a "beamlora_ds.x" format name


def _module_names(path: str) -> set:
    """The names a module defines or imports at its top level, and those its __all__ lists."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                names.update(e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant))
    return names


def _cited_module_exists(dotted: str) -> bool:
    """`beamlora_ds.a.b[.name]`: the folders and module exist, and the module defines (or imports) `name`."""
    folder, module, rest = os.path.join(ROOT, PACKAGE), None, dotted.split(".")[1:]
    while rest and os.path.isdir(os.path.join(folder, rest[0])):
        folder, rest = os.path.join(folder, rest[0]), rest[1:]
    module = os.path.join(folder, "__init__.py")
    if rest and os.path.isfile(os.path.join(folder, rest[0] + ".py")):
        module, rest = os.path.join(folder, rest[0] + ".py"), rest[1:]
    return not rest or rest[0] in _module_names(module)


def test_cited_source_files_exist():
    """A comment or document that cites a source file by path cites one that exists: in the repository (a file
    moved in a restructure leaves no stale path behind) or in the third-party package it names; one that cites a
    module of the package by its dotted name (`beamlora_ds.loading.models.load_model`) names a module that exists
    and a name it defines."""
    shipped = [os.path.relpath(p, ROOT) for p in _source_files()]
    documents = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", n)
                                                      for n in sorted(os.listdir(os.path.join(ROOT, "docs")))]
    missing = set()
    for path in list(_source_files()) + [p for p in documents if p.endswith(".md")]:
        with open(path, errors="replace") as f:
            text = f.read()
        for cited in set(SOURCE_CITATION.findall(text)):
            if not _cited_source_exists(cited, shipped):
                missing.add(f"{os.path.relpath(path, ROOT)} cites {cited}")
        for cited in set(MODULE_CITATION.findall(text)):
            if not _cited_module_exists(cited.rstrip(".")):
                missing.add(f"{os.path.relpath(path, ROOT)} cites {cited}")
    assert not missing, sorted(missing)


def test_the_suite_times_are_quoted_alike():
    """README, setup.cfg and docs/testing.md quote the same measured times for the full suite and the quick tier."""
    quoted = {}
    for name, full, quick in (
            ("README.md", r"the test suite, about (\d+) min", r'-m "not slow"` \(about (\d+) s'),
            ("setup.cfg", r"the full suite about (\d+) min", r"takes about (\d+) s on 2 cores"),
            ("docs/testing.md", r"the full suite: about (\d+) min", r"the quick tier: about (\d+) s")):
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        quoted[name] = (re.search(full, text).group(1), re.search(quick, text).group(1))
    assert len(set(quoted.values())) == 1, quoted
