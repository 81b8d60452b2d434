#!/usr/bin/env bash
# The one-shot GPU check (issue 20): bench/gpu_check.py's steps, time-boxed, JSON into $OUT.
#   On the GPU machine:  bash bench/gpu_check.sh             (at most 500 s)
#   Dry run, no GPU:     bash bench/gpu_check.sh --dry-run   (OUT defaults to bench/results/gpu_check)
# The GPU machine has no editable install of splitserve: when `import splitserve.engine`
# fails, a throw-away package folder maps splitserve.* onto this tree as pyproject.toml does.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OUT="${OUT:-$ROOT/bench/results/gpu_check}"
mkdir -p "$OUT"
if [[ -n "${GPU_CHECK_SHIM:-}" ]] || ! "$PYTHON" -c "import splitserve.engine" >/dev/null 2>&1; then
  SHIM="$(mktemp -d)"
  mkdir -p "$SHIM/splitserve"
  for sub in engine kernels kvtransfer proto; do ln -s "$ROOT/$sub" "$SHIM/splitserve/$sub"; done
  cat > "$SHIM/splitserve/__init__.py" <<PY
__path__ = [__path__[0], "$ROOT/services"]
exec(compile(open("$ROOT/services/__init__.py").read(), "$ROOT/services/__init__.py", "exec"))
PY
  export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  echo "[gpu_check] splitserve mapped from $SHIM"
fi
# A hard cap over the whole run, beyond each step's own time box.
timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-500}" "$PYTHON" bench/gpu_check.py --python "$PYTHON" --out "$OUT" "$@"
rc=$?
[[ -n "${SHIM:-}" ]] && rm -rf "$SHIM"
exit $rc
