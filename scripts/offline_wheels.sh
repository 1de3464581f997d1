#!/usr/bin/env bash
# Wheels for a GPU machine without network that has a CUDA build of PyTorch and the usual Hugging Face packages, but
# an older transformers: the pinned transformers (constraints.txt), for Python 3.12 on x86-64 Linux, into .wheels/
# (git-ignored). Its own requirements (huggingface-hub >= 1.31, tokenizers >= 0.23.1, safetensors >= 0.8) are left to
# the machine: name more packages after the Python version to carry them too. Copy the repository with .wheels/ (and .cache/gpu-corpus, from
# `python benchmarks/gpu_check.py --prepare_corpus`), then there:
#   python3 -m pip install --no-index --no-deps --target /tmp/site .wheels/*.whl
#   PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --device cuda
# Usage: bash scripts/offline_wheels.sh [PYTHON_VERSION [PACKAGE|NAME==VERSION ...]]   (default: 3.12 transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
shift || true
packages=("${@:-transformers}")
# A package is taken at its constraints.txt pin; NAME==VERSION names one that is not pinned there.
pin() {
  [[ "$1" == *==* ]] && { echo "$1"; return; }
  grep -E "^$1==" constraints.txt || { echo "$1 is not pinned in constraints.txt: give NAME==VERSION" >&2; exit 1; }
}
pins=()
for package in "${packages[@]}"; do
  pins+=("$(pin "$package")")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p .wheels
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  "${platforms[@]}" -d .wheels "${pins[@]}"
ls .wheels
