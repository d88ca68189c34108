#!/usr/bin/env bash
# The cupy forward trials on a Hopper GPU in one run, from a checkout of main. It builds two
# trees beside the checkout: `persistent` (main + exp_overlap.patch + persistent_forward.patch,
# measured faster, not yet through the whole GPU suite, + transient_plans.patch, not yet run
# on a GPU) and `stages` (that + kv_stages.patch), then
#  1. in `persistent`, the plan-graph and CUDA-graph tests (both backends), then the whole
#     cupy GPU suite (the warpgroup tests, the conformance suite, the modes): what landing
#     them needs;
#  2. K and V buffer counts in `stages`: two buffers each and two Q buffers (as `persistent`)
#     against three K buffers or three V buffers with one Q buffer (the same shared memory),
#     in one process (ab_configs, DMA_CUPY_OPTIONS);
#  3. where a count is faster, the many-tile and walk tests with it;
#  4. the 16k benchmark (cupy, cuDNN, triton) in the fastest tree whose tests passed (main if
#     none), then the forward's ablation there if time is left; the table last.
#
#   bash benchmarks/trials/forward_trials.sh [output dir]     # default: ./forward-trials
#
# DEADLINE (seconds, default 560) bounds the run (a stage gets what is left of its share);
# each stage's output lands in the output dir. Tests run with pytest-xdist where it is
# installed (8 workers), else one by one (slower: the whole suite may not fit the deadline).
# The A/B lines print each configuration's largest difference from the first one's output
# (max |o - first|): the same inputs through each configuration.
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
fastest() {  # fastest FILE: 1-based index of the configuration whose forward kernel beat the
             # first's by 1% or more and the others' (0: none)
    forward_us "$1" | awk '{best = 0; for (i = 2; i <= NF; ++i)
        if ($i < 0.99 * $1 && (best == 0 || $i < $best)) best = i; print best - (best > 0)}'
}

nvidia-smi --query-gpu=name --format=csv,noheader
landing=(exp_overlap.patch persistent_forward.patch transient_plans.patch)
persistent=$(tree persistent "${landing[@]}") || exit 1
stages=$(tree stages "${landing[@]}" kv_stages.patch) || exit 1

echo "== 1. persistent: the graph tests, then the cupy GPU suite ($SECONDS s)"
DMA_TEST_DEVICE=cuda in_tree "$persistent" $(upto 90) python -m pytest -q -x \
    tests/test_plan_graphs.py tests/test_cuda_graphs.py > "$out/graph_tests.txt" 2>&1
graphs_ok=$?
echo "exit $graphs_ok"; tail -1 "$out/graph_tests.txt"
DMA_TEST_DEVICE=cuda in_tree "$persistent" $(upto 240) python -m pytest -q -x $workers tests \
    -k "(cupy or programs) and not test_cupy_build" > "$out/persistent_tests.txt" 2>&1
persistent_ok=$?
echo "exit $persistent_ok (124: out of time)"; tail -1 "$out/persistent_tests.txt"
[ "$graphs_ok" = 0 ] || persistent_ok=$graphs_ok

echo "== 2. K/V buffers: 2/2 with two Q buffers (first), 3/2, 2/3 with one ($SECONDS s)"
options=("" "-DDMA_FORWARD_K_STAGES=3 -DDMA_FORWARD_Q_BUFFERS=1"
         "-DDMA_FORWARD_V_STAGES=3 -DDMA_FORWARD_Q_BUFFERS=1")
configs=()
for option in "${options[@]}"; do
    configs+=("$( [ -z "$option" ] && echo '{}' \
        || echo '{"env": {"DMA_CUPY_OPTIONS": "'"$option"'"}}')")
done
in_tree "$stages" $(upto 100) python benchmarks/ab_configs.py --backend cupy --mode fwd \
    --kernels --rounds 3 "${configs[@]}" > "$out/stages_ab.txt" 2>&1
echo "exit $?"; grep -v -i warn "$out/stages_ab.txt" | tail -9 | cut -c1-300
choice=$(fastest "$out/stages_ab.txt")
best=$root best_options=""
[ "$persistent_ok" = 0 ] && best=$persistent
if [ "${choice:-0}" -gt 0 ]; then
    echo "== 3. stages with ${options[$choice]}: many-tile and walk tests ($SECONDS s)"
    DMA_CUPY_OPTIONS="${options[$choice]}" DMA_TEST_DEVICE=cuda in_tree "$stages" $(upto 120) \
        python -m pytest -q -x $workers tests/test_cupy_wgmma.py -k "many_tiles or programs" \
        > "$out/stages_tests.txt" 2>&1
    stages_ok=$?
    echo "exit $stages_ok"; tail -1 "$out/stages_tests.txt"
    [ "$stages_ok" = 0 ] && [ "$best" = "$persistent" ] && best=$stages \
        && best_options=${options[$choice]}
fi

label=${best#$work/}
[ "$best" = "$root" ] && label=main
echo "== 4. fastest tree: $label $best_options ($SECONDS s, $(left) s left)"
if [ "$(left)" -gt 40 ]; then
    DMA_CUPY_OPTIONS="$best_options" in_tree "$best" $(upto 80) \
        python benchmarks/bench_attention.py --reps 5 --seqlens 16384 \
        --contenders dma-cupy sdpa-cudnn dma-triton --csv "$out/forward_trials_16k.csv" \
        > "$out/bench.txt" 2>&1
    echo "exit $?"
fi
if [ "$(left)" -gt 90 ]; then
    DMA_CUPY_OPTIONS="$best_options" in_tree "$best" $(( $(left) - 5 )) \
        python benchmarks/ablate_cupy_forward.py --rounds 1 --windows 1024 4096 \
        > "$out/ablate.txt" 2>&1
    echo "exit $?"; grep -v "it/s\|s/it" "$out/ablate.txt" | tail -8
fi
grep -v -i warn "$out/bench.txt" 2>/dev/null | tail -7
echo "done in $SECONDS s"
