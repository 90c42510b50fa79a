#!/usr/bin/env bash
# The SmolLM2-135M leg (issue 20, part 3) on one GPU; results/smollm2/lease.sh starts it on the device (as part S
# of results/lease.sh) once the GGUF and the corpus are there:
#   SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf bash results/smollm2/run_leg.sh S
# 1. +sweep=smollm2 for each routing (softmax_topk, topk_softmax), two parallel streams: E8G1T2 at two budgets,
#    each beside its iso-FLOP and token-matched dense continuations (the streams share them through the cache);
# 2. the table of step-0, final and best validation losses (smollm2.md; the curves are in each results.json);
# 3. the best MoE that kept its checkpoint, exported with harness.export (to .cache/smollm2/export: 2.8 GB of
#    fp32 weights stay out of the packed outputs) and checked with analysis.hf_check (hf_check.json).
# For the tiny CPU check in results/README.md: SMOLLM2_OVERRIDES, extra run.py overrides (last); SMOLLM2_BUDGETS,
# "SMALL LARGE" train.tokens (SMALL a comma list); SMOLLM2_SERIAL=1, one stream after the other; SMOLLM2_KEEP,
# the routings whose large budget keeps last.ckpt at the first seed (space-separated; default topk_softmax);
# SMOLLM2_SEEDS, the seeds (default "0"), one after the other: every budget of a seed, the table (after the first
# seed also the export), then the next seed, so a lease cut short still holds whole seeds. Downstream scores:
# SMOLLM2_OVERRIDES=eval=local (each run's eval stage scores the MoE, its parent and its iso-FLOP twin).
# SMOLLM2_QUEUE, instead of the seed loop: "RECIPE:SEED:TOKENS ..." jobs, one budget each, SMOLLM2_PARALLEL of
# them at once (default 4), in the order given (so a lease cut short holds the first ones); no export. RECIPE:
# softmax_topk | topk_softmax (E8G1T2) | shared (E16G2T3S1, topk_softmax: E8G1T2's active FLOPs with one shared
# expert of width d_ff/2) | sigmoid_bias (E8G1T2, sigmoid_topk + expert_bias). A single budget gains nothing from
# a shared trunk, so these jobs run without one (train.share_trunk=false): no 8.3 GB trunk checkpoint per job,
# and 4 MoE jobs fit the disk (4 x 2.8 GB weights.pt for the eval stage, ~10 GB dense, ~3 GB inputs).
set -uo pipefail
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True UPCYCLE_LOGS=${UPCYCLE_LOGS:-logs/study/S} UPCYCLE_CACHE=${UPCYCLE_CACHE:-.cache} PYTHONUNBUFFERED=1
mkdir -p "$UPCYCLE_LOGS" && touch "$UPCYCLE_LOGS/.started"
read -r -a extra <<<"${SMOLLM2_OVERRIDES:-}"
S=(+sweep=smollm2 trainer.enable_progress_bar=false print_config=false)
say() { echo "[$(date -u +%FT%TZ)] $*" | tee -a "$UPCYCLE_LOGS/driver.log"; }
job() {  # job TAG ARGS...: one run.py command, its output in TAG.out (as in results/run_study.sh)
  local tag=$1; shift
  say "start $tag: python run.py $*"
  if python run.py "$@" >"$UPCYCLE_LOGS/$tag.out" 2>&1; then say "done $tag"; else say "FAILED $tag (see $tag.out)"; fi
}
say "part S (SmolLM2-135M) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), git $(git rev-parse --short HEAD 2>/dev/null)"
# Lightning writes last.ckpt at the end of every run that saves checkpoints: 8.3 GB per E8G1T2 run with Adam. At
# the end of its 768-step run a routing also holds its trunk at step 614 and, hard-linked until the run ends, the
# step-204 trunk it branched from. Three such per routing, beside the dense trunks, come too close to the 64 GB
# disk; so each routing runs its small budget without checkpoints, then its large one with a checkpoint only for
# the routings in SMOLLM2_KEEP (default topk_softmax: the export, as MixtralForCausalLM). Both budgets of a routing
# still share its trunk. Its trunk checkpoints are removed once both streams are done (the export needs none).
read -r small large <<<"${SMOLLM2_BUDGETS:-4194304 12582912}"
keep=" ${SMOLLM2_KEEP:-topk_softmax} "
read -r -a seeds <<<"${SMOLLM2_SEEDS:-0}"
stream() {  # stream ROUTING SEED FIRST: the small budgets, then the large one, of one routing at one seed
  local save=false tag="$1_s$2"
  [ "$3" = true ] && [[ "$keep" == *" $1 "* ]] && save=true
  job "smollm2_$tag" -m "${S[@]}" routing="$1" seed="$2" train.tokens="$small" train.save_checkpoints=false "${extra[@]}"
  drop_weights "$1" "$2"
  job "smollm2_${tag}_large" -m "${S[@]}" routing="$1" seed="$2" train.tokens="$large" \
    train.save_checkpoints=$save "${extra[@]}"
  drop_weights "$1" "$2"
}
drop_weights() {  # drop_weights ROUTING SEED: with eval.tasks a run without last.ckpt keeps weights.pt (2.8 GB
  # per MoE) for its eval stage, which has scored it once run.py returns; the dense twins' (0.5 GB, in the cache,
  # shared by both streams) stay
  find "$UPCYCLE_LOGS/multirun" -path "*routing=$1,seed=$2,*" -name weights.pt -delete 2>/dev/null
}
export_best() {  # the best MoE that kept its checkpoint, exported and checked in transformers
  local export_dir=$UPCYCLE_CACHE/smollm2/export best
  if best=$(python -m analysis.smollm2 best "$UPCYCLE_LOGS"); then
    say "export $best -> $export_dir"
    rm -rf "$export_dir"
    if python -m harness.export "$best" "$export_dir" >"$UPCYCLE_LOGS/export.out" 2>&1; then
      cp "$export_dir/config.json" "$UPCYCLE_LOGS/export_config.json"
      if python -m analysis.hf_check "$best" "$export_dir" --out "$UPCYCLE_LOGS/hf_check.json" \
        >"$UPCYCLE_LOGS/hf_check.out" 2>&1
      then say "hf_check passed: $(grep -h _val_loss "$UPCYCLE_LOGS/hf_check.json" | tr -d ' \n')"
      else say "hf_check FAILED (see hf_check.out)"; fi
    else say "export FAILED (see export.out)"; fi
  else say "no MoE run kept a checkpoint: nothing to export"; fi
}
recipe() {  # recipe NAME: the run.py overrides of a named recipe
  case $1 in
    softmax_topk | topk_softmax) echo "routing=$1" ;;
    shared) echo "routing=topk_softmax moe=E16G2T3S1" ;;
    sigmoid_bias) echo "routing=sigmoid_topk moe.load_balancing=expert_bias" ;;
    *) return 1 ;;
  esac
}
queued() {  # queued RECIPE SEED TOKENS: one job; then its runs' weights.pt go (their eval stage has scored them)
  local tag="smollm2_$1_s$2_$3" args
  read -r -a args <<<"$(recipe "$1")"
  job "$tag" -m "${S[@]}" "${args[@]}" seed="$2" train.tokens="$3" train.share_trunk=false \
    train.save_checkpoints=false "${extra[@]}"
  grep -ho "^results: .*/results.json" "$UPCYCLE_LOGS/$tag.out" | sed 's|^results: ||; s|/results.json$||' |
    while read -r dir; do rm -f "$dir/weights.pt"; done
}
if [ -n "${SMOLLM2_QUEUE:-}" ]; then
  read -r -a queue <<<"$SMOLLM2_QUEUE"
  for entry in "${queue[@]}"; do  # every entry checked before any compute
    IFS=: read -r name seed tokens <<<"$entry"
    recipe "$name" >/dev/null && [[ "$seed" =~ ^[0-9]+$ && "$tokens" =~ ^[0-9]+$ ]] || {
      say "SMOLLM2_QUEUE entry '$entry' is not RECIPE:SEED:TOKENS with RECIPE one of softmax_topk, topk_softmax, shared, sigmoid_bias"
      exit 2
    }
  done
  parallel=${SMOLLM2_PARALLEL:-4}
  say "queue of ${#queue[@]} jobs, $parallel at once: ${queue[*]}"
  for entry in "${queue[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n; done
    IFS=: read -r name seed tokens <<<"$entry"
    queued "$name" "$seed" "$tokens" &
  done
  wait
  python -m analysis.smollm2 table "$UPCYCLE_LOGS" | tee "$UPCYCLE_LOGS/smollm2.md"
  say "part S finished"
  exit 0
fi
first=true
for seed in "${seeds[@]}"; do
  say "seed $seed"
  for routing in softmax_topk topk_softmax; do
    stream "$routing" "$seed" "$first" &
    [ "${SMOLLM2_SERIAL:-0}" = 1 ] && wait
  done
  wait
  # this seed's trunk checkpoints (~17 GB for the MoEs): room for the export and the next seed
  find "$UPCYCLE_CACHE/trunks" -name "step_*.ckpt" -newer "$UPCYCLE_LOGS/.started" -delete 2>/dev/null
  python -m analysis.smollm2 table "$UPCYCLE_LOGS" | tee "$UPCYCLE_LOGS/smollm2.md"
  $first && export_best
  first=false
done
say "part S finished"
