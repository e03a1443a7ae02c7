"""train_gpt2.py: the loader's promises, the schedule, DDP = one process, resume = no interruption, and
clear errors on bad input. Tiny models on synthetic shards, on the CPU."""
import os
import re
import shutil

import numpy as np
import pytest
import torch

from train_gpt2 import ShardLoader
from scripts import run_script
from training import cosine_lr

TINY = ["--model", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "2", "--seq-len", "16",
        "--total-batch-size", "128", "--warmup-steps", "2", "--val-tokens", "64", "--hellaswag-every", "0",
        "--sample-every", "0", "--device", "cpu", "--max-lr", "1e-3"]


def write_shards(folder, n_train=3, tokens=2000, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "edufineweb_val_000000.npy"), rng.integers(0, 50257, tokens, dtype=np.uint16))
    for i in range(1, n_train + 1):
        np.save(os.path.join(folder, f"edufineweb_train_{i:06d}.npy"), rng.integers(0, 50257, tokens, dtype=np.uint16))
    return str(folder)


def write_hellaswag_rows(path, n=5):
    """A few rows in HellaSwag's schema (the scorer needs ctx, endings and label)."""
    import json
    with open(path, "w") as f:
        for i in range(n):
            endings = [f"ending number {j} of example {i}" for j in range(4)]
            f.write(json.dumps({"ind": i, "activity_label": "Testing", "ctx_a": f"Context {i}.", "ctx_b": "",
                                "ctx": f"Context {i}.", "split": "val", "split_type": "indomain", "label": i % 4,
                                "endings": endings, "source_id": f"test~{i}"}) + "\n")
    return str(path)


def run(args, nproc=1, check=True):
    return run_script("train_gpt2.py", *args, nproc=nproc, check=check)


def read_log(out_dir, kind):
    rows = [line.split() for line in open(os.path.join(out_dir, "log.txt"))]
    return {int(step): float(value) for step, k, value in rows if k == kind}


# --- the loader ------------------------------------------------------------------------------------------


def write_uneven_shards(folder, windows=(14, 11, 9), T=16, seed=0):
    """Train shards holding 14, 11 and 9 windows of T tokens: no step size or rank count divides them."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "edufineweb_val_000000.npy"), rng.integers(0, 50257, 2000, dtype=np.uint16))
    for i, n in enumerate(windows, start=1):
        tokens = rng.integers(0, 50257, n * T + 1, dtype=np.uint16)
        np.save(os.path.join(folder, f"edufineweb_train_{i:06d}.npy"), tokens)
    return str(folder)


def steps_seen(loader, n_steps, world_size=1):
    """The windows of n_steps optimizer steps, each step the ranks' shares joined in rank order."""
    steps = []
    for _ in range(n_steps):
        state = loader.state_dict()
        shares = []
        for rank in range(world_size):  # every rank starts the step from the same loader state
            loader.load_state_dict(state)
            x, y = loader.next_step(rank, world_size)
            assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
            shares.append(x)
        steps.append(torch.cat(shares))
    return steps


def test_every_step_reads_the_same_windows_on_any_number_of_ranks(tmp_path):
    data = write_uneven_shards(tmp_path / "data")  # 34 windows: 4 steps of 8 per epoch, 2 left over
    single = steps_seen(ShardLoader(data, T=16, windows_per_step=8, seed=5), 12)
    for world_size in (2, 4, 8):
        assert all(torch.equal(a, b) for a, b in
                   zip(single, steps_seen(ShardLoader(data, T=16, windows_per_step=8, seed=5), 12, world_size)))
    # each epoch (4 steps, across the shard ends) uses 32 different windows out of 34, and the next epoch
    # reshuffles them
    epochs = [torch.cat(single[e * 4:(e + 1) * 4]) for e in range(3)]
    for windows in epochs:
        assert len({tuple(row.tolist()) for row in windows}) == 32
    assert not torch.equal(epochs[0], epochs[1])


def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path):
    data = write_uneven_shards(tmp_path / "data")
    straight = steps_seen(ShardLoader(data, T=16, windows_per_step=8, seed=3), 9)
    on_four = ShardLoader(data, T=16, windows_per_step=8, seed=3)
    steps_seen(on_four, 3, world_size=4)
    on_one = ShardLoader(data, T=16, windows_per_step=8, seed=3)
    on_one.load_state_dict(on_four.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], steps_seen(on_one, 6)))


