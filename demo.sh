#!/usr/bin/env bash
# The whole pipeline on the built-in shapes data, sized for a CPU (22 CPU-minutes in all, measured on 2 cores).
#   bash demo.sh [OUTPUT_DIR]
# 1. MAE pre-training with random masking gives an encoder for part learning (SemMAE uses iBOT's).
# 2. part_learn.py learns 6 parts per image with that encoder (SemMAE §3.1) and scores them on held-out scenes.
# 3. pretrain.py with SemMAE masking on those parts, and with ObjMAE masking on the shapes' own objects.
# 4. finetune.py fine-tunes the SemMAE encoder and linear-probes the MAE, SemMAE and ObjMAE encoders.
# 5. study.py prints one table of these runs: part IoU (learned vs attention), losses, top-1.
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-output/demo}
# --resume auto: running the demo again continues each stage where it stopped (a finished one is skipped)
small="--input_size 64 --batch_size 64 --num_workers 2 --resume auto"
pre="--model mae_vit_tiny_patch8 $small --epochs 10 --warmup_epochs 1 --blr 1e-3 --vis_every 5"

python pretrain.py $pre --mask random --output_dir "$out/mae"
python part_learn.py --method learned --encoder_weights "$out/mae/checkpoint-last.pth" $small --epochs 3 \
    --eval_iou --output_dir "$out/parts"
python part_learn.py --method attention --encoder_weights "$out/mae/checkpoint-last.pth" $small \
    --eval_iou --output_dir "$out/attention"      # SemMAE Table 4's baseline: the encoder's attention heads
python pretrain.py $pre --mask semmae --gamma 2 --regions "$out/parts/regions.pt" --output_dir "$out/semmae"
python pretrain.py $pre --mask objmae --seq_ratio 0.25 --output_dir "$out/objmae"
python finetune.py --model vit_tiny_patch8 $small --epochs 10 --warmup_epochs 1 --blr 5e-3 --aa none \
    --mixup 0 --cutmix 0 --reprob 0 --crop_min 0.35 --finetune "$out/semmae/checkpoint-last.pth" \
    --output_dir "$out/finetune"
for run in mae semmae objmae; do
    python finetune.py --model vit_tiny_patch8 $small --linprobe --opt sgd --global_pool --epochs 5 --warmup_epochs 1 \
        --finetune "$out/$run/checkpoint-last.pth" --output_dir "$out/linprobe-$run"
done
echo "done: pictures, logs and checkpoints are in $out/*/"
python study.py --summary "$out"
