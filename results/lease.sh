#!/usr/bin/env bash
# One device call of the study: start (or find) `run_study.sh PART` as its own session, so it outlives
# this call while the machine stays held; report progress for up to SECONDS; pack outputs into $OUT.
#   bash results/lease.sh A 560
# UPCYCLE_DRIVER names another driver script taking PART (results/smollm2/lease.sh sets it).
part=${1:?part}; budget=${2:-560}
export UPCYCLE_LOGS=logs/study/$part UPCYCLE_CACHE=.cache
mkdir -p "$UPCYCLE_LOGS"
if ! { [ -f "$UPCYCLE_LOGS/driver.pid" ] && kill -0 "$(cat "$UPCYCLE_LOGS/driver.pid")" 2>/dev/null; } \
   && ! grep -q "finished" "$UPCYCLE_LOGS/driver.log" 2>/dev/null; then
  setsid nohup bash "${UPCYCLE_DRIVER:-results/run_study.sh}" "$part" >"$UPCYCLE_LOGS/driver.out" 2>&1 < /dev/null &
  echo $! >"$UPCYCLE_LOGS/driver.pid"
  echo "started driver pid $(cat "$UPCYCLE_LOGS/driver.pid")"
fi
t0=$(date +%s)
progress() {
  python3 - "$UPCYCLE_LOGS" <<'PY'
import csv, sys, time
from pathlib import Path
now = time.time()
for f in sorted(list(Path(".cache/dense").glob("*/csv/version_*/metrics.csv")) + list(Path(sys.argv[1]).rglob("metrics.csv"))):
    if now - f.stat().st_mtime > 90:
        continue
    rows = list(csv.DictReader(open(f)))
    last = {k: v for r in rows for k, v in r.items() if v}
    keys = ("step", "perf/tokens_per_s", "perf/mfu", "train/loss", "val/loss", "perf/max_mem_gib")
    print("  ", "/".join(f.parts[-5:-2]), " ".join(f"{k.split('/')[-1]}={float(last[k]):.4g}" for k in keys if k in last))
PY
}
while (( $(date +%s) - t0 < budget )); do
  sleep 20
  echo "--- $(( $(date +%s) - t0 )) s"; tail -n 3 "$UPCYCLE_LOGS/driver.log" 2>/dev/null; progress
  grep -q "finished" "$UPCYCLE_LOGS/driver.log" 2>/dev/null && break
done
cp .cache/data/*/meta.json "$UPCYCLE_LOGS/corpus_meta.json" 2>/dev/null
tar czf "$OUT/study_$part.tgz" --exclude='*.pt' --exclude='*.ckpt' --exclude='launch' --exclude='*.wandb' -C logs/study "$part"
ls -la "$OUT"; grep -c '"status": "complete"' $(find "$UPCYCLE_LOGS" -name results.json) 2>/dev/null | tail -n 40
