"""The layers of DESIGN.md import one way (down), lazy imports included, and no module imports another module's
private names."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "shiftkit"
#: DESIGN.md's layers, bottom to top; a module may import its own layer and those below.
RANK = {"core": 0, "stain": 1, "functional": 2, "transforms": 3, "shifts": 4, "data": 5, "models": 6, "train": 6,
        "metrics": 7, "stress": 8, "report": 8}


def _imports():
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(PKG).parts
        if len(parts) < 2:
            continue  # shiftkit/__init__.py gathers the public API from every layer
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = list(parts[:-1])[: len(parts) - node.level]
                target = base + (node.module.split(".") if node.module else [])
                yield f, parts, node, target


def test_every_layer_imports_only_its_own_layer_and_below():
    up = [f"{f.relative_to(PKG)}:{node.lineno} imports shiftkit.{'.'.join(target)}"
          for f, parts, node, target in _imports()
          if target and target[0] in RANK and parts[0] in RANK and RANK[target[0]] > RANK[parts[0]]]
    assert not up, up


def test_no_module_imports_another_modules_private_names():
    private = [f"{f.relative_to(PKG)}:{node.lineno} imports {a.name} from shiftkit.{'.'.join(target)}"
               for f, parts, node, target in _imports() for a in node.names
               if a.name.startswith("_") and not a.name.endswith("__") and target != list(parts[:-1]) + [f.stem]]
    assert not private, private


def test_the_scan_sees_lazy_imports(tmp_path):
    """The scan walks function bodies too: an upward import inside a function is found."""
    tree = ast.parse("def f():\n    from ..data import read_image\n")
    assert any(isinstance(n, ast.ImportFrom) and n.module == "data" and n.level == 2 for n in ast.walk(tree))
