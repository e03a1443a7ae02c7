"""
Pretrain GPT-2 on FineWeb-Edu token shards (written by fineweb.py).

    python train_gpt2.py                                          # one GPU (or mps / cpu)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py        # 8 GPUs, DDP
    python train_gpt2.py --model tiny --total-batch-size 16384 --batch-size 16 --seq-len 256 --max-steps 500 \
        --warmup-steps 50 --max-lr 2e-3
    python train_gpt2.py --resume auto                            # continue the newest checkpoint in --out-dir

The defaults are the GPT-2 124M recipe (the GPT-3 paper's hyperparameters for that size, at GPT-2's context of
1024 and with its cosine shortened from 260B tokens to 10B): 2**19 = 524,288 tokens per step (64 x 1024 per
GPU and micro-step, accumulated until 2**19: 8 steps on 1 GPU, 1 on 8), AdamW(0.9, 0.95), weight decay 0.1, gradient norm clipped at 1.0,
lr 6e-4 with 715 warmup steps and a cosine to 6e-5 at step 19,073 (19,073 x 2**19 = 10.0B tokens: 1-2%
over one pass of the train shards of FineWeb-Edu's 10BT sample, whose first shard is held out for validation).

The algorithm: model.py (the model, its loss and optimizer groups), then main() below, whose loop ends with
the training step ("--- one optimizer step"), and the helpers at the top of training.py it calls.
Each step prints one line; OUT_DIR/log.txt gets '{step} train|val|hella {value}' lines for plot_log.py.
"""

import argparse
import glob
import math
import os
import sys
import time
import zlib
from dataclasses import asdict

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from checkpoint import load_model
from generate import generate, gpt2_encoding
from model import EOT_TOKEN, GPT, GPT2_VOCAB_SIZE, PRESETS, GPTConfig
from training import (HelpFormatter, StepTimer, StopSignal, Tracker, all_reduce_sum, append_log, autocast,
                      check_finite, check_resume_step, check_same_run, cleanup_distributed, config_defaults, cosine_lr,
                      default_dtype, existing_device, fp16_note, grad_scaler, load_on_every_rank, muon_and_adamw,
                      non_negative_float, non_negative_int, peak_flops, positive_float, positive_int, random_seed,
                      restore_training_state, resume_path, save_on_rank0, setup_distributed, start_log, take_out_dir,
                      warn, warn_if_bf16_is_emulated, write_run_record)

# -----------------------------------------------------------------------------
# Data: token shards, memory-mapped


