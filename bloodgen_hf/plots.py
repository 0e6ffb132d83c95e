"""Loss curves from a training run's metrics.jsonl (written by the shared training core), for any model family.

python -m bloodgen_hf.plots runs/vae                      # every loss* metric -> runs/vae/loss_curves.png
python -m bloodgen_hf.plots runs/vae --keys loss_recon loss_kl mse --out card/vae_losses.png
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import atomic_path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (or of <run folder>/metrics.jsonl), in order."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}:{number} is not JSON ({err})") from err
    if not records:
        raise UsageError(f"{path} holds no metrics")
    return records


def metric_series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, skipping records that lack it."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return np.array([p[0] for p in points], dtype=np.float64), np.array([p[1] for p in points], dtype=np.float64)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve keeps its length."""
    if window <= 1 or len(values) == 0:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def panels(count: int, cols: int, width: float, height: float):
    """A figure of `count` panels, `cols` per row, each width x height inches (unused cells hidden):
    (figure, list of its `count` axes). Matplotlib is imported here, headless, only when drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)[:count]


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write the PNG atomically and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def plot_metrics(
    path: str | Path, out: str | Path | None = None, keys: Sequence[str] | None = None, window: int = 10
) -> Path:
    """One panel per metric (default: every metric whose name starts with 'loss'), raw and smoothed; atomic PNG."""
    records = read_metrics(path)
    available = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
    keys = list(keys) if keys else [k for k in available if k.startswith("loss")]
    unknown = [k for k in keys if k not in available]
    if unknown or not keys:
        raise UsageError(
            f"no metric {', '.join(unknown) or 'named loss*'} in {path}; available: {', '.join(available)}"
        )
    source = Path(path) if Path(path).is_dir() else Path(path).parent
    out = Path(out) if out else source / "loss_curves.png"

    fig, axes = panels(len(keys), min(3, len(keys)), 4.2, 3.2)
    for ax, key in zip(axes, keys):
        steps, values = metric_series(records, key)
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8)
        ax.plot(steps, smooth(values, window), color="tab:blue", linewidth=1.5)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return save_figure(fig, out)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Plot loss curves from a run's metrics.jsonl.")
    parser.add_argument("run", help="a run folder (holding metrics.jsonl) or the metrics.jsonl file")
    parser.add_argument("--keys", nargs="+", default=None, help="metrics to plot (default: every loss*)")
    parser.add_argument("--out", default=None, help="PNG to write (default: <run>/loss_curves.png)")
    parser.add_argument("--window", type=int, default=10, help="moving-average window, in logged points")
    args = parser.parse_args(argv)
    try:
        out = plot_metrics(args.run, args.out, args.keys, args.window)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
