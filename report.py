"""
A report card for one run of pipeline.py: what each stage did and how long it took, the language model's and
the captioner's numbers and figures, a few captioned pictures, and the machine, in RUN_DIR/report.md.

    python report.py runs/tiny       # writes runs/tiny/report.md, its figures in runs/tiny/report/*.png
    python report.py runs/full       # pipeline.py runs this as its last stage; run it again at any time

Every number in it is one the run logged (pipeline.log, each stage's log.txt and run.json, eval/*.json); what a
stage did not log is said to be missing, never filled in. The figures need matplotlib (pip install matplotlib);
without it the report still has every table. The report is replaced whole or not at all: a complete new
report.md and report/ take the place of the old ones.
"""

import argparse
import json
import os
import shutil
import statistics
import sys

from plot_log import GPT2_124M_HELLASWAG, GPT2_124M_VAL_LOSS, read_log

CHANCE_HELLASWAG = 0.25  # four endings per question
# the caption tables' columns: caption_eval.py's metrics in COCOEvalCap's order (pycocoevalcap's "CIDEr" is CIDEr-D)
METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"]

# -----------------------------------------------------------------------------
# Reading what the run left: a file that is not there is None, a file that cannot be read is a ValueError


def read_json(path):
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None


def read_series(path):
    """log.txt -> {kind: ([steps], [values])} with plot_log.py's reader (a bad line: ValueError naming file:line)."""
    return read_log(path) if os.path.isfile(path) else None


def read_stage_times(path):
    """pipeline.log -> {stage: {'attempts', 'seconds', 'status'}}. A stage killed and resumed has several
    attempts; its time is their sum. Its status is its last event ('start' with no end yet: running), but for
    'skipped': pipeline.py skips a stage whose output is complete, done in this log or before it."""
    stages = {}
    with open(path, errors="replace") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            _, _, stage, event, *seconds = line.split()
            seconds = [float(s) for s in seconds]
            if event not in ("start", "skipped", "done", "failed", "stopped") or \
                    len(seconds) != (event in ("done", "failed", "stopped")):  # the ends carry their seconds
                raise ValueError
        except ValueError:
            if number == len(lines) and not line.endswith("\n"):
                continue  # being written as we read it
            raise ValueError(f"{path}:{number}: expected '<date> <time> <stage> <event> [<seconds>]', "
                             f"got {line.strip()!r}") from None
        times = stages.setdefault(stage, {"attempts": 0, "seconds": 0.0, "status": "not run"})
        times["attempts"] += event == "start"
        times["seconds"] += sum(seconds)
        skipped = "done" if times["status"] == "done" else "done before (skipped)"
        times["status"] = {"start": "running", "skipped": skipped}.get(event, event)
    return stages


# -----------------------------------------------------------------------------
# Formatting


def duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""]


def last(series, kind):
    """-> (step, value) of the last `kind` line, or None."""
    return (series[kind][0][-1], series[kind][1][-1]) if series and kind in series else None


def describe_init(init):
    """train_caption.py --init: OpenAI's GPT-2 by its hub name, or a checkpoint or exported folder of ours."""
    return "OpenAI's GPT-2 124M" if init == "gpt2" else f"OpenAI's {init}" if init.startswith("gpt2") else init

# -----------------------------------------------------------------------------
# The sections of the report, each -> [markdown lines]; figures land in `figures` {file name: Figure}


def header_section(run_dir, pipeline, stage_times):
    plan = pipeline or {"mode": "unknown (no pipeline.json)", "started": "unknown", "stages": []}
    what = {stage["name"]: stage["what"] for stage in plan["stages"]}
    names = list(what) + [name for name in stage_times if name not in what]  # a stage the log has, the plan not
    no_times = {"attempts": 0, "seconds": 0.0, "status": "not run"}
    rows = [(name, what.get(name, ""), times["status"], times["attempts"],
             duration(times["seconds"]) if times["seconds"] else "-")
            for name in names for times in [stage_times.get(name, no_times)]]
    total = sum(times["seconds"] for times in stage_times.values())
    return [f"# Run report: {os.path.basename(os.path.abspath(run_dir))}", "",
            f"- mode: **{plan['mode']}**", f"- run folder: `{os.path.abspath(run_dir)}`",
            f"- started: {plan['started']}",
            f"- time in all: {duration(total)} (every attempt of every stage, from pipeline.log)", ""] + \
        table(["stage", "what", "status", "attempts", "time"], rows)


