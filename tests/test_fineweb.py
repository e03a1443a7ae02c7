"""
fineweb.py's promises: the shards decode back to <|endoftext|>doc1<|endoftext|>doc2..., every shard but the last
holds exactly --shard-size tokens, --max-tokens is exact, a finished folder is a no-op to re-run, a killed run
resumes without a half-written shard ever wearing a final name, and a user's mistake is one line on stderr; so is
a stop (^C, SIGTERM, a killed worker, a full disk), which leaves no .tmp and never hangs.
Shards of local files are named after them and train_gpt2.py finds them; a re-run keeps the name of the shards
it continues. A hub dataset out of reach is one line saying what to do, at once.
Local files only, and the hub tests never reach it: no network.
"""
import contextlib
import errno
import glob
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import fineweb
from scripts import ROOT, run_script

enc = tiktoken.get_encoding("gpt2")
EOT = "<|endoftext|>"
RESUME = "; the shards written so far are kept, re-run the same command to resume"

# one line each (so they also make a .txt file), long and short, unicode, one longer than a 50-token shard
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé survives: naïve café, 日本語のテキスト, emoji 🚀🔥, and a tab\there.",
    "",
    " ".join(f"word{i}" for i in range(40)) + ".",
    "  leading spaces, trailing ones too   ",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
]
# a web page quoting the separator must not be able to forge a document boundary
DOC_WITH_SEPARATOR_TEXT = "Models end a document with <|endoftext|>, which this page merely mentions."


def expected_tokens(docs):
    """Computed a different way from fineweb.py: encode the whole joined string, letting tiktoken split it at
    the separators (only valid when no document contains the separator text itself)."""
    return enc.encode("".join(EOT + d for d in docs), allowed_special={EOT})


def write_jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({field: doc, "id": i}) + "\n")
    return str(path)


def read_shards(out_dir):
    """The shard paths in stream order (val first), and their tokens."""
    paths = sorted(glob.glob(os.path.join(glob.escape(out_dir), "*.npy")), key=lambda p: p.rsplit("_", 1)[1])
    arrays = [np.load(p) for p in paths]
    for a in arrays:
        assert a.dtype == np.uint16 and a.ndim == 1
    return paths, arrays


def run_main(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["fineweb.py", *args])
    fineweb.main()


# -----------------------------------------------------------------------------
# Round trips


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One real command-line run over a .jsonl, with 50-token shards, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("cli")
    docs = DOCS + [DOC_WITH_SEPARATOR_TEXT]
    out_dir = str(tmp / "shards[2024]")  # a name glob would read as a pattern: the re-run must still find them
    jsonl = write_jsonl(tmp / "docs.jsonl", docs)
    run_script("fineweb.py", "--local-files", jsonl, "--out-dir", out_dir, "--shard-size", 50, "--num-proc", 2)
    return docs, jsonl, out_dir


def test_cli_shards_decode_back_to_the_documents(cli_run):
    docs, _, out_dir = cli_run
    paths, shards = read_shards(out_dir)
    names = [os.path.basename(p) for p in paths]
    assert names[0] == "docs_val_000000.npy"  # named after docs.jsonl
    assert names[1:] == [f"docs_train_{i:06d}.npy" for i in range(1, len(names))]
    tokens = np.concatenate(shards).tolist()
    assert enc.decode(tokens) == "".join(EOT + d for d in docs)
    assert tokens.count(enc.eot_token) == len(docs)  # the separator text inside a document stayed text
    assert tokens[:-len(enc.encode_ordinary(DOC_WITH_SEPARATOR_TEXT)) - 1] == expected_tokens(docs[:-1])


