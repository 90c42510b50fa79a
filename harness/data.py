"""Local corpus -> byte-level BPE -> uint16 token shards (cached by content hash) -> LightningDataModule.

Default corpus: the Python standard library source of the running interpreter (PSF license), present
on every machine with Python and no download. ``path=`` takes the user's own .txt/.md/.rst/.jsonl
files or folders instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from harness.errors import ConfigError
from harness.io import (
    atomic_write_bytes,
    atomic_write_text,
    corrupt_files,
    entry_lock,
    file_digest,
    read_json,
    read_only_miss,
)

log = logging.getLogger(__name__)
EOT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")


SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
MAX_FILE_BYTES = 1_000_000  # larger .py files are generated tables or data, not prose-like code


def _walk(root: Path, wanted, links: bool) -> list[Path]:
    """The files under ``root`` whose name ``wanted`` accepts, outside SKIP_DIRS folders, up to MAX_FILE_BYTES,
    sorted by their path under ``root`` (``links=False``: symbolic links left out). os.walk never enters a
    skipped folder or a linked one (as ``Path.rglob`` before Python 3.13, which walked a skipped folder's whole
    tree to filter it afterwards: 3x slower over site-packages, and every job lists its corpus)."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in names:
            if name in SKIP_DIRS or not wanted(name):
                continue
            p = Path(folder, name)
            try:
                if (links or not p.is_symlink()) and p.is_file() and p.stat().st_size <= MAX_FILE_BYTES:
                    files.append(p)
            except OSError:
                continue
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def _py_files(root: Path) -> list[Path]:
    return _walk(root, lambda name: name.endswith(".py"), links=True)


def _stdlib_files() -> list[Path]:
    return _py_files(Path(sysconfig.get_paths()["stdlib"]))


