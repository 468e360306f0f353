# Sourced by experiments/*/run.sh and */analyze: ROOT (the checkout), PY (the Python: $ATTNRES_PYTHON,
# else ./.venv/bin/python, else python3), this checkout's src/ first on PYTHONPATH (so the code that
# runs is the code committed beside the results), and say (a message with the time since START).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${ATTNRES_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
say() { echo "[$(date +%H:%M:%S), $(( ($(date +%s) - START) / 60 )) min] $*"; }
