#!/usr/bin/env bash
# The exact commands behind docs/results.md (resumable: rerunning skips finished runs).
# About 4 hours on 2 CPU cores in all (measured: tuning 6 min, mfeat/AV-Digits 18 min, AVD-hard 20 min, step 5 about 2 hours, step 6 about 1 hour). Run from the repository root with the venv active.
# AMSS+'s weights: the tables in docs/ were trained while AMSS+'s default was the floored setting
# (score floor 0.1, cap 100), so their `amss_plus` row is that setting and their `amss_plus_former` row is
# cap 10 without a floor, today's default. The variant below is now the floored setting
# (`amss_plus_floored`): rerunning gives the same two settings under today's labels.
set -euo pipefail
ALL=none,ogm,ogm_ge,agm,pmr,mmpareto,gblending,mslr,mla,amss,amss_plus,uniform_mask
JOBS=${JOBS:-2}
FLOORED="amss_plus_floored:balancer.name=amss_plus,balancer.options.score_floor=0.1,balancer.options.max_weight=100"

# 1. Tuning on validation only (3 seeds): temperature x learning rate for the AMSS family and joint training.
python benchmarks/tune_on_val.py avdigits_hard --balancers none,amss,amss_plus,uniform_mask \
  --grid balancer.options.temperature=0.05,0.2,1.0 --grid optim.lr=0.01,0.02 --seeds 3 --out runs/tune_avdh --jobs "$JOBS"

# 2. AVD-hard, 10 seeds, every balancer, the official AMSS settings and the val-tuned ones (best of step 1
#    per method), MMPareto with its former shared head, and AMSS+ with its former weights (no score floor,
#    cap 10).
equimodal compare avdigits_hard --balancers "$ALL" --seeds 10 --out runs/avdh --jobs "$JOBS" \
  --variant "amss_T1_lr0.02:balancer.name=amss,balancer.options.temperature=1.0,optim.lr=0.02" \
  --variant "amss_plus_T0.05_lr0.02:balancer.name=amss_plus,balancer.options.temperature=0.05,optim.lr=0.02" \
  --variant "uniform_mask_T0.05_lr0.02:balancer.name=uniform_mask,balancer.options.temperature=0.05,optim.lr=0.02" \
  --variant "none_lr0.02:balancer.name=none,optim.lr=0.02" \
  --variant "mmpareto_shared:balancer.name=mmpareto,balancer.options.heads=shared" \
  --variant "$FLOORED"

# 3. mfeat (three view sets) and AV-Digits, 5 seeds, every balancer with its defaults.
equimodal compare --dataset mfeat --balancers "$ALL" --seeds 5 --out runs/mfeat_pixfou --jobs "$JOBS"
equimodal compare --dataset mfeat --set data.options.views=fac,mor --balancers "$ALL" --seeds 5 --out runs/mfeat_facmor --jobs "$JOBS"
equimodal compare --dataset avdigits --balancers "$ALL" --seeds 5 --out runs/avdigits --jobs "$JOBS"
equimodal compare --dataset mfeat --set data.options.views=all --balancers "$ALL" --seeds 5 --out runs/mfeat_all --jobs "$JOBS"

# 4. The official AMSS+ weights and the floored ones against the default (docs/amss.md), and the logged
#    AMSS and MMPareto statistics quoted in docs/results.md.
equimodal compare --dataset mfeat --set data.options.views=fac,mor --balancers amss_plus --no-references \
  --variant "amss_plus_code:balancer.name=amss_plus,balancer.options.reweight=code,train.on_nonfinite=skip" \
  --variant "$FLOORED" --seeds 3 --out runs/code_weights --jobs "$JOBS"
python benchmarks/balancer_stats.py runs/code_weights amss_plus amss_plus_code amss_plus_floored --keys mean_weight/,grad_norm_ratio/,nonfinite
for run in avdh mfeat_pixfou mfeat_facmor avdigits mfeat_all; do
  python benchmarks/balancer_stats.py "runs/$run" amss amss_plus uniform_mask --keys k/,kept_grad_norm/,fallback
  python benchmarks/balancer_stats.py "runs/$run" mmpareto --keys conflict/
done
python benchmarks/balancer_stats.py runs/avdh mmpareto_shared --keys conflict/

