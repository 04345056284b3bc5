"""Docstrings of a tree of Python sources as documents: real text nobody here wrote, available
offline on any machine (the installed standard library by default).

Sources are parsed with `ast`, never imported: importing arbitrary modules runs their code.
"""
from __future__ import annotations

import ast
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from colgrid_server.documents import MAX_DOC_ID_CHARS, Document

# Directories never walked: third-party code inside the stdlib tree, test suites (their
# docstrings are about tests, not APIs) and tools shipped beside the library.
SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)

# Statements whose bodies still run at module / class level (platform branches, optional
# imports); definitions inside them are part of the module's namespace.
_BLOCKS = (ast.If, ast.Try, ast.TryStar, ast.With)
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def iter_docstring_documents(
    roots: Sequence[Path] | None = None,
    *,
    limit: int | None = None,
    min_chars: int = 40,
    include_private: bool = False,
) -> Iterator[Document]:
    """One document per module, class, function and method docstring under `roots`.

    roots: directories of `.py` files (default: the installed standard library). Module names
    are dotted paths relative to each root; a root that is itself a package keeps its package
    name. Order is deterministic: roots in the order given, files by sorted path, definitions in
    source order. The first definition of a dotted path wins (later ones, e.g. a property setter
    or the other branch of a platform check, are dropped), so ids are unique.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if roots is None:
        roots = [Path(sysconfig.get_paths()["stdlib"])]
    seen: set[str] = set()
    produced = 0
    if limit == 0:
        return
    for root in roots:
        root = Path(root)
        prefix = _package_prefix(root)
        for path in _python_files(root):
            rel = path.relative_to(root)
            module = _module_name(prefix, rel)
            if module is None or (not include_private and _has_private_part(module)):
                continue
            tree = _parse(path)
            if tree is None:
                continue
            for name, kind, line, text in _docstrings(tree, module, include_private):
                if len(text) < max(min_chars, 1) or name in seen or len(name) > MAX_DOC_ID_CHARS:
                    continue
                seen.add(name)
                yield Document(
                    id=name,
                    text=text,
                    metadata={
                        "title": name,
                        "module": module,
                        "kind": kind,
                        "source": rel.as_posix(),
                        "line": line,
                    },
                )
                produced += 1
                if limit is not None and produced >= limit:
                    return


def _python_files(root: Path) -> list[Path]:
    """Every importable-looking .py file under root, sorted by path components."""
    found: list[Path] = []
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            # Symlinked directories are not followed: they can loop or duplicate a tree.
            if entry.is_dir() and not entry.is_symlink():
                if entry.name not in SKIPPED_DIRS and entry.name.isidentifier():
                    stack.append(entry)
            elif entry.suffix == ".py" and entry.is_file():
                found.append(entry)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _package_prefix(root: Path) -> list[str]:
    """Names of the packages enclosing root, outermost first (empty for a plain directory)."""
    names: list[str] = []
    current = root.resolve()
    while (current / "__init__.py").is_file() and current.name.isidentifier():
        names.append(current.name)
        current = current.parent
    return names[::-1]


def _module_name(prefix: list[str], rel: Path) -> str | None:
    parts = [*prefix, *rel.parts[:-1]]
    stem = rel.stem
    if stem != "__init__":
        parts.append(stem)
    if not parts or not all(part.isidentifier() for part in parts):
        return None
    return ".".join(parts)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _has_private_part(dotted: str) -> bool:
    return any(_is_private(part) for part in dotted.split("."))


def _parse(path: Path) -> ast.Module | None:
    """The module's syntax tree, or None for a file that is not valid Python 3.11 source."""
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            # Invalid escape sequences in third-party code warn on every parse.
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _docstrings(
    tree: ast.Module, module: str, include_private: bool
) -> Iterator[tuple[str, str, int, str]]:
    """(dotted name, kind, line, cleaned docstring) for the module and its definitions."""
    text = ast.get_docstring(tree, clean=True)
    if text:
        yield module, "module", 1, text.strip()
    yield from _walk(tree.body, module, include_private)


def _walk(
    body: list[ast.stmt], owner: str, include_private: bool
) -> Iterator[tuple[str, str, int, str]]:
    for node in body:
        if isinstance(node, _BLOCKS):
            for block in _sub_bodies(node):
                yield from _walk(block, owner, include_private)
            continue
        if not isinstance(node, _DEFS):
            continue
        if not include_private and _is_private(node.name):
            continue
        name = f"{owner}.{node.name}"
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        text = ast.get_docstring(node, clean=True)
        if text:
            yield name, kind, node.lineno, text.strip()
        # Function bodies are not walked: nested helpers are not part of an API.
        if isinstance(node, ast.ClassDef):
            yield from _walk(node.body, name, include_private)


def _sub_bodies(node: ast.stmt) -> list[list[ast.stmt]]:
    if isinstance(node, (ast.Try, ast.TryStar)):
        return [node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody]
    if isinstance(node, ast.If):
        return [node.body, node.orelse]
    return [node.body]  # ast.With
