"""From nothing to a captioner in one command: every stage of this project, in order, each one a script run as
you would run it by hand.

    python pipeline.py --tiny      # every stage on data it makes itself, tiny models, CPU: a few minutes, offline
    python pipeline.py --quick     # a real small captioner on one GPU: OpenAI's GPT-2 124M + CLIP, a COCO subset
    python pipeline.py             # the whole recipe on one 8-GPU node: FineWeb-Edu -> GPT-2 124M -> captioner

The full chain: FineWeb-Edu tokenized (fineweb.py) -> GPT-2 124M pretrained, ending with its val loss and
HellaSwag (train_gpt2.py, --recipe passed through) -> a Hugging Face export (export_hf.py) -> COCO features with
Karpathy's split (coco.py) -> caption training from that export (train_caption.py) -> the decoding chosen on
Karpathy val and scored on Karpathy test, with a gallery (caption_eval.py) -> attention maps of a few test
images (sample.py) -> the report card, RUN_DIR/report.md (report.py).

--quick skips pretraining: the decoder starts from OpenAI's GPT-2 124M (--init gpt2), and coco.py fetches the
first --images images of each of Karpathy's splits one by one from COCO's image server instead of the 19 GB
archive. --tiny makes its own data: sentences about coloured shapes for the language model, HellaSwag-style rows
about them, and PIL-drawn pictures of the shapes with their captions; the image encoder is CLIP ViT-B/32 with
random weights, so it needs no download (GPT-2's BPE files aside: see TIKTOKEN_CACHE_DIR in the README).

Run the same command again and it goes on where it stopped: a finished stage is skipped (its marker in
RUN_DIR/stages/ and its output both there), an unfinished one is run again and resumes (the training scripts
with --resume auto, coco.py and fineweb.py from what they wrote). A failing stage stops the chain, named, with
its output in RUN_DIR/logs/<stage>.log. Ctrl-C or SIGTERM (a cluster's preemption) reaches the running stage,
which saves; the chain then stops, and the same command continues it. The first run records its settings in
RUN_DIR/pipeline.json; a later run with other settings is refused (another --run-dir is another run), except
--gpus: the training scripts resume on any number of GPUs.
"""
import argparse
import fcntl
import importlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from coco import write_atomically
from training import HelpFormatter, positive_int


@dataclass
class Settings:
    mode: str = "full"
    run_dir: str = "runs/full"  # this run's outputs: logs, checkpoints, evaluations, the report
    data_dir: str = "data"  # what runs share: FineWeb-Edu shards, COCO, Karpathy's file, the image features
    gpus: int = 1  # processes the training scripts run as (torchrun), one per GPU
    recipe: str = "gpt2"  # train_gpt2.py --recipe
    images: int = 3000  # --quick: images of each Karpathy split fetched and encoded


@dataclass
class Stage:
    name: str
    what: str  # one line for the plan
    output: str  # the file whose presence, after the command succeeds, means the stage is complete
    command: object = None  # () -> [script, args...]: built when the stage starts, from what earlier stages wrote
    function: object = None  # or, instead of a command, a function run in this process
    processes: int = 1  # > 1: under torchrun
    stdout: str = None  # a file for the command's stdout alone (sample.py's captions)


# -----------------------------------------------------------------------------
# The chain. The modes differ in their data and flags (below it), not in its order.


