"""plot_log.py reads the training log format and writes a PNG; a malformed line is named."""
from plot_log import read_log
from scripts import run_script


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


def test_malformed_line_is_named(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("0 train 10.9\nthis is not a log line\n")
    result = run_script("plot_log.py", log, check=False)
    assert result.returncode != 0
    assert f"{log}:2:" in result.stderr and len(result.stderr.strip().splitlines()) == 1
