"""A run's report: its tables (`tables`) and plots (`plots`), one set per device the run was timed on."""

from __future__ import annotations

from pathlib import Path

from skipbench.batch_report import write_batch_report
from skipbench.errors import UserError
from skipbench.plots import plot_run
from skipbench.summary import device_slug, load_summary, run_devices
from skipbench.tables import provenance_notes, write_tables


def write_report(run_dir: Path | str, *, peak_bandwidth: float | None = None, peak_flops: float | None = None,
                 plots: bool = True, device: str | None = None) -> list[Path]:
    """Write a run's tables (and plots); return the files written. A run timed on several devices gets each
    file once per device (tables ``..._<device>``, plots in ``plots/<device>/``): times are never pooled
    across devices."""
    run_dir = Path(run_dir)
    devices = run_devices(run_dir) if device is None else [device]
    if len(devices) > 1:
        return [path for name in devices for path in write_report(run_dir, peak_bandwidth=peak_bandwidth,
                                                                  peak_flops=peak_flops, plots=plots, device=name)]
    summary, manifest = load_summary(run_dir, peak_bandwidth=peak_bandwidth, peak_flops=peak_flops, device=device)
    if summary.empty:
        raise UserError(f"{run_dir} holds no finished cell yet (a cell is finished when every prompt is measured): "
                        f"run or resume its sweep first")
    written = write_tables(run_dir, summary, manifest, device)
    where = run_dir / "plots" / (device_slug(device) if device else "")
    if plots:
        written += plot_run(summary, manifest, where)
    written += write_batch_report(summary, run_dir / "tables", where if plots else None, provenance_notes(manifest),
                                  device_slug(device) if device else None)
    return written
