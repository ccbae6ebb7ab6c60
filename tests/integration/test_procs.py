# test-case-name: tests.integration.test_procs
"""
The helper that starts regcache for the real-process tests: a process that
writes a lot to stderr is not stopped by it, a start that fails says why,
and its log is read whole, rotated files included.
"""

import os

import pytest

from tests.integration.procs import Regcache, closed_port

#: Linux's default pipe buffer: what a pipe nobody reads holds before the
#: writer blocks.
PIPE_BUFFER = 64 * 1024


def test_a_chatty_stderr_does_not_stop_the_process(tmp_path):
    """
    A regcache that writes far more to stderr than a pipe holds (every
    import it makes, with PYTHONVERBOSE) still starts and serves: its stderr
    goes to a file, which nobody has to read for the process to go on.
    """
    rc = Regcache(str(tmp_path / "store"), f"http://127.0.0.1:{closed_port()}", env={"PYTHONVERBOSE": "1"})
    try:
        rc.start()
        assert rc.get("/healthz")[0] == 200
        assert os.path.getsize(rc.stderr_path) > PIPE_BUFFER
    finally:
        rc.stop()


def test_a_failed_start_says_why(tmp_path):
    """
    A regcache that cannot start (a bad option) makes ``start`` raise with
    the end of what it wrote to stderr, the one line naming the option, and
    leaves no process behind.
    """
    rc = Regcache(str(tmp_path / "store"), f"http://127.0.0.1:{closed_port()}", ["--tag-ttl", "soon"])
    with pytest.raises(RuntimeError, match=r"regcache: --tag-ttl: not a duration: 'soon'"):
        rc.start()
    assert rc.proc.poll() is not None


def test_the_log_includes_its_rotated_files(tmp_path):
    """
    ``log()`` is every line twistd wrote, oldest first, across the files
    it rotated to (``.2`` older than ``.1``, older than the current one),
    so a count over a long run's log misses nothing.
    """
    rc = Regcache(str(tmp_path / "store"), None)
    for suffix, line in ((".2", "first\n"), (".1", "second\n"), ("", "third\n"), (".tmp", "not a log\n")):
        with open(rc.log_path + suffix, "w") as f:
            f.write(line)
    assert rc.log() == "first\nsecond\nthird\n"
