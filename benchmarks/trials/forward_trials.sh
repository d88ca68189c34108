#!/usr/bin/env bash
# The cupy forward trials on a Hopper GPU in one run, from a checkout of main: it builds two
# trees beside the checkout (main + exp_overlap.patch; that + persistent_forward.patch), then
#  1. exponentials overlapping P V: the warpgroup tests' many-tile cases in its tree, then its
#     kernel sources against main's in one process (ab_configs, DMA_CUPY_SOURCES);
#  2. persistent programs on top: the walk tests in its tree, then a program per
#     multiprocessor against a program per block (DMA_CUPY_PROGRAMS=0);
#  3. the warpgroup, modes and CUDA-graph tests in the fastest tree whose tests passed (main
#     if neither trial is faster), and its 16k benchmark (cupy, cuDNN, triton), the table
#     last.
#
#   bash benchmarks/trials/forward_trials.sh [output dir]     # default: ./forward-trials
#
# DEADLINE (seconds, default 560) bounds the run (a stage gets what is left of its share);
# each stage's output lands in the output dir.
# The A/B lines print each configuration's largest difference from the first one's output
# (max |o - first|): the trial's forward against main's on the same inputs.
set -u
cd "$(dirname "$0")/../.."
root=$PWD
out=$(realpath -m "${1:-forward-trials}")
mkdir -p "$out"
deadline=${DEADLINE:-560}
left() { echo $(( deadline - SECONDS )); }
upto() {  # upto SECONDS: SECONDS, or what is left before the deadline if that is less
    local rest=$(left)
    echo $(( $1 < rest ? $1 : (rest > 1 ? rest : 1) ))
}
export PYTHONUNBUFFERED=1
workers=""
python -c "import xdist" 2>/dev/null && workers="-n 8"
work=$(mktemp -d)

tree() {  # tree NAME PATCH...: a copy of this checkout's code with the patches applied
    mkdir -p "$work/$1"
    cp -r dma tests benchmarks docs pyproject.toml noxfile.py README.md "$work/$1/"
    for patch in "${@:2}"; do
        if command -v git > /dev/null; then
            (cd "$work/$1" && git apply "$root/benchmarks/trials/$patch") || exit 1
        else
            patch -s -p1 -d "$work/$1" < "$root/benchmarks/trials/$patch" || exit 1
        fi
    done
    echo "$work/$1"
}
in_tree() {  # in_tree DIR SECONDS COMMAND...: run COMMAND in DIR with its own package
    (cd "$1" && PYTHONPATH=$1 timeout "$2" "${@:3}")
}
forward_us() {  # the forward kernel's GPU us per call of each configuration of an A/B output
    grep -o "dma_forward_wgmma [0-9.]*" "$1" | awk '{print $2}' | tr '\n' ' '
}
faster() {  # faster FILE: whether the first configuration's forward kernel beat the second's
    forward_us "$1" | awk '{n = NF; a = $1; b = $2} END {exit !(n == 2 && a < 0.99 * b)}'
}

nvidia-smi --query-gpu=name --format=csv,noheader
exp=$(tree exp exp_overlap.patch) || exit 1
persistent=$(tree persistent exp_overlap.patch persistent_forward.patch) || exit 1

echo "== 1. exponentials overlapping P V: many-tile tests ($SECONDS s)"
DMA_TEST_DEVICE=cuda in_tree "$exp" $(upto 150) python -m pytest -q -x $workers \
    tests/test_cupy_wgmma.py -k many_tiles > "$out/exp_tests.txt" 2>&1
exp_ok=$?
echo "exit $exp_ok"; tail -1 "$out/exp_tests.txt"
echo "== A/B: the trial's kernel sources (first) against main's ($SECONDS s)"
PYTHONPATH=$root timeout $(upto 120) python benchmarks/ab_configs.py --backend cupy --mode fwd \
    --kernels --rounds 3 '{"env": {"DMA_CUPY_SOURCES": "'"$exp/dma/backends/cuda"'"}}' '{}' \
    > "$out/exp_ab.txt" 2>&1
echo "exit $?"; grep -v -i warn "$out/exp_ab.txt" | tail -7 | cut -c1-300
best=$root  # a trial's tree takes over only where its tests passed and its forward is faster
[ "$exp_ok" = 0 ] && faster "$out/exp_ab.txt" && best=$exp

echo "== 2. persistent programs: walk tests ($SECONDS s)"
DMA_TEST_DEVICE=cuda in_tree "$persistent" $(upto 150) python -m pytest -q -x $workers \
    tests/test_cupy_wgmma.py -k "programs" > "$out/persistent_tests.txt" 2>&1
persistent_ok=$?
echo "exit $persistent_ok"; tail -1 "$out/persistent_tests.txt"
echo "== A/B: a program per multiprocessor (first) against one per block ($SECONDS s)"
in_tree "$persistent" $(upto 120) python benchmarks/ab_configs.py --backend cupy --mode fwd \
    --kernels --rounds 3 '{}' '{"env": {"DMA_CUPY_PROGRAMS": "0"}}' \
    > "$out/persistent_ab.txt" 2>&1
echo "exit $?"; grep -v -i warn "$out/persistent_ab.txt" | tail -7 | cut -c1-300
[ "$best" = "$exp" ] && [ "$persistent_ok" = 0 ] && faster "$out/persistent_ab.txt" \
    && best=$persistent

label=${best#$work/}
[ "$best" = "$root" ] && label=main
echo "== 3. fastest tree: $label ($SECONDS s, $(left) s left)"
budget=$(( $(left) - 100 ))
if [ "$best" != "$root" ] && [ "$budget" -gt 60 ]; then
    DMA_TEST_DEVICE=cuda in_tree "$best" "$budget" python -m pytest -q -x $workers \
        tests/test_cupy_wgmma.py tests/test_gpu_modes.py tests/test_cuda_graphs.py \
        -k "cupy or wgmma or programs" > "$out/best_tests.txt" 2>&1
    echo "exit $? (124: out of time)"; tail -1 "$out/best_tests.txt"
fi
if [ "$(left)" -gt 60 ]; then
    in_tree "$best" $(( $(left) - 5 )) python benchmarks/bench_attention.py --reps 5 \
        --seqlens 16384 --contenders dma-cupy sdpa-cudnn dma-triton \
        --csv "$out/forward_trials_16k.csv" > "$out/bench.txt" 2>&1
    echo "exit $?"; tail -8 "$out/bench.txt"
fi
echo "done in $SECONDS s"
