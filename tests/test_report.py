"""report.py turns a run folder (the layout pipeline.py leaves) into report.md: every number in it is one the run
logged, a stage or number that is missing is said to be missing, the figures are optional (matplotlib), a bad log
line is named by file and line, and the old report is replaced whole or not at all. The run folders here are
written by hand, small: no training runs."""
import errno
import json
import os
import statistics
import sys

import pytest

import report
from scripts import run_script

TRAIN_STEPS = range(10)
TOK_S = [41000 + 977 * (step % 4) for step in TRAIN_STEPS]
MFU = [38.5 + step / 10 for step in TRAIN_STEPS]
VAL = {0: 10.95, 5: 6.1234, 10: 4.5678}
HELLA = {0: 0.2481, 10: 0.2733}
CIDER = {100: 0.512, 200: 0.7481, 300: 0.7399}
SWEEP = [(1, None, {"BLEU-1": 0.6812, "BLEU-4": 0.2554, "ROUGE-L": 0.4981, "CIDEr": 0.8315}),
         (3, 0.5, {"BLEU-1": 0.7013, "BLEU-4": 0.2899, "ROUGE-L": 0.5102, "CIDEr": 0.9046}),
         (3, 1.0, {"BLEU-1": 0.6977, "BLEU-4": 0.2841, "ROUGE-L": 0.5066, "CIDEr": 0.8872})]
TEST = {"BLEU-1": 0.7044, "BLEU-4": 0.2921, "ROUGE-L": 0.5120, "CIDEr": 0.9187}
PNG = b"\x89PNG\r\n\x1a\n"


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def pretrain_log(gpu=True):
    lines = []
    for step in TRAIN_STEPS:
        lines += [f"{step} val {VAL[step]}"] if step in VAL else []
        lines += [f"{step} hella {HELLA[step]}"] if step in HELLA else []
        lines += [f"{step} train {10 - step / 2:.6f}", f"{step} lr 6.0000e-04", f"{step} norm 1.2345",
                  f"{step} tok_s {TOK_S[step]}"] + ([f"{step} mfu {MFU[step]:.2f}"] if gpu else [])
    return "\n".join(lines + [f"10 val {VAL[10]}", f"10 hella {HELLA[10]}"]) + "\n"


def caption_log():
    lines = [f"{step} train {3 - step / 200:.6f}\n{step} img_s 812" for step in range(0, 301, 50)]
    lines += [f"{step} val {2.9 - step / 300:.4f}\n{step} cider {cider}" for step, cider in CIDER.items()]
    return "\n".join(lines) + "\n"


def run_json(init=None, gpu=True):
    args = {"init": init, "total_batch_size": 64} if init else {"total_batch_size": 524288, "max_steps": 10}
    return {"command": "x.py", "args": args, "git": "abc1234+dirty", "torch": "2.14.1",
            "world_size": 8 if gpu else 1, "devices": {"NVIDIA H100 80GB HBM3": 8} if gpu else {"cpu": 1},
            "started": "2026-12-03 10:00:00 UTC"}


def sweep_result(split, rows):
    settings = {"checkpoint": "run/caption/best.pt", "features_dir": "run/features", "split": split,
                "karpathy_json": "dataset_coco.json", "images": 5000,
                "references_per_image": {"min": 5, "mean": 5.002, "max": 7}, "max_new_tokens": 30}
    if len(rows) == 1:
        return {**settings, "beam": rows[0][0], "length_penalty": rows[0][1], "metrics": rows[0][2], "captions": []}
    return {**settings, "best": {"beam": 3, "length_penalty": 0.5},
            "rows": [{"beam": b, "length_penalty": lp, "metrics": m, "captions": []} for b, lp, m in rows]}


