"""Training monitoring: metrics.jsonl, its TensorBoard mirror (read back with TensorBoard's own reader),
resumes that keep one curve, and `lmforge logs`."""

import json
import shutil
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmforge.cli import main
from lmforge.training import metrics as metrics_module
from lmforge.training.metrics import MetricsLog


def train_record(step, loss, **extra):
    return {"step": step, "loss": loss, "lr": 1e-3 * step, "grad_norm": 2.0 / step, "tokens_seen": 512 * step,
            "tokens_per_second": 1000.0 + step, "elapsed_seconds": 0.5 * step, **extra}


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows it (stale events after a restart purged)."""
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def test_every_numeric_field_is_mirrored_to_tensorboard(tmp_path):
    log = MetricsLog(tmp_path / "logs" / "metrics.jsonl")
    for step in range(1, 11):
        log.write(train_record(step, 6.0 - 0.1 * step, mfu=0.01 * step, device="cpu"))
        if step % 5 == 0:
            log.write({"step": step, "val_loss": 5.5 - 0.1 * step, "val_bits_per_byte": 2.0, "tokens_seen": 512 * step})
    log.write({"step": 7, "event": "spike", "loss": 9.0})
    log.write({"step": 9, "event": "spike", "loss": 8.0})
    log.close()
    log.close()  # closing twice is harmless

    scalars = tensorboard_scalars(tmp_path / "logs" / "tensorboard")
    records = log.records()
    for field, tag in [("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"), ("mfu", "train/mfu"),
                       ("tokens_per_second", "train/tokens_per_second"), ("tokens_seen", "train/tokens_seen")]:
        expected = {r["step"]: r[field] for r in records if "loss" in r and "event" not in r}
        assert scalars[tag] == pytest.approx(expected, rel=1e-6), tag  # TensorBoard stores float32
    assert scalars["val/loss"] == pytest.approx({r["step"]: r["val_loss"] for r in records if "val_loss" in r}, rel=1e-6)
    assert scalars["val/bits_per_byte"] == {5: 2.0, 10: 2.0}
    assert scalars["events/spike"] == {7: 1.0, 9: 2.0}  # a running count
    assert not any("device" in tag for tag in scalars) and "train/step" not in scalars


def test_a_resume_leaves_one_curve_in_jsonl_and_tensorboard(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    first = MetricsLog(path)
    for step in range(1, 11):
        first.write(train_record(step, float(step)))
    first.write({"step": 10, "val_loss": 4.0, "tokens_seen": 5120})
    first.close()
    # TensorBoard orders event files by name, which starts with the second the writer was created.
    time.sleep(1.1)

    resumed = MetricsLog(path)  # as after a crash: a new process resumes from the step-5 checkpoint
    resumed.truncate_after(5)
    for step in range(6, 9):
        resumed.write(train_record(step, 100.0 + step))
    resumed.close()

    records = resumed.records()
    assert [r["step"] for r in records] == list(range(1, 9))
    expected = {step: float(step) for step in range(1, 6)} | {step: 100.0 + step for step in range(6, 9)}
    assert {r["step"]: r["loss"] for r in records} == expected
    scalars = tensorboard_scalars(tmp_path / "logs" / "tensorboard")
    assert scalars["train/loss"] == expected
    assert not scalars.get("val/loss")  # step 10's validation belonged to the abandoned future


def test_a_partial_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write(train_record(step, 5.0))
    log.close()
    with open(path, "a") as handle:
        handle.write('{"step": 4, "loss": 4.9, "lr"')  # what `kill -9` mid-write leaves

    assert [r["step"] for r in MetricsLog(path).records()] == [1, 2, 3]
    assert "skipped 1 unreadable line" in capsys.readouterr().err

    appended = MetricsLog(path)
    appended.write(train_record(4, 4.8))  # starts a new line instead of gluing onto the fragment
    appended.close()
    assert [r["step"] for r in appended.records()] == [1, 2, 3, 4]
    appended.truncate_after(4)  # a resume rewrites the file without the fragment
    capsys.readouterr()
    assert len(appended.records()) == 4 and capsys.readouterr().err == ""


def test_without_tensorboard_metrics_still_go_to_jsonl(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    monkeypatch.setattr(metrics_module, "_warned_no_tensorboard", False)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(train_record(1, 5.0))
    log.write(train_record(2, 4.9))
    log.close()
    assert len(log.records()) == 2
    assert capsys.readouterr().err.count("warning: TensorBoard unavailable") == 1


def test_logs_summarises_a_trained_run(trained_run, tmp_path, capsys):
    run = tmp_path / trained_run.name
    shutil.copytree(trained_run, run)
    (run / "logs" / "loss_curve.png").unlink()

    assert main(["logs", str(run)]) == 0
    table = capsys.readouterr().out
    for label in ("steps", "tokens seen", "tokens/s", "train loss", "validation loss", "events", "plots"):
        assert label in table
    assert (run / "logs" / "loss_curve.png").stat().st_size > 0
    assert (run / "logs" / "training.png").stat().st_size > 0

    assert main(["logs", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    last_step = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()][-1]["step"]
    assert summary["steps"] == last_step
    assert summary["val_loss_best"] <= summary["val_loss_last"]
    assert sorted(summary["plots"]) == sorted(str(run / "logs" / name) for name in ("loss_curve.png", "training.png"))


def test_logs_reports_events_mfu_and_smoothed_loss(tmp_path, capsys):
    log = MetricsLog(tmp_path / "run" / "logs" / "metrics.jsonl")
    for step in range(1, 21):
        log.write(train_record(step, float(step), mfu=0.25))
    log.write({"step": 12, "event": "spike", "loss": 50.0})
    log.write({"step": 13, "event": "skipped_nonfinite"})
    log.write({"step": 14, "event": "spike", "loss": 40.0})
    log.write({"step": 20, "val_loss": 3.0, "tokens_seen": 10240})
    log.close()

    assert main(["logs", str(tmp_path / "run"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["events"] == {"spike": 2, "skipped_nonfinite": 1}
    assert summary["mfu_mean"] == pytest.approx(0.25)
    assert summary["train_loss_first"] == 1.0 and summary["train_loss_min"] == 1.0 and summary["train_loss_last"] == 20.0
    assert summary["train_loss_last_smoothed"] == pytest.approx(15.5)  # mean of steps 11..20
    assert (summary["val_loss_best"], summary["val_loss_best_step"]) == (3.0, 20)

    assert main(["logs", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    assert "skipped_nonfinite 1, spike 2" in table and "MFU" in table and "25.0%" in table


@pytest.mark.parametrize("make", ["nothing", "empty folder"])
def test_logs_without_metrics_is_a_one_line_error(tmp_path, capsys, make):
    run = tmp_path / "runs" / "mine"
    if make == "empty folder":
        run.mkdir(parents=True)
    assert main(["logs", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert str(run) in err and "lmforge pretrain" in err
