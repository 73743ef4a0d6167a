"""The package's shape: imports run one way with no cycle, ops never need Flax, blocks take
keywords.

Layers of the package, lowest first (``docs/architecture.md``)::

    cli, ops, kernels  <-  layers  <-  models  <-  train, data, config, moons, flops, convert,
    aot  <-  generate  <-  eval

A module may import from its own layer and from the layers below, never from a layer above;
no chain of imports (lazy ones inside functions included) leads back to where it started.
"""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO_ROOT / "mmjax"

# Rank of each subpackage (or top-level module) of mmjax. kernels sit with ops (retrieve
# dispatches to them; they import the mask arithmetic of ops.masks); cli imports nothing.
RANKS = {"cli": 0, "ops": 0, "kernels": 0, "layers": 1, "models": 2, "train": 3, "data": 3,
         "config": 3, "moons": 3, "flops": 3, "convert": 3, "aot": 3, "generate": 4,
         "eval": 5}


def _part_of(module: str) -> str | None:
    """``mmjax.layers.common`` -> ``layers``; ``mmjax`` itself -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mmjax" and len(parts) > 1 else None


def _source_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, "mmjax." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(path: pathlib.Path):
    """Every module named by an import statement in ``path`` (lazy imports included)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_imports_run_one_way():
    wrong = []
    for path, module in _source_files():
        own = _part_of(module)
        if own not in RANKS:
            continue
        for target in _imports(path):
            other = _part_of(target)
            if other in RANKS and RANKS[other] > RANKS[own]:
                wrong.append(f"{path.relative_to(REPO_ROOT)} ({own}) imports {target} ({other})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(set(wrong)))


def test_every_part_of_the_package_has_a_rank():
    parts = {p.stem for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert parts - set(RANKS) == set(), "rank these in RANKS and docs/architecture.md"


def _module_graph() -> dict[str, set[str]]:
    """mmjax module -> the mmjax modules it imports (lazy imports included; a package's
    ``__init__`` counts as the package's module; the root ``mmjax`` is left out).

    ``from mmjax.data import store`` names the module ``mmjax.data.store``;
    ``from mmjax.data import TextBatches`` names ``mmjax.data`` (its ``__init__``)."""
    files = dict((module.removesuffix(".__init__"), path) for path, module in _source_files())
    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files
                         else node.module for alias in node.names]
            else:
                continue
            for target in names:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target not in ("mmjax", module):
                    targets.add(target)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected part of ``graph`` with more than one node."""
    found, done = [], set()
    for start in sorted(graph):
        stack, path, on_path = [(start, iter(sorted(graph[start])))], [start], {start}
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(path.pop())
                done.add(node)
            elif child in on_path:
                found.append(path[path.index(child):] + [child])
                done.update(path)
                stack.clear()
            elif child not in done and child in graph:
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
                on_path.add(child)
    return found


def test_no_import_cycles():
    cycles = _cycles(_module_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_models_share_layers_not_each_other():
    """A model file builds from layers/ and ops/; it never imports another model's file
    (shared pieces live in layers/, e.g. the embedding, norms, remat and skip schedule)."""
    for path in sorted((PACKAGE / "models").glob("*.py")):
        for target in _imports(path):
            parts = target.split(".")
            sibling = parts[:2] == ["mmjax", "models"] and len(parts) > 2 and parts[2] not in (
                "register", "build_model", "model_class", "registered_models")
            assert not sibling, f"{path.name} imports {target}"


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The check above would catch ops importing layers (guards against a silent checker)."""
    bad = tmp_path / "bad.py"
    bad.write_text("from mmjax.layers.common import HeadOutput\nimport flax\n")
    assert "mmjax.layers.common" in set(_imports(bad))
    assert RANKS[_part_of("mmjax.layers.common")] > RANKS["ops"]


@pytest.mark.parametrize("part", ["ops", "layers"])
def test_lower_layers_do_not_import_the_training_system(part):
    for path in (PACKAGE / part).glob("*.py"):
        for target in _imports(path):
            assert _part_of(target) not in ("train", "moons", "flops", "convert", "models"), (
                f"{path.name} imports {target}")


def test_ops_import_without_flax():
    """Users of other JAX projects get the math of both papers without Flax."""
    code = ("import sys, mmjax.ops as ops; "
            "ops.adaptive_bandwidth, ops.gated_keys, ops.tier_masks, ops.extract_values; "
            "bad = sorted(m for m in sys.modules if m == 'flax' or m.startswith('flax.')); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"mmjax.ops imported {out.stdout.strip()}"


def _module_calls(path: pathlib.Path):
    """Calls in ``path`` whose callee is a class name (``CamelCase``) defined in mmjax."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else None
            if name is None and isinstance(func, ast.Call):  # nn.remat(Block, ...)(...)
                inner = func.func
                name = inner.id if isinstance(inner, ast.Name) else None
            if name and name[:1].isupper():
                yield name, node


def test_modules_are_built_from_keywords_or_a_config():
    """No module of layers/ or models/ is built from a run of positional arguments in field
    order (a later field added in the middle would silently shift them)."""
    wrong = []
    for part in ("layers", "models"):
        for path in sorted((PACKAGE / part).glob("*.py")):
            for name, call in _module_calls(path):
                if len(call.args) > 1:
                    wrong.append(f"{path.name}:{call.lineno} {name} with {len(call.args)} "
                                 "positional arguments")
    assert not wrong, "\n".join(wrong)


def _legend_letters():
    import mmjax

    letters = set()
    for line in mmjax.__doc__.split("Shape alphabet", 1)[1].split("The layout", 1)[0].splitlines():
        letters.update(re.findall(r"(?:^|\s{2,})([A-Z][A-Z0-9]?|[12])\s{2}", line))
    return letters


def test_every_shape_letter_is_in_the_legend():
    """Suffixes like ``_BxTxHxK`` use only letters the package docstring defines."""
    legend = _legend_letters()
    assert {"B", "T", "H", "K", "P", "G", "L", "N"} <= legend
    unknown = {}
    letter = r"(?:[A-Z][A-Z0-9]?|[12])"
    pattern = re.compile(rf"\b[a-z][a-z0-9_]*?_({letter}(?:x{letter})*)\b")
    for path, _ in _source_files():
        for match in pattern.finditer(path.read_text()):
            for letter in match.group(1).split("x"):
                if letter not in legend:
                    unknown.setdefault(letter, f"{path.name}: {match.group(0)}")
    assert not unknown, f"letters missing from the legend of mmjax/__init__.py: {unknown}"
