#!/usr/bin/env bash
# Builds the extension with AddressSanitizer into a scratch folder and runs the
# given test files (default: the sparse, error, hostile-input, optimizer
# robustness, mixed-precision and DLPack suites)
# against it.  Python itself is not instrumented, so the ASan runtime and
# libstdc++ are preloaded (without libstdc++ first, ASan cannot intercept C++
# exceptions thrown by the extension).
set -euo pipefail
cd "$(dirname "$0")/.."
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(tests/test_sparse.py tests/test_errors.py tests/test_hostile_input.py
                                   tests/test_optimizer_robustness.py tests/test_mixed_precision.py
                                   tests/test_dlpack.py)
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
python -m pip wheel --no-build-isolation --no-deps . -w "$scratch/dist" -q \
  --config-settings=cmake.args="-DCMAKE_CXX_FLAGS=-fsanitize=address;-DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address" \
  --config-settings=build-dir="$scratch/build" --config-settings=cmake.build-type=RelWithDebInfo
mkdir "$scratch/site"
(cd "$scratch/site" && python -m zipfile -e "$scratch"/dist/fastadam-*.whl .)
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$scratch/site" \
  python -m pytest -q -p no:cacheprovider "${suites[@]}"
