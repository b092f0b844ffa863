"""The package's import graph points down the pipeline of docs/architecture.md, and no module
imports another module's private name."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "klflow"

# Lowest first. A module may import its own layer and the layers below it; the commands of each
# subpackage (its cli module) sit in the top layer with the package's command line.
LAYERS = [
    ("base", ["klflow.errors", "klflow.jsonl", "klflow.progress", "klflow.threads", "klflow.outputs",
              "klflow.distributed", "klflow.metrics"]),
    ("data", ["klflow.data", "klflow.infill"]),
    ("method", ["klflow.sampling", "klflow.kv_cache", "klflow.flow", "klflow.methods"]),
    ("runtime", ["klflow.model", "klflow.config", "klflow.configs", "klflow.checkpoint", "klflow.runtime"]),
    ("train / generate", ["klflow.train", "klflow.filling", "klflow.trained", "klflow.trace", "klflow.distill"]),
    ("evaluation", ["klflow.evaluation"]),
    ("bench", ["klflow.bench"]),
    ("cli", ["klflow.cli", "klflow.__main__", "klflow.data.cli", "klflow.evaluation.cli", "klflow.bench.cli"]),
]
# Training and generation are siblings: neither imports the other.
SIBLINGS = [{"klflow.train"}, {"klflow.filling", "klflow.trained", "klflow.trace", "klflow.distill"}]


def layer(module: str) -> int:
    """Index in LAYERS of the longest prefix that names module."""
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of tests/test_architecture.py (add it, and to docs/architecture.md)"
    return max(matches)[1]


def sibling_group(module: str) -> int | None:
    """Index in SIBLINGS of the group that holds module, or None."""
    return next((i for i, group in enumerate(SIBLINGS)
                 if any(module == m or module.startswith(m + ".") for m in group)), None)


def modules() -> dict[str, Path]:
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = file
    return found


def imports(module: str, file: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) of every absolute or relative klflow import, at any depth."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("klflow")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("klflow"):
                found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


MODULES = modules()


@pytest.mark.parametrize("module", [m for m in MODULES if m != "klflow"])
def test_imports_point_down_the_pipeline(module):
    mine = layer(module)
    for target, _, line in imports(module, MODULES[module]):
        if target == "klflow":
            continue  # the package root: its lazy public exports only
        theirs = layer(target)
        assert theirs <= mine, (f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]}) at line {line}: "
                                "an import up the pipeline")
        ours, others = sibling_group(module), sibling_group(target)
        assert ours is None or others is None or ours == others, f"{module} imports its sibling {target} at line {line}"


@pytest.mark.parametrize("module", list(MODULES))
def test_no_private_name_is_imported_across_modules(module):
    for target, names, line in imports(module, MODULES[module]):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{module} imports {private} from {target} at line {line}: make it public in one place"


def test_the_layer_table_knows_a_wrong_import():
    assert layer("klflow.flow.sampler") < layer("klflow.runtime") < layer("klflow.train") < layer("klflow.bench.plan")
    assert layer("klflow.bench.cli") == layer("klflow.cli") > layer("klflow.bench.runner")
    assert sibling_group("klflow.filling") != sibling_group("klflow.train") is not None
