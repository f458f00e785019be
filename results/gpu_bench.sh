#!/usr/bin/env bash
# The GPU step-time tables of the README: `kdbench bench` on AttnFD's VOC shapes (DeepLabV3+ R101 ->
# R18, OS16, batch 6, crop 513) and CIRKD's Cityscapes shapes (DeepLabV3 R101 -> R18, OS8, batch 8
# per GPU, crop 512x1024). Random tensors and random init: no dataset, no teacher.
#   voc_bf16:        the issue's target rows (kd, cwd paper, every AttnFD preset, the three discriminator
#                    presets), bf16, the defaults: each step one CUDA graph, the method's forward
#                    compiled (runtime.compile_method: auto). Inductor takes tens of seconds per row first.
#                    Also the student's evaluation at batch 1 and 8 on 513x684 images: a 375x500 VOC
#                    image (a common size: H 375, W 500) at eval.resize_short 513, what a run evaluates 120 times
#   ifvd_products:   IFVD's class sums four ways (results/ifvd_products.py): scatter, one-hot products (today's
#                    GPU route), one-hot products split over pixel chunks, TF32; ms and error against float64
#   voc_eval_autotuned: the student's evaluation as in voc_bf16 and cirkd_bf16, with runtime.eval_cudnn_benchmark=true:
#                    cuDNN times its algorithms once per image size ("first pass" column: what a new size costs)
#   cirkd_bf16:      CIRKD's shapes, bf16, the defaults; evaluation at 1024x2048, batch 1 (CIRKD's) and 4
#   voc_bf16_others: the other VOC presets, the defaults
#   voc_bf16_no_compile_method: every VOC row with runtime.compile_method=false (what compiling saves)
#   voc_bf16_eager:  VOC without CUDA graphs (runtime.cuda_graphs=false), to see what they save
#   voc_fp32_eager:  fp32 without CUDA graphs: the "fp32 eager floor" the bf16 floor is compared with
#   voc_bf16_compiled_profile: where the compiled target rows' time over the floor goes (their 60
#                    costliest operations, device time; no CUDA graphs, whose replay hides them): the
#                    fused Triton kernels, named by the operations inductor fused into each
#   voc_bf16_eager_profile: the same without compiling the method (aten operations by name)
#   voc_loader:      the VOC recipe's training loader with its workers (data.workers: auto), on 300 synthetic
#                    375x500 JPEGs in the VOC layout (results/voc_like_jpegs.py, under /tmp: that machine has no VOC)
# Usage: bash results/gpu_bench.sh OUT_DIR [TABLE ...]   (default: every table, in the order above;
#        JSON per table in OUT_DIR, the tables on stdout). Naming tables splits the work across
#        commands, e.g. under a 10-minute limit per command: voc_bf16 first, the rest in a second.
# On a bare GPU machine install kdbench first (methods/ imports as kdbench.methods only through the
# install; MLflow and Optuna are not needed): python3 -m pip install --no-deps --no-build-isolation -e .
# Correctness of the graphed (and compiled) steps on the same GPU: python3 -m pytest -q tests/test_cuda_graphs.py
# The tables run in the order they matter (the issue's targets first), so a GPU session that runs out
# of time still has the first ones. Presets with the same options are one row ("default = cirkd").
set -uo pipefail
out=${1:-results/gpu}
shift $(( $# > 0 ? 1 : 0 ))
tables=${*:-voc_bf16 ifvd_products voc_eval_autotuned voc_bf16_compiled_profile cirkd_bf16 voc_bf16_others voc_bf16_no_compile_method voc_bf16_eager voc_fp32_eager voc_bf16_eager_profile voc_loader}
mkdir -p "$out"
all="-m kd -m cwd -m skd -m ifvd -m attnfd"
targets="-m attnfd:default -m cwd:cirkd -m skd:cirkd -m ifvd:cirkd"
if ! python3 -c "import kdbench.methods" 2>/dev/null; then
    echo "gpu_bench.sh: kdbench is not installed here; run: python3 -m pip install --no-deps --no-build-isolation -e ." >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
bench="python3 -m kdbench bench --device cuda --loader-batches 0 --eval-images 0"
for table in $tables; do
    case $table in
    voc_bf16)
        $bench --recipe voc_r101_r18 -m kd -m cwd:paper -m attnfd $targets --precision bf16 --eval-images 64 --eval-size 513,684 \
            --json "$out/$table.json" ;;
    ifvd_products)
        python3 "$(dirname "$0")/ifvd_products.py" --device cuda --json "$out/$table.json" ;;
    voc_eval_autotuned)
        $bench --recipe voc_r101_r18 -m none --precision bf16 --rounds 5 --steps 1 --warmup 1 --eval-images 64 --eval-size 513,684 \
            --set runtime.eval_cudnn_benchmark=true --json "$out/$table.json"
        $bench --recipe cirkd_cityscapes_r101_r18 -m none --precision bf16 --rounds 3 --steps 1 --warmup 1 --eval-images 16 --eval-size 1024,2048 \
            --set eval.batch_size=4 --set runtime.eval_cudnn_benchmark=true --json "$out/${table}_cirkd.json" ;;
    cirkd_bf16)
        $bench --recipe cirkd_cityscapes_r101_r18 --set train.batch_size=8 -m kd -m cwd:paper -m attnfd:default $targets \
            --precision bf16 --steps 3 --rounds 3 --warmup 3 --eval-images 16 --eval-size 1024,2048 --set eval.batch_size=4 --json "$out/$table.json" ;;
    voc_bf16_others)
        $bench --recipe voc_r101_r18 -m cwd:mmrazor -m skd:paper -m skd:pure -m ifvd:paper -m ifvd:pure --precision bf16 --json "$out/$table.json" ;;
    voc_bf16_no_compile_method)
        $bench --recipe voc_r101_r18 $all --precision bf16 --set runtime.compile_method=false --json "$out/$table.json" ;;
    voc_bf16_eager)
        $bench --recipe voc_r101_r18 -m kd -m attnfd -m cwd --precision bf16 --set runtime.cuda_graphs=false --set runtime.compile_method=false --rounds 3 --json "$out/$table.json" ;;
    voc_fp32_eager)
        $bench --recipe voc_r101_r18 -m kd --precision fp32 --set runtime.cuda_graphs=false --set runtime.compile_method=false --rounds 3 --json "$out/$table.json" ;;
    voc_bf16_compiled_profile)
        $bench --recipe voc_r101_r18 -m attnfd $targets --precision bf16 --set runtime.cuda_graphs=false --set runtime.compile_method=true --rounds 1 --steps 2 --warmup 2 --profile 60 \
            --json "$out/$table.json" ;;
    voc_bf16_eager_profile)
        $bench --recipe voc_r101_r18 $targets --precision bf16 --set runtime.cuda_graphs=false --set runtime.compile_method=false --rounds 1 --steps 2 --warmup 2 --profile 60 \
            --json "$out/$table.json" ;;
    voc_loader)
        [ -d /tmp/voc_like ] || python3 "$(dirname "$0")/voc_like_jpegs.py" /tmp/voc_like
        KDBENCH_VOC_ROOT=/tmp/voc_like python3 -m kdbench bench --device cuda --eval-images 0 --recipe voc_r101_r18 -m kd --precision bf16 \
            --rounds 1 --loader-batches 60 --json "$out/$table.json" ;;
    *) echo "gpu_bench.sh: no table $table (voc_bf16, ifvd_products, voc_eval_autotuned, voc_bf16_compiled_profile, cirkd_bf16, voc_bf16_others, voc_bf16_no_compile_method, voc_bf16_eager, voc_fp32_eager, voc_bf16_eager_profile, voc_loader)" >&2; exit 2 ;;
    esac
done
