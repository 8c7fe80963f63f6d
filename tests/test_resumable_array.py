"""dpjax.eval.resumable_array: chunks saved as they finish, resumed after a kill."""

import json

import numpy as np
import pytest

from dpjax.eval import resumable_array

ROWS = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)


class KilledError(Exception):
    pass


def _compute(calls, kill_at=None):
    def compute(start, stop):
        if kill_at is not None and start >= kill_at:
            raise KilledError
        calls.append((start, stop))
        return ROWS[start:stop] * 2

    return compute


def test_fills_in_chunks_and_returns_everything(tmp_path):
    calls = []
    out = resumable_array.fill_resumably(tmp_path / "a", 23, 5, {"x": 1}, _compute(calls))
    np.testing.assert_array_equal(out, ROWS * 2)
    assert calls == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert json.loads((tmp_path / "a.json").read_text())["done"] == 23
    assert resumable_array.rows_done(tmp_path / "a", 23, 5, {"x": 1}) == 23


def test_a_killed_job_resumes_at_the_first_unfinished_chunk(tmp_path):
    with pytest.raises(KilledError):
        resumable_array.fill_resumably(tmp_path / "a", 23, 5, {"x": 1}, _compute([], 10))
    assert resumable_array.rows_done(tmp_path / "a", 23, 5, {"x": 1}) == 10
    calls, logs = [], []
    out = resumable_array.fill_resumably(tmp_path / "a", 23, 5, {"x": 1}, _compute(calls),
                                         log=logs.append)
    np.testing.assert_array_equal(out, ROWS * 2)
    assert calls == [(10, 15), (15, 20), (20, 23)]
    assert "resuming a.npy at row 10 of 23" in logs[0]
    # Complete: a third call computes nothing.
    calls.clear()
    resumable_array.fill_resumably(tmp_path / "a", 23, 5, {"x": 1}, _compute(calls))
    assert calls == []


@pytest.mark.parametrize("change", ["recipe", "rows", "chunk"])
def test_another_recipe_starts_from_scratch(tmp_path, change):
    with pytest.raises(KilledError):
        resumable_array.fill_resumably(tmp_path / "a", 23, 5, {"x": 1}, _compute([], 10))
    rows, chunk, recipe = 23, 5, {"x": 1}
    if change == "recipe":
        recipe = {"x": 2}
    elif change == "rows":
        rows = 20
    else:
        chunk = 4
    calls = []
    out = resumable_array.fill_resumably(tmp_path / "a", rows, chunk, recipe, _compute(calls))
    assert calls[0][0] == 0
    np.testing.assert_array_equal(out, ROWS[:rows] * 2)


def test_a_complete_array_is_reused_whatever_chunk_filled_it(tmp_path):
    resumable_array.fill_resumably(tmp_path / "a", 23, 5, {"x": 1}, _compute([]))
    calls = []
    out = resumable_array.fill_resumably(tmp_path / "a", 23, 4, {"x": 1}, _compute(calls))
    assert calls == []
    np.testing.assert_array_equal(out, ROWS * 2)
    # But not for another recipe or row count.
    assert resumable_array.rows_done(tmp_path / "a", 23, 4, {"x": 2}) == 0
    assert resumable_array.rows_done(tmp_path / "a", 22, 4, {"x": 1}) == 0


def test_rows_past_the_record_are_recomputed_not_trusted(tmp_path):
    """A kill after the rows were written but before the count was saved."""
    with pytest.raises(KilledError):
        resumable_array.fill_resumably(tmp_path / "a", 23, 5, {"x": 1}, _compute([], 10))
    data = np.load(tmp_path / "a.npy", mmap_mode="r+")
    data[10:15] = -7.0  # Written, never counted.
    data.flush()
    del data
    out = resumable_array.fill_resumably(tmp_path / "a", 23, 5, {"x": 1}, _compute([]))
    np.testing.assert_array_equal(out, ROWS * 2)


