"""The identity of a model's code: its module and the user's modules it imports."""

from __future__ import annotations

import sys
import threading
import uuid
from pathlib import Path

import pytest

from search.code_identity import _identity, _own_files, _resolved, code_identity


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


def _read_anew(source: str) -> str | None:
    _identity.cache_clear()  # as a new run reads it anew
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
    first = _read_anew(source)
    assert first is not None and _read_anew(source) == first
    (root / "unused.py").write_text("X = 2\n")
    assert _read_anew(source) == first  # not imported: not the model's code
    (root / "helpers" / "heads.py").write_text("from torch import nn\n\nhead = nn.ReLU\n")
    second = _read_anew(source)
    assert second != first  # imported through the helper package's __init__
    (root / "blocks.py").write_text("from torch import nn\n\nBlock = nn.ReLU\n")
    assert _read_anew(source) not in (first, second)


def test_the_identity_is_the_same_whatever_the_process_imported_before(package):
    name, _ = package
    source = f"module:{name}.model:net"
    before = _read_anew(source)  # found by import statements, the modules not yet imported
    __import__(f"{name}.model")
    __import__(f"{name}.unused")
    assert _read_anew(source) == before


def test_a_module_that_cannot_be_found_or_read_has_no_identity(package, tmp_path):
    name, root = package
    assert _read_anew(f"module:{name}.missing:net") is None
    assert _read_anew("module:no_such_module_anywhere:net") is None
    (root / "broken.py").write_text("import torch\nfrom .blocks import (\n")  # a syntax error
    assert _read_anew(f"module:{name}.broken:net") is not None  # its bytes still tell
    assert _read_anew("module:sys:net") is None  # builtin into the interpreter: no file
    (root / "raises.py").write_text(f"import {name}.failing.inner\n")
    (root / "failing").mkdir()
    (root / "failing" / "__init__.py").write_text("raise RuntimeError('broken package')\n")
    assert set(_own_files(f"{name}.raises")) == {f"{name}.raises"}


def test_builtin_and_library_sources():
    assert _read_anew("builtin:resnet") == _read_anew("builtin:vgg")  # one file of models
    assert _read_anew("builtin:resnet") is not None
    assert _read_anew("nonsense:x") is None
    assert _read_anew("timm:resnet18") in (None, f"timm {_version('timm')}")


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
    first = _read_anew(f"module:{stem}_main:net")
    layers.write_text("A = 2\n")
    assert _read_anew(f"module:{stem}_main:net") != first
    assert set(_own_files(f"{stem}_main")) == {f"{stem}_main", f"{stem}_layers"}
    assert isinstance(_own_files(f"{stem}_main")[f"{stem}_layers"], Path)


def test_threads_asking_at_once_get_one_identity(package):
    """Children evaluated in threads ask for the identity at once: it is read by one of them
    (two threads parsing at once can fail in CPython 3.11's parser), and all get it."""
    name, _ = package
    source = f"module:{name}.model:net"
    expected = _read_anew(source)
    answers: list[str | None] = []
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        try:
            for _ in range(20):
                _identity.cache_clear()
                answers.append(code_identity(source))
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and answers == [expected] * 160


def test_code_that_cannot_be_read_whole_has_no_identity(tmp_path, monkeypatch):
    """A module imported from a zip archive cannot be read as a file, and code spanning more
    of the user's files than are read could change in one not read: no identity (timed afresh,
    never taken from the latency cache), rather than one that misses an edit."""
    import zipfile

    from search import code_identity as identity_module

    stem = f"usermod_{uuid.uuid4().hex[:8]}"
    archive = tmp_path / "models.zip"
    with zipfile.ZipFile(archive, "w") as packed:
        packed.writestr(f"{stem}_zipped.py", "net = None\n")
    monkeypatch.syspath_prepend(str(archive))
    assert _read_anew(f"module:{stem}_zipped:net") is None

    for index in range(4):
        (tmp_path / f"{stem}_part{index}.py").write_text(f"P = {index}\n")
    (tmp_path / f"{stem}_main.py").write_text(
        "".join(f"import {stem}_part{index}\n" for index in range(4)) + "net = None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _read_anew(f"module:{stem}_main:net") is not None  # five files
    monkeypatch.setattr(identity_module, "MAX_FILES", 4)
    assert _read_anew(f"module:{stem}_main:net") is None


def test_a_module_shipped_as_bytecode_alone_is_told_by_its_pyc(tmp_path, monkeypatch):
    import py_compile

    stem = f"usermod_{uuid.uuid4().hex[:8]}"
    source = tmp_path / f"{stem}.py"
    compiled = tmp_path / f"{stem}.pyc"
    monkeypatch.syspath_prepend(str(tmp_path))
    identities = []
    for body in ("net = None\n", "net = 1\n"):
        source.write_text(body)
        py_compile.compile(str(source), cfile=str(compiled))
        source.unlink()
        identities.append(_read_anew(f"module:{stem}:net"))
    assert None not in identities and identities[0] != identities[1]