# 5. The methods added last, with joint training, the multitask baseline and AMSS+ (both weight settings):
#    10 seeds on four tasks (about 2 hours on 2 cores). umt's
#    teachers are each comparison's unimodal runs of the same seed (compare trains them first). Mechanism
#    figures: balancer_stats.py with each method's keys (docs/results.md).
NEW=none,multitask,dgl,inforeg,lfm,opm,ogm_plus,mmcosine,cml,mbsd,cggm,amco,ume,umt,amss_plus
equimodal compare avdigits_hard --balancers "$NEW" --seeds 10 --out runs/new_avdh --jobs "$JOBS" --variant "$FLOORED"
equimodal compare avdigits_hard --set data.options.audio_noise=0.5 --balancers "$NEW" --seeds 10 \
  --out runs/new_cremadlike --jobs "$JOBS" --variant "$FLOORED"
equimodal compare --dataset mfeat --balancers "$NEW" --seeds 10 --out runs/new_mfeat_pixfou --jobs "$JOBS" --variant "$FLOORED"
equimodal compare --dataset mfeat --set data.options.views=fac,mor --balancers "$NEW" --seeds 10 \
  --out runs/new_mfeat_facmor --jobs "$JOBS" --variant "$FLOORED"
for run in new_avdh new_cremadlike new_mfeat_pixfou new_mfeat_facmor; do
  python benchmarks/paired_table.py "runs/$run" \
    --labels multitask,dgl,inforeg,lfm,opm,ogm_plus,mmcosine,cml,mbsd,cggm,amco,ume,umt,amss_plus,amss_plus_floored
  python benchmarks/balancer_stats.py "runs/$run" amco opm dgl cggm inforeg lfm mbsd cml ogm_plus umt
done
# AMSS+'s default weights, chosen on validation across the four tasks (docs/amss.md):
python benchmarks/paired_table.py --across runs/new_avdh runs/new_cremadlike runs/new_mfeat_pixfou runs/new_mfeat_facmor \
  --labels amss_plus_floored --reference amss_plus

# 6. The epoch- and data-level methods (docs/results.md), with joint training and the multitask baseline,
#    10 seeds on AVD-hard and mfeat pix+fou, each with its authors' defaults (AUG told the run's length for its
#    int(E/10) check interval); greedy needs mid fusion, so it is compared with joint training on the same
#    MMTM model (none_mmtm). Mechanism figures: balancer_stats.py; the cost of an active epoch, side by side:
#    epoch_cost.py (about 10 minutes).
EPOCH_LEVEL=none,multitask,reconboost,sample_valuation,modality_valuation,relearning,remix
MMTM_AVDH="model.fusion=mmtm,model.fusion_options.gates=[2,3]"
equimodal compare avdigits_hard --balancers "$EPOCH_LEVEL" --seeds 10 --out runs/i23_avdh --jobs "$JOBS" \
  --variant "aug:balancer.name=aug,balancer.options.epochs=60" \
  --variant "greedy:balancer.name=greedy,$MMTM_AVDH" --variant "none_mmtm:balancer.name=none,$MMTM_AVDH"
equimodal compare --dataset mfeat --balancers "$EPOCH_LEVEL" --seeds 10 --out runs/i23_mfeat_pixfou --jobs "$JOBS" \
  --variant "aug:balancer.name=aug,balancer.options.epochs=40" \
  --variant "greedy:balancer.name=greedy,model.fusion=mmtm,model.fusion_options.gates=[1]" \
  --variant "none_mmtm:balancer.name=none,model.fusion=mmtm,model.fusion_options.gates=[1]"
for run in i23_avdh i23_mfeat_pixfou; do
  python benchmarks/paired_table.py "runs/$run" \
    --labels multitask,sample_valuation,modality_valuation,relearning,remix,reconboost,aug
  python benchmarks/paired_table.py "runs/$run" --labels greedy --reference none_mmtm
  python benchmarks/balancer_stats.py "runs/$run" sample_valuation modality_valuation remix relearning reconboost aug greedy \
    --at-epochs 5,21,41
done
python benchmarks/epoch_cost.py --task avdigits_hard --epochs 4 --rounds 3
