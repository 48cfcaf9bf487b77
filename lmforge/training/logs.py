"""`lmforge logs RUN`: a run's training summary from its metrics.jsonl, and its plots.

Works on a finished run and on one still training (the JSON lines are appended as it goes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.training.metrics import plot_loss_curve, read_jsonl_records, save_figure

SMOOTHING_RECORDS = 10


def find_metrics(run: Path) -> Path:
    """RUN/logs/metrics.jsonl; a logs folder or the metrics file itself are accepted too."""
    run = Path(run)
    if not run.exists():
        raise LmforgeError(f"no run folder {run}; train one first with `lmforge pretrain` (or `lmforge run`)")
    for candidate in (run / "logs" / "metrics.jsonl", run / "metrics.jsonl", run):
        if candidate.is_file():
            return candidate
    raise LmforgeError(f"no training metrics in {run} (expected {run / 'logs' / 'metrics.jsonl'}); "
                       "train first with `lmforge pretrain` (or `lmforge run`)")


def _finite(values) -> list[float]:
    return [float(value) for value in values
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict]) -> dict:
    """The numbers `lmforge logs` reports; a value is None where the log holds nothing to compute it."""
    train = [record for record in records if "loss" in record and "event" not in record]
    val = [record for record in records if isinstance(record.get("val_loss"), (int, float)) and math.isfinite(record["val_loss"])]
    losses = _finite(record["loss"] for record in train)
    speeds = _finite(record.get("tokens_per_second") for record in train)
    mfus = _finite(record.get("mfu") for record in train)
    best = min(val, key=lambda record: record["val_loss"]) if val else None
    events: dict[str, int] = {}
    for record in records:
        if "event" in record:
            events[str(record["event"])] = events.get(str(record["event"]), 0) + 1
    return {
        "steps": int(max(_finite(record.get("step") for record in records), default=0)),
        "tokens_seen": int(max(_finite(record.get("tokens_seen") for record in records), default=0)),
        "elapsed_seconds": max(_finite(record.get("elapsed_seconds") for record in records), default=None),
        "tokens_per_second_mean": _mean(speeds),
        "tokens_per_second_last": speeds[-1] if speeds else None,
        "mfu_mean": _mean(mfus),
        "train_records": len(losses),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        # One logged step is noisy; the mean of the last few is what the run actually reached.
        "train_loss_last_smoothed": _mean(losses[-SMOOTHING_RECORDS:]),
        "train_loss_min": min(losses, default=None),
        "val_loss_best": best["val_loss"] if best else None,
        "val_loss_best_step": best.get("step") if best else None,
        "val_loss_last": val[-1]["val_loss"] if val else None,
        "val_loss_last_step": val[-1].get("step") if val else None,
        "events": events,
    }


def plot_training(records: list[dict], out_path: Path, title: str = "") -> Path | None:
    """Four panels: train and validation loss against tokens seen; learning rate, gradient norm and
    throughput against steps. Event steps (spikes, skipped steps) are marked on the gradient-norm panel.
    Returns the PNG path (None if there is nothing to plot)."""
    train = [record for record in records if "loss" in record and "step" in record and "event" not in record]
    val = [record for record in records if "val_loss" in record and "tokens_seen" in record]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; the figure only goes to a file
    import matplotlib.pyplot as plt

    def series(key: str, x: str = "step") -> tuple[list, list]:
        points = [(record[x], record[key]) for record in train if x in record and key in record]
        return [p[0] for p in points], [p[1] for p in points]

    figure, ((loss_axes, lr_axes), (grad_axes, speed_axes)) = plt.subplots(2, 2, figsize=(11, 7), dpi=100)
    loss_axes.plot(*series("loss", "tokens_seen"), label="train", linewidth=1)
    if val:
        loss_axes.plot([r["tokens_seen"] for r in val], [r["val_loss"] for r in val], label="validation", marker="o", linewidth=1.5)
    loss_axes.set(title="loss", xlabel="tokens seen", ylabel="cross-entropy (nats/token)")
    loss_axes.legend()
    lr_axes.plot(*series("lr"), linewidth=1)
    lr_axes.set(title="learning rate", xlabel="step")
    steps, norms = series("grad_norm")
    grad_axes.plot(steps, norms, linewidth=1)
    if norms and min(norms) > 0 and max(norms) > 10 * min(norms):
        grad_axes.set_yscale("log")  # early norms can be orders of magnitude above the settled ones
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"][1:])
    for name in sorted({str(record["event"]) for record in records if "event" in record and "step" in record}):
        color = next(colors, "red")
        for index, step in enumerate(record["step"] for record in records if str(record.get("event")) == name and "step" in record):
            grad_axes.axvline(step, color=color, alpha=0.5, linewidth=1, label=name if index == 0 else None)
    if grad_axes.get_legend_handles_labels()[0]:
        grad_axes.legend()
    grad_axes.set(title="gradient norm (before clipping)", xlabel="step")
    speed_axes.plot(*series("tokens_per_second"), linewidth=1)
    speed_axes.set(title="throughput", xlabel="step", ylabel="tokens/s")
    for axes in (loss_axes, lr_axes, grad_axes, speed_axes):
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    return save_figure(figure, out_path)


def summarize_run(run: Path) -> dict:
    """Summarize RUN's metrics and (re)draw its plots next to them; returns the summary with the paths."""
    metrics = find_metrics(run)
    records = read_jsonl_records(metrics)
    if not records:
        raise LmforgeError(f"{metrics} holds no metrics yet; training writes its first line after step 1")
    folder = metrics.resolve().parent
    name = folder.parent.name if folder.name == "logs" else folder.name
    plots = [plot_loss_curve(records, metrics.parent / "loss_curve.png", title=name),
             plot_training(records, metrics.parent / "training.png", title=name)]
    tensorboard = metrics.parent / "tensorboard"
    return {"run": str(run), "metrics": str(metrics), **summarize(records),
            "plots": [str(path) for path in plots if path is not None],
            "tensorboard": str(tensorboard) if tensorboard.is_dir() else None}


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def format_summary(summary: dict, as_json: bool = False) -> str:
    """The summary as an aligned two-column table (or as JSON)."""
    if as_json:
        return json.dumps(summary, indent=2)
    s = summary
    rows = [("run", s["run"]), ("steps", f"{s['steps']:,.0f}"), ("tokens seen", f"{s['tokens_seen']:,.0f}")]
    if s["elapsed_seconds"] is not None:
        rows.append(("training time", f"{_duration(s['elapsed_seconds'])} (evaluation excluded)"))
    if s["tokens_per_second_mean"] is not None:
        rows.append(("tokens/s", f"mean {s['tokens_per_second_mean']:,.0f}, last {s['tokens_per_second_last']:,.0f}"))
    if s["mfu_mean"] is not None:
        rows.append(("MFU", f"mean {100 * s['mfu_mean']:.1f}%"))
    if s["train_loss_first"] is not None:
        rows.append(("train loss", f"first {s['train_loss_first']:.4f}, last {s['train_loss_last']:.4f} "
                                   f"(mean of last {min(SMOOTHING_RECORDS, s['train_records'])} logged: {s['train_loss_last_smoothed']:.4f}), "
                                   f"min {s['train_loss_min']:.4f}"))
    if s["val_loss_best"] is not None:
        rows.append(("validation loss", f"best {s['val_loss_best']:.4f} at step {s['val_loss_best_step']}, "
                                        f"last {s['val_loss_last']:.4f} at step {s['val_loss_last_step']}"))
    rows.append(("events", ", ".join(f"{name} {count}" for name, count in sorted(s["events"].items())) or "none"))
    for index, path in enumerate(s["plots"]):
        rows.append(("plots" if index == 0 else "", path))
    if s["tensorboard"]:
        rows.append(("TensorBoard", f"tensorboard --logdir {s['tensorboard']}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