def build_run(root, mode="full", pretrain=True, caption=True, evaluation=True, gpu=True):
    """A run folder as pipeline.py leaves it; pretrain took two attempts (3000 s stopped, then 600.4 s done).
    The pipeline lists every stage (--quick too), logs those it ran."""
    stages = ["pretrain", "export", "features", "caption", "val", "test", "attention", "report"]  # pipeline.py's
    write(root / "pipeline.json", {"mode": mode, "gpus": 8, "settings": {}, "started": "2026-12-03 10:00:00 UTC",
                                   "stages": [{"name": s, "what": f"the {s} stage"} for s in stages]})
    events = ["pretrain start", "pretrain stopped 3000", "pretrain start", "pretrain done 600.4"] * pretrain + [
              "export skipped", "features start", "features done 120", "features skipped", "caption start",
              "caption done 1500", "val start", "val done 10", "test start", "test failed 20", "report start"]
    write(root / "pipeline.log", "".join(f"2026-12-03 10:00:{i:02d} {event}\n" for i, event in enumerate(events)))
    if pretrain:
        write(root / "pretrain" / "log.txt", pretrain_log(gpu))
        write(root / "pretrain" / "run.json", run_json(gpu=gpu))
    if caption:
        write(root / "caption" / "log.txt", caption_log())
        write(root / "caption" / "run.json", run_json("log/model_000010.pt" if pretrain else "gpt2", gpu))
        write(root / "caption" / "best.pt", "")
    if evaluation:
        write(root / "eval" / "val_sweep.json", sweep_result("val", SWEEP))
        write(root / "eval" / "test.json", sweep_result("test", [(3, 0.5, TEST)]))
        write(root / "eval" / "gallery.html", "<html></html>")
        write(root / "eval" / "attention" / "captions.txt", "pics/dog.jpg: a dog runs on the beach\n"
                                                            "pics/cat.jpg: a cat sleeps on a sofa\n")
        (root / "eval" / "attention" / "map_dog.png").write_bytes(PNG)  # the cat has no map: only its caption
    return root


@pytest.fixture
def sketched_figures(monkeypatch):
    """The figures are built (their lines, labels, axes) but not drawn into pixels: drawing takes half a second
    each, and only the first test looks at the files."""
    from matplotlib.figure import Figure
    monkeypatch.setattr(Figure, "savefig", lambda figure, path, **kwargs: open(path, "wb").write(PNG))


def make_report(run_dir):
    report.main([str(run_dir)])
    return (run_dir / "report.md").read_text()


def test_the_report_names_every_number_the_run_logged(tmp_path):
    text = make_report(build_run(tmp_path))
    assert "mode: **full**" in text and "started: 2026-12-03 10:00:00 UTC" in text
    assert "time in all: 1 h 27 min" in text  # 3000 + 600.4 + 120 + 1500 + 10 + 20 s
    assert "| pretrain | the pretrain stage | done | 2 | 1 h 00 min |" in text
    assert "| test | the test stage | failed | 1 | 20 s |" in text
    assert "| attention | the attention stage | not run | 0 | - |" in text
    assert "| export | the export stage | done before (skipped) | 0 | - |" in text  # its output was there
    assert "| features | the features stage | done | 1 | 2 min 00 s |" in text  # done, then skipped on a rerun
    assert "| report | the report stage | running | 1 | - |" in text
    assert f"| final val loss | {VAL[10]:.4f} (step 10) |" in text
    assert f"| final HellaSwag acc_norm | {HELLA[10]:.4f} (step 10) |" in text
    assert f"| tokens seen | {(max(TRAIN_STEPS) + 1) * 524288:,} |" in text
    assert f"| tokens/s (median) | {statistics.median(TOK_S):,.0f} |" in text
    assert f"| MFU per device (median) | {statistics.median(MFU):.1f}% |" in text
    assert f"| GPU-hours | {3600.4 * 8 / 3600:.2f} |" in text
    assert f"caption/best.pt, step 200: the best val CIDEr-D during training, {100 * CIDER[200]:.1f}" in text
    assert "split val of Karpathy's split (dataset_coco.json): 5000 images, 5 to 7 references per image (mean 5.00)"\
        in text and "split test of Karpathy's split" in text
    for beam, penalty, metrics in SWEEP:
        cells = " | ".join(f"{100 * metrics[name]:.1f}" for name in ["BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"])
        chosen = "**chosen**" if (beam, penalty) == (3, 0.5) else ""
        assert f"| {beam} | {'-' if penalty is None else f'{penalty:g}'} | {cells} | {chosen} |" in text
    assert "| 3 | 0.5 | " + " | ".join(f"{100 * TEST[n]:.1f}" for n in ["BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"])\
        in text
    assert "**a dog runs on the beach** (dog.jpg)" in text and "(eval/attention/map_dog.png)" in text
    assert "**a cat sleeps on a sofa** (cat.jpg)" in text and "map_cat.png" not in text
    assert "[eval/gallery.html](eval/gallery.html)" in text
    assert "| pretrain/run.json | abc1234+dirty | 2.14.1 | 8 x NVIDIA H100 80GB HBM3 | 8 |" in text
    assert "OpenAI GPT-2 124M (val loss 3.2924" in text
    for figure in ["lm.png", "caption.png"]:
        assert f"(report/{figure})" in text and (tmp_path / "report" / figure).read_bytes().startswith(PNG)
    assert sorted(os.listdir(tmp_path)) == ["caption", "eval", "pipeline.json", "pipeline.log", "pretrain",
                                            "report", "report.md"]  # no .tmp left


