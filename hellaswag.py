"""
HellaSwag: can the model tell which ending of an everyday scene makes sense?

    python hellaswag.py --pretrained gpt2                        # OpenAI's 124M, for reference
    python hellaswag.py --checkpoint log/model_019073.pt         # a model trained by train_gpt2.py
    python hellaswag.py --checkpoint model.pt --limit 500 --device cpu
    python hellaswag.py --checkpoint model.pt --data ~/hellaswag_val.jsonl   # a local copy, no download

Each example is a context and four endings, one of them right:

    ctx:     "A man is sitting on a roof. he"
    endings: 0 "is using wrap to wrap a pair of skis."
             1 "is ripping level tiles off."
             2 "is holding a rubik's cube."
             3 "starts pulling up roofing on a roof."     label: 3

A small base model cannot answer "A, B, C or D?", but it can say how likely each ending is after the
context. So we feed the four rows (context + ending) through the model together and pick the ending whose
tokens get the lowest cross-entropy loss. Two ways to add up that loss give two accuracies:

- acc:      the lowest *total* loss over the ending's tokens. Every extra token adds loss, so this
            favours short endings.
- acc_norm: the lowest *mean* loss per ending token, which takes the length out. This is the number
            train_gpt2.py logs, and the one to compare with GPT-2 and GPT-3.

Guessing scores 0.25. GPT-2 124M scored this way, by build-nanogpt: 0.2945 is its training plot's reference
line (play.ipynb's hella2_baseline, 0.294463; plot_log.py --reference gpt2 draws it), 0.2955 what its
hellaswag.py printed (its docstring); why they differ (~10 of 10,042 examples) is not said. EleutherAI's lm-evaluation-harness reports 0.3114 for the same model, because it rewrites the text a little
and divides by the ending's characters instead of its tokens.

The validation set (10,042 examples) is downloaded once into $HELLASWAG_DIR, by default the folder
hellaswag/ beside this file; under DDP, once per node, in case the nodes do not share that folder.
train_gpt2.py imports download_if_missing, load_examples and evaluate from here.
"""

import argparse
import json
import os
import socket
import sys
import urllib.request
from contextlib import suppress

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

import checkpoint
from generate import gpt2_encoding
from model import GPT
from training import HelpFormatter, autocast, default_device, default_dtype, existing_device, positive_int, use_device

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DATA_DIR = os.environ.get("HELLASWAG_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag"))
NUM_ENDINGS = 4

# -----------------------------------------------------------------------------
# The data


def download(url, path):
    """Fetch url into path with a progress bar. The bytes go to a .tmp file, which is renamed to path only once
    complete: an interrupted download leaves no half file that a later run would mistake for the data. The
    .tmp file is named after this machine and process: nodes that share a disk may download at the same time,
    and each must write a file of its own (the last complete one to be renamed wins; they are the same)."""
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    made_folder = not os.path.isdir(os.path.dirname(path))  # a failed download removes it: no empty hellaswag/
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)  # in here: a folder that cannot be made is one line
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            size = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(path)) as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, path)
    except OSError as e:  # urllib.error.URLError is an OSError too
        # FileNotFoundError: to the user, the data file is missing; callers already report that in one line
        raise FileNotFoundError(f"{path}: missing, and downloading {url} failed ({getattr(e, 'reason', e)}); "
                                f"pass --data with a local copy") from None
    finally:  # failed or stopped by ^C: what it made is removed, its own .tmp and, if it made it, the folder
        if os.path.exists(tmp):
            os.remove(tmp)
        if made_folder and not os.path.exists(path):
            with suppress(OSError):  # rmdir, not rmtree: another node's download into it goes on
                os.rmdir(os.path.dirname(path))


def download_if_missing(local_master=True):
    """The path of the validation set, downloaded on first use. Under DDP, local_master says that this process
    is local rank 0 of its node: it downloads the file if its node does not have it (the nodes of a cluster
    need not share a disk), while the node's other processes wait at a barrier, then read its copy."""
    path = os.path.join(DATA_DIR, "hellaswag_val.jsonl")
    try:
        if local_master and not os.path.exists(path):
            download(VAL_URL, path)
    finally:
        # reached even when the download failed: the other processes then find no file and stop with an
        # error too, instead of waiting at the barrier for a process that has left
        if dist.is_initialized():
            # the default group's barrier, so --dist-timeout bounds it: one small file, well within that
            dist.barrier()
    return path


