"""The house's layout (README.md, "Layout"): imports run only downward, no import circle (not even
through a function-level import), kernels/ stands alone, and no file is over 400 lines. Read from the
sources with ast, nothing imported."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Layers, bottom (0) to top: a module may import modules of its own layer or below, never above.
LAYERS = [
    ("fastres.kernels", "fastres._ext", "fastres._native", "fastres.layout", "fastres.errors", "fastres.ops.reference",
     "fastres.models.registry", "fastres.nn_methods", "fastres.module_calls"),
    ("fastres.backends", "fastres.backend"),
    ("fastres.ops", "fastres.plain_pair"),
    ("fastres.nn",),
    ("fastres.models",),
    ("fastres.convert", "fastres.frozen"),
    ("fastres.train", "fastres.bench", "fastres.parity", "fastres.info", "fastres"),
]
MAX_LINES = 400


def _module_files():
    out = {}
    for folder, package in (("fastres", "fastres"), ("kernels", "fastres.kernels")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))
                parts = rel[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join([package, *parts])] = os.path.join(dirpath, f)
    return out


MODULES = _module_files()
EXTENSIONS = ("fastres._C", "fastres._cpu")   # from csrc/, csrc/cpu/: no Python source, import nothing


def _imports(path, module):
    """Every fastres module `module` imports, at any depth of the file (function-level imports too)."""
    tree = ast.parse(open(path).read())
    is_pkg = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module if is_pkg else module.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rsplit(".", 1)[0]
                base = f"{pkg}.{base}" if base else pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES or f"{base}.{a.name}" in EXTENSIONS
                     else base for a in node.names]
        else:
            continue
        for name in names:
            if name in EXTENSIONS:
                continue
            while name and name not in MODULES:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != module:
                found.add(name)
    return found


GRAPH = {m: _imports(p, m) for m, p in MODULES.items()}


def _layer(module):
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    assert best is not None, f"{module} is in no layer of tests/test_layout.py"
    return best[0]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downward(module):
    up = [dep for dep in GRAPH[module] if _layer(dep) > _layer(module)]
    assert not up, f"{module} (layer {_layer(module)}) imports upward: {up}"


def test_kernels_import_nothing_of_fastres_outside_themselves():
    for module, deps in GRAPH.items():
        if module.startswith("fastres.kernels"):
            outside = [d for d in deps if not d.startswith("fastres.kernels")]
            assert not outside, f"{module} imports {outside}"


def test_no_import_circle():
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for dep in GRAPH[m]:
            if dep.startswith(m + ".") or m.startswith(dep + "."):
                continue   # a package and its own submodules
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_no_file_over_400_lines():
    long = []
    for folder in ("fastres", "kernels", "csrc", "tests", "benchmarks", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            if "results" in dirpath.split(os.sep) or "__pycache__" in dirpath:
                continue
            for f in files:
                if f.endswith((".py", ".cpp", ".cu", ".cuh", ".h", ".sh")):
                    path = os.path.join(dirpath, f)
                    n = sum(1 for _ in open(path, errors="replace"))
                    if n > MAX_LINES:
                        long.append(f"{os.path.relpath(path, ROOT)}: {n}")
    assert not long, f"files over {MAX_LINES} lines: {long}"
