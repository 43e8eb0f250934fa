"""The identity of the code that builds a model, for what is kept by architecture.

A timing or a saved search is kept by the model's architecture spec, which names a `module:`
source by its string and its layers by their widths: the same names after the user edited the
model's forward, or a block it imports, are other code. The identity is the SHA-256 of the
files of that code: the module that defines the factory and the modules of the user's own
that it imports, directly or through each other (found by reading their import statements,
so the same code has the same identity in every process, whatever else it imported). Modules
of the standard library and of installed packages are left out: those change with a release.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import sys
import sysconfig
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# How many of the user's files one identity reads at most: code that imports more of them
# has no identity (it is timed afresh each run) rather than one that misses an edit.
MAX_FILES = 1000


# One identity is worked out at a time: children evaluated in threads ask for it at once, and
# CPython 3.11's parser fails when two threads parse at once ("AST constructor recursion depth
# mismatch").
_READING = threading.Lock()


def code_identity(source: str) -> str | None:
    """What tells the code that builds `source` apart from other versions of it: the SHA-256
    of a `module:` source's module and of the modules of the user's it imports, of the builtin
    models' files, or the installed release of torchvision or timm. None where it cannot be
    told (building the model says why). Read once per process, which imports that code once
    too."""
    with _READING:
        return _identity(source)


@functools.cache
def _identity(source: str) -> str | None:
    prefix, _, rest = source.partition(":")
    if prefix in ("torchvision", "timm"):
        try:
            return f"{prefix} {version(prefix)}"
        except PackageNotFoundError:
            return None
    if prefix == "builtin":
        module_name = "search.zoo"
    elif prefix == "module":
        module_name = rest.rpartition(":")[0]
    else:
        return None
    files = _own_files(module_name)
    if files is None:
        return None
    digest = hashlib.sha256()
    for name in sorted(files):
        try:
            with open(files[name], "rb") as file:
                content = hashlib.file_digest(file, "sha256").digest()
        except OSError:
            if name == module_name:
                return None
            continue  # gone since it was found: the module's own file still tells
        digest.update(f"{name}\0".encode() + content)
    return digest.hexdigest()[:16]


def _own_files(module_name: str) -> dict[str, Path] | None:
    """The module's source file and those of the user's modules it imports, by module name;
    None when the module's own file cannot be found, or they are more than MAX_FILES."""
    first = _source_file(module_name)
    if first is None:
        return None
    files = {module_name: first}
    queue = [module_name]
    while queue:
        name = queue.pop(0)
        for imported in _imports(name, files[name]):
            if imported in files:
                continue
            path = _source_file(imported)
            if path is not None and not _installed(path):
                if len(files) == MAX_FILES:
                    return None
                files[imported] = path
                queue.append(imported)
    return files


def _source_file(module_name: str) -> Path | None:
    """The file a module is loaded from, its `.py` or, without one, its `.pyc`; None for a
    builtin, an extension, one in a zip archive, or one not found."""
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None) if module is not None else None
    if path is None:
        try:
            spec = importlib.util.find_spec(module_name)
        except Exception:  # a parent package that fails to import, a malformed name
            return None
        path = spec.origin if spec is not None and spec.has_location else None
    if path is None or not str(path).endswith((".py", ".pyc")) or not Path(path).is_file():
        return None
    return Path(path)


def _imports(module_name: str, path: Path) -> list[str]:
    """The modules a file's import statements name, relative ones resolved, in file order: for
    `from a import b` both `a.b` (where b is a submodule) and `a`."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return []
    is_package = path.name == "__init__.py"
    package = module_name if is_package else module_name.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolved(node.module, node.level, package)
            if base is None:
                continue
            names.extend(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
            names.append(base)
    return names


def _resolved(module: str | None, level: int, package: str) -> str | None:
    """The absolute name of `from <level dots><module> import ...` in `package`."""
    if level == 0:
        return module
    parts = package.split(".") if package else []
    if level - 1 >= len(parts):
        return None  # beyond the top-level package: Python refuses it too
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base)


@functools.cache
def _installed_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    keys = ("stdlib", "platstdlib", "purelib", "platlib")
    return tuple({Path(paths[key]).resolve() for key in keys if key in paths})


def _installed(path: Path) -> bool:
    """Whether a file belongs to the standard library or an installed package."""
    resolved = path.resolve()
    if any(part in ("site-packages", "dist-packages") for part in resolved.parts):
        return True
    return any(resolved.is_relative_to(root) for root in _installed_roots())
