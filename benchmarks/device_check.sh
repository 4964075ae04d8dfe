#!/usr/bin/env bash
# The accelerator check on a machine with a GPU (or a TPU VM): under 8 minutes.
#
#   bash benchmarks/device_check.sh            # install what is missing, then measure
#   bash benchmarks/device_check.sh --smoke    # CPU: every section at tiny sizes
#
# Installs nothing beyond the project: `pip install -e '.[cuda]'` on a GPU machine,
# '.[tpu]' on a TPU VM, '.' on CPU, and only when scaler or jax's accelerator backend is
# missing (DEVICE_CHECK_NO_INSTALL=1: never). Figures go to benchmarks/results/device/;
# see benchmarks/device_check.py for what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."

extra="" want=""
if [[ " $* " != *" --smoke "* ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extra="[cuda]" want="gpu"
  elif compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null; then
    extra="[tpu]" want="tpu"
  fi
fi
ready() {   # scaler imports, and jax's default backend is the accelerator (if any)
  python3 - "$want" <<'PY' >/dev/null 2>&1
import sys
import jax, scaler  # noqa: F401
want = sys.argv[1]
sys.exit(0 if not want or jax.default_backend() == want else 1)
PY
}
if [[ "${DEVICE_CHECK_NO_INSTALL:-0}" != 1 ]] && ! ready; then
  echo "device_check: installing the project: pip install -e '.${extra}'"
  python3 -m pip install -q -e ".${extra}"
fi
exec python3 benchmarks/device_check.py "$@"