def test_cli_shards_are_full_but_the_last(cli_run):
    _, _, out_dir = cli_run
    _, shards = read_shards(out_dir)
    total = len(expected_tokens(DOCS)) + 1 + len(enc.encode_ordinary(DOC_WITH_SEPARATOR_TEXT))
    assert [len(s) for s in shards] == [50] * (total // 50) + ([total % 50] if total % 50 else [])


def test_second_run_is_a_no_op(cli_run):
    _, jsonl, out_dir = cli_run
    files = sorted(os.listdir(out_dir))
    mtimes = {f: os.stat(os.path.join(out_dir, f)).st_mtime_ns for f in files}
    result = run_script("fineweb.py", "--local-files", jsonl, "--out-dir", out_dir, "--shard-size", 50)
    assert "already complete" in result.stdout
    assert sorted(os.listdir(out_dir)) == files
    assert {f: os.stat(os.path.join(out_dir, f)).st_mtime_ns for f in files} == mtimes


@pytest.mark.parametrize("kind", ["parquet", "txt"])
def test_parquet_and_txt_files(tmp_path, kind):
    path = str(tmp_path / f"docs.{kind}")
    if kind == "parquet":
        pq.write_table(pa.table({"text": DOCS, "score": [1.0] * len(DOCS)}), path)
    else:
        with open(path, "w") as f:
            f.write("".join(d + "\n" for d in DOCS))  # one document per line
    texts = fineweb.local_texts([path], "text")
    fineweb.tokenize_to_shards(texts, str(tmp_path / "out"), shard_size=1000, num_proc=2)
    _, shards = read_shards(str(tmp_path / "out"))
    assert np.concatenate(shards).tolist() == expected_tokens(DOCS)


def test_several_files_are_read_in_order(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    second = write_jsonl(tmp_path / "b.jsonl", DOCS[3:])
    fineweb.tokenize_to_shards(fineweb.local_texts([first, second], "text"), str(tmp_path), num_proc=2)
    _, shards = read_shards(str(tmp_path))
    assert np.concatenate(shards).tolist() == expected_tokens(DOCS)


# -----------------------------------------------------------------------------
# Names: shards of local files are named after them


@pytest.mark.parametrize("files, name", [
    (["docs.jsonl"], "docs"),
    (["My Data-2024.parquet"], "my_data_2024"),
    (["wiki_00.jsonl", "wiki_01.jsonl"], "wiki"),  # the words they share
    (["corpus/a.txt", "corpus/b.txt"], "corpus"),  # nothing shared: their folder
    (["news/data_train.jsonl", "news/data_val.jsonl"], "data"),
    (["Web Text/train.jsonl"], "web_text"),  # train and val are left out, see SPLIT_WORDS
])
def test_local_files_name_their_shards(files, name):
    assert fineweb.name_of_files(files) == name


def test_train_gpt2_reads_the_named_shards(tmp_path):
    import train_gpt2
    paths = [write_jsonl(tmp_path / f"wiki_{i:02d}.jsonl", DOCS) for i in range(2)]
    out_dir = str(tmp_path / "shards")
    run_script("fineweb.py", "--local-files", *paths, "--out-dir", out_dir, "--shard-size", 50, "--num-proc", 1)
    val = [os.path.basename(p) for p in train_gpt2.find_shards(out_dir, "val")]
    train = [os.path.basename(p) for p in train_gpt2.find_shards(out_dir, "train")]
    assert val == ["wiki_val_000000.npy"]
    assert train == [f"wiki_train_{i:06d}.npy" for i in range(1, len(train) + 1)] and len(train) >= 2


def test_split_words_in_a_chosen_name_are_refused(tmp_path, monkeypatch, capsys):
    """my_train_val_000000.npy would match train_gpt2.py's *_train_*.npy: the val shard would be trained on."""
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--local-files", jsonl, "--out-dir", str(tmp_path / "out"), "--prefix", "my_train")
    assert capsys.readouterr().err.splitlines()[-1] == (
        "fineweb.py: error: --prefix my_train: the words 'train' and 'val' would mix up the splits, since "
        "train_gpt2.py finds shards by *_train_*.npy and *_val_*.npy; choose another")
    assert not os.path.exists(tmp_path / "out")


def test_a_rerun_keeps_the_name_of_the_shards_it_continues(tmp_path, monkeypatch, capsys):
    """A folder made under another name (by --prefix, or edufineweb before shards were named after their files)
    is continued under that name, not joined by a second copy of the corpus that train_gpt2.py would read too."""
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS * 2)
    out_dir = str(tmp_path / "out")
    args = ["--local-files", jsonl, "--out-dir", out_dir, "--shard-size", "50", "--num-proc", "1"]
    run_main(monkeypatch, *args, "--prefix", "mycorpus")
    files = sorted(os.listdir(out_dir))

    run_main(monkeypatch, *args)  # no --prefix: docs.jsonl would say "docs"
    assert "already complete" in capsys.readouterr().out
    assert sorted(os.listdir(out_dir)) == files

    os.remove(os.path.join(out_dir, "mycorpus_train_000002.npy"))  # killed while writing shard 2
    meta_file = os.path.join(out_dir, "mycorpus_meta.json")
    with open(meta_file) as f:
        settings = json.load(f)["settings"]
    with open(meta_file, "w") as f:
        json.dump({"settings": settings, "complete": False}, f)
    run_main(monkeypatch, *args)
    assert "resuming" in capsys.readouterr().out
    assert sorted(os.listdir(out_dir)) == files


# -----------------------------------------------------------------------------
# Shard boundaries and --max-tokens


@pytest.mark.parametrize("max_tokens", [1, 49, 50, 123, 150, 10**6])
def test_max_tokens_is_exact(tmp_path, max_tokens):
    docs = DOCS * 3  # ~270 tokens
    stream = expected_tokens(docs)
    fineweb.tokenize_to_shards(iter(docs), str(tmp_path), shard_size=50, max_tokens=max_tokens, num_proc=2)
    _, shards = read_shards(str(tmp_path))
    n = min(max_tokens, len(stream))
    assert np.concatenate(shards).tolist() == stream[:n]
    assert [len(s) for s in shards] == [50] * (n // 50) + ([n % 50] if n % 50 else [])  # never an empty shard


def test_document_longer_than_several_shards(tmp_path):
    docs = ["one " * 300, "two"]  # 1 + 301 tokens, then 1 + 1: the first straddles 43 shards of 7 tokens
    shards = fineweb.tokenize_to_shards(docs, str(tmp_path), shard_size=7, num_proc=1)
    _, arrays = read_shards(str(tmp_path))
    assert np.concatenate(arrays).tolist() == expected_tokens(docs)
    assert [n for _, n in shards] == [len(a) for a in arrays] == [7] * 43 + [3]


# -----------------------------------------------------------------------------
# Killed runs and resuming


@pytest.mark.parametrize("error, message", [
    (KeyboardInterrupt(), "fineweb.py: stopped" + RESUME),  # the user's ^C, mid-write
    (OSError(errno.ENOSPC, "No space left on device"), "fineweb.py: {shard}: cannot write (No space left on device)"),
], ids=["ctrl-c", "disk full"])
def test_a_write_cut_short_leaves_no_shard_and_one_line(tmp_path, monkeypatch, error, message):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out_dir = tmp_path / "out"

    def dies_halfway(f, tokens):
        f.write(b"\x93NUMPY half a header")
        raise error

    monkeypatch.setattr(np, "save", dies_halfway)
    with pytest.raises(BaseException) as stopped:  # not just SystemExit: a ^C let through would stop pytest itself
        run_main(monkeypatch, "--local-files", jsonl, "--out-dir", str(out_dir), "--num-proc", "1")
    assert stopped.type is SystemExit and stopped.value.code == message.format(shard=out_dir / "docs_val_000000.npy")
    assert sorted(os.listdir(out_dir)) == ["docs_meta.json", "fineweb.lock"]  # no shard, no .tmp; meta: not complete


@contextlib.contextmanager
def deadline(seconds):
    """Fail rather than hang the suite: SIGALRM raises in the test after `seconds`."""
    def times_up(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, times_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


TOKENIZE = fineweb.tokenize


def tokenize_or_die(texts):
    if "KILL THIS WORKER" in texts:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does: no exception, no message
    return TOKENIZE(texts)


def test_a_killed_tokenizer_process_is_one_line_not_a_hang(tmp_path, monkeypatch):
    """multiprocessing.Pool.imap waited forever for the documents a killed worker had taken."""
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS * 40 + ["KILL THIS WORKER"])  # the other one lives on
    monkeypatch.setattr(fineweb, "tokenize", tokenize_or_die)  # the workers are forked with it
    with deadline(10), pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--local-files", jsonl, "--out-dir", str(tmp_path / "out"), "--num-proc", "2")
    assert exit_info.value.code == "fineweb.py: a tokenizer process died (out of memory?)" + RESUME


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "SIGTERM"])
def test_a_stopped_run_is_one_line_without_tracebacks(tmp_path, stop):
    """^C reaches every process of the terminal's group, as a scheduler's SIGTERM often does: each worker printed a
    traceback (or the run hung). Now one line, no .tmp left, and the meta says "not complete": a re-run resumes."""
    text = tmp_path / "docs.txt"
    text.write_text(((DOCS[-1] + " ") * 4 + "\n") * 50_000)  # 2.8M tokens: still running when stopped
    out_dir = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "fineweb.py", "--local-files", text, "--out-dir", out_dir,
                            "--shard-size", "10000", "--num-proc", "2"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "USE_TORCH": "0"},  # datasets would import torch (2 s) for nothing
                           start_new_session=True)  # a process group of its own, as a terminal gives it
    while not glob.glob(str(out_dir / "*_val_*.npy")) and run.poll() is None:
        time.sleep(0.02)
    os.killpg(run.pid, stop)
    try:
        stderr = run.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:  # hung (the old Pool did, on ^C): end it and its workers, then fail
        os.killpg(run.pid, signal.SIGKILL)
        raise
    assert run.returncode != 0 and "Traceback" not in stderr
    assert stderr.splitlines()[-1] == "fineweb.py: stopped" + RESUME
    assert not glob.glob(str(out_dir / "*.tmp"))
    with open(out_dir / "docs_meta.json") as f:
        assert json.load(f)["complete"] is False


