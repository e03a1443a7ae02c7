"""
FineWeb-Edu (or your own text) -> GPT-2 token shards, the pretraining data for train_gpt2.py.

    python fineweb.py                                   # the 10B-token sample of FineWeb-Edu, ~100 shards
    python fineweb.py --max-tokens 20_000_000           # a small subset for quick runs
    python fineweb.py --local-files my.jsonl --out-dir data/mine --shard-size 1_000_000

This file owns one step, text -> uint16 token shards. Its core comes first: documents -> tokens -> shards written
whole to disk (tokenize_to_shards); the plumbing follows: local files, the hub, shard names, resuming, the CLI.

Every document is tokenized with GPT-2's BPE and prefixed with <|endoftext|> (token 50256), so the model learns
where one document ends and the next begins. The token stream is cut into shards of --shard-size tokens (100M by
default, build-nanogpt's size: 200 MB files, 100 of them for 10B tokens), each a 1-D uint16 .npy file: GPT-2's
50,257 token ids fit in 16 bits, half the disk and memory of int32, and numpy's header records the dtype and
length, so the training loader can memory-map a shard and check what it got. The first shard is the validation split:

    edu_fineweb10B/edufineweb_val_000000.npy, edufineweb_train_000001.npy, edufineweb_train_000002.npy, ...

Shards of --local-files take the files' name instead (wiki_00.jsonl wiki_01.jsonl -> wiki_val_000000.npy, ...):
a folder says which corpus it holds; --prefix chooses another. train_gpt2.py reads any (*_train_*.npy, *_val_*.npy).

The hub dataset is *streamed*: documents are downloaded as they are tokenized, so shards appear within seconds and
the only disk used is the shards' (~20 GB for 10B tokens). --download instead fetches all of sample-10BT first
(~30 GB of parquet, then an uncompressed Arrow cache, larger still): in parallel, and a re-run reads the cache, but
at several times the disk, and nothing is tokenized until all of it has arrived. Streaming is what most users want,
and the only sane choice with --max-tokens, which would otherwise download 10B tokens to keep 20M of them.

Re-running is safe. A shard is written to a temporary name and renamed once complete, so a file under a final
name is always whole. A <prefix>_meta.json records the settings and, at the end, the shards written: a re-run over
a finished folder prints "already complete" and exits; one over a run that stopped (^C, SIGTERM, a full disk, a
killed worker: each said in one line) tokenizes the (deterministic) stream again and writes only the missing shards.

Offline clusters: copy GPT-2's BPE files (tiktoken fetches them on first use) to a folder, set TIKTOKEN_CACHE_DIR
to it. For the documents, use --local-files, or copy the Hugging Face cache (~/.cache/huggingface) of a --download
run on a connected machine and set HF_HUB_OFFLINE=1: `datasets` reads it without the network (streamed or not).
"""

import argparse
import fcntl
import glob
import json
import os
import re
import signal
import socket
import sys
import urllib.parse
import urllib.request
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from itertools import islice

import numpy as np
import tiktoken
from datasets import load_dataset
from huggingface_hub import constants as hub_constants
from tqdm import tqdm

# -----------------------------------------------------------------------------
# The core: documents -> tokens -> shards on disk


class InputError(Exception):
    """Something the user must fix (their data, the BPE files, a full disk), not a bug: one line, no traceback."""


