#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one command, for a lent CUDA machine without network
# that already has torch, torchvision, matplotlib, rich and typer: the other packages dropstudy
# needs travel as wheels in .whl/ (git-ignored), fetched where pip works, for the machine's Python:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#     wandb==0.31.0 hydra-core==1.3.8 omegaconf==2.3.1 cwevals pydantic pydantic_core \
#     typing-inspection annotated-types platformdirs protobuf googleapis-common-protos xxhash \
#     typing_extensions distro sniffio opentelemetry-api opentelemetry-sdk \
#     opentelemetry-semantic-conventions opentelemetry-proto opentelemetry-exporter-otlp-proto-http \
#     opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-common \
#     opentelemetry-exporter-http-transport
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only
#
#   bash scripts/gpu_check.sh            # results under $OUT (default ./gpu-out)
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src WANDB_SILENT=true PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, wandb, hydra, dropstudy; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'wandb', wandb.__version__, 'hydra', hydra.__version__)" || exit 1
echo "== regression sweep: 48 members vectorized vs one run after another (issue 3)"
timeout ${SWEEP_TIMEOUT:-200} python3 scripts/bench_sweep.py --device cuda --baseline-members 2 \
  --json "$OUT/bench_sweep.json" 2>&1 | tail -n 25
echo "== CIFAR-10 throughput: the tutorial loop vs dropstudy tracked and untracked (the tracking overhead,"
echo "   histograms now one device pass without hooks), and the 15-epoch study (issues 5 and 13)"
timeout ${BENCH_TIMEOUT:-280} python3 scripts/bench.py --device cuda --epochs 1 --repeats 1 --study \
  --out "$OUT/bench.json" 2>&1 | tail -n 40
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
