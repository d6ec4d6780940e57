"""The suite's own machinery in conftest.py: the lock pytest-xdist workers take turns with."""
import os
import subprocess
import sys

from conftest import held_across_workers, shared_tmp_dir

# another process's attempt at the lock, without waiting: exit status 0 if it got it, 1 if it is held
TRY_LOCK = """
import fcntl, sys
with open(sys.argv[1], "w") as handle:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(1)
"""


def other_process_gets(lock_file) -> bool:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(lock_file)]).returncode == 0


def test_lock_is_exclusive_while_held(tmp_path_factory):
    lock_file = shared_tmp_dir(tmp_path_factory) / "test_conftest.lock"
    with held_across_workers(tmp_path_factory, "test_conftest"):
        assert not other_process_gets(lock_file)
    assert other_process_gets(lock_file)


def test_shared_dir_is_the_runs_own(tmp_path_factory):
    """Under pytest-xdist a worker's temporary root is <the run's root>/popen-<worker>, so its parent is
    the run's and no other run's; without xdist the run's root itself."""
    base = tmp_path_factory.getbasetemp()
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        assert base.name == f"popen-{worker}"
        assert shared_tmp_dir(tmp_path_factory) == base.parent
    else:
        assert shared_tmp_dir(tmp_path_factory) == base
