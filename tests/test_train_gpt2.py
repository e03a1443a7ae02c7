"""train_gpt2.py: the loader's promises, the schedule, DDP = one process, resume = no interruption, and
clear errors on bad input. Tiny models on synthetic shards, on the CPU."""
import os

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


def windows_seen(loader, n_batches):
    """Which T-token windows (shard path, start) the loader hands out, batch by batch."""
    seen = []
    for _ in range(n_batches):
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
        path = loader.paths[loader.shard_order[loader.shard]]
        tokens = np.load(path)
        for row in x:
            start = find_row(tokens, row.numpy())
            seen.append((path, start))
    return seen


def find_row(tokens, row):
    T = len(row)
    for start in range(0, len(tokens) - T, T):
        if np.array_equal(tokens[start:start + T], row):
            return start
    raise AssertionError("row is not a window of the current shard")


def test_ranks_read_disjoint_windows_and_an_epoch_covers_every_window(tmp_path):
    data = write_shards(tmp_path / "data", n_train=3, tokens=16 * 12 + 1)  # exactly 12 windows of T=16 per shard
    loaders = [ShardLoader(data, B=2, T=16, rank=r, world_size=2, seed=5) for r in range(2)]
    per_epoch = 3 * 12 // (2 * 2)  # batches per rank per epoch
    seen = [windows_seen(loader, per_epoch) for loader in loaders]
    assert not set(seen[0]) & set(seen[1])
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything)) == 36  # every window of the epoch exactly once
    # one process reading twice as much sees the very same windows as the two ranks together
    single = ShardLoader(data, B=2, T=16, rank=0, world_size=1, seed=5)
    assert set(windows_seen(single, 2 * per_epoch)) == set(everything)


def test_epochs_and_seeds_reshuffle(tmp_path):
    data = write_shards(tmp_path / "data", n_train=3, tokens=16 * 12 + 1)
    a = ShardLoader(data, B=2, T=16, seed=1)
    first_epoch = [a.next_batch()[0] for _ in range(18)]
    second_epoch = [a.next_batch()[0] for _ in range(18)]
    b = ShardLoader(data, B=2, T=16, seed=2)
    other_seed = [b.next_batch()[0] for _ in range(18)]
    assert not all(torch.equal(p, q) for p, q in zip(first_epoch, second_epoch))
    assert not all(torch.equal(p, q) for p, q in zip(first_epoch, other_seed))
    # the same set of windows each epoch, in a different order
    as_set = lambda batches: sorted(tuple(r.tolist()) for x in batches for r in x)
    assert as_set(first_epoch) == as_set(second_epoch) == as_set(other_seed)


def test_loader_state_dict_resumes_the_stream(tmp_path):
    data = write_shards(tmp_path / "data", n_train=2, tokens=16 * 12 + 1)
    a = ShardLoader(data, B=2, T=16, seed=3)
    for _ in range(7):
        a.next_batch()
    b = ShardLoader(data, B=2, T=16, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(20):  # across a shard boundary and an epoch boundary
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


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


def test_ddp_two_processes_equal_one_process(tmp_path):
    data = write_shards(tmp_path / "data")
    rows = write_hellaswag_rows(tmp_path / "hellaswag.jsonl")
    common = TINY + ["--data-dir", data, "--max-steps", "4", "--eval-every", "2",
                     "--hellaswag-every", "2", "--hellaswag-data", rows]
    run(common + ["--out-dir", str(tmp_path / "one")])
    run(common + ["--out-dir", str(tmp_path / "two")], nproc=2)
    one, two = read_log(tmp_path / "one", "train"), read_log(tmp_path / "two", "train")
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])
    assert read_log(tmp_path / "one", "val") == pytest.approx(read_log(tmp_path / "two", "val"), abs=1e-4)
    # HellaSwag: 5 examples split 3 + 2 over the ranks, counts summed: the same accuracy as one process
    assert read_log(tmp_path / "one", "hella") == read_log(tmp_path / "two", "hella")
    assert sorted(read_log(tmp_path / "one", "hella")) == [0, 2, 4]
    assert one[3] < one[0]  # and it learns


def test_resume_equals_an_uninterrupted_run(tmp_path):
    data = write_shards(tmp_path / "data")
    common = TINY + ["--data-dir", data, "--max-steps", "6", "--eval-every", "2", "--save-every", "100"]
    run(common + ["--out-dir", str(tmp_path / "straight")])
    run(common + ["--out-dir", str(tmp_path / "split"), "--stop-at", "3"])
    assert os.path.exists(tmp_path / "split" / "model_000003.pt")
    assert max(read_log(tmp_path / "split", "train")) == 2
    run(common + ["--out-dir", str(tmp_path / "split"), "--resume", "auto"])
    straight, split = read_log(tmp_path / "straight", "train"), read_log(tmp_path / "split", "train")
    assert list(straight) == list(split) == list(range(6))
    assert straight == split  # identical to the printed digits
    assert read_log(tmp_path / "straight", "val") == read_log(tmp_path / "split", "val")


def test_refuses_to_overwrite_an_earlier_run(tmp_path):
    data = write_shards(tmp_path / "data")
    args = TINY + ["--data-dir", data, "--max-steps", "1", "--out-dir", str(tmp_path / "out")]
    run(args)
    result = run(args, check=False)
    assert result.returncode != 0
    assert "model_000001.pt" in result.stderr and "--resume auto" in result.stderr


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
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
    assert_one_line_error(result, "loss is nan")
    assert not any(name.endswith(".pt") for name in os.listdir(tmp_path / "out"))
