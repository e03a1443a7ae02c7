"""plot_log.py reads the training log format and writes a PNG; a malformed line or a missing log is named, an
output that cannot be written is refused before reading, and the picture is replaced whole or not at all.
Several logs share one figure, one line per log in each panel, labelled by folder or --labels; GPT-2's numbers
appear only with --reference gpt2; a panel appears only when some log has its lines."""
import errno
import os
import sys
import tempfile

import matplotlib.figure
import matplotlib.pyplot as plt
import pytest

import plot_log
from plot_log import read_log
from scripts import run_script

ADAMW = "0 train 10.9\n1 train 9.5\n2 train 8.2\n0 val 10.8\n2 val 8.4\n0 hella 0.25\n2 hella 0.26\n"
MUON = "0 train 10.9\n1 train 9.0\n2 train 7.6\n0 val 10.8\n2 val 7.9\n0 hella 0.25\n2 hella 0.27\n"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def write_logs(tmp_path, **logs):
    """name=text -> [tmp_path/name/log.txt], as training runs with --out-dir name leave them."""
    paths = []
    for name, text in logs.items():
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "log.txt")
        paths[-1].write_text(text)
    return paths


def plot_in_process(monkeypatch, *args):
    """Run plot_log.py's main with these arguments, in this process; -> the figure it saved."""
    monkeypatch.setattr(sys, "argv", ["plot_log.py", *map(str, args)])
    plot_log.main()
    return plt.gcf()


def panels(fig):
    """-> {panel title: [(line label, (xs, ys)), ...]}, legend-less lines included."""
    return {ax.get_title(): [(line.get_label(), (list(line.get_xdata()), list(line.get_ydata())))
                             for line in ax.get_lines()] for ax in fig.axes}


