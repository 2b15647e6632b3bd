"""Shared fixtures. Real parts are started by the tests themselves, once per session:
an MLflow server (tests/fixtures/mlflow_server.py), a Ray head (tests/fixtures/ray_cluster.py),
an HTTP file server and an S3-compatible server for shards (tests/fixtures/shard_servers.py).
Helpers the test modules share live in tests/fixtures/ too (cli.py: the `temper` CLI and the CI
job files; shards.py: reading shards as the ranks do); test modules never import each other.
"""

from __future__ import annotations

import os
import signal

import pytest

# The helpers' own asserts (e.g. tests.fixtures.shards.take) report like the tests' asserts.
pytest.register_assert_rewrite("tests.fixtures")

pytest_plugins = [
    "tests.fixtures.mlflow_server", "tests.fixtures.ray_cluster", "tests.fixtures.shard_servers",
    "tests.fixtures.helm", "tests.fixtures.k8s_api", "tests.fixtures.ray_jobs",
]

# The Ctrl-C tests send SIGINT to the `temper` processes they start. A shell that starts a
# command in the background without job control (`make test &` in a script, CI runners)
# sets SIGINT to "ignored", and an ignored signal stays ignored in every child, so `temper`
# would never see the Ctrl-C. A handler here (children start with the default) undoes that.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Keep test runs quiet and offline.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread, and stay fast on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
