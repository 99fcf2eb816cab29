#!/usr/bin/env bash
# The qwen3-vl-8b preset under FSDP2 on two GPUs (run on an nvidia-h200-x2 through the device tool, not CI):
#   bench/fsdp_8b.sh train DIR           60 steps (real shapes, random weights, bf16, toy-world images in every row),
#                                        the planner's estimate first; DIR gets the sharded checkpoint and hf/
#   bench/fsdp_8b.sh resume DIR NEWDIR   NEWDIR continues DIR's run for 5 steps
# after either, the run's hf/ export is loaded with Qwen3VL.from_pretrained and answers one image question (sample.py)
#   bench/fsdp_8b.sh scaling DIR         qwen3-vl-2b at the same per-GPU batch on one GPU, then on two
# One 8B checkpoint (model + AdamW, fp32) is 98 GiB and a 128 GiB disk holds one, not two: the resumed run writes
# into NEWDIR (e.g. on /dev/shm), whose checkpoint entry is a link to DIR's; the exports are bf16 (16 GiB). Host
# memory is the other limit: a save held ~130 GiB of a 251 GiB host at its peak, so a checkpoint kept in /dev/shm
# (RAM) beside a running save leaves little room (measured 2026-11-29: used 159 GiB with the checkpoint on disk).
# Needs data/qwen.tiktoken (python data/get_tokenizer.py) and PyAV. Logs go to $OUT (or ./out/bench).
set -euo pipefail
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
per_gpu="--image_size 128 --batch_size 1 --seq_len 4096 --activation_checkpointing"
common="$per_gpu --lr 1e-5 --eval_every 0 --eval_samples 2 --test_samples 2 --max_new_tokens 8 --data_workers 12"
check_export() {
    python -c "
import sys
from model import Qwen3VL
m = Qwen3VL.from_pretrained(sys.argv[1])
print(f'{sys.argv[1]}: {m.num_params():,} parameters, {m.lm_head.weight.dtype}')" "$1" | tee "$OUT/load_8b.txt"
    photo="$(python -c 'import os, skimage.data; print(os.path.dirname(skimage.data.__file__))')/astronaut.png"
    python sample.py --init_from "$1" --image "$photo" --prompt "What is in this image?" --max_new_tokens 8 \
        --temperature 0 2>&1 | tee -a "$OUT/load_8b.txt"
}
case "$1" in
train)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
    python train.py --plan --preset qwen3-vl-8b --n_gpus 2 $per_gpu | tee "$OUT/plan_8b.txt"
    torchrun --nproc_per_node 2 train.py --preset qwen3-vl-8b --stages pretrain:60 --log_every 5 $common \
        --export_dtype bfloat16 --out_dir "$2" 2>&1 | tee "$OUT/train_8b.log"
    check_export "$2/hf" ;;
resume)
    mkdir -p "$3"
    cp "$2/latest" "$2/metrics.jsonl" "$3/"
    ln -sfn "$(realpath "$2/$(cat "$2/latest")")" "$3/$(cat "$2/latest")"
    torchrun --nproc_per_node 2 train.py --preset qwen3-vl-8b --stages pretrain:65 --log_every 1 $common \
        --export_dtype bfloat16 --out_dir "$3" --resume 2>&1 | tee "$OUT/resume_8b.log"
    check_export "$3/hf" ;;
scaling)
    python train.py --plan --preset qwen3-vl-2b --n_gpus 1 $per_gpu | tee "$OUT/plan_2b.txt"
    CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node 1 train.py --preset qwen3-vl-2b --stages pretrain:25 \
        --log_every 5 $common --out_dir "$2/2b-1gpu" 2>&1 | tee "$OUT/scaling_2b_1gpu.log"
    rm -rf "$2/2b-1gpu"
    torchrun --nproc_per_node 2 train.py --preset qwen3-vl-2b --stages pretrain:25 \
        --log_every 5 $common --out_dir "$2/2b-2gpu" 2>&1 | tee "$OUT/scaling_2b_2gpu.log" ;;
*)
    echo "usage: bench/fsdp_8b.sh train DIR | resume DIR NEWDIR | scaling DIR" >&2; exit 2 ;;
esac
