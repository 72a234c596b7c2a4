#!/bin/sh
# Branch coverage of the whole suite, `pytunnel` subprocesses included: pyproject.toml sets
# `[tool.coverage.run] patch = ["subprocess"]` (coverage >= 7.10), so every Python process
# the tests start is measured and its data file combined here.
# Usage: tools/coverage.sh [pytest arguments]
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# coverage cannot see into the modules mypyc compiled: measure the pure build
if python -c 'import sys, pytunnel; sys.exit(0 if pytunnel.__compiled__ else 1)'; then
    echo "coverage.sh: the hot modules are compiled; PYTUNNEL_PURE=1 pip install -e . first" >&2
    exit 2
fi
rm -f .coverage .coverage.*
python -m coverage run -m pytest -q -p no:cacheprovider "$@"
status=$?
python -m coverage combine -q
python -m coverage report
echo
# `--format=total`: the figure alone (the report skips fully covered files, so its last
# line is not always the total)
echo "total:     $(python -m coverage report --format=total) %"
echo "cli/:      $(python -m coverage report --include='src/pytunnel/cli/*' --format=total) %"
echo "protocol/: $(python -m coverage report --include='src/pytunnel/protocol/*' --format=total) %"
exit $status
