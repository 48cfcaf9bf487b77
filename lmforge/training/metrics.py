"""metrics.jsonl (one JSON object per line), its TensorBoard mirror, and the loss-curve PNG.

The JSON lines are the record of truth: ``lmforge logs`` and the plots read them. Every numeric field
is also written as a TensorBoard scalar under ``<metrics folder>/tensorboard/`` so a run can be watched
live with ``tensorboard --logdir``.
"""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

from lmforge.artifacts import atomic_write_text

TENSORBOARD_FLUSH_SECONDS = 10

_warned_no_tensorboard = False


def read_jsonl_records(path: Path) -> list[dict]:
    """The JSON objects in ``path``, skipping (with a warning on stderr) lines that do not parse.

    A run killed mid-write leaves a partial last line; losing that one record is better than losing
    the whole log to a traceback.
    """
    path = Path(path)
    if not path.exists():
        return []
    records, bad_lines = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad_lines.append(number)
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:5])) + (", ..." if len(bad_lines) > 5 else "")
        print(f"warning: skipped {len(bad_lines)} unreadable line(s) in {path} (line {shown}); "
              "a run that was killed can leave a partial last line", file=sys.stderr)
    return records


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(-1, 2)
            return handle.read(1) != b"\n"
    except OSError:  # missing or empty: nothing to end
        return False


def tensorboard_scalars(record: dict) -> dict[str, float]:
    """The TensorBoard tags and values a metrics record becomes (events are handled apart).

    A record holding ``val_*`` fields is a validation record: all its numbers go under ``val/`` (so
    ``val_loss`` is ``val/loss``); any other record's numbers go under ``train/``.
    """
    is_validation = any(key.startswith("val_") for key in record)
    scalars = {}
    for key, value in record.items():
        # bool is an int to Python, but a flag is not a curve.
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if is_validation:
            scalars["val/" + key.removeprefix("val_")] = float(value)
        else:
            scalars["train/" + key] = float(value)
    return scalars


class MetricsLog:
    """Appends metrics records to a JSON-lines file and mirrors them to TensorBoard.

    Records carry a ``step``; event records (spikes, skipped steps, early stop) also carry an
    ``"event"`` name. Call ``close()`` when done so TensorBoard's last points reach the disk (it is
    also done when the object is garbage-collected or the interpreter exits).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard_dir = self.path.parent / "tensorboard"
        self._writer = None
        self._close_writer = None
        self._event_counts: dict[str, int] = {}
        self._tail_checked = False

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run re-logs them, so the file shows one curve."""
        self.close()  # the next writer purges TensorBoard's stale steps too (see _tensorboard)
        if not self.path.exists():
            return
        kept = [record for record in read_jsonl_records(self.path) if record.get("step", 0) <= step]
        # Atomic: a crash here must not lose the records that are kept.
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        self._tail_checked = True

    def write(self, record: dict) -> None:
        step = record.get("step")
        writer = self._tensorboard() if isinstance(step, int) and not isinstance(step, bool) else None
        # A killed run's partial last line has no newline; without one our record would be glued to it.
        separator = "" if self._tail_checked or not _ends_mid_line(self.path) else "\n"
        self._tail_checked = True
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(separator + json.dumps(record) + "\n")
        if writer is not None:
            self._mirror(writer, record)

    def records(self) -> list[dict]:
        return read_jsonl_records(self.path)

    def close(self) -> None:
        """Flush and close the TensorBoard writer; safe to call more than once."""
        if self._close_writer is not None:
            self._close_writer()  # a weakref.finalize runs at most once
        self._writer = self._close_writer = None

    def _tensorboard(self):
        """The SummaryWriter, created on first use (None if TensorBoard is not installed)."""
        global _warned_no_tensorboard
        if self._writer is not None:
            return self._writer
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            if not _warned_no_tensorboard:
                _warned_no_tensorboard = True
                print(f"warning: TensorBoard unavailable ({exc}); metrics go to {self.path.name} only "
                      "(pip install tensorboard)", file=sys.stderr)
            return None
        # TensorBoard must show what the JSON lines hold: events a killed or restarted run left past
        # the last step kept in the file are stale, and a START at purge_step makes TensorBoard drop them.
        existing = [record for record in self.records() if isinstance(record.get("step"), int)]
        purge_step = max((record["step"] for record in existing), default=-1) + 1
        self._event_counts = {}
        for record in existing:
            if "event" in record:
                self._event_counts[str(record["event"])] = self._event_counts.get(str(record["event"]), 0) + 1
        self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=purge_step, flush_secs=TENSORBOARD_FLUSH_SECONDS)
        # Closing through a finalizer flushes the last points even when the caller never calls close().
        self._close_writer = weakref.finalize(self, self._writer.close)
        return self._writer

    def _mirror(self, writer, record: dict) -> None:
        step = record["step"]
        if "event" in record:
            name = str(record["event"])
            self._event_counts[name] = self._event_counts.get(name, 0) + 1
            # Cumulative, so the curve shows both when events happened and how many there were.
            writer.add_scalar(f"events/{name}", self._event_counts[name], step)
            details = ", ".join(f"{key}={value}" for key, value in record.items() if key not in ("step", "event"))
            writer.add_text("events", f"step {step}: {name}" + (f" ({details})" if details else ""), step)
            writer.flush()
            return
        for tag, value in tensorboard_scalars(record).items():
            writer.add_scalar(tag, value, step)
        if any(key.startswith("val_") for key in record):
            writer.flush()  # validation is rare and the point people wait for


def plot_loss_curve(records: list[dict], out_path: Path, title: str = "") -> Path | None:
    """Train and validation loss against tokens seen; returns the PNG path (None if nothing to plot)."""
    train = [(r["tokens_seen"], r["loss"]) for r in records if "loss" in r and "tokens_seen" in r and "event" not in r]
    val = [(r["tokens_seen"], r["val_loss"]) for r in records if "val_loss" in r and "tokens_seen" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; the figure only goes to a file
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        axes.plot(*zip(*val), label="validation loss", marker="o", linewidth=1.5)
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, out_path)


def save_figure(figure, out_path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path)
    plt.close(figure)
    return out_path