def open_shard(path):
    """A shard is a 1-D uint16 .npy array of tokens. mmap_mode='r' maps it instead of reading it: the OS pages
    in what is used, so 8 ranks x 100 shards cost no RAM until touched. numpy checks the header against the
    file size, so a truncated file fails here instead of yielding garbage."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        # numpy calls anything without a .npy header "pickled data": say what it means here
        reason = "not a .npy array file" if "pickled" in str(e) else str(e)
        raise ValueError(f"{path}: not a readable token shard ({reason})") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D uint16 token array, found {tokens.ndim}-D {tokens.dtype}")
    return tokens


def find_shards(data_dir, split):
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: no such data folder (write shards with: python fineweb.py "
                                f"--out-dir {data_dir})")
    paths = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"*_{split}_*.npy")))  # a folder "data[1]" too
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no '{split}' shards (*_{split}_*.npy) in this folder")
    corpora = sorted({os.path.basename(path).split(f"_{split}_")[0] for path in paths})  # fineweb.py's --prefix
    if len(corpora) > 1:
        raise ValueError(f"{data_dir}: holds the shards of {len(corpora)} corpora ({', '.join(corpora)}), which a "
                         f"run would mix; give each its own folder")
    return paths


class ShardLoader:
    """Training data, one optimizer step at a time: next_step() -> this rank's (x, y), y being x shifted by
    one token.

    A shard is cut into windows of T tokens. A window may start mid-document and run across an <|endoftext|>
    into the next, unmasked: the token tells the model that what follows is unrelated (as in GPT-3's training).
    Every epoch visits the shards in a new random order and each shard's windows in a new random order (drawn from
    the seed, the epoch and the shard's place, so every rank agrees without talking). Laid end to end they make the
    epoch's stream of windows, and each optimizer step takes the next `windows_per_step` (= total batch size / T) of
    them, whatever the number of processes or the micro-batch size. Only then is the step split: rank r of W takes
    the r-th of W equal slices, and cuts it into its micro-batches. So the data of every step is the same on 1 GPU
    with 8x the gradient accumulation as on 8 GPUs, and a checkpoint written on 8 GPUs resumes on 4 with the same
    data order. A step may span two shards; only the epoch's last < windows_per_step windows go unused (different
    ones each epoch). Shuffling matters: build-nanogpt reads its shards in the same order every epoch, and its train
    loss shows that period.
    """

    def __init__(self, data_dir, T, windows_per_step, seed=1337, pin_memory=False):
        self.paths = find_shards(data_dir, "train")
        self.shards = [open_shard(p) for p in self.paths]
        self.T, self.windows_per_step, self.seed, self.pin_memory = T, windows_per_step, seed, pin_memory
        self.n_windows = np.array([(len(s) - 1) // T for s in self.shards])  # the last token is only a target
        if self.n_windows.sum() < windows_per_step:
            raise ValueError(f"{data_dir}: the train shards hold {self.n_windows.sum():,} windows of {T} tokens, "
                             f"fewer than one step's {windows_per_step:,}")
        self.load_state_dict({"epoch": 0, "pos": 0})

    def state_dict(self):
        # pos: windows of this epoch's stream already used. What that position means depends on the data order.
        return {"epoch": self.epoch, "pos": self.pos, "data_order": self.data_order()}

    def data_order(self):
        """What the order of windows depends on. A checkpoint records it, and resuming refuses a mismatch:
        with a shard added or another --seq-len, `pos` would silently point at other data."""
        return {"shards": [[os.path.basename(p), len(s)] for p, s in zip(self.paths, self.shards)],
                "seq_len": self.T, "windows_per_step": self.windows_per_step, "seed": self.seed,
                # the first and last 1,024 tokens of each shard: another corpus under the same names and sizes
                "samples": [zlib.crc32(s[:1024].tobytes() + s[-1024:].tobytes()) for s in self.shards]}

    def load_state_dict(self, state):
        if "data_order" in state:  # compared on what it records (checkpoints before "samples" have none)
            saved, now = state["data_order"], self.data_order()
            if any(saved[key] != now[key] for key in saved):
                raise ValueError(f"the checkpoint's data order does not match this run: {describe_change(saved, now)}")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.shard_order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        self.stream_ends = np.cumsum(self.n_windows[self.shard_order])  # where each shard's windows end
        self.window_orders = {}  # k -> the shuffled windows of the epoch's k-th shard, drawn when first read

    def next_step(self, rank=0, world_size=1):
        """This rank's share of the next step: x and y of shape (windows_per_step / world_size, T)."""
        if self.pos + self.windows_per_step > self.stream_ends[-1]:
            self.load_state_dict({"epoch": self.epoch + 1, "pos": 0})
        share = self.windows_per_step // world_size  # exact: main checks world_size x B divides the step
        first = self.pos + rank * share
        rows = np.stack([self.window(i) for i in range(first, first + share)])  # (share, T + 1)
        if rows.max() >= GPT2_VOCAB_SIZE:  # cheap here; as an embedding index it is a crash (a device assert on CUDA)
            self.name_bad_shard(range(first, first + share))
        rows = torch.from_numpy(rows.astype(np.int64))
        self.pos += self.windows_per_step
        # x, y: (share, T) each, made contiguous here so that every micro-batch (a slice of rows) is one block of
        # memory. A strided slice would be packed into a fresh, pageable tensor by the copy to the GPU, and
        # pinning would be lost. Page-locked (pinned) memory lets that copy run while the CPU goes on.
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def name_bad_shard(self, windows):
        for i in windows:
            if self.window(i).max() >= GPT2_VOCAB_SIZE:
                k = int(np.searchsorted(self.stream_ends, i, side="right"))
                raise ValueError(f"{self.paths[self.shard_order[k]]}: token id {self.window(i).max()} is not a GPT-2 "
                                 f"token (ids go up to {GPT2_VOCAB_SIZE - 1}); re-tokenize it with fineweb.py")

    def window(self, i):
        """The T + 1 tokens of the i-th window of this epoch's stream."""
        k = int(np.searchsorted(self.stream_ends, i, side="right"))  # it is in the epoch's k-th shard
        shard = self.shard_order[k]
        # reading moves forward: keep only the shard(s) still being read (k - 1 too: a step, or one rank's
        # share, can straddle the shard boundary and still be reading the previous shard)
        if k not in self.window_orders:
            self.window_orders = {j: order for j, order in self.window_orders.items() if j >= k - 1}
            rng = np.random.default_rng([self.seed, self.epoch, k])
            self.window_orders[k] = rng.permutation(self.n_windows[shard])
        # stream_ends[k] - n_windows[shard] is where the k-th shard begins in the epoch's stream: i minus that is
        # the window's place within the shard, which the shard's shuffled order maps to a window of the file
        start = self.window_orders[k][i - (self.stream_ends[k] - self.n_windows[shard])] * self.T
        return self.shards[shard][start: start + self.T + 1]


