"""The tests' warm start (tests/forkserver.py): a forked command answers as a fresh process of the installed script
does, and a test that changed what a new process inherits gets a fresh process."""

import os

import pytest

from tests.conftest import FORKS, evolm_cmd, run_evolm


@pytest.mark.skipif(os.environ.get("EVOLM_TEST_FORK") == "0", reason="EVOLM_TEST_FORK=0: no fork server")
def test_a_forked_command_answers_as_a_fresh_one():
    for args in (["--help"], ["train.iters=x"], ["no_such_key=1"]):
        forked = FORKS.run(evolm_cmd("train", args), 120)
        assert forked is not None  # forked: this process inherits what the server did
        fresh = run_evolm("train", args, check=False, fresh=True)
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    old = os.umask(0o027)  # what a new process inherits changed: not the server's state, so no fork
    try:
        assert FORKS.run(evolm_cmd("train", ["--help"]), 60) is None
    finally:
        os.umask(old)
