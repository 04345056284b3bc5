"""The demo corpus: docstrings of Python sources as documents, and JSONL written atomically."""
from __future__ import annotations

import sys
from pathlib import Path
from textwrap import dedent

import pytest

from colgrid_server.corpus import iter_docstring_documents, write_jsonl
from colgrid_server.documents import Document, read_jsonl

LONG = "This docstring is long enough to pass the default minimum length."


@pytest.fixture(scope="module")
def stdlib_docs() -> list[Document]:
    return list(iter_docstring_documents())


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(source), encoding="utf-8")
    return root


def ids(docs) -> list[str]:
    return [d.id for d in docs]


# --- the standard library corpus -------------------------------------------------------------


def test_stdlib_corpus_has_at_least_3000_documents(stdlib_docs):
    assert len(stdlib_docs) >= 3000


def test_stdlib_ids_are_unique(stdlib_docs):
    assert len(set(ids(stdlib_docs))) == len(stdlib_docs)


def test_stdlib_contains_json_dumps_with_its_docstring(stdlib_docs):
    doc = next(d for d in stdlib_docs if d.id == "json.dumps")
    assert "Serialize" in doc.text
    assert doc.metadata["title"] == "json.dumps"
    assert doc.metadata["module"] == "json"
    assert doc.metadata["kind"] == "function"
    assert doc.metadata["source"] == "json/__init__.py"
    assert doc.metadata["line"] > 1


def test_stdlib_has_modules_classes_and_methods(stdlib_docs):
    by_id = {d.id: d for d in stdlib_docs}
    assert by_id["json"].metadata["kind"] == "module"
    assert by_id["json.decoder.JSONDecoder"].metadata["kind"] == "class"
    assert by_id["json.decoder.JSONDecoder.decode"].metadata["kind"] == "function"


def test_stdlib_skips_tests_tools_and_site_packages(stdlib_docs):
    tops = {d.id.split(".")[0] for d in stdlib_docs}
    assert tops.isdisjoint({"test", "idlelib", "lib2to3", "site-packages", "numpy", "torch"})


def test_stdlib_excludes_private_names_by_default(stdlib_docs):
    assert not any(part.startswith("_") and not part.endswith("__")
                   for d in stdlib_docs for part in d.id.split("."))


def test_stdlib_texts_are_stripped_and_long_enough(stdlib_docs):
    assert all(d.text == d.text.strip() and len(d.text) >= 40 for d in stdlib_docs)


def test_stdlib_order_is_the_same_on_a_second_run(stdlib_docs):
    assert list(iter_docstring_documents()) == stdlib_docs


def test_limit_returns_that_many_leading_documents(stdlib_docs):
    assert list(iter_docstring_documents(limit=25)) == stdlib_docs[:25]


# --- any tree of sources ---------------------------------------------------------------------


def test_file_with_a_syntax_error_is_skipped(tmp_path):
    write_tree(tmp_path, {
        "good.py": f'"""{LONG}"""\n',
        "bad.py": f'"""{LONG}"""\ndef broken(:\n',
    })
    assert ids(iter_docstring_documents([tmp_path])) == ["good"]


def test_sources_are_parsed_not_imported(tmp_path):
    marker = tmp_path / "imported"
    write_tree(tmp_path, {
        "side_effect.py": f'"""{LONG}"""\nopen({str(marker)!r}, "w").close()\n',
    })
    assert ids(iter_docstring_documents([tmp_path])) == ["side_effect"]
    assert not marker.exists()
    assert "side_effect" not in sys.modules


def test_dotted_ids_follow_packages_classes_and_methods(tmp_path):
    write_tree(tmp_path, {
        "pkg/__init__.py": f'"""{LONG}"""\n',
        "pkg/mod.py": f'''
            class Thing:
                """{LONG}"""
                def run(self):
                    """{LONG}"""
                    def nested():
                        """{LONG}"""
        ''',
    })
    docs = list(iter_docstring_documents([tmp_path]))
    assert ids(docs) == ["pkg", "pkg.mod.Thing", "pkg.mod.Thing.run"]
    assert docs[2].metadata == {"title": "pkg.mod.Thing.run", "module": "pkg.mod",
                                "kind": "function", "source": "pkg/mod.py", "line": 4}