def lm_section(run_dir, pipeline, stage_times, figures):
    series = read_series(os.path.join(run_dir, "pretrain", "log.txt"))
    if series is None:
        caption_run = read_json(os.path.join(run_dir, "caption", "run.json"))
        init = (caption_run or {}).get("args", {}).get("init")
        started = (f" The captioner's decoder started from {describe_init(init)} (caption/run.json's args.init "
                   f"is {init})." if init else "")
        return ["## The language model", "", f"Pretraining: not run (no pretrain/log.txt).{started}", ""]
    run = read_json(os.path.join(run_dir, "pretrain", "run.json")) or {}
    batch = run.get("args", {}).get("total_batch_size")
    lines = ["## The language model", ""]
    # GPT-2's numbers were measured on FineWeb-Edu: beside a run on any other text they would mislead
    fineweb = pipeline is not None and pipeline.get("mode") != "tiny"
    if figures is not None:
        figures["lm.png"] = lm_figure(series, batch, fineweb)
        why_not = "the tiny run's text is generated" if pipeline else "no pipeline.json says which text this run read"
        lines += ["![val loss against tokens, HellaSwag against steps](report/lm.png)", "",
                  f"*Dashed: OpenAI GPT-2 124M (val loss {GPT2_124M_VAL_LOSS} on FineWeb-Edu's val shard, "
                  f"HellaSwag {GPT2_124M_HELLASWAG}).*" if fineweb else
                  f"*No GPT-2 reference lines: {why_not}, and GPT-2's numbers hold for FineWeb-Edu only.*", ""]
    return lines + table(["", "value"], lm_numbers(series, run, stage_times.get("pretrain", {}).get("seconds")))


def lm_numbers(series, run, seconds):
    """-> [(what, value)]: the results, the amount of training and its cost, each as logged or said missing."""
    batch, devices = run.get("args", {}).get("total_batch_size"), run.get("devices", {})
    hours = "GPU-hours" if devices and set(devices) != {"cpu"} else "device-hours"
    missing = lambda kind: f"missing (no {kind} lines in pretrain/log.txt)"
    val, hella, train = last(series, "val"), last(series, "hella"), last(series, "train")
    # step s's train line follows its update: (s + 1) steps of total_batch_size tokens are behind it
    tokens = (train[0] + 1) * batch if train and batch else None
    return [("final val loss", f"{val[1]:.4f} (step {val[0]})" if val else missing("val")),
            ("final HellaSwag acc_norm", f"{hella[1]:.4f} (step {hella[0]})" if hella else missing("hella")),
            ("tokens seen", f"{tokens:,}" if tokens else "missing (no train lines, or no total_batch_size "
                                                         "in pretrain/run.json)"),
            ("pretrain stage's wall-clock time", duration(seconds) if seconds else "missing (not in pipeline.log)"),
            ("tokens/s (median)", f"{statistics.median(series['tok_s'][1]):,.0f}" if "tok_s" in series
             else missing("tok_s")),
            ("MFU per device (median)", f"{statistics.median(series['mfu'][1]):.1f}%" if "mfu" in series
             else "not logged (only on GPUs whose peak is known)"),
            (hours, f"{seconds * run['world_size'] / 3600:.2f}" if seconds and "world_size" in run
             else "missing (needs pipeline.log's time and pretrain/run.json's world_size)")]


def caption_section(run_dir, figures):
    series = read_series(os.path.join(run_dir, "caption", "log.txt"))
    lines = ["## The captioner", ""]
    if series is None:
        lines += ["Caption training: not run (no caption/log.txt).", ""]
    else:
        best = os.path.join(run_dir, "caption", "best.pt")
        if "cider" in series:  # best.pt is rewritten only when CIDEr-D improves: the first of equal maxima
            steps, ciders = series["cider"]
            i = ciders.index(max(ciders))
            lines += [f"Checkpoint: caption/best.pt{'' if os.path.isfile(best) else ' (missing)'}, step {steps[i]}: "
                      f"the best val CIDEr-D during training, {100 * ciders[i]:.1f} (greedy captions, training's "
                      "own tokenizer: it ranks checkpoints, the tables below are the numbers to report).", ""]
        else:
            lines += ["Checkpoint: no cider lines in caption/log.txt to say which step best.pt is.", ""]
        if figures is not None:
            figures["caption.png"] = caption_figure(series)
            lines += ["![caption loss and val CIDEr-D against steps](report/caption.png)", ""]
    lines += sweep_tables(run_dir)
    return lines + gallery(run_dir)


def describe_split(result):
    """The line caption_eval.py prints above its numbers: which split, how many images, references each."""
    source = f"Karpathy's split ({result['karpathy_json']})" if result.get("karpathy_json") else "coco.py's split"
    refs = result["references_per_image"]
    per_image = (f"{refs['min']} references per image" if refs["min"] == refs["max"] else
                 f"{refs['min']} to {refs['max']} references per image (mean {refs['mean']:.2f})")
    return f"split {result['split']} of {source}: {result['images']} images, {per_image}"