def stages_of(s):
    f = tiny_flags(s) if s.mode == "tiny" else quick_flags(s) if s.mode == "quick" else full_flags(s)
    run = lambda *parts: os.path.join(s.run_dir, *parts)
    best, sweep_file, attention = run("caption", "best.pt"), run("eval", "val_sweep.json"), run("eval", "attention")
    stages = []
    if s.mode == "tiny":
        stages.append(Stage("data", "sentences about coloured shapes, HellaSwag rows, pictures with captions: made "
                                    "here", run("data", "images", "captions.jsonl"),
                            function=lambda: write_tiny_data(run("data"))))
    if f["fineweb"]:
        stages.append(Stage("fineweb", f"{f['text']} -> GPT-2 token shards (fineweb.py)", f["fineweb_done"],
                            lambda: ["fineweb.py", *f["fineweb"]]))
    if f["pretrain"]:
        pretrain = f["pretrain"] + ["--out-dir", run("pretrain"), "--resume", "auto"]
        settings = script_settings("train_gpt2", pretrain)
        final = run("pretrain", f"model_{settings.max_steps:06d}.pt")
        stages.append(Stage("pretrain", f"GPT-2 ({describe_lm(settings)}) pretrained on {settings.max_steps:,} x "
                                        f"{settings.total_batch_size:,} = {settings.max_steps * settings.total_batch_size:,}"
                                        f" tokens, then its val loss and HellaSwag (train_gpt2.py)", final,
                            lambda: ["train_gpt2.py", *pretrain], processes=s.gpus))
        stages.append(Stage("export", "its last checkpoint -> a Hugging Face GPT-2 folder, the captioner's start "
                                      "(export_hf.py)", run("export", "config.json"),
                            lambda: ["export_hf.py", final, run("export")]))
    features = f["features_dir"]
    stages.append(Stage("features", f"{f['images']} -> frozen {f['encoder']} features (coco.py)",
                        os.path.join(features, "meta.json"), lambda: ["coco.py", *f["features"], "--out-dir", features]))
    caption = ["--features-dir", features, *f["caption"], "--out-dir", run("caption"), "--resume", "auto"]
    settings = script_settings("train_caption", caption)
    budget = (f"{settings.max_steps:,} steps" if settings.max_steps else f"{settings.epochs:g} caption-epochs") + \
        f", {settings.total_batch_size} images a step"
    stages.append(Stage("caption", f"caption training from {f['init']}: cross-attention to the features, {budget} "
                                   f"(train_caption.py)", best, lambda: ["train_caption.py", *caption],
                        processes=s.gpus))
    scoring = ["caption_eval.py", "--checkpoint", best, "--features-dir", features, *f["evaluation"]]
    stages.append(Stage("val", "decodings (beam size x length penalty) scored on val, the best CIDEr-D chosen "
                               "(caption_eval.py)", sweep_file,
                        lambda: [*scoring, "--split", "val", *f["sweep"], "--out", sweep_file]))
    stages.append(Stage("test", "the chosen decoding scored on test, and its gallery (caption_eval.py)",
                        run("eval", "test.json"),
                        lambda: [*scoring, "--split", "test", *chosen_decoding(sweep_file), "--out",
                                 run("eval", "test.json"), "--gallery", run("eval", "gallery.html"),
                                 "--gallery-images", 24]))
    stages.append(Stage("attention", "captions and attention maps of the first 3 test images (sample.py)",
                        os.path.join(attention, "captions.txt"),
                        lambda: ["sample.py", "--checkpoint", best, *chosen_decoding(sweep_file, sample=True),
                                 "--image", *first_test_images(features, f["coco_dir"], 3),
                                 "--attention-map", os.path.join(attention, "map.png")],
                        stdout=os.path.join(attention, "captions.txt")))
    stages.append(Stage("report", "the report card: report.md and its figures (report.py)", run("report.md"),
                        lambda: ["report.py", s.run_dir]))
    return stages


def full_flags(s):
    """One 8-GPU node: each script's own defaults, which are the recipe (GPT-2 124M on 10B tokens, 5 caption-
    epochs of COCO), with the data under --data-dir, where later runs find it."""
    data = lambda *parts: os.path.join(s.data_dir, *parts)
    return dict(text="FineWeb-Edu's 10B-token sample (streamed)", fineweb=["--out-dir", data("edu_fineweb10B")],
                fineweb_done=data("edu_fineweb10B", "edufineweb_meta.json"),
                pretrain=["--data-dir", data("edu_fineweb10B"), "--recipe", s.recipe],
                images="COCO 2017 (downloaded, ~19 GB) with Karpathy's split", encoder="CLIP ViT-B/32",
                features=["--download", "--coco-dir", data("coco"), "--karpathy-json", data("dataset_coco.json")],
                features_dir=data("coco_features_karpathy"), coco_dir=data("coco"),
                init="the export", caption=["--init", os.path.join(s.run_dir, "export")],
                sweep=["--beam-size", "1,3,5", "--length-penalty", "0,0.5,1"],
                evaluation=["--coco-dir", data("coco"), "--compile"])


