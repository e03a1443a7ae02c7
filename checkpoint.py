"""
Checkpoint files: what train_gpt2.py and train_caption.py write, and what every other script reads.

A checkpoint is one torch.save'd dict: {"kind": "lm" | "caption", "model": state_dict, "config": GPTConfig's
fields, "step", and, for resuming, "optimizer", "loader", "scaler", "rng", "args"}. Files are named
model_{step:06d}.pt, written atomically (a killed run never leaves half a file), never with NaN weights, and
read back with errors that name the file.

export_hf.py --captioner writes a caption checkpoint as a folder to share (or its copy on the Hugging Face hub):
config.json is the checkpoint's dict without its tensors ({"kind", "config", "encoder", "step"}) and
model.safetensors its "model", the same names, so load_export builds the model as load_model does.
"""

import json
import os
import re
import shutil
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model import GPT, GPTConfig, load_weights

# -----------------------------------------------------------------------------
# Writing, finding and pruning checkpoint files


def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f"model_{step:06d}.pt")


def checkpoint_step(path):
    """model_001200.pt -> 1200; None for a file not named that way."""
    m = re.fullmatch(r"model_(\d+)\.pt", os.path.basename(path))
    return int(m.group(1)) if m else None


def checkpoints(out_dir):
    """The checkpoints in out_dir, oldest step first. Half-written files end in .tmp and are never matched.
    A folder that cannot be listed is an error, not an empty folder: a run that took it for one would start
    afresh and overwrite what is there."""
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ValueError(f"{out_dir}: cannot list this folder ({e.strerror})") from None
    return sorted((os.path.join(out_dir, n) for n in names if checkpoint_step(n) is not None), key=checkpoint_step)


def latest_checkpoint(out_dir):
    """The checkpoint with the highest step in out_dir, or None."""
    found = checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(checkpoint, path):
    """Write to path.tmp, flush it to disk, then rename over path. A rename within a folder is atomic, so a
    run killed at any moment leaves either the previous file or the new one, never half of one. Weights
    that are not finite are never written: every checkpoint on disk is one worth resuming."""
    for name, tensor in checkpoint["model"].items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"{path}: not written, {name} holds NaN or inf "
                                     f"(last checkpoint: {latest_checkpoint(os.path.dirname(path)) or 'none'})")
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ValueError(f"{path}: checkpoint not written ({why_write_failed(e, os.path.dirname(path))}); last "
                         f"checkpoint: {latest_checkpoint(os.path.dirname(path)) or 'none'}") from None


def why_write_failed(error, folder):
    """The cause of a failed write, in words: OSErrors carry it (disk full, read-only, permission denied);
    torch.save's RuntimeError does not, so a nearly full disk is looked at directly."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if shutil.disk_usage(folder or ".").free < 100 * 2**20:
        return "no space left on the device"
    return str(error).splitlines()[0][:200]


def prune_checkpoints(out_dir, keep_last, keep=()):
    """--keep-last N: after a successful save, delete all but the N newest checkpoints (a 124M checkpoint with
    its optimizer is ~1.5 GB). The newest is always kept, and so is any path in `keep` (one the user named)."""
    found = checkpoints(out_dir)
    keep = {os.path.abspath(p) for p in keep if p}
    for path in found[:-max(1, keep_last)]:
        if os.path.abspath(path) not in keep:
            os.remove(path)


# -----------------------------------------------------------------------------
# Reading a checkpoint, and the model in it


def load_checkpoint(path, kind=None):
    """Read a checkpoint of this codebase onto the CPU, checking it is one, and of the expected kind.
    Every error names the file: a wrong path, a truncated file, some other .pt, an LM where a captioner
    was expected."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    # mmap: the tensors stay in the file and are paged in as they are used, so 8 ranks resuming a large model
    # share the file's pages in the OS cache instead of each reading a private copy into host RAM. (The map is
    # copy-on-write: changing a loaded tensor never changes the file; and save_checkpoint replaces a file by
    # renaming, never rewrites it in place under a reader.)
    # Only torch.save's zip format can be mapped; anything else (the pre-1.6 format, a truncated file, not a
    # checkpoint at all) is read whole, which loads the old format and gives the true reason for the others.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        reason = str(e).splitlines()[0][:120] if str(e).strip() else "no message"  # an empty file's has none
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or not {"kind", "model", "config"} <= checkpoint.keys():
        raise ValueError(f"{path}: not a checkpoint of this codebase (needs the keys kind, model, config)")
    if kind is not None and checkpoint["kind"] != kind:
        raise ValueError(f"{path}: is a '{checkpoint['kind']}' checkpoint, expected '{kind}'")
    return checkpoint


