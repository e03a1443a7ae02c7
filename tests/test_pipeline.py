"""pipeline.py: the whole chain, --tiny, as a user runs it. The first run is killed outright during
pretraining (a crash: no save, its lock left behind), the second goes on from the last checkpoint, skips
what was done and ends in a captioner that names its test pictures; a third run skips every stage. Then the
chain's rules (a failure named, a signal passed on, one chain per folder) on stages that are small commands."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import pipeline
from scripts import ROOT


def start_chain(run_dir, output):
    # its own session, so the test can signal the chain and the stage it runs, as a cluster or a crash does
    return subprocess.Popen([sys.executable, "pipeline.py", "--tiny", "--run-dir", str(run_dir)], cwd=ROOT,
                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})


def interrupt_when(chain, path, signum, timeout=600):
    """Send signum to the chain's whole process group once `path` exists -> the chain's exit status."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert chain.poll() is None, "the chain ended before it could be interrupted"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    os.killpg(chain.pid, signum)
    return chain.wait(timeout=120)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "tiny"
    outputs = []
    for attempt, kill_when in enumerate([run_dir / "pretrain" / "model_000020.pt", None, None]):
        with open(run_dir.parent / f"output_{attempt}.txt", "w+") as output:
            chain = start_chain(run_dir, output)
            code = interrupt_when(chain, kill_when, signal.SIGKILL) if kill_when else chain.wait(timeout=900)
            output.seek(0)
            outputs.append((code, output.read()))
    return run_dir, outputs


def events(run_dir):
    with open(run_dir / "pipeline.log") as f:
        return [line.split()[2:4] for line in f]


def test_the_chain_prints_its_plan_then_a_line_per_stage(tiny_run):
    run_dir, outputs = tiny_run
    first = outputs[0][1].splitlines()
    assert first[0].startswith(f"pipeline.py --tiny: 10 stages on CPU, into {run_dir}")
    stages = pipeline.stages_of(pipeline.Settings(mode="tiny", run_dir=str(run_dir)))
    plan = [line.split() for line in first[1:21]]  # per stage: "1. data to do what", "-> its output"
    assert [words[1] for words in plan[::2]] == [stage.name for stage in stages]
    assert [words[1] for words in plan[1::2]] == [stage.output for stage in stages]
    assert "[1/10] data: done in" in outputs[0][1]


def test_a_killed_stage_resumes_from_its_checkpoint_and_the_chain_finishes(tiny_run):
    run_dir, outputs = tiny_run
    (killed, _), (finished, second) = outputs[:2]
    assert killed == -signal.SIGKILL
    assert finished == 0, second[-3000:]
    assert "[2/10] fineweb: done before, skipped" in second
    saved = max(int(name[6:12]) for name in os.listdir(run_dir / "pretrain") if name.startswith("model_"))
    assert re.search(rf"resuming {run_dir}/pretrain/model_0000\d\d\.pt at step [1-9]\d", second)  # not at 0
    assert saved == 60 and "[3/10] pretrain: done in" in second
    log = events(run_dir)
    assert log.count(["pretrain", "start"]) == 2 and log.count(["pretrain", "done"]) == 1
    assert (run_dir / "report.md").exists() and (run_dir / "eval" / "gallery.html").exists()


def test_a_rerun_skips_every_finished_stage(tiny_run):
    run_dir, outputs = tiny_run
    code, output = outputs[2]
    assert code == 0 and output.count("done before, skipped") == 10
    assert events(run_dir)[-10:] == [[stage, "skipped"] for stage in
                                     ("data", "fineweb", "pretrain", "export", "features", "caption", "val", "test",
                                      "attention", "report")]


def wanted_caption(file):
    return " ".join(["a"] + os.path.basename(file).split("_")[1:3])  # test_red_bar_0.png: "a red bar"


def test_the_captioner_it_ends_with_names_its_test_pictures(tiny_run):
    """caption_eval.py's captions of the test split, and sample.py's of its first pictures, name what each
    picture shows. (coco.py -> train_caption.py -> caption_eval.py and sample.py, on your own jsonl.)"""
    run_dir, _ = tiny_run
    with open(run_dir / "eval" / "test.json") as f:
        test = json.load(f)
    with open(run_dir / "features" / "test_index.json") as f:
        files = json.load(f)["files"]
    captions = [c["caption"] for c in sorted(test["captions"], key=lambda c: c["image_id"])]
    named = [caption in (wanted_caption(file), wanted_caption(file) + " on grey") for file, caption in
             zip(files, captions)]
    assert len(named) == 12 and sum(named) >= 10, list(zip(files, captions))
    with open(run_dir / "eval" / "attention" / "captions.txt") as f:
        sampled = [line.strip().split(": ") for line in f]
    assert len(sampled) == 3 and all(caption.startswith(wanted_caption(file)) for file, caption in sampled), sampled
    assert len(list((run_dir / "eval" / "attention").glob("map_*.png"))) == 3