def legend_texts(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_reads_series_and_writes_png(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("0 val 10.9\n0 train 10.95\n1 train 9.5\n0 hella 0.25\n2 train 8.25\n2 val 8.5\n")
    series = read_log(log)
    assert series["train"] == ([0, 1, 2], [10.95, 9.5, 8.25])
    assert series["val"] == ([0, 2], [10.9, 8.5])
    assert series["hella"] == ([0], [0.25])
    run_script("plot_log.py", log)
    with open(tmp_path / "log.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("bad_line", [b"this is not a log line\n", b"1 train nine\n", b"one train 9.5\n",
                                      b"1 train\n",  # cut short, yet ended: not a line still being written
                                      b"1 train \xff\xfe\n"])  # not text: was a UnicodeDecodeError, no file named
def test_a_malformed_line_is_one_line_naming_the_file_and_line(tmp_path, monkeypatch, bad_line):
    """A value that is not a number was 'could not convert string to float', naming neither file nor line."""
    log = tmp_path / "log.txt"
    log.write_bytes(b"0 train 10.9\n" + bad_line + b"2 train 8.2\n")
    with pytest.raises(SystemExit) as exit_info:
        plot_in_process(monkeypatch, log)
    assert exit_info.value.code.startswith(f"plot_log.py: {log}:2: expected '<step> <kind> <value>'")


def test_the_last_line_of_a_log_still_being_written_is_left_out(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("0 train 10.9\n1 train 9.5\n2 tra")  # the run has not finished writing line 3
    assert read_log(log) == {"train": ([0, 1], [10.9, 9.5])}


def test_several_logs_share_one_figure_labelled_by_folder(tmp_path, monkeypatch):
    adamw, muon = write_logs(tmp_path, adamw=ADAMW, muon=MUON)
    out = tmp_path / "compare.png"
    fig = plot_in_process(monkeypatch, adamw, muon, "--out", out)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert panels(fig) == {
        "train loss": [("adamw", ([0, 1, 2], [10.9, 9.5, 8.2])), ("muon", ([0, 1, 2], [10.9, 9.0, 7.6]))],
        "val loss": [("adamw", ([0, 2], [10.8, 8.4])), ("muon", ([0, 2], [10.8, 7.9]))],
        "HellaSwag acc_norm": [("adamw", ([0, 2], [0.25, 0.26])), ("muon", ([0, 2], [0.25, 0.27]))],
    }
    for ax in fig.axes:
        assert legend_texts(ax) == ["adamw", "muon"]
        assert ax.get_lines()[0].get_color() != ax.get_lines()[1].get_color()
    fig = plot_in_process(monkeypatch, adamw, muon, "--labels", "lr 6e-4,lr 1.8e-3", "--out", out)
    assert all(legend_texts(ax) == ["lr 6e-4", "lr 1.8e-3"] for ax in fig.axes)


def test_gpt2_reference_lines_only_when_asked(tmp_path, monkeypatch):
    log, = write_logs(tmp_path, run=ADAMW)
    fig = plot_in_process(monkeypatch, log)
    assert all(label == "run" for lines in panels(fig).values() for label, _ in lines)
    assert all(legend_texts(ax) == ["run"] for ax in fig.axes)

    fig = plot_in_process(monkeypatch, log, "--reference", "gpt2")
    references = {title: [ys for label, (_, ys) in lines if label.startswith("OpenAI GPT-2 124M")]
                  for title, lines in panels(fig).items()}
    assert references == {"train loss": [], "val loss": [[3.2924, 3.2924]], "HellaSwag acc_norm": [[0.2945, 0.2945]]}
    assert legend_texts(fig.axes[1]) == ["run", "OpenAI GPT-2 124M (3.2924)"]


def test_panels_only_for_what_was_logged(tmp_path, monkeypatch):
    """No empty HellaSwag panel for a run without it (a caption run, or --hellaswag-every 0); CIDEr-D gets its own."""
    pretrain, caption = write_logs(tmp_path, pretrain="0 train 10.9\n0 val 10.8\n",
                                   caption="0 train 4.1\n0 val 4.0\n0 cider 0.31\n5 cider 0.45\n")
    fig = plot_in_process(monkeypatch, pretrain)
    assert [ax.get_title() for ax in fig.axes] == ["train loss", "val loss"]
    fig = plot_in_process(monkeypatch, pretrain, caption, "--out", tmp_path / "both.png")
    assert [ax.get_title() for ax in fig.axes] == ["train loss", "val loss", "val CIDEr-D"]
    assert panels(fig)["val CIDEr-D"] == [("caption", ([0, 5], [0.31, 0.45]))]


def test_missing_log_is_named(tmp_path):
    log, = write_logs(tmp_path, run=ADAMW)
    missing = tmp_path / "other" / "log.txt"
    result = run_script("plot_log.py", log, missing, "--out", tmp_path / "compare.png", check=False)
    assert result.returncode != 0
    assert f"{missing}: no such file" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "compare.png").exists()


@pytest.mark.parametrize("out, message", [("compare", "name the file with the picture's type"),
                                          ("no/such/folder/compare.png", "no such folder"),
                                          ("a_folder.png", "is a folder, not a file"),
                                          ("read_only/compare.png", "cannot write in"),
                                          (None, "cannot write in")])  # the default: read_only/log.png
def test_an_out_that_cannot_be_written_is_one_line_before_the_logs_are_read(tmp_path, monkeypatch, capsys, out,
                                                                            message):
    """Each was matplotlib's traceback, after the reading: no extension, a missing folder, a folder, a read-only
    mount (for --out, or for the default beside the log)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_folder.png").mkdir()
    (tmp_path / "read_only").mkdir()
    (tmp_path / "read_only" / "log.txt").write_text(ADAMW)
    temporary_file = tempfile.TemporaryFile

    def read_only_mount(*args, dir=None, **kwargs):  # root may write anywhere here: a read-only mount is faked
        if os.path.basename(dir) == "read_only":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return temporary_file(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_mount)
    monkeypatch.setattr(plot_log, "read_log", lambda path: pytest.fail("read the logs before checking --out"))
    with pytest.raises(SystemExit) as exit_info:
        plot_in_process(monkeypatch, "read_only/log.txt", *(["--out", out] if out else []))
    assert exit_info.value.code == 2 and f"--out {out or 'read_only/log.png'}: {message}" in capsys.readouterr().err


def test_a_failed_write_leaves_the_previous_picture_whole(tmp_path, monkeypatch):
    log, = write_logs(tmp_path, run=ADAMW)
    out = tmp_path / "run" / "log.png"
    out.write_bytes(b"yesterday's picture")

    def full_disk(figure, path, **kwargs):
        open(path, "wb").write(b"half a pict")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        plot_in_process(monkeypatch, log)
    assert exit_info.value.code == f"plot_log.py: {out}: not written (No space left on device)"
    assert out.read_bytes() == b"yesterday's picture" and sorted(os.listdir(out.parent)) == ["log.png", "log.txt"]


def test_the_step_line_s_other_numbers_are_drawn_when_asked(tmp_path, monkeypatch, capsys):
    """log.txt keeps each step's lr, gradient norm, tokens/s and MFU too: the results stay the default panels."""
    log, = write_logs(tmp_path, run="0 train 10.9\n0 lr 6.0000e-05\n0 norm 1.2500\n0 tok_s 51234\n0 mfu 41.20\n"
                                    "1 train 9.5\n1 lr 1.2000e-04\n1 norm 0.9000\n1 tok_s 52000\n1 mfu 41.80\n")
    assert [ax.get_title() for ax in plot_in_process(monkeypatch, log).axes] == ["train loss"]
    fig = plot_in_process(monkeypatch, log, "--panels", "lr,norm,tok_s,mfu")
    assert [ax.get_title() for ax in fig.axes] == ["learning rate", "gradient norm", "tokens/s, all GPUs",
                                                   "MFU per GPU, %"]
    assert panels(fig)["MFU per GPU, %"] == [("run", ([0, 1], [41.2, 41.8]))]
    with pytest.raises(SystemExit):
        plot_in_process(monkeypatch, log, "--panels", "lr,speed")
    assert "--panels: speed: not one of train, val" in capsys.readouterr().err
