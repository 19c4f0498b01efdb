#!/usr/bin/env bash
# One prepared run for a lent NVIDIA machine (the `device` tool): CUDA tests, then the model and search benchmarks.
# Everything it measures lands in $OUT (default runs/gpu). Run from the repository root:
#
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#                    -d .whl faiss-cpu==1.15.1 safetensors==0.8.0
#   device:      run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# The device image has torch, opencv, pillow, pytest and transformers; faiss and safetensors travel as wheels.
# CI never runs this (no GPU there); the CUDA tests skip cleanly on CPU machines.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/env.txt"

# 1. CUDA tests: CPU-vs-GPU descriptors per dtype, CUDA-graph replay == eager, torch float16 search backend
timeout 240 python3 -m pytest -q -rs -p no:cacheprovider test/model/test_encoder.py test/maps/test_index.py \
  -k "cuda" 2>&1 | tee "$OUT/cuda_tests.log"

# 2. model: batch-1 latency (CUDA graphs) and batch-256 throughput, ViT-S and ViT-B, float32/float16/bfloat16
timeout 180 python3 -m dinomix_ros.cli.main bench --device cuda --variants vits14,vitb14 --dtypes float32,float16,bfloat16 \
  --batch-size 256 --iters 200 --warmup 20 > "$OUT/bench_model.json" 2> "$OUT/bench_model.log"
tail -c 2000 "$OUT/bench_model.json"

# 3. search: exact (torch float16 on the GPU, faiss CPU) and approximate, up to 1M x 4096
timeout 240 python3 bench/bench_search.py --sizes 1000,10000,100000 --large --approx-sizes 1000,10000 \
  > "$OUT/bench_search.json" 2> "$OUT/bench_search.log"
tail -c 2000 "$OUT/bench_search.json"
