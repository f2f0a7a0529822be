#!/usr/bin/env bash
# Runs the linters, the type checker and the trial suite under coverage, then
# ends with the plain line "N passed, N failed[, N skipped]" that CI reads.
set -u -o pipefail
py=${1:-.venv/bin/python}
shift || true
tests=("${@:-tests}")
bin=$(dirname "$py")
status=0

echo "== ruff"
"$bin/ruff" check --output-format concise . || status=1
"$bin/ruff" format --check --quiet . || { echo "ruff format: files need formatting"; status=1; }
echo "== mypy"
"$bin/mypy" || status=1

echo "== trial"
# Coverage of trial and of every Python process the tests start that runs
# our code (tests/support/subprocesscoverage.py, .coveragerc): each writes
# its own data file beside COVERAGE_FILE; they are combined after the run.
root=$(pwd)
"$py" tests/support/subprocesscoverage.py >/dev/null || status=1
rm -f "$root"/.coverage "$root"/.coverage.*
# Every Python process of the run (the daemons, the agents, the CLI, dom0
# and the driver domains of the lane) reads our modules' bytecode instead of
# compiling them again: PYTHONDONTWRITEBYTECODE may be set, and a driver
# domain's initramfs takes the .pyc files it finds (tests/support/realxen/agentroot.py).
"$py" -m compileall -q -j0 xenddev controllers tests twisted >/dev/null || status=1
# The real-Xen lane (tests/test_realxen.py, tests/test_realxen_*.py) runs in a trial process of its
# own, after the rest: its machine (QEMU under TCG, both cores) lives as long
# as its process, and must not slow down the timing-sensitive tests.
# trial -j hands the tests out in the order given: the modules holding the
# longest single tests (30-60 s each under coverage) go first, so that none
# of them starts last and runs on alone while the other workers idle.
slowFirst=(tests.test_xenstored_differential tests.test_packaging tests.test_recovery
           tests.test_inputchecks tests.test_diskspec tests.test_embed)
runs=()
if [ "${tests[*]}" = "tests" ]; then
    rest=() lane=()
    for m in "${slowFirst[@]}"; do [ -f "${m//.//}.py" ] && rest+=("$m"); done
    for f in tests/test_*.py; do
        m=${f%.py}; m=${m//\//.}
        case " ${slowFirst[*]} " in *" $m "*) continue ;; esac
        case $m in tests.test_realxen | tests.test_realxen_*) lane+=("$m") ;; *) rest+=("$m") ;; esac
    done
    runs=("${rest[*]}")
    [ ${#lane[@]} -gt 0 ] && runs+=("${lane[*]}")
else
    runs=("${tests[*]}")
fi
outs=()
trial_status=0
for run in "${runs[@]}"; do
    out=$(mktemp)
    outs+=("$out")
    # shellcheck disable=SC2086 # a run is a space-separated module list
    # Workers for every run but the lane's: XENDDEV_TRIAL_JOBS, one by
    # default. Its tests wait on sockets, timers and subprocesses, so two
    # workers per core fill the waits (on 2 cores, under coverage and the
    # thorough profile: 612 s on one worker, 341 s with 4) — but the first
    # CI run with 4 workers (a pattern over the whole module list had kept
    # CI on one, unnoticed) failed 3 pool tests that share fixed paths
    # (a qemu-storage-daemon's socket under /run/xenddev/qemu) or time a
    # restart tightly: one worker until those are made independent. The
    # lane's machine needs the cores: always one.
    jobs=()
    workers=${XENDDEV_TRIAL_JOBS:-1}
    [ "$workers" -gt 1 ] && jobs=(-j "$workers")
    for m in $run; do
        case $m in tests.test_realxen | tests.test_realxen_*) jobs=() ;; esac
    done
    started=$SECONDS
    XENDDEV_COVERAGE_RC="$root/.coveragerc" COVERAGE_FILE="$root/.coverage" \
        "$py" -m twisted.trial "${jobs[@]}" $run 2>&1 | tee "$out"
    [ "${PIPESTATUS[0]}" -ne 0 ] && trial_status=1
    echo "== trial: $(wc -w <<<"$run") modules in $((SECONDS - started)) s"
done
echo "== coverage"
"$py" -m coverage combine --quiet
"$py" -m coverage report

"$py" tests/support/summarize.py "${outs[@]}"
sum_status=$?
rm -f "${outs[@]}"
[ $trial_status -ne 0 ] && status=1
[ $sum_status -ne 0 ] && status=1
exit $status