@pytest.mark.parametrize("mode", ["tiny", "full"])
def test_gpt2_s_reference_lines_only_on_fineweb_edu(mode, tmp_path, sketched_figures):
    """The tiny run's text is generated: GPT-2's FineWeb-Edu numbers beside it would mislead. Chance is drawn always."""
    text = make_report(build_run(tmp_path, mode))
    series = report.read_log(tmp_path / "pretrain" / "log.txt")
    figure = report.lm_figure(series, 524288, fineweb=mode != "tiny")
    labels = [line.get_label() for ax in figure.axes for line in ax.get_lines()]
    assert ("OpenAI GPT-2 124M (3.2924)" in labels) == (mode == "full") == ("Dashed: OpenAI GPT-2 124M" in text)
    assert "chance (0.25)" in labels and ("the tiny run's text is generated" in text) == (mode == "tiny")
    loss_ax = figure.axes[0]
    assert loss_ax.get_xlabel() == "tokens seen" and list(loss_ax.get_lines()[1].get_xdata()) == \
        [step * 524288 for step in VAL]


def test_a_quick_run_says_the_decoder_started_from_gpt2_and_what_is_missing(tmp_path, sketched_figures):
    text = make_report(build_run(tmp_path, "quick", pretrain=False, evaluation=False, gpu=False))
    assert ("Pretraining: not run (no pretrain/log.txt). The captioner's decoder started from OpenAI's GPT-2 124M "
            "(caption/run.json's args.init is gpt2).") in text
    assert "| pretrain | the pretrain stage | not run | 0 | - |" in text
    assert "Decoding, chosen on val: missing (no eval/val_sweep.json)." in text
    assert "Test: missing (no eval/test.json)." in text and "No gallery (no eval/gallery.html)." in text
    assert "| caption/run.json | abc1234+dirty | 2.14.1 | 1 x cpu | 1 |" in text


def test_one_image_s_attention_map_is_map_png(tmp_path, sketched_figures):
    """sample.py --attention-map map.png adds each image's name to the file's only when there are several."""
    build_run(tmp_path)
    write(tmp_path / "eval" / "attention" / "captions.txt", "pics/bird.jpg: a bird on a branch\n")
    (tmp_path / "eval" / "attention" / "map.png").write_bytes(PNG)
    assert "![where each word looked: a bird on a branch](eval/attention/map.png)" in make_report(tmp_path)


