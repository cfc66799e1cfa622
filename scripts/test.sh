#!/usr/bin/env bash
# The test command: set up on a fresh machine (cached afterwards) and run the whole test suite.
#   scripts/test.sh [pytest args]
set -euo pipefail
source "$(dirname "$0")/setup.sh"
step "running tests"
set +e
python -m pytest "$@"
rc=$?
set -e
[ $rc -eq 5 ] && die "pytest collected no tests: nothing was checked"
exit $rc
