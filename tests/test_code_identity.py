"""The identity of a model's code: its module and the user's modules it imports."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from search.code_identity import _own_files, _resolved, code_identity


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package of the user's, named afresh for each test (imports are kept per process):
    a factory module that imports a sibling, a helper package and torch; a module nothing
    imports; and a cycle between two of them."""
    name = f"userpkg_{uuid.uuid4().hex[:8]}"
    root = tmp_path / name
    (root / "helpers").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "model.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from .blocks import Block\n"
        f"from {name} import helpers\n\n"
        "def net():\n    return nn.Sequential(Block(), helpers.head())\n"
    )
    (root / "blocks.py").write_text(
        "from torch import nn\nfrom . import model  # a cycle\n\nBlock = nn.Identity\n"
    )
    (root / "helpers" / "__init__.py").write_text("from .heads import head\n")
    (root / "helpers" / "heads.py").write_text("from torch import nn\n\nhead = nn.Identity\n")
    (root / "unused.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, root
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]


def _identity(source: str) -> str | None:
    code_identity.cache_clear()  # as a new run reads it anew
    return code_identity(source)


def test_the_identity_covers_the_modules_of_the_users_that_the_factory_imports(package):
    name, root = package
    files = _own_files(f"{name}.model")
    assert set(files) == {
        f"{name}.model", f"{name}.blocks", name, f"{name}.helpers", f"{name}.helpers.heads",
    }  # fmt: skip
    assert files[f"{name}.helpers.heads"] == root / "helpers" / "heads.py"
    assert not any(module.startswith("torch") for module in files)  # installed: its release

    source = f"module:{name}.model:net"
    first = _identity(source)
    assert first is not None and _identity(source) == first
    (root / "unused.py").write_text("X = 2\n")
    assert _identity(source) == first  # not imported: not the model's code
    (root / "helpers" / "heads.py").write_text("from torch import nn\n\nhead = nn.ReLU\n")
    second = _identity(source)
    assert second != first  # imported through the helper package's __init__
    (root / "blocks.py").write_text("from torch import nn\n\nBlock = nn.ReLU\n")
    assert _identity(source) not in (first, second)


def test_the_identity_is_the_same_whatever_the_process_imported_before(package):
    name, _ = package
    source = f"module:{name}.model:net"
    before = _identity(source)  # found by import statements, the modules not yet imported
    __import__(f"{name}.model")
    __import__(f"{name}.unused")
    assert _identity(source) == before


def test_a_module_that_cannot_be_found_or_read_has_no_identity(package, tmp_path):
    name, root = package
    assert _identity(f"module:{name}.missing:net") is None
    assert _identity("module:no_such_module_anywhere:net") is None
    (root / "broken.py").write_text("import torch\nfrom .blocks import (\n")  # a syntax error
    assert _identity(f"module:{name}.broken:net") is not None  # its bytes still tell
    assert _identity("module:sys:net") is None  # builtin into the interpreter: no file
    (root / "raises.py").write_text(f"import {name}.failing.inner\n")
    (root / "failing").mkdir()
    (root / "failing" / "__init__.py").write_text("raise RuntimeError('broken package')\n")
    assert set(_own_files(f"{name}.raises")) == {f"{name}.raises"}


def test_builtin_and_library_sources():
    assert _identity("builtin:resnet") == _identity("builtin:vgg")  # one file of models
    assert _identity("builtin:resnet") is not None
    assert _identity("nonsense:x") is None
    assert _identity("timm:resnet18") in (None, f"timm {_version('timm')}")


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


@pytest.mark.parametrize(
    ("module", "level", "package", "expected"),
    [
        ("a.b", 0, "x.y", "a.b"),
        ("blocks", 1, "pkg", "pkg.blocks"),
        (None, 1, "pkg.sub", "pkg.sub"),
        ("c", 2, "pkg.sub", "pkg.c"),
        (None, 2, "pkg.sub", "pkg"),
        ("c", 3, "pkg.sub", None),  # beyond the top-level package
        (None, 1, "", None),  # a relative import in a top-level module
        ("c", 1, "", None),
    ],
)
def test_relative_imports_resolve_as_python_resolves_them(module, level, package, expected):
    assert _resolved(module, level, package) == expected


def test_a_top_level_module_next_to_the_factory_counts(tmp_path, monkeypatch):
    stem = f"usermod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{stem}_main.py").write_text(f"import {stem}_layers\n\nnet = None\n")
    layers = tmp_path / f"{stem}_layers.py"
    layers.write_text("A = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = _identity(f"module:{stem}_main:net")
    layers.write_text("A = 2\n")
    assert _identity(f"module:{stem}_main:net") != first
    assert set(_own_files(f"{stem}_main")) == {f"{stem}_main", f"{stem}_layers"}
    assert isinstance(_own_files(f"{stem}_main")[f"{stem}_layers"], Path)
