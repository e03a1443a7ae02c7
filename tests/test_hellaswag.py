"""hellaswag.py: rendering matches the tokenizer, scoring picks the lowest total and the lowest mean loss,
ranks split the examples without overlap, the download is atomic and made once per node, and the CLI
reports bad input in one line and uses the GPU it is given.
Handmade examples in the real schema, tiny models, the CPU, no network."""
import dataclasses
import io
import json
import math
import os
import re

import pytest
import tiktoken
import torch
import torch.nn as nn

import hellaswag
from hellaswag import (crop_to_block_size, evaluate, load_examples, pad_and_stack, render_example, score_example,
                       score_examples)
from checkpoint import load_model
from model import GPT, GPTConfig
from scripts import run_script


# written for these tests in the schema of hellaswag_val.jsonl (not taken from the data set)
CONTEXTS = [
    ("Making tea", "A woman fills a kettle with water.", "she"),
    ("Skiing", "A man stands at the top of a snowy slope.", "he"),
    ("Painting a fence", "A boy dips a brush into a can of white paint.", "he"),
    ("Washing a dog", "A dog sits in a bathtub full of bubbles.", "the owner"),
    ("Playing guitar", "A girl holds a guitar on her lap.", "she"),
    ("Baking bread", "A baker kneads dough on a floured table.", "then the baker"),
]
ENDINGS = [
    ["puts it on the stove and waits for it to boil.", "throws it out of the window.", "eats the kettle.", "sings."],
    ["pushes off and glides down the hill.", "reads a book.", "swims.", "starts cooking a very large pot of soup."],
    ["paints the fence with long strokes.", "drinks the paint.", "flies.", "plants a tree next to the old barn."],
    ["rinses the dog with warm water.", "drives away.", "paints the walls blue.", "is a cat."],
    ["strums a chord and starts to sing.", "eats it.", "laughs.", "throws the guitar into the sea."],
    ["shapes the dough into a loaf and puts it in the oven.", "dances.", "sleeps on the table.", "runs off."],
]


def make_rows():
    rows = []
    for i, ((activity, ctx_a, ctx_b), endings) in enumerate(zip(CONTEXTS, ENDINGS)):
        rows.append(dict(ind=i, activity_label=activity, ctx_a=ctx_a, ctx_b=ctx_b, ctx=f"{ctx_a} {ctx_b}",
                         split="val", split_type="indomain", label=i % 4, endings=endings,
                         source_id=f"test~{i}"))
    return rows


@pytest.fixture
def rows_path(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in make_rows()))
    return str(path)


@pytest.fixture(scope="module")
def enc():
    return tiktoken.get_encoding("gpt2")


def tiny_gpt(block_size=64, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, dropout=dropout))


# --- loading -------------------------------------------------------------------------------------------------


def test_load_examples_keeps_the_schema_and_the_limit(rows_path):
    examples = load_examples(rows_path)
    assert examples == make_rows()
    assert load_examples(rows_path, limit=2) == make_rows()[:2]


@pytest.mark.parametrize("bad_line", ['{"ctx": "A man", "endings": ["a", "b"', '{"ctx": "A man", "label": 0}',
                                      '{"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}',
                                      '{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}'])
def test_a_malformed_line_names_the_file_and_line(tmp_path, bad_line):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(make_rows()[0]) + "\n" + json.dumps(make_rows()[1]) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3:")):
        load_examples(str(path))


def test_a_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_examples(str(tmp_path / "nowhere.jsonl"))


def test_a_folder_is_not_called_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: is a folder, not a HellaSwag .jsonl file")):
        load_examples(str(tmp_path))


@pytest.mark.parametrize("bad_line, problem", [("[1, 2]", "TypeError: a list, not a JSON object"),
                                               ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": true}',
                                                "ValueError: label must be an integer from 0 to 3, got True")])
def test_what_is_wrong_with_a_line_is_said(tmp_path, bad_line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(make_rows()[0]) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError) as error:
        load_examples(str(path))
    assert str(error.value) == f"{path}:2: not a HellaSwag example ({problem})"


# --- rendering -----------------------------------------------------------------------------------------------


