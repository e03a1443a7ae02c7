"""
Speed measurements. Prints tables; asserts nothing (the tests check correctness, this file measures speed).

    python bench.py train --model gpt2 --batch-size 16 --seq-len 1024      # tokens/s and MFU, eager vs compile, fp32 vs bf16
    python bench.py caption --batch-size 32                                # caption training step, images/s
    python bench.py sample --model gpt2 --new-tokens 64 256                # KV cache vs recomputing the prefix
    python bench.py generate --model gpt2                                  # ours eager / compiled vs transformers' generate
    python bench.py hellaswag --model gpt2                                 # HellaSwag scoring, 1 vs 16 examples/forward
    python bench.py tokenize                                               # fineweb.py's tokenizer vs a plain pool
    python bench.py loader --shards 2 8                                    # loader memory vs number of shards
    python bench.py clip --batch-size 64                                   # CLIP feature extraction, images/s
    python bench.py nanogpt                                                # our train_gpt2.py vs build-nanogpt's
    python bench.py gpu                                                    # all of the GPU record but nanogpt
    python bench.py recipe --data-dir data/shakespeare                     # AdamW vs Muon, rates, floors: val loss per token

MFU (model FLOPs utilisation) = the FLOPs the model needs per second / what the device could do: against the
datasheet's dense bf16 peak, and against a large bf16 matmul measured on the same device (the practical ceiling).
It is a per-device number: every benchmark here runs on the one device --device names, so the FLOP rate of
that device is divided by that device's peak (with N GPUs, a global FLOP rate would first be divided by N).

--device cuda:3 measures GPU 3: it becomes the current CUDA device, so that what names no device (a CUDA
context, a library's own torch.cuda calls) does not land on GPU 0, and the timers wait for GPU 3 itself.

`nanogpt` needs a clone of build-nanogpt, which is not part of this repository:

    git clone https://github.com/karpathy/build-nanogpt third_party/build-nanogpt     # git-ignored

On a GPU node without network: train_gpt2.py and the HellaSwag benchmark need GPT-2's BPE files, so copy a
tiktoken cache there and point TIKTOKEN_CACHE_DIR at it (see README.md); `gpu` skips CLIP, with a note, where
open_clip_torch is not installed.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from export_hf import save_pretrained
from generate import beam_search, compile_decode_step, generate, generate_tokens, gpt2_encoding
from model import EOT_TOKEN, GPT, PRESETS, GPTConfig, is_cross_attn_param
from training import (HelpFormatter, autocast, default_device, existing_device, non_negative_int, output_problem,
                      peak_flops, positive_float, positive_int, use_device)

ROOT = os.path.dirname(os.path.abspath(__file__))  # this repository: our train_gpt2.py, third_party/


def synchronize(device):
    """Wait for the GPU being measured: its kernels run asynchronously, so a timer read without waiting
    measures only how long they took to launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


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
            seconds = train_step_seconds(args, use_compile, dtype)  # and a profile, with --profile
            tokens_per_sec = args.batch_size * args.seq_len / seconds
            with torch.device("meta"):
                flops = GPT(model_config(args)).flops_per_token(args.seq_len) * tokens_per_sec
            # float32 on CUDA runs its matmuls in TF32 (set_float32_matmul_precision("high"), as training does)
            label = "float32 (tf32)" if dtype == "float32" and device.startswith("cuda") else dtype
            rows.append([args.model, args.batch_size, args.seq_len, label, "compile" if use_compile else "eager",
                         f"{seconds * 1000:.1f}", f"{tokens_per_sec:,.0f}",
                         f"{flops / datasheet_peak * 100:.1f}%" if datasheet_peak else "n/a",
                         f"{flops / matmul_peak * 100:.1f}%"])
    print_table(f"training step on {device_name(device)} (measured matmul peak {matmul_peak / 1e12:.1f} TFLOP/s; "
                f"compile mode {args.torch_compile_mode}, attention {args.sdpa_backend})",
                ["model", "B", "T", "dtype", "mode", "ms/step", "tok/s", "MFU (datasheet)", "MFU (matmul)"], rows)


def model_config(args):
    preset = PRESETS[args.model]
    return GPTConfig(**{**preset, "block_size": max(preset.get("block_size", 1024), args.seq_len)})


