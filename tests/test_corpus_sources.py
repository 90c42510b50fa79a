"""The corpora a machine offers with no download, and a process finding its shards without re-reading the text."""

from __future__ import annotations

import json

import pytest

import harness.data as data
from harness.data import build_shards, read_documents
from harness.errors import ConfigError


def _text(i: int, n: int = 3000) -> str:
    return "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # line {j}\n" for j in range(n // 40))


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine in miniature: a stdlib, a site-packages with headers and stubs, a system include and doc folder."""
    std, site, inc, doc = (tmp_path / n for n in ("stdlib", "site", "include", "doc"))
    files = {
        std / "a.py": _text(1),
        std / "test" / "skipped.py": _text(2),  # test folders are not corpus
        site / "pkg" / "b.py": _text(3),
        site / "pkg" / "b.pyi": _text(4),
        site / "pkg" / "include" / "x.h": "#pragma once\nint x(int);\n" * 100,
        site / "pkg" / "vendored.py": _text(1),  # the same bytes as stdlib/a.py: kept once
        site / "pkg" / "lib.so": "not text",
        site / "pkg" / "huge.h": "x" * (data.MAX_FILE_BYTES + 1),  # generated tables are not prose-like
        inc / "y.h": "struct y { int a; };\n" * 100,
        inc / "gen.py": _text(5),  # a system root's Python is corpus too
        inc / "again.py": _text(3),  # ... once: the same bytes as site/pkg/b.py
        doc / "tool" / "README.md": "# A tool\n\nIt does things.\n" * 50,
    }
    for f, t in files.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(t)
    (site / "pkg" / "link.h").symlink_to(inc / "y.h")  # read once, through its own root
    monkeypatch.setattr(
        data.sysconfig, "get_paths", lambda: {"stdlib": str(std), "purelib": str(site), "platlib": str(site)}
    )
    monkeypatch.setattr(data, "SYSTEM_ROOTS", (str(inc), str(doc), str(tmp_path / "absent"), str(site)))
    return std, site, inc, doc


def test_the_machine_corpus_is_the_python_corpus_then_the_other_text_each_file_once(machine):
    std, site, inc, doc = machine
    python = [std / "a.py", site / "pkg" / "b.py"]  # not test/, not the vendored copy of a.py
    rest = [site / "pkg" / "b.pyi", site / "pkg" / "include" / "x.h", inc / "gen.py", inc / "y.h"]
    rest.append(doc / "tool" / "README.md")
    assert read_documents("python", None, 10**9) == [f.read_text() for f in python]
    docs = read_documents("machine", None, 10**9)
    assert docs == [f.read_text() for f in python + rest]  # data.source=python's documents first
    first = len(python[0].read_text())
    assert read_documents("machine", None, first) == docs[:1]  # max_bytes stops at the file that reaches it
    with pytest.raises(ConfigError, match=r"data.source='pythn' is not one of \['machine', 'python', 'stdlib'\]"):
        read_documents("pythn", None, 10**9)


def _folder(tmp_path, n=12):
    folder = tmp_path / "docs"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:02d}.py").write_text(_text(i, 8000))
    return folder


def test_a_job_finds_its_shards_again_without_reading_the_text_until_a_file_changes(tmp_path, monkeypatch):
    folder, cache = _folder(tmp_path), str(tmp_path / "cache")
    reads = []
    real = data.read_documents
    monkeypatch.setattr(data, "read_documents", lambda *a: reads.append(a) or real(*a))
    out = build_shards("stdlib", str(folder), 10**9, 300, 0.05, cache)
    assert build_shards("stdlib", str(folder), 10**9, 300, 0.05, cache) == out and len(reads) == 1
    assert build_shards("stdlib", str(folder), 10**9, 301, 0.05, cache) != out and len(reads) == 2  # another BPE
    (folder / "doc03.py").write_text(_text(99, 8000) + "# edited\n")
    edited = build_shards("stdlib", str(folder), 10**9, 300, 0.05, cache)
    assert edited != out and len(reads) == 3
    (edited / "train.bin").write_bytes((edited / "train.bin").read_bytes()[:100])  # damaged under the process
    with pytest.warns(UserWarning, match="is corrupt"):
        assert build_shards("stdlib", str(folder), 10**9, 300, 0.05, cache) == edited
    assert len(reads) == 4
    data._BUILT.clear()  # a new process (another job, or a job's next stage in a fresh worker)
    assert build_shards("stdlib", str(folder), 10**9, 300, 0.05, cache) == edited and len(reads) == 4
    (folder / "doc05.py").write_text(_text(98, 8000))  # a file changed since: the text is read again
    data._BUILT.clear()
    assert build_shards("stdlib", str(folder), 10**9, 300, 0.05, cache) != edited and len(reads) == 5
    meta = json.loads((edited / "meta.json").read_text())
    assert (edited / "train.bin").stat().st_size == int(meta["checksums"]["train.bin"].split(":")[0])


def test_tokenizing_in_chunks_gives_the_stream_of_one_batch(tmp_path, monkeypatch):
    folder = _folder(tmp_path, n=7)
    whole = build_shards("stdlib", str(folder), 10**9, 300, 0.05, str(tmp_path / "a"))
    monkeypatch.setattr(data, "ENCODE_CHUNK", 3)  # 7 documents in chunks of 3, 3, 1
    data._BUILT.clear()
    chunked = build_shards("stdlib", str(folder), 10**9, 300, 0.05, str(tmp_path / "b"))
    for name in ("train.bin", "val.bin"):
        assert (chunked / name).read_bytes() == (whole / name).read_bytes()


def _rglob_reference(root, suffixes, links):
    """The listing as Path.rglob gave it (Python 3.11/3.12: no linked folder entered, a skipped folder walked and
    filtered afterwards): the corpus a committed study read, so the faster walk must list the same files."""
    return sorted(
        (
            p
            for p in root.rglob("*")
            if p.suffix in suffixes
            and not data.SKIP_DIRS & set(p.relative_to(root).parts)
            and (links or not p.is_symlink())
            and p.is_file()
            and p.stat().st_size <= data.MAX_FILE_BYTES
        ),
        key=lambda p: str(p.relative_to(root)),
    )


def test_the_walk_lists_what_rglob_listed(machine, tmp_path):
    std, site, inc, doc = machine
    deep = site / "pkg" / "sub" / "tests" / "inner"  # a skipped folder anywhere in the path
    deep.mkdir(parents=True)
    (deep / "t.py").write_text(_text(6))
    (site / "pkg" / "sub" / "c.py").write_text(_text(7))
    (site / "pkg" / "sub" / "Z.h").write_text("int z;\n")  # upper case sorts before lower case
    (site / "linked").symlink_to(inc, target_is_directory=True)  # a linked folder is not entered
    (site / "pkg" / "alias.py").symlink_to(site / "pkg" / "b.py")  # a linked .py file is read (python corpus)
    (site / "pkg" / "dangling.h").symlink_to(tmp_path / "nowhere.h")
    for root in (std, site, inc, doc):
        assert data._py_files(root) == _rglob_reference(root, (".py",), links=True)
        assert data._text_files(root, data.MACHINE_SUFFIXES) == _rglob_reference(root, data.MACHINE_SUFFIXES, False)
    assert site / "pkg" / "sub" / "c.py" in data._py_files(site) and site / "pkg" / "alias.py" in data._py_files(site)
