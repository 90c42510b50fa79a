#!/usr/bin/env bash
# The study of results/README.md on one GPU, in parts (each fits one ~30-minute lease):
#   bash results/run_study.sh A    # dense base; routing, granularity (+ iso-FLOP dense), weight scaling
#   bash results/run_study.sh B    # dense base (same recipe); init (copy, virtual group, Drop-Upcycling),
#                                  # peak LR (+ iso-FLOP dense at the lowest), granularity G=1 vs G=4
#   bash results/run_study.sh C    # dense base (same recipe); 20M-token E8G1T2 copy vs Drop-Upcycling + iso dense
#   bash results/run_study.sh D    # dense base (same recipe); the budget ladder (5-60% of pretraining FLOPs), seed 0:
#                                  # topk_softmax, Megatron start, exact start, Drop-Upcycling
#   bash results/run_study.sh E    # dense base (same recipe); the ladder's seed 1; granularity at 15%
#   bash results/run_study.sh F    # the ladder of D at seeds $LADDER_SEEDS (default 0 1 2, one after the other) on
#                                  # data.source=machine: every text file of the machine (620 MB on the H200 image,
#                                  # 2.5x the parts' 250 MB Python corpus), so
#                                  # pretraining plus the 60% rung read the corpus about once; its own dense base
#   bash results/run_study.sh G    # on F's corpus and recipe: granularity at the ladder's largest budget (60%), seeds
#                                  # $GRAN_SEEDS (default 0 1 2): E8G1T1 (+ iso-FLOP dense), E32G4T4, E64G8T8
#   bash results/run_study.sh L    # when to upcycle (issue 31): bases at 25/50/100% of one WSD pretraining x the
#                                  # ladder's budgets x seeds ($SUNK_SEEDS), topk_softmax; then analysis.law
# Each part pretrains its own dense base from the one recipe (+scale=study method=pretrain) and compares
# runs only within the part. Sweeps run side by side (a 50M model leaves the GPU mostly idle
# between kernels). Outputs: $UPCYCLE_LOGS (default logs/study/<part>); then
#   python -m analysis.study results/runs --out results
set -uo pipefail
part=${1:?usage: run_study.sh A|B|C|D|E|F|G|L}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True UPCYCLE_LOGS=${UPCYCLE_LOGS:-logs/study/$part} UPCYCLE_CACHE=${UPCYCLE_CACHE:-.cache} PYTHONUNBUFFERED=1
case $part in A|B|C|D|E|F|G|L) ;; *) echo "run_study.sh: part must be A, B, C, D, E, F, G or L (got $part)" >&2; exit 2 ;; esac
mkdir -p "$UPCYCLE_LOGS"
# a small check of the driver itself (e.g. on a CPU): STUDY_SCALE=cpu, and STUDY_OVERRIDES appended to every job
S=(+scale=${STUDY_SCALE:-study} trainer.enable_progress_bar=false print_config=false)
read -r -a extra <<<"${STUDY_OVERRIDES:-}"
# parts F, G and L's corpus: the machine's text up to CORPUS_BYTES (1 GB: ~230M tokens, more than pretraining's 120M plus the
# 60% rung's 72M dense tokens); its census (bytes by kind, before that cap) goes to corpus_census.json
case $part in F|G|L) S+=(data.source=machine "data.max_bytes=${CORPUS_BYTES:-1000000000}") ;; esac
say() { echo "[$(date -u +%FT%TZ)] $*" | tee -a "$UPCYCLE_LOGS/driver.log"; }
job() {  # job TAG ARGS...: one run.py command, its output in TAG.out
  local tag=$1; shift
  set -- "$@" "${extra[@]}"
  say "start $tag: python run.py $*"
  if python run.py "$@" >"$UPCYCLE_LOGS/$tag.out" 2>&1; then say "done $tag"; else say "FAILED $tag (see $tag.out)"; fi
}
say "part $part on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), git $(git rev-parse --short HEAD 2>/dev/null)"
if [ "$part" = L ]; then
  # the grid's bases are shares of one WSD pretraining (the same model, corpus and budget as the other parts' cosine
  # base): the trunk once, each D1 branching off it in ascending order, before the cells look them up in parallel
  d1=${SUNK_D1:-0.25 0.5 1.0}
  job pretrain -m "${S[@]}" +sweep=sunk_cost method=pretrain seed=0 train.pretrain_fraction=0.05 \
    "pretrain.fraction=${d1// /,}"
else
  job pretrain "${S[@]}" method=pretrain name=study_pretrain
fi
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
  F)
    # part D's ladder (the same four variants, budgets, dense twins and micro-batches) on the machine corpus, seed by
    # seed so that a lease cut short leaves whole seeds; each seed one sweep of four workers, one per variant
    # (LADDER_SEEDS, LADDER_VARIANTS, LADDER_BUDGETS: a smaller ladder for a check of the driver)
    python - "$UPCYCLE_LOGS/corpus_census.json" <<'PY' || say "corpus census FAILED"
import collections, json, sys
from harness.data import _machine_files
by = collections.Counter()
for f in _machine_files():
    by[f.suffix] += f.stat().st_size
