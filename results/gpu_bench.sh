#!/usr/bin/env bash
# The GPU step-time tables of the README: `kdbench bench` on AttnFD's VOC shapes (DeepLabV3+ R101 ->
# R18, OS16, batch 6, crop 513) and CIRKD's Cityscapes shapes (DeepLabV3 R101 -> R18, OS8, batch 8
# per GPU, crop 512x1024), bf16 and fp32. Random tensors and random init: no dataset, no teacher.
# Usage: bash results/gpu_bench.sh OUT_DIR   (JSON per table in OUT_DIR; the tables on stdout)
set -uo pipefail
out=${1:-results/gpu}
mkdir -p "$out"
all="-m kd -m cwd -m skd -m ifvd -m attnfd"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 -m kdbench bench --recipe voc_r101_r18 $all --device cuda --precision bf16 --loader-batches 0 --json "$out/voc_bf16.json"
python3 -m kdbench bench --recipe voc_r101_r18 -m kd -m attnfd --device cuda --precision fp32 --rounds 3 --loader-batches 0 --json "$out/voc_fp32.json"
python3 -m kdbench bench --recipe cirkd_cityscapes_r101_r18 --set train.batch_size=8 -m kd -m cwd -m skd -m attnfd --device cuda \
    --precision bf16 --steps 3 --rounds 3 --warmup 2 --loader-batches 0 --json "$out/cirkd_bf16.json"
