#!/usr/bin/env bash
# GPU check (issue 10): `benchmarks/gpu_check.sh --out DIR` on a CUDA machine, `--dry-run` on a CPU.
# Uses $PYTHON if set, else the repository's .venv, else python3; all flags go to gpu_check.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then py="$here/../.venv/bin/python"; else py=python3; fi
fi
exec "$py" "$here/gpu_check.py" "$@"
