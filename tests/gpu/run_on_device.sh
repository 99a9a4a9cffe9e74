#!/usr/bin/env bash
# The GPU check on a machine with one CUDA GPU, in one command without make (docs/contributing.md):
#   bash tests/gpu/run_on_device.sh OUT_DIR
# 1. installs the wheels carried in .whl/ (opacus is not on the lent machines' image) into /tmp/site;
# 2. runs the suite (tests/gpu) under a hard time limit, junit XML and log under OUT_DIR;
# 3. runs benchmarks/gpu.py under its own limit, JSON + PNG + log under OUT_DIR.
# Both phases always run; the exit status is the suite's, or the benchmark's when the suite passed.
# Limits (seconds): SUITE_TIMEOUT (330) and BENCH_TIMEOUT (200), inside a 600 s command limit.
set -u
OUT_DIR=${1:?usage: bash tests/gpu/run_on_device.sh OUT_DIR}
PY=${GPU_PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__)"
  "$PY" -c "import opacus; print('opacus', opacus.__version__)"; } >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 6 --dist loadfile")
# SIGINT first: pytest stops and still writes the junit XML and the summary; KILL 20 s later
set -o pipefail
timeout -s INT -k 20 "${SUITE_TIMEOUT:-330}" "$PY" -m pytest -q -m cuda tests/gpu -rfEsxX --durations=30 $XDIST \
  --junitxml="$OUT_DIR/junit.xml" 2>&1 | tee "$OUT_DIR/suite.log"
suite=$?
timeout -s INT -k 20 "${BENCH_TIMEOUT:-200}" "$PY" benchmarks/gpu.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log"
bench=$?
echo "suite exit $suite (124: stopped at its limit), benchmark exit $bench" | tee "$OUT_DIR/status.txt"
[ "$suite" -ne 0 ] && exit "$suite"
exit "$bench"