def train_step_seconds(args, use_compile, dtype):
    """Seconds per optimizer step (forward, backward, clipping, AdamW) on one fixed random batch.
    --torch-compile-mode and --sdpa-backend try what train_gpt2.py does not do (yet): torch.compile's other
    modes (max-autotune searches matmul kernels; reduce-overhead replays CUDA graphs) and one attention kernel
    in place of SDPA's own choice (cudnn, flash, efficient, math)."""
    device, device_type = args.device, args.device.split(":")[0]
    torch.manual_seed(0)
    model = GPT(model_config(args)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, device_type)
    step_model = torch.compile(model, mode=args.torch_compile_mode) if use_compile else model
    x = torch.randint(0, EOT_TOKEN + 1, (args.batch_size, args.seq_len), device=device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with attention_backend(args.sdpa_backend), autocast(device_type, dtype):
            _, loss = step_model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    seconds = timed(train_step, device, args.warmup, args.iters)
    if args.profile:
        print_profile(train_step, device, f"{dtype}, {'compile' if use_compile else 'eager'}")
    return seconds


# SDPA's kernels that exist on CUDA only, and those that have no float32 version there (FlashAttention and
# cuDNN attention take bf16/fp16 inputs only). Forced with sdpa_kernel, SDPA does not fall back to another
# kernel: it raises "No available kernel".
CUDA_ONLY_BACKENDS = ("cudnn", "efficient")
HALF_PRECISION_BACKENDS = ("flash", "cudnn")


def check_sdpa_backend(backend, device, dtypes):
    """Refuse an attention kernel that cannot run one of the requested rows, before any model is built."""
    cuda = device.startswith("cuda")
    if backend in CUDA_ONLY_BACKENDS and not cuda:
        raise ValueError(f"--sdpa-backend {backend}: a CUDA kernel, not available on {device} (flash and math are)")
    if backend in HALF_PRECISION_BACKENDS and cuda and "float32" in dtypes:
        raise ValueError(f"--sdpa-backend {backend}: has no float32 kernel on CUDA; pass --dtypes bfloat16")


def attention_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if name == "auto":
        return contextlib.nullcontext()
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name])


def print_profile(step, device, title, steps=3, rows=15):
    """Where a step's time goes: the operators (CPU) or kernels (CUDA) that take the most of it."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    print(f"\nprofile of {steps} steps, {title}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=rows, max_name_column_width=60))


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
    x = torch.randint(0, 50257, (args.batch_size, 16), device=device)  # 16: the shortest length caption_batch pads to
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
            run = lambda: generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
            seconds = timed(run, device, warmup=1, iters=1)
            assert run().size(1) == 16 + new_tokens
            speeds[use_cache] = new_tokens / seconds
        rows.append([args.model, new_tokens, f"{speeds[True]:,.1f}", f"{speeds[False]:,.1f}", f"{speeds[True] / speeds[False]:.1f}x"])
    print_table(f"generate, batch 1, on {device_name(device)}",
                ["model", "new tokens", "KV cache tok/s", "recompute tok/s", "speed-up"], rows)

    captioner = GPT(GPTConfig(**PRESETS[args.model], cross_attn_every=2)).to(device).eval()
    images = torch.randn(args.batch_size, 50, 768, device=device)
    start = torch.full((args.batch_size, 1), EOT_TOKEN, device=device)
    seconds = timed(lambda: beam_search(captioner, start, images, beam_size=3, max_new_tokens=20), device, 1, 1)
    print_table(f"beam search (beam 3, up to 20 tokens) on {device_name(device)}", ["model", "images", "captions/s"],
                [[args.model, args.batch_size, f"{args.batch_size / seconds:,.1f}"]])


# -----------------------------------------------------------------------------
# Generation against transformers' generate

GENERATE_PROMPT_TOKENS = 16


def bench_generate(args):
    """Greedy decoding of the same random weights by ours (eager, then with the compiled decode step) and by
    transformers' generate, each batch size x number of new tokens, the three alternating --repeats times
    (medians reported); every run's tokens are checked against ours eager. A step makes one token per row:
    the first 100 steps include the prompt's, the last 100 show whether a step slows down as the cache fills."""
    try:
        import transformers  # the reference implementation: a test-only dependency
    except ImportError:
        raise ImportError("bench.py generate compares with transformers: pip install -r requirements-dev.txt") from None
    device = args.device
    torch.manual_seed(0)
    model = GPT(GPTConfig(**PRESETS[args.model])).to(device).eval()
    longest = GENERATE_PROMPT_TOKENS + max(args.new_tokens)
    if longest > model.config.block_size:
        raise ValueError(f"--new-tokens {max(args.new_tokens)} + a {GENERATE_PROMPT_TOKENS}-token prompt exceed "
                         f"{args.model}'s block_size {model.config.block_size}")
    with tempfile.TemporaryDirectory() as folder:  # the same weights, through our Hugging Face export
        save_pretrained(model, folder)
        reference = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    compiled_step = compile_decode_step(model)  # used only when switched on below; compiles on first use
    bandwidth = memory_bandwidth(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{args.model}, float32 | measured memory bandwidth {bandwidth / 1e9:.0f} GB/s: reading the weights "
          f"({weight_bytes / 1e6:.0f} MB) once per step takes at least {weight_bytes / bandwidth * 1000:.1f} ms")

    def ours(prompt, n, use_compile):
        model.compiled_step = compiled_step if use_compile else None
        return step_times(generate_tokens(model, prompt, n, temperature=0), device)

    def theirs(prompt, n):
        timestamps = StepTimes(device)
        out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                                 eos_token_id=EOT_TOKEN, pad_token_id=EOT_TOKEN,
                                 stopping_criteria=transformers.StoppingCriteriaList([timestamps]))
        return out[:, prompt.size(1):], timestamps.seconds()

    runs = {"ours, eager": lambda p, n: ours(p, n, False), "ours, compiled step": lambda p, n: ours(p, n, True),
            "transformers": theirs}
    rows = []
    for batch_size in args.batch_sizes:
        for n in args.new_tokens:
            prompt = torch.randint(0, EOT_TOKEN, (batch_size, GENERATE_PROMPT_TOKENS), device=device)
            started = time.perf_counter()
            ours(prompt, n, True)  # compiles the step for this (batch size, length): not timed below
            compile_seconds = time.perf_counter() - started
            results = {name: [] for name in runs}
            for repeat in range(args.repeats):
                names = list(runs)[repeat % 3:] + list(runs)[:repeat % 3]  # each goes first in turn
                for name in names:
                    results[name].append(runs[name](prompt, n))
            expected = results["ours, eager"][0][0]
            for name, measured in results.items():
                rows.append(generate_row(batch_size, n, name, measured, expected, results["transformers"]))
            print(f"batch {batch_size}, {n} new tokens: the compiled step's first run took {compile_seconds:.1f} s "
                  f"(its compile: {compiled_step.compiled[(batch_size, GENERATE_PROMPT_TOKENS + n)]:.1f} s)", flush=True)
    print_table(f"greedy generation, {args.model} (random weights), {GENERATE_PROMPT_TOKENS}-token prompt, "
                f"median of {args.repeats}, on {device_name(device)}",
                ["batch", "new tokens", "implementation", "s", "tok/s", "vs transformers", "ms/step first 100",
                 "ms/step last 100", "same tokens"], rows)


