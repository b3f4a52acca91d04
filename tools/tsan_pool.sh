#!/usr/bin/env bash
# Builds the thread pool (csrc/parallel.cpp) with a stress test under
# ThreadSanitizer and runs it: a data race in the pool's hand-out fails it.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"${CXX:-c++}" -std=c++17 -O1 -g -fsanitize=thread -pthread tools/pool_stress.cpp csrc/parallel.cpp -o "$work/pool_stress"
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" "$work/pool_stress"
