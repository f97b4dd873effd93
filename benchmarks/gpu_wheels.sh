#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored through .git/info/exclude), the wheels that
# benchmarks/gpu_check.sh installs on a GPU machine with no network so that sparsify imports
# there: eai-sparsify and what it imports beyond a typical CUDA PyTorch image (which has
# torch, transformers, accelerate, einops, pandas, pyarrow, safetensors). For CPython 3.12 on
# x86-64 Linux, the versions that benchmarks/.venv-sparsify resolved. Then copy .whl/ (and
# clt_eval.egg-info) along with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    eai-sparsify==1.3.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 natsort==8.4.0 \
    schedulefree==1.4.1 simple-parsing==0.1.9 docstring-parser==0.18.0
ls -la .whl
