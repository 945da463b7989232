#!/usr/bin/env bash
# Every GPU figure of bench/ in one device call (issue 7), inside the device tool's 10-minute command limit:
#   1. the CIFAR-10 recipe through keel's stages, and the plain-DataLoader peer (time_to_accuracy.py)
#   2. the train loop against its compute ceiling: resnet18 @ 32 px, resnet50 @ 224 px (train_throughput.py)
# Here, once:   .venv/bin/python bench/gpu_kit.py        (wheels + CIFAR tarball in .gpu/, about 35 MiB)
# Then:         run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=590), and give_back.
# Each step has its own timeout and a failed step does not stop the next. JSON and logs go to $OUT (the device
# tool brings them back), or to bench/out/gpu elsewhere.
# Local check of the plumbing on the CPU: PY=.venv/bin/python SKIP_INSTALL=1 bash bench/gpu.sh --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
SMOKE=${1:-}
export PYTHONUNBUFFERED=1

if [ -z "${SKIP_INSTALL:-}" ]; then
  [ -d .gpu/wheels ] || { echo "gpu.sh: no .gpu/wheels: run bench/gpu_kit.py here and carry .gpu"; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl \
    || { echo "gpu.sh: installing .gpu/wheels failed"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt" || true
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" \
  | tee -a "$OUT/gpu.txt"

step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 6 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

if [ "$SMOKE" = "--smoke" ]; then
  step tta 120 $PY bench/time_to_accuracy.py --smoke --out "$OUT/tta.json"
  step throughput 120 $PY bench/train_throughput.py --smoke --out "$OUT/throughput.json"
  exit 0
fi

TARBALL=.gpu/cifar10-jpeg.tar.gz
step tta 300 $PY bench/time_to_accuracy.py --tarball "$TARBALL" --workdir /tmp/keel-tta --device cuda \
  --peer-workers 15 --out "$OUT/tta.json"
step throughput_r18_32 75 $PY bench/train_throughput.py --synth-shards 65536 32 --model resnet18 --batch-size 512 \
  --steps 100 --log-every 20 --device cuda --precision bf16 --channels-last --no-deterministic \
  --workdir /tmp/keel-tp18 --out "$OUT/throughput_r18_32.json"
step throughput_r50_224 110 $PY bench/train_throughput.py --synth-shards 16384 224 --model resnet50 --batch-size 256 \
  --steps 50 --log-every 10 --device cuda --precision bf16 --channels-last --no-deterministic --repeat 2 \
  --workdir /tmp/keel-tp50 --out "$OUT/throughput_r50_224.json"
ls -la "$OUT"
