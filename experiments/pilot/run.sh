#!/usr/bin/env bash
# The pilot of issue 12 (experiments/pilot/protocol.md): prenorm and block at settings A, B, C,
# seeds 0-3, two runs at a time with one thread each, into experiments/pilot/runs/<setting>/.
#
# Resumable: run it again and finished runs are reused (attnres compare reads their result.json,
# with or without a checkpoint); an interrupted run continues from its last checkpoint. The runs go
# round by round (seed 0 of A, B, C, then seed 1 ...), so a stop leaves every setting with the
# same number of seeds. Commit after each round: git add experiments/pilot && git commit.
#
# Environment:
#   ATTNRES_PYTHON  the Python to use (default: ./.venv/bin/python, else python3); the code is always
#                   this checkout's src/
#   PILOT_JOBS      runs at once (default 2; each run has one thread, fixed in the settings)
#   PILOT_SMOKE=1   a smoke test: 5 steps, 2 seeds, into a temporary folder (or PILOT_OUT), not runs/
#   PILOT_OUT       where the runs go (default experiments/pilot/runs)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/../env.sh"
JOBS="${PILOT_JOBS:-2}"
SETTINGS=(A B C)
SEEDS=4
EXTRA=()
if [ "${PILOT_SMOKE:-0}" = 1 ]; then
    SEEDS=2
    EXTRA=(--train.steps=5 --train.eval_every=5 --train.eval_tokens=1024 --train.checkpoint_every=0)
    OUT="${PILOT_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/pilot-smoke.XXXXXX")/runs}"
else
    OUT="${PILOT_OUT:-$HERE/runs}"
fi
mkdir -p "$OUT"
echo "pilot: settings ${SETTINGS[*]}, seeds 0-$((SEEDS - 1)), $JOBS runs at a time, into $OUT"
for n in $(seq 1 "$SEEDS"); do
    for s in "${SETTINGS[@]}"; do
        say "round $n/$SEEDS: setting $s, seed $((n - 1))"
        "$PY" -m attnres compare --config "$HERE/settings/$s.json" --variants prenorm,block \
            --seeds "$n" --jobs "$JOBS" --out "$OUT/$s" "${EXTRA[@]}"
    done
done
say "pilot runs done"
"$PY" -m attnres.analysis.experiments pilot "$(dirname "$OUT")"