def generate_row(batch_size, n, name, measured, expected, reference_runs):
    """One table row: the median run's numbers. measured: [(tokens (B, n), seconds of each step)] per repeat."""
    median = lambda values: float(np.median(values))
    seconds = median([sum(steps) for _, steps in measured])
    reference_seconds = median([sum(steps) for _, steps in reference_runs])
    same = all(tokens.shape == expected.shape and torch.equal(tokens.cpu(), expected.cpu()) for tokens, _ in measured)
    steps = len(measured[0][1])
    return [batch_size, n if steps == n else f"{steps} of {n} (all rows ended)", name, f"{seconds:.1f}",
            f"{batch_size * steps / seconds:,.1f}", f"{reference_seconds / seconds:.2f}x",
            f"{median([np.mean(s[:100]) for _, s in measured]) * 1000:.1f}",
            f"{median([np.mean(s[-100:]) for _, s in measured]) * 1000:.1f}", "yes" if same else "NO"]


class StepTimes:
    """Seconds of each generation step, from the moment of creation. Given to transformers' generate as a
    stopping criterion, which it calls once per step with the tokens so far; it never stops anything."""

    def __init__(self, device):
        self.device = device
        self.times = [time.perf_counter()]

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)

    def seconds(self):
        return [b - a for a, b in zip(self.times, self.times[1:])]


def step_times(new_tokens, device):
    """Run a generate_tokens iterator -> (its tokens (B, n), seconds of each step)."""
    timestamps = StepTimes(device)
    tokens = []
    for token in new_tokens:
        tokens.append(token)
        timestamps(token, None)
    return torch.cat(tokens, dim=1), timestamps.seconds()


