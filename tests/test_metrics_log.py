"""metrics.jsonl: a row cut by a kill (or still being written) is never read as a row."""

import json
import struct

import pytest

from dpjax import metrics_log


def test_read_skips_an_unterminated_last_row_and_resume_drops_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(rows) + '{"step": 4, "lo')  # killed while writing step 4
    assert [r["step"] for r in metrics_log.read(str(tmp_path))] == [1, 2, 3]
    # Resuming from the checkpoint of step 2 keeps steps <= 2 and appends after them.
    log = metrics_log.MetricsLog(str(tmp_path), resume_step=2, tensorboard=False)
    log.write(3, {"loss": 0.5})
    log.close()
    assert [(r["step"], r["loss"]) for r in metrics_log.read(str(tmp_path))] == [
        (1, 1.0), (2, 0.5), (3, 0.5)
    ]


def test_read_refuses_a_corrupt_complete_row(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        metrics_log.read(str(tmp_path))


def _tensorboard_events(folder):
    """Every event in the TFRecord event files under ``folder``, in file order."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4  # length, its CRC, the record, its CRC
    return events


def test_a_resume_purges_the_killed_runs_later_tensorboard_points(tmp_path):
    """TensorBoard's files are append-only: the resumed writer must record a purge from
    the restored step + 1, or the killed run's steps after its checkpoint show twice."""
    pytest.importorskip("tensorboardX")
    log = metrics_log.MetricsLog(str(tmp_path), resume_step=0)
    for step in (1, 2, 3, 4):
        log.write(step, {"loss": 1.0 / step})
    log.close()
    assert not any(e.HasField("session_log") for e in _tensorboard_events(tmp_path / "tensorboard"))
    log = metrics_log.MetricsLog(str(tmp_path), resume_step=2)  # Restored step 2.
    log.write(3, {"loss": 0.25})
    log.close()
    purges = [e.step for e in _tensorboard_events(tmp_path / "tensorboard")
              if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert purges == [3], purges