def test_docstring_text_is_cleaned_like_inspect_cleandoc(tmp_path):
    write_tree(tmp_path, {"mod.py": '''
        def f():
            """Summary line that is long enough.

                Indented example.
            Body.
            """
    '''})
    [doc] = iter_docstring_documents([tmp_path])
    assert doc.text == "Summary line that is long enough.\n\n    Indented example.\nBody."


def test_root_that_is_a_package_keeps_its_name(tmp_path):
    write_tree(tmp_path, {"pkg/__init__.py": "", "pkg/mod.py": f'"""{LONG}"""\n'})
    assert ids(iter_docstring_documents([tmp_path / "pkg"])) == ["pkg.mod"]


def test_skipped_directories_are_not_walked(tmp_path):
    write_tree(tmp_path, {
        f"{name}/mod.py": f'"""{LONG}"""\n'
        for name in ("keep", "tests", "test", "site-packages", "idlelib", "lib2to3", "x.dist-info")
    })
    assert ids(iter_docstring_documents([tmp_path])) == ["keep.mod"]


def test_private_names_only_with_include_private(tmp_path):
    write_tree(tmp_path, {
        "mod.py": f'''
            def _helper():
                """{LONG}"""
            class Public:
                def __len__(self):
                    """{LONG}"""
        ''',
        "_private.py": f'"""{LONG}"""\n',
    })
    assert ids(iter_docstring_documents([tmp_path])) == ["mod.Public.__len__"]
    assert ids(iter_docstring_documents([tmp_path], include_private=True)) == [
        "_private", "mod._helper", "mod.Public.__len__"]


def test_min_chars_drops_short_docstrings(tmp_path):
    write_tree(tmp_path, {"mod.py": '''
        def short():
            """Short."""
        def empty():
            """"""
    '''})
    assert ids(iter_docstring_documents([tmp_path])) == []
    assert ids(iter_docstring_documents([tmp_path], min_chars=0)) == ["mod.short"]


def test_first_definition_of_a_name_wins(tmp_path):
    write_tree(tmp_path, {"mod.py": f'''
        import sys
        if sys.platform == "win32":
            def f():
                """First: {LONG}"""
        else:
            def f():
                """Second: {LONG}"""
    '''})
    docs = list(iter_docstring_documents([tmp_path]))
    assert ids(docs) == ["mod.f"]
    assert docs[0].text.startswith("First:")


def test_roots_are_read_in_the_order_given(tmp_path):
    a = write_tree(tmp_path / "a", {"zeta.py": f'"""{LONG}"""\n'})
    b = write_tree(tmp_path / "b", {"alpha.py": f'"""{LONG}"""\n'})
    assert ids(iter_docstring_documents([a, b])) == ["zeta", "alpha"]


def test_negative_limit_is_rejected():
    with pytest.raises(ValueError):
        list(iter_docstring_documents(limit=-1))


# --- JSONL -----------------------------------------------------------------------------------


def test_jsonl_round_trips_through_read_jsonl(stdlib_docs, tmp_path):
    path = tmp_path / "corpus.jsonl"
    docs = stdlib_docs[:200]
    assert write_jsonl(docs, path) == 200
    assert list(read_jsonl(path)) == docs


def test_jsonl_write_leaves_no_temporary_file(tmp_path):
    write_jsonl([Document("a", "text", {})], tmp_path / "out.jsonl")
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_failed_jsonl_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl([Document("old", "old text", {})], path)

    def failing():
        yield Document("new", "new text", {})
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        write_jsonl(failing(), path)
    assert [d.id for d in read_jsonl(path)] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
