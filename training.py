"""
What the two training scripts (train_gpt2.py, train_caption.py) share, so that each script keeps only its
algorithm in sight.

First, in the order the training loop uses them: processes and DDP, autocast, the sum over ranks, the NaN/inf
guard and the LR schedule. Then devices, fp16 and peak FLOPs; Muon + AdamW; resuming (rank 0 decides; the
save; per-rank random state); one run per out-dir, SIGTERM, the plan's warnings, wandb, argument types, the
log. Checkpoint files: checkpoint.py.
"""

import argparse
import atexit
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from checkpoint import (checkpoint_path, checkpoint_step, checkpoints, latest_checkpoint, prune_checkpoints,
                        recorded_step, save_checkpoint)

# -----------------------------------------------------------------------------
# What the training loop uses, in its order: the processes (before the loop), then in the step autocast,
# the sum over ranks, the NaN/inf guard and the learning-rate schedule


@dataclass
class Distributed:
    """Who this process is. Without torchrun: rank 0 of a world of 1."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str  # e.g. "cuda:3", "mps", "cpu"
    cpu_group: object = None  # a gloo group beside NCCL, with a long timeout: waiting out a checkpoint write
    step_group: object = None  # a gloo group with --dist-timeout: the per-step stop flag, small Python objects

    @property
    def device_type(self):  # what torch.autocast wants: "cuda", "mps" or "cpu"
        return self.device.split(":")[0]

    @property
    def master(self):  # rank 0 prints, logs, samples and writes checkpoints
        return self.rank == 0


def setup_distributed(device="auto", timeout_minutes=10):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; then each process joins the group and takes one GPU
    (NCCL), or the CPU (gloo, used by the tests). Otherwise this is a single process on `device`.

    timeout_minutes: how long a collective waits for a rank that does not come (a crashed or stopped peer)
    before the run ends with an error, instead of a cluster job hanging until its time limit."""
    device = default_device() if device == "auto" else device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to this process")
    if "RANK" not in os.environ:
        use_device(device)
        return Distributed(False, 0, 0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size > int(os.environ.get("LOCAL_WORLD_SIZE", world_size)):  # more than one node
        check_gloo_reaches_other_nodes()
    timeout = timedelta(minutes=timeout_minutes)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        # device_id binds NCCL to this GPU now, rather than guessing it at the first collective
        dist.init_process_group(backend="nccl", timeout=timeout, device_id=torch.device(device))
    else:
        device = "cpu"  # under torchrun, anything but CUDA (mps too) runs on the CPU: gloo has no MPS transport
        dist.init_process_group(backend="gloo", timeout=timeout)
    # A second group, on the CPU, with a long timeout: rank 0 writing a checkpoint (gpt2-xl with its optimizer
    # is ~19 GB, fsync'd) can take minutes while the others wait. They wait here, not in an NCCL collective
    # whose timeout is meant to catch dead peers.
    cpu_group = dist.new_group(backend="gloo", timeout=timedelta(hours=2))
    # Everything else on the CPU (the stop flag every step, resume decisions, random states) keeps the short
    # timeout: on the long group a stalled peer would hold the whole job for 2 hours instead of timeout_minutes.
    step_group = dist.new_group(backend="gloo", timeout=timeout)
    return Distributed(True, rank, local_rank, world_size, device, cpu_group, step_group)


def autocast(device_type, dtype):
    """Mixed precision: matmuls run in bfloat16 or float16 (2x the tensor-core throughput of tf32), while the
    weights, the optimizer and reductions such as the loss stay in float32. bf16 has float32's exponent range,
    so, unlike fp16, it needs no loss scaling (grad_scaler). "float32": no autocast."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def all_reduce_sum(tensor, d):
    """Sum a tensor over all ranks in place (a no-op in one process). Averages are taken as SUM / count:
    gloo has no AVG."""
    if d.ddp:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def check_finite(loss, norm, step, out_dir, scaler=None):
    """A NaN or inf loss or gradient norm would poison the weights at this step's update: stop before it,
    saving nothing. -> both as floats for the step line; reading them is the step's one wait for the GPU (with
    fp16 scaler.step waits too, and skips an overflowing step itself). Every DDP rank sees the same two numbers
    (the loss averaged over ranks, the norm of the same averaged gradients), so all ranks stop together."""
    loss, norm = torch.stack([loss.float(), norm.float()]).tolist()
    norm_may_overflow = scaler is not None and scaler.is_enabled()
    if not (math.isfinite(loss) and (math.isfinite(norm) or norm_may_overflow)):
        last = latest_checkpoint(out_dir) or "none written yet"
        raise FloatingPointError(f"loss {loss}, gradient norm {norm} at step {step}: stopping before the update, "
                                 f"saving nothing (last checkpoint: {last}). Try a lower learning rate.")
    return loss, norm


def cosine_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Linear warmup from max_lr / warmup_steps to max_lr, then a cosine down to min_lr at max_steps.
    (step + 1: the first step already moves the weights; a rate of 0 would waste it.)"""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# Processes, devices and precision: the rest


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def use_device(device):
    """Make a numbered GPU ("cuda:3") the current CUDA device. Whatever names no device (torch.cuda calls,
    the CUDA context they create, the DataLoader's pin-memory thread) uses the current one: GPU 0 otherwise."""
    if device.startswith("cuda") and torch.device(device).index is not None:
        torch.cuda.set_device(device)


