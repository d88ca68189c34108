#!/usr/bin/env bash
# The GPU checks and headline numbers in one run, for a CUDA machine without nox:
# the plan-graph and CUDA-graph tests, the conformance suite for triton and cupy (with the
# cupy warpgroup kernels' own cases on compute capability 9.0, and the GPU cases of decoding,
# autocast, -inf scores, large batches and a second device), then the 16k benchmark of
# CONTENDERS (default: cupy, cuDNN, triton, and both backends with eager plans; timed
# interleaved), the table last.
#
#   bash benchmarks/gpu_suite.sh [output dir]     # default: ./gpu-suite
#
# DEADLINE (seconds, default 560) bounds the whole run: the conformance suite gets what the
# benchmark leaves, and a stage that would start past the deadline is skipped. Each stage's
# full output lands in the output dir; the CSV of the benchmark too.
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu-suite}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
deadline=${DEADLINE:-560}
left() { echo $(( deadline - SECONDS )); }

nvidia-smi --query-gpu=name --format=csv,noheader
echo "== plan-graph and CUDA-graph tests"
timeout 120 python -m pytest -q -x tests/test_plan_graphs.py tests/test_cuda_graphs.py \
    > "$out/graph_tests.txt" 2>&1
tail -1 "$out/graph_tests.txt"

echo "== conformance, triton and cupy ($SECONDS s)"
workers=""
python -c "import xdist" 2>/dev/null && workers="-n 8"
budget=$(( $(left) - 150 ))  # leave the benchmark its time
if [ "$budget" -gt 30 ]; then
    DMA_TEST_DEVICE=cuda timeout "$budget" python -m pytest -q -x $workers tests/conformance \
        tests/test_gpu_modes.py tests/test_cupy_wgmma.py tests/test_nn.py tests/test_autocast.py \
        tests/test_infinite_scores.py tests/test_batch_chunks.py tests/test_devices.py \
        tests/test_autograd_route.py \
        -k "triton or cupy or wgmma" \
        > "$out/conformance.txt" 2>&1
    echo "exit $? (124: out of time)"; tail -1 "$out/conformance.txt"
else
    echo "skipped: no time left"
fi

contenders=${CONTENDERS:-dma-cupy sdpa-cudnn dma-triton dma-cupy:eager-plan dma-triton:eager-plan}
echo "== 16k, window 2048: $contenders ($SECONDS s)"
budget=$(left)
if [ "$budget" -gt 30 ]; then
    timeout "$budget" python benchmarks/bench_attention.py --reps 5 --seqlens 16384 \
        --contenders $contenders --csv "$out/w2048_16k.csv" > "$out/bench_16k.txt" 2>&1
    tail -11 "$out/bench_16k.txt"
else
    echo "skipped: no time left"
fi
echo "done in $SECONDS s"