def _python_roots() -> list[Path]:
    """The stdlib, then the installed packages (site-packages of the running interpreter)."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    return roots + sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")} - set(roots))


def _python_files() -> list[Path]:
    """data.source=python: the stdlib, then every installed package's source: a larger real corpus (hundreds of
    MB on a machine with torch), still with no download. Identical files (vendored copies) are read once."""
    return [f for root in _python_roots() if root.is_dir() for f in _py_files(root)]


# data.source=machine: the other text the interpreter's machine holds (type stubs, C/C++/CUDA headers and
# sources of the installed packages and the system, documentation), after the Python corpus
MACHINE_SUFFIXES = (".pyi", ".pyx", ".h", ".hh", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".cu", ".md", ".rst", ".txt")
# (the system's Python packages add their .py too: the interpreter's own roots gave theirs already)
SYSTEM_ROOTS = (
    "/usr/include",
    "/usr/local/include",
    "/usr/local/cuda/include",
    "/usr/lib/python3/dist-packages",
    "/usr/share/doc",
)


def _text_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return _walk(root, lambda name: Path(name).suffix in suffixes, links=False)


def _machine_files() -> list[Path]:
    """data.source=machine: the Python corpus (data.source=python's files first), then every type stub, C/C++/CUDA
    header and source and Markdown/reST/plain-text document under the same roots and the system's include and doc
    folders: the largest corpus a machine offers with no download. Identical files are read once."""
    python = [r.resolve() for r in _python_roots() if r.is_dir()]
    system = [r for r in dict.fromkeys(Path(r).resolve() for r in SYSTEM_ROOTS if Path(r).is_dir()) if r not in python]
    return (
        _python_files()
        + [f for root in python for f in _text_files(root, MACHINE_SUFFIXES)]
        + [f for root in system for f in _text_files(root, (".py", *MACHINE_SUFFIXES))]
    )


# data.source -> (its files in order, whether identical files are kept once)
SOURCES = {"stdlib": (_stdlib_files, False), "python": (_python_files, True), "machine": (_machine_files, True)}


def _user_files(path: str) -> list[Path]:
    """One file (any name), or a folder's {TEXT_SUFFIXES} files (hidden ones skipped), in a fixed order."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"data.path={path!r} does not exist")
    if not p.is_dir():
        return [p]
    files = sorted(
        q
        for q in p.rglob("*")
        if q.suffix in TEXT_SUFFIXES
        and q.is_file()
        and not any(part.startswith(".") for part in q.relative_to(p).parts)
    )
    if not files:
        raise ConfigError(f"data.path={path!r} holds no {'/'.join(TEXT_SUFFIXES)} files")
    return files


MIN_CORPUS_BYTES = 10_000  # below this a BPE and a validation split say nothing
MAX_INVALID_UTF8 = 0.01  # a file with more undecodable bytes than this is not UTF-8 text (rejected, not cleaned)


def _decode(f: Path) -> tuple[str, int]:
    """A file's text and its count of bytes that are not UTF-8 (replaced by U+FFFD); binary files and
    files in another encoding stop the run with one line naming them."""
    raw = f.read_bytes()
    if b"\x00" in raw[: 1 << 16]:
        raise ConfigError(f"data.path: {f} is not text (it holds NUL bytes: binary, or UTF-16)")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > MAX_INVALID_UTF8 * max(len(raw), 1):
        raise ConfigError(
            f"data.path: {f} is not UTF-8 text ({bad:,} of {len(raw):,} bytes do not decode); "
            "convert it (e.g. iconv -t UTF-8) or leave it out"
        )
    return text, bad


def _jsonl_texts(f: Path, raw: str) -> list[str]:
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(str(json.loads(line)["text"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f'data.path: {f}:{i} is not a JSON object with a "text" field') from None
    return texts


def _source_files(source: str, path: str | None) -> tuple[list[Path], bool]:
    """The corpus's files in order (before identical ones are dropped) and whether they are to be."""
    if path:
        return _user_files(path), False
    if source not in SOURCES:
        raise ConfigError(f"data.source={source!r} is not one of {sorted(SOURCES)} (or give data.path=)")
    files, unique = SOURCES[source]
    return files(), unique


def read_documents(
    source: str, path: str | None, max_bytes: int, listing: tuple[list[Path], bool] | None = None
) -> list[str]:
    """Documents of the corpus, in a fixed order, up to ``max_bytes`` of UTF-8 text (``listing``: its files as
    ``_source_files`` gave them a moment ago, so that a build lists the folders once)."""
    files, unique = listing if listing is not None else _source_files(source, path)
    docs, total, bad, bad_files, seen = [], 0, 0, 0, set()
    for f in files:
        if path:
            raw, n_bad = _decode(f)
        else:
            blob = f.read_bytes()
            if unique:  # while reading: the files past max_bytes are never read
                digest = hashlib.sha1(blob).digest()
                if digest in seen:
                    continue
                seen.add(digest)
            raw, n_bad = blob.decode("utf-8", errors="replace"), 0
        bad, bad_files = bad + n_bad, bad_files + bool(n_bad)
        for t in _jsonl_texts(f, raw) if f.suffix == ".jsonl" else [raw]:
            if t.strip():
                docs.append(t)
                total += len(t.encode())
            if total >= max_bytes:
                break
        if total >= max_bytes:
            break
    if bad:
        warnings.warn(f"data.path: {bad:,} bytes in {bad_files} file(s) were not UTF-8; replaced by U+FFFD")
    if path and total < MIN_CORPUS_BYTES:
        raise ConfigError(
            f"data.path={path!r} holds {total:,} bytes of text; the corpus needs at least {MIN_CORPUS_BYTES:,}"
        )
    return docs


VAL_PIECE_TOKENS = 4096  # validation pieces at least this long where the corpus allows (fewer junctions)


def split_stream(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the token stream cut into G <= 20 equal segments, the last ``val_fraction`` of each
    going to validation. A fixed share of the tokens, spread over the corpus, however many documents."""
    n_val = round(len(tokens) * val_fraction)
    groups = max(1, min(20, n_val // VAL_PIECE_TOKENS))
    bounds = np.linspace(0, len(tokens), groups + 1).astype(np.int64)
    cuts = [b - round((b - a) * val_fraction) for a, b in zip(bounds[:-1], bounds[1:])]
    train = np.concatenate([tokens[a:c] for a, c in zip(bounds[:-1], cuts)])
    val = np.concatenate([tokens[c:b] for c, b in zip(cuts, bounds[1:])])
    return train, val


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def load_tokenizer(folder: str):
    """A checkpoint's own tokenizer (tokenizer.json in its folder), for data matching its vocabulary."""
    from tokenizers import Tokenizer

    file = Path(folder).expanduser() / "tokenizer.json"
    if not file.exists():
        raise ConfigError(f"data.tokenizer_path={folder!r} holds no tokenizer.json")
    return Tokenizer.from_file(str(file))


def _eot_id(tok) -> int:
    for name in (EOT, "</s>", "<|im_end|>", "<eos>", "<|end_of_text|>"):
        if tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    raise ConfigError("the tokenizer has no end-of-text token (looked for <|endoftext|>, </s>, <|im_end|>, <eos>)")


ENCODE_CHUNK = 2048  # documents tokenized at a time
# this process's shard folders by their inputs: a job's stages (and a warm launcher worker's next jobs) find their
# corpus without reading and hashing its text again, while its files are unchanged (path, size, mtime)
_BUILT: dict[tuple, Path] = {}


def _memo_key(files, source, path, max_bytes, vocab_size, val_fraction, cache_dir, tokenizer_path) -> tuple:
    if tokenizer_path is not None:
        files = [*files, Path(tokenizer_path).expanduser() / "tokenizer.json"]
    listing = tuple((str(f), *_stat(f)) for f in files)
    return (
        None if path else source,
        path,
        max_bytes,
        vocab_size,
        val_fraction,
        str(Path(cache_dir).expanduser().resolve()),
        tokenizer_path,
        listing,
    )


def _stat(f: Path) -> tuple[int, int]:
    try:
        st = f.stat()
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _intact(out: Path) -> bool:
    """The folder still holds its shards at their recorded sizes (a full checksum runs on every first use)."""
    try:
        checksums = json.loads((out / "meta.json").read_text())["checksums"]
        return all((out / n).stat().st_size == int(c.split(":")[0]) for n, c in checksums.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def build_shards(
    source: str,
    path: str | None,
    max_bytes: int,
    vocab_size: int,
    val_fraction: float,
    cache_dir: str,
    tokenizer_path: str | None = None,
) -> Path:
    """Tokenizer + train.bin/val.bin under ``cache_dir/data/<hash>``; built once, file-locked.
    With ``tokenizer_path`` the checkpoint's own tokenizer is used instead of training a BPE."""
    if tokenizer_path is None and not 256 < vocab_size <= 65535:
        raise ConfigError(f"data.vocab_size={vocab_size} must be in (256, 65535] (uint16 shards)")
    if not 0 < val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 0.5)")
    listing = _source_files(source, path)
    memo = _memo_key(listing[0], source, path, max_bytes, vocab_size, val_fraction, cache_dir, tokenizer_path)
    if memo in _BUILT and _intact(_BUILT[memo]):
        return _BUILT[memo]
    known = _listed(memo, cache_dir)
    if known is not None:
        _BUILT[memo] = known
        return known
    docs = read_documents(source, path, max_bytes, listing)
    # the key covers everything the shards depend on: the text, the tokenizer (trained: its settings and
    # the library version; given: its file), the split rule
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
    h.update(f"|v{vocab_size}|val{val_fraction}|{_rules()}".encode())
    if tokenizer_path is not None:
        h.update(
            (Path(tokenizer_path).expanduser() / "tokenizer.json").read_bytes()
            if (Path(tokenizer_path).expanduser() / "tokenizer.json").exists()
            else b"missing"
        )
    out = Path(cache_dir).expanduser() / "data" / h.hexdigest()[:16]
    with entry_lock(out) as writable:  # a read-only cache: hits read without a lock
        meta = read_json(out / "meta.json", required=("checksums", "dtype", "train_tokens", "val_tokens"))
        if meta is not None:
            bad = corrupt_files(out, meta["checksums"])
            if not bad:
                log.info("token shards: cached %s", out)
                _BUILT[memo] = out
                _list(memo, cache_dir, out)
                return out
        if not writable:
            raise read_only_miss(out, "the token shards")
        if meta is not None:
            warnings.warn(f"token cache {out} is corrupt ({', '.join(bad)} differ from meta.json): rebuilding it")
            (out / "meta.json").unlink()
        t0 = time.perf_counter()
        log.info(
            "token shards: %s documents, %s bytes -> %s tokenizer -> %s",
            f"{len(docs):,}",
            f"{sum(len(d.encode()) for d in docs):,}",
            tokenizer_path or f"BPE (vocab {vocab_size})",
            out,
        )
        tok = load_tokenizer(tokenizer_path) if tokenizer_path else train_tokenizer(docs, vocab_size)
        eot = _eot_id(tok)
        dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.uint32
        pieces = []  # in chunks: a whole corpus's Encoding objects would hold ~60 bytes a token at once
        for i in range(0, len(docs), ENCODE_CHUNK):
            pieces += [np.asarray(e.ids + [eot], dtype=dtype) for e in tok.encode_batch(docs[i : i + ENCODE_CHUNK])]
        stream = np.concatenate(pieces)
        split = dict(zip(("train", "val"), split_stream(stream, val_fraction)))
        for name, arr in split.items():
            atomic_write_bytes(out / f"{name}.bin", arr.tobytes())
        atomic_write_text(out / "tokenizer.json", tok.to_str())
        meta = {
            "documents": len(docs),
            "bytes": sum(len(d.encode()) for d in docs),
            "vocab_size": tok.get_vocab_size(),
            "dtype": np.dtype(dtype).name,
            "tokenizer": tokenizer_path or "bpe",
            "train_tokens": len(split["train"]),
            "val_tokens": len(split["val"]),
            "source": path or source,
            "checksums": {n: file_digest(out / n) for n in ("train.bin", "val.bin", "tokenizer.json")},
        }
        atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
        # how long the build took (tokenizer, encoding, writes), kept out of meta.json: a rebuild is the same content
        atomic_write_text(out / "build.json", json.dumps({"seconds": round(time.perf_counter() - t0, 3)}))
    _BUILT[memo] = out
    _list(memo, cache_dir, out)
    return out


def _rules() -> str:
    """How text becomes shards (the BPE, the split, the tokenizers library): part of both keys."""
    import tokenizers

    return f"bpe1|stream-split1|tokenizers{tokenizers.__version__}"


def _listing_path(memo: tuple, cache_dir: str) -> Path:
    key = hashlib.sha256(f"{memo!r}|{_rules()}".encode()).hexdigest()[:20]
    return Path(cache_dir).expanduser() / "data" / "listings" / f"{key}.json"


def _listed(memo: tuple, cache_dir: str) -> Path | None:
    """The shards a process built from this very listing (every file's path, size and mtime, and the settings),
    when they are still whole (full checksums, once per process): a job finds its corpus without reading and
    hashing the text (620 MB for data.source=machine, a few seconds a job), as ``_BUILT`` does within a process."""
    record = _listing_path(memo, cache_dir)
    try:
        out = record.parent.parent / json.loads(record.read_text())["shards"]
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if corrupt_files(out, meta.get("checksums") or {"meta.json": ""}):
        return None  # damaged shards: the full build below finds and rebuilds them
    log.info("token shards: cached %s (the corpus's files unchanged since they were built)", out)
    return out


def _list(memo: tuple, cache_dir: str, out: Path) -> None:
    """Records which shards this listing gave (best effort: a read-only cache keeps the slower path)."""
    try:
        record = _listing_path(memo, cache_dir)
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps({"shards": out.name}) + "\n")
    except OSError:
        pass


class RandomWindows(Dataset):
    """Sample i is the window at a position drawn from a generator seeded by (seed, i): any sample
    can be produced alone, so a resumed run continues exactly where it stopped."""

    def __init__(self, tokens: np.ndarray, seq_len: int, first: int, count: int, seed: int):
        self.tokens, self.seq_len, self.first, self.count, self.seed = tokens, seq_len, first, count, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        if not 0 <= i < self.count:  # also ends plain iteration (``for x, y in ds``), which ignores __len__
            raise IndexError(f"window {i} of {self.count}")
        rng = np.random.default_rng([self.seed, self.first + i])
        s = int(rng.integers(0, len(self.tokens) - self.seq_len - 1))
        w = torch.from_numpy(self.tokens[s : s + self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]


class FixedWindows(Dataset):
    """``count`` evenly spaced validation windows: the same for every run on the same shards, seq_len and
    count, whatever the batch size or device count (the loader batches them; its last batch may be partial)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, count: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.starts = np.linspace(0, len(tokens) - seq_len - 2, num=count).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s = int(self.starts[i])
        w = torch.from_numpy(self.tokens[s : s + self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]


class RankShard(Dataset):
    """Rank r of W's validation windows r, r+W, ..., padded to the same count on every rank (a sharded model
    runs the same number of forwards everywhere) with weight-0 copies: ``(x, y, weight)``. DistributedSampler
    pads with repeated windows that then count twice in the mean."""

    def __init__(self, ds: Dataset, rank: int, world: int):
        self.ds, self.rank, self.world = ds, rank, world
        self.length = -(-len(ds) // world)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        j = self.rank + i * self.world
        x, y = self.ds[j if j < len(self.ds) else self.rank % len(self.ds)]
        return x, y, torch.tensor(1.0 if j < len(self.ds) else 0.0)


class TokenDataModule(L.LightningDataModule):
    """Batches of (input, target) windows. ``batch_size`` is the *global* batch (sequences per
    optimizer step, whatever the device count); each device takes ``batch_size / world`` of it, in
    micro-batches of ``micro_batch_size`` with gradient accumulation. Train sampling starts at the
    trainer's global step, so resume needs no dataloader state."""

    def __init__(
        self,
        cache_dir: str,
        source: str = "stdlib",
        path: str | None = None,
        max_bytes: int = 4_000_000,
        vocab_size: int = 2048,
        val_fraction: float = 0.05,
        seq_len: int = 64,
        batch_size: int = 16,
        val_tokens: int = 8192,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer_path: str | None = None,
        micro_batch_size: int | None = None,
        val_batches: int | None = None,
    ):
        super().__init__()
        self.cache_dir, self.source, self.path, self.max_bytes = cache_dir, source, path, int(max_bytes)
        self.vocab_size, self.val_fraction = int(vocab_size), float(val_fraction)
        self.seq_len, self.batch_size, self.val_tokens = int(seq_len), int(batch_size), int(val_tokens)
        self.num_workers, self.seed, self.tokenizer_path = int(num_workers), int(seed), tokenizer_path
        self.micro_batch_size = None if micro_batch_size is None else int(micro_batch_size)
        self.total_steps = 0
        self.world_size = 1  # set by the trainer setup (see ``split_batch``)
        # set by the fit for GPU trainers: a batch in pinned host memory is copied to the GPU without the stream
        # sync that a pageable copy makes, so the host can queue the next step while the GPU runs this one
        self.pin_memory = False
        self.shard_dir: Path | None = None
        if self.seq_len < 2:  # a window predicts its next token: two tokens at least
            raise ConfigError(f"data.seq_len={seq_len} must be >= 2")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be >= 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"data.micro_batch_size={micro_batch_size} must be >= 1 (or null)")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 0.5)")
        if val_batches is not None:
            raise ConfigError("data.val_batches is gone: set data.val_tokens (validation tokens, any batch size)")
        if self.val_tokens < self.seq_len:
            raise ConfigError(f"data.val_tokens={val_tokens} must be >= data.seq_len={seq_len} (one window)")

    @property
    def val_windows(self) -> int:
        """Validation windows: ``val_tokens`` rounded down to whole windows of ``seq_len`` targets."""
        return self.val_tokens // self.seq_len

    def split_batch(self, world: int) -> tuple[int, int]:
        """(micro-batch per device, gradient-accumulation steps) for the global batch on ``world`` devices."""
        per_device, rest = divmod(self.batch_size, world)
        if rest or not per_device:
            raise ConfigError(f"data.batch_size={self.batch_size} (global) does not split over {world} devices")
        micro = min(self.micro_batch_size or per_device, per_device)
        if per_device % micro:
            raise ConfigError(
                f"data.micro_batch_size={micro} does not divide the per-device batch {per_device} "
                f"(data.batch_size={self.batch_size} over {world} devices)"
            )
        return micro, per_device // micro

    @property
    def loader_batch(self) -> int:
        return self.split_batch(self.world_size)[0]

    def prepare(self) -> Path:
        """Build or find the cached shards (rank 0 first under DDP thanks to the file lock)."""
        self.shard_dir = build_shards(
            self.source,
            self.path,
            self.max_bytes,
            self.vocab_size,
            self.val_fraction,
            self.cache_dir,
            self.tokenizer_path,
        )
        need = self.seq_len + 2
        if min(self.meta["train_tokens"], self.meta["val_tokens"]) < need:
            raise ConfigError(
                f"data.seq_len={self.seq_len}: each split needs data.seq_len + 2 = {need} tokens and the corpus "
                f"({self.path or 'data.source=' + str(self.source)}) gives {self.meta['train_tokens']:,} training and "
                f"{self.meta['val_tokens']:,} validation tokens (a shorter data.seq_len, more text, or a larger "
                "data.val_fraction)"
            )
        if self.val_tokens > self.meta["val_tokens"]:
            raise ConfigError(
                f"data.val_tokens={self.val_tokens:,} is more than the validation split holds "
                f"({self.meta['val_tokens']:,} tokens): lower it or raise data.val_fraction"
            )
        return self.shard_dir

    def check_source(self) -> None:
        """Before any compute: a user corpus exists, is text, and is large enough (one line if not)."""
        if self.path:
            read_documents(self.source, self.path, self.max_bytes)

    def shard(self, split: str) -> np.ndarray:
        if self.shard_dir is None:
            self.prepare()
        return np.memmap(self.shard_dir / f"{split}.bin", dtype=self.meta.get("dtype", "uint16"), mode="r")

    @property
    def meta(self) -> dict:
        return json.loads((self.shard_dir / "meta.json").read_text())

    def train_dataloader(self) -> DataLoader:
        step = self.trainer.global_step if self.trainer else 0
        per_step = self.batch_size  # global: under DDP each rank's sampler takes every world-th sample
        if step:
            log.info("resuming: train sampling starts at step %d", step)
        # Full-run length even when resuming: Lightning counts batch_idx from the restored step
        # against len(loader); sample i of this loader is global sample (step * per_step + i).
        ds = RandomWindows(
            self.shard("train"), self.seq_len, step * per_step, max(self.total_steps, 1) * per_step, self.seed
        )
        return DataLoader(
            ds,
            batch_size=self.loader_batch,
            sampler=self._rank_sampler(ds),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader:
        ds = FixedWindows(self.shard("val"), self.seq_len, self.val_windows)
        if self.trainer is not None and self.trainer.world_size > 1:
            ds = RankShard(ds, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(ds, batch_size=self.loader_batch, num_workers=0, pin_memory=self.pin_memory)

    def _rank_sampler(self, ds: Dataset) -> Sampler | None:
        """Rank r of W takes samples r, r+W, ...: each optimizer step consumes the same global samples
        as on one device. (Lightning's own distributed sampler would shuffle training data, breaking
        that and exact resume, so the Trainer runs with ``use_distributed_sampler=False``.)"""
        if self.trainer is None or self.trainer.world_size == 1:
            return None
        return DistributedSampler(
            ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
