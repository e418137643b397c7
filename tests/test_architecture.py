"""The layers of docs/architecture.md: every import points to its own layer or below."""

import ast
import importlib.util
from pathlib import Path

import stepsal_lens

PACKAGE = Path(stepsal_lens.__file__).parent
RANK = {"_version": 0, "errors": 0, "typing": 0.5, "_registry": 0.5, "_checks": 0.5,
        "fingerprint": 0.5, "segments": 1, "core": 1, "results": 2,
        "lens": 3, "eval": 4, "apps": 5, "zoo": 6}
# Deliberate upward imports, all inside a function (docs/architecture.md says why).
ALLOWED = {
    ("results/effects.py", "stepsal_lens.apps.effect_plots"),
    ("results/effects.py", "stepsal_lens.apps.plots"),
    ("segments/harmony.py", "stepsal_lens.zoo.real_tokenizers"),
    ("apps/cli_common.py", "stepsal_lens.zoo.tiny_random"),
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


def _metrics():
    """benchmarks/architecture_metrics.py: the walks that measure the package (one code
    path for the numbers in docs/architecture.md and for these checks)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "architecture_metrics.py"
    spec = importlib.util.spec_from_file_location("architecture_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ROOT = PACKAGE
    return module


def test_no_import_circles():
    """No two package modules import each other, directly or through others, counting
    imports inside functions too (only ``if TYPE_CHECKING`` imports, which never run,
    are left out)."""
    m = _metrics()
    circles = m.circles(m.modules())
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_circle_walk_sees_function_level_imports(tmp_path):
    """The walk itself: a circle closed by an import inside a function is found."""
    m = _metrics()
    pkg = tmp_path / "stepsal_lens"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from stepsal_lens.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from stepsal_lens.a import x\n")
    m.ROOT = pkg
    assert m.circles(m.modules()) == [["stepsal_lens.a", "stepsal_lens.b"]]


def test_no_private_access_across_modules():
    """No module reads or sets another module's private members: ``from m import _x``,
    ``m._x`` on an imported package module, and ``obj._x`` where ``_x`` belongs to an
    object defined in another module (e.g. ``sf._oeb_set`` outside the StepFlow state)."""
    m = _metrics()
    found = m.private_accesses(m.modules())
    assert not found, "private members used across modules:\n" + "\n".join(found)


def test_private_access_walk_finds_the_kinds(tmp_path):
    m = _metrics()
    pkg = tmp_path / "stepsal_lens"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("class A:\n    def __init__(self):\n        self._x = 1\n"
                              "    def _f(self):\n        return self._x\n\n"
                              "def _helper():\n    return 1\n")
    (pkg / "b.py").write_text("from stepsal_lens import a\nfrom stepsal_lens.a import _helper\n\n"
                              "def use(obj):\n    obj._oeb_set = {1}\n    a._helper()\n"
                              "    return obj._f(), obj._x\n")
    m.ROOT = pkg
    kinds = sorted(line.split(" ", 1)[1] for line in m.private_accesses(m.modules()))
    assert kinds == sorted(["from stepsal_lens.a import _helper", "a._helper", "._oeb_set",
                            "._f", "._x"]), kinds