def check_gloo_reaches_other_nodes():
    """Gloo (setup_distributed's CPU groups, beside NCCL) listens on the address this node's hostname resolves
    to. Where that is a loopback address (Debian's 127.0.1.1, some containers), no other node can connect, and
    the start fails after a long wait with an error that names neither: say it now. (Every "node" on one
    machine, as in the tests, with a loopback MASTER_ADDR: they reach each other there.)"""
    try:
        address = socket.gethostbyname(socket.gethostname())
        one_machine = socket.gethostbyname(os.environ.get("MASTER_ADDR", "127.0.0.1")).startswith("127.")
    except OSError:
        return  # unresolvable: gloo's own error says that
    if address.startswith("127.") and not one_machine and not os.environ.get("GLOO_SOCKET_IFNAME"):
        raise ValueError(f"this node's hostname {socket.gethostname()} resolves to {address}, which other nodes "
                         "cannot reach; set GLOO_SOCKET_IFNAME to its network interface (e.g. eth0)")


def cleanup_distributed(d):
    if d.ddp:
        dist.destroy_process_group()


def gather_objects(obj, d):
    """[rank 0's obj, rank 1's obj, ...] on every rank; [obj] in one process. For small picklable things."""
    if not d.ddp:
        return [obj]
    objects = [None] * d.world_size
    dist.all_gather_object(objects, obj, group=d.step_group)
    return objects


def wait_for_each_other(d):
    """A barrier on the CPU group, whose timeout is long enough for rank 0 to write a large checkpoint."""
    if d.ddp:
        dist.barrier(group=d.cpu_group)


def default_dtype(device):
    """bfloat16 on GPUs that compute it natively (compute capability 8.0 and up: A100, H100, RTX 30xx/40xx),
    float16 on older GPUs (V100, T4), float32 elsewhere. Asked of the device in use ("cuda:3"), not of GPU 0.
    torch.cuda.is_bf16_supported() also says yes on a V100 or T4, which only emulate bf16, slower than fp32."""
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
    return "float32"


def warn_if_bf16_is_emulated(dtype, device):
    """An explicit --dtype bfloat16 on a GPU without native bf16 (compute capability below 8.0: V100, T4) runs,
    emulated, slower than float16 and even float32: say so before the first step."""
    if dtype == "bfloat16" and default_dtype(device) == "float16":  # default_dtype's test for native bf16
        major, minor = torch.cuda.get_device_capability(device)
        warn(f"--dtype bfloat16 on a GPU of compute capability {major}.{minor}: bf16 is only emulated there (slow); "
             f"--dtype float16, this GPU's default, is faster")


def grad_scaler(d, dtype):
    """Loss scaling, for float16 only: fp16 ends at 65504, loses precision below 6e-5 and is zero under 6e-8, so
    small gradients vanish. The loss is multiplied by a large scale before backward, the gradients divided by it
    before the update; an overflowing (inf) step is skipped and the scale halved, doubled again after 2000 good
    steps. bf16 has fp32's range: the scaler is off, each call nothing (or just the plain optimizer step)."""
    return torch.amp.GradScaler(d.device_type, enabled=dtype == "float16")


