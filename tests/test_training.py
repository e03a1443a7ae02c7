"""training.py: the helpers both training scripts share. The CUDA paths run here with torch.cuda's functions
replaced by recorders: what matters is which device they were asked about."""
import os

import pytest
import torch
import torch.distributed as dist

import training
from training import Distributed, rng_state, save_checkpoint, set_rng_state, start_log


def test_default_dtype_asks_the_device_in_use_and_refuses_emulated_bf16(monkeypatch):
    asked = []
    capability = {"cuda:2": (7, 0), "cuda:3": (9, 0)}  # a V100 (bf16 only emulated) and an H100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability[device])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what it says of a V100
    assert training.default_dtype("cuda:2") == "float32"
    assert training.default_dtype("cuda:3") == "bfloat16"
    assert training.default_dtype("cpu") == "float32"
    assert asked == ["cuda:2", "cuda:3"]


def test_a_numbered_gpu_becomes_the_current_device_without_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    d = training.setup_distributed("cuda:3")
    assert chosen == ["cuda:3"] and d.device == "cuda:3" and not d.ddp


def test_under_torchrun_nccl_is_bound_to_the_local_gpu_with_a_timeout(monkeypatch):
    for name, value in {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}.items():
        monkeypatch.setenv(name, value)
    calls = []
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