def test_epochs_and_seeds_reshuffle(tmp_path):
    data = write_shards(tmp_path / "data", n_train=3, tokens=16 * 12 + 1)  # 36 windows: 9 steps of 4
    a = ShardLoader(data, T=16, windows_per_step=4, seed=1)
    first_epoch, second_epoch = steps_seen(a, 9), steps_seen(a, 9)
    other_seed = steps_seen(ShardLoader(data, T=16, windows_per_step=4, seed=2), 9)
    assert not all(torch.equal(p, q) for p, q in zip(first_epoch, second_epoch))
    assert not all(torch.equal(p, q) for p, q in zip(first_epoch, other_seed))
    # the same set of windows each epoch, in a different order
    as_set = lambda steps: sorted(tuple(r.tolist()) for x in steps for r in x)
    assert as_set(first_epoch) == as_set(second_epoch) == as_set(other_seed)


def test_loader_state_dict_resumes_the_stream(tmp_path):
    data = write_uneven_shards(tmp_path / "data")
    a = ShardLoader(data, T=16, windows_per_step=6, seed=3)
    steps_seen(a, 3)
    b = ShardLoader(data, T=16, windows_per_step=6, seed=3)
    b.load_state_dict(a.state_dict())
    # across shard boundaries and an epoch boundary (5 steps of 6 per epoch)
    assert all(torch.equal(p, q) for p, q in zip(steps_seen(a, 10), steps_seen(b, 10)))


def test_resuming_onto_other_data_or_settings_is_refused(tmp_path):
    data = write_uneven_shards(tmp_path / "data")
    state = ShardLoader(data, T=16, windows_per_step=8, seed=3).state_dict()
    with pytest.raises(ValueError, match="windows_per_step was 8, now 4"):
        ShardLoader(data, T=16, windows_per_step=4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len was 16, now 8"):
        ShardLoader(data, T=8, windows_per_step=16, seed=3).load_state_dict(state)
    shard = os.path.join(data, "edufineweb_train_000001.npy")
    np.save(shard, np.load(shard)[::-1].copy())  # another corpus: the same name, the same number of tokens
    with pytest.raises(ValueError, match="shard edufineweb_train_000001.npy's tokens differ"):
        ShardLoader(data, T=16, windows_per_step=8, seed=3).load_state_dict(state)
    os.remove(os.path.join(data, "edufineweb_train_000002.npy"))
    with pytest.raises(ValueError, match="shard edufineweb_train_000002.npy missing"):
        ShardLoader(data, T=16, windows_per_step=8, seed=3).load_state_dict(state)
    current = ShardLoader(data, T=16, windows_per_step=8, seed=3)
    older = current.state_dict()
    del older["data_order"]["samples"]  # a checkpoint from before "samples": compared on what it records
    current.load_state_dict(older)


def test_a_data_folder_of_two_corpora_is_refused(tmp_path):
    """fineweb.py --prefix other, into the folder of an earlier corpus: a run trained and validated on both."""
    from train_gpt2 import find_shards
    data = write_shards(tmp_path / "data")
    shutil.copy(os.path.join(data, "edufineweb_train_000001.npy"), os.path.join(data, "wiki_train_000001.npy"))
    with pytest.raises(ValueError, match="holds the shards of 2 corpora \\(edufineweb, wiki\\), which a run would mix"):
        find_shards(data, "train")


def test_lr_schedule():
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)
    assert cosine_lr(0, **kw) == pytest.approx(6e-5)  # 1/10 of the way up
    assert cosine_lr(9, **kw) == pytest.approx(6e-4)  # the end of warmup is the peak
    assert cosine_lr(60, **kw) == pytest.approx((6e-4 + 6e-5) / 2)  # half way down the cosine
    assert cosine_lr(110, **kw) == pytest.approx(6e-5)
    assert cosine_lr(500, **kw) == pytest.approx(6e-5)
    lrs = [cosine_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# --- whole runs --------------------------------------------------------------------------------------------


def test_ddp_two_processes_equal_one_process_and_resume_on_one(tmp_path):
    # 34 windows of 16 tokens, 8 per step: step 1 crosses a shard end, step 4 starts the second epoch, and
    # neither the shards nor the epoch divide by B x W = 4
    data = write_uneven_shards(tmp_path / "data")
    rows = write_hellaswag_rows(tmp_path / "hellaswag.jsonl")
    common = TINY + ["--data-dir", data, "--max-steps", "6", "--eval-every", "3", "--save-every", "3",
                     "--hellaswag-every", "3", "--hellaswag-data", rows]
    run(common + ["--out-dir", tmp_path / "one"])  # 1 process x 4 micro-steps of 2
    run(common + ["--out-dir", tmp_path / "two"], nproc=2)  # 2 processes x 2 micro-steps of 2
    one, two = read_log(tmp_path / "one", "train"), read_log(tmp_path / "two", "train")
    assert sorted(one) == sorted(two) == list(range(6))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-6, (step, one[step], two[step])
    assert read_log(tmp_path / "one", "val") == pytest.approx(read_log(tmp_path / "two", "val"), abs=1e-4)
    # HellaSwag: 5 examples split 3 + 2 over the ranks, counts summed: the same accuracy as one process
    assert read_log(tmp_path / "one", "hella") == read_log(tmp_path / "two", "hella")
    assert sorted(read_log(tmp_path / "one", "hella")) == [0, 3, 6]
    assert one[5] < one[0]  # and it learns

    # The 2-process checkpoint holds each rank's own generator state, and resumes in one process with
    # another micro-batch (same total batch): the same data, so the same losses from there on.
    checkpoint = torch.load(tmp_path / "two" / "model_000003.pt", weights_only=True)
    assert len(checkpoint["rng"]) == 2
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "two" / "model_000003.pt", tmp_path / "resumed")
    result = run(common + ["--out-dir", tmp_path / "resumed", "--resume", "auto", "--batch-size", "4"])
    assert "written by 2 process(es), resumed by 1" in result.stdout
    resumed = read_log(tmp_path / "resumed", "train")
    assert sorted(resumed) == [3, 4, 5]
    for step in resumed:
        assert abs(resumed[step] - two[step]) <= 1e-6, (step, resumed[step], two[step])


