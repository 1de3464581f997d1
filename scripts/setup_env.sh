# Sourced by the project's entry scripts: creates .venv with the CPU build of torch and the project installed.
# torch is installed first and pinned, so that the `torch>=2.6` requirement does not pull a multi-GB CUDA build.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_NO_ADVISORY_WARNINGS=1
PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -c constraints.txt -e ".[dev]"
# A second environment with an older transformers and without this package, where the tests load a checkpoint's
# remote code as a user of that release would (vLLM and SGLang pin transformers below 5.21).
if [[ ! -x .venv-transformers-5.19/bin/python ]]; then
  "$PYTHON" -m venv .venv-transformers-5.19
fi
if ! .venv-transformers-5.19/bin/python -c "import transformers, torch" 2>/dev/null; then
  .venv-transformers-5.19/bin/pip install --quiet "torch==2.13.0"
  .venv-transformers-5.19/bin/pip install --quiet "transformers==5.19.0" "safetensors==0.8.0"
fi
# transformers' own model test mixins (`ModelTesterMixin`, `ConfigTester`): not in its wheel, so taken from the
# 5.23.0 source distribution on the package registry, once, into .cache (the tests then run offline). Its top-level
# tests/test_*.py only: the sdist has no tests/generation/ or tests/exporters/ (tests/transformers_common.py stands in).
TRANSFORMERS_TESTS=.cache/transformers-5.23.0-tests/transformers_tests
if [[ ! -f "$TRANSFORMERS_TESTS/test_modeling_common.py" ]]; then
  mkdir -p "$TRANSFORMERS_TESTS" .cache/sdist
  .venv/bin/pip download --quiet --no-deps --no-binary :all: "transformers==5.23.0" -d .cache/sdist
  tar xzf .cache/sdist/transformers-5.23.0.tar.gz -C "$TRANSFORMERS_TESTS" --strip-components=2 --wildcards \
    "transformers-5.23.0/tests/test_*.py"
  touch "$TRANSFORMERS_TESTS/__init__.py"
fi
