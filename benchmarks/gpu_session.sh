#!/usr/bin/env bash
# The GPU measurements still owed to issue #6, one step per call of a lent machine (each well under 10 minutes),
# in the order of benchmarks/NOTES.md "Next GPU session". Results (JSON and the printed tables) go to $OUT.
#
#   bash benchmarks/gpu_session.sh vae-conv            # on the GPU machine; OUT is set by the device tool
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_session.sh all   # here, on the CPU: every step at toy sizes
#
# With a short device budget (15 minutes, machine start included) run `targets` alone: every target of #6 in one
# call of about 7 minutes (predicted). The steps: targets, vae-conv (conv formulations, profile), vae-decode (the
# decode in each layout), latency (modes, VAE, end to end, memory), fp8-matmul (latency, profile and x0 error of
# the fp8 GEMMs), profile-denoise (where the denoising time goes), attention (each backend's TFLOP/s), vae-options
# (end to end with the VAE switches), tiles-taehv-quality, long (601 frames), autotune (GEMM autotuning).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1  # each figure reaches $OUT/<name>.txt as it is printed, so a timed-out call keeps them

if [[ -d .whl ]] && ! "$PY" -c "import imageio_ffmpeg" 2>/dev/null; then  # the GPU image lacks imageio-ffmpeg
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ -n "${SMOKE:-}" ]]; then  # toy sizes on the CPU: checks that every command line still parses and runs
    DIT=(--model tiny --device cpu --width 128 --height 128 --frames 17 --repeats 1 --warmup 0)
    QUICK=("${DIT[@]}")
    MEMORY=(--model tiny --width 128 --height 128 --frames 17)
    VAE=(--tiny --device cpu --width 64 --height 64 --frames 9 --dtype fp32 --modes stream)
    CONV=(--tiny --device cpu --width 64 --height 32 --frames 9 --dtype fp32 --top 2 --iters 1 --warmup 0)
    PROFILE=(--tiny --device cpu --width 64 --height 32 --frames 9)
    DENOISE_PROFILE=(--model tiny --device cpu --width 128 --height 128 --frames 17)
    ATTENTION=(--device cpu --tokens-per-frame 64 --iters 1)
    QUALITY=(--model tiny --device cpu --width 128 --height 96 --frames 21)
    LONG_FRAMES=65
else
    DIT=(--repeats 3 --warmup 1)
    QUICK=(--repeats 2 --warmup 1)
    MEMORY=()
    VAE=(--width 1920 --height 1088 --frames 81 --dtype bf16 --chunk 3 --modes stream)  # as the pipeline decodes
    CONV=()
    PROFILE=()
    DENOISE_PROFILE=()
    ATTENTION=()
    QUALITY=(--frames 25)
    LONG_FRAMES=601
fi

FAILED=()
run() {  # name, command...: the command's output also goes to $OUT/name.txt; a failure does not stop the step
    local name=$1
    shift
    echo "== $name: $*"
    if ! "$@" 2>&1 | tee "$OUT/$name.txt"; then
        FAILED+=("$name")
    fi
}

step_targets() {  # s/frame of both modes, VAE decode, end to end and peaks; the VAE switches; the fp8 matmul;
    # the decode with conv2d causal convs
    # the meta-device memory prediction runs on the CPU meanwhile, to hold against the measured peaks
    "$PY" -m histream_core memory --mode histream+ --json "${MEMORY[@]}" > "$OUT/targets_predicted.json" &
    local predicting=$!
    run targets "$PY" benchmarks/bench_1080p.py "${QUICK[@]}" --modes histream,histream+ --compile --profile \
        --e2e-orders after --json "$OUT/targets.json"
    run targets_vae "$PY" benchmarks/bench_vae.py "${VAE[@]}" --channels-last --compile-norms --cudnn-benchmark
    run targets_fp8 "$PY" benchmarks/bench_1080p.py "${QUICK[@]}" --modes histream,histream+ --compile --fp8-matmul \
        --profile --skip-vae --e2e-mode '' --json "$OUT/targets_fp8.json"
    # last, so a call cut by its time limit loses it first: the other formulation, in case cuDNN's conv3d stays slow
    run targets_vae_conv2d "$PY" benchmarks/bench_vae.py "${VAE[@]}" --conv-impl conv2d --compile-norms --cudnn-benchmark
    wait "$predicting" || FAILED+=(targets_predicted)
}