def test_resume_equals_an_uninterrupted_run_and_rewrites_the_log(tmp_path):
    data = write_shards(tmp_path / "data")
    common = TINY + ["--data-dir", data, "--max-steps", "6", "--eval-every", "2", "--save-every", "3"]
    run(common + ["--out-dir", tmp_path / "straight"])
    run(common + ["--out-dir", tmp_path / "split", "--stop-at", "3"])
    assert os.path.exists(tmp_path / "split" / "model_000003.pt")
    assert max(read_log(tmp_path / "split", "train")) == 2
    run(common + ["--out-dir", tmp_path / "split", "--resume", "auto"])
    straight, split = read_log(tmp_path / "straight", "train"), read_log(tmp_path / "split", "train")
    assert list(straight) == list(split) == list(range(6))
    assert straight == split  # identical to the printed digits
    assert read_log(tmp_path / "straight", "val") == read_log(tmp_path / "split", "val")

    # A run killed after step 5 whose newest checkpoint is step 3: its log already holds steps 3-6. Resuming
    # redoes them; the log then holds each step once, exactly as the uninterrupted run's.
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(tmp_path / "straight" / "log.txt", killed)
    shutil.copy(tmp_path / "straight" / "model_000003.pt", killed)
    run(common + ["--out-dir", killed, "--resume", "auto"])
    for kind in ("train", "val", "lr", "norm"):  # (tok_s and mfu: measured, so they differ from run to run)
        assert read_log(killed, kind) == read_log(tmp_path / "straight", kind)
    assert [line.split()[1] for line in open(killed / "log.txt")].count("train") == 6


def test_refuses_to_overwrite_an_earlier_run(tmp_path):
    data = write_shards(tmp_path / "data")
    args = TINY + ["--data-dir", data, "--max-steps", "1", "--out-dir", str(tmp_path / "out")]
    run(args)
    result = run(args, check=False)
    assert result.returncode != 0
    assert "model_000001.pt" in result.stderr and "--resume auto" in result.stderr


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]  # the plan's
    assert len(lines) == 1, result.stderr  # one line, no traceback
    for needle in needles:
        assert needle in lines[0]


