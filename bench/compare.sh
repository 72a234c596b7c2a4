#!/usr/bin/env bash
# A/B benchmark of two commits in one interleaved run: bench/compare.sh OLD_REF [NEW_REF] [--quick]
# (NEW_REF defaults to HEAD; WORKTREE measures the checkout with its uncommitted changes). Runs
# bench/compare.py with the active virtual environment's interpreter, or $PYTHON.
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/compare.py" "$@"
