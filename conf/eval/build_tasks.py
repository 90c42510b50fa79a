"""Build the offline downstream tasks under conf/eval/tasks/ from the Python 3.11 documentation's prose.

Source: Debian ``python3.11-doc`` (pinned below; PSF License), its ``/usr/share/info/python3.11.info.gz``: the
Python docs as Texinfo text. No corpus any model here trains on uses it (results/smollm2/prepare_corpus.sh reads
Wikipedia openings, kernel docs and GCIDE; the default corpus is Python *code*); paragraphs that share a 13-word
run with the standard library's source or with the SmolLM2 corpus (when built) are dropped all the same (GPT-3's
13-gram overlap rule, arXiv 2005.14165 app. C). Kept: unindented paragraphs of prose (no code, lists or tables).

Two tasks, in lm-eval's own task format (conf/eval/tasks/*.yaml):
- ``pydoc_cloze``: LAMBADA's form: the paragraph without its last word, then the word; acc = the greedy
  continuation is the word (and its perplexity);
- ``pydoc_next``: HellaSwag's form: two sentences of a paragraph, then its true next sentence against 3 sentences
  of other sections of similar length; acc and acc_norm (per byte).

    python conf/eval/build_tasks.py [--smollm2-corpus results/smollm2/corpus/corpus.jsonl]

Deterministic: the same package, interpreter stdlib and seed give byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

PACKAGE, VERSION = "python3.11-doc", "3.11.2-6+deb12u8"
INFO = "usr/share/info/python3.11.info.gz"
SEED = 30
ITEMS = 3000  # per task at most
NGRAM = 13
OUT = Path(__file__).resolve().parent / "tasks"

_NOTE = re.compile(r"\*[Nn]ote\s+([^:]*?)\s*:\s*[^.,;:()]*?[.,]", re.S)  # *note os.popen(): 724. -> os.popen()
_FOOTNOTE = re.compile(r"\(\d+\)")
_SENTENCE = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[a-z0-9]+")


def info_text(work: Path) -> str:
    subprocess.run(["apt-get", "download", "-q", f"{PACKAGE}={VERSION}"], cwd=work, check=True, capture_output=True)
    deb = next(work.glob(f"{PACKAGE}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
    return gzip.decompress((work / "x" / INFO).read_bytes()).decode("utf-8")


def prose_paragraphs(text: str) -> list[tuple[str, str]]:
    """(section, paragraph): blocks of running text (unindented, or a definition's body indented 5), with notes,
    footnote marks and the quotes around identifiers removed; code, lists, tables and links are left out."""
    out = []
    for node in text.split("\x1f"):
        head, _, body = node.lstrip("\n").partition("\n")
        m = re.search(r"Node: ([^,\n]+)", head)
        if not m or m.group(1).startswith("Index"):
            continue
        for block in re.split(r"\n\s*\n", body):
            lines = block.splitlines()
            indent = {len(ln) - len(ln.lstrip(" ")) for ln in lines}
            if len(lines) < 2 or indent - {0, 5} or len(indent) > 1 or lines[0].lstrip()[:2] in ("* ", "- "):
                continue  # bullets, code and tables are indented otherwise
            para = _FOOTNOTE.sub("", _NOTE.sub(r"\1", " ".join(ln.strip() for ln in lines)))
            para = re.sub(r"\s+", " ", para.replace("\u2018", "").replace("\u2019", "")).strip()
            letters = sum(c.isalpha() or c == " " for c in para)
            if len(para.split()) < 25 or letters < 0.9 * len(para) or not para.endswith("."):
                continue
            if any(s in para for s in ("::", "http", ">>>", "*", "=", "{", "[", "--", "\u201c")):
                continue  # code, links and markup
            out.append((m.group(1).strip(), para))
    return out


def ngrams(text: str) -> set[int]:
    w = _WORD.findall(text.lower())
    return {hash(" ".join(w[i : i + NGRAM])) for i in range(len(w) - NGRAM + 1)}


def training_texts(smollm2_corpus: Path | None):
    """Every text a model here may train on that we can read: the stdlib source, the SmolLM2 corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        yield f.read_bytes().decode("utf-8", errors="replace")
    if smollm2_corpus is not None:
        with open(smollm2_corpus) as fh:
            for line in fh:
                yield json.loads(line)["text"]


def held_out(paras: list[tuple[str, str]], smollm2_corpus: Path | None) -> list[tuple[str, str]]:
    grams = [ngrams(p) for _, p in paras]
    wanted = set().union(*grams)
    seen = set()
    for text in training_texts(smollm2_corpus):
        seen |= ngrams(text) & wanted
    return [p for p, g in zip(paras, grams, strict=True) if not g & seen]


def sentences(para: str) -> list[str]:
    return [s for s in _SENTENCE.split(para) if len(s.split()) >= 4]


def cloze_items(paras, rng: random.Random) -> list[dict]:
    items = []
    for section, para in paras:
        words = para.rstrip(".").split(" ")
        last = words[-1]
        if not (last.isalpha() and len(last) >= 3):
            continue
        context = " ".join(words[-80:-1])  # the paragraph's last 80 words at most
        items.append({"section": section, "context": context, "target": last})
    rng.shuffle(items)
    return items[:ITEMS]


def next_sentence_items(paras, rng: random.Random) -> list[dict]:
    split = [(section, sentences(p)) for section, p in paras]
    pool = [(section, s) for section, ss in split for s in ss[1:] if 6 <= len(s.split()) <= 40]
    by_len: dict[int, list[tuple[str, str]]] = {}
    for section, s in pool:
        by_len.setdefault(len(s.split()) // 4, []).append((section, s))
    items = []
    for section, ss in split:
        if len(ss) < 3 or not 6 <= len(ss[2].split()) <= 40:
            continue
        true = ss[2]
        near = [s for sec, s in by_len[len(true.split()) // 4] if sec != section and s != true]
        if len(near) < 3:
            continue
        endings = rng.sample(near, 3)
        label = rng.randrange(4)
        endings.insert(label, true)
        items.append({"section": section, "context": " ".join(ss[:2]), "endings": endings, "label": label})
    rng.shuffle(items)
    return items[:ITEMS]


def write_jsonl(path: Path, items: list[dict]) -> str:
    text = "".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n" for it in items)
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2-corpus", type=Path, default=None, help="results/smollm2/corpus/corpus.jsonl")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        text = info_text(Path(work))
    paras = sorted(set(prose_paragraphs(text)))
    kept = held_out(paras, args.smollm2_corpus)
    rng = random.Random(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    cloze, nxt = cloze_items(kept, rng), next_sentence_items(kept, rng)
    digests = {"pydoc_cloze.jsonl": write_jsonl(OUT / "pydoc_cloze.jsonl", cloze)}
    digests["pydoc_next.jsonl"] = write_jsonl(OUT / "pydoc_next.jsonl", nxt)
    meta = {
        "source": f"Debian {PACKAGE} {VERSION}, {INFO}",
        "license": "PSF License Version 2 (Python documentation); see SOURCE.md",
        "seed": SEED,
        "paragraphs": len(paras),
        "held_out_paragraphs": len(kept),
        "ngram_overlap_checked": {
            "n": NGRAM,
            "stdlib": f"Python {sys.version.split()[0]}",
            "smollm2": str(args.smollm2_corpus),
        },
        "items": {"pydoc_cloze": len(cloze), "pydoc_next": len(nxt)},
        "sha256": digests,
    }
    (OUT / "build.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta["items"]), f"from {len(kept)} of {len(paras)} paragraphs")


if __name__ == "__main__":
    main()