def recorded_step(path):
    """The step a checkpoint was written at, read from the file itself: its name may say nothing (a copy called
    branch.pt) or something else (a renamed file). The name's step if the file cannot be read; the load that
    follows then says why."""
    try:
        return int(load_checkpoint(path)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return checkpoint_step(path)


def load_model(path, kind=None, **overrides):
    """A checkpoint written by train_gpt2.py ('lm') or train_caption.py ('caption') -> (model, checkpoint).
    Overrides (e.g. cross_attn_every=2 on an 'lm' checkpoint) add fresh layers as GPT.from_pretrained does."""
    checkpoint = load_checkpoint(path, kind)
    return build_model(checkpoint, path, **overrides), checkpoint


def build_model(checkpoint, source, **overrides):
    """A checkpoint's dict (from a .pt file or an exported folder) -> the GPT its config and weights describe."""
    try:
        config = GPTConfig(**{**checkpoint["config"], **overrides})
    except TypeError as e:
        raise ValueError(f"{source}: config does not fit this model.py ({e})") from None
    model = GPT(config)
    load_weights(model, checkpoint["model"], source)
    return model


# -----------------------------------------------------------------------------
# Reading an exported captioner: a folder, or its copy on the Hugging Face hub


def is_hub_id(text):
    """USER/NAME, the form of a Hugging Face hub repository's id."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", text) is not None


def load_export(folder_or_hub_id, kind=None):
    """A folder export_hf.py --captioner wrote, or a hub repository it was pushed to (USER/NAME) -> (model,
    checkpoint): config.json's dict with model.safetensors as its "model", read as load_model reads a .pt."""
    folder = local_folder(folder_or_hub_id)
    config_path, weights_path = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    try:
        with open(config_path) as f:
            checkpoint = json.load(f)
    except FileNotFoundError:  # a training run's folder, say, given where its checkpoint was meant
        raise FileNotFoundError(f"{folder}: no config.json here, so not a folder export_hf.py --captioner wrote "
                                f"(a checkpoint is a .pt file)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: not readable ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(checkpoint, dict) or not {"kind", "config"} <= checkpoint.keys():
        raise ValueError(f"{config_path}: not what export_hf.py --captioner writes (a GPT-2 export? "
                         f"GPT.from_pretrained and sample.py --pretrained read those)")
    if kind is not None and checkpoint["kind"] != kind:
        raise ValueError(f"{config_path}: is a '{checkpoint['kind']}' export, expected '{kind}'")
    try:
        state_dict = load_file(weights_path)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{weights_path}: not readable ({getattr(e, 'strerror', None) or e})") from None
    if "transformer.wte.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]  # tied: written once, as wte
    checkpoint["model"] = state_dict
    return build_model(checkpoint, weights_path), checkpoint


def local_folder(folder_or_hub_id):
    """A folder here, else a hub id's files (config.json and model.safetensors), downloaded into the Hugging Face
    cache (HF_HOME) or found there offline."""
    folder_or_hub_id = str(folder_or_hub_id)
    if os.path.isdir(folder_or_hub_id):
        return folder_or_hub_id
    if not is_hub_id(folder_or_hub_id):
        raise FileNotFoundError(f"{folder_or_hub_id}: no such folder (nor a hub id, USER/NAME)")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(folder_or_hub_id, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # offline, no such repository, a private one without a token, ...
        raise ValueError(f"{folder_or_hub_id}: not a folder here, and not downloadable from the Hugging Face hub "
                         f"({type(e).__name__}); offline, download it elsewhere (hf download {folder_or_hub_id} "
                         f"--local-dir FOLDER) and pass the folder") from None