def gpt2():
    """GPT-2's BPE, which tiktoken loads once per process; not at import, so that --help needs no BPE files."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cached BPE files: an error of the set-up, not a bug
        raise InputError(f"cannot load GPT-2's BPE files ({type(e).__name__}); offline? copy them to a folder and "
                         "set TIKTOKEN_CACHE_DIR to it") from None


def tokenize(texts):
    """Each document's tokens after <|endoftext|> (50256), all in one uint16 array. encode_ordinary treats everything
    as plain text: a web page that happens to contain the string "<|endoftext|>" must not forge a document boundary."""
    enc = gpt2()
    tokens = np.concatenate([[enc.eot_token] + enc.encode_ordinary(text) for text in texts])
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "token id too large for uint16"
    return tokens.astype(np.uint16)


def tokenized_chunks(texts, pool, num_proc):
    """Tokens of 64 documents (~250 KB of text) a task, in order; 4 tasks a process in flight keep them busy and memory
    flat (Executor.map takes all the stream at once), and a killed worker breaks the pool (Pool.imap waited forever)."""
    texts = iter(texts)
    chunks = iter(lambda: list(islice(texts, 64)), [])
    in_flight = [pool.submit(tokenize, chunk) for chunk in islice(chunks, 4 * (num_proc or os.cpu_count()))]
    while in_flight:
        in_flight += [pool.submit(tokenize, chunk) for chunk in islice(chunks, 1)]
        yield in_flight.pop(0).result()


def leave_signals_to_the_main_process():
    """In each worker. ^C reaches every process of the command: the workers ignore it, the main process ends them and
    says so in one line. SIGTERM kills, as the pool expects (fork copied the main process's handler: undone here)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def shard_path(out_dir, prefix, index):
    # the first shard is held out for validation (build-nanogpt's choice): the dataset's rows come in no
    # particular order of topic, so its first shard (100M tokens at the default --shard-size) is as good as any
    split = "val" if index == 0 else "train"
    return os.path.join(out_dir, f"{prefix}_{split}_{index:06d}.npy")


def write_atomically(path, write):
    """write(file) to path.tmp, then rename. os.replace is atomic within a folder, so a reader (or a re-run) sees the
    whole file or none, never half of one; a shard's .tmp does not end in .npy, so the training loader's
    *_train_*.npy never picks it up. A write that fails (a full disk) or is interrupted (^C) leaves no .tmp."""
    tmp_path = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it official
        os.replace(tmp_path, path)
    except OSError as e:  # no space left, a read-only folder: the user's to fix
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def tokenize_to_shards(texts, out_dir, shard_size=10**8, max_tokens=None, prefix="edufineweb", num_proc=None):
    """Tokenize `texts` (any iterable of strings) on num_proc processes into shards of shard_size tokens, the last
    one shorter; stop after max_tokens if given (mid-document). A shard already under its final name is complete
    and is not written again. Returns [(shard file name, token count), ...]."""
    gpt2()  # loaded before the workers start, so that they inherit it instead of each reading the BPE files
    shard = np.empty(shard_size, dtype=np.uint16)  # the shard being filled, reused for every shard
    filled, total = 0, 0  # tokens in `shard` so far, in all shards so far
    shards = []

    def finish_shard(tokens):
        path = shard_path(out_dir, prefix, len(shards))
        if not os.path.exists(path):  # np.save given a file, because given a name it would append ".npy"
            write_atomically(path, lambda f: np.save(f, tokens))
        shards.append((os.path.basename(path), len(tokens)))

    # Processes, not threads: workers send back a uint16 array per task, while tiktoken's own thread pool
    # (encode_ordinary_batch) returns Python ints that one thread must turn into arrays under the GIL. Measured on 2
    # cores, 5,000 English-like documents of ~4 KB, median of 5: 4.5M tokens/s with this pool, 3.75M with Pool.imap (an
    # array a document), 3.0M with encode_ordinary_batch(num_threads=2), 2.9M in one process; 16 documents a task: 4.3M.
    with ProcessPoolExecutor(num_proc, initializer=leave_signals_to_the_main_process) as pool, \
            tqdm(total=max_tokens, unit="tokens", unit_scale=True, desc=prefix) as bar:
        for tokens in tokenized_chunks(texts, pool, num_proc):
            if max_tokens is not None:
                tokens = tokens[:max_tokens - total]
            while len(tokens) > 0:  # a document may straddle a shard boundary, or several with tiny shards
                take = min(len(tokens), shard_size - filled)
                shard[filled:filled + take] = tokens[:take]
                filled, total, tokens = filled + take, total + take, tokens[take:]
                bar.update(take)
                if filled == shard_size:
                    finish_shard(shard)
                    filled = 0
            if total == max_tokens:
                break
    if filled > 0:  # whatever is left after the last full shard
        finish_shard(shard[:filled])
    return shards


# =============================================================================
# The plumbing: everything below feeds tokenize_to_shards its documents, names its shards, resumes it, parses flags

# -----------------------------------------------------------------------------
# Where the documents come from: local files, or the Hugging Face hub (and its errors)


# local files are read by datasets' own builders, picked by extension; a .txt file holds one document per line
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def check_local_files(paths):
    for path in paths:
        if os.path.isdir(path):  # not "no such file": it exists, it is just not a file
            sys.exit(f"fineweb.py: {path}: is a folder, not a file (pass the files in it)")
        if not os.path.isfile(path):
            sys.exit(f"fineweb.py: {path}: no such file")
        if os.path.getsize(path) == 0:  # datasets' json builder would stop on it with a bare StopIteration
            sys.exit(f"fineweb.py: {path}: empty file, no documents in it")
        if os.path.splitext(path)[1].lower() not in BUILDERS:
            sys.exit(f"fineweb.py: {path}: unknown extension (expected one of {', '.join(BUILDERS)})")


def texts_of(rows, source, text_field):
    found = False
    for i, row in enumerate(rows):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise InputError(f"{source}: {what_is_wrong(row, i, text_field)}")
        found = True
        # a text file saved with a byte-order mark starts with U+FEFF: not a character of the document
        yield text.removeprefix("\ufeff") if i == 0 else text
    if not found:  # an empty source would otherwise "succeed" with no shards at all
        raise InputError(f"{source}: no documents in it")


def what_is_wrong(row, i, text_field):
    """Why row i gives no document: the field is absent, empty, or holds something other than text."""
    if text_field not in row:
        return f"row {i} has no text field '{text_field}' (its fields: {', '.join(row)})"
    if row[text_field] is None:  # json: null, or a row that lacks a field other rows have
        return f"row {i}'s field '{text_field}' is null (or missing in this row)"
    kind = type(row[text_field]).__name__  # list, dict, int, ...
    return f"row {i}'s field '{text_field}' is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a string"


def local_texts(paths, text_field):
    """The files one after another, each streamed from disk (no Arrow copy in the Hugging Face cache)."""
    for path in paths:
        builder = BUILDERS[os.path.splitext(path)[1].lower()]
        try:
            rows = load_dataset(builder, data_files=path, split="train", streaming=True)
            yield from texts_of(rows, path, text_field)
        except (ValueError, OSError) as e:  # a file that is not what its extension says (pyarrow: ValueError)
            raise InputError(f"{path}: cannot read as {builder} ({str(e).splitlines()[0]})") from None


def hub_texts(dataset, name, split, text_field, download, num_proc):
    check_hub_reachable(dataset, name)
    try:
        if download:  # everything first, in parallel, into the Hugging Face cache
            rows = load_dataset(dataset, name=name, split=split, num_proc=num_proc)
        else:
            rows = load_dataset(dataset, name=name, split=split, streaming=True)
    except ConnectionError:  # datasets' name for "offline and not cached" and for "hub out of reach"
        if hub_constants.HF_HUB_OFFLINE:
            sys.exit(hub_out_of_reach(dataset, name, "HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache"))
        sys.exit(hub_out_of_reach(dataset, name, "cannot reach the Hugging Face hub"))  # its retries said why
    except Exception as e:  # not found, no such config...: the user's to fix
        sys.exit(f"fineweb.py: {dataset} ({name}, {split}): cannot open ({str(e).splitlines()[0]})")
    return texts_of(rows, dataset, text_field)


def check_hub_reachable(dataset, name):
    """Without a network, datasets retries 5 times over ~25 s, printing each, before it gives up (measured where DNS
    cannot resolve huggingface.co); a failed name lookup says the same at once. Not checked offline (HF_HUB_OFFLINE=1:
    datasets reads its cache, a copied one too, as the message says) or behind a proxy (which looks names up itself)."""
    if hub_constants.HF_HUB_OFFLINE or {"https", "all"} & urllib.request.getproxies().keys():
        return
    host = urllib.parse.urlparse(hub_constants.ENDPOINT).hostname  # huggingface.co, or the HF_ENDPOINT mirror
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror as e:
        sys.exit(hub_out_of_reach(dataset, name, f"cannot reach the Hugging Face hub ({host}: {e.strerror})"))


def hub_out_of_reach(dataset, name, why):
    """The one line for a hub dataset that cannot be had here, with the two ways around it."""
    return (f"fineweb.py: {dataset} ({name}): {why}; use --local-files with your own text, or fill the Hugging Face "
            "cache on a connected machine (python fineweb.py --download), copy it here and set HF_HUB_OFFLINE=1")


# -----------------------------------------------------------------------------
# The shards' name: NAME_val_000000.npy, NAME_train_000001.npy, ...

# train_gpt2.py finds shards by *_train_*.npy and *_val_*.npy; with these words in NAME, one split's pattern would
# also match the other's shards (my_train_val_000000.npy is *_train_*.npy) and the val shard would be trained on
SPLIT_WORDS = ("train", "val")


def shard_name(args):
    """--prefix; else the name of the shards already in --out-dir, so that a re-run finds its meta file and
    continues them; else one taken from the source."""
    if args.prefix is not None:
        return args.prefix
    names = names_in(args.out_dir)
    if len(names) == 1:
        return names[0]
    return name_of_files(args.local_files) if args.local_files else "edufineweb"


def names_in(out_dir):
    """The names of the shards in out_dir (none if it does not exist)."""
    shards = [p for split in SPLIT_WORDS for p in glob.glob(os.path.join(glob.escape(out_dir), f"*_{split}_*.npy"))]
    return sorted({re.sub(r"_(val|train)_\d+\.npy$", "", os.path.basename(p)) for p in shards})


def name_of_files(paths):
    """The words the file names share (docs.jsonl -> docs; wiki_00.jsonl wiki_01.jsonl -> wiki), else those of
    the first file's folder (corpus/a.txt corpus/b.txt -> corpus), joined by _; train and val are left out."""
    stems = [words(os.path.splitext(os.path.basename(p))[0]) for p in paths]
    shared = []
    for column in zip(*stems):  # word by word from the start, while every file has the same one
        if len(set(column)) > 1:
            break
        shared.append(column[0])
    folder = words(os.path.basename(os.path.dirname(os.path.abspath(paths[0]))))
    return "_".join(shared) or "_".join(folder) or "local"


def words(text):
    """The lower-case runs of letters and digits in text, the split words left out: "My-Data.train" -> my, data."""
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in SPLIT_WORDS]


