"""Metrics to JSONL (and TensorBoard, W&B, MLflow) on rank 0, and the peak-FLOPs table behind the MFU estimate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from evolm_nemo.fileio import drop_rows_after, writing

# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity).
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops(override_tflops: float | None, device: torch.device) -> float | None:
    """Per-device peak FLOP/s for MFU: the override, a known GPU, or None (CPU: MFU not reported)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def finite_record(value):
    """``value`` with every float that is not finite (NaN, +-inf), at any depth, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_record(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_record(v) for v in value]
    return value


class MetricsWriter:
    """Appends one JSON object per logged iteration to ``metrics.jsonl``; mirrors scalars to TensorBoard and to the
    experiment trackers (``train.tracking.Trackers``: W&B / MLflow runs, already opened), which it closes.

    On resume, records past the resumed iteration (written by the interrupted run) are dropped first, so the file
    reads as one clean run.
    """

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True, truncate_after: int = 0,
                 trackers=None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        self.trackers = trackers
        self.failed = False
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_rows_after(self.path, truncate_after)
        self.file = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=truncate_after + 1)
            except ImportError:  # tensorboard is a pinned dependency; tolerate its absence in slim images
                self.tb = None

    def write(self, record: dict) -> None:
        """One row of metrics.jsonl. A value that is not a finite number (an undefined metric: a one-class AUC, a
        mean over nothing) is written as null: JSON has no NaN or Infinity, and ``json.dumps`` would write them bare
        (not JSON). A diverged loss never gets here: the loop stops on it first (``Stage.finite_keys``)."""
        if not self.enabled:
            return
        record = finite_record(record)
        try:
            with writing(self.path, "run.out_dir"):  # a full disk: one line naming the file
                self.file.write(json.dumps(record, allow_nan=False) + "\n")
                self.file.flush()
        except BaseException:
            self.failed = True
            raise
        if self.tb is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, record["iteration"])
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self, status: str = "FINISHED") -> None:
        """``status``: how the tracker runs end (FINISHED, KILLED: stopped by a signal, FAILED)."""
        if self.trackers is not None:
            trackers, self.trackers = self.trackers, None
            try:
                trackers.close(status)
            except Exception:
                if status == "FINISHED":
                    raise
        if self.enabled:
            try:
                self.file.close()
            except OSError:
                if not self.failed:  # else: the same refused write again, already on its way up
                    raise
            if self.tb is not None:
                self.tb.close()

