#!/usr/bin/env bash
# Compile-check the CUDA kernels without a GPU (CI): nvcc on each csrc/cuda/*.cu for each
# arch with warnings as errors (nvcc, host compiler and ptxas; register spills or local-memory
# use in a kernel also fail), then the host-only bindings with g++ -Wall -Wextra -Werror.
# Exits non-zero on the first failure. Env: NVCC (default: nvcc on PATH, else
# $CUDA_HOME/bin/nvcc), FASTATTR_CUDA_ARCHS (default "80;90", as in setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
if [ ! -x "$NVCC" ]; then
  echo "check_cuda: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 2
fi
ARCHS="${FASTATTR_CUDA_ARCHS:-80;90}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

"$NVCC" --version | tail -n 2
HOST_WARN="-Wall,-Wextra,-Werror"
status=0
for src in csrc/cuda/projection.cu csrc/cuda/psg.cu csrc/cuda/curvature.cu; do
  name="$(basename "$src" .cu)"
  for arch in ${ARCHS//;/ }; do
    arch="${arch#sm_}"
    log="$OUT/${name}_sm_${arch}.log"
    echo "== nvcc ${src} for sm_${arch}"
    if ! "$NVCC" -c "$src" -o "$OUT/${name}_sm${arch}.o" \
        -O3 -std=c++17 -Icsrc --expt-relaxed-constexpr \
        -gencode="arch=compute_${arch},code=sm_${arch}" \
        -Werror all-warnings -Xcompiler "-fPIC,${HOST_WARN}" \
        -Xptxas -v,-warn-spills,-warn-lmem-usage,-Werror >"$log" 2>&1; then
      cat "$log" >&2
      echo "check_cuda: ${src} FAILED for sm_${arch}" >&2
      status=1
      continue
    fi
    # one line per kernel: registers, shared memory, spills
    grep -E "Compiling entry|Used [0-9]+ registers|spill" "$log" \
      | sed -E "s/.*Compiling entry function '_ZN8fastattr4cuda[0-9]+_GLOBAL__N__[0-9a-f_]+${name}_cu_[0-9a-f]+[0-9]+([a-z_]+)(IL[ib]([0-9])E(Li([0-9]+)E)?)?.*/  \\1<\\3,\\5>:/; s/<,>//; s/,>/>/" \
      | paste - - - | sed -E 's/ptxas info +: //g; s/[[:space:]]+/ /g'
  done
done

echo "== g++ csrc/cuda/bindings.cpp (host only: no CUDA or torch headers)"
if PYBIND_INC="$(python3 -m pybind11 --includes 2>/dev/null)"; then
  # shellcheck disable=SC2086
  g++ -std=c++17 -fsyntax-only -Wall -Wextra -Werror -Icsrc $PYBIND_INC csrc/cuda/bindings.cpp \
    || { echo "check_cuda: bindings.cpp FAILED" >&2; status=1; }
else
  echo "check_cuda: pybind11 not importable, bindings.cpp not checked" >&2
fi

[ "$status" -eq 0 ] && echo "check_cuda: OK"
exit "$status"