# -----------------------------------------------------------------------------
# Re-runs: <prefix>_meta.json records the settings, and the shards once the run has finished


def meta_path(out_dir, prefix):
    return os.path.join(out_dir, f"{prefix}_meta.json")


def run_settings(args):
    """Everything that decides the bytes of the shards (not --num-proc: the stream is the same on any count)."""
    if args.local_files:
        source = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in args.local_files]
    else:
        source = {"dataset": args.dataset, "name": args.name, "split": args.split}
    return {"source": source, "text_field": args.text_field, "shard_size": args.shard_size,
            "max_tokens": args.max_tokens, "prefix": args.prefix}


def read_meta(out_dir, prefix):
    """The meta of the run to continue, or None to start afresh. Without shards there is nothing to continue
    or to lose, whatever a meta.json says: a run that stopped at a bad document before its first shard leaves
    one behind, and the corrected files must not be refused for having other settings."""
    path = meta_path(out_dir, prefix)
    if not glob.glob(os.path.join(glob.escape(out_dir), f"{prefix}_*.npy")):
        return None
    if not os.path.exists(path):  # shards that are not ours to overwrite or to resume
        sys.exit(f"fineweb.py: {out_dir}: holds {prefix}_*.npy shards but no {os.path.basename(path)}; "
                 "delete them or choose another --out-dir")
    try:
        with open(path) as f:
            meta = json.load(f)
        if not (isinstance(meta, dict) and isinstance(meta.get("settings"), dict) and "complete" in meta):
            raise ValueError("not the settings of a fineweb.py run")
    except ValueError as e:  # json's errors are ValueErrors too
        sys.exit(f"fineweb.py: {path}: damaged ({e}); delete it and the shards beside it, or choose another "
                 "--out-dir")
    return meta


