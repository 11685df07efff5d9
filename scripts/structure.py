"""The house's shape in numbers: modules and lines of src/fgcli, the longest function bodies
(docstring not counted) and classes, and the import cycles between modules, imports inside
functions included. The cycles come from tests/test_layers.py's graph and cycle finder (one
reading of what an import is, see its docstring), so this needs the test extra.

    python scripts/structure.py [CHECKOUT]      # default: this checkout
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))

from test_layers import _cycles, import_graph  # after the path is set


def body_len(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the body, the docstring not counted."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def main(src: Path) -> None:
    funcs, classes, lines, files = [], [], 0, sorted((src / "fgcli").rglob("*.py"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        lines += len(text.splitlines())
        module = ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((body_len(node), f"{module}.{node.name}"))
            elif isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{module}.{node.name}"))
    funcs.sort(reverse=True)
    classes.sort(reverse=True)
    cycles = _cycles(import_graph(src))
    print(f"modules: {len(files)}  lines: {lines}")
    print("longest functions:", funcs[:6])
    print("functions over 60:", sum(1 for n, _ in funcs if n > 60))
    print("longest classes:", classes[:4])
    print("classes over 250:", sum(1 for n, _ in classes if n > 250))
    print("import cycles:", len(cycles))
    for cycle in cycles:
        print("  ", cycle)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() / "src" if len(sys.argv) > 1 else HERE / "src")