# --- the chain's rules, on stages that are small Python commands --------------------------------------


def fake_stage(tmp_path, name, code=0, writes=True):
    output = tmp_path / f"{name}.out"
    program = (f"open({str(output)!r}, 'w').write('x')\n" if writes else "") + f"raise SystemExit({code})"
    return pipeline.Stage(name, f"the {name} stage", str(output), lambda: ["-c", program])


def run_chain(tmp_path, stages):
    settings = pipeline.Settings(mode="tiny", run_dir=str(tmp_path))
    return pipeline.Chain(settings, stages).run()


def test_a_failing_stage_stops_the_chain_named_and_the_next_run_starts_there(tmp_path, capsys):
    stages = [fake_stage(tmp_path, "first"), fake_stage(tmp_path, "second", code=3), fake_stage(tmp_path, "third")]
    assert run_chain(tmp_path, stages) == 1
    err = capsys.readouterr().err
    assert f"pipeline.py: stage second failed: exit status 3; its output is in {tmp_path}/logs/second.log" in err
    assert not (tmp_path / "third.out").exists() and not (tmp_path / "stages" / "second.json").exists()
    stages[1] = fake_stage(tmp_path, "second")  # fixed
    assert run_chain(tmp_path, stages) == 0
    assert [e for e in events(tmp_path)] == [["first", "start"], ["first", "done"], ["second", "start"],
                                             ["second", "failed"], ["first", "skipped"], ["second", "start"],
                                             ["second", "done"], ["third", "start"], ["third", "done"]]


def test_a_stage_whose_command_cannot_be_made_or_that_is_killed_fails_in_one_line(tmp_path, capsys):
    unreadable = pipeline.Stage("test", "reads the sweep", str(tmp_path / "out"),
                                lambda: pipeline.chosen_decoding(str(tmp_path / "missing.json")))
    killed = pipeline.Stage("killed", "dies", str(tmp_path / "out"), lambda: ["-c", "import os; os.abort()"])
    assert run_chain(tmp_path, [unreadable]) == 1 and run_chain(tmp_path, [killed]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"pipeline.py: stage test failed: FileNotFoundError: [Errno 2] No such file or "
                             f"directory: '{tmp_path}/missing.json'; its output is in")
    assert err[1].startswith("pipeline.py: stage killed failed: killed by SIGABRT;")


def test_a_stage_that_succeeds_without_its_output_has_failed_and_a_lost_output_is_made_again(tmp_path, capsys):
    assert run_chain(tmp_path, [fake_stage(tmp_path, "first", writes=False)]) == 1
    assert f"it ended without writing {tmp_path}/first.out" in capsys.readouterr().err
    assert run_chain(tmp_path, [fake_stage(tmp_path, "first")]) == 0
    os.remove(tmp_path / "first.out")  # deleted by hand: the marker alone does not make the stage done
    assert run_chain(tmp_path, [fake_stage(tmp_path, "first")]) == 0
    assert events(tmp_path)[-1] == ["first", "done"]


