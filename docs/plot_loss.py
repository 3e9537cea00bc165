r"""Plots the training loss curves of the shapes64 stages from their TensorBoard logs (docs/loss.png in the README).

    pip install matplotlib
    python docs/plot_loss.py workdirs/shapes64_vae workdirs/shapes64 --out docs/loss.png

A resumed run writes a new event file; where two files log the same step, the later file wins (the run that
continued from the checkpoint). Also prints each run's wall time from the event timestamps, summed over the
segments of a resumed run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def read_scalars(workdir: Path, tag: str = "train/loss") -> tuple[np.ndarray, np.ndarray, float]:
    """(steps, values, wall seconds) of ``tag`` over all event files of ``workdir/logs``, in step order."""
    import tensorflow as tf

    by_step: dict[int, float] = {}
    wall = 0.0
    files = sorted((workdir / "logs").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{workdir / 'logs'} holds no TensorBoard event files")
    for path in files:
        times = []
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            times.append(event.wall_time)
            for value in event.summary.value:
                if value.tag == tag:
                    number = value.simple_value if value.HasField("simple_value") else tf.make_ndarray(value.tensor)
                    by_step[event.step] = float(number)
        wall += max(times) - min(times)
    steps = np.array(sorted(by_step))
    return steps, np.array([by_step[s] for s in steps]), wall


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/loss.png"))
    args = parser.parse_args()

    fig, axes = plt.subplots(1, len(args.workdirs), figsize=(5 * len(args.workdirs), 3.4), squeeze=False)
    for ax, workdir in zip(axes[0], args.workdirs, strict=True):
        steps, loss, wall = read_scalars(workdir)
        print(
            f"{workdir}: steps {steps[0]}..{steps[-1]}, final loss {loss[-5:].mean():.4f}, "
            f"logged wall {wall / 60:.1f} min"
        )
        ax.plot(steps, loss, lw=0.8, alpha=0.4, color="C0", label="loss (every 50 steps)")
        window = 9
        if len(loss) > window:
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(steps[window // 2 : window // 2 + len(smooth)], smooth, color="C0", label=f"mean of {window}")
        ax.set_title(workdir.name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