def test_render_is_context_then_space_then_ending_with_the_ending_masked(rows_path, enc):
    for example in load_examples(rows_path):
        tokens, mask, label = render_example(example, enc)
        assert label == example["label"]
        assert tokens.dtype == mask.dtype == torch.long and tokens.shape == mask.shape
        assert tokens.shape[0] == 4
        n_ctx = len(enc.encode(example["ctx"]))
        lengths = [n_ctx + len(enc.encode(" " + ending)) for ending in example["endings"]]
        assert tokens.shape[1] == max(lengths)  # padded to the longest row, no further
        for row, row_mask, ending, length in zip(tokens.tolist(), mask.tolist(), example["endings"], lengths):
            assert enc.decode(row[:length]) == example["ctx"] + " " + ending
            assert row[length:] == [0] * (len(row) - length)  # right padding is zeros
            assert row_mask == [0] * n_ctx + [1] * (length - n_ctx) + [0] * (len(row) - length)
            assert enc.decode([t for t, m in zip(row, row_mask) if m]) == " " + ending


def test_crop_keeps_the_endings_and_drops_the_start_of_the_context(rows_path, enc):
    tokens, mask, _ = render_example(load_examples(rows_path)[5], enc)
    cropped_tokens, cropped_mask = crop_to_block_size(tokens, mask, 16)
    assert tokens.shape[1] > 16 and cropped_tokens.shape == cropped_mask.shape == (4, 16)
    assert torch.equal(cropped_tokens, tokens[:, -16:]) and torch.equal(cropped_mask, mask[:, -16:])
    assert cropped_mask.sum() == mask.sum()  # every ending token survives
    assert torch.equal(crop_to_block_size(tokens, mask, 1024)[0], tokens)  # short rows are untouched


# --- scoring -------------------------------------------------------------------------------------------------

V = 10  # a small vocabulary is enough to test the scoring arithmetic


def logits_with_loss(target, loss):
    """A row of V logits whose cross-entropy for `target` is exactly `loss`: the target's logit is 0 and the
    other V-1 are x, so loss = log(1 + (V-1) e^x)."""
    x = math.log((math.exp(loss) - 1) / (V - 1))
    row = torch.full((V,), x, dtype=torch.float64)
    row[target] = 0.0
    return row


def test_score_picks_lowest_total_for_acc_and_lowest_mean_for_acc_norm():
    # 2 context tokens, then endings of 1, 4, 2 and 3 tokens with these per-token losses:
    #   ending 0: [2.0]                 total 2.0  mean 2.0   <- lowest total: acc picks it
    #   ending 1: [1.0, 1.0, 1.0, 1.0]  total 4.0  mean 1.0   <- lowest mean: acc_norm picks it
    #   ending 2: [1.5, 1.5]            total 3.0  mean 1.5
    #   ending 3: [3.0, 3.0, 3.0]       total 9.0  mean 3.0
    # Context and padding predictions get huge, unequal losses: counting them would change both answers.
    ending_losses = [[2.0], [1.0] * 4, [1.5] * 2, [3.0] * 3]
    L = 2 + 4
    tokens = torch.zeros((4, L), dtype=torch.long)
    mask = torch.zeros((4, L), dtype=torch.long)
    logits = torch.zeros((4, L, V), dtype=torch.float64)
    for i, losses in enumerate(ending_losses):
        row = [3, 4] + [5 + (i + j) % 4 for j in range(len(losses))]
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, 2:len(row)] = 1
        for t in range(L - 1):  # the logits at t predict the token at t+1
            in_ending = 2 <= t + 1 < len(row)
            loss = losses[t + 1 - 2] if in_ending else 50.0 - 10 * i
            logits[i, t] = logits_with_loss(tokens[i, t + 1].item(), loss)

    # the expected answer, the slow way: log-softmax by hand, one token at a time
    totals, means = [], []
    for i in range(4):
        token_losses = []
        for t in range(1, L):
            if mask[i, t]:
                row = logits[i, t - 1].tolist()
                log_sum_exp = math.log(sum(math.exp(v) for v in row))
                token_losses.append(log_sum_exp - row[tokens[i, t]])
        totals.append(sum(token_losses))
        means.append(sum(token_losses) / len(token_losses))
    expected = (totals.index(min(totals)), means.index(min(means)))
    assert expected == (0, 1)  # the construction above does what it says

    assert score_example(logits, tokens, mask) == expected
    assert score_example(logits.float(), tokens, mask) == expected


# --- evaluate ------------------------------------------------------------------------------------------------