def test_a_folder_with_only_the_plan_says_every_stage_is_missing(tmp_path):
    write(tmp_path / "pipeline.json", {"mode": "tiny", "gpus": 0, "settings": {}, "started": "2026-12-03 10:00:00",
                                       "stages": [{"name": "pretrain", "what": "pretrain"}]})
    text = make_report(tmp_path)
    assert "| pretrain | pretrain | not run | 0 | - |" in text and "time in all: 0 s" in text
    assert "Pretraining: not run (no pretrain/log.txt)." in text
    assert "Caption training: not run (no caption/log.txt)." in text
    assert "Missing: no pretrain/run.json or caption/run.json." in text


def test_on_cpu_mfu_is_not_logged_and_the_hours_are_device_hours(tmp_path, sketched_figures):
    text = make_report(build_run(tmp_path, "tiny", gpu=False))
    assert "| MFU per device (median) | not logged" in text
    assert f"| device-hours | {3600.4 / 3600:.2f} |" in text and "GPU-hours" not in text


def test_without_matplotlib_every_table_is_still_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    text = make_report(build_run(tmp_path))
    assert "they need matplotlib (`pip install matplotlib`)" in text
    assert "report/lm.png" not in text and os.listdir(tmp_path / "report") == []
    assert f"| final val loss | {VAL[10]:.4f} (step 10) |" in text and "**chosen**" in text


@pytest.mark.parametrize("log, number, bad_line", [
    ("pretrain/log.txt", 3, "this is not a log line\n"), ("caption/log.txt", 3, "3 train nine\n"),
    ("pipeline.log", 2, "this is not a log line\n"),
    ("pipeline.log", 4, "2026-12-03 10:00:03 pretrain done\n"),  # an attempt's end without its seconds
    ("pipeline.log", 5, "2026-12-03 10:00:04 features began\n")])
def test_a_bad_log_line_is_named_and_the_old_report_kept(log, number, bad_line, tmp_path, sketched_figures):
    build_run(tmp_path)
    make_report(tmp_path)
    old = (tmp_path / "report.md").read_text()
    lines = (tmp_path / log).read_text().splitlines(keepends=True)
    lines[number - 1] = bad_line
    (tmp_path / log).write_text("".join(lines))
    with pytest.raises(ValueError, match=f"^{tmp_path / log}:{number}: expected '<"):
        report.main([str(tmp_path)])
    assert (tmp_path / "report.md").read_text() == old


def test_an_unreadable_json_is_named(tmp_path, sketched_figures):
    write(build_run(tmp_path) / "eval" / "test.json", '{"split": "te')
    with pytest.raises(ValueError, match=f"^{tmp_path / 'eval' / 'test.json'}: cannot read it"):
        report.main([str(tmp_path)])


@pytest.mark.parametrize("full_disk_at", ["a figure", "report.md"])
def test_the_old_report_is_replaced_whole_or_not_at_all(full_disk_at, tmp_path, monkeypatch, sketched_figures):
    """A full disk while the figures are written, or at the last rename (the new figures already in report/):
    either way the old report.md keeps its old figures."""
    build_run(tmp_path)
    write(tmp_path / "report.md", "the old report")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "old.png").write_bytes(PNG)
    from matplotlib.figure import Figure
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as patch:
        patch.setattr(*(Figure, "savefig") if full_disk_at == "a figure" else (os, "replace"), full_disk)
        with pytest.raises(ValueError, match="report.md: not written \\(No space left on device\\)"):
            report.main([str(tmp_path)])
    assert (tmp_path / "report.md").read_text() == "the old report"
    assert os.listdir(tmp_path / "report") == ["old.png"]
    assert sorted(os.listdir(tmp_path)) == ["caption", "eval", "pipeline.json", "pipeline.log", "pretrain",
                                            "report", "report.md"]  # no .tmp left
    make_report(tmp_path)
    assert sorted(os.listdir(tmp_path / "report")) == ["caption.png", "lm.png"]  # the old figures went with it


def test_a_missing_run_folder_is_one_line_and_a_failure(tmp_path):
    result = run_script("report.py", tmp_path / "nowhere", check=False)
    assert result.returncode == 1 and result.stderr == f"report.py: {tmp_path / 'nowhere'}: no such folder\n"
    assert result.stdout == ""
