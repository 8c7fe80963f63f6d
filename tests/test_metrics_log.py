"""metrics.jsonl: a row cut by a kill (or still being written) is never read as a row."""

import json

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