def test_killed_run_resumes_and_rewrites_only_missing_shards(tmp_path, monkeypatch, capsys):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS * 2)
    out_dir = str(tmp_path / "out")
    args = ["--local-files", jsonl, "--out-dir", out_dir, "--shard-size", "50", "--num-proc", "2"]
    run_main(monkeypatch, *args)
    paths, original = read_shards(out_dir)
    assert len(paths) >= 3

    # make it look killed while writing shard 2: its final file missing, a half-written .tmp, meta not complete
    os.remove(paths[2])
    with open(paths[2] + ".tmp", "wb") as f:
        f.write(b"half a shard")
    meta_file = os.path.join(out_dir, "docs_meta.json")  # the name taken from docs.jsonl, the same on the re-run
    with open(meta_file) as f:
        meta = json.load(f)
    with open(meta_file, "w") as f:
        json.dump({"settings": meta["settings"], "complete": False}, f)
    kept = {p: os.stat(p).st_mtime_ns for p in paths if p != paths[2]}

    run_main(monkeypatch, *args)
    assert "resuming" in capsys.readouterr().out
    new_paths, resumed = read_shards(out_dir)
    assert new_paths == paths
    assert all(np.array_equal(a, b) for a, b in zip(original, resumed))
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept  # complete shards were not written again
    assert not glob.glob(os.path.join(out_dir, "*.tmp"))
    with open(meta_file) as f:
        assert json.load(f)["complete"]