def metrics_table(rows, chosen=None):
    columns = [name for name in METRICS if any(name in row["metrics"] for row in rows)]
    body = [(row["beam"], "-" if row["length_penalty"] is None else f"{row['length_penalty']:g}",
             *(f"{100 * row['metrics'][name]:.1f}" if name in row["metrics"] else "n/a" for name in columns),
             "**chosen**" if chosen and row["beam"] == chosen["beam"]
             and row["length_penalty"] == chosen["length_penalty"] else "")
            for row in rows]
    header = ["beam", "length penalty", *(name.replace("CIDEr", "CIDEr-D") for name in columns), ""]
    return table(header, body) if chosen else table(header[:-1], [row[:-1] for row in body])


def sweep_tables(run_dir):
    lines = []
    for name, title in [("val_sweep.json", "Decoding, chosen on val"), ("test.json", "Test")]:
        result = read_json(os.path.join(run_dir, "eval", name))
        if result is None:
            lines += [f"{title}: missing (no eval/{name}).", ""]
            continue
        rows = result["rows"] if "rows" in result else [result]
        lines += [f"### {title}", "", f"{describe_split(result)}; checkpoint {result['checkpoint']}; metrics "
                  "x100, as papers print them:", ""] + metrics_table(rows, result.get("best"))
    return lines


def gallery(run_dir):
    """sample.py's captions, each with its attention map (map_<image name>.png) where there is one."""
    folder = os.path.join(run_dir, "eval", "attention")
    lines = ["### A few captions", ""]
    try:
        with open(os.path.join(folder, "captions.txt"), encoding="utf-8", errors="replace") as f:
            captions = [line.strip().partition(": ") for line in f if ": " in line]
    except FileNotFoundError:
        captions = []
        lines += ["No captioned pictures (no eval/attention/captions.txt).", ""]
    for image, _, caption in captions:
        # sample.py --attention-map map.png writes map_<image name>.png per image, but map.png itself for one
        stem = os.path.splitext(os.path.basename(image))[0]
        maps = [name for name in [f"map_{stem}.png"] + ["map.png"] * (len(captions) == 1)
                if os.path.isfile(os.path.join(folder, name))]
        lines += [f"**{caption}** ({os.path.basename(image)})", ""]
        lines += [f"![where each word looked: {caption}](eval/attention/{maps[0]})", ""] if maps else []
    has_page = os.path.isfile(os.path.join(run_dir, "eval", "gallery.html"))
    return lines + [("The test split's gallery, every caption beside its references: [eval/gallery.html]"
                     "(eval/gallery.html)" if has_page else "No gallery (no eval/gallery.html)."), ""]


def environment_section(run_dir):
    rows = []
    for stage in ("pretrain", "caption"):
        run = read_json(os.path.join(run_dir, stage, "run.json"))
        if run:
            devices = ", ".join(f"{count} x {name}" for name, count in run.get("devices", {}).items())
            rows.append((f"{stage}/run.json", run.get("git") or "unknown (not a git checkout)", run.get("torch"),
                         devices, run.get("world_size")))
    if not rows:
        return ["## The environment", "", "Missing: no pretrain/run.json or caption/run.json.", ""]
    return ["## The environment", ""] + table(["from", "commit", "torch", "devices", "world size"], rows)

# -----------------------------------------------------------------------------
# Figures (matplotlib, optional)