def test_bad_data_is_reported_by_name(tmp_path):
    args = TINY + ["--max-steps", "1", "--out-dir", str(tmp_path / "out")]
    missing = str(tmp_path / "missing")
    assert_one_line_error(run(args + ["--data-dir", missing], check=False), missing, "no such data folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run(args + ["--data-dir", str(empty)], check=False), str(empty), "no 'train' shards")

    data = write_shards(tmp_path / "truncated")
    shard = os.path.join(data, "edufineweb_train_000002.npy")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    assert_one_line_error(run(args + ["--data-dir", data], check=False), shard, "not a readable token shard")

    data = write_shards(tmp_path / "wrong_dtype")
    shard = os.path.join(data, "edufineweb_train_000001.npy")
    np.save(shard, np.arange(2000, dtype=np.int32))
    assert_one_line_error(run(args + ["--data-dir", data], check=False), shard, "uint16")


def test_nan_loss_stops_the_run_with_a_message(tmp_path):
    data = write_shards(tmp_path / "data")
    args = TINY + ["--data-dir", data, "--max-steps", "20", "--out-dir", str(tmp_path / "out"),
                   "--max-lr", "1e9", "--warmup-steps", "1", "--grad-clip", "1e9"]
    result = run(args, check=False)
    assert_one_line_error(result, "loss nan")
    assert not any(name.endswith(".pt") for name in os.listdir(tmp_path / "out"))


def test_a_diverging_run_stops_before_the_update_and_its_checkpoints_stay_good(tmp_path):
    # lr 1e3: the gradient norm overflows to inf while the loss is still finite. That update must not
    # happen: every checkpoint written holds finite weights, and the message names the newest.
    data = write_shards(tmp_path / "data")
    out = tmp_path / "out"
    args = TINY + ["--data-dir", data, "--max-steps", "20", "--out-dir", out, "--warmup-steps", "1",
                   "--save-every", "1", "--eval-every", "0"]
    result = run(args + ["--max-lr", "1e3"], check=False)
    assert_one_line_error(result, "gradient norm inf", "stopping before the update")
    newest = max(name for name in os.listdir(out) if name.endswith(".pt"))
    assert f"last checkpoint: {out / newest}" in result.stderr
    for name in os.listdir(out):
        if name.endswith(".pt"):
            weights = torch.load(out / name, weights_only=True)["model"]
            assert all(torch.isfinite(t).all() for t in weights.values()), name


def test_mfu_is_per_gpu_and_tok_s_is_global(tmp_path, monkeypatch, capsys):
    """Rank 0 of a world of 2 (faked in process), a made-up peak of 1 GFLOP/s per GPU."""
    import train_gpt2
    from model import GPT, GPTConfig
    from training import Distributed
    data = write_shards(tmp_path / "data")
    monkeypatch.setattr(train_gpt2, "setup_distributed", lambda *a: Distributed(False, 0, 0, 2, "cpu"))
    monkeypatch.setattr(train_gpt2, "peak_flops", lambda device: 1e9)
    train_gpt2.main(train_gpt2.parse_args(TINY + ["--data-dir", data, "--out-dir", str(tmp_path / "out"),
                                                  "--max-steps", "2", "--eval-every", "0"]))
    lines = [line for line in capsys.readouterr().out.splitlines() if "| MFU" in line]
    assert len(lines) == 2
    flops_per_token = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32)).flops_per_token(16)
    for line in lines:
        fields = dict(field.strip().split(" ", 1) for field in line.split("|")[1:])
        dt = float(fields["dt"].removesuffix("ms")) / 1000
        assert fields["tok/s"] == f"{128 / dt:,.0f} (all GPUs)" or abs(float(fields["tok/s"].split()[0].replace(",", ""))
                                                                   - 128 / dt) <= 0.01 * 128 / dt
        mfu = float(fields["MFU"].removesuffix("%"))
        assert mfu == pytest.approx(flops_per_token * 128 / 2 / dt / 1e9 * 100, rel=0.01)


def test_the_logits_are_freed_before_backward(tmp_path, monkeypatch):
    """(B, T, vocab) logits are the largest activation (6 GiB at B=64 in bf16); backward does not need them."""
    import weakref
    import train_gpt2
    from model import GPT
    data = write_shards(tmp_path / "data")
    forward, alive_at_backward = GPT.forward, []

    def watched_forward(self, idx, targets=None, **kwargs):
        logits, loss = forward(self, idx, targets, **kwargs)
        if torch.is_grad_enabled():
            ref = weakref.ref(logits)
            loss.register_hook(lambda grad: alive_at_backward.append(ref() is not None))
        return logits, loss

    monkeypatch.setattr(GPT, "forward", watched_forward)
    train_gpt2.main(train_gpt2.parse_args(TINY + ["--data-dir", data, "--out-dir", str(tmp_path / "out"),
                                                  "--max-steps", "1", "--eval-every", "0"]))
    assert alive_at_backward == [False] * 4  # 4 micro-steps, none kept its logits