def load_examples(path, limit=None):
    """The examples of a HellaSwag .jsonl file, as the dicts it holds (keys ind, activity_label, ctx_a, ctx_b,
    ctx, split, split_type, label, endings, source_id), first `limit` only if given. A list, not a generator:
    training scores the same examples again and again. We rely on three keys, checked line by line:
    ctx (a string), endings (4 strings) and label (the right ending's index)."""
    if os.path.isdir(path):  # not "no such file": something is there, just not the data
        raise FileNotFoundError(f"{path}: is a folder, not a HellaSwag .jsonl file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    examples = []
    with open(path, "rb") as f:  # bytes: json.loads decodes them, so bad UTF-8 is reported with its line too
        for line_number, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                check_example(example)
            except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
                raise ValueError(f"{path}:{line_number}: not a HellaSwag example ({type(e).__name__}: {e})") from None
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def check_example(example):
    if not isinstance(example, dict):
        raise TypeError(f"a {type(example).__name__}, not a JSON object")
    if not isinstance(example["ctx"], str):
        raise TypeError("ctx is not a string")
    endings = example["endings"]
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise ValueError(f"endings must be a list of {NUM_ENDINGS} strings")
    label = example["label"]
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < NUM_ENDINGS):  # True is an int
        raise ValueError(f"label must be an integer from 0 to {NUM_ENDINGS - 1}, got {label!r}")


# -----------------------------------------------------------------------------
# Rendering and scoring


def render_example(example, enc):
    """One example -> (tokens (4, L), mask (4, L), label). Row i is the context followed by ending i, right-
    padded with zeros to the longest row; mask is 1 on the ending's tokens, the only ones we score.
    The ending is encoded with a leading space: GPT-2's BPE glues the space to the word that follows it
    (" roof" is one token), so "ctx" + " ending" is tokenized the way the sentence would be in running text."""
    # no <|endoftext|> before the context (training documents start with one): build-nanogpt's hellaswag.py
    # scores it this way, so our numbers and its reference numbers compare
    ctx_tokens = enc.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        ending_tokens = enc.encode(" " + ending)
        rows.append(ctx_tokens + ending_tokens)
        masks.append([0] * len(ctx_tokens) + [1] * len(ending_tokens))
    length = max(len(row) for row in rows)
    tokens = torch.stack([F.pad(torch.tensor(row), (0, length - len(row))) for row in rows])  # (4, L)
    mask = torch.stack([F.pad(torch.tensor(row_mask), (0, length - len(row_mask))) for row_mask in masks])  # (4, L)
    return tokens, mask, example["label"]


def score_example(logits, tokens, mask):
    """logits (4, L, V) of one example's 4 rows -> (pred, pred_norm): the ending with the lowest total loss
    (acc) and the one with the lowest mean loss per token (acc_norm). One example at a time is the easiest
    form to check by hand, which is what the tests do; evaluate() scores many at once with score_examples."""
    preds, preds_norm = score_examples(logits, tokens, mask)
    return preds[0], preds_norm[0]


def score_examples(logits, tokens, mask):
    """logits (4E, L, V) of E examples' rows, 4 consecutive rows per example -> ([pred], [pred_norm]), E each."""
    # the logits at position t predict the token at t+1: drop the last prediction and the first token
    in_ending = mask[:, 1:].bool()  # (4E, L-1): True where the token being predicted belongs to an ending
    # Only those positions are scored, so only their logits go to float32 for the log-softmax (autocast gives
    # bf16 or fp16 logits): converting all (4E, L, V) would copy the context's and the padding's too, for nothing.
    ending_logits = logits[:, :-1][in_ending].float()  # (N, V), N = ending tokens in the whole batch
    ending_losses = F.cross_entropy(ending_logits, tokens[:, 1:][in_ending], reduction="none")  # (N,)
    # back into place, row by row (boolean indexing and masked_scatter walk the mask in the same order);
    # context and padding stay at zero loss
    losses = torch.zeros(in_ending.shape, device=logits.device).masked_scatter(in_ending, ending_losses)
    sum_loss = losses.sum(dim=1).view(-1, NUM_ENDINGS)  # (E, 4)
    mean_loss = sum_loss / in_ending.sum(dim=1).view(-1, NUM_ENDINGS)  # (E, 4)
    return sum_loss.argmin(dim=1).tolist(), mean_loss.argmin(dim=1).tolist()


def pad_and_stack(rendered):
    """[(tokens (4, L_i), mask (4, L_i))] -> tokens (4E, L), mask (4E, L), right-padded with zeros to the
    longest. Padding on the right is harmless: causal attention never lets a real token see what follows it,
    and the mask leaves the padded positions out of the scores."""
    length = max(tokens.size(1) for tokens, _ in rendered)
    tokens = torch.cat([F.pad(tokens, (0, length - tokens.size(1))) for tokens, _ in rendered])
    mask = torch.cat([F.pad(mask, (0, length - mask.size(1))) for _, mask in rendered])
    return tokens, mask


