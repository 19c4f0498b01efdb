#!/usr/bin/env bash
# The prepared run for a lent NVIDIA machine (the `device` tool): the CUDA tests, then every benchmark on the GPU.
# Everything it measures lands in $OUT (default runs/gpu); each step has its own time limit and the steps go on
# after a failure, so whatever finished comes back. Run from the repository root.
#
# Wheels the device image lacks travel in .whl/ (the image has torch, opencv, pillow, pytest and transformers).
# A carry holds 64 MiB at most, so they come in two sets, installed into .whl/site, which stays on the warm machine:
#
#   here, once:  echo /.whl/ >> .git/info/exclude     (already in .gitignore)
#     P="python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#     $P -d .whl/a faiss-cpu==1.15.1 safetensors==0.8.0 onnx==1.23.2 onnxruntime==1.32.0 protobuf flatbuffers \
#        ml_dtypes                                                                                     # ~57 MiB
#     $P -d .whl/b $(.venv/bin/python -m pip list --format=freeze | grep '^ros-' \
#        | grep -v -E 'ament-cmake|rosidl-(adapter|cli|cmake|generator|parser|pycommon)|implementation-cmake') \
#        rosbags==0.11.9 apsw backports.zstd lz4 ruamel.yaml typing_extensions pyyaml                  # ~43 MiB
#   device:      run(command="bash bench/gpu_check.sh install", carry=[".whl/a"], timeout_s=120)
#                run(command="bash bench/gpu_check.sh tests", carry=[".whl/b"], timeout_s=300)
#                run(command="bash bench/gpu_check.sh bench", timeout_s=590)
#
# Phases: `install` (wheels only), `tests`, `bench`, or none for both (over 10 minutes: use two calls). Without the
# ROS wheels the node benchmark fails at its import (said in $OUT/bench_node_*.log). The onnxruntime backend is
# benchmarked only where the image has a GPU provider (onnxruntime-gpu; pip's onnxruntime, which fits a carry, is
# CPU-only, and a CPU run of ViT-B batch 256 would eat the time of everything else); env.txt lists the providers.
#
# Dry run on a CPU machine (small sizes, same steps): GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh
# CI never runs this; the CUDA tests skip cleanly on CPU machines.
set -uo pipefail
PHASE=${1:-all}
OUT=${OUT:-runs/gpu}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

shopt -s nullglob
wheels=(.whl/*.whl .whl/*/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  echo "installing ${#wheels[@]} wheels into .whl/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site "${wheels[@]}" \
    2>&1 | tail -3
fi
export PYTHONPATH=$PWD/.whl/site:$PWD
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE DINOMIX_TEST_DOMAINS=${DINOMIX_TEST_DOMAINS:-140-159}
[ "$PHASE" = install ] && exit 0

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
  SMALL=0
else
  SMALL=1  # a dry run of the script on a CPU machine
fi
$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, torch
print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
for name in ("onnxruntime", "onnx", "faiss", "rclpy", "safetensors", "rosbags"):
    try:
        mod = importlib.import_module(name)
        extra = mod.get_available_providers() if name == "onnxruntime" else ""
        print(name, getattr(mod, "__version__", "?"), extra)
    except Exception as exc:  # reported, the steps that need it report too
        print(name, "MISSING", exc)
EOF

step() {  # step NAME LIMIT_S COMMAND...: run one step, its stdout to $OUT/NAME.json (or .log), never stop the script
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  local rc=$?
  echo "$name: rc $rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  if head -c 1 "$OUT/$name.out" | grep -q '{'; then mv "$OUT/$name.out" "$OUT/$name.json"; tail -c 1500 "$OUT/$name.json"
  else tail -n 15 "$OUT/$name.out" "$OUT/$name.log"; fi
}

if [ "$PHASE" = all ] || [ "$PHASE" = tests ]; then
  # 1. CUDA tests: CPU-vs-GPU descriptors per dtype, CUDA-graph replay == eager (per batch size and camera shape),
  #    on-device preprocessing on CUDA, multi-camera batches on CUDA, ONNX Runtime GPU providers, torch float16 search
  step cuda_tests 280 $PY -m pytest -q -rs -p no:cacheprovider test/model/test_encoder.py test/model/test_export.py \
    test/imaging/test_preprocess.py test/maps/test_index.py -k "cuda"
fi

if [ "$PHASE" = all ] || [ "$PHASE" = bench ]; then
  if [ $SMALL = 1 ]; then ITERS=3; MAP=1000; IMAGES=3; SIZES=1000; BATCH=8; VARIANTS=vits14
  else ITERS=100; MAP=100000; IMAGES=60; SIZES=1000,10000,100000; BATCH=256; VARIANTS=vits14,vitb14; fi
  BACKENDS=torch
  if [ $SMALL = 1 ] || $PY -c "import onnxruntime as o, sys; sys.exit(not {'CUDAExecutionProvider', \
      'TensorrtExecutionProvider'} & set(o.get_available_providers()))" 2>/dev/null; then BACKENDS=torch,onnxruntime; fi
  # 2. model: batch-1 latency (CUDA graphs; 720p with on-device resize) and batch-256 throughput, per dtype/backend
  step bench_model 180 $PY -m dinomix_ros.cli.main bench --device "$DEVICE" --variants $VARIANTS \
    --dtypes float32,float16,bfloat16 --backends $BACKENDS --batch-size $BATCH --iters $ITERS --warmup 5
  # 3. search: exact (torch float16 on the GPU, faiss CPU) and approximate
  step bench_search 120 $PY bench/bench_search.py --sizes $SIZES --approx-sizes 1000
  # 4. node end to end (image published -> pose prior received) with the per-stage split, 100k-keyframe map
  for variant in ${VARIANTS//,/ }; do
    for backend in ${BACKENDS//,/ }; do
      step "bench_node_${variant}_${backend}" 120 $PY bench/bench_node.py --variant "$variant" --device "$DEVICE" \
        --backend $backend --map-size $MAP --images $IMAGES --domain 141
    done
  done
  # 5. map building from decoded frames and from JPEG files (folder and bag)
  step bench_mapbuild 120 $PY bench/bench_mapbuild.py --variant "${VARIANTS##*,}" --device "$DEVICE" \
    --batch-size 64
fi
echo "results in $OUT:"
ls -l "$OUT"
