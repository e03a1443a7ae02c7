"""
Speed measurements. Prints tables; asserts nothing (the tests check correctness, this file measures speed).

    python bench.py train --model gpt2 --batch-size 16 --seq-len 1024      # tokens/s and MFU, eager vs compile, fp32 vs bf16
    python bench.py caption --batch-size 32                                # caption training step, images/s
    python bench.py sample --model gpt2 --new-tokens 64 256                # KV cache vs recomputing the prefix
    python bench.py tokenize                                               # fineweb.py's tokenizer vs a plain pool
    python bench.py loader --shards 2 8                                    # loader memory vs number of shards
    python bench.py clip --batch-size 64                                   # CLIP feature extraction, images/s
    python bench.py gpu                                                    # everything an H100 run should record

MFU (model FLOPs utilisation) = the FLOPs the model needs per second / what the device could do: against the
datasheet's dense bf16 peak, and against a large bf16 matmul measured on the same device (the practical ceiling).
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from model import EOT_TOKEN, GPT, PRESETS, GPTConfig, is_cross_attn_param
from training import autocast, default_device, peak_flops


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, warmup, iters):
    """Seconds per call of fn, after warmup calls (compilation, allocator, caches)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / iters


def matmul_flops(device, dtype="bfloat16", n=8192):
    """FLOP/s of an n x n x n matmul: what this device really reaches, the ceiling MFU is read against."""
    if not device.startswith("cuda"):
        n = 2048
        dtype = "float32"
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    seconds = timed(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n**3 / seconds


def print_table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


# -----------------------------------------------------------------------------
# Language-model training step


def bench_train(args):
    device = args.device
    matmul_peak = matmul_flops(device)
    datasheet_peak = peak_flops(device)
    rows = []
    for use_compile in args.compile_modes:
        for dtype in args.dtypes:
            torch.manual_seed(0)
            config = {**PRESETS[args.model], "block_size": max(PRESETS[args.model].get("block_size", 1024), args.seq_len)}
            model = GPT(GPTConfig(**config)).to(device)
            optimizer = model.configure_optimizers(0.1, 6e-4, device.split(":")[0])
            step_model = torch.compile(model) if use_compile else model
            x = torch.randint(0, 50257, (args.batch_size, args.seq_len), device=device)

            def train_step():
                optimizer.zero_grad(set_to_none=True)
                with autocast(device.split(":")[0], dtype):
                    _, loss = step_model(x, x)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()

            seconds = timed(train_step, device, args.warmup, args.iters)
            tokens_per_sec = args.batch_size * args.seq_len / seconds
            flops = model.flops_per_token(args.seq_len) * tokens_per_sec
            rows.append([args.model, args.batch_size, args.seq_len, dtype, "compile" if use_compile else "eager",
                         f"{seconds * 1000:.1f}", f"{tokens_per_sec:,.0f}",
                         f"{flops / datasheet_peak * 100:.1f}%" if datasheet_peak else "n/a",
                         f"{flops / matmul_peak * 100:.1f}%"])
            del model, optimizer, step_model
    print_table(f"training step on {device_name(device)} (measured matmul peak {matmul_peak / 1e12:.1f} TFLOP/s)",
                ["model", "B", "T", "dtype", "mode", "ms/step", "tok/s", "MFU (datasheet)", "MFU (matmul)"], rows)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"


# -----------------------------------------------------------------------------
# Caption training step, with precomputed features


def bench_caption(args):
    device = args.device
    torch.manual_seed(0)
    model = GPT(GPTConfig(**PRESETS[args.model], cross_attn_every=2)).to(device)
    for name, p in model.named_parameters():  # the default fine-tuning: only the cross-attention path trains
        p.requires_grad = is_cross_attn_param(name)
    optimizer = model.configure_optimizers(0.01, 1e-4, device.split(":")[0])
    image_feats = torch.randn(args.batch_size, 50, 768, device=device).half()
    x = torch.randint(0, 50257, (args.batch_size, 16), device=device)  # COCO captions are ~12 tokens long
    dtype = args.dtypes[-1]

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device.split(":")[0], dtype):
            _, loss = model(x, x, image_feats=image_feats)
        loss.backward()
        optimizer.step()

    seconds = timed(train_step, device, args.warmup, args.iters)
    print_table(f"caption training step on {device_name(device)}", ["model", "images/step", "dtype", "ms/step", "images/s"],
                [[args.model, args.batch_size, dtype, f"{seconds * 1000:.1f}", f"{args.batch_size / seconds:,.1f}"]])


# -----------------------------------------------------------------------------
# Sampling


def bench_sample(args):
    device = args.device
    torch.manual_seed(0)
    model = GPT(GPTConfig(**PRESETS[args.model])).to(device).eval()
    prompt = torch.randint(0, EOT_TOKEN, (1, 16), device=device)
    rows = []
    for new_tokens in args.new_tokens:
        speeds = {}
        for use_cache in (True, False):
            # a random model rarely emits <|endoftext|>; the check below makes sure every token was generated
            run = lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
            seconds = timed(run, device, warmup=1, iters=1)
            assert run().size(1) == 16 + new_tokens
            speeds[use_cache] = new_tokens / seconds
        rows.append([args.model, new_tokens, f"{speeds[True]:,.1f}", f"{speeds[False]:,.1f}", f"{speeds[True] / speeds[False]:.1f}x"])
    print_table(f"generate, batch 1, on {device_name(device)}",
                ["model", "new tokens", "KV cache tok/s", "recompute tok/s", "speed-up"], rows)

    captioner = GPT(GPTConfig(**PRESETS[args.model], cross_attn_every=2)).to(device).eval()
    images = torch.randn(args.batch_size, 50, 768, device=device)
    start = torch.full((args.batch_size, 1), EOT_TOKEN, device=device)
    seconds = timed(lambda: captioner.beam_search(start, images, beam_size=3, max_new_tokens=20), device, 1, 1)
    print_table(f"beam search (beam 3, up to 20 tokens) on {device_name(device)}", ["model", "images", "captions/s"],
                [[args.model, args.batch_size, f"{args.batch_size / seconds:,.1f}"]])


