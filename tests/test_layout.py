"""The project's layering, checked statically over every module (top-level and function-level imports, and dynamic
imports by name): no import cycle, nothing outside ``tests/`` imports the tests, the core imports no other layer,
and no import runs back up a layer (the ComfyUI runtime, the world, the nodes and the dev kit never import the
training command)."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("hypertransport_core", "hypertransport_comfy", "hypertransport_world", "trainer", "studies", "nodes", "ht_devkit",
            "workflows", "benchmarks", "scripts")
#: what each layer may not import: the layers above it
FORBIDDEN = {
    "hypertransport_comfy": {"nodes", "trainer", "studies", "ht_devkit", "workflows", "benchmarks", "scripts"},
    "hypertransport_world": {"nodes", "trainer", "studies", "ht_devkit", "workflows", "benchmarks", "scripts"},
    "nodes": {"trainer", "studies", "ht_devkit", "workflows", "benchmarks", "scripts"},
    "ht_devkit": {"trainer", "studies", "workflows", "benchmarks", "scripts"},
    "trainer": {"nodes", "studies", "ht_devkit", "workflows", "benchmarks", "scripts"},
    "studies": {"nodes", "ht_devkit", "workflows", "benchmarks", "scripts"},
}
_DYNAMIC = {"import_module", "__import__"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _imports(name: str, path: pathlib.Path, known) -> set[str]:
    """The project modules ``name`` imports (relative imports resolved; ``from pkg import mod`` is ``pkg.mod``)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != name} | ({m.split(".")[0] for m in found} & {"tests"})


def test_no_import_cycle_and_nothing_imports_the_tests():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert not [m for m, deps in graph.items() if "tests" in deps]
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in graph[m] - {"tests"}:
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == [], cycles
    assert len(graph) > 50  # the walk saw the project


def test_the_core_imports_no_other_layer():
    mods = _modules()
    for m, p in mods.items():
        if m.startswith("hypertransport_core"):
            others = {d.split(".")[0] for d in _imports(m, p, mods)} - {"hypertransport_core"}
            assert not others, (m, others)


def _dynamic_imports(path: pathlib.Path) -> set[str]:
    """Project packages named by ``importlib.import_module(...)`` / ``__import__(...)`` calls (a string or an f-string
    whose first part names the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
        if name not in _DYNAMIC:
            continue
        arg = node.args[0]
        if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
            arg = arg.values[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            top = arg.value.split(".")[0]
            if top in PACKAGES:
                found.add(top)
    return found


def test_no_import_runs_back_up_a_layer():
    mods = _modules()
    bad = []
    for m, p in mods.items():
        layer = m.split(".")[0]
        deps = {d.split(".")[0] for d in _imports(m, p, mods)} | _dynamic_imports(p)
        for d in sorted(deps & FORBIDDEN.get(layer, set())):
            bad.append(f"{m} imports {d}")
    assert not bad, bad


def test_the_layer_check_sees_static_and_dynamic_imports(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import importlib\n\ndef f(name):\n    return importlib.import_module(f'trainer.{name}')\n")
    assert _dynamic_imports(p) == {"trainer"}
    p.write_text("def f():\n    from trainer.fit import x\n    return __import__('nodes.patching')\n")
    mods = {"trainer.fit": p, "nodes.patching": p}
    assert _imports("hypertransport_comfy.x", p, mods) == {"trainer.fit"} and _dynamic_imports(p) == {"nodes"}


def test_the_pack_makes_only_its_libraries_importable(tmp_path):
    """Loaded as ComfyUI loads a custom node, the pack adds exactly its three libraries to the import system: its folder
    is not on sys.path, so its nodes/, trainer/, tests/ ... shadow nothing of ComfyUI's or another pack's."""
    import os
    import subprocess
    import sys

    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("HyperTransport", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["HyperTransport"] = pack
spec.loader.exec_module(pack)
spec.loader.exec_module(pack)  # loaded twice: still one finder
import hypertransport_core.engine, hypertransport_world.scene, hypertransport_comfy.targets
assert hypertransport_core.__file__.startswith({str(ROOT)!r}), hypertransport_core.__file__
assert {str(ROOT)!r} not in sys.path
assert sum(type(f).__name__ == "_LibraryFinder" for f in sys.meta_path) == 1
for name in ("nodes", "trainer", "studies", "tests", "scripts", "benchmarks", "ht_devkit", "workflows"):
    assert importlib.util.find_spec(name) is None, name
print("only the libraries")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "only the libraries" in out.stdout, out.stderr[-2000:]


#: the product: what ComfyUI loads and what the training command runs (studies, benchmarks, scripts and tests are not)
PRODUCT = ("hypertransport_core", "hypertransport_comfy", "hypertransport_world", "nodes", "trainer")
_SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend|remove|pop|clear)\b|\[[^\]]*\]\s*=(?!=)|\+=|=(?!=))")


def test_at_most_one_place_in_the_product_edits_sys_path():
    """Only the ComfyUI import (``import_comfyui``: ComfyUI is a folder, not a package) touches sys.path."""
    files = [ROOT / "__init__.py"] + [p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py")]
    editing = sorted(str(p.relative_to(ROOT)) for p in files if any(
        _SYS_PATH_EDIT.search(line) for line in p.read_text().splitlines() if not line.lstrip().startswith("#")))
    assert editing == ["hypertransport_comfy/comfyui.py"], editing
    assert _SYS_PATH_EDIT.search("sys.path.insert(0, root)") and _SYS_PATH_EDIT.search("sys.path[:0] = [r]")
    assert not _SYS_PATH_EDIT.search("if root in sys.path:") and not _SYS_PATH_EDIT.search("first = sys.path[0]")


def test_the_training_command_reaches_the_trainer_and_the_libraries_but_no_nodes(tmp_path):
    """``python trainer/train.py`` resolves the libraries and trainer/ by name through the pack's finder; the pack's
    folder is not on sys.path, so ``nodes`` stays ComfyUI's."""
    import os
    import subprocess
    import sys

    code = f"""
import importlib.util, runpy, sys
runpy.run_path({str(ROOT / "trainer" / "train.py")!r}, run_name="not_main")
assert sys.modules["trainer"].__file__.startswith({str(ROOT)!r})
assert sys.modules["hypertransport_comfy"].__file__.startswith({str(ROOT)!r})
assert {str(ROOT)!r} not in sys.path
assert importlib.util.find_spec("nodes") is None and importlib.util.find_spec("studies") is None
print("trainer and libraries only")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "trainer and libraries only" in out.stdout, out.stderr[-2000:]
