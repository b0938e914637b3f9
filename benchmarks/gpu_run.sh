#!/usr/bin/env bash
# Everything the GPU checks need, in one call on a machine with an NVIDIA GPU (repo root):
#   bash benchmarks/gpu_run.sh OUTDIR
# 1. the cuda-marked tests; 2. the CUDA-fitted test fixture; 3. the GPU benchmark (JSON);
# 4. the interpreter tests with that machine's triton. Logs and results go to OUTDIR.
set -u
out=${1:?usage: gpu_run.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm,power.limit,memory.total \
    --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, \
triton.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$out/gpu.txt"
echo "== 1. pytest -m cuda tests/test_cuda.py"
TGEM_REQUIRE_CUDA=1 timeout 150 python3 -m pytest -m cuda tests/test_cuda.py -q \
    -p no:cacheprovider -rfEs 2>&1 | tee "$out/pytest_cuda.txt"
echo "== 2. CUDA-fitted fixture"
timeout 60 python3 tests/fixtures/make_cuda_fixture.py "$out" 2>&1 | tail -5
echo "== 3. benchmark"
timeout 210 python3 benchmarks/bench_gpu.py --out "$out/gpu.json" 2>&1 | tee "$out/bench.txt"
echo "== 4. interpreter tests (this machine's triton)"
TGEM_REQUIRE_TRITON=1 timeout 40 python3 -m pytest tests/test_triton.py -q -p no:cacheprovider \
    2>&1 | tail -3