def crop_to_block_size(tokens, mask, block_size):
    """Keep the last block_size columns. The model has no position embeddings past block_size, so a longer
    row cannot be scored whole; dropping the start of the shared context costs the least, and it drops the same
    columns from all four rows. A block_size shorter than the context's cut needs would cut the endings' first
    tokens too (an ending cut away whole would score 0/0): not at GPT-2's 1024 (a HellaSwag context is a sentence
    or two), only with a very small block_size."""
    return tokens[:, -block_size:], mask[:, -block_size:]


@torch.no_grad()
def evaluate(model, examples, device, rank=0, world_size=1, autocast_dtype=None, progress=False, batch_size=16):
    """Score examples -> (num_correct, num_correct_norm, num_total), summed over all processes.
    Process `rank` of `world_size` scores examples rank, rank + world_size, ...; under torch.distributed the
    three counts are then all-reduced, so every rank returns the totals. autocast_dtype: None or 'float32' for
    full precision, 'bfloat16' or 'float16' for autocast, as in training. batch_size examples (4 rows each) go
    through the model together: 4 rows of a hundred-odd tokens are too little work to keep a GPU busy."""
    enc = gpt2_encoding()
    device_type = torch.device(device).type
    was_training = model.training
    model.eval()  # no dropout while scoring
    num_correct = num_correct_norm = num_total = 0
    my_examples = examples[rank::world_size]
    with tqdm(total=len(my_examples), desc="hellaswag", disable=not progress) as bar:
        for start in range(0, len(my_examples), batch_size):
            batch = my_examples[start:start + batch_size]
            rendered = [render_example(example, enc) for example in batch]
            tokens, mask = pad_and_stack([crop_to_block_size(tokens, mask, model.config.block_size)
                                          for tokens, mask, _ in rendered])
            tokens, mask = tokens.to(device), mask.to(device)
            with autocast(device_type, autocast_dtype or "float32"):
                logits, _ = model(tokens)  # (4E, L, V)
            preds, preds_norm = score_examples(logits, tokens, mask)
            labels = [label for _, _, label in rendered]
            num_correct += sum(pred == label for pred, label in zip(preds, labels))
            num_correct_norm += sum(pred == label for pred, label in zip(preds_norm, labels))
            num_total += len(batch)
            bar.update(len(batch))
    model.train(was_training)
    # world_size too, not only is_initialized: a single process may score everything alone inside a DDP run
    if world_size > 1 and dist.is_initialized():
        counts = torch.tensor([num_correct, num_correct_norm, num_total], dtype=torch.long, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        num_correct, num_correct_norm, num_total = counts.tolist()
    return num_correct, num_correct_norm, num_total


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a .pt file from train_gpt2.py (or train_caption.py: see load_model)")
    source.add_argument("--pretrained", help="OpenAI weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a folder")
    p.add_argument("--data", help=f"a local hellaswag_val.jsonl (default: downloaded once into {DATA_DIR})")
    p.add_argument("--limit", type=positive_int, help="score only the first N examples")
    p.add_argument("--batch-size", type=positive_int, default=16, help="examples per forward pass (4 rows each)")
    p.add_argument("--device", default="auto", type=existing_device,
                   help="auto (cuda, then mps, then cpu), or e.g. cuda:1")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on a GPU that has it, float16 on older GPUs, float32 elsewhere")
    return p.parse_args(argv)


def load_model(args):
    # A caption checkpoint is scored as its text decoder: no image_feats, so the cross-attention is skipped. After
    # the default --train cross (no --unfreeze-after) GPT-2's weights are untouched and the score is the initial
    # LM's; after --train cross+mlp, all or --unfreeze-after it shows what captioning cost the language model.
    if args.checkpoint is not None:
        model, saved = checkpoint.load_model(args.checkpoint)
        return model, f"{args.checkpoint} (step {saved.get('step', '?')})"
    return GPT.from_pretrained(args.pretrained), args.pretrained


def main(args):
    device = default_device() if args.device == "auto" else args.device
    use_device(device)
    dtype = args.dtype or default_dtype(device)
    model, name = load_model(args)  # first: a wrong checkpoint is found before a download
    examples = load_examples(args.data or download_if_missing(), limit=args.limit)
    model.to(device)
    print(f"{name} | {len(examples)} examples | {device}, {dtype}")
    correct, correct_norm, total = evaluate(model, examples, device, autocast_dtype=dtype, progress=True,
                                             batch_size=args.batch_size)
    print(f"acc {correct / total:.4f} acc_norm {correct_norm / total:.4f} (n={total})")


if __name__ == "__main__":
    try:
        main(parse_args())
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"hellaswag.py: error: {e}")
    except KeyboardInterrupt:  # ^C: one line, not a traceback, and the status a shell gives it (128 + SIGINT)
        print("hellaswag.py: stopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