@pytest.mark.parametrize("damage", ["json", "json_list", "npy", "missing_npy"])
def test_damaged_files_start_over(tmp_path, damage):
    resumable_array.fill_resumably(tmp_path / "a", 23, 5, {"x": 1}, _compute([]))
    if damage == "json":
        (tmp_path / "a.json").write_text('{"done": 2')
    elif damage == "json_list":
        (tmp_path / "a.json").write_text("[1, 2]")
    elif damage == "npy":
        (tmp_path / "a.npy").write_bytes(b"not numpy")
    else:
        (tmp_path / "a.npy").unlink()
    assert resumable_array.rows_done(tmp_path / "a", 23, 5, {"x": 1}) == 0
    calls = []
    out = resumable_array.fill_resumably(tmp_path / "a", 23, 5, {"x": 1}, _compute(calls))
    assert len(calls) == 5
    np.testing.assert_array_equal(out, ROWS * 2)


def test_wrong_chunk_shape_is_an_error_and_not_counted(tmp_path):
    def compute(start, stop):
        return ROWS[start:stop] if start < 5 else ROWS[start:stop, :2]

    with pytest.raises(ValueError, match=r"returned shape \(5, 2\), expected \(5, 3\)"):
        resumable_array.fill_resumably(tmp_path / "a", 23, 5, {}, compute)
    assert resumable_array.rows_done(tmp_path / "a", 23, 5, {}) == 5
    with pytest.raises(ValueError, match="must be >= 1"):
        resumable_array.fill_resumably(tmp_path / "b", 0, 5, {}, compute)


def test_a_second_process_waits_for_the_first_and_reuses_its_rows(tmp_path):
    import threading

    inside, release = threading.Event(), threading.Event()
    first_calls, second_calls, logs = [], [], []

    def slow(start, stop):
        inside.set()
        release.wait(timeout=30)
        first_calls.append(start)
        return ROWS[start:stop] * 2

    first = threading.Thread(target=resumable_array.fill_resumably,
                             args=(tmp_path / "a", 23, 23, {}, slow))
    first.start()
    assert inside.wait(timeout=30)
    result = {}
    second = threading.Thread(target=lambda: result.update(out=resumable_array.fill_resumably(
        tmp_path / "a", 23, 23, {}, _compute(second_calls), log=logs.append)))
    second.start()
    for _ in range(300):  # The second one announces that it waits.
        if logs:
            break
        threading.Event().wait(0.01)
    assert logs == ["[dpjax] waiting for another process to finish a"]
    release.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert first_calls == [0] and second_calls == []
    np.testing.assert_array_equal(result["out"], ROWS * 2)


def test_progress_is_logged_about_once_a_percent_and_at_the_end(tmp_path):
    logs = []
    rows = 1000
    resumable_array.fill_resumably(
        tmp_path / "b", rows, 3, {}, lambda a, b: np.zeros((b - a, 2)), log=logs.append)
    assert 95 <= len(logs) <= 101, len(logs)  # Not one line per 3-row chunk (334).
    assert logs[-1] == "[dpjax] b.npy: 1000 of 1000 rows"
    few = []
    resumable_array.fill_resumably(
        tmp_path / "c", 5, 2, {}, lambda a, b: np.zeros((b - a, 2)), log=few.append)
    assert few == [f"[dpjax] c.npy: {n} of 5 rows" for n in (2, 4, 5)]


def test_tree_digest_keys_on_shape_dtype_and_bytes_of_any_dtype():
    """The digest is sha256 over each leaf's shape, dtype and bytes (the caches written
    by earlier versions stay valid), for ml_dtypes too, and any change of one changes it."""
    import hashlib

    import ml_dtypes

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    tree = {"a": a.T, "b": np.ones(5, ml_dtypes.bfloat16), "c": np.zeros((0, 2), np.uint8)}
    h = hashlib.sha256()
    for leaf in (a.T, tree["b"], tree["c"]):
        h.update(f"{leaf.shape}{leaf.dtype}".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    assert resumable_array.tree_digest(tree) == h.hexdigest()[:16]
    digests = {resumable_array.tree_digest(t) for t in (
        tree, {**tree, "a": a}, {**tree, "b": np.ones(5, np.float16)},
        {**tree, "a": a.T.copy() + np.float32(1e-6)})}
    assert len(digests) == 4
