#!/usr/bin/env bash
# Every device call of the SmolLM2 leg runs this (the calls and their carry lists: results/README.md):
#   bash results/smollm2/lease.sh [SECONDS]    # SECONDS: how long to follow the driver (default 540)
#   bash results/smollm2/lease.sh assemble     # only gather, verify and unpack (no driver)
# 1. keeps what this call carried (.carry/<n>/, from results/smollm2/pack.sh) in .cache/smollm2/parts, which
#    outlives the call while the machine stays warm; installs the wheels (.whl + gguf) into /tmp/site once;
# 2. once every file in MANIFEST.sha256 is there and matches: joins the GGUF parts, checks the whole file,
#    unpacks the corpus; until then it says in one line what is missing and stops;
# 3. starts (or finds) results/smollm2/run_leg.sh through results/lease.sh (setsid driver, progress, outputs
#    packed into $OUT/study_S.tgz).
set -uo pipefail
mode=${1:-540}
store=.cache/smollm2
parts=$store/parts
gguf=$store/SmolLM2-135M-Instruct.Q4_1.gguf
site=${SMOLLM2_SITE:-/tmp/site}  # the wheels' install target (as /work/shared/gpu/wheels.sh says)
mkdir -p "$parts"
for f in .carry/*/*; do [ -f "$f" ] && cp -f "$f" "$parts/"; done
manifest=$parts/MANIFEST.sha256
if [ ! -f "$site/.installed" ] && compgen -G ".whl/*.whl" >/dev/null && compgen -G "$parts/gguf-*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .whl/*.whl "$parts"/gguf-*.whl && touch "$site/.installed"
fi
[ -f "$site/.installed" ] || { echo "smollm2: the wheels are not installed: carry .whl and .carry/1 first"; exit 1; }
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! (cd "$store" && [ -f "$(basename "$gguf")" ] && tail -n 1 parts/MANIFEST.sha256 | sha256sum -c --quiet -) 2>/dev/null; then
  [ -f "$manifest" ] || { echo "smollm2: no MANIFEST.sha256 yet: carry .carry/1 (bash results/smollm2/pack.sh)"; exit 1; }
  want=$(head -n -1 "$manifest" | awk '{print $2}')
  missing=$(for f in $want; do [ -f "$parts/$f" ] || printf '%s ' "$f"; done)
  if [ -n "$missing" ]; then
    echo "smollm2: have $(( $(wc -w <<<"$want") - $(wc -w <<<"$missing") )) of $(wc -w <<<"$want") files; missing: ${missing}(carry the next .carry/<n> now, while the machine is warm)"
    exit 0
  fi
  bad=$(cd "$parts" && head -n -1 MANIFEST.sha256 | sha256sum -c --quiet - 2>/dev/null | cut -d: -f1 | tr '\n' ' ')
  [ -z "$bad" ] || { echo "smollm2: checksum mismatch: $bad(pack again here and carry every part)"; exit 1; }
  ls "$parts"/gguf.part* | sort -V | xargs cat >"$gguf.tmp"
  (cd "$store" && mv "$(basename "$gguf").tmp" "$(basename "$gguf")" && tail -n 1 parts/MANIFEST.sha256 | sha256sum -c --quiet -) ||
    { echo "smollm2: the joined GGUF does not match its checksum"; rm -f "$gguf"; exit 1; }
  tar -xJf "$parts/corpus.tar.xz" -C results/smollm2
  echo "smollm2: GGUF joined and verified ($(stat -c %s "$gguf") bytes), corpus in results/smollm2/corpus"
fi
[ "$mode" = assemble ] && exit 0
export SMOLLM2_GGUF=$PWD/$gguf UPCYCLE_DRIVER=results/smollm2/run_leg.sh
exec bash results/lease.sh S "$mode"
