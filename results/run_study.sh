#!/usr/bin/env bash
# The study of results/README.md on one GPU, in two parts (each fits one ~30-minute H100 lease):
#   bash results/run_study.sh A    # dense base; routing, granularity (+ iso-FLOP dense), weight scaling
#   bash results/run_study.sh B    # dense base (same recipe); init (copy, virtual group, Drop-Upcycling),
#                                  # peak LR (+ iso-FLOP dense at the lowest), granularity G=1 vs G=4
#   bash results/run_study.sh C    # dense base (same recipe); 20M-token E8G1T2 copy vs Drop-Upcycling + iso dense
#   bash results/run_study.sh D    # dense base (same recipe); the budget ladder (5-60% of pretraining FLOPs), seed 0:
#                                  # topk_softmax, Megatron start, exact start, Drop-Upcycling
#   bash results/run_study.sh E    # dense base (same recipe); the ladder's seed 1; granularity at 15%
# Each part pretrains its own dense base from the one recipe (+scale=study method=pretrain) and compares
# runs only within the part. Sweeps run side by side (a 50M model leaves the GPU mostly idle
# between kernels). Outputs: $UPCYCLE_LOGS (default logs/study/<part>); then
#   python -m analysis.study results/runs --out results
set -uo pipefail
part=${1:?usage: run_study.sh A|B|C|D|E}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True UPCYCLE_LOGS=${UPCYCLE_LOGS:-logs/study/$part} UPCYCLE_CACHE=${UPCYCLE_CACHE:-.cache} PYTHONUNBUFFERED=1
mkdir -p "$UPCYCLE_LOGS"
# a small check of the driver itself (e.g. on a CPU): STUDY_SCALE=cpu, and STUDY_OVERRIDES appended to every job
S=(+scale=${STUDY_SCALE:-study} trainer.enable_progress_bar=false print_config=false)
read -r -a extra <<<"${STUDY_OVERRIDES:-}"
say() { echo "[$(date -u +%FT%TZ)] $*" | tee -a "$UPCYCLE_LOGS/driver.log"; }
job() {  # job TAG ARGS...: one run.py command, its output in TAG.out
  local tag=$1; shift
  set -- "$@" "${extra[@]}"
  say "start $tag: python run.py $*"
  if python run.py "$@" >"$UPCYCLE_LOGS/$tag.out" 2>&1; then say "done $tag"; else say "FAILED $tag (see $tag.out)"; fi
}
say "part $part on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), git $(git rev-parse --short HEAD 2>/dev/null)"
job pretrain "${S[@]}" method=pretrain name=study_pretrain
case $part in
  A)
    job routing -m "${S[@]}" +sweep=routing &
    # E8G1T2 of the granularity grid is the routing sweep's softmax_topk run (at G=1 virtual groups = copy)
    job granularity -m "${S[@]}" +sweep=granularity moe=E8G1T1,E32G4T4 &
    job granularity64 -m "${S[@]}" +sweep=granularity moe=E64G8T8 &
    job scaling -m "${S[@]}" +sweep=weight_scaling upcycle.weight_scaling=none iso_flop_baseline=false &
    wait ;;
  B)
    # six streams; micro-batches of 32 (2 accumulated per step of 64) keep each under ~12 GiB so all six fit
    M=(data.micro_batch_size=32)
    job lr_low -m "${S[@]}" "${M[@]}" +sweep=lr optim.lr=3e-4 &   # with its iso-FLOP dense continuation
    job lr -m "${S[@]}" "${M[@]}" +sweep=lr optim.lr=1e-3,3e-3 iso_flop_baseline=false &
    job init_copy -m "${S[@]}" "${M[@]}" +sweep=init init=copy iso_flop_baseline=false &
    job init_vg -m "${S[@]}" "${M[@]}" +sweep=init init=virtual_group iso_flop_baseline=false &
    job init_drop -m "${S[@]}" "${M[@]}" +sweep=init init=drop_upcycling iso_flop_baseline=false &
    # G=1 at the active FLOPs of E32G4T4 (init_vg's runs): the granularity pair on this base, 3 seeds
    job granularity -m "${S[@]}" "${M[@]}" +sweep=granularity moe=E8G1T1 iso_flop_baseline=false &
    wait ;;
  C)
    # longer continuation: E8G1T2 copy vs Drop-Upcycling at 20M tokens, LR 3e-4, with iso-FLOP dense (one stream
    # per run; a seed's copy and drop runs share one cached dense continuation)
    M=(data.micro_batch_size=32)
    for seed in 0 1; do for init in copy drop_upcycling; do
      job "long_${init}_s$seed" -m "${S[@]}" "${M[@]}" +sweep=long init=$init seed=$seed &
    done; done
    wait ;;
  D|E)
    # budget ladder, 5% to 60% of the base's pretraining FLOPs (WSD, shared trunks; each variant's budgets, each beside
    # its iso-FLOP and token-matched dense continuations, which the variants of one seed share): topk_softmax,
    # softmax_topk from Megatron's start (paper scaling, router std 0.02) and softmax_topk from the exact start (the
    # default), as +variant (sweeps/variant). One seed per part, so that a part fits one ~30-minute lease (base ~6 min,
    # ladder ~17 min): D runs seed 0 with Drop-Upcycling r=0.5 as a fourth variant; E runs seed 1, and beside it the
    # granularity trio at equal active FLOPs at 15% (with its own iso-FLOP dense), one after the other.
    # One sweep, Hydra's joblib launcher (hydra/launcher=parallel), one worker per variant: the variant varies fastest
    # in the job order, so the workers take the 5% rung of every variant first, then the 15% rungs, ... (a variant's
    # larger budget branches off the trunk its smaller one saved). Four or five processes of micro-batches of 32 fit
    # in 80 GB. (Part D ran on 2026-11-23 as one shell stream per variant; the jobs and their configs are the same.)
    M=(data.micro_batch_size=32 train.val_every=100)
    if [ "$part" = D ]; then
      job ladder_s0 -m "${S[@]}" "${M[@]}" +sweep=ladder seed=0 hydra/launcher=parallel hydra.launcher.n_jobs=4 \
        +variant=topk_softmax,megatron_start,exact_start,drop_upcycling
    else
      job ladder_s1 -m "${S[@]}" "${M[@]}" +sweep=ladder seed=1 hydra/launcher=parallel hydra.launcher.n_jobs=3 \
        +variant=topk_softmax,megatron_start,exact_start &
      job granularity15 -m "${S[@]}" "${M[@]}" +sweep=ladder moe=E8G1T1,E32G4T4,E64G8T8 init=virtual_group \
        train.pretrain_fraction=0.15 train.share_trunk=false token_matched_baseline=false seed=1 &
      wait
    fi ;;
  *) echo "part must be A, B, C, D or E" >&2; exit 2 ;;
esac
say "part $part finished"
