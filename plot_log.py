"""
Plot a training log: train/val loss and HellaSwag accuracy, beside OpenAI GPT-2 124M's numbers.

    python plot_log.py log/log.txt                 # writes log/log.png
    python plot_log.py log/log.txt --out run.png

log.txt lines are '{step} train|val|hella {value}', as train_gpt2.py and train_caption.py write them.
Needs matplotlib (pip install matplotlib), which training itself does not.
"""

import argparse
import os
import sys

# OpenAI GPT-2 124M, measured by build-nanogpt on the FineWeb-Edu val shard and on HellaSwag val (acc_norm)
GPT2_124M_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2945


def read_log(path):
    """-> {'train': ([steps], [values]), 'val': ..., 'hella': ...}; unknown kinds are kept too."""
    series = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 3:
                raise ValueError(f"{path}:{number}: expected '<step> <kind> <value>', got {line.strip()!r}")
            steps, values = series.setdefault(parts[1], ([], []))
            steps.append(int(parts[0]))
            values.append(float(parts[2]))
    return series


def plot(series, out_path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_hella) = plt.subplots(1, 2, figsize=(14, 5))
    panels = [  # (axes, title, [(series, label, line style)], reference value, reference label)
        (ax_loss, "loss", [("train", "train loss", "-"), ("val", "val loss", ".-")],
         GPT2_124M_VAL_LOSS, "OpenAI GPT-2 124M val"),
        (ax_hella, "HellaSwag", [("hella", "HellaSwag acc_norm", ".-")], GPT2_124M_HELLASWAG, "OpenAI GPT-2 124M"),
    ]
    for ax, title, curves, reference, reference_label in panels:
        for kind, label, style in curves:
            if kind in series:
                ax.plot(*series[kind], style, label=label)
        ax.axhline(reference, color="r", linestyle="--", label=f"{reference_label} ({reference})")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="a log.txt written by a training script")
    parser.add_argument("--out", help="PNG to write (default: the log's name with .png)")
    args = parser.parse_args()
    if not os.path.isfile(args.log):
        sys.exit(f"plot_log.py: {args.log}: no such file")
    try:
        series = read_log(args.log)
    except ValueError as e:
        sys.exit(f"plot_log.py: {e}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("plot_log.py: needs matplotlib: pip install matplotlib")
    out = args.out or os.path.splitext(args.log)[0] + ".png"
    plot(series, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
