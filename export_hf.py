"""
Export a checkpoint in Hugging Face's GPT-2 format, for the tools that read it (transformers,
lm-evaluation-harness, the Hugging Face hub).

    python export_hf.py log/model_019073.pt out/gpt2-fineweb
    lm_eval --model hf --model_args pretrained=out/gpt2-fineweb --tasks hellaswag

The folder gets what save_pretrained (below) writes, config.json and model.safetensors (transformers' parameter
names and layouts, written with safetensors: transformers is not needed here), and GPT-2's tokenizer:
vocab.json and merges.txt are OpenAI's encoder.json and vocab.bpe, the very files tiktoken's "gpt2" encoding
is built from, read as tiktoken reads them (its cache, else a download). Offline with no cached copy, the command
says so and the folder has no tokenizer: the matching one is transformers' AutoTokenizer.from_pretrained("gpt2")
(for lm_eval: --model_args pretrained=out/gpt2-fineweb,tokenizer=gpt2).

A caption checkpoint (train_caption.py) is exported as its language model: the cross-attention layers and
the image projection are left out, since Hugging Face's GPT-2 has no place for them, and the command says
so. What is left is a text-only GPT-2; after the default caption training, which freezes GPT-2, it is the
language model the captioner started from.

`GPT.from_pretrained(folder)` reads the export back.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

from safetensors import SafetensorError
from safetensors.torch import save_file
from tiktoken.load import read_file_cached

from checkpoint import load_model, why_write_failed
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


EXPORT_FILES = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"}


@contextmanager
def export_folder(out_dir):
    """with export_folder(out_dir) as folder: write the export into `folder`, a new folder beside out_dir, which
    replaces out_dir only once everything is written. A full disk or a kill mid-write leaves the previous export
    whole (never a new config.json beside old weights) and no partial folder. An out_dir holding files that are
    not an export's is refused: replacing the folder would delete them."""
    if os.path.isdir(out_dir):
        others = sorted(set(os.listdir(out_dir)) - EXPORT_FILES)
        if others:
            raise ValueError(f"{out_dir}: holds {others[0]}{' and more' if len(others) > 1 else ''}, not part of an "
                             f"export; choose an empty or new folder")
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=".export_hf.", dir=parent)
    except OSError as e:
        raise ValueError(f"{out_dir}: cannot write there ({e.strerror})") from None
    try:
        yield folder
        old = folder + ".old"
        if os.path.isdir(out_dir):
            os.rename(out_dir, old)  # two renames within one folder: a kill between them leaves both, named
        os.rename(folder, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as e:  # a full disk, mostly (safetensors reports it as a SafetensorError)
        shutil.rmtree(folder, ignore_errors=True)
        raise ValueError(f"{out_dir}: export not written ({why_write_failed(e, parent)}); the previous one, if any, "
                         f"is as it was") from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .pt checkpoint of train_gpt2.py, or of train_caption.py (its language model)")
    p.add_argument("out_dir", help="the folder to write (made if missing; an earlier export there is replaced as a "
                   "whole, once the new one is complete)")
    args = p.parse_args(argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f"{args.out_dir}: is a file, not a folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    model, _ = load_model(args.checkpoint)
    if model.config.cross_attn_every > 0:
        left_out = sum(p.numel() for name, p in model.named_parameters() if is_cross_attn_param(name))
        print(f"export_hf.py: note: {args.checkpoint} is a captioner: its language model is exported; its cross-"
              f"attention layers and image projection ({left_out:,} parameters) are left out, Hugging Face's GPT-2 "
              f"has no place for them", file=sys.stderr)
    with export_folder(args.out_dir) as folder:
        save_pretrained(model, folder, language_model_only=True)
        tokenizer_files = read_tokenizer_files()
        if tokenizer_files:
            write_tokenizer(folder, tokenizer_files, model.config.block_size)
    print(f"{args.out_dir}: config.json, model.safetensors (transformers.GPT2LMHeadModel.from_pretrained reads them)")
    if tokenizer_files:
        print(f"{args.out_dir}: vocab.json, merges.txt, tokenizer_config.json (GPT-2's tokenizer, as tiktoken has it)")
    else:
        print(f"export_hf.py: note: GPT-2's tokenizer files are neither in tiktoken's cache nor downloadable (offline? "
              f"copy a tiktoken cache that has them and set TIKTOKEN_CACHE_DIR to it), so {args.out_dir} has no "
              f"tokenizer; the matching one is AutoTokenizer.from_pretrained(\"gpt2\") (lm_eval: --model_args "
              f"pretrained={args.out_dir},tokenizer=gpt2)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as e:  # the user's to fix: one line, naming the file
        sys.exit(f"export_hf.py: {e}")
