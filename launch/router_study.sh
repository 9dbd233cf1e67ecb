#!/usr/bin/env bash
# Routers initialised from the experts' domains against random ones, and expert surgery, on
# `make demo`'s seed and experts (DEMO, default runs/demo), into OUT (default runs/router_study):
#   1. BTX and BAM upcycled with random routers (router seeds 0, 1), the same rescaled to the
#      domain routers' norm, and domain routers (seed and layerwise inputs), each evaluated
#      before any mix training;
#   2. each mixed for 150 steps (validation every 15), two data orders each;
#   3. a fifth domain (man pages, which no built-in corpus reads) branched from the seed, added to
#      the domain-initialised BTX mix and its routers trained alone on 5% of the mix's tokens,
#      against a full upcycle and mix of all five; and the law expert removed;
#   4. the tables: python -m bam_jax.benchmarks.router_study OUT
# About 40 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
D="${DEMO:-runs/demo}" R="${OUT:-runs/router_study}" B=.venv/bin/bam-jax
mkdir -p "$R"
EXPERTS=$D/code,$D/law,$D/math
COMMON="--gin_file=gin/models/tiny.gin --gin.BATCH_SIZE=16 --gin.SEQ_LEN=128"
for method in btx bam; do
  for seed in 0 1; do
    $B upcycle --method=$method --seed=$D/seed --experts=$EXPERTS --out=$R/${method}_random_s${seed}_init --router_seed=$seed --overwrite
    $B upcycle --method=$method --seed=$D/seed --experts=$EXPERTS --out=$R/${method}_domain_s${seed}_init --router_init=domain --router_seed=$seed --overwrite
  done
  $B upcycle --method=$method --seed=$D/seed --experts=$EXPERTS --out=$R/${method}_layerwise_s0_init --router_init=domain --router_inputs=layerwise --overwrite
  cp -r $R/${method}_layerwise_s0_init $R/${method}_layerwise_s1_init
done
.venv/bin/python -m bam_jax.benchmarks.router_study "$R" --rescale  # random rows at the domain rows' scale
for init in "$R"/*_init; do
  $B eval --workdir="$init" --gin.TrainConfig.seq_len=128 --gin.DataConfig.eval_batches=8 --json > "$init.eval.json"
done
for method in btx bam; do
  gin=$([[ $method == btx ]] && echo mix_btx_top1 || echo mix_bam)
  for init in random scaled domain layerwise; do
    for seed in 0 1; do
      name=${method}_${init}_s${seed}
      [[ -f $R/$name/budget.json ]] && continue
      $B train --gin_file="$R/${name}_init/model.gin" --gin_file="gin/$gin.gin" $COMMON --gin.TRAIN_STEPS=150 \
        --gin.TrainConfig.warmup_steps=20 --gin.TrainConfig.eval_every=15 --gin.DataConfig.eval_batches=4 \
        --gin.TrainConfig.seed=$seed --workdir="$R/$name" > "$R/$name.log" 2>&1
    done
  done
done
G=$R/manpages.gin
cat > $G <<'GIN'
DataConfig.user_domains = [@manpages/text_domain()]
manpages/text_domain.name = 'manpages'
manpages/text_domain.paths = ['/usr/share/man/man5/*.gz', '/usr/share/man/man8/*.gz']
DataConfig.eval_domains = ['general', 'code', 'law', 'math', 'manpages']
GIN
FIFTH="$COMMON --gin.TrainConfig.eval_every=100000 --gin.DataConfig.eval_batches=8"
EVAL="--gin.TrainConfig.seq_len=128 --gin.DataConfig.eval_batches=8 --gin.DataConfig.user_domains=[@manpages/text_domain()] --gin.manpages/text_domain.name='manpages' --gin.manpages/text_domain.paths=['/usr/share/man/man5/*.gz','/usr/share/man/man8/*.gz'] --gin.DataConfig.eval_domains=['general','code','law','math','manpages']"
[[ -f $R/manpages/budget.json ]] || $B train $FIFTH --gin_file=gin/branch.gin --gin_file=$G --gin.DOMAIN="'manpages'" \
  --gin.INIT_CHECKPOINT="'$D/seed'" --gin.TRAIN_STEPS=150 --gin.TrainConfig.warmup_steps=20 --workdir=$R/manpages > $R/manpages.log 2>&1
# the full upcycle and mix of all five
$B upcycle --method=btx --seed=$D/seed --experts=$D/code,$D/law,$D/math,$R/manpages --out=$R/btx5_init --router_init=domain --overwrite
[[ -f $R/btx5/budget.json ]] || $B train --gin_file=$R/btx5_init/model.gin --gin_file=gin/mix_btx_top1.gin --gin_file=$G $FIFTH \
  --gin.TRAIN_STEPS=150 --gin.TrainConfig.warmup_steps=20 --gin.DataConfig.source="'general,code,law,math,manpages'" --workdir=$R/btx5 > $R/btx5.log 2>&1
# surgery on the four-expert mix: add the fifth, then train the routers on 5% of the mix's tokens (7 of 150 steps)
$B experts add --workdir=$R/btx_domain_s0 --run=$R/manpages --out=$R/add5 --overwrite
rm -rf $R/add5_router
$B train --gin_file=$R/add5/model.gin --gin_file=gin/mix_router_only.gin --gin_file=$G $FIFTH --gin.TRAIN_STEPS=7 \
  --gin.TrainConfig.warmup_steps=1 --gin.DataConfig.source="'general,code,law,math,manpages'" --workdir=$R/add5_router > $R/add5_router.log 2>&1
$B experts remove --workdir=$R/btx_domain_s0 --expert=law --out=$R/remove_law --overwrite
for run in btx_domain_s0 add5 add5_router btx5 remove_law; do
  $B eval --workdir=$R/$run $EVAL --json > $R/$run.eval5.json
done
rm -rf "$R/seed" && cp -r "$D/seed" "$R/seed"  # evaluated from a copy: eval writes into the run it reads
$B eval --workdir=$R/seed $EVAL --json > $R/seed.eval5.json
.venv/bin/python -m bam_jax.benchmarks.router_study "$R"