def quick_flags(s):
    """One GPU, about an hour (not measured): no pretraining, OpenAI's GPT-2 124M instead; COCO images fetched
    one by one, the first --images of each of Karpathy's splits; 10 caption-epochs of those."""
    data = lambda *parts: os.path.join(s.data_dir, *parts)
    return dict(fineweb=None, pretrain=None,
                images=f"the first {s.images:,} images of each of Karpathy's COCO splits (fetched one by one)",
                encoder="CLIP ViT-B/32",
                features=["--download", "--karpathy-json", data("dataset_coco.json"), "--images-dir",
                          data("coco2014"), "--fetch-images", "--limit", s.images],
                features_dir=data(f"coco_features_karpathy_{s.images}"), coco_dir=data("coco"),
                init="OpenAI's GPT-2 124M", caption=["--init", "gpt2", "--epochs", 10, "--warmup-steps", 100,
                                                     "--eval-every", 200],
                sweep=["--beam-size", "1,3,5", "--length-penalty", "0,0.5,1"],
                evaluation=["--coco-dir", data("coco"), "--compile"])


def tiny_flags(s):
    """The CPU, a minute or two: a 2-layer GPT-2 on ~15K tokens, 48 training pictures, random CLIP weights (no
    download). The caption model trains whole, at one rate: the tiny LM's prior is the new words' obstacle."""
    run = lambda *parts: os.path.join(s.run_dir, *parts)
    shards = run("data", "shards")
    return dict(text="the sentences", fineweb=["--local-files", run("data", "text.jsonl"), "--out-dir", shards,
                                               "--shard-size", 20_000, "--num-proc", 1],
                fineweb_done=os.path.join(shards, "text_meta.json"),
                pretrain=["--data-dir", shards, "--n-layer", 2, "--n-head", 2, "--n-embd", 64, "--seq-len", 32,
                          "--batch-size", 8, "--total-batch-size", 256, "--max-steps", 60, "--warmup-steps", 10,
                          "--max-lr", 3e-3, "--eval-every", 30, "--val-tokens", 2048, "--hellaswag-every", 30,
                          "--hellaswag-data", run("data", "hellaswag.jsonl"), "--sample-every", 0,
                          "--save-every", 20, "--device", "cpu"],
                images="the pictures", encoder="random-weight CLIP ViT-B/32",
                features=["--captions-jsonl", run("data", "images", "captions.jsonl"), "--encoder-weights", "none",
                          "--batch-size", 16, "--num-workers", 0, "--device", "cpu"],
                features_dir=run("features"), coco_dir=run("data", "images"),
                init="the export", caption=["--init", run("export"), "--cross-attn-every", 1, "--train", "all",
                                            "--total-batch-size", 16, "--batch-size", 16, "--max-steps", 100,
                                            "--lr", 3e-3, "--lm-lr", 3e-3, "--min-lr", 3e-4, "--warmup-steps", 10,
                                            "--eval-every", 50, "--val-images", 12, "--save-every", 25,
                                            "--device", "cpu"],
                sweep=["--beam-size", "1,3", "--length-penalty", "0,1"], evaluation=["--no-meteor", "--device", "cpu"])


def script_settings(script, args):
    """The settings a training script will run with, from its own parser: the plan says what the run will do."""
    return importlib.import_module(script).parse_args([str(a) for a in args])


def describe_lm(args):
    return f"{args.n_layer} layers, {args.n_embd} wide" if args.n_layer and args.n_embd else f"preset {args.model}"


def chosen_decoding(sweep_file, sample=False):
    """The val sweep's best row (caption_eval.py writes {"best": {"beam", "length_penalty"}, "rows": [...]}), as
    flags; greedy decoding (beam 1) has no length penalty."""
    with open(sweep_file) as f:
        best = json.load(f)["best"]
    flags = ["--beam" if sample else "--beam-size", best["beam"]]
    return flags + (["--length-penalty", best["length_penalty"]] if best["length_penalty"] is not None else [])


def first_test_images(features, coco_dir, n):
    """The files of the first n images of the test split, found where coco.py read them (caption_eval's rules)."""
    from caption_eval import find_image, image_folders
    with open(os.path.join(features, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(features, "test_index.json")) as f:
        files = json.load(f)["files"]
    found = [find_image(image_folders(coco_dir, meta), file) for file in files]
    return [path for path in found if path][:n]


# -----------------------------------------------------------------------------
# --tiny's world: coloured shapes, in sentences and in pictures

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 30)}
SHAPES = ("square", "triangle", "bar")
RELATIONS = ("next to", "above", "below", "left of", "right of")