def load_scaler_state(scaler, state):
    """fp16's loss scale from a checkpoint. One written without fp16 (bf16 or float32 on an H100, say, resumed
    with --dtype float16 on a V100) has none: the scaler then starts afresh, as a new fp16 run's does."""
    if state:
        scaler.load_state_dict(state)


def fp16_note(scaler, norm):
    """' | fp16 scale 65536' for the step line, and that the step was skipped when it was."""
    if not scaler.is_enabled():
        return ""
    return f" | fp16 scale {scaler.get_scale():g}" + ("" if math.isfinite(norm) else " (overflow: step skipped)")


# dense bf16 tensor-core peak of common GPUs, FLOP/s (the datasheets' "with sparsity" numbers are 2x these)
# (the first name that matches wins: H100 NVL and PCIe before plain H100, the SXM card, "NVIDIA H100 80GB HBM3")
PEAK_BF16_FLOPS = {"H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "A10G": 125e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device):
    """The bf16 peak of this device, or None where we do not know it (CPU, unknown GPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if re.search(rf"\b{re.escape(key)}\b", name):  # whole words: "L4" is not the L40S, "A100" not an A1000
            return flops
    return None


# -----------------------------------------------------------------------------
# Muon + AdamW (--optimizer muon)


def muon_and_adamw(model, weight_decay, learning_rate, muon_lr, device_type, betas=(0.9, 0.95)):
    """Muon for the 2-D weights inside the blocks, AdamW (model.configure_optimizers) for everything else,
    stepped as one optimizer.

    Muon (momentum, then Newton-Schulz iterations that make the update matrix nearly orthogonal) suits the
    hidden layers' matmuls: every direction of a weight matrix gets a comparable step, however skewed the
    gradient is. It is not meant for the embedding table (a lookup: each row is updated by its own tokens;
    here it is also the tied lm_head) or for vectors (biases, LayerNorm gains), which AdamW keeps.
    adjust_lr_fn="match_rms_adamw" scales each update to the size an AdamW update would have (Moonshot's
    "Muon is Scalable": an orthogonalised (A, B) update has RMS ~1/sqrt(max(A, B)), so its rate is multiplied
    by 0.2 x sqrt(max(A, B)), 0.2 being a typical AdamW update's RMS): Muon's rate and weight decay then mean
    what AdamW's do. Its group carries lr_scale = muon_lr / learning_rate, so the one schedule drives both.
    c_attn's (3C, C) matrix is orthogonalised whole, q, k and v together (splitting it: not tried here)."""
    hidden = [p for name, p in model.named_parameters()
              if p.requires_grad and p.dim() == 2 and ".h." in name and "wte" not in name]
    adamw = model.configure_optimizers(weight_decay, learning_rate, device_type, betas, leave_out=hidden)
    muon = torch.optim.Muon([{"params": hidden, "lr_scale": muon_lr / learning_rate}],
                            lr=muon_lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return Optimizers(adamw, muon)


class Optimizers:
    """Several optimizers used as one: what the training loop (param_groups, step, zero_grad) and checkpoints
    (state_dict, load_state_dict) ask of an optimizer, and torch.amp.GradScaler too."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state):
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)


# -----------------------------------------------------------------------------
# Resuming


def master_decides(decide, d):
    """Run decide() on rank 0 only and give its answer, or its error, to every rank. Ranks that looked for
    themselves could disagree (nodes that do not share a disk), and ranks not told of rank 0's error would
    wait for it at their next collective until the timeout."""
    answer, error = None, None
    if d.master:
        try:
            answer = decide()
        except (OSError, ValueError) as e:
            error = str(e)
    answer, error = gather_objects((answer, error), d)[0]
    if error:
        raise ValueError(error)
    return answer


def resume_path(out_dir, resume, d):
    """Which checkpoint to continue from: --resume auto (the newest in out_dir, if any), a path, or none.
    Refuses what would silently mix two runs in one folder: starting afresh over an earlier run's
    checkpoints (they would be overwritten), or continuing an older checkpoint while newer ones are there
    (a later --resume auto would jump back to the abandoned branch). Rank 0 decides for every rank."""
    def choose():
        found = checkpoints(out_dir)
        if resume == "auto":
            return found[-1] if found else None
        if resume is None:
            if found:
                raise ValueError(f"{found[-1]}: an earlier run's checkpoint is here; pass --resume auto to continue "
                                 f"it, or choose another --out-dir")
            return None
        step = recorded_step(resume)  # from the file, not its name: a copy named branch.pt is at some step too
        newer = [p for p in found if step is not None and checkpoint_step(p) > step]
        if newer:
            raise ValueError(f"{resume}: {len(newer)} newer checkpoint(s) in {out_dir} ({os.path.basename(newer[-1])}, "
                             f"...) belong to the run you are leaving; move them into a subfolder first, so that "
                             f"a later --resume auto cannot jump back to them")
        return resume
    return master_decides(choose, d)


def load_on_every_rank(load, path, d):
    """Run load() (which reads `path`) on every rank. If any rank fails, all of them stop with a message,
    rather than the others waiting forever at their next collective for the one that stopped."""
    try:
        result, error = load(), None
    except (OSError, ValueError) as e:
        result, error = None, str(e)
    errors = gather_objects(error, d)
    if all(errors):  # a bad file: every rank says the same
        found = checkpoints(os.path.dirname(path))
        if path in found and len(found) > 1 and path == found[-1]:
            error += (f"; move it aside (into a subfolder) and --resume auto continues from the previous one, "
                      f"{found[-2]}")
        raise ValueError(error)
    if any(errors):  # some ranks read it, others did not: they do not see the same disk
        failed = [rank for rank, e in enumerate(errors) if e]
        raise ValueError(f"{path}: rank(s) {failed} of {d.world_size} cannot read this checkpoint "
                         f"({next(e for e in errors if e)}); --out-dir must be on a filesystem that every node shares")
    return result


def check_same_run(checkpoint, args, path, may_change):
    """A resume continues the run that wrote `path`. Refused: a checkpoint without what a resume needs (weights
    only), and flags that would change what the run is (model size, data, optimizer, what trains): the model
    comes from the checkpoint, so they would be ignored, and then recorded as if used. Flags in may_change
    (where and how it runs; when it evaluates, saves, stops; the learning rate, set every step) take effect."""
    missing = [key for key in ("step", "optimizer", "loader", "rng", "args") if key not in checkpoint]
    if missing:
        raise ValueError(f"{path}: cannot be resumed, it holds no {', '.join(missing)} (weights only?)")
    saved = checkpoint["args"]
    changed = [f"--{k.replace('_', '-')} {saved[k]} (now {v})" for k, v in vars(args).items()
               if k in saved and k not in may_change and not same_setting(saved[k], v)]
    if changed:
        raise ValueError(f"{path}: its run had {', '.join(changed)}; resume with the run's own settings, or "
                         f"start a new one in another --out-dir")


def same_setting(before, now):
    """Equal, or one file under two spellings (--init ./lm.pt, then /data/lm.pt)."""
    paths = isinstance(before, str) and isinstance(now, str) and os.path.exists(before) and os.path.exists(now)
    return before == now or (paths and os.path.samefile(before, now))


def restore_training_state(checkpoint, optimizer, scaler, loader, d, seed):
    """What an exact resume needs besides the weights (already in the model): the optimizer's moments, the fp16
    loss scale, the loader's place in the data, this rank's random state."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    load_scaler_state(scaler, checkpoint["scaler"])
    loader.load_state_dict(checkpoint["loader"])
    set_rng_state(checkpoint["rng"], d, seed)


def save_on_rank0(checkpoint, step, args, d):
    """The checkpoint after `step` updates (resuming starts the loop at this step), with every rank's random
    state added: rank 0 writes it (atomically, checkpoint.save_checkpoint) while the others wait, then
    --keep-last prunes the older ones. -> its path on rank 0, None elsewhere."""
    rng = gather_objects(rng_state(d.device), d)  # one state per rank
    path = None
    if d.master:
        path = checkpoint_path(args.out_dir, step)
        save_checkpoint({**checkpoint, "rng": rng}, path)
        if args.keep_last:
            prune_checkpoints(args.out_dir, args.keep_last, keep=[args.resume])
    wait_for_each_other(d)
    return path


def check_resume_step(step, max_steps, stop_at, path):
    """A resumed run must have steps left to run, and --stop-at must lie ahead of it."""
    if step > max_steps:
        raise ValueError(f"{path} is at step {step}, past --max-steps {max_steps}: nothing left to train")
    if stop_at is not None and stop_at <= step:
        raise ValueError(f"--stop-at {stop_at} is not after the step {path} resumes at, {step}")


def rng_state(device):
    """This process's random number generators. With dropout > 0 the dropout masks depend on them: restoring
    them makes a resumed run draw the same masks as an uninterrupted one. Only this process's own GPU's
    generator: every rank saves its own (gathered into the checkpoint by gather_objects)."""
    state = {"torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(states, d, seed):
    """Restore this rank's generators from one state per rank. A checkpoint written by another number of
    processes has none for this one: each rank is re-seeded with seed + rank, and says so. The data order (drawn
    from the seed, epoch and position) stays exact; only dropout masks differ from an uninterrupted run. A fresh
    run seeds every rank alike, for the same initial weights; here the weights come from the checkpoint and the
    generators only draw dropout masks, which distinct seeds keep independent across ranks."""
    if len(states) != d.world_size:
        if d.master:
            print(f"checkpoint written by {len(states)} process(es), resumed by {d.world_size}: random generators "
                  f"re-seeded per rank (same data order; dropout masks differ from an uninterrupted run)")
        torch.manual_seed(seed + d.rank)
        return
    state = states[d.rank]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and d.device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], d.device)


# -----------------------------------------------------------------------------
# One run per out-dir


class OutDirLock:
    """Holds out_dir for one run. A second run started into it (a requeued job overlapping the first, a
    command run twice) would truncate the first's log and overwrite its checkpoints: it is refused instead.

    The lock is a file holding the host and pid of its run, created atomically (O_EXCL) and removed at exit.
    A run killed with SIGKILL (the OOM killer, a save cut short by a requeue) leaves it behind, and a requeued
    job must still start. So a thread of the live run touches the file every HEARTBEAT seconds, whatever the
    run is doing (a step, a save, an evaluation), and a lock that nobody touches for 3 heartbeats is a dead
    run's: its pid may since belong to another process, and another host's process cannot be asked. Only the
    file's change is compared, never its time with our clock, so hosts' clocks need not agree."""
    HEARTBEAT = 10  # seconds

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "run.lock")
        self.owner = f"{socket.gethostname()} {os.getpid()}"
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            self.refuse_unless_stale()
            os.remove(self.path)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(self.owner + "\n")
        self.released = threading.Event()
        threading.Thread(target=self.beat, daemon=True).start()
        atexit.register(self.release)

    def beat(self):
        while not self.released.wait(self.HEARTBEAT):
            with suppress(OSError):
                os.utime(self.path)

    def refuse_unless_stale(self):
        try:
            with open(self.path) as f:
                host, pid = f.read().split()[:2]
                touched = os.fstat(f.fileno()).st_mtime  # read after an open: NFS revalidates it then
        except (OSError, ValueError):
            return  # vanished or unreadable: nobody holds it
        if host == socket.gethostname() and (int(pid) == os.getpid() or not process_exists(int(pid))):
            return  # ours (an earlier run in this process), or its process is gone
        print(f"{self.path}: held by host {host}, pid {pid}; waiting up to {3 * self.HEARTBEAT} s for a sign of life")
        for _ in range(3):
            time.sleep(self.HEARTBEAT)
            try:
                with open(self.path) as f:
                    if os.fstat(f.fileno()).st_mtime != touched:
                        raise ValueError(f"{os.path.dirname(self.path)}: another run is using this folder (host "
                                         f"{host}, pid {pid}); wait for it to end, or choose another --out-dir")
            except FileNotFoundError:
                return  # it ended meanwhile

    def release(self):
        self.released.set()
        try:
            with open(self.path) as f:
                ours = f.read().strip() == self.owner
            if ours:
                os.remove(self.path)
        except OSError:
            pass


def process_exists(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but someone else's
        return True
    return True


def take_out_dir(out_dir, d):
    """Rank 0 creates out_dir, checks now that it can write there (not at the first checkpoint, hours later)
    and locks it for this run (the lock is released at exit). Any failure stops every rank."""
    def take():
        try:
            os.makedirs(out_dir, exist_ok=True)
            probe_write(out_dir)
        except OSError as e:
            raise ValueError(f"{out_dir}: cannot write checkpoints here ({e.strerror})") from None
        OutDirLock(out_dir)

    master_decides(take, d)


# -----------------------------------------------------------------------------
# The run's record: run.json, and --config to start another run from one


def write_run_record(args, d):
    """out_dir/run.json: every setting as resolved (a recipe's included), the command, the code (its git commit,
    "+dirty" with uncommitted changes), torch, the GPUs: what it takes to compare two runs, or to start this one
    again (--config). Rewritten at each start: a resumed run's shows the settings it goes on with."""
    devices = gather_objects(torch.cuda.get_device_name(d.device) if d.device_type == "cuda" else d.device_type, d)
    if d.master:
        record = {"command": " ".join(sys.argv), "args": vars(args), "git": git_commit(), "torch": torch.__version__,
                  "world_size": d.world_size, "devices": {name: devices.count(name) for name in sorted(set(devices))},
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        path = os.path.join(args.out_dir, "run.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=2)
        os.replace(path + ".tmp", path)


def git_commit():
    """This code's commit, "+dirty" if tracked files differ from it; None outside a git checkout."""
    git = lambda *command: subprocess.run(["git", *command], cwd=os.path.dirname(os.path.abspath(__file__)),
                                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def config_defaults(parser, argv):
    """--config FILE: the settings a run.json recorded become the parser's defaults, so flags given now win.
    Not --resume: a run started from another's record starts afresh unless told to resume."""
    known = vars(parser.parse_known_args(argv)[0])
    path = known["config"]
    if path is None:
        return
    try:
        with open(path) as f:
            recorded = dict(json.load(f)["args"])
        unknown = sorted(set(recorded) - set(known))
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"--config {path}: not a run.json ({type(e).__name__}: {e})")
    if unknown:
        parser.error(f"--config {path}: written by another script? {', '.join(unknown)}: not settings of this one")
    parser.set_defaults(**{name: value for name, value in recorded.items() if name not in ("config", "resume")})


# -----------------------------------------------------------------------------
# Stopping cleanly


class StopSignal:
    """SIGTERM or Ctrl-C ends the run at the next step with a checkpoint, rather than where it stands.

    Clusters send SIGTERM at a job's time limit and on preemption (SLURM, Kubernetes, scancel); torchrun
    forwards it to its workers and kills them 30 s later, so the save has to fit in that. The handler only
    notes the signal. The loop asks requested() once a step, and the ranks agree (one rank's signal stops
    all), so no rank is left waiting in a collective the others have left. A second Ctrl-C stops at once."""

    def __init__(self):
        self.received, self.stopping = None, False
        self.previous = {s: signal.signal(s, self.note) for s in (signal.SIGTERM, signal.SIGINT)}

    def note(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: now
        self.received = signum

    def requested(self, d):
        self.stopping = self.received is not None
        if d.ddp:
            flag = torch.tensor([float(self.stopping)])
            # on the CPU (no wait for the GPU), with --dist-timeout: a peer that stalls ends the run in minutes
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.step_group)
            self.stopping = flag.item() > 0
        return self.stopping

    def close(self, step, saved, d):
        """Put the previous handlers back and say how the run ended. -> the exit status: 0, or after SIGTERM
        128 + 15, as if the signal had ended it (the job did not finish; schedulers may requeue it)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if not self.stopping:
            return 0
        if d.master:
            name = signal.Signals(self.received).name if self.received else "a signal to another rank"
            what = f"saved {saved}; continue with --resume auto" if saved else "nothing new to save"
            print(f"stopped at step {step} ({name}), {what}", file=sys.stderr)
        return 0 if self.received == signal.SIGINT else 128 + signal.SIGTERM


# -----------------------------------------------------------------------------
# Saying what a run will do


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the script's docstring as written and shows every option's default (but not "None": the
    help of such an option says what happens without it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def output_problem(path):
    """Why the file `path` cannot be written, in a few words, or None. Asked before the long work, so that hours
    of it are never lost to a folder given for a file or a read-only mount found at the end."""
    if os.path.isdir(path):
        return "is a folder, not a file"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"no such folder {folder}"
    try:
        probe_write(folder)
    except OSError as e:
        return f"cannot write in {folder} ({e.strerror})"
    return None


def probe_write(folder):
    """Write a small file in folder and remove it: OSError if nothing can be written there. A real write, since
    os.access says yes to root on a read-only mount."""
    probe = os.path.join(folder, f".write_test.{os.getpid()}")
    with open(probe, "w"):
        pass
    os.remove(probe)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def duration(seconds):
    """1h02m, 3m05s, 12s: for the ETA."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StepTimer:
    """dt of each step, and an ETA from their exponential moving average (weight 0.1 on the newest): a slow
    first, compiling, step fades from it by a factor of 10 every ~22 steps."""

    def __init__(self, max_steps):
        self.max_steps, self.average = max_steps, None

    def eta(self, step, dt):
        self.average = dt if self.average is None else 0.9 * self.average + 0.1 * dt
        return duration((self.max_steps - step - 1) * self.average)


# -----------------------------------------------------------------------------
# Weights & Biases, if asked for


class Tracker:
    """Optional Weights & Biases logging (--wandb-project), as nanoGPT does it: the run's flags once, then the
    numbers of each step. Rank 0 only. wandb is imported only when asked for; it is not a requirement.
    A resumed run continues the same wandb run: its id travels in the checkpoints (tracker.run_id)."""

    def __init__(self, project, run_name, config, d, run_id=None):
        self.run = None
        if project is None or not d.master:
            return
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb-project: wandb is not installed (pip install wandb)") from None
        try:
            self.run = wandb.init(project=project, name=run_name, config=config, id=run_id,
                                  resume="allow" if run_id else None)
        except Exception as e:  # not logged in, offline, ...: wandb's own errors, which its message explains
            why = str(e).partition("\n")[0] or type(e).__name__
            raise ValueError(f"--wandb-project {project}: wandb did not start ({why}); run `wandb login`, or set "
                             "WANDB_MODE=offline") from None

    @property
    def run_id(self):
        return self.run.id if self.run else None

    def log(self, step, **values):
        if self.run:
            self.run.log(values, step=step)

    def finish(self):
        if self.run:
            self.run.finish()


# -----------------------------------------------------------------------------
# Command-line values


def positive_int(text):
    """argparse type: a whole number > 0, or a one-line error."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def random_seed(text):
    """--seed: torch.manual_seed takes up to 2**64 - 1, and each rank may add its rank (set_rng_state)."""
    value = non_negative_int(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):  # nan fails every comparison: it would train at lr nan
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def existing_device(text):
    """argparse type for --device: auto, cpu, mps, cuda or cuda:N, if this machine has it. A misspelt device or
    a GPU that is not there is then one line at the start, rather than an error from deep inside torch."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (auto, cpu, cuda, cuda:1, mps)") from None
    gpus = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise argparse.ArgumentTypeError(f"{text}: this machine has {gpus} CUDA GPU{'s' * (gpus != 1)}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no Apple GPU")
    return text


# -----------------------------------------------------------------------------
# Logging


def start_log(path, resume_step=None):
    """A fresh run starts an empty log. A resumed one keeps only the lines of the steps before resume_step:
    a run killed at step 1,200 whose newest checkpoint is step 1,000 redoes steps 1,000-1,199, and their
    first lines must not stay beside the new ones. Rewritten atomically, like a checkpoint."""
    kept = []
    if resume_step is not None and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if (m := re.match(r"(\d+)\s", line)) and int(m.group(1)) < resume_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def append_log(out_dir, line, **numbers):
    """log.txt holds one machine-readable line per number, e.g. '120 train 4.123456' or '250 val 3.9876'; the
    step's other numbers (already formatted; None: not known) follow the line, each on its own: '120 lr 6.0000e-04'.
    So plot_log.py (and a grep) reads every number the step line printed."""
    step = line.split()[0]
    line = "\n".join([line] + [f"{step} {name} {value}" for name, value in numbers.items() if value is not None])
    path = os.path.join(out_dir, "log.txt")
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:  # a full disk: the run stops; its checkpoints are whole (written atomically)
        raise ValueError(f"{path}: cannot write ({e.strerror}); free space, then --resume auto") from None