def test_other_settings_in_the_same_folder_are_refused(tmp_path, monkeypatch):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out_dir = str(tmp_path / "out")
    run_main(monkeypatch, "--local-files", jsonl, "--out-dir", out_dir, "--shard-size", "50", "--num-proc", "1")
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--local-files", jsonl, "--out-dir", out_dir, "--shard-size", "60")
    assert "shard_size" in str(exit_info.value.code)


# a run into the folder, as far as the lock goes: it holds fineweb.lock until told to end
HOLDER = """import fcntl, os, sys
lock_file = open(os.path.join(sys.argv[1], "fineweb.lock"), "a")
fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
sys.stdin.read()"""


@pytest.mark.parametrize("settings", [["--shard-size", "60"], ["--shard-size", "50"]], ids=["other", "same"])
def test_a_folder_another_run_is_writing_is_refused_until_it_ends(tmp_path, monkeypatch, settings):
    """Two runs into one folder mixed their shards (two sizes, duplicated tokens) under a meta.json saying complete.
    The other run is a process: a lockf lock does not exclude the process holding it, which is the point of it."""
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with subprocess.Popen([sys.executable, "-c", HOLDER, out_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as holder:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(SystemExit) as exit_info:
            run_main(monkeypatch, "--local-files", jsonl, "--out-dir", str(out_dir), *settings, "--num-proc", "1")
        assert exit_info.value.code == (f"fineweb.py: {out_dir}: another fineweb.py is writing it; wait or choose "
                                        "another --out-dir")
        assert os.listdir(out_dir) == ["fineweb.lock"]  # nothing written: no meta, no shard
    run_main(monkeypatch, "--local-files", jsonl, "--out-dir", str(out_dir), *settings, "--num-proc", "1")
    assert np.concatenate(read_shards(str(out_dir))[1]).tolist() == expected_tokens(DOCS)  # once it has ended


def test_a_folder_that_cannot_be_locked_is_one_line(tmp_path, monkeypatch):
    """NFS mounted without its lock service: lockf fails with ENOLCK."""
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fineweb.fcntl, "lockf", no_locks)
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--local-files", write_jsonl(tmp_path / "docs.jsonl", DOCS), "--out-dir", str(tmp_path))
    assert exit_info.value.code == f"fineweb.py: {tmp_path}: cannot write or lock (No locks available)"


# -----------------------------------------------------------------------------
# A user's mistakes: one line naming the file, no traceback


def test_missing_file_is_one_line(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    result = run_script("fineweb.py", "--local-files", missing, "--out-dir", tmp_path / "out", check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == f"fineweb.py: {missing}: no such file"
    assert not os.path.exists(tmp_path / "out")


def test_unknown_extension_and_missing_field(tmp_path, monkeypatch):
    csv = tmp_path / "docs.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--local-files", str(csv))
    assert exit_info.value.code == (f"fineweb.py: {csv}: unknown extension "
                                    "(expected one of .jsonl, .json, .parquet, .txt)")

    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS, field="content")
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--local-files", jsonl, "--out-dir", str(tmp_path / "out"), "--num-proc", "1")
    message = str(exit_info.value.code)
    assert message.startswith(f"fineweb.py: {jsonl}: row 0 has no text field 'text'") and "\n" not in message


def test_empty_files_are_refused_by_name(tmp_path, monkeypatch):
    for name in ("empty.jsonl", "empty.txt"):  # once a bare StopIteration, and a "successful" run of 0 shards
        path = tmp_path / name
        path.write_text("")
        with pytest.raises(SystemExit) as exit_info:
            run_main(monkeypatch, "--local-files", str(path), "--out-dir", str(tmp_path / "out"), "--num-proc", "1")
        assert exit_info.value.code == f"fineweb.py: {path}: empty file, no documents in it"
    assert not os.path.exists(tmp_path / "out")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")  # not empty, but no rows either
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--local-files", str(blank), "--out-dir", str(tmp_path / "out"), "--num-proc", "1")
    assert exit_info.value.code == f"fineweb.py: {blank}: no documents in it"


@pytest.mark.parametrize("value, problem", [(["a", "list"], "is a list, not a string"),
                                            (7, "is an int, not a string"),
                                            (None, "is null (or missing in this row)")])
def test_a_text_field_that_is_not_text_says_what_it_is(tmp_path, value, problem):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in ["one", "two", "three", value]))
    with pytest.raises(fineweb.InputError) as error:
        list(fineweb.local_texts([str(path)], "text"))
    assert str(error.value) == f"{path}: row 3's field 'text' {problem}"