def test_nodes_that_do_not_share_the_out_dir_stop_with_one_line(tmp_path):
    """Two 'nodes' (two torchrun launchers, one process each) run in different folders with the same relative
    --out-dir: node 0 finds a checkpoint there, node 1 cannot read it. Without a shared disk the job must stop,
    not hang or let node 1 start from step 0."""
    import socket
    import subprocess
    import sys
    from scripts import ROOT
    data = write_shards(tmp_path / "data")
    args = TINY + ["--data-dir", data, "--max-steps", "2", "--out-dir", "log"]
    run(args + ["--out-dir", tmp_path / "node0" / "log"])
    (tmp_path / "node1").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={i}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               os.path.join(ROOT, "train_gpt2.py")] + [str(a) for a in args + ["--resume", "auto",
                                                                                              "--max-steps", "4"]],
                              cwd=tmp_path / f"node{i}", env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [node.communicate(timeout=120) for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    for _, stderr in outputs:
        assert "must be on a filesystem that every node shares" in stderr, stderr[-2000:]
    assert not os.path.exists(tmp_path / "node0" / "log" / "model_000004.pt")


@pytest.mark.parametrize("flags, message", [
    (["--save-every", "0"], "--save-every: must be a whole number > 0, got 0"),
    (["--batch-size", "0"], "--batch-size: must be a whole number > 0, got 0"),
    (["--n-head", "3"], "--n-embd 32 is not divisible by --n-head 3"),
    (["--max-lr", "-1"], "--max-lr: must be a number > 0, got -1"),
    (["--stop-at", "9"], "--stop-at 9 is after --max-steps 2"),
    (["--seed", "-1"], "--seed: must be a whole number >= 0, got -1"),  # numpy's generators refused it mid-run
    (["--seed", str(2**64)], "--seed: must be below 2**63, got 18446744073709551616"),  # torch: "Overflow when ..."
    (["--min-lr-ratio", "nan"], "--min-lr-ratio: must be a number >= 0, got nan"),  # trained at lr nan for hours
    (["--min-lr-ratio", "2"], "--min-lr-ratio 2.0 is above 1"),
    (["--weight-decay", "-0.1"], "--weight-decay: must be a number >= 0, got -0.1"),
])
def test_bad_flags_are_refused_before_anything_runs(flags, message):
    from train_gpt2 import parse_args
    import contextlib
    import io
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(stderr):
        parse_args(TINY + ["--max-steps", "2"] + flags)
    assert exit_info.value.code == 2 and message in stderr.getvalue().splitlines()[-1]


def test_muon_without_its_own_rate_takes_the_adamw_rate():
    """--optimizer muon alone must give Muon (not fall back to AdamW for everything) at --max-lr."""
    import model
    from train_gpt2 import parse_args
    from training import muon_and_adamw
    args = parse_args(TINY + ["--optimizer", "muon", "--max-lr", "2e-3"])
    assert args.muon_lr == 2e-3
    gpt = model.GPT(model.GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    optimizer = muon_and_adamw(gpt, weight_decay=0.1, learning_rate=args.max_lr, muon_lr=args.muon_lr,
                               device_type="cpu")
    assert any(isinstance(o, torch.optim.Muon) for o in optimizer.optimizers)


def test_recipe_fast_is_muon_at_its_measured_rate_and_flags_override_it():
    from train_gpt2 import parse_args
    fast = parse_args(["--recipe", "fast"])
    assert (fast.optimizer, fast.max_lr, fast.muon_lr, fast.min_lr_ratio) == ("muon", 3.6e-3, 3.6e-3, 0.1)
    mixed = parse_args(["--recipe", "fast", "--optimizer", "adamw", "--max-lr", "1e-3"])
    assert (mixed.optimizer, mixed.max_lr, mixed.min_lr_ratio) == ("adamw", 1e-3, 0.1)


def test_what_a_run_cannot_use_is_refused_with_one_line(tmp_path):
    """Token ids that are not GPT-2's, a resume onto changed data: each a one-line error naming the culprit,
    before any step is spent. (A GPU that is not there: test_caption_eval's test of every script's --device.)"""
    data = write_shards(tmp_path / "data")
    args = TINY + ["--data-dir", data, "--max-steps", "2", "--eval-every", "0"]

    bad = write_shards(tmp_path / "bad", n_train=1)
    shard = os.path.join(bad, "edufineweb_train_000001.npy")
    tokens = np.load(shard)
    tokens[::16] = 65535  # in every window of the shard
    np.save(shard, tokens)
    result = run(TINY + ["--data-dir", bad, "--max-steps", "2", "--eval-every", "0", "--out-dir", tmp_path / "ids"],
                 check=False)
    assert_one_line_error(result, shard, "token id 65535 is not a GPT-2 token")

    run(args + ["--out-dir", tmp_path / "out", "--save-every", "1"])
    assert not os.path.exists(tmp_path / "out" / "run.lock")  # released at exit
    os.remove(os.path.join(data, "edufineweb_train_000003.npy"))
    result = run(args + ["--out-dir", tmp_path / "out", "--resume", "auto", "--max-steps", "4"], check=False)
    assert_one_line_error(result, "data order does not match", "shard edufineweb_train_000003.npy missing")


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, nproc):
    """What a cluster does at a job's time limit: SIGTERM mid-run (to torchrun, which forwards it)."""
    import signal
    import subprocess
    import sys
    import time
    from scripts import ROOT
    data = write_shards(tmp_path / "data")
    args = TINY + ["--data-dir", data, "--max-steps", "16", "--eval-every", "0"]
    run(args + ["--out-dir", tmp_path / "straight"], nproc=nproc)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={nproc}"]
    job = subprocess.Popen(launcher + ["train_gpt2.py"] + [str(a) for a in args + ["--out-dir", tmp_path / "cut"]],
                           cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    log = tmp_path / "cut" / "log.txt"
    while not (log.exists() and "2 train" in log.read_text()):
        assert job.poll() is None, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode != 0
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and stopped[0].endswith(".pt; continue with --resume auto"), stderr[-2000:]
    step = int(stopped[0].split()[3])
    assert 2 < step < 16 and os.path.exists(tmp_path / "cut" / f"model_{step:06d}.pt")
    run(args + ["--out-dir", tmp_path / "cut", "--resume", "auto"], nproc=nproc)
    assert read_log(tmp_path / "cut", "train") == read_log(tmp_path / "straight", "train")


def test_the_run_says_its_plan_and_warns_of_likely_mistakes(tmp_path, capsys):
    import train_gpt2
    data = write_shards(tmp_path / "data", tokens=200)  # 3 x 12 windows of 16 tokens = 576 training tokens
    train_gpt2.main(train_gpt2.parse_args(TINY + ["--data-dir", data, "--out-dir", str(tmp_path / "out"),
                                                  "--max-steps", "5", "--warmup-steps", "6", "--eval-every", "0",
                                                  "--save-every", "10"]))
    out, err = capsys.readouterr()
    assert ("128 tokens/step = 2 x 16 x 1 ranks x 4 accumulation steps | 5 steps = 640 tokens = 1.11 epochs of "
            "576 | checkpoints and log.txt in") in out
    assert "recipe gpt2: adamw, peak lr AdamW 0.001, warmup 6 steps, cosine to 0.1 x peak" in out
    assert err.splitlines() == ["warning: --warmup-steps 6 >= --max-steps 5: the whole run is warmup",
                                "warning: --save-every 10 > --max-steps 5: a checkpoint only at the end",
                                "warning: 1.11 epochs: the run sees its training data more than once"]
    assert " | eta " in out.splitlines()[-2]


def test_float16_scales_the_loss_skips_overflowing_steps_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """fp16 for GPUs without bf16, tried on the CPU: the scaler's state is in the checkpoint, and a step whose
    gradients overflow is skipped (the scale halves) rather than stopping the run."""
    import functools
    import train_gpt2
    data = write_shards(tmp_path / "data")
    args = TINY + ["--data-dir", data, "--max-steps", "3", "--eval-every", "0", "--dtype", "float16"]
    run(args + ["--out-dir", tmp_path / "straight"])
    run(args + ["--out-dir", tmp_path / "split", "--stop-at", "2"])
    assert "scaler" in torch.load(tmp_path / "split" / "model_000002.pt", weights_only=True)
    run(args + ["--out-dir", tmp_path / "split", "--resume", "auto"])
    assert read_log(tmp_path / "split", "train") == read_log(tmp_path / "straight", "train")

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 120))
    train_gpt2.main(train_gpt2.parse_args(args + ["--max-steps", "2", "--out-dir", str(tmp_path / "overflow")]))
    steps = [line for line in capsys.readouterr().out.splitlines() if " | loss " in line]
    assert steps[0].endswith(f"fp16 scale {2.0 ** 119:g} (overflow: step skipped)")  # halved, for the next step
    assert len(steps) == 2  # and the run went on


