"""Locks on filesystems without flock (Lustre without -o flock, NFS with nolock)."""

import errno
import fcntl

import pytest

from dpjax import file_lock, workdir_guard
from dpjax.eval import resumable_array


def _no_locks(f, op):
    raise OSError(errno.ENOSYS, "Function not implemented")


def test_a_filesystem_without_locks_is_not_another_process(tmp_path, monkeypatch):
    """flock's ENOSYS was reported as 'Another dpjax process (pid unknown) is training',
    so every run on such a filesystem failed with a false message."""
    monkeypatch.setattr(fcntl, "flock", _no_locks)
    with pytest.warns(UserWarning, match="does not support file locks"):
        assert workdir_guard.lock_workdir(str(tmp_path)) is None
    # The lock file it created is gone (unheld, it marks nothing): a new run that then
    # fails leaves an empty folder, which its cleanup removes.
    assert not (tmp_path / workdir_guard.LOCK_FILE).exists()
    logs = []
    with resumable_array.exclusive_lock(tmp_path / "a.lock", logs.append):
        pass
    assert len(logs) == 1 and "does not support file locks" in logs[0]
    no_log = resumable_array.exclusive_lock(tmp_path / "b.lock")  # Warns instead.
    with pytest.warns(UserWarning, match="does not support file locks"), no_log:
        pass


def test_a_held_lock_and_other_failures(tmp_path, monkeypatch):
    held = workdir_guard.lock_workdir(str(tmp_path))
    try:
        with open(tmp_path / workdir_guard.LOCK_FILE, "a+") as f:
            assert file_lock.try_lock(f) == (file_lock.HELD, None)
        with pytest.raises(workdir_guard.WorkdirError, match="Another dpjax process"):
            workdir_guard.lock_workdir(str(tmp_path))
    finally:
        held.close()

    def bad_descriptor(f, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", bad_descriptor)
    with pytest.raises(workdir_guard.WorkdirError, match="Cannot lock .*Bad file descriptor"):
        workdir_guard.lock_workdir(str(tmp_path))


def test_a_workdir_refused_for_lack_of_space_is_not_left_behind(tmp_path):
    """The free-space refusal created the workdir and left it empty (crash review)."""
    wd = tmp_path / "new"
    with pytest.raises(workdir_guard.WorkdirError, match="MiB free under"):
        workdir_guard.check_workdir(str(wd), min_free_bytes=2**62)
    assert not wd.exists()
    wd.mkdir()  # A folder that was there before stays.
    with pytest.raises(workdir_guard.WorkdirError, match="MiB free under"):
        workdir_guard.check_workdir(str(wd), min_free_bytes=2**62)
    assert wd.exists()