step_vae_conv() {
    run conv "$PY" benchmarks/bench_vae_conv.py "${CONV[@]}" --json "$OUT/conv.json"
    run profile_vae "$PY" benchmarks/profile_vae.py "${PROFILE[@]}"
    run profile_vae_cl "$PY" benchmarks/profile_vae.py "${PROFILE[@]}" --channels-last --compile-norms
}

step_vae_decode() {
    run vae_ncdhw "$PY" benchmarks/bench_vae.py "${VAE[@]}" --conv-impl conv3d
    run vae_cl "$PY" benchmarks/bench_vae.py "${VAE[@]}" --conv-impl conv3d --channels-last
    run vae_cl_norms "$PY" benchmarks/bench_vae.py "${VAE[@]}" --conv-impl conv3d --channels-last --compile-norms
    run vae_conv2d_norms "$PY" benchmarks/bench_vae.py "${VAE[@]}" --conv-impl conv2d --compile-norms
}

step_latency() {
    run latency "$PY" benchmarks/bench_1080p.py "${DIT[@]}" --modes histream+,histream --compile --e2e-mode histream+ \
        --predict-memory --json "$OUT/latency.json"
}

step_profile_denoise() {
    run profile_denoise "$PY" benchmarks/profile_denoise.py "${DENOISE_PROFILE[@]}" --mode histream+ --compile
}

step_attention() {
    run attention "$PY" benchmarks/bench_attention.py "${ATTENTION[@]}"
}

step_vae_options() {  # pick the switches step vae-decode found fastest
    run vae_options "$PY" benchmarks/bench_1080p.py "${DIT[@]}" --modes histream+ --compile \
        --vae-channels-last --vae-compile --e2e-orders after,overlapped --json "$OUT/vae_options.json"
}

step_tiles_taehv_quality() {
    run tiles "$PY" benchmarks/bench_1080p.py "${DIT[@]}" --modes histream+ --compile --tile 64 --e2e-orders after \
        --json "$OUT/tiles.json"
    run taehv "$PY" benchmarks/bench_1080p.py "${DIT[@]}" --modes histream+ --compile --vae-kind taehv \
        --e2e-orders after --json "$OUT/taehv.json"
    run quality "$PY" benchmarks/quality_delta.py "${QUALITY[@]}" --json "$OUT/quality.json"
}

step_long() {
    run long "$PY" benchmarks/bench_1080p.py "${DIT[@]}" --modes histream+ --frames "$LONG_FRAMES" --compile \
        --skip-vae --e2e-mode '' --json "$OUT/long.json"
}

step_autotune() {
    run autotune "$PY" benchmarks/bench_1080p.py "${DIT[@]}" --modes histream --compile \
        --compile-mode max-autotune-no-cudagraphs --skip-vae --e2e-mode '' --json "$OUT/autotune.json"
}

step_fp8_matmul() {
    run fp8_matmul "$PY" benchmarks/bench_1080p.py "${DIT[@]}" --modes histream+,histream --compile --fp8-matmul \
        --skip-vae --e2e-mode '' --json "$OUT/fp8_matmul.json"
    run profile_fp8 "$PY" benchmarks/profile_denoise.py "${DENOISE_PROFILE[@]}" --mode histream --compile --fp8-matmul
    run quality_fp8 "$PY" benchmarks/quality_delta.py "${QUALITY[@]}" --dtype bf16 --variants fp8-matmul \
        --json "$OUT/quality_fp8.json"
}

STEPS=(targets vae-conv vae-decode latency fp8-matmul profile-denoise attention vae-options tiles-taehv-quality long
       autotune)
if [[ "${1:-}" == all ]]; then
    for step in "${STEPS[@]}"; do "step_${step//-/_}"; done
elif [[ " ${STEPS[*]} " == *" ${1:-none} "* ]]; then
    "step_${1//-/_}"
else
    (IFS="|"; echo "usage: $0 {${STEPS[*]}|all}" >&2)
    exit 2
fi
if (( ${#FAILED[@]} )); then
    echo "failed: ${FAILED[*]} (see $OUT/<name>.txt)" >&2
    exit 1
fi
