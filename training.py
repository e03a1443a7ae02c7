"""
What the two training scripts (train_gpt2.py, train_caption.py) share: setting up processes and devices
(one process or DDP under torchrun), the learning-rate schedule, mixed precision, checkpoints that survive
being killed, and the log file. Everything else lives in the script that uses it.
"""

import glob
import math
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Processes and devices


@dataclass
class Distributed:
    """Who this process is. Without torchrun: rank 0 of a world of 1."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str  # e.g. "cuda:3", "mps", "cpu"

    @property
    def device_type(self):  # what torch.autocast wants: "cuda", "mps" or "cpu"
        return self.device.split(":")[0]

    @property
    def master(self):  # rank 0 prints, logs, samples and writes checkpoints
        return self.rank == 0


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def setup_distributed(device="auto"):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; then each process joins the group and takes one GPU
    (NCCL), or the CPU (gloo, used by the tests). Otherwise this is a single process on `device`."""
    device_type = default_device() if device == "auto" else device.split(":")[0]
    if "RANK" not in os.environ:
        return Distributed(False, 0, 0, 1, default_device() if device == "auto" else device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl")
    else:
        device = "cpu"
        dist.init_process_group(backend="gloo")
    return Distributed(True, rank, local_rank, world_size, device)


def cleanup_distributed(d):
    if d.ddp:
        dist.destroy_process_group()


def all_reduce_sum(tensor, d):
    """Sum a tensor over all ranks in place (a no-op in one process). Averages are taken as SUM / count:
    gloo has no AVG."""
    if d.ddp:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def autocast(device_type, dtype):
    """bf16 autocast: matmuls run in bfloat16 (2x the tensor-core throughput of tf32), while the weights,
    the optimizer and reductions such as the loss stay in float32. bf16 has float32's exponent range, so,
    unlike fp16, it needs no loss scaling."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def default_dtype(device_type):
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


# -----------------------------------------------------------------------------
# Schedule and speed


def cosine_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Linear warmup from max_lr / warmup_steps to max_lr, then a cosine down to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def optimizer_step(optimizer, params, grad_clip, lr):
    """Clip the global gradient norm (one bad batch cannot throw the weights far), set this step's learning
    rate, update. Returns the norm before clipping, worth watching: spikes come before loss spikes."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return norm


# dense bf16 tensor-core peak of common GPUs, FLOP/s (the datasheets' "with sparsity" numbers are 2x these)
PEAK_BF16_FLOPS = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                   "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device):
    """The bf16 peak of this device, or None where we do not know it (CPU, unknown GPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


# -----------------------------------------------------------------------------
# Checkpoints


def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f"model_{step:06d}.pt")


def latest_checkpoint(out_dir):
    """The checkpoint with the highest step in out_dir, or None. Half-written files end in .tmp and are
    never matched."""
    paths = glob.glob(os.path.join(out_dir, "model_*.pt"))
    steps = [int(m.group(1)) for p in paths if (m := re.fullmatch(r"model_(\d+)\.pt", os.path.basename(p)))]
    return checkpoint_path(out_dir, max(steps)) if steps else None


def resume_path(out_dir, resume):
    """Which checkpoint to continue from: --resume auto (the newest in out_dir, if any), a path, or none.
    Refuses to start afresh over an earlier run's checkpoints: that would overwrite them."""
    if resume == "auto":
        return latest_checkpoint(out_dir)
    if resume is not None:
        return resume
    existing = latest_checkpoint(out_dir)
    if existing is not None:
        raise ValueError(f"{existing}: an earlier run's checkpoint is here; pass --resume auto to continue it, "
                         f"or choose another --out-dir")
    return None


def save_checkpoint(checkpoint, path):
    """Write to path.tmp, flush it to disk, then rename over path. A rename within a folder is atomic, so a
    run killed at any moment leaves either the previous file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    """Random number generators' state. With dropout > 0 the dropout masks depend on it: restoring it makes
    a resumed run draw the same masks as an uninterrupted one."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_finite(loss, step, out_dir):
    """A NaN or inf loss poisons the weights at the next update: stop before it, saving nothing."""
    if not torch.isfinite(loss):
        last = latest_checkpoint(out_dir) or "none written yet"
        raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping without saving (last checkpoint: "
                                 f"{last}). Try a lower learning rate or --grad-clip.")


# -----------------------------------------------------------------------------
# Logging


def append_log(out_dir, line):
    """log.txt holds one machine-readable line per event, e.g. '120 train 4.123456' or '250 val 3.9876'."""
    with open(os.path.join(out_dir, "log.txt"), "a") as f:
        f.write(line + "\n")