def test_a_folder_is_not_called_missing(tmp_path, monkeypatch):
    folder = tmp_path / "corpus.jsonl"
    folder.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--local-files", str(folder), "--out-dir", str(tmp_path / "out"))
    assert exit_info.value.code == f"fineweb.py: {folder}: is a folder, not a file (pass the files in it)"


NOT_A_PREFIX = ": use 1 to 100 of A-Z a-z 0-9 _ . - (not . or - first), it names files"


@pytest.mark.parametrize("flag, value, message", [
    ("--shard-size", "0", "--shard-size must be at least 1, got 0"),
    ("--shard-size", str(10**15),  # numpy's MemoryError once, or the OOM killer as the shard filled
     "--shard-size 1,000,000,000,000,000: 2,000,000 GB, over half this machine's memory"),
    ("--max-tokens", "-5", "--max-tokens must be at least 1, got -5"),
    ("--num-proc", "0", "--num-proc must be at least 1, got 0"),
    ("--out-dir", "a_file", "--out-dir a_file: is a file, not a folder"),
    ("--prefix", "../up", "--prefix '../up'" + NOT_A_PREFIX),  # shards written outside --out-dir
    ("--prefix", "", "--prefix ''" + NOT_A_PREFIX),
    ("--prefix", "web[1]", "--prefix 'web[1]'" + NOT_A_PREFIX),  # a glob pattern: a re-run would not find them
    ("--prefix", ".hidden", "--prefix '.hidden'" + NOT_A_PREFIX),  # train_gpt2.py's glob skips hidden files
])
def test_bad_flag_values_name_the_flag(tmp_path, monkeypatch, capsys, flag, value, message):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--local-files", jsonl, flag, value)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"fineweb.py: error: {message}"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "docs.jsonl"]  # nothing written


