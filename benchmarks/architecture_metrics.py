"""Architecture measurements of the package, printed as a table (docs/architecture.md).

Run ``python benchmarks/architecture_metrics.py`` before and after a refactor; it reads
the source only (nothing is imported or run). What it counts:

* modules and lines;
* the largest classes and functions (lines, nested functions included in their parent);
* the longest import chain: the longest path of module-level imports between package
  modules (``a -> b -> c`` means a imports b at module level, b imports c);
* function-level imports from the package itself (``import`` inside a ``def``);
* ``model: Any`` annotations;
* cross-module private-member accesses: ``module._x`` where ``module`` is an imported
  package module, ``from pkg.mod import _x`` of another module's private name, and
  ``obj._x`` where ``_x`` is not defined in the module that reads it (an attribute set
  or a method defined in another module's class);
* import circles: strongly connected groups of package modules in the graph of all
  imports, module-level and function-level (``TYPE_CHECKING`` imports left out: they
  never run).

The same walks back the checks in ``tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "stepsal_lens"
PACKAGE = "stepsal_lens"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The package module an imported name lives in (``pkg.mod.func`` -> ``pkg.mod``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for inner in ast.walk(sub):
                    skip.add(id(inner))
    return skip


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, bool, int, list[str]]]:
    """``(target module, at module level, line, imported names)`` of each package import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside_def = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if id(child) in skip:
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith(PACKAGE):
                        target = _resolve(alias.name, known)
                        if target:
                            out.append((target, top, child.lineno, []))
            elif isinstance(child, ast.ImportFrom):
                mod = child.module or ""
                if child.level:
                    base = me.split(".") if is_pkg else me.split(".")[:-1]
                    base = base[:len(base) - child.level + 1]
                    mod = ".".join(base + ([mod] if mod else []))
                if not mod.startswith(PACKAGE):
                    continue
                for alias in child.names:
                    sub = f"{mod}.{alias.name}"
                    if sub in known:  # from pkg import module
                        out.append((sub, top, child.lineno, []))
                    else:
                        target = _resolve(mod, known)
                        if target:
                            out.append((target, top, child.lineno, [alias.name]))
            visit(child, top and not inside_def)

    visit(tree, True)
    return out


def graph(known: dict[str, Path], module_level_only: bool) -> dict[str, set[str]]:
    g: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for target, top, _, _ in imports(path, known):
            if target == name or (module_level_only and not top):
                continue
            if name.startswith(target + ".") or target == PACKAGE:
                continue  # a package's submodule importing its own package __init__
            g[name].add(target)
    return g


def circles(known: dict[str, Path]) -> list[list[str]]:
    """Strongly connected groups (more than one module) of the graph of all imports."""
    g = graph(known, module_level_only=False)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(known):
        if v not in index:
            strong(v)
    return sorted(out)


def longest_chain(known: dict[str, Path]) -> list[str]:
    """Longest simple path of module-level imports between package modules."""
    g = graph(known, module_level_only=True)
    best: list[str] = []

    def walk(path: list[str], seen: set[str]) -> None:
        nonlocal best
        if len(path) > len(best):
            best = list(path)
        for nxt in sorted(g.get(path[-1], ())):
            if nxt not in seen:
                seen.add(nxt)
                path.append(nxt)
                walk(path, seen)
                path.pop()
                seen.discard(nxt)

    for start in sorted(known):
        if start == PACKAGE:
            continue  # the package root imports the public surface
        walk([start], {start})
    return best


def function_level_imports(known: dict[str, Path]) -> int:
    return sum(1 for p in known.values() for _, top, _, _ in imports(p, known) if not top)


def defined_names(tree: ast.AST) -> set[str]:
    """Every name a module defines: functions, classes, attributes, assignments."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            names.add(node.attr)  # an attribute of this module's own objects
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


#: Private attributes of third-party objects we set on purpose (transformers' attention
#: implementation, the bridge's tokenizer); not members of this package.
THIRD_PARTY = {"_attn_implementation", "_tokenizer"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_accesses(known: dict[str, Path]) -> list[str]:
    """Cross-module private-member accesses (``file:line name``)."""
    defined = {name: defined_names(ast.parse(p.read_text(encoding="utf-8")))
               for name, p in known.items()}
    everywhere: set[str] = set().union(*defined.values())
    out = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = path.relative_to(ROOT).as_posix()
        mods: dict[str, str] = {}  # local alias -> package module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in known:
                        mods[alias.asname or alias.name] = sub
                    elif _private(alias.name) and _resolve(node.module, known) != name:
                        out.append(f"{rel}:{node.lineno} from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known and alias.asname:
                        mods[alias.asname] = alias.name
        mine = defined[name]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in mods and mods[base.id] != name:
                out.append(f"{rel}:{node.lineno} {base.id}.{node.attr}")
            elif node.attr not in mine and (
                    node.attr in everywhere  # defined (set, or a method) in another module
                    or (isinstance(node.ctx, ast.Store) and node.attr not in THIRD_PARTY)):
                out.append(f"{rel}:{node.lineno} .{node.attr}")
    return out


def model_any(known: dict[str, Path]) -> int:
    n = 0
    for p in known.values():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.arg) and node.arg == "model" and node.annotation is not None \
                    and ast.unparse(node.annotation) == "Any":
                n += 1
    return n


def largest(known: dict[str, Path], kind: type | tuple[type, ...], top: int = 3) -> list[str]:
    sizes = []
    for name, p in known.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, kind):
                sizes.append((node.end_lineno - node.lineno + 1, f"{name.split('.', 1)[1]}."
                                                                   f"{node.name}"))
    sizes.sort(reverse=True)
    return [f"{what} ({n})" for n, what in sizes[:top]]


def measure() -> dict[str, str]:
    known = modules()
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in known.values())
    chain = longest_chain(known)
    found = circles(known)
    private = private_accesses(known)
    return {
        "modules (lines)": f"{len(known)} ({lines})",
        "largest classes": ", ".join(largest(known, ast.ClassDef)),
        "largest functions": ", ".join(largest(known, (ast.FunctionDef, ast.AsyncFunctionDef))),
        "longest import chain": f"{len(chain)} modules: " + " -> ".join(
            m.removeprefix(PACKAGE + ".") for m in chain),
        "function-level imports from the package": str(function_level_imports(known)),
        "`model: Any` parameters": str(model_any(known)),
        "cross-module private accesses": str(len(private)),
        "import circles": f"{len(found)}" + "".join(
            f"; {' / '.join(m.removeprefix(PACKAGE + '.') for m in c)}" for c in found),
    }


def main() -> None:
    rows = measure()
    print("| measure | value |\n|---|---|")
    for key, value in rows.items():
        print(f"| {key} | {value} |")
    if "-v" in sys.argv:
        print("\nprivate accesses:")
        for line in private_accesses(modules()):
            print("  " + line)


if __name__ == "__main__":
    main()
