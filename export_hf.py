"""
Export a checkpoint in Hugging Face's GPT-2 format, for the tools that read it (transformers,
lm-evaluation-harness, the Hugging Face hub); or a captioner whole, for sample.py; and share it on the hub.

    python export_hf.py log/model_019073.pt out/gpt2-fineweb
    lm_eval --model hf --model_args pretrained=out/gpt2-fineweb --tasks hellaswag
    python export_hf.py log/model_019073.pt out/gpt2-fineweb --push-to-hub USER/gpt2-fineweb
    python export_hf.py log_caption/best.pt out/captioner --captioner --push-to-hub USER/captioner

The folder gets what save_pretrained (below) writes, config.json and model.safetensors (transformers' parameter
names and layouts, written with safetensors: transformers is not needed here), and GPT-2's tokenizer:
vocab.json and merges.txt are OpenAI's encoder.json and vocab.bpe, the very files tiktoken's "gpt2" encoding
is built from, read as tiktoken reads them (its cache, else a download). Offline with no cached copy, the command
says so and the folder has no tokenizer: the matching one is transformers' AutoTokenizer.from_pretrained("gpt2")
(for lm_eval: --model_args pretrained=out/gpt2-fineweb,tokenizer=gpt2).

A caption checkpoint (train_caption.py) is exported as its language model: the cross-attention layers and
the image projection are left out, since Hugging Face's GPT-2 has no place for them, and the command says
so. What is left is a text-only GPT-2; after the default caption training, which freezes GPT-2, it is the
language model the captioner started from. --captioner exports it whole instead, in this codebase's own format
(transformers cannot read it): model.safetensors with our parameter names, cross-attention included, and a
config.json that records the image encoder. Captioner.from_pretrained(folder or USER/NAME) reads it back, and
so does sample.py --checkpoint.

`GPT.from_pretrained(folder)` reads the language-model export back.

Every export gets a model card, README.md (the page the hub shows): the step, the tokens seen, the last val
numbers in the run's log.txt beside the checkpoint, the training command from its run.json, how to load it.
--push-to-hub USER/NAME uploads the folder to that hub repository (made if missing; log in first: hf auth login,
or set HF_TOKEN). The folder is written on disk only once the upload is done: a failed push changes nothing.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict

from huggingface_hub import HfApi
from safetensors import SafetensorError
from safetensors.torch import save_file
from tiktoken.load import read_file_cached

import coco
from checkpoint import is_hub_id, load_model, why_write_failed
from model import CONV1D_WEIGHTS, EOT_TOKEN, GPT2_VOCAB_SIZE, is_cross_attn_param

# -----------------------------------------------------------------------------
# Our weights in Hugging Face's GPT-2 layout


def save_pretrained(model, folder, language_model_only=False):
    """The mirror of GPT.from_pretrained: write folder/config.json and folder/model.safetensors in Hugging
    Face's GPT-2 format (its parameter names and Conv1D layouts), which transformers'
    GPT2LMHeadModel.from_pretrained loads, and so the tools built on it (lm-evaluation-harness, the hub).
    Written with safetensors and json alone: transformers is not needed here.
    Hugging Face's GPT-2 has no cross-attention, so a captioner is refused unless language_model_only=True,
    which writes its text decoder and leaves the cross-attention layers and image projection out."""
    if model.config.cross_attn_every > 0 and not language_model_only:
        raise ValueError("this model has cross-attention layers, which Hugging Face's GPT-2 has no place for; "
                         "pass language_model_only=True to save its language model without them")
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise ValueError(f"vocab_size {model.config.vocab_size}: Hugging Face's GPT-2 has {GPT2_VOCAB_SIZE} tokens")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_gpt2_config(model.config), f, indent=2)
    # "format": "pt" tells transformers these are PyTorch tensors (it refuses a file without the tag)
    save_file(to_hf_gpt2_weights(model.state_dict()), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})


def to_hf_gpt2_weights(state_dict):
    """Ours -> Hugging Face GPT-2 names/layouts, the inverse of model.convert_gpt2_weights: the Conv1D weights
    transposed back to (in, out), the vocabulary cut to GPT-2's 50257 rows (the padding rows are no tokens),
    lm_head left out (it is wte: transformers ties the two again on loading, as tie_word_embeddings says),
    and the captioner's cross-attention parameters left out."""
    hf_state_dict = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" or is_cross_attn_param(name):
            continue
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if name == "transformer.wte.weight":
            tensor = tensor[:GPT2_VOCAB_SIZE]
        # safetensors writes each tensor's own memory: a contiguous CPU copy, shared with no other tensor
        hf_state_dict[name] = tensor.detach().cpu().contiguous().clone()
    return hf_state_dict


