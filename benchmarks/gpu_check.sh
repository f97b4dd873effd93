#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as one command for a machine that has one: the
# `cuda`-marked tests, the CLT roofline step and the TopK step against sparsify, each on the
# GPU. Output goes to stdout and to $OUT (default gpu_check/), one file per check.
#
# The machine needs python3 with a CUDA build of torch, numba, scipy, safetensors, tqdm and
# pytest. clt-eval itself is used from this checkout (PYTHONPATH). Its case studies are
# registered through clt_eval.egg-info, which an editable install writes
# (`make .venv/bin/.installed`): copy that folder along with the checkout. sparsify is needed
# only for the TopK comparison: on a machine with no network, copy along the .whl/ folder
# that benchmarks/gpu_wheels.sh fills; without sparsify that check is skipped.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh    # a small run of the script on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 WANDB_MODE=disabled \
    PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/clt-eval-site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/clt-eval-site"
fi
if [ "${QUICK:-0}" = 1 ]; then
    roof=(--layers 2 --features 512 --batch 256 --steps 1)
    topk=(--features 1024 --k 16 --batch 256 --steps 2 --rounds 1)
else
    roof=(--steps 5)
    topk=(--steps 10 --rounds 3)
fi
status=0
run() {  # name, command...: its output to the screen and to $out/name.txt
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "== $name failed"; status=1; }
}
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee "$out/env.txt"
if [ "$device" = cuda ]; then
    run cuda_tests "$py" -m pytest -q -p no:cacheprovider -m cuda tests
fi
run roofline_relu "$py" benchmarks/bench_clt_roofline.py --device "$device" "${roof[@]}"
run roofline_topk "$py" benchmarks/bench_clt_roofline.py --device "$device" --activation topk \
    "${roof[@]}"
if "$py" -c "import sparsify" >/dev/null 2>&1; then
    # sparsify as installed only: its tensors live on the GPU, where the host's malloc
    # setting makes little difference
    for shape in "8192 32" "16384 64"; do
        set -- $shape
        run "topk_${1}_$2" "$py" benchmarks/bench_sparsify.py --device "$device" \
            --sparsify-python "$py" --sparsify-malloc installed --features "$1" --k "$2" \
            "${topk[@]}"
    done
else
    echo "== sparsify does not import here: TopK comparison skipped (benchmarks/gpu_wheels.sh)"
fi
exit $status