class RecordingModel(nn.Module):
    """A stand-in language model: the logits at each position are a fixed random row chosen by the current
    token, so its choices differ from example to example. It records the first row of every example it sees
    (4 rows each), without the right padding that batching adds."""

    def __init__(self, block_size=1024):
        super().__init__()
        self.config = GPTConfig(block_size=block_size)
        self.table = nn.Parameter(torch.randn(97, 50304, generator=torch.Generator().manual_seed(0)))
        self.seen = []

    def forward(self, idx):
        for row in idx[::4].tolist():
            while row[-1] == 0:  # padding (token 0 is "!", which the test rows never contain)
                row.pop()
            self.seen.append(tuple(row))
        return self.table[idx % 97], None  # (B, T, vocab)


def test_evaluate_counts_what_score_example_says(rows_path, enc):
    examples = load_examples(rows_path)
    model = RecordingModel()
    expected = [0, 0, len(examples)]
    for example in examples:
        tokens, mask, label = render_example(example, enc)
        pred, pred_norm = score_example(model(tokens)[0], tokens, mask)
        expected[0] += pred == label
        expected[1] += pred_norm == label
    assert evaluate(model, examples, "cpu") == tuple(expected)


def test_two_ranks_split_the_examples_and_add_up_to_one_process(rows_path):
    examples = load_examples(rows_path)
    one_process = RecordingModel()
    counts = evaluate(one_process, examples, "cpu")
    ranks = [RecordingModel() for _ in range(2)]
    rank_counts = [evaluate(ranks[rank], examples, "cpu", rank=rank, world_size=2) for rank in range(2)]
    seen_0, seen_1 = set(ranks[0].seen), set(ranks[1].seen)
    assert len(ranks[0].seen) == len(ranks[1].seen) == 3  # 6 examples, 3 each
    assert not seen_0 & seen_1  # disjoint
    assert seen_0 | seen_1 == set(one_process.seen)  # together, every example once
    assert tuple(a + b for a, b in zip(*rank_counts)) == counts
    assert counts[2] == len(examples)


