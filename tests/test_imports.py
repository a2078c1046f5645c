"""The layering the code relies on: ``config`` imports no method, nothing below the CLI imports
the CLI, and no module-level import circle exists anywhere in the package.

Why it matters: a method module imports ``config`` (its config class derives from
``MethodConfigBase``) and registers itself; if ``config`` imported methods back, adding a method
could break config loading in ways that depend on import order.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "defectforge"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """defectforge modules imported when ``path`` is imported (module body, not functions, not
    ``if TYPE_CHECKING:``), resolved to the longest existing module name."""
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):
                if not _is_type_checking(node):
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)

    visit(ast.parse(path.read_text()).body)
    resolved = set()
    for name in out:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("defectforge"):
            resolved.add(name)
    # Importing a.b.c also imports its parent packages a.b and a.
    for name in list(resolved):
        parts = name.split(".")
        resolved.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return resolved


def _graph_here() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {m: _top_level_imports(p, modules) - {m} for m, p in files.items()}


def _graph() -> dict[str, set[str]]:
    """The module-level import graph, built in a fresh interpreter: CPython 3.11's ``ast.parse``
    can raise "SystemError: AST constructor recursion depth mismatch" in a process where an earlier
    test hit a deep recursion (seen once in a long session), which says nothing about our code."""
    out = subprocess.run([sys.executable, __file__, "graph"], capture_output=True, text=True, check=True).stdout
    return {m: set(deps) for m, deps in json.loads(out).items()}


def test_no_module_level_import_circle():
    graph = _graph()
    # A parent package importing its own child is not a circle for Python (the child sees the
    # partially initialised parent); only edges to non-ancestors count.
    edges = {m: {d for d in deps if not m.startswith(d + ".") and d != m.rpartition(".")[0]}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            dfs(m)


def test_nothing_below_the_cli_imports_it():
    out = subprocess.run([sys.executable, __file__, "cli-importers"], capture_output=True, text=True, check=True)
    offenders = json.loads(out.stdout)
    assert not offenders, f"modules below the CLI import it: {offenders}"


def _cli_importers() -> list[str]:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports too
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "defectforge.cli" or n.startswith("defectforge.cli.") for n in names):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return offenders


def test_importing_config_imports_no_method_and_no_cli():
    code = ("import json, sys; import defectforge.config; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('defectforge'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert "defectforge.config" in loaded
    assert not [m for m in loaded if m.startswith(("defectforge.methods", "defectforge.cli", "defectforge.evaluate",
                                                   "defectforge.nn"))], loaded
    # The method union is built lazily, on first validation of a config that names a method.
    code = ("import json, sys; from defectforge.config import resolve_config; resolve_config(method='defect-gen'); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('defectforge.methods'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert "defectforge.methods.defect_gen" in loaded


if __name__ == "__main__":  # the AST work of the tests above, in a fresh interpreter
    if sys.argv[1] == "graph":
        print(json.dumps({m: sorted(d) for m, d in _graph_here().items()}))
    else:
        print(json.dumps(_cli_importers()))


def test_validating_a_config_leaves_diffusers_and_scipy_signal_unimported():
    """Every process that validates a config imports every method module (the config union), so a
    method module's top-level imports are paid by every CLI command and sweep-trial process.
    diffusers (its ``__init__`` alone imports ``torch._dynamo``: ~1.5 s here; ``UNet2DModel`` pulls
    in all of its transformer models and the transformers package, ~3-6 s) and ``scipy.signal``
    (~0.6 s) are imported where a model is built or a mask aligned, not at the top."""
    code = ("import json, sys; from defectforge.config import resolve_config; "
            "[resolve_config(method=m) for m in ('defect-gen', 'anomaly-diffusion', 'defect-synth', 'defect-diffu')]; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers') "
            "or m.startswith('scipy.signal'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert not loaded, loaded
    # ... and building a Defect-Gen model still finds it
    code = ("from defectforge.nn.unets import build_large_unet, count_downsamplings; "
            "m = build_large_unet(resolution=32, channels=3, widths=(8, 16), downsamplings=1, layers_per_block=1, "
            "attention_resolution=8, attention_head_dim=8, norm_num_groups=8); print(count_downsamplings(m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