def memory_bandwidth(device, megabytes=512):
    """Bytes per second a large copy moves (read + write): how fast a step can at best read the weights."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), device, warmup=2, iters=5)
    return 2 * source.numel() * 4 / seconds


# -----------------------------------------------------------------------------
# HellaSwag evaluation


def bench_hellaswag(args):
    """Examples scored per second, one example (4 rows) per forward pass against --batch-size examples."""
    import hellaswag
    rng = np.random.default_rng(0)
    sentence = lambda n: " ".join(rng.choice(WORDS, n))
    # HellaSwag's shape: a context of ~40 words and four endings of ~20 (random words: speed does not care)
    examples = [{"ctx": sentence(40).capitalize() + ".", "endings": [sentence(20) + "." for _ in range(4)],
                 "label": int(rng.integers(4))} for _ in range(args.examples)]
    torch.manual_seed(0)
    model = GPT(model_config(args)).to(args.device)
    dtype = args.dtypes[-1]
    rows = []
    for batch_size in (1, args.batch_size):
        run = lambda: hellaswag.evaluate(model, examples, args.device, autocast_dtype=dtype, batch_size=batch_size)
        seconds = timed(run, args.device, warmup=1, iters=1)
        rows.append([args.model, dtype, batch_size, f"{len(examples) / seconds:,.1f}"])
    print_table(f"HellaSwag scoring, {len(examples)} examples, on {device_name(args.device)}",
                ["model", "dtype", "examples per forward", "examples/s"], rows)


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
    return np.array([EOT_TOKEN] + gpt2_encoding().encode_ordinary(text), dtype=np.uint16)


def bench_tokenize(args):
    import fineweb
    from multiprocessing import Pool
    docs = synthetic_documents(args.documents)
    n_proc = os.cpu_count()

    def baseline():  # the straightforward way: one document per task (the pool's start-up is not timed)
        with Pool(n_proc) as pool:
            t0 = time.perf_counter()
            n_tokens = sum(len(t) for t in pool.imap(encode_one, docs, chunksize=1))
            return n_tokens / (time.perf_counter() - t0)

    def ours():  # everything: starting its pool, tokenizing, writing the shards
        with tempfile.TemporaryDirectory() as out_dir:
            t0 = time.perf_counter()
            shards = fineweb.tokenize_to_shards(iter(docs), out_dir, shard_size=10**7, num_proc=n_proc)
            return sum(n for _, n in shards) / (time.perf_counter() - t0)

    # alternated and repeated: other work on a small machine would otherwise favour whichever ran second
    runs = [(baseline(), ours()) for _ in range(args.repeats)]
    base, mine = (float(np.median(column)) for column in zip(*runs))
    print_table(f"tokenization, {args.documents} documents of ~4 KB, {n_proc} processes, median of {args.repeats}",
                ["method", "tok/s", "tok/s per core", "vs baseline"],
                [["Pool.imap(encode_ordinary), 1 doc per task", f"{base:,.0f}", f"{base / n_proc:,.0f}", "1.00x"],
                 ["fineweb.tokenize_to_shards (incl. writing shards)", f"{mine:,.0f}", f"{mine / n_proc:,.0f}",
                  f"{mine / base:.2f}x"]])


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
    encoder = coco.load_encoder("ViT-B-32-quickgelu", "none", device)
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(args.batch_size):  # 640x480 JPEGs, COCO's usual size
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    decode = lambda: torch.stack([encoder.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs])
    decode_seconds = timed(decode, "cpu", 1, 2)
    pixels = decode().to(device)
    with autocast(device.split(":")[0], args.dtypes[-1]):
        model_seconds = timed(lambda: encoder(pixels), device, 1, 3)
    print_table(f"CLIP ViT-B/32 features on {device_name(device)}", ["stage", "images/s"],
                [["JPEG decode + preprocess (1 process)", f"{args.batch_size / decode_seconds:,.1f}"],
                 ["ViT-B/32 forward", f"{args.batch_size / model_seconds:,.1f}"]])


# -----------------------------------------------------------------------------
# Against build-nanogpt: both training scripts run as users run them, on the same shards and the same device

REFERENCE_HELLASWAG_STUB = """# bench.py: stands in for build-nanogpt's hellaswag.py, which needs transformers and the network.
# With compile on, its train_gpt2.py never evaluates HellaSwag; with it off (small CPU trials) it scores this
# one dummy example at the first and the last step, both outside the steps that are timed.
import torch

def iterate_examples(split):
    yield {}

def render_example(example):
    tokens = torch.zeros(4, 8, dtype=torch.long)
    mask = torch.ones(4, 8, dtype=torch.long)
    return None, tokens, mask, 0
"""


# the per-step lines each script prints, as "step N | ... tok/s"
REFERENCE_STEP_LINE = r"step\s+(\d+) \| loss: .*\| tok/sec: ([\d.]+)"
OUR_STEP_LINE = r"step\s+(\d+) \| loss .*\| tok/s ([\d,]+)"


def patch_reference(source, settings):
    """Set each `name = value` line of build-nanogpt's train_gpt2.py (a script without command-line options).
    Each line must be found exactly once: a changed upstream file fails here, instead of quietly measuring
    something else."""
    for pattern, replacement in settings:
        source, n = re.subn(pattern, replacement, source, flags=re.MULTILINE)
        if n != 1:
            raise ValueError(f"build-nanogpt's train_gpt2.py: expected one line matching {pattern!r}, found {n}")
    return source


def step_speeds(output, pattern):
    """{step: tok/s} from a training script's per-step lines."""
    return {int(step): float(speed.replace(",", "")) for step, speed in re.findall(pattern, output)}


