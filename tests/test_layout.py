"""The house stays layered: each module imports only modules below it, so model.py can be read (and used) alone,
and no import cycle can creep in as features land."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first: a module may import only modules of a lower layer
LAYERS = [
    {"model", "fineweb", "plot_log"},  # nothing of ours
    {"generate", "checkpoint"},  # functions over a model; checkpoint files
    {"training"},  # what both training scripts share
    {"coco", "hellaswag"},  # data and benchmark, each with its own command line
    {"caption_eval", "train_gpt2", "export_hf"},  # export_hf: a checkpoint -> a Hugging Face folder
    {"sample", "train_caption"},
    {"bench", "demo", "report"},  # demo: a web page over sample.py's Captioner; report: a run's report card
    {"pipeline"},  # the chain: runs every script in turn
]


def our_imports(module):
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):  # imports inside functions count too
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set().union(*LAYERS)


def test_every_module_imports_only_modules_below_it():
    layer_of = {module: i for i, layer in enumerate(LAYERS) for module in layer}
    ours = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    assert ours == set(layer_of), "a new top-level module needs its place in LAYERS"
    upward = [(module, imported) for module in sorted(ours) for imported in sorted(our_imports(module))
              if layer_of[imported] >= layer_of[module]]
    assert upward == []


def test_model_py_is_the_model_alone():
    assert our_imports("model") == set()


SCRIPTS = ["train_gpt2", "train_caption", "fineweb", "hellaswag", "coco", "sample", "caption_eval", "export_hf",
           "plot_log", "bench", "demo", "report", "pipeline"]


class Parsed(Exception):
    """Raised in place of parse_args: carries the script's parser out, before it reads any flag."""


def parser_of(script, monkeypatch):
    import argparse
    import importlib
    def catch(parser, *args, **kwargs):
        raise Parsed(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    module = importlib.import_module(script)
    build = getattr(module, "parse_args", None) or module.main
    try:
        build([]) if build.__code__.co_argcount else build()
    except Parsed as parsed:
        return parsed.args[0]
    raise AssertionError(f"{script} built no parser")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_s_help_says_what_it_does_and_its_default(script, monkeypatch):
    """`python X.py --help` is where a user looks for what a run does unless told otherwise: every option says
    what it is for, and every option with a default (other than on/off switches) says the default there."""
    import argparse
    parser = parser_of(script, monkeypatch)
    formatter = parser._get_formatter()
    actions = [action for group in [parser] + [sub for action in parser._actions
                                               if isinstance(action, argparse._SubParsersAction)
                                               for sub in action.choices.values()] for action in group._actions]
    assert [action.dest for action in actions if not action.help] == []
    assert "(default: None)" not in parser.format_help()  # an option without a default says what happens instead
    hidden = []
    for action in actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or isinstance(action.default,
                                                                                                    bool):
            continue
        text = formatter._expand_help(action) if action.help else ""
        as_typed = " ".join(map(str, action.default)) if isinstance(action.default, list) else None
        if str(action.default) not in text and (as_typed is None or as_typed not in text):
            hidden.append(f"{action.option_strings[-1]} (default {action.default})")
    assert hidden == []


@pytest.mark.parametrize("nodes", [1, 2])
def test_the_slurm_script_is_valid_bash_and_its_training_flags_parse(nodes, monkeypatch):
    """scripts/slurm.sbatch cannot run here (no SLURM): what can be checked is. Its shell parses, its flags are
    train_gpt2.py's, and its batch size makes the 524,288-token step on 8 x nodes GPUs."""
    import re
    import shlex
    import subprocess
    import train_gpt2
    path = os.path.join(ROOT, "scripts", "slurm.sbatch")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    assert "#SBATCH --signal=TERM@" in text and "#SBATCH --requeue" in text and "--resume auto" in text
    arithmetic = re.search(r"BATCH_SIZE=\$\(\((.*)\)\)", text).group(1)  # bash's $(( )): whole numbers
    batch_size = eval(arithmetic.replace("SLURM_NNODES", str(nodes)).replace("/", "//"))
    command = re.search(r"train_gpt2\.py (.*)\n", text).group(1).replace('"$BATCH_SIZE"', str(batch_size))
    args = train_gpt2.parse_args(shlex.split(command))
    assert args.total_batch_size % (args.batch_size * args.seq_len * 8 * nodes) == 0


@pytest.mark.parametrize("script, message", [
    ("train_gpt2", "stopped (Ctrl-C); --resume auto continues from the last checkpoint"),
    ("train_caption", "stopped (Ctrl-C); --resume auto continues from the last checkpoint"),
    ("coco", "stopped (Ctrl-C); the images encoded so far are kept, run it again to go on"),
    ("sample", "stopped (Ctrl-C)"),
    ("caption_eval", "stopped (Ctrl-C)"),
    ("hellaswag", "stopped (Ctrl-C)"),
    ("export_hf", "stopped (Ctrl-C)"),
    ("demo", "stopped (Ctrl-C)"),
    ("report", "stopped (Ctrl-C)"),
    ("pipeline", "stopped (Ctrl-C); run the same command to continue"),
])
def test_ctrl_c_is_one_line_and_status_130(script, message, monkeypatch, capsys):
    """^C before a run takes it itself (StopSignal), or a second one, printed KeyboardInterrupt's traceback.
    Now one line and the status a shell gives ^C (128 + SIGINT). The script runs as a command would (as
    __main__); ^C arrives while it reads its flags."""
    import argparse
    import runpy
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", ctrl_c)
    with pytest.raises(SystemExit) as stopped:
        try:
            runpy.run_path(os.path.join(ROOT, f"{script}.py"), run_name="__main__")
        except KeyboardInterrupt:  # (caught here: it would stop the whole test session)
            pytest.fail("a KeyboardInterrupt traceback")
    assert stopped.value.code == 130 and capsys.readouterr().err == f"{script}.py: {message}\n"
