"""training.py: the helpers both training scripts share. The CUDA paths run here with torch.cuda's functions
replaced by recorders: what matters is which device they were asked about."""
import os
import time

import pytest
import torch
import torch.distributed as dist

import checkpoint
import training
from checkpoint import prune_checkpoints, save_checkpoint
from training import Distributed, rng_state, set_rng_state, start_log


def test_default_dtype_asks_the_device_in_use_and_takes_fp16_where_bf16_is_emulated(monkeypatch):
    asked = []
    capability = {"cuda:2": (7, 0), "cuda:3": (9, 0)}  # a V100 (bf16 only emulated) and an H100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability[device])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what it says of a V100
    assert training.default_dtype("cuda:2") == "float16"  # with loss scaling
    assert training.default_dtype("cuda:3") == "bfloat16"
    assert training.default_dtype("cpu") == "float32"
    assert asked == ["cuda:2", "cuda:3"]


def test_a_numbered_gpu_becomes_the_current_device_without_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    d = training.setup_distributed("cuda:3")
    assert chosen == ["cuda:3"] and d.device == "cuda:3" and not d.ddp


def test_under_torchrun_nccl_is_bound_to_the_local_gpu_with_a_timeout(monkeypatch):
    for name, value in {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("new_group", kw)) or "cpu group")
    d = training.setup_distributed("cuda", timeout_minutes=3)
    assert (d.rank, d.local_rank, d.world_size, d.device, d.cpu_group) == (5, 1, 8, "cuda:1", "cpu group")
    assert calls[0] == ("set_device", "cuda:1")
    init = calls[1][1]
    assert init["backend"] == "nccl" and init["device_id"] == torch.device("cuda:1")
    assert init["timeout"].total_seconds() == 180
    # rank 0's checkpoint write is waited for on a CPU group whose timeout is far longer
    assert calls[2][1]["backend"] == "gloo" and calls[2][1]["timeout"].total_seconds() >= 3600
    # everything else on the CPU keeps --dist-timeout: a stalled peer held the job 2 hours, not 3 minutes
    assert calls[3][1]["backend"] == "gloo" and calls[3][1]["timeout"].total_seconds() == 180


def test_the_per_step_stop_flag_and_small_objects_use_the_short_timeout_group(monkeypatch):
    d = Distributed(True, 0, 0, 2, "cpu", cpu_group="long", step_group="short")
    groups = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, group=None: groups.append(("stop", group)))
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: groups.append(("gather", group)))
    monkeypatch.setattr(dist, "barrier", lambda group=None: groups.append(("after a save", group)))
    stop = training.StopSignal()
    try:
        stop.requested(d)
    finally:
        stop.close(0, None, Distributed(False, 0, 0, 1, "cpu"))
    training.gather_objects("x", d)
    training.wait_for_each_other(d)
    assert groups == [("stop", "short"), ("gather", "short"), ("after a save", "long")]


def test_each_rank_saves_and_restores_its_own_gpu_generator(monkeypatch):
    saved, restored = {}, []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: saved.setdefault(device, torch.tensor([7])))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.item(), device)))
    state = rng_state("cuda:1")
    assert list(saved) == ["cuda:1"] and state["cuda"].item() == 7
    states = [{"torch": torch.get_rng_state(), "cuda": torch.tensor([rank])} for rank in range(4)]
    set_rng_state(states, Distributed(False, 2, 2, 4, "cuda:2"), seed=0)
    assert restored == [(2, "cuda:2")]  # rank 2's own state, onto its own GPU


def test_restoring_eight_ranks_states_on_four_reseeds_instead_of_crashing(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a: pytest.fail("no state of this rank to restore"))
    states = [{"torch": torch.get_rng_state(), "cuda": torch.tensor([rank])} for rank in range(8)]
    draws = []
    for rank in range(2):
        set_rng_state(states, Distributed(False, rank, rank, 4, "cuda:0"), seed=1)
        draws.append(torch.rand(3))
    assert "written by 8 process(es), resumed by 4" in capsys.readouterr().out
    assert not torch.equal(draws[0], draws[1])  # each rank its own stream


def test_resuming_keeps_only_the_log_lines_before_the_checkpoint(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("0 val 10.9\n0 train 10.8\n1 train 10.1\n2 val 9.9\n2 train 9.8\n3 train 9.5\n")
    start_log(str(log), resume_step=2)
    assert log.read_text() == "0 val 10.9\n0 train 10.8\n1 train 10.1\n"
    start_log(str(log))
    assert log.read_text() == ""
    assert not os.path.exists(str(log) + ".tmp")


def test_non_finite_weights_are_never_written(tmp_path):
    path = str(tmp_path / "model_000002.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}}, str(tmp_path / "model_000001.pt"))
    with pytest.raises(FloatingPointError, match="model_000002.pt: not written, w holds NaN.*model_000001.pt"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}}, path)
    assert sorted(os.listdir(tmp_path)) == ["model_000001.pt"]


