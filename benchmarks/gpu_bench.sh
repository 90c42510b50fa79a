#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md (one H100): the MoE layer, then full train steps.
#   bash benchmarks/gpu_bench.sh $OUT [part [presets]]   part: layer | step | large | accum | harness | all (= layer, step)
#   large (issue 22, target 2; an H200): large1b upcycled to E8G1T2 in every layer beside its dense parent, batch 8
#   accum (issue 28, target 3): the same at a 1B run's global batch of 32 x 2048, 4-8 micro-batches per AdamW step
# writes moe_layer.txt/json, moe_recipes.txt/json, train_step.jsonl and (harness) harness_overhead*.csv and
# harness_profiles_*.tgz under $OUT
set -u
out=${1:-bench_out}; part=${2:-all}; mkdir -p "$out"; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ $part == all || $part == layer ]]; then
  timeout 420 python3 benchmarks/moe_layer.py --profile --json "$out/moe_layer.json" 2>&1 | tee "$out/moe_layer.txt" | grep -v "^-\|^ \|^Self\|^Name\|^=" | tail -8
  # the modern recipes (sigmoid + expert bias, capacity, a shared expert) at E8G1T2's active FLOPs
  timeout 300 python3 benchmarks/moe_layer.py --recipes --json "$out/moe_recipes.json" 2>&1 | tee "$out/moe_recipes.txt" | tail -9
fi
ts() { timeout 150 python3 benchmarks/train_step.py --json "$out/train_step.jsonl" "$@" 2>>"$out/train_step.err" | tail -1 >/dev/null; }
if [[ $part == large ]]; then  # selective recompute instead of full: which fits, and at what MFU
  ts --model large1b --moe none --batch 8 --compile
  ts --model large1b --moe E8G1T2 --batch 8 --compile --ckpt mlp
  ts --model large1b --moe E8G1T2 --batch 8 --compile --ckpt selective
  ts --model large1b --moe E8G1T2 --batch 4 --compile --ckpt full
fi
if [[ $part == accum ]]; then  # a 1B run's global batch (32 x 2048 = 64k tokens): the clip + AdamW over 6.7B parameters once per 4-8 passes
  # --profile 2: two more steps under torch.profiler, where their device time went (expert GEMMs, other GEMMs,
  # attention, optimizer, compiled kernels: the MoE glue and the recompute)
  ts --model large1b --moe none --batch 8 --accum 4 --steps 6 --compile --profile 2
  ts --model large1b --moe E8G1T2 --batch 8 --accum 4 --steps 6 --compile --ckpt selective --profile 2
  ts --model large1b --moe E8G1T2 --batch 4 --accum 8 --steps 6 --compile --profile 2
fi
if [[ $part == all || $part == step || $part == large || $part == accum ]]; then
  if [[ $part != large && $part != accum ]]; then
  ts --model large1b --moe none --batch 4 --compile
  ts --model large1b --moe E8G1T2 --moe-layers every_4 --batch 4 --compile
  ts --model large1b --moe E8G1T2 --moe-layers every_4 --batch 4 --compile --ckpt
  ts --model medium350m --moe none --compile
  ts --model medium350m --moe E8G1T2 --compile
  fi
  python3 - "$out/train_step.jsonl" <<'PY'
import json, sys
print(f"{'model':11} {'moe':7} {'layers':8} {'comp':4} {'ckpt':4} {'batch':>5} {'accum':>5} {'total':>7} {'active':>7} {'tok/s':>8} {'MFU808':>6} {'MFU989':>6} {'GiB':>5} {'opt%':>5}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    opt = r.get("optimizer_share")
    print(f"{r['model']:11} {r['moe']:7} {r['moe_layers']:8} {str(r['compile'])[0]:4} {str(r['ckpt'] or '-')[:4]:4} {r['batch']:5} "
          f"{r.get('accum', 1):5} {r['params_total']/1e9:6.2f}B {r['params_active']/1e9:6.2f}B {r['tokens_per_s']:8.0f} "
          f"{r['mfu_808']:6.1%} {r['mfu_989']:6.1%} {r['peak_mem_gib']:5.1f} {'-' if opt is None else f'{opt:.1%}':>5}")
    if r.get("device_ms_by_kind"):  # the profiled steps: ms a step by what ran
        print("   profiled, ms a step:", ", ".join(f"{k} {v:.1f}" for k, v in r["device_ms_by_kind"].items()))
PY
fi
if [[ $part == harness ]]; then  # run.py jobs against the bare step, alone and six at once (~4 min per preset)
  presets=${3:-none,E8G1T2}         # a second call (machine still warm): E64G8T8; the base and corpus stay cached
  # the startup a job pays before its first stage: the harness's imports (cumulative us, largest first), CUDA's init
  python3 -X importtime -c "import harness.train" 2>"$out/importtime.txt"
  sort -t'|' -k2 -n -r "$out/importtime.txt" | head -12
  python3 -c "import time, torch; t = time.perf_counter(); torch.zeros(1, device='cuda'); print(f'CUDA init {time.perf_counter() - t:.2f} s')"
  # HARNESS_FLAGS: e.g. --launcher-workers 3 (the jobs as one run.py -m sweep through the joblib launcher),
  # --cprofile none (one more dense job under cProfile: where the fixed seconds go, by function)
  read -r -a flags <<<"${HARNESS_FLAGS:-}"
  timeout 540 python3 benchmarks/harness_overhead.py --moe "$presets" --out /tmp/harness_bench ${flags[@]+"${flags[@]}"} 2>&1 | tail -24
  tag=${presets//,/_}${HARNESS_FLAGS:+_launcher}
  for f in harness_overhead harness_overhead_seconds harness_overhead_jobs; do  # the figures, and where one job's seconds went
    cp /tmp/harness_bench/$f.csv "$out/${f}_$tag.csv" 2>/dev/null
  done
  # each lone job's profiled window (train.profile_steps: summary, figures, Chrome trace) and any cProfile tables
  (cd /tmp/harness_bench && tar czf "$out/harness_profiles_$tag.tgz" profile_* cprofile_*.txt 2>/dev/null)
fi
