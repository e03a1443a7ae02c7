"""bench.py measures speed and asserts none of it; what is tested here is that its comparison with
build-nanogpt reads what the scripts really print, and refuses a reference script it does not recognise; and
that on CUDA it measures the GPU --device names and refuses an attention kernel that cannot run a row."""
import argparse
import re

import pytest
import torch

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


# --- the CUDA path, on the CPU: torch.cuda's functions replaced by recorders ---------------------------------


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with GPUs, as far as bench.main can tell: every call it makes to torch.cuda is recorded in
    the returned list instead of reaching a GPU. The float32 matmul precision is left as it is, for the
    tests that run after this one in the same process."""
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # --device cuda:N is checked against it
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
    return calls


def test_timing_waits_for_the_gpu_it_measures(monkeypatch):
    # waiting on another GPU (GPU 0, by default) would time only the kernel launches on this one
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    bench.timed(lambda: None, "cuda:3", warmup=2, iters=3)
    assert waited == ["cuda:3", "cuda:3"]  # after the warmup, and after the timed calls


def test_a_numbered_gpu_becomes_the_current_device_before_any_benchmark(fake_gpus, monkeypatch):
    monkeypatch.setitem(bench.BENCHMARKS, "sample", lambda args: fake_gpus.append(("sample", args.device)))
    bench.main(["sample", "--device", "cuda:3"])
    assert fake_gpus == [("set_device", "cuda:3"), ("sample", "cuda:3")]
    fake_gpus.clear()
    bench.main(["sample", "--device", "cuda"])  # no number: the current device is already the one meant
    assert fake_gpus == [("sample", "cuda")]


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_flash_and_cudnn_attention_in_float32_are_refused_before_any_model_is_built(fake_gpus, monkeypatch,
                                                                                     backend):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(bench, "GPT", no_model)
    with pytest.raises(ValueError, match=f"--sdpa-backend {backend}: has no float32 kernel on CUDA"):
        bench.main(["train", "--device", "cuda:0", "--sdpa-backend", backend, "--dtypes", "float32", "bfloat16"])
    assert fake_gpus == []  # refused before touching the GPU at all
    # not given --dtypes, such a backend is measured in bfloat16 only
    monkeypatch.setitem(bench.BENCHMARKS, "train", lambda args: fake_gpus.append(args.dtypes))
    bench.main(["train", "--device", "cuda:0", "--sdpa-backend", backend])
    assert fake_gpus[-1] == ["bfloat16"]


def test_cuda_only_attention_kernels_are_refused_on_the_cpu():
    for backend in ("cudnn", "efficient"):
        with pytest.raises(ValueError, match=f"--sdpa-backend {backend}: a CUDA kernel, not available on cpu"):
            bench.main(["train", "--device", "cpu", "--sdpa-backend", backend])
    bench.check_sdpa_backend("flash", "cpu", ["float32"])  # the CPU has a float32 flash kernel


def test_recipe_arms_and_tokens_to_reach_the_reference():
    import argparse
    import bench
    args = argparse.Namespace(adamw_lrs=[6e-4, 1.8e-3], muon_lrs=[1e-3], floors=[0.1, 0.0])
    assert bench.recipe_arms(args) == [("adamw", 6e-4, 0.1), ("adamw", 6e-4, 0.0), ("adamw", 1.8e-3, 0.1),
                                       ("adamw", 1.8e-3, 0.0), ("muon", 1e-3, 0.1), ("muon", 1e-3, 0.0)]
    curve = {0: 10.9, 25: 7.0, 50: 6.1, 75: 5.9}
    assert bench.tokens_to_reach(curve, 6.1, 512) == 50 * 512
    assert bench.tokens_to_reach(curve, 5.0, 512) is None
    command = bench.recipe_command(argparse.Namespace(
        data_dir="d", model="gpt2", n_layer=4, n_head=4, n_embd=128, seq_len=64, batch_size=8, total_batch_size=512,
        steps=300, warmup_steps=30, eval_every=25, val_tokens=4096, device="cpu"), ("muon", 1e-3, 0.0), "out")
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags["--optimizer"] == "muon" and flags["--muon-lr"] == flags["--max-lr"] == "0.001"
    assert flags["--min-lr-ratio"] == "0.0" and flags["--seed"] == "1337" and flags["--max-steps"] == "300"


def test_recipe_figure_marks_the_reference_and_each_optimizers_best():
    import bench
    arm = lambda optimizer, lr, floor, final: {"optimizer": optimizer, "lr": lr, "floor": floor, "ms_per_step": 1.0,
                                               "val": {"0": 10.9, "25": final + 1, "50": final}}
    record = {"args": {"total_batch_size": 512}, "curves": [
        arm("adamw", 6e-4, 0.1, 6.0), arm("adamw", 1.8e-3, 0.1, 5.7), arm("muon", 6e-4, 0.1, 5.5),
        arm("muon", 1.8e-3, 0.0, 5.2)]}
    ax = bench.recipe_figure(record).axes[0]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [
        "adamw 0.0006, floor 0.1 (reference)", "adamw 0.0018, floor 0.1 (best)", "muon 0.0006, floor 0.1",
        "muon 0.0018, floor 0 (best)"]
    assert ax.lines[1].get_xdata().tolist() == [0, 25 * 512, 50 * 512]  # tokens, not steps


# --- bench.py generate: ours eager, ours compiled, transformers ------------------------------------------------


def test_generate_times_three_implementations_and_checks_they_agree(monkeypatch, capsys):
    compile_decode_step = bench.compile_decode_step  # aot_eager: the compiled path in seconds, no C++ compile
    monkeypatch.setattr(bench, "compile_decode_step", lambda model: compile_decode_step(model, backend="aot_eager"))
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)  # left as it is for others
    torch._dynamo.reset()
    try:
        bench.main(["generate", "--model", "tiny", "--batch-sizes", "2", "--new-tokens", "6", "--repeats", "2",
                    "--device", "cpu"])
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out
    assert "batch 2, 6 new tokens: the compiled step's first run took" in out
    table = out[out.index("greedy generation, tiny"):].splitlines()[3:]  # below the title, header and rule
    for name in ("ours, eager", "ours, compiled step", "transformers"):
        [row] = [line.split() for line in table if f" {name} " in line]
        assert row[:2] == ["2", "6"] and row[-1] == "yes", row  # the same greedy tokens as ours eager, every repeat
    assert "1.00x" in [line for line in table if " transformers " in line][0]


def test_generate_refuses_more_tokens_than_the_model_has_positions():
    with pytest.raises(ValueError, match="--new-tokens 300 \\+ a 16-token prompt exceed tiny's block_size 256"):
        bench.main(["generate", "--model", "tiny", "--new-tokens", "300", "--device", "cpu"])


@pytest.mark.parametrize("flag, value", [
    ("--iters", "0"), ("--batch-size", "0"), ("--seq-len", "0"), ("--warmup", "-1"), ("--new-tokens", "0"),
    ("--batch-sizes", "0"), ("--examples", "0"), ("--documents", "0"), ("--repeats", "0"), ("--shards", "0"),
    ("--shard-tokens", "0"), ("--steps", "0"), ("--total-batch-size", "0"), ("--n-layer", "0"), ("--n-head", "0"),
    ("--n-embd", "0"), ("--warmup-steps", "-1"), ("--eval-every", "0"), ("--val-tokens", "0"), ("--adamw-lrs", "0"),
    ("--muon-lrs", "-0.001")])
def test_a_count_or_rate_out_of_range_is_refused_in_one_line(flag, value, capsys):
    # --repeats 0 was a median of nothing, --warmup -1 no warm-up, --steps 0 a reference run that timed nothing
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["train", flag, value, "--device", "cpu"])
    assert exit_info.value.code == 2 and f"argument {flag}: must be a " in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--out", "a_folder"], "--out a_folder: is a folder, not a file"),
    (["--out", "no/such/curves.json"], "--out no/such/curves.json: no such folder"),
    (["--out", "curves.png"], "--out curves.png: is where the curves' figure goes"),
    (["--adamw-lrs", "1e-3"], "the reference arm \\(adamw, 6e-4, floor 0.1\\) must be among the arms")])
def test_recipe_refuses_what_would_stop_it_at_the_end_before_training(argv, message, tmp_path, monkeypatch):
    """Each came after every arm had trained (hours): a traceback writing --out, or the missing reference."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "a_folder").mkdir()
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)  # left as it is for others
    monkeypatch.setattr(bench, "run_script", lambda *args: pytest.fail("trained before the check"))
    with pytest.raises(ValueError, match=message):
        bench.main(["recipe", "--data-dir", "data", "--device", "cpu", *argv])


@pytest.mark.parametrize("what", ["hellaswag", "tokenize", "gpu"])
def test_offline_without_gpt2s_bpe_files_the_benchmarks_that_tokenize_stop_at_once(what, monkeypatch,
                                                                                    tiktoken_offline):
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
    monkeypatch.setattr(bench, "BENCHMARKS", {name: lambda args: pytest.fail("benchmarked before the check")
                                              for name in bench.BENCHMARKS})
    with pytest.raises(ValueError, match="cannot load GPT-2's BPE files .* set TIKTOKEN_CACHE_DIR"):
        bench.main([what, "--device", "cpu"])
