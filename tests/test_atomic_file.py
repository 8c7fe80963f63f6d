"""dpjax.atomic_file: a file is replaced whole or not at all."""

import json
import os
import re
import stat

import numpy as np
import pytest

from dpjax import atomic_file


def _listing(folder):
    return sorted(os.listdir(folder))


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("old")
    atomic_file.write_json(path, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    assert _listing(tmp_path) == ["plan.json"]


def test_an_error_inside_the_block_keeps_the_old_file(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old contents")
    with pytest.raises(RuntimeError, match="killed"), atomic_file.atomic_write(path) as f:
        f.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old contents"
    assert _listing(tmp_path) == ["eval.json"]


def test_an_object_json_cannot_encode_touches_nothing(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old contents")
    with pytest.raises(TypeError):
        atomic_file.write_json(path, {"x": object()})
    assert path.read_text() == "old contents"
    assert _listing(tmp_path) == ["eval.json"]


def test_the_new_file_gets_the_umask_permissions_not_mkstemps_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_file.write_text(tmp_path / "config.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "config.json").st_mode) == 0o644


def test_write_npz_round_trips_compressed_and_not(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for compressed in (False, True):
        path = tmp_path / f"s{int(compressed)}.npz"
        atomic_file.write_npz(path, {"images": a, "labels": np.array([0, 1, 2])},
                              compressed=compressed)
        with np.load(path) as f:
            np.testing.assert_array_equal(f["images"], a)
            np.testing.assert_array_equal(f["labels"], [0, 1, 2])
    assert _listing(tmp_path) == ["s0.npz", "s1.npz"]


def test_two_writers_of_one_target_use_different_temporaries(tmp_path):
    path = tmp_path / "x.json"
    with atomic_file.atomic_write(path) as first:
        with atomic_file.atomic_write(path) as second:
            assert first.name != second.name
            second.write("second")
        first.write("first")
    assert path.read_text() == "first"  # The last rename wins; neither is mixed.
    assert _listing(tmp_path) == ["x.json"]


def test_an_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_file.atomic_write(tmp_path / "x", "a"):
        pass


@pytest.mark.parametrize("text, needle", [("[]", "holds a list, not a JSON object"),
                                          ("null", "holds a NoneType"),
                                          ('{"a": 1', "is not valid JSON"),
                                          ('{"b": 1}', "lacks ['a']"),
                                          (b"\xff\xfe{", "is not valid JSON")])
def test_read_json_names_a_damaged_file(tmp_path, text, needle):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(atomic_file.CorruptFileError, match=re.escape(needle)) as e:
        atomic_file.read_json(path, keys=("a",))
    assert str(path) in str(e.value)
    path.write_text('{"a": [1, 2]}')
    assert atomic_file.read_json(path, keys=("a",)) == {"a": [1, 2]}
