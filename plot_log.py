"""
Plot training logs: one panel per thing they logged (train loss, val loss, HellaSwag, CIDEr-D), one line per log.

    python plot_log.py log/log.txt                                   # writes log/log.png
    python plot_log.py log/log.txt --reference gpt2                  # with OpenAI GPT-2 124M's numbers
    python plot_log.py log_adamw/log.txt log_muon/log.txt --out adamw_vs_muon.png
    python plot_log.py a/log.txt b/log.txt --labels "lr 6e-4,lr 1.8e-3" --out lr.png
    python plot_log.py log/log.txt --panels lr,norm,tok_s,mfu --out log/speed.png   # the step line's other numbers

log.txt lines are '{step} {kind} {value}', as train_gpt2.py and train_caption.py write them: the results (train,
val, hella, cider) and every step's lr, norm (the gradient's, before clipping), tok_s or img_s (all GPUs) and mfu
(per GPU, %; on GPUs whose peak training.py knows). A panel is drawn only when some log has its lines. Each log is labelled by its folder's name unless --labels
names them. GPT-2's numbers were measured on FineWeb-Edu and HellaSwag, so they are drawn only when asked for:
on another corpus they mean nothing.
Needs matplotlib (pip install matplotlib), which training itself does not.
"""

import argparse
import os
import sys
import tempfile

# OpenAI GPT-2 124M, as build-nanogpt's play.ipynb draws it: val loss on the FineWeb-Edu val shard, and
# HellaSwag val acc_norm (0.294463; its hellaswag.py printed 0.2955 for the same model: see hellaswag.py)
GPT2_124M_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2945

# log kind -> (panel title, GPT-2 124M's number for --reference gpt2, or None), in the order the panels appear
PANELS = {
    "train": ("train loss", None),
    "val": ("val loss", GPT2_124M_VAL_LOSS),
    "hella": ("HellaSwag acc_norm", GPT2_124M_HELLASWAG),
    "cider": ("val CIDEr-D", None),
    "lr": ("learning rate", None),
    "norm": ("gradient norm", None),
    "tok_s": ("tokens/s, all GPUs", None),
    "img_s": ("images/s, all GPUs", None),
    "mfu": ("MFU per GPU, %", None),
}
RESULTS = ["train", "val", "hella", "cider"]  # the default panels
EVALUATIONS = {"val", "hella", "cider"}  # sparse: each point marked


def read_log(path):
    """-> {'train': ([steps], [values]), 'val': ..., 'hella': ...}; unknown kinds are kept too. A line that is not
    '<step> <kind> <value>' is a ValueError naming the file and the line."""
    series = {}
    with open(path, errors="replace") as f:  # bytes that are not text become a bad line, named like any other
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            step, kind, value = line.split()
            step, value = int(step), float(value)
        except ValueError:
            if number == len(lines) and not line.endswith("\n"):
                continue  # the run is writing this line as we read it: the next plot will have it
            raise ValueError(f"{path}:{number}: expected '<step> <kind> <value>', got {line.strip()!r}") from None
        steps, values = series.setdefault(kind, ([], []))
        steps.append(step)
        values.append(value)
    return series


def build_figure(runs, reference=None, panels=RESULTS):
    """runs: [(label, series from read_log)] -> a matplotlib Figure, one panel per kind of `panels` some run logged.
    A run keeps its colour in every panel, so a run without HellaSwag lines does not shift the others' colours."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    kinds = [kind for kind in panels if any(kind in series for _, series in runs)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        title, gpt2_value = PANELS[kind]
        for color, (label, series) in enumerate(runs):
            if kind in series:  # a number of every step: a plain line; evaluations are sparse: mark each point
                ax.plot(*series[kind], ".-" if kind in EVALUATIONS else "-", color=f"C{color}", label=label)
        if reference == "gpt2" and gpt2_value is not None:
            ax.axhline(gpt2_value, color="k", linestyle="--", label=f"OpenAI GPT-2 124M ({gpt2_value})")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    return fig


def output_problem(out, logs):
    """Why the picture cannot be written to `out`, or None: asked before the logs are read. (training.py has
    the same check, but importing it would make plotting need torch.)"""
    if os.path.isdir(out):
        return "is a folder, not a file"
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        return "no such folder"
    if any(os.path.realpath(out) == os.path.realpath(log) for log in logs):
        return "is one of the logs, which it would overwrite"
    try:  # a real write: os.access says yes to root on a read-only mount
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"cannot write in {folder} ({e.strerror})"
    return None


def save(figure, out):
    """Into out.tmp, then renamed over out: a full disk or a kill mid-write leaves the previous picture whole."""
    tmp = out + ".tmp"
    try:
        figure.savefig(tmp, format=os.path.splitext(out)[1][1:].lower(), dpi=100)
        os.replace(tmp, out)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        sys.exit(f"plot_log.py: {out}: not written ({e.strerror or e})")


def panel_list(text):
    """--panels: 'lr,norm' -> ['lr', 'norm'], each a kind of PANELS."""
    kinds = [kind.strip() for kind in text.split(",")]
    unknown = [kind for kind in kinds if kind not in PANELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: not one of {', '.join(PANELS)}")
    return kinds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", metavar="log", help="log.txt files written by the training scripts")
    parser.add_argument("--labels", help="comma-separated legend labels, one per log (default: each log's folder name)")
    parser.add_argument("--reference", choices=["gpt2"], help="also draw OpenAI GPT-2 124M's val loss and HellaSwag")
    parser.add_argument("--out", help="PNG to write (default for one log: its name with .png; needed for several)")
    parser.add_argument("--panels", type=panel_list, default=",".join(RESULTS),
                        help=f"comma-separated kinds to draw, of {','.join(PANELS)} (default: %(default)s)")
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels else [os.path.basename(os.path.dirname(os.path.abspath(log)))
                                                         for log in args.logs]
    if len(labels) != len(args.logs):
        parser.error(f"--labels gives {len(labels)} labels for {len(args.logs)} logs")
    if args.out is None and len(args.logs) > 1:
        parser.error("several logs need --out PNG")
    if args.out is not None and os.path.splitext(args.out)[1].lower() not in (".png", ".pdf", ".svg", ".jpg"):
        parser.error(f"--out {args.out}: name the file with the picture's type (.png, .pdf, .svg or .jpg)")
    out = args.out or os.path.splitext(args.logs[0])[0] + ".png"
    problem = output_problem(out, args.logs)
    if problem:
        parser.error(f"--out {out}: {problem}")
    runs = []
    for label, log in zip(labels, args.logs):
        if not os.path.isfile(log):
            sys.exit(f"plot_log.py: {log}: no such file")
        try:
            runs.append((label, read_log(log)))
        except OSError as e:
            sys.exit(f"plot_log.py: {log}: cannot read it ({e.strerror})")
        except ValueError as e:
            sys.exit(f"plot_log.py: {e}")
    if not any(kind in series for _, series in runs for kind in args.panels):
        sys.exit(f"plot_log.py: no {', '.join(args.panels)} lines in {', '.join(args.logs)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("plot_log.py: needs matplotlib: pip install matplotlib")
    save(build_figure(runs, args.reference, args.panels), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
