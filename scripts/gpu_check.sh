#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one command, for a lent CUDA machine without network:
# the Python packages dropstudy needs beyond the machine's own (wandb, hydra-core, omegaconf and
# their dependencies) travel as wheels in .whl/ (see BENCHMARKS.md for how they were fetched).
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
echo "== CIFAR-10 throughput and the 15-epoch study (issue 5)"
timeout ${BENCH_TIMEOUT:-280} python3 scripts/bench.py --device cuda --epochs 1 --repeats 1 --study \
  --out "$OUT/bench.json" 2>&1 | tail -n 40
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