def tiny_sentence(rng):
    """A sentence of --tiny's world; some are its captions' phrases, so pretraining teaches their words."""
    colour, other = rng.choice(list(COLOURS), 2, replace=False)
    shape, other_shape = rng.choice(SHAPES, 2)
    if rng.random() < 0.3:
        return f"a {colour} {shape} on grey."
    return f"the {colour} {shape} is {rng.choice(RELATIONS)} the {other} {other_shape}."


def draw_shape(path, colour, shape, rng, size=128):
    """One shape of one colour, large, near the middle of a grey picture, moved and sized a little at random:
    the random-weight encoder's features tell shapes apart by where their pixels fall, so the pictures of one
    shape keep theirs in much the same patches."""
    image = Image.new("RGB", (size, size), (int(rng.integers(170, 220)),) * 3)
    side = int(rng.integers(84, 97))
    x, y = (int(v) for v in (size - side) // 2 + rng.integers(-4, 5, 2))
    box, fill = (x, y, x + side, y + side), COLOURS[colour]
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "bar":  # a band across the middle: a circle differed from the square too little (tried: the
        # tiny captioner mixed the two up on 3 of 12 test pictures)
        draw.rectangle((x, y + side // 3, x + side, y + 2 * side // 3), fill=fill)
    else:
        draw.polygon([(x, y + side), (x + side, y + side), (x + side // 2, y)], fill=fill)
    image.save(path)


def write_tiny_data(folder, seed=0):
    """--tiny's data, all of it made here: 3,000 documents of a few sentences (the text fineweb.py tokenizes),
    40 HellaSwag-format rows (a sentence's start; its true end and three of the world's words in a jumble), and
    4 colours x 3 shapes pictures: 4 of each to train on, 1 to validate and 1 to test, each captioned "a red bar"
    and "a red bar on grey", and the like.
    The captions file is written last: it is the stage's output."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(os.path.join(folder, "text.jsonl"), "w") as f:
        for _ in range(3000):
            f.write(json.dumps({"text": " ".join(tiny_sentence(rng) for _ in range(rng.integers(2, 6)))}) + "\n")
    with open(os.path.join(folder, "hellaswag.jsonl"), "w") as f:
        for i in range(40):  # the true end of a sentence against three of the world's words in a jumble
            words = tiny_sentence(rng).removesuffix(".").split()
            context, ending = " ".join(words[:3]), " ".join(words[3:]) + "."
            vocabulary = list(COLOURS) + list(SHAPES) + ["the", "is", "on", "grey", "next", "to", "above"]
            endings = [" ".join(rng.choice(vocabulary, len(words) - 3)) + "." for _ in range(3)]
            label = int(rng.integers(4))
            endings.insert(label, ending)
            f.write(json.dumps({"ind": i, "ctx": context, "endings": endings, "label": label,
                                "activity_label": "shapes", "split": "val", "source_id": f"tiny~{i}"}) + "\n")
    lines = []
    for split, copies in (("train", 4), ("val", 1), ("test", 1)):
        for colour in COLOURS:
            for shape in SHAPES:
                for k in range(copies):
                    name = f"{split}_{colour}_{shape}_{k}.png"
                    draw_shape(os.path.join(folder, "images", name), colour, shape, rng)
                    lines.append({"image": name, "split": split,
                                  "captions": [f"a {colour} {shape}", f"a {colour} {shape} on grey"]})
    write_text(os.path.join(folder, "images", "captions.jsonl"), "".join(json.dumps(line) + "\n" for line in lines))


# -----------------------------------------------------------------------------
# Running the stages


def write_text(path, text):
    """Into a folder made if need be, atomically (coco.write_atomically: a full disk names the file, in one line)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, lambda f: f.write(text), mode="w")


class Chain:
    """Runs the stages in order, records each event in RUN_DIR/pipeline.log, and stops at the first that does
    not complete. A signal (Ctrl-C, SIGTERM) is noted and passed to the running stage, which saves and exits."""

    def __init__(self, s, stages):
        self.s, self.stages, self.signal, self.child = s, stages, None, None

    def log(self, name, event, seconds=None):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {name} {event}" + (f" {seconds:.1f}" if seconds is not None else "")
        with open(os.path.join(self.s.run_dir, "pipeline.log"), "a") as f:
            f.write(line + "\n")

    def note_signal(self, signum, frame):
        self.signal = signum
        # the terminal's Ctrl-C reaches the whole process group, the stage with it; a SIGTERM may be ours alone
        if signum == signal.SIGTERM and self.child is not None:
            self.child.send_signal(signum)

    def run(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.note_signal)
        for number, stage in enumerate(self.stages, start=1):
            tag = f"[{number}/{len(self.stages)}] {stage.name}"
            if is_complete(self.s.run_dir, stage):
                print(f"{tag}: done before, skipped ({stage.output})")
                self.log(stage.name, "skipped")
                continue
            print(f"{tag}: {stage.what}", flush=True)
            started = time.time()
            self.log(stage.name, "start")
            problem = self.run_stage(stage)
            seconds = time.time() - started
            if problem is None:  # complete, even if a signal came as it ended
                self.log(stage.name, "done", seconds)
                write_text(marker(self.s.run_dir, stage), json.dumps({"output": stage.output, "seconds": seconds}))
                print(f"{tag}: done in {seconds:.1f} s -> {stage.output}", flush=True)
            if self.signal is not None:
                if problem is not None:
                    self.log(stage.name, "stopped", seconds)
                name = signal.Signals(self.signal).name
                print(f"pipeline.py: stopped during stage {stage.name} ({name}); run the same command to continue",
                      file=sys.stderr)
                return 128 + self.signal
            if problem is not None:
                self.log(stage.name, "failed", seconds)
                print(f"pipeline.py: stage {stage.name} failed: {problem}; its output is in "
                      f"{os.path.join(self.s.run_dir, 'logs', stage.name + '.log')}", file=sys.stderr)
                return 1
        print(f"pipeline.py: every stage done; the report card: {os.path.join(self.s.run_dir, 'report.md')}")
        return 0

    def run_stage(self, stage):
        """-> None when the stage completed, else what went wrong, in a few words."""
        log_path = os.path.join(self.s.run_dir, "logs", stage.name + ".log")
        for folder in (os.path.dirname(log_path), os.path.dirname(stage.output)):  # the scripts write into
            os.makedirs(folder, exist_ok=True)  # existing folders only (caption_eval.py --out), to catch typos
        try:
            if stage.function is not None:
                stage.function()
            else:  # the command is built now: it may read what the stages before it wrote
                command = launcher(stage.processes) + [str(a) for a in stage.command()]
                print("  $ " + shlex.join(["python"] + command[1:]), flush=True)  # as a user would type it
                code = self.run_command(command, log_path, stage.stdout)
                if code != 0:
                    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        except (OSError, ValueError, KeyError) as e:  # a full disk, an earlier stage's file unreadable
            return f"{type(e).__name__}: {e}"
        if not os.path.exists(stage.output):
            return f"it ended without writing {stage.output}"
        return None

    def run_command(self, command, log_path, stdout_path):
        """Run one script, its output shown here and kept in log_path (stdout alone in stdout_path if given)."""
        here = os.path.dirname(os.path.abspath(__file__))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the output arrives as it is printed
        if stdout_path:
            os.makedirs(os.path.dirname(stdout_path), exist_ok=True)
        with open(log_path, "ab") as log, open(stdout_path + ".tmp" if stdout_path else os.devnull, "wb") as out:
            # stdout to its own file when asked (sample.py's captions), else with stderr into one stream
            self.child = subprocess.Popen(command, cwd=here, env=env, stdout=out if stdout_path else subprocess.PIPE,
                                          stderr=subprocess.PIPE if stdout_path else subprocess.STDOUT)
            stream = self.child.stderr if stdout_path else self.child.stdout
            while chunk := stream.read1(1 << 16):  # chunks, not lines: tqdm's bars redraw with \r
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
            code = self.child.wait()
            self.child = None
        if stdout_path and code == 0:
            os.replace(stdout_path + ".tmp", stdout_path)
            with open(stdout_path) as f:
                print(f.read(), end="")
        return code


def launcher(processes):
    """One process: python; several: torchrun's module form (no `torchrun` needed on PATH), one node."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def marker(run_dir, stage):
    return os.path.join(run_dir, "stages", stage.name + ".json")


def is_complete(run_dir, stage):
    return os.path.exists(marker(run_dir, stage)) and os.path.exists(stage.output)


# -----------------------------------------------------------------------------
# The command line


def print_plan(s, stages):
    device = "CPU" if s.mode == "tiny" else f"{s.gpus} GPU{'s' if s.gpus > 1 else ''}"
    print(f"pipeline.py {'--' + s.mode if s.mode != 'full' else '(the full chain)'}: {len(stages)} stages on "
          f"{device}, into {s.run_dir}")
    for number, stage in enumerate(stages, start=1):
        state = "done" if is_complete(s.run_dir, stage) else "to do"
        print(f"  {number:2d}. {stage.name:<10s} {state:<6s} {stage.what}\n{'':21s}-> {stage.output}")
    print()


def same_settings(s):
    """The first run's pipeline.json against these settings: another run in the same folder is refused."""
    path = os.path.join(s.run_dir, "pipeline.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        recorded = json.load(f)["settings"]
    changed = [f"{name} {recorded.get(name)!r} (now {value!r})" for name, value in asdict(s).items()
               if name != "gpus" and recorded.get(name) != value]
    if changed:
        return (f"{path}: this folder holds another run ({', '.join(changed)}); choose another --run-dir, "
                f"or run with its settings to continue it")
    return None


def require_tools():
    """What the later stages need, asked now: a missing Java found by the val stage would come after the
    training, hours in. caption_eval.py's metrics run Java; sample.py draws the attention maps with matplotlib."""
    from caption_eval import require_metric_tools
    require_metric_tools()
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("matplotlib: not installed; the attention stage draws its maps with it: "
                          "pip install matplotlib")


def lock_run_dir(run_dir):
    """One chain per run folder: a second would run the same stages into the same files. lockf's lock goes
    with the process, so a killed chain leaves nothing to clean up."""
    handle = open(os.path.join(run_dir, "pipeline.lock"), "w")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(f"pipeline.py: {run_dir}: another pipeline.py is running in this folder")
    return handle


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_const", dest="mode", const="tiny",
                      help="every stage on generated data with tiny models, on the CPU, offline")
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="one GPU: OpenAI's GPT-2 124M, CLIP, --images COCO images a split")
    p.add_argument("--run-dir", help="this run's outputs (default: runs/<mode>)")
    p.add_argument("--data-dir", default=Settings.data_dir, help="data that runs share (not used by --tiny)")
    p.add_argument("--gpus", type=positive_int, help="GPUs to train on (default: all there are, 1 with --tiny)")
    p.add_argument("--recipe", default=Settings.recipe, choices=["gpt2", "fast"], help="train_gpt2.py --recipe")
    p.add_argument("--images", type=positive_int, default=Settings.images,
                   help="--quick: the first N images of each of Karpathy's splits")
    args = p.parse_args(argv)
    mode = args.mode or "full"
    gpus = args.gpus or (1 if mode == "tiny" else max(1, visible_gpus()))
    return Settings(mode=mode, run_dir=args.run_dir or os.path.join("runs", mode), data_dir=args.data_dir,
                    gpus=gpus, recipe=args.recipe, images=args.images)


def visible_gpus():
    import torch
    return torch.cuda.device_count()


def main(argv=None):
    s = parse_args(argv)
    s.run_dir, s.data_dir = os.path.abspath(s.run_dir), os.path.abspath(s.data_dir)
    problem = same_settings(s)
    if problem:
        sys.exit(f"pipeline.py: {problem}")
    require_tools()
    os.makedirs(s.run_dir, exist_ok=True)
    lock = lock_run_dir(s.run_dir)
    stages = stages_of(s)
    print_plan(s, stages)
    if not os.path.exists(os.path.join(s.run_dir, "pipeline.json")):
        write_text(os.path.join(s.run_dir, "pipeline.json"), json.dumps(
            {"mode": s.mode, "gpus": s.gpus, "settings": asdict(s), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
             "stages": [{"name": stage.name, "what": stage.what} for stage in stages]}, indent=2))
    code = Chain(s, stages).run()
    lock.close()
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ImportError, ValueError) as e:  # OSError: a full disk, named by write_atomically
        sys.exit(f"pipeline.py: {e}")
    except KeyboardInterrupt:  # before the chain listens for it (while the plan is made)
        print("pipeline.py: stopped (Ctrl-C); run the same command to continue", file=sys.stderr)
        sys.exit(130)
