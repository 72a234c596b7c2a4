"""The cluster scale benchmark (``bench/bench_cluster_nodes.py``) run small, for its counts.

docs/cluster.md extrapolates a cluster's capacity from what this benchmark measures: engine
requests per client connect constant in the node count, watch events per write growing
with it (1.5 N with a cluster secret). Those are counts, not times, so they hold on a
loaded machine, and a change that breaks the model (or the benchmark) shows here first.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import needs_etcd

pytestmark = [needs_etcd, pytest.mark.slow]

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "bench_cluster_nodes.py"


def test_the_scale_model_counts_hold_for_two_and_three_nodes(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            *("--nodes", "2", "3", "--clients", "6", "--ttl", "2", "--timeout", "60"),
            *("--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        env={**os.environ, "PYTHONPATH": str(BENCH.parent.parent / "src")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())
    assert [row["nodes"] for row in rows] == [2, 3]
    for row in rows:
        nodes = row["nodes"]
        # one Put (the identity) and one Txn (the claim) per connect, whatever N
        assert row["engine_ops_per_connect"] == {"Txn": 1.0, "Put": 1.0}, row
        # every write reaches each node's watch of clients/ or of the whole prefix
        assert row["events_per_write"] == pytest.approx(1.5 * nodes), row
        assert row["mirrors"] == row["mirrors_expected"] == 6 * (nodes - 1), row
        assert row["failover_clients"] == 6 // nodes, row  # node 0's share moved
        assert row["claims_refused_retried"] == 0, row
        assert row["connects_failed_retried"] == 0, row
