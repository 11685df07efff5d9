"""The house's shape in numbers: modules and lines of src/fgcli, the longest function bodies
(docstring not counted) and classes, and the import cycles between modules, imports inside
functions included (strongly connected groups of the module graph; ``from pkg import x``
counts as importing ``pkg`` too, as Python runs ``pkg/__init__``).

    python scripts/structure.py [CHECKOUT]      # default: this checkout
"""

import ast
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]) / "src"
mods = {}
for p in sorted(root.rglob("*.py")):
    name = ".".join(p.relative_to(root).with_suffix("").parts)
    name = name.removesuffix(".__init__")
    mods[name] = p


def body_len(fn):
    body = fn.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    if not body:
        return 0
    return body[-1].end_lineno - body[0].lineno + 1


funcs, classes, graph = [], [], {m: set() for m in mods}
lines = 0
for m, p in mods.items():
    src = p.read_text()
    lines += len(src.splitlines())
    tree = ast.parse(src)
    pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs.append((body_len(node), f"{m}.{node.name}"))
        elif isinstance(node, ast.ClassDef):
            classes.append((node.end_lineno - node.lineno + 1, f"{m}.{node.name}"))
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != m and t.startswith("fgcli"):
                graph[m].add(t)

# strongly connected components (Tarjan)
idx, low, stack, on, sccs, c = {}, {}, [], set(), [], [0]


def strong(v):
    idx[v] = low[v] = c[0]
    c[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
        if w not in idx:
            strong(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


sys.setrecursionlimit(10000)
for v in graph:
    if v not in idx:
        strong(v)
funcs.sort(reverse=True)
classes.sort(reverse=True)
print(f"modules: {len(mods)}  lines: {lines}")
print("longest functions:", funcs[:6])
print("functions over 60:", sum(1 for n, _ in funcs if n > 60))
print("longest classes:", classes[:4])
print("classes over 250:", sum(1 for n, _ in classes if n > 250))
print("import cycles (strongly connected groups):", len(sccs))
for s in sccs:
    print("  ", s)