def test_check_finite_stops_on_a_gradient_norm_that_overflowed(tmp_path):
    assert training.check_finite(torch.tensor(2.5), torch.tensor(0.5), 3, str(tmp_path)) == (2.5, 0.5)
    with pytest.raises(FloatingPointError, match="loss 2.5, gradient norm inf at step 3: stopping before the update"):
        training.check_finite(torch.tensor(2.5), torch.tensor(float("inf")), 3, str(tmp_path))


# --- nothing lost: failed writes, a second run, resume mistakes ----------------------------------------------


def test_a_failed_checkpoint_write_names_the_cause_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = str(tmp_path / "model_000004.pt")
    save_checkpoint({"model": {"w": torch.ones(2)}}, str(tmp_path / "model_000002.pt"))

    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda folder: shutil_usage(free=0))
    with pytest.raises(ValueError, match=r"model_000004.pt: checkpoint not written \(no space left on the device\); "
                                         r"last checkpoint: .*model_000002.pt"):
        save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    assert sorted(os.listdir(tmp_path)) == ["model_000002.pt"]

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(ValueError, match=r"checkpoint not written \(Read-only file system\)"):
        save_checkpoint({"model": {"w": torch.ones(2)}}, path)


def shutil_usage(free):
    import shutil
    return shutil._ntuple_diskusage(total=10**9, used=10**9 - free, free=free)


def test_out_dir_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys
    monkeypatch.setattr(training.OutDirLock, "HEARTBEAT", 0.05)
    lock_file, host = tmp_path / "run.lock", socket.gethostname()
    # a live run, on this host or another: its heartbeat thread touches the file
    lock = training.OutDirLock(str(tmp_path))
    lock_file.write_text("node-17 4242\n")  # as if another host's run held it (lock's thread still touches it)
    with pytest.raises(ValueError, match="another run is using this folder \\(host node-17, pid 4242"):
        training.OutDirLock(str(tmp_path))
    lock.release()  # (it leaves the file: it holds another run's name now)
    # dead runs, which a requeued job must be able to follow: a process that has ended on this host (at once),
    # a pid now used by an unrelated live process (pytest's parent), another host's run after SIGKILL
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for owner in (f"{host} {dead.stdout.strip()}", f"{host} {os.getppid()}", "node-17 4242"):
        lock_file.write_text(owner + "\n")
        lock = training.OutDirLock(str(tmp_path))
        assert lock_file.read_text().split() == [host, str(os.getpid())]
        lock.release()