def test_a_checkpoint_without_fp16_resumes_with_fp16(tmp_path):
    """Moving a run from an H100 (bf16) to a V100 (--dtype float16): the checkpoint has no loss scale, and the
    scaler's load raised "The source state dict is empty". The scaler starts afresh instead."""
    import train_gpt2
    data = write_shards(tmp_path / "data")
    args = TINY + ["--data-dir", data, "--max-steps", "3", "--eval-every", "0", "--out-dir", str(tmp_path / "out")]
    train_gpt2.main(train_gpt2.parse_args(args + ["--stop-at", "2"]))  # float32 on the CPU: no loss scale
    assert train_gpt2.main(train_gpt2.parse_args(args + ["--resume", "auto", "--dtype", "float16"])) == 0
    assert sorted(read_log(tmp_path / "out", "train")) == [0, 1, 2]


class FakeWandb:
    """Stands in for the wandb module: records what the run gives it."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], False

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.id = "run-abc"
        return self

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_gets_the_config_once_and_each_step_s_numbers(tmp_path, monkeypatch):
    import sys
    import train_gpt2
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    data = write_shards(tmp_path / "data")
    args = TINY + ["--data-dir", data, "--max-steps", "3", "--eval-every", "2", "--wandb-project", "gpt2-tests",
                   "--wandb-run", "tiny"]
    train_gpt2.main(train_gpt2.parse_args(args + ["--out-dir", str(tmp_path / "out"), "--stop-at", "2"]))
    assert len(wandb.inits) == 1 and wandb.inits[0]["project"] == "gpt2-tests" and wandb.inits[0]["name"] == "tiny"
    assert wandb.inits[0]["config"]["max_lr"] == 1e-3 and wandb.finished
    train_steps = [(step, values) for step, values in wandb.logged if "train_loss" in values]
    assert [step for step, _ in train_steps] == [0, 1]
    assert set(train_steps[0][1]) == {"train_loss", "lr", "grad_norm", "tokens_per_sec", "mfu"}
    assert train_steps[0][1]["train_loss"] == pytest.approx(read_log(tmp_path / "out", "train")[0], abs=1e-6)
    assert [step for step, values in wandb.logged if "val_loss" in values] == [0]
    # resuming continues the same wandb run
    train_gpt2.main(train_gpt2.parse_args(args + ["--out-dir", str(tmp_path / "out"), "--resume", "auto"]))
    assert wandb.inits[1]["id"] == "run-abc" and wandb.inits[1]["resume"] == "allow"

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ValueError, match="--wandb-project: wandb is not installed"):
        train_gpt2.main(train_gpt2.parse_args(args + ["--out-dir", str(tmp_path / "other")]))


def test_wandb_offline_run_is_written(tmp_path):
    """The real wandb, offline (WANDB_MODE=offline): the run starts, logs and finishes with the training run."""
    data = write_shards(tmp_path / "data")
    result = run_script("train_gpt2.py", *TINY, "--data-dir", data, "--max-steps", "2", "--out-dir", tmp_path / "out",
                        "--wandb-project", "gpt2-tests", env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                                                              "WANDB_SILENT": "true"})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), result.stderr[-2000:]
    run_id = torch.load(tmp_path / "out" / "model_000002.pt", weights_only=True)["wandb_id"]
    assert runs[0].name.endswith(run_id)


def test_muon_ddp_equals_one_process_and_resumes_exactly(tmp_path):
    """--optimizer muon: Muon for the blocks' matrices, AdamW for the rest; both optimizers' states travel in
    the checkpoint, and 2 processes train as 1 does."""
    data = write_uneven_shards(tmp_path / "data")
    common = TINY + ["--data-dir", data, "--max-steps", "5", "--eval-every", "0", "--save-every", "3",
                     "--optimizer", "muon", "--muon-lr", "2e-3"]
    run(common + ["--out-dir", tmp_path / "one"])
    run(common + ["--out-dir", tmp_path / "two"], nproc=2)
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "one" / "model_000003.pt", tmp_path / "resumed")
    run(common + ["--out-dir", tmp_path / "resumed", "--resume", "auto"])
    one, two = read_log(tmp_path / "one", "train"), read_log(tmp_path / "two", "train")
    resumed = read_log(tmp_path / "resumed", "train")
    assert sorted(one) == sorted(two) == list(range(5)) and sorted(resumed) == [3, 4]
    # Muon orthogonalises its update in bfloat16 (torch's Newton-Schulz): gradients summed in another order
    # (2 ranks vs 1) can round differently there, so the runs agree to 1e-5 rather than AdamW's 1e-6
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])
    assert resumed == {step: one[step] for step in (3, 4)}  # a resumed run: exactly the uninterrupted one
    checkpoint = torch.load(tmp_path / "two" / "model_000005.pt", weights_only=True)
    adamw, muon = checkpoint["optimizer"]["optimizers"]
    assert len(muon["state"]) == 2 * 4  # c_attn, c_proj, c_fc, mlp c_proj in each of 2 blocks
    assert one[4] < one[0]
    # the optimizer cannot change under a resumed run
    result = run(common[:-4] + ["--out-dir", tmp_path / "resumed", "--resume", "auto", "--max-steps", "6"], check=False)
    assert_one_line_error(result, "model_000005.pt: its run had ", "--optimizer muon (now adamw)")


def test_an_out_dir_a_live_run_holds_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import train_gpt2
    from training import OutDirLock
    monkeypatch.setattr(OutDirLock, "HEARTBEAT", 0.05)
    held = tmp_path / "held"
    held.mkdir()
    live = OutDirLock(str(held))  # its thread touches the file, as another host's live run would
    (held / "run.lock").write_text("node-3 4242\n")
    args = TINY + ["--data-dir", write_shards(tmp_path / "data"), "--max-steps", "2", "--out-dir", str(held)]
    with pytest.raises(ValueError, match="another run is using this folder \\(host node-3, pid 4242\\)"):
        train_gpt2.main(train_gpt2.parse_args(args))
    live.release()
    assert "step" not in capsys.readouterr().out and os.listdir(held) == ["run.lock"]


def test_a_resume_refuses_flags_that_change_the_run_and_checkpoints_it_cannot_continue(tmp_path):
    """The model comes from the checkpoint: a changed --n-layer was ignored, then recorded in the new checkpoint's
    args as if used. Settings that define the run are refused by name; a weights-only file, likewise."""
    import train_gpt2
    data = write_shards(tmp_path / "data")
    out = tmp_path / "out"
    args = TINY + ["--data-dir", data, "--max-steps", "3", "--eval-every", "0", "--out-dir", str(out)]
    train_gpt2.main(train_gpt2.parse_args(args + ["--stop-at", "1"]))
    for flags, named in ((["--n-layer", "3"], "--n-layer 2 (now 3)"), (["--weight-decay", "0.2"], "--weight-decay 0.1"),
                         (["--optimizer", "muon"], "--optimizer adamw (now muon)"), (["--seed", "7"], "--seed 1337")):
        with pytest.raises(ValueError, match=re.escape(f"model_000001.pt: its run had {named}")):
            train_gpt2.main(train_gpt2.parse_args(args + flags + ["--resume", "auto"]))
    checkpoint = torch.load(out / "model_000001.pt", weights_only=True)
    torch.save({k: checkpoint[k] for k in ("kind", "model", "config", "step")}, out / "model_000001.pt")
    with pytest.raises(ValueError, match="cannot be resumed, it holds no optimizer, loader, rng, args"):
        train_gpt2.main(train_gpt2.parse_args(args + ["--resume", "auto"]))


def test_a_run_records_its_settings_and_another_starts_from_them(tmp_path, monkeypatch, capsys):
    """run.json holds every setting as resolved (the recipe's too), the commit, torch and the devices; --config
    starts a new run from it, flags given then winning, and never resumes the old run by itself."""
    import json
    import train_gpt2
    out = tmp_path / "out"
    args = TINY + ["--data-dir", write_shards(tmp_path / "data"), "--max-steps", "2", "--eval-every", "0",
                   "--out-dir", str(out), "--resume", "auto"]
    train_gpt2.main(train_gpt2.parse_args(args + ["--recipe", "fast", "--stop-at", "1"]))
    record = json.loads((out / "run.json").read_text())
    with pytest.raises(ValueError, match="--n-layer 2 \\(now 3\\)"):  # a refused start leaves the record alone
        train_gpt2.main(train_gpt2.parse_args(args + ["--recipe", "fast", "--n-layer", "3"]))
    assert json.loads((out / "run.json").read_text()) == record
    assert record["args"]["optimizer"] == "muon" and record["args"]["min_lr_ratio"] == 0.1  # the recipe, resolved
    assert record["args"]["n_layer"] == 2 and record["world_size"] == 1 and record["devices"] == {"cpu": 1}
    assert record["torch"] == torch.__version__ and (record["git"] is None or len(record["git"].split("+")[0]) == 40)
    again = train_gpt2.parse_args(["--config", str(out / "run.json"), "--max-lr", "2e-3"])
    assert (again.optimizer, again.n_layer, again.stop_at, again.max_lr, again.resume) == ("muon", 2, 1, 2e-3, None)
    (tmp_path / "other.json").write_text(json.dumps({"args": {"features_dir": "coco_features", "n_layer": 2}}))
    (tmp_path / "broken.json").write_text("{")
    for config, message in (("other.json", "written by another script? features_dir: not settings of this one"),
                            ("broken.json", "not a run.json (JSONDecodeError")):
        with pytest.raises(SystemExit):
            train_gpt2.parse_args(["--config", str(tmp_path / config)])
        assert message in capsys.readouterr().err