def describe_change(before, now):
    """What differs between two data_order dicts, in a few words."""
    changes = []
    for key in before:
        if key == "shards" and before[key] != now[key]:
            old, new = dict(map(tuple, before[key])), dict(map(tuple, now[key]))
            changes += [f"shard {name} missing" for name in old.keys() - new.keys()]
            changes += [f"shard {name} new" for name in new.keys() - old.keys()]
            changes += [f"shard {name} had {old[name]:,} tokens, now {new[name]:,}"
                        for name in old.keys() & new.keys() if old[name] != new[name]]
        elif key == "samples" and before["shards"] == now["shards"]:
            changes += [f"shard {name}'s tokens differ" for (name, _), old, new in zip(before["shards"], before[key],
                                                                                       now[key]) if old != new]
        elif key not in ("shards", "samples") and before[key] != now.get(key):
            changes.append(f"{key} was {before[key]}, now {now.get(key)}")
    return "; ".join(sorted(changes)[:5]) + (" (run with the checkpoint's data and settings, or start afresh)")


def val_batches(data_dir, B, T, val_tokens):
    """Where the (B, T) val batches start: the first val_tokens tokens of the val shards, in order, as
    (shard, offset) pairs read when needed. The budget is fixed in tokens, not in steps per rank, so the val
    loss means the same thing on 1 GPU and on 64."""
    batches, wanted = [], -(-val_tokens // (B * T))  # ceil: at least val_tokens tokens
    for path in find_shards(data_dir, "val"):
        tokens = open_shard(path)
        # a batch starting at s reads B*T + 1 tokens (the targets run one further), so s < len(tokens) - B*T
        starts = range(0, len(tokens) - B * T, B * T)[:wanted - len(batches)]
        if starts and tokens[:starts[-1] + B * T + 1].max() >= GPT2_VOCAB_SIZE:
            raise ValueError(f"{path}: holds token ids that are not GPT-2 tokens (ids go up to {GPT2_VOCAB_SIZE - 1}); "
                             f"re-tokenize it with fineweb.py")
        batches += [(tokens, start) for start in starts]
        if len(batches) == wanted:
            break
    if not batches:
        raise ValueError(f"{data_dir}: the val shards hold fewer than one batch of {B * T + 1:,} tokens")
    return batches


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def validation_loss(model, batches, B, T, d, dtype):
    """Mean loss over the fixed val batches; rank r takes batches r, r+W, ..., and the sums are reduced.
    Ranks may run different numbers of batches through the DDP-wrapped model: without gradients, and with no
    buffers in the model, DDP's forward runs no collective, so none waits for another."""
    model.eval()
    total = torch.zeros(2, device=d.device)  # [sum of batch losses, number of batches]
    for i in range(d.rank, len(batches), d.world_size):
        tokens, start = batches[i]
        rows = torch.from_numpy(tokens[start: start + B * T + 1].astype(np.int64)).to(d.device)
        x, y = rows[:-1].view(B, T), rows[1:].view(B, T)
        with autocast(d.device_type, dtype):
            loss = model(x, y)[1]
        total += torch.stack([loss.float(), torch.ones((), device=d.device)])
    all_reduce_sum(total, d)
    model.train()
    return (total[0] / total[1]).item()


def evaluate(step, last, model, raw_model, val_data, hellaswag_examples, enc, args, d, dtype, tracker):
    """What is due at this step: the val loss (every --eval-every steps and after the last update), HellaSwag and
    a few samples (every --hellaswag-every / --sample-every steps and at the end). model: the compiled, DDP-
    wrapped one, for the val loss; raw_model for the rest, whose shapes vary (see main)."""
    if (args.eval_every > 0 and step % args.eval_every == 0) or last:
        val_loss = validation_loss(model, val_data, args.batch_size, args.seq_len, d, dtype)
        if d.master:
            print(f"step {step:5d} | val loss {val_loss:.4f} | perplexity {math.exp(val_loss):.2f}")
            append_log(args.out_dir, f"{step} val {val_loss:.4f}")
            tracker.log(step, val_loss=val_loss)
    if hellaswag_examples is not None and (step % args.hellaswag_every == 0 or last):
        correct, correct_norm, total = hellaswag.evaluate(raw_model, hellaswag_examples, d.device, d.rank,
                                                          d.world_size, autocast_dtype=dtype)
        if d.master:
            print(f"step {step:5d} | HellaSwag acc_norm {correct_norm / total:.4f} ({correct_norm}/{total})")
            append_log(args.out_dir, f"{step} hella {correct_norm / total:.4f}")
            tracker.log(step, hellaswag=correct_norm / total)
    if d.master and args.sample_every > 0 and (step % args.sample_every == 0 or last):
        print_samples(raw_model, enc, d)


def print_samples(model, enc, d, prompt="Hello, I'm a language model,", num_samples=4, max_new_tokens=32):
    """A few continuations, to see the model learn to write. A private generator keeps the training RNG
    untouched, so sampling never changes what training does (or its exact resume)."""
    model.eval()
    idx = torch.tensor([enc.encode(prompt)] * num_samples, device=d.device)
    generator = torch.Generator(device=d.device).manual_seed(42)  # 42 and top-k 50: build-nanogpt's samples
    max_new_tokens = min(max_new_tokens, model.config.block_size - idx.size(1))
    out = generate(model, idx, max_new_tokens, temperature=1.0, top_k=50, generator=generator)
    for row in out.tolist():
        text = enc.decode([t for t in row if t != EOT_TOKEN])
        print(f"sample: {text!r}")
    model.train()


# -----------------------------------------------------------------------------
# The run


# Optimizer recipes. gpt2: build-nanogpt's numbers, GPT-3's for this size (AdamW 6e-4, a cosine to 10% of it;
# 715 warmup steps = GPT-3's 375M warmup tokens / 2**19 tokens per step): the recipe OpenAI's GPT-2 124M
# reference numbers (val loss 3.2924 and HellaSwag 0.2945) are compared with. fast: the winner of
# `bench.py recipe` (BENCHMARKS.md): Muon for the blocks' matrices, at 6x the peak rate (AdamW's part too),
# which reached the gpt2 recipe's val loss in 4x fewer tokens, on a 4-layer model and 307K tokens of
# Shakespeare and Milton (300 steps with 30 warmup there; the recipe keeps 715 warmup steps for 124M's
# 19,073). Small models flatter every lever: untested at 124M, so gpt2 stays the default.
RECIPES = {
    "gpt2": dict(optimizer="adamw", max_lr=6e-4, muon_lr=None, warmup_steps=715, min_lr_ratio=0.1),
    "fast": dict(optimizer="muon", max_lr=3.6e-3, muon_lr=3.6e-3, warmup_steps=715, min_lr_ratio=0.1),
}


# What a resume may change (training.check_same_run): where and how the run goes on, when it evaluates, saves
# and stops, and the schedule's shape (the rate is set every step). The peak rates and weight decay are not
# here: the optimizer's groups keep their saved values (and Muon's ratio to AdamW's rate).
MAY_CHANGE_ON_RESUME = {"data_dir", "out_dir", "resume", "batch_size", "max_steps", "stop_at", "warmup_steps",
                        "min_lr_ratio", "grad_clip", "eval_every", "val_tokens", "hellaswag_every", "hellaswag_data",
                        "hellaswag_limit", "sample_every", "save_every", "keep_last", "compile", "dtype", "device",
                        "wandb_project", "wandb_run", "dist_timeout", "config"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-dir", default="edu_fineweb10B", help="folder of *_train_*.npy / *_val_*.npy shards")
    p.add_argument("--out-dir", default="log", help="checkpoints and log.txt go here")
    p.add_argument("--model", default="gpt2", choices=sorted(PRESETS), help="size preset (gpt2 = 124M)")
    p.add_argument("--n-layer", type=positive_int, help="override the preset's number of blocks")
    p.add_argument("--n-head", type=positive_int, help="override the preset's number of heads")
    p.add_argument("--n-embd", type=positive_int, help="override the preset's width")
    p.add_argument("--init", help="start from weights instead of random: gpt2, gpt2-medium, ... (HF hub), a "
                                  "folder with config.json + model.safetensors, or an lm checkpoint .pt")
    p.add_argument("--batch-size", type=positive_int, default=64, help="micro-batch size B per process")
    p.add_argument("--seq-len", type=positive_int, default=1024, help="sequence length T")
    p.add_argument("--total-batch-size", type=positive_int, default=524288, help="tokens per optimizer step (2**19)")
    p.add_argument("--max-steps", type=positive_int, default=19073,
                   help="steps of the schedule (19073 x 2**19 = 10B tokens)")
    p.add_argument("--stop-at", type=positive_int, help="end this run after this step, with a checkpoint, leaving the "
                                               "schedule as it is (for job time limits; then --resume auto)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="gpt2",
                   help="the optimizer settings below, as a set (RECIPES); flags given explicitly override them")
    p.add_argument("--optimizer", choices=["adamw", "muon"], help="AdamW for everything, or Muon for the "
                                                                  "blocks' matrices and AdamW for the rest")
    p.add_argument("--warmup-steps", type=non_negative_int, help="linear warmup steps")
    p.add_argument("--max-lr", type=positive_float, help="AdamW's peak learning rate, after warmup")
    p.add_argument("--muon-lr", type=positive_float, help="Muon's peak learning rate (--optimizer muon)")
    p.add_argument("--min-lr-ratio", type=non_negative_float,
                   help="the cosine ends at this fraction of the peak rates, at most 1 (0: at zero)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="AdamW weight decay of the matrices")
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="clip the global gradient norm to this")
    p.add_argument("--eval-every", type=non_negative_int, default=250,
                   help="val loss every N steps (0: only at the end)")
    # 20 x 2**19: build-nanogpt's 20 val steps of 64 x 1024 tokens on each of 8 GPUs
    p.add_argument("--val-tokens", type=positive_int, default=10485760,
                   help="val loss over this many tokens (20 x 2**19)")
    p.add_argument("--hellaswag-every", type=non_negative_int, default=250, help="HellaSwag every N steps (0: never)")
    p.add_argument("--hellaswag-data", help="a local hellaswag_val.jsonl (default: downloaded once)")
    p.add_argument("--hellaswag-limit", type=positive_int, help="score only the first N HellaSwag examples")
    p.add_argument("--sample-every", type=non_negative_int, default=250,
                   help="print text samples every N steps (0: never)")
    p.add_argument("--save-every", type=positive_int, default=5000, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep-last", type=positive_int, help="keep only the newest N checkpoints (default: all)")
    p.add_argument("--resume", help="'auto' (newest checkpoint in --out-dir, if any) or a checkpoint path")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="autocast dtype (default on CUDA: bfloat16 where the GPU has it, else float16; "
                        "float32 elsewhere)")
    p.add_argument("--device", default="auto", type=existing_device, help="auto, cuda, mps or cpu")
    p.add_argument("--seed", type=random_seed, default=1337, help="weights' initialisation and the data order")
    p.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT"),  # wandb's own convention
                   help="log to this Weights & Biases project (pip install wandb); $WANDB_PROJECT if set")
    p.add_argument("--wandb-run", help="the wandb run's name (default: wandb picks one)")
    p.add_argument("--dist-timeout", type=positive_float, default=10,
                   help="minutes a process waits for a missing peer before the run stops with an error")
    p.add_argument("--config", help="start from the settings in a run.json (another run's record); flags given "
                                    "here win")
    config_defaults(p, argv)
    args = p.parse_args(argv)
    for name, value in RECIPES[args.recipe].items():  # what the command line did not set, the recipe does
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.muon_lr is None:  # with match_rms_adamw (training.muon_and_adamw) Muon's rate means what AdamW's does
        args.muon_lr = args.max_lr
    n_embd = args.n_embd or PRESETS[args.model].get("n_embd", GPTConfig.n_embd)
    n_head = args.n_head or PRESETS[args.model].get("n_head", GPTConfig.n_head)
    if n_embd % n_head:
        p.error(f"--n-embd {n_embd} is not divisible by --n-head {n_head} (each head gets n_embd / n_head dimensions)")
    if args.stop_at is not None and args.stop_at > args.max_steps:
        p.error(f"--stop-at {args.stop_at} is after --max-steps {args.max_steps}")
    if args.min_lr_ratio > 1:  # the rate would climb after warmup
        p.error(f"--min-lr-ratio {args.min_lr_ratio} is above 1: the cosine would end above the peak")
    return args


def print_plan(args, model, train_loader, d, dtype, use_compile, grad_accum_steps, resume_from, start_step):
    """What the run will do, before it spends hours doing it; and what in it is almost always a mistake."""
    train_tokens = int(train_loader.n_windows.sum()) * args.seq_len
    tokens = args.max_steps * args.total_batch_size
    epochs = tokens / train_tokens
    print(f"{d.world_size} process(es) on {d.device}, {dtype}, compile={use_compile} | "
          f"{model.num_params() / 1e6:.1f}M parameters"
          + (f" | resuming {resume_from} at step {start_step}" if resume_from else ""))
    print(f"{args.total_batch_size:,} tokens/step = {args.batch_size} x {args.seq_len} x {d.world_size} ranks x "
          f"{grad_accum_steps} accumulation steps | {args.max_steps:,} steps = {tokens:,} tokens = {epochs:.2f} "
          f"epochs of {train_tokens:,} | checkpoints and log.txt in {args.out_dir}")
    rates = f"AdamW {args.max_lr:g}" + (f", Muon {args.muon_lr:g}" if args.optimizer == "muon" else "")
    print(f"recipe {args.recipe}: {args.optimizer}, peak lr {rates}, warmup {args.warmup_steps} steps, cosine to "
          f"{args.min_lr_ratio:g} x peak")
    if args.warmup_steps >= args.max_steps:
        warn(f"--warmup-steps {args.warmup_steps} >= --max-steps {args.max_steps}: the whole run is warmup")
    if args.eval_every > args.max_steps:
        warn(f"--eval-every {args.eval_every} > --max-steps {args.max_steps}: a val loss only at the end")
    if args.save_every > args.max_steps:
        warn(f"--save-every {args.save_every} > --max-steps {args.max_steps}: a checkpoint only at the end")
    if epochs > 1.05:  # the 124M recipe's 10B tokens are 1-2% over one pass of 10BT's train shards
        warn(f"{epochs:.2f} epochs: the run sees its training data more than once")
    warn_if_bf16_is_emulated(dtype, d.device)


def build_model(args, resume_from, d):
    """The model to train -> (model, checkpoint being resumed or None): from that checkpoint, from
    pretrained weights (--init), or random."""
    if resume_from is not None:
        model, checkpoint = load_on_every_rank(lambda: load_model(resume_from, kind="lm"), resume_from, d)
        check_same_run(checkpoint, args, resume_from, MAY_CHANGE_ON_RESUME)
        return model, checkpoint
    if args.init is not None:
        if args.init.endswith(".pt"):
            return load_model(args.init, kind="lm")[0], None
        return GPT.from_pretrained(args.init), None
    sizes = {k: v for k, v in (("n_layer", args.n_layer), ("n_head", args.n_head), ("n_embd", args.n_embd)) if v}
    return GPT(GPTConfig(**{**PRESETS[args.model], **sizes})), None


def resume_state(checkpoint, optimizer, scaler, train_loader, path, args, d):
    """The rest of an exact resume (training.restore_training_state). -> the step."""
    restore_training_state(checkpoint, optimizer, scaler, train_loader, d, args.seed)
    check_resume_step(checkpoint["step"], args.max_steps, args.stop_at, path)
    return checkpoint["step"]


def main(args):
    d = setup_distributed(args.device, args.dist_timeout)
    dtype = args.dtype or default_dtype(d.device)  # bf16 on recent GPUs; float32 on the CPU (tests, smoke runs)
    # compile on CUDA by default, where the long runs are; elsewhere its minutes of compiling rarely pay off
    use_compile = args.compile if args.compile is not None else d.device_type == "cuda"
    # one seed for every rank: the same initial weights everywhere (DDP also copies rank 0's to the others when
    # it wraps the model) and a run that --seed reproduces; after the init the generators only draw dropout
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls: all of --dtype float32's on a GPU
    enc = gpt2_encoding()

    B, T = args.batch_size, args.seq_len
    tokens_per_micro_step = B * T * d.world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise ValueError(f"--total-batch-size {args.total_batch_size} is not divisible by batch-size x seq-len x "
                         f"world size = {B} x {T} x {d.world_size} = {tokens_per_micro_step}")
    grad_accum_steps = args.total_batch_size // tokens_per_micro_step

    # --- data, model, optimizer (errors here are the user's: a message naming the file, then exit)
    train_loader = ShardLoader(args.data_dir, T, args.total_batch_size // T, args.seed,
                               pin_memory=d.device_type == "cuda")
    val_data = val_batches(args.data_dir, B, T, args.val_tokens)
    hellaswag_examples = None
    if args.hellaswag_every > 0:
        path = args.hellaswag_data or hellaswag.download_if_missing(local_master=d.local_rank == 0)
        hellaswag_examples = hellaswag.load_examples(path, limit=args.hellaswag_limit)
    take_out_dir(args.out_dir, d)  # one run per out-dir, and a writable one
    resume_from = resume_path(args.out_dir, args.resume, d)
    raw_model, checkpoint = build_model(args, resume_from, d)
    raw_model.to(d.device)
    if T > raw_model.config.block_size:
        raise ValueError(f"--seq-len {T} exceeds the model's block_size {raw_model.config.block_size}")
    if args.optimizer == "muon":  # Muon for the blocks' matrices, AdamW for the rest (see muon_and_adamw)
        optimizer = muon_and_adamw(raw_model, args.weight_decay, args.max_lr, args.muon_lr, d.device_type)
    else:
        optimizer = raw_model.configure_optimizers(args.weight_decay, args.max_lr, d.device_type)
    scaler = grad_scaler(d, dtype)  # fp16 only: loss scaling (otherwise every call on it is a no-op)
    # The compiled (and DDP-wrapped) model trains and computes the val loss, whose shapes never change.
    # HellaSwag and sampling use raw_model: their shapes vary, and feeding those to the compiled model is
    # what made build-nanogpt switch compile off. Both share the same parameters. Compiled first, then
    # wrapped: build-nanogpt's order, and the one the DDP tests here run (whether the all-reduce still overlaps
    # the backward in this order is not measured: no GPU run yet).
    model = torch.compile(raw_model) if use_compile else raw_model
    if d.ddp:
        model = DDP(model, device_ids=[d.local_rank] if d.device_type == "cuda" else None)
    tracker = Tracker(args.wandb_project, args.wandb_run, vars(args), d,
                      run_id=checkpoint.get("wandb_id") if checkpoint is not None else None)
    start_step = 0
    if checkpoint is not None:
        start_step = resume_state(checkpoint, optimizer, scaler, train_loader, resume_from, args, d)
        del checkpoint  # its tensors are copied into the model and optimizer
    write_run_record(args, d)  # run.json (every setting, the commit, torch, the GPUs), once nothing can refuse
    if d.master:
        start_log(os.path.join(args.out_dir, "log.txt"), start_step if resume_from else None)
        print_plan(args, raw_model, train_loader, d, dtype, use_compile, grad_accum_steps, resume_from, start_step)
    # MFU is per GPU: the FLOPs every GPU does per second, against one GPU's peak
    peak = peak_flops(d.device)
    flops_per_step_per_gpu = raw_model.flops_per_token(T) * args.total_batch_size / d.world_size

    stop, timer, saved = StopSignal(), StepTimer(args.max_steps), None  # SIGTERM / Ctrl-C end the run with a save
    for step in range(start_step, args.max_steps + 1):
        last = step == args.max_steps  # the schedule is done: evaluate and save the final model
        # this run ends here (the run continues with --resume): --stop-at, or a signal
        # (--stop-at is a planned end: every rank knows it, so no signal is asked for and the exit status is 0)
        stopping = step == args.stop_at or stop.requested(d)
        if not stopping:
            evaluate(step, last, model, raw_model, val_data, hellaswag_examples, enc, args, d, dtype, tracker)
        # never at the step the run started from: step 0 has learned nothing, a resumed step is its checkpoint
        if step > start_step and (step % args.save_every == 0 or last or stopping):
            saved = save_on_rank0({"kind": "lm", "model": raw_model.state_dict(), "config": asdict(raw_model.config),
                                   "step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                   "loader": train_loader.state_dict(), "wandb_id": tracker.run_id, "args": vars(args)},
                                  step, args, d)
        if last or stopping:
            break

        # --- one optimizer step: grad_accum_steps micro-batches, their gradients summed. A comment "fp16:" or
        # "DDP:" says what a line adds in those runs; elsewhere it is the plain call named beside it.
        t0 = time.time()
        x_step, y_step = train_loader.next_step(d.rank, d.world_size)  # (B * grad_accum_steps, T)
        # the step's mean loss, for the step line only. Summed in float64 so that the order of the sum (ranks x
        # micro-steps) no longer shows in the printed digits; the micro-batch losses themselves can still differ
        # in their last bits with another split (MPS has no float64)
        loss_accum = torch.zeros((), device=d.device, dtype=torch.float32 if d.device_type == "mps" else torch.float64)
        for micro_step in range(grad_accum_steps):
            x = x_step[micro_step * B: (micro_step + 1) * B].to(d.device, non_blocking=True)  # (B, T)
            y = y_step[micro_step * B: (micro_step + 1) * B].to(d.device, non_blocking=True)
            if d.ddp:  # DDP
                # all-reduce the gradients only on the last micro-step. DDP reads this flag during the
                # forward pass (to prepare its hooks), so it must be set before the forward, not the backward.
                # (The flag no_sync() sets, set directly: one loop body for both kinds of micro-step.)
                model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
            with autocast(d.device_type, dtype):
                # [1]: only the loss is kept. The logits ([0], (B, T, vocab): 6 GiB at B=64 in bf16) are not
                # needed by backward and are freed now, instead of living through it
                loss = model(x, y)[1]
            # each micro-batch's loss is a mean over B*T tokens; dividing by the number of micro-steps makes
            # the summed gradient the gradient of the mean over the whole batch (DDP then averages the ranks)
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()  # = loss.backward(); fp16: the loss times the loss scale (grad_scaler)
        # DDP: the mean loss over ranks, for the step line and for check_finite to stop every rank alike. (The
        # gradients DDP averaged itself, bucket by bucket during the last micro-step's backward.)
        all_reduce_sum(loss_accum, d)
        loss_accum /= d.world_size
        scaler.unscale_(optimizer)  # fp16: divide the loss scale back out of the gradients before clipping them
        # clip the global gradient norm (one bad batch cannot throw the weights far); the norm before
        # clipping is worth watching: its spikes come before loss spikes
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        # a guard that only a diverging run trips: NaN/inf stops it before the update (and waits for the GPU)
        loss_value, norm_value = check_finite(loss_accum, norm, step, args.out_dir, scaler)
        lr = cosine_lr(step, args.max_lr, args.max_lr * args.min_lr_ratio, args.warmup_steps, args.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]  # lr_scale is 1 but for Muon's group: --muon-lr / --max-lr
        scaler.step(optimizer)  # = optimizer.step(); fp16: skipped when a gradient overflowed
        scaler.update()  # fp16: adjust the loss scale (otherwise nothing)
        optimizer.zero_grad(set_to_none=True)
        # the step's one wait for the GPU is in check_finite; it also waited for the previous step's update,
        # so in a steady run dt is one whole step
        dt = time.time() - t0
        if d.master:
            mfu = flops_per_step_per_gpu / dt / peak * 100 if peak else None
            print(f"step {step:5d} | loss {loss_value:.6f} | lr {lr:.4e} | norm {norm_value:.4f} | "
                  f"dt {dt * 1000:.1f}ms | tok/s {args.total_batch_size / dt:,.0f} (all GPUs) | "
                  f"MFU {f'{mfu:.1f}%' if mfu else 'n/a'} | "
                  f"eta {timer.eta(step, dt)}" + fp16_note(scaler, norm_value))
            append_log(args.out_dir, f"{step} train {loss_value:.6f}", lr=f"{lr:.4e}", norm=f"{norm_value:.4f}",
                       tok_s=f"{args.total_batch_size / dt:.0f}", mfu=f"{mfu:.2f}" if mfu else None)
            tracker.log(step, train_loss=loss_value, lr=lr, grad_norm=norm_value,
                        tokens_per_sec=args.total_batch_size / dt, mfu=mfu)

    tracker.finish()
    cleanup_distributed(d)
    return stop.close(step, saved, d)


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"train_gpt2.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C before StopSignal takes it, or a second one: at once, without a save
        print("train_gpt2.py: stopped (Ctrl-C); --resume auto continues from the last checkpoint", file=sys.stderr)
        sys.exit(130)  # the status a shell gives ^C (128 + SIGINT), as the other scripts