def test_out_dir_lock_is_touched_while_its_run_is_busy(tmp_path, monkeypatch):
    monkeypatch.setattr(training.OutDirLock, "HEARTBEAT", 0.02)
    lock = training.OutDirLock(str(tmp_path))
    os.utime(tmp_path / "run.lock", (0, 0))
    time.sleep(0.2)  # the main thread busy (a long save): the lock's own thread keeps it fresh
    assert os.path.getmtime(tmp_path / "run.lock") > 0
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_take_out_dir_fails_before_training_when_it_cannot_write(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a_file/out: cannot write checkpoints here"):
        training.take_out_dir(str(tmp_path / "a_file" / "out"), Distributed(False, 0, 0, 1, "cpu"))


def test_resume_refuses_to_rewind_past_newer_checkpoints_or_to_read_an_unlistable_folder(tmp_path, monkeypatch):
    d = Distributed(False, 0, 0, 1, "cpu")
    for step in (10, 20):
        (tmp_path / f"model_{step:06d}.pt").write_text("")
    assert training.resume_path(str(tmp_path), "auto", d) == str(tmp_path / "model_000020.pt")
    with pytest.raises(ValueError, match="model_000010.pt: 1 newer checkpoint.*model_000020.pt.*subfolder"):
        training.resume_path(str(tmp_path), str(tmp_path / "model_000010.pt"), d)
    assert training.resume_path(str(tmp_path), str(tmp_path / "model_000020.pt"), d) == str(tmp_path / "model_000020.pt")

    def cannot_list(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(training.os, "listdir", cannot_list)
    with pytest.raises(ValueError, match="cannot list this folder \\(Permission denied\\)"):
        training.resume_path(str(tmp_path), "auto", d)


def test_an_unreadable_newest_checkpoint_names_the_previous_one(tmp_path):
    d = Distributed(False, 0, 0, 1, "cpu")
    save_checkpoint({"model": {"w": torch.ones(1)}}, str(tmp_path / "model_000010.pt"))
    (tmp_path / "model_000020.pt").write_bytes(b"truncated")
    from checkpoint import load_checkpoint
    newest = str(tmp_path / "model_000020.pt")
    with pytest.raises(ValueError, match="model_000020.pt: not a readable checkpoint.*move it aside.*model_000010.pt"):
        training.load_on_every_rank(lambda: load_checkpoint(newest), newest, d)


def test_a_resume_must_have_steps_left():
    with pytest.raises(ValueError, match="at step 20, past --max-steps 10"):
        training.check_resume_step(20, 10, None, "model_000020.pt")
    with pytest.raises(ValueError, match="--stop-at 5 is not after the step model_000020.pt resumes at, 20"):
        training.check_resume_step(20, 100, 5, "model_000020.pt")
    training.check_resume_step(20, 100, 21, "model_000020.pt")


def test_keep_last_deletes_old_checkpoints_but_never_the_newest_or_a_named_one(tmp_path):
    for step in (1, 2, 3, 4, 5):
        (tmp_path / f"model_{step:06d}.pt").write_text("")
    prune_checkpoints(str(tmp_path), 2, keep=[str(tmp_path / "model_000001.pt")])
    assert sorted(os.listdir(tmp_path)) == ["model_000001.pt", "model_000004.pt", "model_000005.pt"]
    prune_checkpoints(str(tmp_path), 1)
    assert os.listdir(tmp_path) == ["model_000005.pt"]


def test_a_stalled_peer_ends_the_run_after_dist_timeout_on_the_cpu_too(monkeypatch):
    """gloo's own default is 30 minutes; --dist-timeout (minutes) replaces it, so one stopped rank (SIGSTOP, a
    hung node) ends the job instead of holding it."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "new_group", lambda **kw: "cpu group")
    training.setup_distributed("cpu", timeout_minutes=0.5)
    assert calls == [{"backend": "gloo", "timeout": calls[0]["timeout"]}] and calls[0]["timeout"].total_seconds() == 30


def test_peak_flops_matches_whole_gpu_names_only(monkeypatch):
    """A substring match gave an L40S the L4's peak (3x the MFU); the SXM H100 names itself "H100 80GB HBM3"."""
    names = {"cuda:0": "NVIDIA L4", "cuda:1": "NVIDIA L40S", "cuda:2": "NVIDIA H100 80GB HBM3", "cuda:3": "NVIDIA H100 PCIe",
             "cuda:4": "NVIDIA A100-SXM4-80GB", "cuda:5": "NVIDIA RTX A1000"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: names[device])
    assert [training.peak_flops(f"cuda:{i}") for i in range(6)] == [121e12, None, 989e12, 756e12, 312e12, None]
    assert training.peak_flops("cpu") is None


def test_resuming_a_renamed_older_checkpoint_still_refuses_the_newer_ones(tmp_path):
    """--resume r/branch.pt, a copy of step 2 while steps 2 and 4 are in the out-dir: the step comes from the file,
    not its name, so the run is refused before it overwrites model_000004.pt with another branch."""
    d = Distributed(False, 0, 0, 1, "cpu")
    out = tmp_path / "run"
    out.mkdir()
    for step in (2, 4):
        save_checkpoint({"kind": "lm", "model": {"w": torch.ones(1)}, "config": {}, "step": step},
                        str(out / f"model_{step:06d}.pt"))
    branch = tmp_path / "r" / "branch.pt"
    branch.parent.mkdir()
    branch.write_bytes((out / "model_000002.pt").read_bytes())
    with pytest.raises(ValueError, match="branch.pt: 1 newer checkpoint.*model_000004.pt"):
        training.resume_path(str(out), str(branch), d)
    later = tmp_path / "r" / "later.pt"  # a copy of the newest is fine
    later.write_bytes((out / "model_000004.pt").read_bytes())
    assert training.resume_path(str(out), str(later), d) == str(later)


def test_an_explicit_bf16_on_a_gpu_that_only_emulates_it_is_warned_of(monkeypatch, capsys):
    capability = {"cuda:0": (7, 0), "cuda:1": (8, 0)}  # a V100, an A100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[device])
    training.warn_if_bf16_is_emulated("bfloat16", "cuda:0")
    assert "warning: --dtype bfloat16 on a GPU of compute capability 7.0: bf16 is only emulated" in capsys.readouterr().err
    for dtype, device in (("bfloat16", "cuda:1"), ("float16", "cuda:0"), ("bfloat16", "cpu")):
        training.warn_if_bf16_is_emulated(dtype, device)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("device, message", [("gpu", "'gpu' is not a device"), ("cuda:x", "is not a device"),
                                             ("cuda", "this machine has 0 CUDA GPUs"),
                                             ("cuda:2", "this machine has 2 CUDA GPUs")])
def test_a_device_that_is_not_there_is_refused_when_the_flags_are_read(device, message, monkeypatch):
    import argparse
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0 if device == "cuda" else 2)
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        training.existing_device(device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [training.existing_device(name) for name in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda",
                                                                                               "cuda:1"]


def test_a_full_disk_stops_the_log_with_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(ValueError, match=r"log.txt: cannot write \(No space left on device\); free space, then "
                                         r"--resume auto"):
        training.append_log(str(tmp_path), "3 train 4.5")


def test_wandb_that_cannot_start_is_one_line_naming_the_flag(monkeypatch):
    import sys
    import types
    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore detail")
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(ValueError, match=r"^--wandb-project p: wandb did not start \(api_key not configured "
                                         r"\(no-tty\)\. call wandb.login\(key=\[your_api_key\]\)\); run `wandb login`"):
        training.Tracker("p", None, {}, Distributed(False, 0, 0, 1, "cpu"))


def test_a_node_whose_hostname_is_loopback_is_told_to_set_gloo_socket_ifname(monkeypatch):
    """Gloo listens on the hostname's address: 127.0.1.1 (Debian's /etc/hosts) cannot be reached from other
    nodes, and the start-up failed after a long wait, naming neither."""
    import socket
    for name, value in {"RANK": "8", "LOCAL_RANK": "0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                        "MASTER_ADDR": "node-0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "10.0.0.1" if host == "node-0" else "127.0.1.1")

    class Joined(Exception):
        pass
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: (_ for _ in ()).throw(Joined()))
    with pytest.raises(ValueError, match="resolves to 127.0.1.1, which other nodes cannot reach; set "
                                         "GLOO_SOCKET_IFNAME"):
        training.setup_distributed("cpu")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    with pytest.raises(Joined):  # now it goes on to join the group
        training.setup_distributed("cpu")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("MASTER_ADDR", "localhost")  # every "node" on this machine (tests): loopback reaches them
    with pytest.raises(Joined):
        training.setup_distributed("cpu")
    monkeypatch.setenv("MASTER_ADDR", "node-0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # one node: nothing to reach
    with pytest.raises(Joined):
        training.setup_distributed("cpu")


def test_gpt2_s_tokenizer_offline_without_its_files_is_one_line(tiktoken_offline):
    from generate import gpt2_encoding
    with pytest.raises(ValueError, match="cannot load GPT-2's BPE files \\(ConnectionError\\); offline\\? .*"
                                         "TIKTOKEN_CACHE_DIR"):
        gpt2_encoding()


@pytest.mark.parametrize("script", ["train_gpt2", "train_caption"])
def test_wandb_project_in_the_environment_turns_wandb_on(script, monkeypatch):
    import importlib
    parse_args = importlib.import_module(script).parse_args
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert parse_args([]).wandb_project is None
    monkeypatch.setenv("WANDB_PROJECT", "gpt2-runs")
    assert parse_args([]).wandb_project == "gpt2-runs"
    assert parse_args(["--wandb-project", "other"]).wandb_project == "other"


def test_the_log_keeps_every_number_of_the_step_line(tmp_path):
    training.append_log(str(tmp_path), "5 train 4.500000", lr="6.0000e-04", norm="0.5000", tok_s="51234", mfu=None)
    training.append_log(str(tmp_path), "5 val 4.4000")
    assert (tmp_path / "log.txt").read_text() == ("5 train 4.500000\n5 lr 6.0000e-04\n5 norm 0.5000\n5 tok_s 51234\n"
                                                  "5 val 4.4000\n")  # mfu unknown (CPU): no line


def test_a_resume_takes_one_file_under_two_spellings_as_the_same(tmp_path, monkeypatch):
    """--init ./lm.pt, then the same file by its absolute path: refused as a change of the run."""
    import argparse
    (tmp_path / "lm.pt").write_text("")
    monkeypatch.chdir(tmp_path)
    checkpoint = {key: {} for key in ("step", "optimizer", "loader", "rng")} | {"args": {"init": "./lm.pt"}}
    training.check_same_run(checkpoint, argparse.Namespace(init=str(tmp_path / "lm.pt")), "x.pt", may_change=set())
    with pytest.raises(ValueError, match=r"x.pt: its run had --init ./lm.pt \(now other.pt\)"):
        training.check_same_run(checkpoint, argparse.Namespace(init="other.pt"), "x.pt", may_change=set())
