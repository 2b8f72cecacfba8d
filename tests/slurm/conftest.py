"""Fixtures for the Slurm tests.

Unit tests here need no Slurm. Tests marked ``slurm`` use the ``slurm_cluster`` fixture, which
skips (with the reason) when ``sbatch`` is not on PATH or ``sinfo`` shows no usable node. Set
``ORTHRUS_REQUIRE_SLURM=1`` (``.ci/run`` should) to turn that skip into a failure, so a broken
cluster setup cannot pass as "skipped". Start the cluster with ``.ci/slurm_setup.sh`` (root).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_testlib import Cluster, cluster_problem  # noqa: E402


@pytest.fixture
def slurm_cluster():
    problem = cluster_problem()
    if problem:
        if os.environ.get("ORTHRUS_REQUIRE_SLURM") == "1":
            pytest.fail(f"ORTHRUS_REQUIRE_SLURM=1 but the Slurm cluster is not usable: {problem}")
        pytest.skip(problem)
    cluster = Cluster()
    yield cluster
    cluster.cancel_all()