def run_script(command, cwd, name, env):
    """Run a training script to the end and return what it printed. RANK, LOCAL_RANK and WORLD_SIZE are
    removed from its environment: both scripts take them as the sign of a torchrun launch, and bench.py run
    under torchrun by mistake must not turn a one-GPU measurement into a DDP one."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env = inherited | env | {"PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def one_visible_device(device):
    """(device name, environment) for a child process that may see only `device`. build-nanogpt's script takes
    "cuda" (that is, cuda:0) whenever there is a GPU, whatever we would like; so each script is shown only the
    GPU that --device names, as its cuda:0. On the CPU, build-nanogpt's choice is overridden in its copy."""
    if not device.startswith("cuda"):
        return device, {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return "cuda", {"CUDA_VISIBLE_DEVICES": ids[torch.device(device).index or 0]}


def check_nanogpt_args(args, config):
    """Refuse settings that one of the two scripts would refuse, before minutes are spent running the other."""
    B, T, total = args.batch_size, args.seq_len, args.total_batch_size
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ValueError(f"--device {args.device}: the comparison runs on cuda or cpu")
    if T > config.block_size:
        raise ValueError(f"--seq-len {T} exceeds {args.model}'s block_size {config.block_size}")
    if total % (B * T):
        raise ValueError(f"--total-batch-size {total} is not a multiple of --batch-size x --seq-len = {B * T}")
    if args.steps < args.warmup + 3:
        raise ValueError(f"--steps {args.steps}: need at least --warmup ({args.warmup}) + 3 steps to time any")


def write_synthetic_shards(data_dir, B, T, total, steps):
    """Random tokens (speed does not depend on the text) under build-nanogpt's names, edufineweb_{split}_{i}.npy,
    which our *_train_*.npy pattern also reads; one train shard long enough that neither script changes shards."""
    os.makedirs(data_dir)
    rng = np.random.default_rng(0)
    for name, n_tokens in (("val_000000", 20 * B * T + 1), ("train_000001", (steps + 1) * total + 1)):
        tokens = rng.integers(0, EOT_TOKEN + 1, n_tokens, dtype=np.uint16)
        np.save(os.path.join(data_dir, f"edufineweb_{name}.npy"), tokens)


def write_reference_copy(reference, work, args, config, device, use_compile):
    """build-nanogpt's train_gpt2.py with our settings, and the HellaSwag stub beside it, into work/."""
    with open(reference) as f:
        source = patch_reference(f.read(), [
            (r"^use_compile = False\b", f"use_compile = {use_compile}"),
            (r"^max_steps = \d+", f"max_steps = {args.steps}"),
            (r"^B = \d+", f"B = {args.batch_size}"),
            (r"^T = \d+", f"T = {args.seq_len}"),
            (r"^total_batch_size = \d+", f"total_batch_size = {args.total_batch_size}"),
            (r"^model = GPT\(GPTConfig\(vocab_size=50304\)\)",
             f"model = GPT(GPTConfig(vocab_size=50304, block_size={config.block_size}, "
             f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}))"),
            # sampling, at the last step only when compile is off: skipped, as a barely trained model may pick
            # one of the 47 padding tokens past 50256, which tiktoken cannot decode (and nothing here is timed)
            (r"^    if \(\(step > 0 and step % 250 == 0\) or last_step\) and \(not use_compile\):",
             "    if False:  # bench.py: no sampling"),
            (r'^    print\(f"using device: \{device\}"\)',
             f'    device = "{device}"  # set by bench.py\n    print(f"using device: {{device}}")'),
        ])
    with open(os.path.join(work, "train_gpt2.py"), "w") as f:
        f.write(source)
    with open(os.path.join(work, "hellaswag.py"), "w") as f:
        f.write(REFERENCE_HELLASWAG_STUB)


def our_command(args, data_dir, out_dir, device, use_compile):
    B, T = args.batch_size, args.seq_len
    return [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data-dir", data_dir, "--out-dir", out_dir,
            "--model", args.model, "--batch-size", str(B), "--seq-len", str(T),
            "--total-batch-size", str(args.total_batch_size), "--max-steps", str(args.steps),
            "--eval-every", "0", "--val-tokens", str(B * T), "--hellaswag-every", "0", "--sample-every", "0",
            "--dtype", "bfloat16", "--compile" if use_compile else "--no-compile", "--device", device]


def bench_nanogpt(args):
    """build-nanogpt's train_gpt2.py, then ours, each training for --steps steps on the same synthetic shards
    with the same model, batch and precision: bf16 autocast, torch.compile on CUDA. Compares the median tok/s
    each prints, leaving out the first steps (compilation) and the last (build-nanogpt's includes a val loss
    and a checkpoint). One run of each, not alternated: each compiles a model for a minute or more, and the
    GPU, unlike a shared CPU, is ours alone for the call."""
    reference = os.path.join(args.reference, "train_gpt2.py")
    if not os.path.isfile(reference):
        raise FileNotFoundError(f"{reference}: no such file. build-nanogpt is not part of this repository; get it "
                                f"with: git clone https://github.com/karpathy/build-nanogpt {args.reference}")
    config = GPTConfig(**PRESETS[args.model])  # the model our train_gpt2.py builds for --model
    check_nanogpt_args(args, config)
    use_compile = 1 in args.compile_modes  # default: both scripts compiled on CUDA, eager on CPU
    device, env = one_visible_device(args.device)
    B, T, total, steps = args.batch_size, args.seq_len, args.total_batch_size, args.steps
    with tempfile.TemporaryDirectory() as work:
        data_dir = os.path.join(work, "edu_fineweb10B")  # build-nanogpt reads ./edu_fineweb10B
        write_synthetic_shards(data_dir, B, T, total, steps)
        write_reference_copy(reference, work, args, config, device, use_compile)
        print(f"running build-nanogpt ({steps} steps)...", flush=True)
        theirs = step_speeds(run_script([sys.executable, "train_gpt2.py"], work, "build-nanogpt's train_gpt2.py", env),
                             REFERENCE_STEP_LINE)
        print(f"running ours ({steps} steps)...", flush=True)
        command = our_command(args, data_dir, os.path.join(work, "ours"), device, use_compile)
        ours = step_speeds(run_script(command, ROOT, "our train_gpt2.py", env),
                           OUR_STEP_LINE)

    timed_steps = range(args.warmup, steps - 1)
    missing = [s for s in timed_steps if s not in theirs or s not in ours]
    if missing:
        raise RuntimeError(f"no tok/s printed for steps {missing} (did a script's output format change?)")
    with torch.device("meta"):  # FLOPs only: no memory for the weights
        flops_per_token = GPT(config).flops_per_token(T)
    datasheet_peak, matmul_peak = peak_flops(args.device), matmul_flops(args.device)
    median = {name: float(np.median([speeds[s] for s in timed_steps]))
              for name, speeds in (("build-nanogpt train_gpt2.py", theirs), ("this repo's train_gpt2.py", ours))}
    rows = []
    for name, tokens_per_sec in median.items():
        flops = flops_per_token * tokens_per_sec
        rows.append([name, f"{tokens_per_sec:,.0f}", f"{tokens_per_sec / median['build-nanogpt train_gpt2.py']:.2f}x",
                     f"{flops / datasheet_peak * 100:.1f}%" if datasheet_peak else "n/a",
                     f"{flops / matmul_peak * 100:.1f}%"])
    print_table(f"training, {args.model}, B={B}, T={T}, {total:,} tokens/step, bf16, compile={use_compile}, "
                f"{device_name(args.device)}, median of steps {timed_steps.start}-{timed_steps.stop - 1} "
                f"(measured matmul peak {matmul_peak / 1e12:.1f} TFLOP/s)",
                ["script", "tok/s", "vs build-nanogpt", "MFU (datasheet)", "MFU (matmul)"], rows)


