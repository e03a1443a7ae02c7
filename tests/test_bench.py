"""bench.py measures speed and asserts none of it; what is tested here is that its comparison with
build-nanogpt reads what the scripts really print, and refuses a reference script it does not recognise."""
import argparse
import re

import pytest

import bench
from test_train_gpt2 import TINY, run, write_shards


def test_the_comparison_reads_our_training_step_lines(tmp_path):
    data = write_shards(tmp_path / "data")
    out = run(TINY + ["--data-dir", data, "--out-dir", str(tmp_path / "log"), "--max-steps", "3"]).stdout
    speeds = bench.step_speeds(out, bench.OUR_STEP_LINE)
    assert sorted(speeds) == [0, 1, 2] and all(v > 0 for v in speeds.values())
    # the val loss lines of the same run are not mistaken for steps
    assert "val loss" in out and len(re.findall(r"(?m)^step ", out)) > 3


def test_the_comparison_reads_build_nanogpts_step_lines():
    # the line build-nanogpt's train_gpt2.py prints after each step (its print format, with numbers filled in)
    line = "step    12 | loss: 6.123456 | lr 1.0070e-05 | norm: 1.2345 | dt: 1234.56ms | tok/sec: 424680.93"
    assert bench.step_speeds("using device: cuda\n" + line + "\n", bench.REFERENCE_STEP_LINE) == {12: 424680.93}


def test_reference_settings_are_patched_once_or_refused():
    source = "B = 64 # micro batch size\nuse_compile = False # TODO\nmax_steps = 19073\n"
    patched = bench.patch_reference(source, [(r"^B = \d+", "B = 4"), (r"^use_compile = False\b", "use_compile = True")])
    assert patched == "B = 4 # micro batch size\nuse_compile = True # TODO\nmax_steps = 19073\n"
    with pytest.raises(ValueError, match="found 0"):  # upstream renamed a setting: refuse, do not measure
        bench.patch_reference(source, [(r"^T = \d+", "T = 128")])
    with pytest.raises(ValueError, match="found 2"):
        bench.patch_reference(source + "B = 32\n", [(r"^B = \d+", "B = 4")])


def test_each_script_sees_only_the_gpu_that_device_names(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # already narrowed by the user: cuda:1 is physical GPU 3
    assert bench.one_visible_device("cuda:1") == ("cuda", {"CUDA_VISIBLE_DEVICES": "3"})
    assert bench.one_visible_device("cuda") == ("cuda", {"CUDA_VISIBLE_DEVICES": "2"})
    assert bench.one_visible_device("cpu") == ("cpu", {})


@pytest.mark.parametrize("change, message", [({"seq_len": 512}, "exceeds tiny's block_size 256"),
                                             ({"total_batch_size": 1000}, "not a multiple"),
                                             ({"steps": 4}, "need at least"),
                                             ({"device": "mps"}, "cuda or cpu")])
def test_sizes_either_script_would_refuse_are_refused_before_running_them(change, message):
    args = dict(model="tiny", batch_size=4, seq_len=128, total_batch_size=1024, steps=8, warmup=2, device="cpu")
    config = bench.GPTConfig(**bench.PRESETS["tiny"])
    bench.check_nanogpt_args(argparse.Namespace(**args), config)  # the settings as given pass
    with pytest.raises(ValueError, match=message):
        bench.check_nanogpt_args(argparse.Namespace(**{**args, **change}), config)