def write_meta(out_dir, prefix, settings, shards=None):
    meta = {"settings": settings, "complete": shards is not None}
    if shards is not None:
        meta["total_tokens"] = sum(n for _, n in shards)
        meta["shards"] = [{"file": name, "tokens": n} for name, n in shards]
    write_atomically(meta_path(out_dir, prefix), lambda f: f.write(json.dumps(meta, indent=2).encode()))


def lock_out_dir(out_dir):
    """Held until this process ends: a second run would mix its shards into ours. lockf, not flock: fork's tokenizer
    processes share a flock and outlive a SIGKILLed run; a lockf lock ends with this process (on NFS: the server's)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock_file = open(os.path.join(out_dir, "fineweb.lock"), "a")  # left behind, harmless: only a held lock counts
        fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return lock_file
    except BlockingIOError:
        raise InputError(f"{out_dir}: another fineweb.py is writing it; wait or choose another --out-dir") from None
    except OSError as e:  # a read-only folder; NFS without its lock service
        raise InputError(f"{out_dir}: cannot write or lock ({e.strerror or e})") from None


# -----------------------------------------------------------------------------
# The command line: flags checked at the edge, then main() as the recipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-files", nargs="+", metavar="PATH", default=[], help="tokenize these .jsonl/.json, "
                   ".parquet or .txt (one document per line) files instead of the hub dataset")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="Hugging Face dataset (default: %(default)s)")
    p.add_argument("--name", default="sample-10BT", help="the dataset's config, or subset (default: %(default)s)")
    p.add_argument("--split", default="train", help="the dataset's split (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="the rows' field holding the document (default: %(default)s)")
    p.add_argument("--out-dir", default="edu_fineweb10B", help="folder for the shards (default: %(default)s)")
    p.add_argument("--prefix", help="shard file names: PREFIX_val_000000.npy, PREFIX_train_000001.npy, ... (default: "
                   "the shards' name in --out-dir, else the words --local-files' names share or their folder's, else "
                   "edufineweb)")
    p.add_argument("--shard-size", type=int, default=10**8, help="tokens per shard, the last one shorter (default: "
                   "%(default)s)")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens in all (default: the whole dataset)")
    p.add_argument("--download", action="store_true", help="fetch the whole dataset first, not streamed (see above)")
    p.add_argument("--num-proc", type=int, default=os.cpu_count(), help="tokenizer processes (default: %(default)s, "
                   "all cores)")
    args = p.parse_args(argv)
    for name in ("shard_size", "max_tokens", "num_proc"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f"--out-dir {args.out_dir}: is a file, not a folder")
    if args.prefix is not None and set(SPLIT_WORDS) & set(args.prefix.split("_")):
        p.error(f"--prefix {args.prefix}: the words 'train' and 'val' would mix up the splits, since train_gpt2.py "
                "finds shards by *_train_*.npy and *_val_*.npy; choose another")
    # a file name in --out-dir: not a path (a / writes elsewhere), nor a pattern (*?[), nor hidden (glob skips .x)
    if args.prefix is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", args.prefix):
        p.error(f"--prefix {args.prefix!r}: use 1 to 100 of A-Z a-z 0-9 _ . - (not . or - first), it names files")
    if 2 * args.shard_size > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2:  # a shard, in memory
        p.error(f"--shard-size {args.shard_size:,}: {2e-9 * args.shard_size:,.0f} GB, over half this machine's memory")
    return args


def main():
    try:
        make_shards(parse_args())
    except InputError as e:  # the documents, the BPE files or the disk: the user's to fix
        sys.exit(f"fineweb.py: {e}")
    except (KeyboardInterrupt, BrokenExecutor) as e:  # ^C or SIGTERM (below); a worker the OOM killer's SIGKILL ended
        why = "stopped" if isinstance(e, KeyboardInterrupt) else "a tokenizer process died (out of memory?)"
        sys.exit(f"fineweb.py: {why}; the shards written so far are kept, re-run the same command to resume")


def open_texts(args):
    return (local_texts(args.local_files, args.text_field) if args.local_files else
            hub_texts(args.dataset, args.name, args.split, args.text_field, args.download, args.num_proc))


def make_shards(args):
    gpt2()  # here, not at import: --help needs no BPE files
    check_local_files(args.local_files)
    # the hub first where there is no folder yet (making it takes the lock): its refusals then leave nothing behind
    texts = None if os.path.isdir(args.out_dir) else open_texts(args)
    lock = lock_out_dir(args.out_dir)  # held while this variable lives: the whole run
    args.prefix = shard_name(args)

    # a finished folder is a no-op; a folder made with other settings is not ours to mix into
    settings = run_settings(args)
    meta = read_meta(args.out_dir, args.prefix)
    if meta is not None:
        if meta["settings"] != settings:
            changed = ", ".join(k for k in settings if meta["settings"].get(k) != settings[k])
            sys.exit(f"fineweb.py: {meta_path(args.out_dir, args.prefix)}: the shards here were made with other "
                     f"settings ({changed}); delete them or choose another --out-dir")
        if meta["complete"] and all(os.path.exists(os.path.join(args.out_dir, s["file"])) for s in meta["shards"]):
            print(f"{args.out_dir}: already complete, {len(meta['shards'])} shards, "
                  f"{meta['total_tokens']:,} tokens; nothing to do")
            return
        print(f"{args.out_dir}: resuming; shards already written are re-tokenized but not rewritten")

    # documents -> tokens -> shards
    texts = texts or open_texts(args)
    write_meta(args.out_dir, args.prefix, settings)  # not complete yet: a killed run leaves this behind
    shards = tokenize_to_shards(texts, args.out_dir, args.shard_size, args.max_tokens, args.prefix, args.num_proc)
    write_meta(args.out_dir, args.prefix, settings, shards)

    total = sum(n for _, n in shards)
    print(f"wrote {len(shards)} shards, {total:,} tokens, to {args.out_dir}")
    if len(shards) == 1:
        print(f"note: everything fit in the val shard; use a --shard-size below {total:,} to get train shards")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's SIGTERM stops the run as ^C does
    main()