def test_help_needs_no_bpe_files_and_a_run_without_them_is_one_line(tmp_path, monkeypatch, capsys, tiktoken_offline):
    out_dir = str(tmp_path / "out")
    importlib.reload(fineweb)  # the import `python fineweb.py --help` does: it once loaded the BPE files, and stopped
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--help")
    assert exit_info.value.code == 0 and "--local-files" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--local-files", write_jsonl(tmp_path / "docs.jsonl", DOCS), "--out-dir", out_dir)
    assert exit_info.value.code == ("fineweb.py: cannot load GPT-2's BPE files (ConnectionError); offline? copy them "
                                    "to a folder and set TIKTOKEN_CACHE_DIR to it")
    assert not os.path.exists(out_dir)


def test_corrected_files_are_not_refused_after_a_run_that_wrote_no_shard(tmp_path, monkeypatch):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": ["not", "text"]}) + "\n")
    out_dir = str(tmp_path / "out")
    args = ["--local-files", str(path), "--out-dir", out_dir, "--num-proc", "1"]
    with pytest.raises(SystemExit):
        run_main(monkeypatch, *args)  # stops at row 0, leaving an unfinished meta.json and no shard
    write_jsonl(path, DOCS)  # the user fixes the file (a different size: other settings)
    run_main(monkeypatch, *args)
    _, shards = read_shards(out_dir)
    assert np.concatenate(shards).tolist() == expected_tokens(DOCS)


