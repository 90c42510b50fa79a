#!/usr/bin/env bash
# Issue 6 on 2 GPUs (nvidia-h200-x2): correctness of DDP/FSDP against one GPU through run.py (the
# tiny default config, same global batch), the DDP multirun, an FSDP run killed with SIGKILL and
# resumed, then 1-GPU vs DDP vs FSDP throughput of the ~350M upcycled E8G1T2.
#   bash benchmarks/distributed_gpu.sh $OUT [part]     part: correctness | speed | big | all (default)
set -u
out=${1:-bench_out}; part=${2:-all}; mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NCCL_NVLS_ENABLE=0 WANDB_MODE=offline WANDB_SILENT=true
export UPCYCLE_CACHE=${UPCYCLE_CACHE:-$PWD/.cache_gpu} UPCYCLE_LOGS=$out/logs
common=(trainer.enable_progress_bar=false print_config=false iso_flop_baseline=false train.ckpt_every=10)
runpy() { timeout 300 python3 run.py "$@" "${common[@]}" >>"$out/run.log" 2>&1 || echo "FAILED: $*" | tee -a "$out/run.log"; }
if [[ $part == ddp_multirun ]]; then
  runpy -m name=ddp routing=softmax_topk,topk_softmax trainer=ddp logger=wandb
  find "$UPCYCLE_LOGS" -name results.json | sort | while read -r f; do python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].split('logs/')[-1], r['routing'], r['world_size'], r['steps'], r['status'], round(r['val_loss'],4), r['config']['moe']['routing'])" "$f"; done
fi
if [[ $part == all || $part == correctness ]]; then
  runpy name=one trainer=gpu
  runpy name=one_seed1 trainer=gpu seed=1
  runpy -m name=ddp routing=softmax_topk,topk_softmax trainer=ddp logger=wandb   # the issue's command
  runpy name=fsdp trainer=fsdp
  # FSDP killed with SIGKILL after its first checkpoint, then the same command again
  setsid python3 run.py "${common[@]}" name=fsdp_killed trainer=fsdp >>"$out/killed.log" 2>&1 &
  pid=$!; ck=$UPCYCLE_LOGS/runs/fsdp_killed/checkpoints/last.ckpt
  for _ in $(seq 1 1200); do [[ -e $ck ]] && break; sleep 0.1; done
  kill -9 -- -$pid; wait $pid 2>/dev/null; echo "killed with $(ls $ck 2>/dev/null) present" | tee -a "$out/killed.log"
  runpy name=fsdp_killed trainer=fsdp
  grep -h "Restoring states\|resuming" "$out/run.log" | tail -2
  python3 - "$UPCYCLE_LOGS" <<'PY'
import json, sys, pathlib
root = pathlib.Path(sys.argv[1])
print(f"{'run':40} {'world':>5} {'steps':>5} {'status':9} {'val_loss':>8}")
for f in sorted(root.glob("**/results.json")):
    r = json.loads(f.read_text())
    print(f"{str(f.parent.relative_to(root)):40} {r.get('world_size', '-'):>5} {r.get('steps', '-'):>5} "
          f"{r['status']:9} {r.get('val_loss', float('nan')):8.4f}")
PY
fi
if [[ $part == all || $part == speed ]]; then
  # same experiment (global batch 32) and same micro-batch (16 x 2048 tokens): 1 GPU accumulates 2 micro-batches
  # SPEED_TRAINERS: trainer configs with optional overrides, e.g. "gpu ddp ddp,trainer.strategy.comm_hook=bf16"
  timeout ${SPEED_TIMEOUT:-400} python3 benchmarks/distributed.py --model medium350m --moe E8G1T2 --trainers ${SPEED_TRAINERS:-gpu ddp} \
    --devices 2 --batch ${SPEED_BATCH:-32} --micro 16 --steps ${SPEED_STEPS:-16} --warmup ${SPEED_WARMUP:-6} --out "$out/bench" --json "$out/speed.jsonl" \
    2>>"$out/speed.err" | tail -6
fi
if [[ $part == big ]]; then
  # medium350m upcycled to E24 (7.3B params), micro-batch 16 x 2048: DDP's 16 B/param (109 GiB of weights, grads and
  # AdamW state) plus ~55 GiB of activations exceed one H200; FSDP holds half the state per GPU
  timeout ${BIG_TIMEOUT:-560} python3 benchmarks/distributed.py --model medium350m --moe E8G1T2 --num-experts 24 --trainers fsdp ddp \
    --devices 2 --batch 32 --micro 16 --steps 6 --warmup 3 --compile false --out "$out/big" --json "$out/big.jsonl" \
    2>>"$out/big.err" | tail -4
fi
