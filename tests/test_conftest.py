"""The suite's own machinery in conftest.py: the directory and the lock pytest-xdist workers share."""
import os
import subprocess
import sys

import pytest

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


# four tests, so that both workers of a `-n 2` run take some: each writes the shared directory it sees
WHERE_PROBE = """
import os, time
import pytest
from conftest import shared_tmp_dir

@pytest.mark.parametrize("i", range(4))
def test_where(tmp_path_factory, i):
    time.sleep(0.5)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "none")
    with open(os.path.join(os.environ["WHERE_OUT"], f"{worker}-{i}"), "w") as out:
        out.write(str(shared_tmp_dir(tmp_path_factory)))
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["no-xdist", "xdist-2"])
def test_shared_dir_is_the_runs_basetemp(tmp_path, workers):
    """Every worker of a run sees the run's own --basetemp, with or without xdist (a pytest started
    inside an xdist worker, as this one may be, included)."""
    (tmp_path / "test_where.py").write_text(WHERE_PROBE)
    out, basetemp = tmp_path / "where", tmp_path / "basetemp"
    out.mkdir()
    env = {**os.environ, "WHERE_OUT": str(out), "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers,
                          f"--basetemp={basetemp}", str(tmp_path / "test_where.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    seen = {path.name.rsplit("-", 1)[0]: path.read_text() for path in out.iterdir()}
    assert set(seen.values()) == {str(basetemp)}, seen
    if workers:
        assert len(seen) == 2, seen  # both workers, not one