# -----------------------------------------------------------------------------


RECIPE_REFERENCE = ("adamw", 6e-4, 0.1)  # build-nanogpt's recipe: every arm's speed-up is measured against it


def recipe_arms(args):
    """(optimizer, peak rate, floor) of every run: each optimizer at each rate, each with each floor."""
    return [(optimizer, lr, floor) for optimizer, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs))
            for lr in lrs for floor in args.floors]


def recipe_command(args, arm, out_dir):
    """train_gpt2.py as a user runs it, for one arm. Muon's arms give the AdamW part (embeddings, vectors) the
    same rate: with match_rms_adamw both rates mean the same thing."""
    optimizer, lr, floor = arm
    return [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data-dir", args.data_dir, "--out-dir", out_dir,
            "--model", args.model, "--n-layer", str(args.n_layer), "--n-head", str(args.n_head), "--n-embd",
            str(args.n_embd), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--total-batch-size", str(args.total_batch_size), "--max-steps", str(args.steps),
            "--warmup-steps", str(args.warmup_steps), "--optimizer", optimizer, "--max-lr", str(lr),
            "--muon-lr", str(lr), "--min-lr-ratio", str(floor), "--eval-every", str(args.eval_every),
            "--val-tokens", str(args.val_tokens), "--hellaswag-every", "0", "--sample-every", "0",
            "--save-every", str(args.steps), "--keep-last", "1", "--device", args.device, "--seed", "1337"]


def tokens_to_reach(curve, target, tokens_per_step):
    """Tokens of training after which the val loss is first <= target (None if never)."""
    return next((step * tokens_per_step for step, loss in sorted(curve.items()) if loss <= target), None)


