"""The package's shape: an import graph without cycles (imports inside functions included) flowing
ops -> dispatch / checks / shared helpers, lazy top-level attributes that import neither timm nor the
modules until used, and the public names docs/API.md promises."""
import ast
import pathlib
import subprocess
import sys

import vitkernels

ROOT = pathlib.Path(vitkernels.__file__).resolve().parent
OPS = ("vitkernels.ops.attention", "vitkernels.ops.window_attention", "vitkernels.ops.patch_embed")
HELPERS = ("vitkernels.dispatch", "vitkernels._ext", "vitkernels.ops._checks", "vitkernels.ops._compile",
           "vitkernels.ops.tuning", "vitkernels.ops.triton_limits", "vitkernels._environ", "vitkernels.ops._autograd")


def import_graph():
    """module -> the vitkernels modules it imports (anywhere in it), not counting its own parent packages
    (always initialised before it)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        modules[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert "vitkernels.ops.attention.compile" in graph["vitkernels.ops.attention"]  # the graph sees imports
    assert cycles(graph) == []


def test_shared_helpers_never_import_an_op_or_a_module_above_them():
    graph = import_graph()
    above = OPS + ("vitkernels.nn", "vitkernels.models", "vitkernels.bench", "vitkernels.explain")
    for helper in HELPERS:
        bad = [t for t in graph[helper] if t == "vitkernels" or t.startswith(above)]
        assert not bad, f"{helper} imports {bad}"


def test_each_op_owns_its_compile_registration():
    graph = import_graph()
    for op in OPS:
        assert f"{op}.compile" in graph[op], f"{op} does not register its own torch.compile ops"
    assert not (ROOT / "library.py").exists()


def test_top_level_attributes_are_lazy_and_import_no_timm():
    code = ("import sys, vitkernels\n"
            "assert 'vitkernels.nn' not in sys.modules and 'vitkernels.models' not in sys.modules\n"
            "from vitkernels import patch_timm, replace_mha, MultiheadAttention\n"
            "assert vitkernels.nn.patch_timm is patch_timm and callable(vitkernels.models.create_model)\n"
            "assert 'timm' not in sys.modules, 'timm imported'\n"
            "assert {'patch_timm', 'nn', 'models', 'explain'} <= set(dir(vitkernels))\n"
            "try:\n    vitkernels.no_such_thing\nexcept AttributeError as e:\n    assert 'no_such_thing' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_py_typed_ships_with_the_package():
    assert (ROOT / "py.typed").exists()


def _jit_decorated(fn: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in getattr(fn, "decorator_list", ()))


def test_host_code_never_calls_tritons_constexpr_functions():
    """``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr_functions (triton >= 3.4): on the host
    each costs about 4 us a call, more than a whole memoised input check; launchers use ``tuning.cdiv`` /
    ``tuning.next_power_of_2``. Inside kernels they stay free."""
    found = []
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        kernels = {id(node) for fn in ast.walk(tree) if _jit_decorated(fn) for node in ast.walk(fn)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and ast.unparse(node.func) in ("triton.cdiv", "triton.next_power_of_2")
                    and id(node) not in kernels):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert not found, found


def test_tunings_host_helpers_match_tritons():
    import triton

    from vitkernels.ops import tuning

    for n in range(1, 300):
        assert tuning.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 16, 64, 128):
            assert tuning.cdiv(n, d) == triton.cdiv(n, d) and tuning.cdiv(n - 1, d) == triton.cdiv(n - 1, d)