def hf_gpt2_config(config):
    """Our config -> the config.json of a Hugging Face GPT-2 (the fields of transformers' GPT2Config that
    describe this architecture; the rest keep transformers' defaults)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": GPT2_VOCAB_SIZE,  # the real tokens: our padding rows are not written
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # None means 4 * n_embd, our MLP's width
        "activation_function": "gelu_new",  # transformers' name for the tanh approximation of GELU (our MLP's)
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which we use
        "resid_pdrop": config.dropout,  # our one dropout rate is used in all three places
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,  # GPT._init_weights's std, for anyone training the export further
        "scale_attn_weights": True,  # scores / sqrt(head size), as F.scaled_dot_product_attention does
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,  # lm_head is wte
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "use_cache": True,
    }


# -----------------------------------------------------------------------------
# A captioner whole, in our own format


# A caption checkpoint records its image encoder under "encoder"; those of versions that knew only CLIP, under
# "clip" or "clip_model" and "clip_pretrained". An export copies them as they are: coco.encoder_record reads each.
ENCODER_KEYS = ("encoder", "clip", "clip_model", "clip_pretrained")


def save_captioner(model, checkpoint, folder):
    """The mirror of checkpoint.load_export: folder/config.json holds what a caption checkpoint holds besides its
    tensors and training state (kind, config, its image encoder, step) and folder/model.safetensors its weights
    under our names, cross-attention and image projection included."""
    record = {"kind": "caption", "config": asdict(model.config), "step": checkpoint.get("step"),
              **{key: checkpoint[key] for key in ENCODER_KEYS if key in checkpoint}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(record, f, indent=2)
    # lm_head is wte (tied), written once: safetensors refuses two names for one tensor
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
               if name != "lm_head.weight"}
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


# -----------------------------------------------------------------------------
# GPT-2's tokenizer files


# Hugging Face's name for each of GPT-2's two BPE files -> (the URL tiktoken's "gpt2" encoding is built from, its
# SHA-256, which tiktoken checks)
GPT2_TOKENIZER_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def read_tokenizer_files():
    """{Hugging Face name: contents} of GPT-2's BPE files, read with tiktoken's public read_file_cached: from its
    cache ($TIKTOKEN_CACHE_DIR), else downloaded, checked against the SHA-256. Where and how tiktoken caches is
    tiktoken's business. -> None if neither works: the model is still worth exporting."""
    try:
        return {name: read_file_cached(url, sha256) for name, (url, sha256) in GPT2_TOKENIZER_FILES.items()}
    except Exception:  # offline with nothing cached (requests' ConnectionError), a damaged download (ValueError), ...
        return None


def write_tokenizer(folder, files, block_size):
    """Write GPT-2's tokenizer files into folder, with the tokenizer_config.json that tells transformers how to
    read them."""
    for name, contents in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(contents)
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": block_size,  # the longest sequence the model takes
        # GPT-2 has one special token, <|endoftext|>: it begins and ends documents, and is all there is for unknown
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


# -----------------------------------------------------------------------------
# The model card: README.md, the page the hub shows


