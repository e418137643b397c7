"""The layers of docs/architecture.md: every import points to its own layer or below."""

import ast
from pathlib import Path

import stepsal_lens

PACKAGE = Path(stepsal_lens.__file__).parent
RANK = {"_version": 0, "errors": 0, "typing": 0.5, "_registry": 0.5, "_checks": 0.5,
        "fingerprint": 0.5, "segments": 1, "core": 1, "results": 2,
        "lens": 3, "eval": 4, "apps": 5, "zoo": 6}
# Deliberate upward imports, all inside a function (docs/architecture.md says why).
ALLOWED = {
    ("results/effects.py", "stepsal_lens.apps.circuits"),
    ("results/effects.py", "stepsal_lens.apps.plots"),
    ("segments/harmony.py", "stepsal_lens.zoo.real_tokenizers"),
    ("apps/cli.py", "stepsal_lens.zoo.tiny_random"),
    ("apps/demo.py", "stepsal_lens.zoo.task"),
}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stepsal_lens"):
            yield node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("stepsal_lens"):
                    yield ast.ImportFrom(module=alias.name, names=[], lineno=node.lineno,
                                         col_offset=node.col_offset)


def test_imports_point_downward():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        layer = rel.split("/")[0].removesuffix(".py")
        if layer == "__init__":
            continue
        for node in _imports(path):
            parts = node.module.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            if target == "__init__":  # the package root imports everything
                bad.append(f"{rel}:{node.lineno} imports the package root")
                continue
            same = target == layer
            if not same and RANK[target] >= RANK[layer] and (rel, node.module) not in ALLOWED:
                bad.append(f"{rel}:{node.lineno} ({layer}) -> {node.module} ({target})")
            if (rel, node.module) in ALLOWED and node.col_offset == 0:
                bad.append(f"{rel}:{node.lineno} -> {node.module} must stay a lazy import")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_only_lens_imports_transformer_lens():
    users = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                   if any((isinstance(n, ast.ImportFrom) and (n.module or "").startswith("transformer_lens"))
                          or (isinstance(n, ast.Import) and any(a.name.startswith("transformer_lens") for a in n.names))
                          for n in ast.walk(ast.parse(p.read_text()))))
    assert users and all(u.startswith("lens/") for u in users), users


def test_every_subpackage_is_a_real_package():
    # without __init__.py a folder is a namespace package and is left out of the wheel
    for folder in ("segments", "core", "lens", "results", "eval", "apps", "zoo"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
