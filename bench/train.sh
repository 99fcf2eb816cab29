#!/usr/bin/env bash
# Training throughput on one GPU (run on an H200 through the device tool; not part of CI):
#  1. the toy-gpu preset (~340 M parameters) on the toy world, bf16 autocast: tokens/s and MFU;
#  2. the qwen3-vl-2b preset (real shapes, random weights, real Qwen vocabulary) under FSDP2 on one GPU, with
#     images in every batch: tokens/s, MFU and peak memory against train.py's planner.
# Needs data/qwen.tiktoken (python data/get_tokenizer.py). Logs go to $OUT (or ./out/bench).
set -euo pipefail
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
common="--eval_every 0 --test_samples 2 --max_new_tokens 8 --log_every 5 --data_workers 12"
python train.py --preset toy-gpu --vocab_size 8192 --image_size 128 --stages pretrain:40 --batch_size 16 \
    --seq_len 2048 --lr 1e-3 $common --out_dir /tmp/bench-toy-gpu 2>&1 | tee "$OUT/toy_gpu.log"
torchrun --nproc_per_node 1 train.py --preset qwen3-vl-2b --image_size 128 --stages pretrain:25 --batch_size 2 \
    --seq_len 4096 --lr 1e-5 $common --out_dir /tmp/bench-2b 2>&1 | tee "$OUT/fsdp_2b.log"