def model_card(model, checkpoint, checkpoint_path, encoder, load_from, tokenizer_from):
    """README.md: what the export is, how far it trained, its last val numbers and the command that trained it,
    as the run recorded them beside the checkpoint (log.txt, run.json), and how to load it. encoder: the image
    encoder's record (coco.encoder_record) for a whole captioner, else None. The YAML at the top is what the hub reads."""
    run_dir = os.path.dirname(os.path.abspath(checkpoint_path))
    run = read_json(os.path.join(run_dir, "run.json"))  # older runs have none
    args = checkpoint.get("args") or run.get("args") or {}  # best.pt keeps no args; run.json has them
    rows = training_facts(checkpoint, os.path.basename(checkpoint_path), args, os.path.join(run_dir, "log.txt"))
    command = f"`{run['command']}`" if run.get("command") else "not recorded (no run.json beside the checkpoint)"
    return "\n".join([
        "---", "license: mit", f"library_name: {'pytorch' if encoder else 'transformers'}",
        f"tags: [gpt2, {'image-captioning' if encoder else 'text-generation'}]", "---", "",
        f"# {os.path.basename(os.path.normpath(load_from))}", "",
        what_it_is(model.config, checkpoint["kind"], encoder), "",
        "| | |", "|---|---|", *[f"| {label} | {value} |" for label, value in rows], "",
        f"Trained with: {command}", "", "## Use", "", *usage(encoder, load_from, tokenizer_from), ""])


def what_it_is(c, kind, encoder):
    shape = f"{c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, {c.block_size:,} positions"
    if encoder:
        return (f"A GPT-2 image captioner ({shape}) that cross-attends to the tokens of a frozen image encoder, "
                f"{encoder['name']} ({encoder['weights']} weights); trained with this codebase's train_caption.py.")
    if kind == "caption":
        return (f"The language model of an image captioner trained with this codebase's train_caption.py: a "
                f"text-only GPT-2 ({shape}), the captioner's cross-attention layers and image projection left out.")
    return f"A GPT-2 language model ({shape}) trained with this codebase's train_gpt2.py."


def training_facts(checkpoint, checkpoint_name, args, log_path):
    """(label, value) rows of the card's table. A number the run did not record is said to be missing, never
    guessed."""
    step, per_step = checkpoint.get("step"), args.get("total_batch_size")
    caption_run = checkpoint["kind"] == "caption"
    seen = "image-caption pairs" if caption_run else "tokens"  # what --total-batch-size counts in that script
    data_flag = "--features-dir" if caption_run else "--data-dir"
    data = args.get(data_flag[2:].replace("-", "_"))
    rows = [("checkpoint", f"`{checkpoint_name}`" + (f", step {step:,}" if step is not None else "")),
            (f"{seen} seen", f"{step * per_step:,} ({step:,} steps x {per_step:,})" if step is not None and per_step
             else "not recorded"),
            ("data", f"`{data_flag} {data}`" if data else "not recorded")]
    logged = [("val loss", "val"), ("val CIDEr-D (training's estimate)", "cider")] if caption_run else \
        [("val loss", "val"), ("HellaSwag acc_norm", "hella")]
    for label, name in logged:
        found = last_logged(log_path, name, step)
        rows.append((label, f"{found[1]} (step {found[0]:,}, log.txt)" if found else "not logged"))
    return rows


def usage(encoder, load_from, tokenizer_from):
    if encoder:  # our own format: this codebase's code reads it
        return ["With this codebase's sample.py:", "", "```python", "from sample import Captioner",
                f'captioner = Captioner.from_pretrained("{load_from}")',
                'captioner.caption(["dog.jpg"])  # -> [\'a dog ...\']', "```", "",
                f"or `python sample.py --image dog.jpg --checkpoint {load_from}`."]
    return ["```python", "from transformers import AutoTokenizer, GPT2LMHeadModel",
            f'model = GPT2LMHeadModel.from_pretrained("{load_from}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_from}")', "```", "",
            f"or `lm_eval --model hf --model_args pretrained={load_from}"
            f"{'' if tokenizer_from == load_from else ',tokenizer=' + tokenizer_from} --tasks hellaswag`."]


