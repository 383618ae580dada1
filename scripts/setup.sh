#!/usr/bin/env bash
# Sets up what the README's commands need, from nothing: a virtual environment (.venv)
# with torch, and cbn_ext built in place against that torch. Re-running it only does
# what is missing (and rebuilds what changed).
#
#   CBN_TORCH   what to pip-install when no torch is found (default: torch)
#   CBN_VENV    where the virtual environment lives (default: .venv)
#   PYTHON      the interpreter to create it from (default: python3)
#   CBN_CUDA_EMULATION=1    also build the emulated CUDA backend (cbn_ext._emu; CI)
#   CBN_STRICT_WARNINGS=1   fail when the compilers warn (CI)
#   CBN_REBUILD=1           build even when the extension looks up to date
# A torch already installed for $PYTHON (a GPU machine's own build) is reused, not
# replaced: the environment then sees the system's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CBN_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "== setup: reusing the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "== setup: installing ${CBN_TORCH:-torch}"
  "$VPY" -m pip install --disable-pip-version-check "${CBN_TORCH:-torch}"
fi

missing=()
for mod in pytest:pytest ninja:ninja numpy:numpy setuptools:setuptools wheel:wheel \
           matplotlib:matplotlib sklearn:scikit-learn tqdm:tqdm; do
  "$VPY" -c "import ${mod%%:*}" >/dev/null 2>&1 || missing+=("${mod##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== setup: installing ${missing[*]}"
  "$VPY" -m pip install --disable-pip-version-check -q "${missing[@]}"
fi

# rebuild unless the built extension is newer than every source and matches this torch
# and the FORCE_CUDA / FORCE_CPU / CBN_CUDA_EMULATION switches
so=$(ls cbn_ext/_C*.so 2>/dev/null | head -1 || true)
fresh=0
if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -1)" ] &&
   FORCE_CUDA=${FORCE_CUDA:-0} FORCE_CPU=${FORCE_CPU:-0} \
   CBN_CUDA_EMULATION=${CBN_CUDA_EMULATION:-0} "$VPY" -c "
import os, sys, torch, cbn_ext
info = cbn_ext.build_info()
stale = (info['torch'] != torch.__version__.split('+')[0]
         or (os.environ['FORCE_CUDA'] == '1' and not info['cuda'])
         or (os.environ['FORCE_CPU'] == '1' and info['cuda'])
         or (os.environ['CBN_CUDA_EMULATION'] == '1' and not info['cuda_emulation']))
sys.exit(1 if stale else 0)" >/dev/null 2>&1; then
  fresh=1
fi
if [ "$fresh" = 1 ] && [ "${CBN_REBUILD:-0}" != 1 ]; then
  echo "== setup: cbn_ext is up to date ($so; CBN_REBUILD=1 forces a build)"
else
  echo "== setup: building cbn_ext ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
  mkdir -p build
  LOG=build/cbn_ext_build.log
  if ! "$VPY" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v -e . \
      > "$LOG" 2>&1; then
    tail -60 "$LOG"
    echo "== setup: the build failed (full log: $LOG)"
    exit 1
  fi
  grep -E "^ *cbn_ext: " "$LOG" | sed "s/^ *//" | sort -u | sed 's/^/== setup: /' || true
  # compiler diagnostics: gcc's "file:line: warning:", nvcc's "warning #NNN-D", ptxas's
  # "ptxas warning : Registers are spilled ..." (setup.py asks for spill warnings)
  if grep -E ": warning:|warning #[0-9]+|ptxas warning" "$LOG" > build/cbn_ext_warnings.log; then
    echo "== setup: the compilers warned ($(wc -l < build/cbn_ext_warnings.log) lines):"
    head -40 build/cbn_ext_warnings.log
    if [ "${CBN_STRICT_WARNINGS:-0}" = 1 ]; then exit 1; fi
  fi
fi
"$VPY" -c "import cbn_ext; print('== setup: cbn_ext', cbn_ext.__version__, cbn_ext.build_info())"