@pytest.mark.parametrize("damage", ['{"settings": {"sour', '["not", "a", "meta"]'])
def test_a_damaged_meta_file_is_named_and_the_shards_are_kept(tmp_path, monkeypatch, damage):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out_dir = str(tmp_path / "out")
    run_main(monkeypatch, "--local-files", jsonl, "--out-dir", out_dir, "--num-proc", "1")
    meta_file = os.path.join(out_dir, "docs_meta.json")
    with open(meta_file, "w") as f:
        f.write(damage)
    _, before = read_shards(out_dir)
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--local-files", jsonl, "--out-dir", out_dir, "--num-proc", "1")
    message = str(exit_info.value.code)
    assert message.startswith(f"fineweb.py: {meta_file}: damaged (") and "\n" not in message
    assert message.endswith("delete it and the shards beside it, or choose another --out-dir")
    _, after = read_shards(out_dir)
    assert all(np.array_equal(a, b) for a, b in zip(before, after)) and len(before) == len(after)
    with open(meta_file) as f:
        assert f.read() == damage


# -----------------------------------------------------------------------------
# The hub out of reach: one line saying what to do, without waiting out datasets' retries

WHAT_TO_DO = ("; use --local-files with your own text, or fill the Hugging Face cache on a connected machine "
              "(python fineweb.py --download), copy it here and set HF_HUB_OFFLINE=1")


def test_offline_without_the_dataset_in_the_cache(tmp_path):
    empty = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    result = run_script("fineweb.py", "--out-dir", tmp_path / "out", check=False, timeout=120, env=empty)
    assert result.returncode != 0
    assert result.stderr.strip() == ("fineweb.py: HuggingFaceFW/fineweb-edu (sample-10BT): HF_HUB_OFFLINE=1 and it "
                                     "is not in the Hugging Face cache" + WHAT_TO_DO)
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture
def online(monkeypatch):
    """fineweb.py as if HF_HUB_OFFLINE were unset and no proxy set, but with load_dataset replaced: nothing here
    may reach the network. Returns a function to choose what load_dataset does."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)

    def load_dataset_does(what):
        def fake_load_dataset(*args, **kwargs):
            raise what
        monkeypatch.setattr(fineweb, "load_dataset", fake_load_dataset)
    return load_dataset_does


def test_no_network_is_said_at_once(tmp_path, monkeypatch, online):
    def no_dns(host, port, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    online(AssertionError("load_dataset was called: it would retry for ~25 s"))
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--out-dir", str(tmp_path / "out"), "--dataset", "someone/corpus", "--name", "small")
    assert exit_info.value.code == ("fineweb.py: someone/corpus (small): cannot reach the Hugging Face hub "
                                    "(huggingface.co: Name or service not known)" + WHAT_TO_DO)


@pytest.mark.parametrize("error, message", [
    (ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)"),
     "fineweb.py: someone/corpus (small): cannot reach the Hugging Face hub" + WHAT_TO_DO),
    (ValueError("BuilderConfig 'small' not found.\nAvailable: ['default']"),  # not the network's fault
     "fineweb.py: someone/corpus (small, train): cannot open (BuilderConfig 'small' not found.)"),
])
def test_the_hub_failing_after_its_retries(tmp_path, monkeypatch, online, error, message):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])  # the name resolves (or a proxy does it)
    online(error)
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--out-dir", str(tmp_path / "out"), "--dataset", "someone/corpus", "--name", "small")
    assert exit_info.value.code == message


def test_a_byte_order_mark_is_not_part_of_the_first_document(tmp_path):
    """A text file saved with a BOM (Windows editors) gave its first document a U+FEFF, tokenized as junk."""
    path = tmp_path / "notes.txt"
    path.write_text("\ufefffirst line\nsecond line\n", encoding="utf-8")
    assert list(fineweb.local_texts([str(path)], "text")) == ["first line", "second line"]