def bench_recipe(args):
    """Which optimizer settings reach a val loss in the fewest tokens. Every arm trains the same model on the
    same data, in the same order, from the same initial weights, for the same tokens, through train_gpt2.py;
    the val loss every --eval-every steps is its curve. The reference is build-nanogpt's recipe (AdamW 6e-4,
    floor 0.1): the tokens it needs to reach its own final val loss, over the tokens each arm needs, is that
    arm's speed-up; ms/step beside it says what Newton-Schulz costs in time."""
    check_recipe(args)
    curves, ms_per_step = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for arm in recipe_arms(args):
            out_dir = os.path.join(work, "_".join(map(str, arm)))
            output = run_script(recipe_command(args, arm, out_dir), ROOT, f"train_gpt2.py {arm}", {})
            with open(os.path.join(out_dir, "log.txt")) as f:
                curves[arm] = {int(step): float(v) for step, kind, v in (line.split() for line in f) if kind == "val"}
            dts = [float(dt) for dt in re.findall(r"\| dt ([\d.]+)ms", output)][2:]  # past the first steps
            ms_per_step[arm] = sorted(dts)[len(dts) // 2] if dts else float("nan")
            print(f"{arm[0]} lr {arm[1]:g} floor {arm[2]:g}: final val {curves[arm][args.steps]:.4f}, "
                  f"{ms_per_step[arm]:.0f} ms/step", flush=True)
    target = curves[RECIPE_REFERENCE][args.steps]
    reference_tokens = tokens_to_reach(curves[RECIPE_REFERENCE], target, args.total_batch_size)
    rows = []
    for arm, curve in curves.items():
        tokens = tokens_to_reach(curve, target, args.total_batch_size)
        speedup = f"{reference_tokens / tokens:.2f}x" if tokens else "never"
        rows.append((arm[0], f"{arm[1]:g}", f"{arm[2]:g}", f"{curve[args.steps]:.4f}", f"{tokens:,}" if tokens else "-",
                     speedup, f"{ms_per_step[arm]:.0f}"))
    print_table(f"val loss after {args.steps} steps x {args.total_batch_size:,} tokens; target = the reference's "
                f"final {target:.4f}", ["optimizer", "peak lr", "floor", "final val", "tokens to target",
                                        "speed-up", "ms/step"], rows)
    if args.out:
        record = {"args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))},
                  "curves": [{"optimizer": a[0], "lr": a[1], "floor": a[2], "val": curve, "ms_per_step": ms_per_step[a]}
                             for a, curve in curves.items()]}
        figure = recipe_figure_path(args.out)
        with open(args.out + ".tmp", "w") as f:  # then renamed: a kill mid-write never leaves half a file
            json.dump(record, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        recipe_figure(record).savefig(figure + ".tmp", format="png", dpi=110)
        os.replace(figure + ".tmp", figure)
        print(f"curves written to {args.out}, drawn in {figure}")


def check_recipe(args):
    """What would stop the comparison at its end, after hours of training runs, is refused before the first."""
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"{args.data_dir}: no such data folder (fineweb.py --local-files ... --out-dir it)")
    if RECIPE_REFERENCE not in recipe_arms(args):
        raise ValueError("the reference arm (adamw, 6e-4, floor 0.1) must be among the arms: --adamw-lrs and "
                         "--floors must include 6e-4 and 0.1")
    if not args.out:
        return
    figure = recipe_figure_path(args.out)
    if figure == args.out:
        raise ValueError(f"--out {args.out}: is where the curves' figure goes; name the JSON .json")
    for path in (args.out, figure):
        problem = output_problem(path)
        if problem:
            raise ValueError(f"--out {path}: {problem}")
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("--out also draws the curves, with matplotlib: pip install matplotlib")


def recipe_figure_path(out):
    return os.path.splitext(out)[0] + ".png"


def recipe_figure(record):
    """bench.py recipe's record -> a Figure of val loss against tokens: every arm faint, the reference and the
    best arm of each optimizer (lowest final val loss) bold; Muon solid, AdamW dashed."""
    from matplotlib.figure import Figure
    tokens_per_step = record["args"]["total_batch_size"]
    arms = record["curves"]
    final = lambda arm: arm["val"][max(arm["val"], key=int)]
    best = [min((a for a in arms if a["optimizer"] == name), key=final) for name in ("adamw", "muon")
            if any(a["optimizer"] == name for a in arms)]
    reference = [a for a in arms if (a["optimizer"], a["lr"], a["floor"]) == ("adamw", 6e-4, 0.1)]
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    for arm in arms:
        steps = sorted(arm["val"], key=int)
        bold = arm in best or arm in reference
        role = " (reference)" if arm in reference else " (best)" if bold else ""
        ax.plot([int(s) * tokens_per_step for s in steps], [arm["val"][s] for s in steps], lw=2 if bold else 0.8,
                alpha=1 if bold else 0.35, ls="-" if arm["optimizer"] == "muon" else "--",
                label=f"{arm['optimizer']} {arm['lr']:g}, floor {arm['floor']:g}{role}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("val loss")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))  # the first evaluations (~10.8) would flatten the rest
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return figure


BENCHMARKS = {"train": bench_train, "caption": bench_caption, "sample": bench_sample, "generate": bench_generate,
              "hellaswag": bench_hellaswag,
              "tokenize": bench_tokenize, "loader": bench_loader, "clip": bench_clip, "nanogpt": bench_nanogpt,
              "recipe": bench_recipe}
DEFAULT_BATCH_SIZE = {"train": 16, "caption": 32, "sample": 4, "hellaswag": 16, "clip": 64,
                      "nanogpt": 64}  # nanogpt: build-nanogpt's own B


def default_dtypes(args):
    """float32 (as TF32) and bf16 on CUDA, where a forced attention kernel allows float32; float32 elsewhere."""
    if not args.device.startswith("cuda"):
        return ["float32"]
    if args.what in ("train", "gpu") and args.sdpa_backend in HALF_PRECISION_BACKENDS:
        return ["bfloat16"]
    return ["float32", "bfloat16"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("what", choices=[*BENCHMARKS, "gpu"], help="the benchmark (see the top of this file)")
    p.add_argument("--model", default="gpt2", choices=sorted(PRESETS), help="model size preset")
    p.add_argument("--batch-size", type=positive_int, help=f"default per benchmark: {DEFAULT_BATCH_SIZE}")
    p.add_argument("--seq-len", type=positive_int, default=1024, help="tokens per row (T)")
    p.add_argument("--compile-modes", type=int, nargs="+", choices=[0, 1], default=None,
                   help="0 eager, 1 compile (default: both on CUDA; nanogpt compiles when 1 is among them)")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=None,
                   help="float32 (TF32 matmuls on CUDA) and/or bfloat16 (default: both on CUDA, but bfloat16 "
                        "alone with --sdpa-backend flash or cudnn)")
    p.add_argument("--torch-compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode, where a benchmark compiles")
    p.add_argument("--sdpa-backend", default="auto", choices=["auto", "flash", "cudnn", "efficient", "math"],
                   help="train: force one attention kernel (auto: SDPA picks)")
    p.add_argument("--profile", action="store_true", help="train: also print the top operators/kernels of a step")
    p.add_argument("--warmup", type=non_negative_int, default=5,
                   help="untimed iterations (nanogpt: untimed first steps)")
    p.add_argument("--iters", type=positive_int, default=10, help="timed iterations")
    p.add_argument("--new-tokens", type=positive_int, nargs="+", help="sample: default 64 256; generate: 128 900")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8], help="generate: rows decoded at once")
    p.add_argument("--examples", type=positive_int, default=256, help="hellaswag: examples to score")
    p.add_argument("--documents", type=positive_int, default=20000, help="tokenize: synthetic documents of ~4 KB")
    p.add_argument("--repeats", type=positive_int, default=3, help="tokenize, generate: runs, the median reported")
    p.add_argument("--shards", type=positive_int, nargs="+", default=[2, 8], help="loader: shard counts to try")
    p.add_argument("--shard-tokens", type=positive_int, default=20_000_000, help="loader: tokens per shard")
    p.add_argument("--reference", default=os.path.join(ROOT, "third_party", "build-nanogpt"),
                   help="a clone of karpathy/build-nanogpt")
    p.add_argument("--steps", type=positive_int, default=20, help="nanogpt: optimizer steps each script runs")
    p.add_argument("--total-batch-size", type=positive_int, default=524288, help="nanogpt: tokens per step (2**19)")
    p.add_argument("--device", default="auto", type=existing_device,
                   help="auto (cuda, then mps, then cpu), or e.g. cuda:1")
    recipe = p.add_argument_group("recipe", "the optimizer comparison (defaults: a size this 2-core CPU runs)")
    recipe.add_argument("--data-dir", default="data/shakespeare", help="tokenized real text (fineweb.py --local-files)")
    recipe.add_argument("--n-layer", type=positive_int, default=4, help="blocks")
    recipe.add_argument("--n-head", type=positive_int, default=4, help="heads")
    recipe.add_argument("--n-embd", type=positive_int, default=128, help="width")
    recipe.add_argument("--adamw-lrs", type=positive_float, nargs="+", default=[6e-4, 1.8e-3, 3.6e-3],
                        help="AdamW's peak rates, one arm each")
    recipe.add_argument("--muon-lrs", type=positive_float, nargs="+", default=[6e-4, 1.8e-3, 3.6e-3],
                        help="Muon's peak rates, one arm each")
    recipe.add_argument("--floors", type=float, nargs="+", default=[0.1, 0.0], help="--min-lr-ratio values")
    recipe.add_argument("--warmup-steps", type=non_negative_int, default=30, help="linear warmup steps")
    recipe.add_argument("--eval-every", type=positive_int, default=25, help="val loss every N steps")
    recipe.add_argument("--val-tokens", type=positive_int, default=16384, help="val loss over this many tokens")
    recipe.add_argument("--out", help="write every arm's val curve to this JSON file")
    args = p.parse_args(argv)
    args.device = default_device() if args.device == "auto" else args.device
    cuda = args.device.startswith("cuda")
    args.compile_modes = args.compile_modes or ([0, 1] if cuda else [0])
    args.dtypes = args.dtypes or default_dtypes(args)
    args.new_tokens = args.new_tokens or ([128, 900] if args.what == "generate" else [64, 256])
    if args.what in ("train", "gpu"):  # the benchmarks that use --sdpa-backend
        check_sdpa_backend(args.sdpa_backend, args.device, args.dtypes)
    if args.what in ("hellaswag", "tokenize", "gpu"):  # they tokenize: offline without GPT-2's files, stop now
        gpt2_encoding()
    use_device(args.device)
    torch.set_float32_matmul_precision("high")
    print(f"torch {torch.__version__} | {device_name(args.device)} | {time.strftime('%Y-%m-%d')}", flush=True)
    # gpu: the GPU record, in one device call of a few minutes. nanogpt is a second call: it compiles and
    # trains two 124M models, and the two together could outlast a 10-minute slot.
    for what in ["train", "caption", "sample", "hellaswag", "clip"] if args.what == "gpu" else [args.what]:
        batch_size = args.batch_size or DEFAULT_BATCH_SIZE.get(what)
        if what == "clip" and args.what == "gpu" and importlib.util.find_spec("open_clip") is None:
            print("\nCLIP: skipped, open_clip is not installed here (pip install open_clip_torch)")
            continue
        BENCHMARKS[what](argparse.Namespace(**{**vars(args), "batch_size": batch_size}))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as e:
        sys.exit(f"bench.py: {e}")
