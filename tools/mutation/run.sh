#!/usr/bin/env bash
# Mutation run over pytunnel's protocol core, handshake, TLS, policy and relay (docs/mutation.md).
#
#   tools/mutation/run.sh            # full run, then the list of survivors
#   MUTATION_JOBS=1 tools/mutation/run.sh
#   tools/mutation/run.sh 'pytunnel._policy*'   # only mutants whose name matches
#   MUTATION_TOML=tools/mutation/mutmut-sansio.toml tools/mutation/run.sh 'pytunnel.protocol.mux*'
#   MUTATION_TOML=tools/mutation/mutmut-sansio.toml \
#       MUTATION_TESTS='tests/test_mux.py tests/test_mutation_kills.py' \
#       MUTATION_WORKDIR=/tmp/pytunnel-mut-mux tools/mutation/run.sh 'pytunnel.protocol.mux*'
#
# Environment: MUTMUT (the mutmut 3 executable, default: `mutmut` on PATH),
# MUTATION_WORKDIR (scratch copy, default /tmp/pytunnel-mutation), MUTATION_JOBS (default 2),
# MUTATION_TOML (the mutmut table: default mutmut.toml, the wide test selection; the sans-IO
# modules use mutmut-sansio.toml, see docs/mutation.md), MUTATION_TESTS (space-separated test
# files replacing the table's test selection, to narrow a run to one module's own tests).
# The checkout is copied into the scratch directory (tracked and untracked-but-not-ignored
# files, so local edits are included) and mutmut runs there: the checkout never gets a
# mutants/ directory, and a re-run in the same scratch directory reuses mutmut's cache for
# functions whose code has not changed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="${MUTATION_WORKDIR:-/tmp/pytunnel-mutation}"
jobs="${MUTATION_JOBS:-2}"
mutmut="${MUTMUT:-mutmut}"

mkdir -p "$work"
# refresh the copy of the sources but keep mutmut's cache (mutants/) between runs
(cd "$root" && git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - -cf -) | tar -xf - -C "$work"
toml="${MUTATION_TOML:-$here/mutmut.toml}"
if [[ -n "${MUTATION_TESTS:-}" ]]; then
    # one module's own test files instead of the table's list (mutmut takes one list per run)
    python3 - "$toml" "$MUTATION_TESTS" >> "$work/pyproject.toml" <<'PY'
import re
import sys

table = open(sys.argv[1], encoding="utf-8").read()
tests = "".join(f'    "{name}",\n' for name in sys.argv[2].split())
listing = "pytest_add_cli_args_test_selection = [\n" + tests + "]"
print(re.sub(r"pytest_add_cli_args_test_selection = \[.*?\n\]", lambda _: listing, table,
             count=1, flags=re.S))
PY
else
    cat "$toml" >> "$work/pyproject.toml"
fi

cd "$work"
# mutmut puts mutants/src and mutants/ first on sys.path; an outside PYTHONPATH pointing at a
# checkout would shadow the mutated code. Subprocesses the tests start (the CLI) get the
# mutated copy too, so they run the mutant under test rather than an installed pytunnel.
export PYTHONPATH="$work/mutants/src:$work/mutants"
"$mutmut" run --max-children "$jobs" "$@" || true
"$mutmut" results