def test_a_sigterm_reaches_the_stage_which_saves_and_the_chain_stops_saying_so(tmp_path):
    """A cluster's preemption: SIGTERM to the chain alone. The running stage gets it too (the training scripts
    then save and exit 143), and the chain stops with the stage named, not marking it done."""
    ready, saved = tmp_path / "ready", tmp_path / "saved"
    program = (f"import signal, time\ndef save(*_): open({str(saved)!r}, 'w').close(); raise SystemExit(143)\n"
               f"signal.signal(signal.SIGTERM, save)\nopen({str(ready)!r}, 'w').close()\ntime.sleep(60)")
    chain = subprocess.Popen([sys.executable, "-c", "import pipeline, sys\n"
                              f"stage = pipeline.Stage('train', 'trains', {str(tmp_path / 'out')!r}, lambda: ['-c', {program!r}])\n"
                              f"sys.exit(pipeline.Chain(pipeline.Settings(run_dir={str(tmp_path)!r}), [stage]).run())"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    chain.send_signal(signal.SIGTERM)
    out, err = chain.communicate(timeout=60)
    assert chain.returncode == 143 and saved.exists()
    assert err.endswith("pipeline.py: stopped during stage train (SIGTERM); run the same command to continue\n")
    assert events(tmp_path) == [["train", "start"], ["train", "stopped"]]
    assert not (tmp_path / "stages" / "train.json").exists()


def test_another_run_s_settings_in_the_same_folder_are_refused_but_another_gpu_count_is_not(tmp_path):
    recorded = pipeline.Settings(mode="tiny", run_dir=str(tmp_path), gpus=1)
    (tmp_path / "pipeline.json").write_text(json.dumps({"settings": vars(recorded)}))
    assert pipeline.same_settings(pipeline.Settings(mode="tiny", run_dir=str(tmp_path), gpus=4)) is None
    problem = pipeline.same_settings(pipeline.Settings(mode="full", run_dir=str(tmp_path), recipe="fast"))
    assert problem.startswith(f"{tmp_path}/pipeline.json: this folder holds another run (mode 'tiny' (now 'full'), "
                              f"recipe 'gpt2' (now 'fast')); choose another --run-dir")


def test_a_second_chain_in_one_folder_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import pipeline, time; lock = pipeline.lock_run_dir({str(tmp_path)!r}); "
                               "print('locked', flush=True); time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(SystemExit, match=f"pipeline.py: {tmp_path}: another pipeline.py is running in this folder"):
            pipeline.lock_run_dir(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()


def test_the_tiny_pictures_are_captioned_by_what_they_show(tmp_path):
    pipeline.write_tiny_data(str(tmp_path))
    lines = [json.loads(line) for line in open(tmp_path / "images" / "captions.jsonl")]
    assert len(lines) == 6 * len(pipeline.COLOURS) * len(pipeline.SHAPES)
    from PIL import Image
    for line in lines[:: len(pipeline.SHAPES)]:
        colour = line["captions"][0].split()[1]
        with Image.open(tmp_path / "images" / line["image"]) as image:  # the shape's colour is in the middle
            assert image.getpixel((64, 64)) == pipeline.COLOURS[colour], line


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_the_gpu_modes_commands_are_what_each_script_accepts(mode, tmp_path):
    """--quick and the full chain cannot run here (no GPU, no network): their commands are at least what each
    script's own parser takes, so a wrong flag fails here, not hours into a run."""
    import importlib
    settings = pipeline.Settings(mode=mode, run_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), gpus=8)
    os.makedirs(tmp_path / "run" / "eval")
    (tmp_path / "run" / "eval" / "val_sweep.json").write_text(json.dumps({"best": {"beam": 5, "length_penalty": 0.5}}))
    checked = []
    for stage in pipeline.stages_of(settings):
        if stage.name in ("attention", "report"):  # reads coco.py's index; takes only RUN_DIR
            continue
        script, *args = [str(a) for a in stage.command()]
        importlib.import_module(script[:-3]).parse_args(args)  # a refused flag: SystemExit, the test fails
        checked.append(stage.name)
    assert checked == (["fineweb", "pretrain", "export"] if mode == "full" else []) + ["features", "caption", "val",
                                                                                     "test"]


def test_a_missing_java_or_matplotlib_is_said_before_the_first_stage(tmp_path, monkeypatch):
    """The val stage's metrics need Java, the attention maps matplotlib: asked before hours of training."""
    import importlib.util
    import shutil
    run_dir = tmp_path / "run"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="^java: not found; the COCO caption metrics run Java"):
        pipeline.main(["--tiny", "--run-dir", str(run_dir)])
    monkeypatch.undo()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "matplotlib" else find_spec(name))
    with pytest.raises(ImportError, match="^matplotlib: not installed; the attention stage draws its maps with it"):
        pipeline.main(["--tiny", "--run-dir", str(run_dir)])
    assert not run_dir.exists()  # nothing written


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import runpy
    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full)  # the rename that would make pipeline.json official
    monkeypatch.setattr(sys, "argv", ["pipeline.py", "--tiny", "--run-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(os.path.join(ROOT, "pipeline.py"), run_name="__main__")
    assert stopped.value.code == f"pipeline.py: {tmp_path}/pipeline.json: cannot write it (No space left on device)"
    assert not (tmp_path / "pipeline.json.tmp").exists()
