#!/usr/bin/env bash
# The prepared GPU check of issue 11 (benchmarks/gpu/check.py has the details). On the device machine, from the
# repository root, with the wheel folder carried (run's carry=["benchmarks/gpu/wheels"]):
#
#     bash benchmarks/gpu/check.sh                 # install the carried wheels, then every part; JSON under $OUT
#     bash benchmarks/gpu/check.sh --dry-run       # CPU box: arguments, wheel list and plan; installs nothing
#     bash benchmarks/gpu/check.sh --smoke         # every part at the tiny shape on this machine (CPU: fp32)
#
# Other arguments go to check.py (--parts, --mbs, --budget-s, ...; check.py --help). The install puts the wheels in
# their own folder (--target, --no-deps: torch, numpy, packaging and PyYAML come from the image) and adds it and the
# repository to PYTHONPATH; it is skipped when megatron-core 0.16.1, hydra-core and omegaconf already import. A
# failed install is recorded and the check goes on (the parts that need megatron then record their errors).
set -u

started=$(date +%s.%N)
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo" || exit 1
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python
else py=python3
fi

for arg in "$@"; do
  if [ "$arg" = "--dry-run" ] || [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
    exec "$py" "$here/check.py" "$@"
  fi
done

wheels=$here/wheels
prev=""
for arg in "$@"; do  # --wheels DIR / --wheels=DIR
  case "$arg" in --wheels=*) wheels=${arg#--wheels=} ;; esac
  [ "$prev" = "--wheels" ] && wheels=$arg
  prev=$arg
done
site=${EVOLM_GPU_SITE:-/tmp/evolm_gpu_site}
log=${TMPDIR:-/tmp}/evolm_gpu_install.log
export PYTHONUNBUFFERED=1

have_stack() {
  "$py" - <<'PY' 2>/dev/null
import sys
from importlib import metadata
try:
    ok = metadata.version("megatron-core") == "0.16.1" and metadata.version("hydra-core") and metadata.version("omegaconf")
except metadata.PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

if have_stack; then
  status=skipped
  echo "install: skipped (megatron-core 0.16.1, hydra-core and omegaconf already import)" >"$log"
else
  shopt -s nullglob
  files=("$wheels"/*.whl)
  if [ "${#files[@]}" -eq 0 ]; then
    status=failed
    echo "install: no wheels in $wheels (run bash benchmarks/gpu/fetch_wheels.sh on the CPU box and carry the folder)" \
      | tee "$log"
  elif timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
         --disable-pip-version-check --target "$site" "${files[@]}" >"$log" 2>&1; then
    status=ok
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    status=failed
    echo "install: pip failed:"; tail -5 "$log"
  fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

"$py" "$here/check.py" --install-status "$status" --install-log "$log" --started-at "$started" "$@"