def evaluate_in_a_process_group(rank, init_file, data_dir, url, out_dir):
    """One rank of a 2-process gloo group on one node, as under torchrun: download (local rank 0 only), load,
    evaluate."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    hellaswag.DATA_DIR, hellaswag.VAL_URL = data_dir, url
    examples = load_examples(hellaswag.download_if_missing(local_master=rank == 0))
    counts = evaluate(RecordingModel(), examples, "cpu", rank=rank, world_size=2)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(counts, f)
    torch.distributed.destroy_process_group()


def test_under_torch_distributed_every_rank_gets_the_totals(rows_path, tmp_path):
    torch.multiprocessing.spawn(evaluate_in_a_process_group, nprocs=2, args=(
        str(tmp_path / "init"), str(tmp_path / "cache"), "file://" + rows_path, str(tmp_path)))
    one_process = evaluate(RecordingModel(), load_examples(rows_path), "cpu")
    for rank in range(2):
        assert tuple(json.load(open(tmp_path / f"rank{rank}.json"))) == one_process


def test_scoring_many_examples_per_forward_equals_one_at_a_time(rows_path, enc):
    # a real (tiny) GPT: right padding must not change any real position's logits, a causal model's promise
    examples = load_examples(rows_path)
    model = tiny_gpt()
    rendered = [render_example(example, enc)[:2] for example in examples]
    tokens, mask = pad_and_stack(rendered)
    assert tokens.size(0) == 4 * len(examples) and tokens.size(1) == max(t.size(1) for t, _ in rendered)
    batched_logits = model(tokens)[0]
    for i, (example_tokens, example_mask) in enumerate(rendered):
        rows, length = slice(4 * i, 4 * i + 4), example_tokens.size(1)
        assert torch.equal(tokens[rows, :length], example_tokens) and not tokens[rows, length:].any()
        assert torch.equal(mask[rows, :length], example_mask) and not mask[rows, length:].any()
        assert torch.allclose(batched_logits[rows, :length], model(example_tokens)[0], atol=1e-5)
    # example by example, the batch's answers are those of each example scored alone
    preds, preds_norm = score_examples(batched_logits, tokens, mask)
    assert list(zip(preds, preds_norm)) == [score_example(model(t)[0], t, m) for t, m in rendered]
    for model in (tiny_gpt(), tiny_gpt(block_size=12)):  # the second also crops every row
        one_at_a_time = evaluate(model, examples, "cpu", batch_size=1)
        assert evaluate(model, examples, "cpu", batch_size=4) == one_at_a_time
        assert evaluate(model, examples, "cpu", batch_size=len(examples)) == one_at_a_time


def test_evaluate_crops_rows_longer_than_the_block_and_restores_training_mode(rows_path):
    examples = load_examples(rows_path)
    model = tiny_gpt(block_size=12)  # shorter than every rendered example: GPT.forward would refuse them
    model.train()
    assert evaluate(model, examples, "cpu")[2] == len(examples)
    assert model.training


def test_evaluate_scores_without_dropout_even_from_training_mode(rows_path, enc):
    examples = load_examples(rows_path)
    model = tiny_gpt(dropout=0.5)
    with torch.no_grad():  # dropout 0.5 really changes the logits while it is on
        tokens = render_example(examples[0], enc)[0]
        model.train()
        train_logits = model(tokens)[0]
        model.eval()
        assert not torch.allclose(train_logits, model(tokens)[0])
    expected = evaluate(model, examples, "cpu")
    model.train()  # as train_gpt2.py calls it, mid-training: evaluate must switch dropout off itself
    for _ in range(3):
        assert evaluate(model, examples, "cpu") == expected
    assert model.training


class AutocastProbe(RecordingModel):
    """RecordingModel that also notes the autocast dtype its forward pass ran under (None: no autocast)."""

    def forward(self, idx):
        self.autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        return super().forward(idx)


@pytest.mark.parametrize("autocast_dtype, expected", [(None, None), ("float32", None), ("bfloat16", torch.bfloat16)])
def test_evaluate_runs_the_model_under_the_autocast_it_is_given(rows_path, autocast_dtype, expected):
    probe = AutocastProbe()
    evaluate(probe, load_examples(rows_path), "cpu", autocast_dtype=autocast_dtype)
    assert probe.autocast == expected


def test_evaluate_under_bf16_autocast(rows_path):
    examples = load_examples(rows_path)
    model = tiny_gpt()
    fp32 = evaluate(model, examples, "cpu")
    bf16 = evaluate(model, examples, "cpu", autocast_dtype="bfloat16")
    assert bf16[2] == fp32[2] == len(examples)
    assert evaluate(model, examples, "cpu", autocast_dtype="float32") == fp32


# --- the download --------------------------------------------------------------------------------------------


def test_download_if_missing_fetches_once_and_atomically(rows_path, tmp_path, monkeypatch):
    data_dir = tmp_path / "cache"
    monkeypatch.setattr(hellaswag, "DATA_DIR", str(data_dir))
    monkeypatch.setattr(hellaswag, "VAL_URL", "file://" + rows_path)  # urllib reads file:// URLs: no network
    path = hellaswag.download_if_missing()
    assert open(path).read() == open(rows_path).read()
    assert os.listdir(data_dir) == ["hellaswag_val.jsonl"]  # no .tmp left behind
    monkeypatch.setattr(hellaswag, "VAL_URL", "file://" + str(tmp_path / "gone.jsonl"))
    assert hellaswag.download_if_missing() == path  # present: not fetched again


@pytest.fixture
def barriers(monkeypatch):
    """A DDP run, as far as download_if_missing can tell: torch.distributed is initialised, and each barrier
    is counted in the returned list instead of waiting for other processes."""
    waited = []
    monkeypatch.setattr(hellaswag.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(hellaswag.dist, "barrier", lambda *args, **kwargs: waited.append("barrier"))
    return waited


def test_each_node_downloads_into_its_own_disk(rows_path, tmp_path, monkeypatch, barriers):
    # two nodes without a shared disk: each has its own (empty) data folder, and 2 processes
    monkeypatch.setattr(hellaswag, "VAL_URL", "file://" + rows_path)
    for node in ("node0", "node1"):
        monkeypatch.setattr(hellaswag, "DATA_DIR", str(tmp_path / node))
        path = hellaswag.download_if_missing(local_master=True)  # local rank 0 downloads, then waits
        assert hellaswag.download_if_missing(local_master=False) == path  # local rank 1 only waits
        assert load_examples(path) == make_rows()
    assert barriers == ["barrier"] * 4  # every process waited once
    # a process that is not its node's local rank 0 never downloads, even where the file is missing
    monkeypatch.setattr(hellaswag, "DATA_DIR", str(tmp_path / "node2"))
    assert not os.path.exists(hellaswag.download_if_missing(local_master=False))


@pytest.mark.parametrize("data_dir", ["cache", "a_file/cache"])  # unreachable; a folder that cannot be made
def test_a_failed_download_is_one_line_and_still_reaches_the_barrier(tmp_path, monkeypatch, barriers, data_dir):
    # otherwise the node's other processes would wait at the barrier for a process that has stopped.
    # $HELLASWAG_DIR below a file (or on a read-only mount) was a traceback from os.makedirs
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(hellaswag, "DATA_DIR", str(tmp_path / data_dir))
    monkeypatch.setattr(hellaswag, "VAL_URL", "file://" + str(tmp_path / "gone.jsonl"))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / data_dir}/hellaswag_val.jsonl: missing"):
        hellaswag.download_if_missing(local_master=True)
    assert barriers == ["barrier"]
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # the folder it made is gone: it left an empty hellaswag/


@pytest.mark.parametrize("stop, raised", [(ConnectionResetError("connection reset by peer"), FileNotFoundError),
                                          (KeyboardInterrupt(), KeyboardInterrupt)], ids=["cut off", "Ctrl-C"])
@pytest.mark.parametrize("folder_was_there", [False, True])
def test_a_failed_download_removes_what_it_made_and_only_that(tmp_path, monkeypatch, stop, raised,
                                                            folder_was_there):
    class Stops(Response):
        def read(self, size=-1):
            if self.tell() > 0:
                raise stop
            return super().read(10)
    if folder_was_there:  # a user's empty folder is theirs: it stays
        (tmp_path / "cache").mkdir()
    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", lambda url, timeout: Stops(b"x" * 100))
    with pytest.raises(raised):
        hellaswag.download("https://example.com/hellaswag_val.jsonl", str(tmp_path / "cache" / "hellaswag_val.jsonl"))
    assert os.listdir(tmp_path) == (["cache"] if folder_was_there else [])
    assert not folder_was_there or os.listdir(tmp_path / "cache") == []  # no .tmp either


class Response(io.BytesIO):
    headers = {}


def test_two_nodes_downloading_onto_one_shared_disk_at_once(rows_path, tmp_path, monkeypatch):
    # node-a has read the first bytes when node-b, finding no file yet either, downloads the whole of it
    data = open(rows_path, "rb").read()

    class NodeBDownloadsMidway(Response):
        def read(self, size=-1):
            if self.tell() == 100:
                monkeypatch.setattr(hellaswag.socket, "gethostname", lambda: "node-b")
                assert open(hellaswag.download_if_missing(), "rb").read() == data
            return super().read(100)

    responses = [NodeBDownloadsMidway(data), Response(data)]
    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", lambda url, timeout: responses.pop(0))
    monkeypatch.setattr(hellaswag.socket, "gethostname", lambda: "node-a")
    monkeypatch.setattr(hellaswag, "DATA_DIR", str(tmp_path / "shared"))
    path = hellaswag.download_if_missing()
    assert not responses  # both nodes did download
    assert open(path, "rb").read() == data
    assert os.listdir(tmp_path / "shared") == ["hellaswag_val.jsonl"]  # neither left a .tmp behind


class BrokenResponse(io.BytesIO):
    """A download whose connection drops after the first chunk."""
    headers = {"Content-Length": "1000000"}

    def read(self, size=-1):
        if self.tell() > 0:
            raise ConnectionResetError("connection reset by peer")
        return super().read(size)


def test_a_failed_download_leaves_nothing_and_names_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "hellaswag_val.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):  # unreachable
        hellaswag.download("file://" + str(tmp_path / "gone.jsonl"), path)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", lambda url, timeout: BrokenResponse(b"x" * 100_000))
    with pytest.raises(FileNotFoundError, match=re.escape(path)):  # cut off half way
        hellaswag.download("https://example.com/hellaswag_val.jsonl", path)
    assert os.listdir(tmp_path) == []  # neither the file nor its half-written .tmp


# --- the command line ----------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint_path(tmp_path):
    """A tiny random model saved the way train_gpt2.py saves one. Seed 5 gets different acc and acc_norm on
    the examples above, so a mix-up of the two would show."""
    model = tiny_gpt(seed=5)
    path = str(tmp_path / "model_000000.pt")
    torch.save({"kind": "lm", "model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 0}, path)
    return path


def test_cli_prints_the_accuracies_of_a_checkpoint(checkpoint_path, rows_path):
    result = run_script("hellaswag.py", "--checkpoint", checkpoint_path, "--data", rows_path, "--device", "cpu",
                        "--dtype", "float32")
    match = re.search(r"^acc (\d\.\d{4}) acc_norm (\d\.\d{4}) \(n=6\)$", result.stdout, re.MULTILINE)
    assert match, result.stdout
    model, _ = load_model(checkpoint_path)
    correct, correct_norm, total = evaluate(model, load_examples(rows_path), "cpu")
    assert correct != correct_norm
    assert float(match.group(1)) == pytest.approx(correct / total, abs=1e-4)
    assert float(match.group(2)) == pytest.approx(correct_norm / total, abs=1e-4)


def test_cli_limit(checkpoint_path, rows_path):
    result = run_script("hellaswag.py", "--checkpoint", checkpoint_path, "--data", rows_path, "--device", "cpu",
                        "--limit", 2)
    assert "(n=2)" in result.stdout


@pytest.mark.parametrize("broken", ["data", "checkpoint"])
def test_cli_bad_input_is_one_line_naming_the_file(checkpoint_path, rows_path, tmp_path, broken):
    if broken == "data":
        bad = str(tmp_path / "missing.jsonl")
        args = ["--checkpoint", checkpoint_path, "--data", bad]
    else:
        bad = str(tmp_path / "garbage.pt")
        open(bad, "wb").write(b"not a checkpoint")
        args = ["--checkpoint", bad, "--data", rows_path]
    result = run_script("hellaswag.py", *args, "--device", "cpu", check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hellaswag.py: error:") and bad in lines[0], result.stderr


def test_cli_offline_without_gpt2s_bpe_files_is_one_line_saying_what_to_set(checkpoint_path, rows_path,
                                                                            tiktoken_offline):
    with pytest.raises(ValueError, match="cannot load GPT-2's BPE files .* set TIKTOKEN_CACHE_DIR"):
        hellaswag.main(hellaswag.parse_args(["--checkpoint", checkpoint_path, "--data", rows_path, "--device", "cpu"]))


@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--limit", "-3"), ("--batch-size", "0"),
                                         ("--batch-size", "-1")])
def test_cli_bad_flag_values_name_the_flag(capsys, flag, value):
    # they used to end in "no examples" (blaming the data), a bare "range() arg 3 must not be zero", or a traceback
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.parse_args(["--pretrained", "gpt2", flag, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: argument {flag}: must be a whole number > 0, "
                                                             f"got {value}")


def test_cli_on_a_numbered_gpu_uses_that_gpu_throughout(rows_path, monkeypatch):
    # on the CPU: torch.cuda.set_device, the model's .to and the scoring are replaced by recorders
    calls = []
    model = tiny_gpt()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # --device cuda:N is checked against it
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(hellaswag, "load_model", lambda args: (model, "tiny"))
    monkeypatch.setattr(model, "to", lambda device: calls.append(("to", device)) or model)
    # the dtype is asked of the GPU in use ("cuda:1"), not of "cuda", which is GPU 0
    monkeypatch.setattr(hellaswag, "default_dtype", lambda device: calls.append(("default_dtype", device)) or "bfloat16")

    def evaluate(model, examples, device, autocast_dtype, **kwargs):
        calls.append(("evaluate", device, autocast_dtype))
        return 1, 2, len(examples)

    monkeypatch.setattr(hellaswag, "evaluate", evaluate)
    hellaswag.main(hellaswag.parse_args(["--pretrained", "gpt2", "--data", rows_path, "--device", "cuda:1"]))
    assert calls == [("set_device", "cuda:1"), ("default_dtype", "cuda:1"), ("to", "cuda:1"),
                     ("evaluate", "cuda:1", "bfloat16")]


def test_a_failed_download_leaves_another_node_s_download_into_the_folder_it_made(tmp_path, monkeypatch):
    """Two nodes on a shared disk: this one made the folder, another started its own .tmp there, then this
    one's download fails. Its clean-up removes its own .tmp and not the other's (which rmtree would)."""
    folder = tmp_path / "cache"
    class OtherNodeStartsThenCut(Response):
        def read(self, size=-1):
            (folder / "hellaswag_val.jsonl.node-2.4242.tmp").write_bytes(b"half")
            raise ConnectionResetError("connection reset by peer")
    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", lambda url, timeout: OtherNodeStartsThenCut(b""))
    with pytest.raises(FileNotFoundError):
        hellaswag.download("https://example.com/hellaswag_val.jsonl", str(folder / "hellaswag_val.jsonl"))
    assert os.listdir(folder) == ["hellaswag_val.jsonl.node-2.4242.tmp"]