json.dump({"bytes_by_suffix": dict(by.most_common()), "bytes": sum(by.values()), "note": "before dedup and data.max_bytes"},
          open(sys.argv[1], "w"), indent=1)
PY
    M=(data.micro_batch_size=32 train.val_every=100)
    for seed in ${LADDER_SEEDS:-0 1 2}; do
      job "ladder_s$seed" -m "${S[@]}" "${M[@]}" +sweep=ladder seed=$seed hydra/launcher=parallel hydra.launcher.n_jobs=4 \
        "+variant=${LADDER_VARIANTS:-topk_softmax,megatron_start,exact_start,drop_upcycling}" \
        ${LADDER_BUDGETS:+train.pretrain_fraction=$LADDER_BUDGETS}
    done ;;
  G)
    # granularity at equal active FLOPs (T/G = 1 dense MLP; virtual-group init, exact start) at the ladder's largest
    # budget, with part F's recipe (WSD, LR 3e-4) on its corpus: seed after seed, each seed three processes. E8G1T1
    # runs beside its iso-FLOP dense twin; E32G4T4 and E64G8T8 pair with E8G1T1 by seed (their own twins would
    # differ from its by the router's FLOPs only). Per seed 3 x 0.6 P of MoE + 0.6 P of dense (P: the base's
    # pretraining FLOPs): ~10 min of an H200 at part F's pace.
    M=(data.micro_batch_size=32 train.val_every=100 +sweep=ladder train.share_trunk=false token_matched_baseline=false)
    for seed in ${GRAN_SEEDS:-0 1 2}; do
      job "granularity_g1_s$seed" -m "${S[@]}" "${M[@]}" seed=$seed moe=E8G1T1 "train.pretrain_fraction=${GRAN_BUDGET:-0.6}" &
      job "granularity_s$seed" -m "${S[@]}" "${M[@]}" seed=$seed moe=E32G4T4,E64G8T8 iso_flop_baseline=false \
        "train.pretrain_fraction=${GRAN_BUDGET:-0.6}" hydra/launcher=parallel hydra.launcher.n_jobs=2 &
      wait
    done ;;
  L)
    # The sunk-cost grid (sweeps/sweep/sunk_cost.yaml): D1 = 25%, 50%, 100% of the WSD pretraining x D2 = 5%, 15%,
    # 30%, 60% of its FLOPs x $SUNK_SEEDS, with the ladder's best recipe (part D: topk_softmax, the only variant below
    # the best dense model of no more FLOPs at 60%), each cell beside its iso-FLOP dense twin and the dense model
    # from scratch of the same total FLOPs. One stream per (D1, seed), each its budgets ascending off one MoE trunk.
    # Device time, from part D (results/README.md; 1 H100, 4 streams): the base took 5.4 min for P = 3.6e16 FLOPs
    # (120M tokens x 3.02e8); the ladder's 3.9 P (4 variants x 0.70 P of MoE, the WSD trunk to 48% plus 4 decays,
    # and one seed's dense twins) took 19.3 min, 1.2e14 FLOP/s all told (2.0e14 while training at 60%). Here: the
    # bases 1.15 P (trunk to 80% and 3 decays) ~6 min; per (D1, seed) 0.70 P of MoE and 0.70 P of iso dense twins;
    # the from-scratch models (7 cells at D1 = 25%, 50%; the others pass 100%) ~1.2 P of decays and trunk. Two
    # seeds: 9.6 P = 3.5e17 FLOPs, 29-48 min after the bases, ~35-55 min in all: more than one 30-minute lease.
    # One seed (SUNK_SEEDS=0, then SUNK_SEEDS=1 on the next lease, each into its own folder): 5.4 P, 16-27 min,
    # ~23-33 min in all; the seeds then sit on two bases (the other parts' bases differ by up to 0.007), which the
    # law's seed bootstrap counts as seed noise. Six streams of micro-batches of 32 (~13 GiB each) fit an H200.
    # (SUNK_D1, SUNK_BUDGETS: a smaller grid for a check of the driver, e.g. SUNK_D1="0.5 1.0" SUNK_BUDGETS=0.05,0.15)
    M=(data.micro_batch_size=32 train.val_every=100)
    for f in ${SUNK_D1:-0.25 0.5 1.0}; do for seed in ${SUNK_SEEDS:-0 1}; do
      job "sunk_f${f}_s$seed" -m "${S[@]}" "${M[@]}" +sweep=sunk_cost +variant=topk_softmax \
        pretrain.fraction=$f seed=$seed ${SUNK_BUDGETS:+train.pretrain_fraction=$SUNK_BUDGETS} &
    done; done
    wait
    say "start law: python -m analysis.law $UPCYCLE_LOGS/multirun/sweep_sunk_cost --out $UPCYCLE_LOGS/law"
    if python -m analysis.law "$UPCYCLE_LOGS/multirun/sweep_sunk_cost" --out "$UPCYCLE_LOGS/law" \
      >"$UPCYCLE_LOGS/law.out" 2>&1; then say "done law"; else say "FAILED law (see law.out)"; fi ;;
  *) echo "part must be A, B, C, D, E, F, G or L" >&2; exit 2 ;;
esac
say "part $part finished"