def new_figure():
    from matplotlib.figure import Figure  # no pyplot: no window, no global state
    figure = Figure(figsize=(11, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax in axes:
        ax.grid(alpha=0.3)
    return figure, axes


def plot_losses(ax, series, scale=1):
    """train loss (every step: thin, pale) and val loss (each evaluation marked) against step x scale."""
    for kind, style in [("train", dict(color="C0", alpha=0.4, lw=1)), ("val", dict(color="C1", marker="."))]:
        if kind in series:
            steps, values = series[kind]
            ax.plot([step * scale for step in steps], values, label=f"{kind} loss", **style)


def loss_range(series, reference):
    """The loss panel's (bottom, top): what the run logged from a tenth of its steps on, and the reference. The
    first steps' drop from ~11 would flatten the part worth reading; they run off the top."""
    points = [point for kind in ("train", "val") if kind in series for point in zip(*series[kind])]
    end = max(step for step, _ in points)
    top = max(loss for step, loss in points if step >= end / 10)
    bottom = min([loss for _, loss in points] + ([reference] if reference else []))
    margin = 0.05 * (top - bottom) or 0.1
    return bottom - margin, top + margin


def lm_figure(series, batch, fineweb):
    from matplotlib.ticker import EngFormatter
    figure, (loss_ax, hella_ax) = new_figure()
    scale, xlabel = (batch, "tokens seen") if batch else (1, "step (no total_batch_size in pretrain/run.json)")
    plot_losses(loss_ax, series, scale)
    if fineweb:
        loss_ax.axhline(GPT2_124M_VAL_LOSS, color="k", ls="--", label=f"OpenAI GPT-2 124M ({GPT2_124M_VAL_LOSS})")
        hella_ax.axhline(GPT2_124M_HELLASWAG, color="k", ls="--", label=f"OpenAI GPT-2 124M ({GPT2_124M_HELLASWAG})")
    if "hella" in series:
        hella_ax.plot(*series["hella"], color="C2", marker=".", label="this run")
    hella_ax.axhline(CHANCE_HELLASWAG, color="grey", ls=":", label=f"chance ({CHANCE_HELLASWAG})")
    if "train" in series or "val" in series:
        loss_ax.set_ylim(*loss_range(series, GPT2_124M_VAL_LOSS if fineweb else None))
    loss_ax.xaxis.set_major_formatter(EngFormatter())  # 10 G tokens rather than 1e10 in a corner
    loss_ax.set(xlabel=xlabel, ylabel="loss", title="language model loss (the first steps run off the top)")
    hella_ax.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
    loss_ax.legend(loc="lower left")  # a falling curve leaves the lower left empty
    hella_ax.legend(loc="lower right")  # HellaSwag climbs from chance: the lower right stays empty
    return figure


def caption_figure(series):
    figure, (loss_ax, cider_ax) = new_figure()
    plot_losses(loss_ax, series)
    if "cider" in series:
        steps, ciders = series["cider"]
        cider_ax.plot(steps, [100 * cider for cider in ciders], color="C3", marker=".", label="val CIDEr-D")
        best = ciders.index(max(ciders))
        cider_ax.plot(steps[best], 100 * ciders[best], "k*", markersize=12, label=f"best.pt (step {steps[best]})")
        cider_ax.legend()
    loss_ax.set(xlabel="step", ylabel="loss", title="caption loss")
    cider_ax.set(xlabel="step", ylabel="CIDEr-D x100", title="val CIDEr-D (training's, greedy)")
    loss_ax.legend()
    return figure

# -----------------------------------------------------------------------------


def publish(run_dir, text, figures):
    """report.md and report/ are built beside the old ones (.tmp) and renamed over them only when whole."""
    md, folder = os.path.join(run_dir, "report.md"), os.path.join(run_dir, "report")
    new, old = folder + ".tmp", folder + ".old"
    try:
        for leftover in (new, old):  # from a report killed mid-way
            shutil.rmtree(leftover, ignore_errors=True)
        os.mkdir(new)
        for name, figure in figures.items():
            figure.savefig(os.path.join(new, name), dpi=100)
        with open(md + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        if os.path.isdir(folder):
            os.rename(folder, old)
        os.rename(new, folder)
        os.replace(md + ".tmp", md)
    except OSError as e:
        if os.path.isdir(old):  # the swap had begun: the old figures go back beside the old report.md
            if os.path.isdir(folder):
                os.rename(folder, new)
            os.rename(old, folder)
        shutil.rmtree(new, ignore_errors=True)
        if os.path.exists(md + ".tmp"):
            os.remove(md + ".tmp")
        raise ValueError(f"{md}: not written ({e.strerror or e})") from None
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the folder pipeline.py wrote")
    run_dir = parser.parse_args(argv).run_dir
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir}: no such folder")
    try:
        import matplotlib  # noqa: F401  (only asked whether it is there)
        figures = {}
    except ImportError:
        figures = None
    pipeline = read_json(os.path.join(run_dir, "pipeline.json"))
    log = os.path.join(run_dir, "pipeline.log")
    stage_times = read_stage_times(log) if os.path.isfile(log) else {}
    lines = header_section(run_dir, pipeline, stage_times)
    if figures is None:
        lines += ["*No figures: they need matplotlib (`pip install matplotlib`); every table is here.*", ""]
    lines += lm_section(run_dir, pipeline, stage_times, figures) + caption_section(run_dir, figures)
    lines += environment_section(run_dir)
    publish(run_dir, "\n".join(lines), figures or {})
    print(f"wrote {os.path.join(run_dir, 'report.md')}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # the user's to fix: one line, naming the file
        sys.exit(f"report.py: {e}")
    except KeyboardInterrupt:
        print("report.py: stopped (Ctrl-C)", file=sys.stderr)  # the old report stays whole
        sys.exit(130)