def read_json(path):
    """A JSON file's dict; {} for a missing or unreadable one (the card then says what is not recorded)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def last_logged(log_path, name, step):
    """The last `name` number log.txt has at or before `step` -> (its step, the number as written), or None.
    Not a later one: that was measured on weights other than this checkpoint's."""
    found = None
    try:
        with open(log_path) as f:
            for line in f:
                fields = line.split()
                if len(fields) == 3 and fields[1] == name and fields[0].isdigit() and \
                        (step is None or int(fields[0]) <= step):
                    found = (int(fields[0]), fields[2])
    except OSError:
        return None
    return found


# -----------------------------------------------------------------------------
# Writing the folder, and pushing it to the hub


EXPORT_FILES = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json", "README.md"}


@contextmanager
def export_folder(out_dir):
    """with export_folder(out_dir) as folder: write the export into `folder`, a new folder beside out_dir, which
    replaces out_dir only once everything is written. A full disk or a kill mid-write leaves the previous export
    whole (never a new config.json beside old weights) and no partial folder. An out_dir holding files that are
    not an export's is refused: replacing the folder would delete them."""
    # a symlink's target is what is replaced: renaming the link would leave the target's old export in place
    target = os.path.realpath(out_dir)
    if os.path.isdir(target):
        others = sorted(set(os.listdir(target)) - EXPORT_FILES)
        if others:
            raise ValueError(f"{out_dir}: holds {others[0]}{' and more' if len(others) > 1 else ''}, not part of an "
                             f"export; choose an empty or new folder")
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=".export_hf.", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(folder, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from everyone else on a cluster
    except OSError as e:
        raise ValueError(f"{out_dir}: cannot write there ({e.strerror})") from None
    try:
        yield folder
        for name in os.listdir(folder):  # and safetensors writes its file 0600: each file as any new file is
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
        old = folder + ".old"
        if os.path.isdir(target):
            os.rename(target, old)  # two renames within one folder: a kill between them leaves both, named
        os.rename(folder, target)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as e:  # a full disk, mostly (safetensors reports it as a SafetensorError)
        shutil.rmtree(folder, ignore_errors=True)
        raise ValueError(f"{out_dir}: export not written ({why_write_failed(e, parent)}); the previous one, if any, "
                         f"is as it was") from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def push_to_hub(folder, repo_id):
    """Upload the export's files to the hub repository repo_id (made if missing) in one commit."""
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="export_hf.py")
    except Exception as e:  # not logged in, offline, someone else's repository, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else "no message"
        raise ValueError(f"--push-to-hub {repo_id}: not pushed ({type(e).__name__}: {reason}), and nothing written; "
                         f"be online and logged in (hf auth login, or set HF_TOKEN), then run again") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .pt checkpoint of train_gpt2.py, or of train_caption.py (its language "
                   "model; all of it with --captioner)")
    p.add_argument("out_dir", help="the folder to write (made if missing; an earlier export there is replaced as a "
                   "whole, once the new one is complete)")
    # A caption checkpoint gives its language model unless asked: that is what transformers and lm-eval read, and
    # what this command wrote before --captioner existed, so the commands and scripts written for it still work
    p.add_argument("--captioner", action="store_true", help="a caption checkpoint whole, cross-attention and "
                   "image encoder record included, for Captioner.from_pretrained and sample.py (not transformers)")
    p.add_argument("--push-to-hub", metavar="USER/NAME", help="then upload the folder to this Hugging Face hub "
                   "repository (made if missing); log in first: hf auth login, or set HF_TOKEN")
    args = p.parse_args(argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f"{args.out_dir}: is a file, not a folder")
    if args.push_to_hub is not None and not is_hub_id(args.push_to_hub):
        p.error(f"--push-to-hub {args.push_to_hub}: not a hub repository id, USER/NAME (letters, digits, - _ .)")
    return args