# -----------------------------------------------------------------------------
# Tokenization


WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were their one all we can her has there been if more when will would who so no she other its "
         "learning students energy water history science cells children teachers school research development "
         "environment health community system process important different information example").split()


def synthetic_documents(n, seed=0):
    """English-like documents of about 4 KB, FineWeb-Edu's typical length."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(WORDS, rng.integers(6, 20))).capitalize() + "." for _ in range(40)]
        docs.append(" ".join(sentences))
    return docs


def encode_one(text):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    return np.array([EOT_TOKEN] + enc.encode_ordinary(text), dtype=np.uint16)


def bench_tokenize(args):
    import fineweb
    from multiprocessing import Pool
    docs = synthetic_documents(args.documents)
    n_proc = os.cpu_count()
    with Pool(n_proc) as pool:  # the straightforward way: one document per task
        t0 = time.perf_counter()
        baseline_tokens = sum(len(t) for t in pool.imap(encode_one, docs, chunksize=1))
        baseline = baseline_tokens / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()
        shards = fineweb.tokenize_to_shards(iter(docs), out_dir, shard_size=10**7, num_proc=n_proc)
        ours = sum(n for _, n in shards) / (time.perf_counter() - t0)
    print_table(f"tokenization, {args.documents} documents of ~4 KB, {n_proc} processes",
                ["method", "tok/s", "tok/s per core"],
                [["Pool.imap(encode_ordinary), 1 doc per task", f"{baseline:,.0f}", f"{baseline / n_proc:,.0f}"],
                 ["fineweb.tokenize_to_shards (incl. writing shards)", f"{ours:,.0f}", f"{ours / n_proc:,.0f}"]])


# -----------------------------------------------------------------------------
# Loader memory


def bench_loader(args):
    rows = []
    for n_shards in args.shards:
        with tempfile.TemporaryDirectory() as data_dir:
            for i in range(n_shards + 1):
                split = "val" if i == 0 else "train"
                tokens = np.random.default_rng(i).integers(0, 50257, args.shard_tokens, dtype=np.uint16)
                np.save(os.path.join(data_dir, f"bench_{split}_{i:06d}.npy"), tokens)
            # a fresh process per measurement: ru_maxrss is the peak of the whole process
            code = ("import resource, train_gpt2 as t\n"
                    f"loader = t.ShardLoader({data_dir!r}, B=16, T=1024)\n"
                    "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                    "for _ in range(200): loader.next_batch()\n"
                    "print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            before, after = (int(v) / 1024 for v in out.split())
            rows.append([n_shards, f"{n_shards * args.shard_tokens * 2 / 2**20:,.0f}", f"{before:,.0f}", f"{after:,.0f}"])
    print_table("ShardLoader host memory (B=16, T=1024, 200 batches)",
                ["train shards", "data MiB", "peak RSS after start MiB", "peak RSS after reading MiB"], rows)


# -----------------------------------------------------------------------------
# CLIP features


def bench_clip(args):
    """Decoding JPEGs (CPU work, spread over DataLoader workers in coco.py) against the ViT forward pass."""
    import io

    import coco
    from PIL import Image
    device = args.device
    clip_model, preprocess = coco.load_clip("ViT-B-32-quickgelu", "none", device)
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(args.batch_size):  # 640x480 JPEGs, COCO's usual size
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    decode = lambda: torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs])
    decode_seconds = timed(decode, "cpu", 1, 2)
    pixels = decode().to(device)
    with autocast(device.split(":")[0], args.dtypes[-1]):
        model_seconds = timed(lambda: coco.image_features(clip_model, pixels), device, 1, 3)
    print_table(f"CLIP ViT-B/32 features on {device_name(device)}", ["stage", "images/s"],
                [["JPEG decode + preprocess (1 process)", f"{args.batch_size / decode_seconds:,.1f}"],
                 ["ViT-B/32 forward", f"{args.batch_size / model_seconds:,.1f}"]])


# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "caption", "sample", "tokenize", "loader", "clip", "gpu"])
    p.add_argument("--model", default="gpt2", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--compile-modes", type=int, nargs="+", default=None, help="0 eager, 1 compile (default: both on CUDA)")
    p.add_argument("--dtypes", nargs="+", default=None, help="float32 and/or bfloat16 (default: both on CUDA)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256])
    p.add_argument("--documents", type=int, default=4000)
    p.add_argument("--shards", type=int, nargs="+", default=[2, 8])
    p.add_argument("--shard-tokens", type=int, default=20_000_000)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    args.device = default_device() if args.device == "auto" else args.device
    cuda = args.device.startswith("cuda")
    args.compile_modes = args.compile_modes or ([0, 1] if cuda else [0])
    args.dtypes = args.dtypes or (["float32", "bfloat16"] if cuda else ["float32"])
    torch.set_float32_matmul_precision("high")
    print(f"torch {torch.__version__} | {device_name(args.device)} | {time.strftime('%Y-%m-%d')}")
    if args.what == "gpu":  # the whole GPU record in one call
        for what in (bench_train, bench_caption, bench_sample, bench_clip):
            what(args)
    else:
        {"train": bench_train, "caption": bench_caption, "sample": bench_sample, "tokenize": bench_tokenize,
         "loader": bench_loader, "clip": bench_clip}[args.what](args)


if __name__ == "__main__":
    main()
