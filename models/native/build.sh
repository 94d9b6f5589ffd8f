#!/usr/bin/env bash
# Builds libconv_onednn.so (models/onednn.py) from conv_onednn.cc against the oneDNN and
# XLA FFI headers of the given Python environment (default: the project's .venv). setup.sh runs it.
#   bash models/native/build.sh [PYTHON]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-$here/../../.venv/bin/python}"
prefix="$("$python" -c 'import sys; print(sys.prefix)')"
ffi_include="$("$python" -c 'import jax.ffi; print(jax.ffi.include_dir())')"
mkdir -p "$here/build"
g++ -std=c++17 -O2 -fPIC -shared -fopenmp \
  -isystem "$prefix/include" -isystem "$ffi_include" \
  "$here/conv_onednn.cc" -o "$here/build/libconv_onednn.so.tmp" \
  -L"$prefix/lib" -ldnnl -Wl,-rpath,"$prefix/lib"
mv "$here/build/libconv_onednn.so.tmp" "$here/build/libconv_onednn.so"
