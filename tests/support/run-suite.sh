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
out=$(mktemp)
XENDDEV_COVERAGE_RC="$root/.coveragerc" COVERAGE_FILE="$root/.coverage" \
    "$py" -m twisted.trial "${tests[@]}" 2>&1 | tee "$out"
trial_status=$?
echo "== coverage"
"$py" -m coverage combine --quiet
"$py" -m coverage report

"$py" tests/support/summarize.py "$out"
sum_status=$?
rm -f "$out"
[ $trial_status -ne 0 ] && status=1
[ $sum_status -ne 0 ] && status=1
exit $status