def whole_captioner(args, model, checkpoint):
    """--captioner: the checkpoint's image encoder record (coco.trained_encoder), which the export keeps. Otherwise None: the
    language model alone is exported, and for a captioner a note says what is left out."""
    if not args.captioner:
        if model.config.cross_attn_every > 0:
            left_out = sum(p.numel() for name, p in model.named_parameters() if is_cross_attn_param(name))
            print(f"export_hf.py: note: {args.checkpoint} is a captioner: its language model is exported; its cross-"
                  f"attention layers and image projection ({left_out:,} parameters) are left out, Hugging Face's "
                  f"GPT-2 has no place for them (--captioner exports it whole)", file=sys.stderr)
        return None
    if checkpoint["kind"] != "caption":
        raise ValueError(f"{args.checkpoint}: a language model; --captioner is for train_caption.py's checkpoints")
    encoder = coco.trained_encoder(checkpoint, args.checkpoint)
    if os.path.isabs(str(encoder["weights"])):  # coco.py records a weights file by its absolute path
        print(f"export_hf.py: note: the image encoder's weights are a file on this machine, {encoder['weights']}: the "
              f"export loads elsewhere only with that file at that path", file=sys.stderr)
    return encoder


def main(argv=None):
    args = parse_args(argv)
    model, checkpoint = load_model(args.checkpoint)
    encoder = whole_captioner(args, model, checkpoint)
    load_from = args.push_to_hub or args.out_dir
    with export_folder(args.out_dir) as folder:
        if encoder:
            save_captioner(model, checkpoint, folder)
        else:
            save_pretrained(model, folder, language_model_only=True)
        tokenizer_files = read_tokenizer_files()
        if tokenizer_files:
            write_tokenizer(folder, tokenizer_files, model.config.block_size)
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(model_card(model, checkpoint, args.checkpoint, encoder, load_from,
                               load_from if tokenizer_files else "gpt2"))
        if args.push_to_hub:  # from the finished folder, before it replaces out_dir: a failed push changes nothing
            push_to_hub(folder, args.push_to_hub)
    if encoder:
        print(f"{args.out_dir}: config.json, model.safetensors: the whole captioner (sample.Captioner.from_pretrained "
              f"reads them)")
    else:
        print(f"{args.out_dir}: config.json, model.safetensors (transformers.GPT2LMHeadModel.from_pretrained reads "
              f"them)")
    if tokenizer_files:
        print(f"{args.out_dir}: vocab.json, merges.txt, tokenizer_config.json (GPT-2's tokenizer, as tiktoken has it)")
    elif not encoder:  # a captioner is read by sample.py, which tokenizes with tiktoken, not with these files
        print(f"export_hf.py: note: GPT-2's tokenizer files are neither in tiktoken's cache nor downloadable (offline? "
              f"copy a tiktoken cache that has them and set TIKTOKEN_CACHE_DIR to it), so {args.out_dir} has no "
              f"tokenizer; the matching one is AutoTokenizer.from_pretrained(\"gpt2\") (lm_eval: --model_args "
              f"pretrained={args.out_dir},tokenizer=gpt2)", file=sys.stderr)
    print(f"{args.out_dir}: README.md, the model card" + (f"; all pushed to the hub as {args.push_to_hub}"
                                                          if args.push_to_hub else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as e:  # the user's to fix: one line, naming the file
        sys.exit(f"export_hf.py: {e}")
    except KeyboardInterrupt:  # ^C: one line, not a traceback, and the status a shell gives it (128 + SIGINT)
        print("export_hf.py: stopped (Ctrl-C)", file=sys.stderr)  # a previous export is as it was (export_folder)
        sys.exit(130)
