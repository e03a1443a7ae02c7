"""
Captioned images -> frozen image features (CLIP's, or a timm ViT's), computed once, for train_caption.py. The images and captions
come from COCO 2017, from one of Karpathy's split files (COCO, Flickr8k, Flickr30k), or from your own jsonl.

    python coco.py --download                 # fetch COCO 2017 (~19 GB) into coco/, extract it, encode every image
    python coco.py --coco-dir /data/coco      # an existing copy: annotations/, train2017/, val2017/
    python coco.py --coco-dir /data/coco --encoder ViT-L-14-quickgelu --out-dir coco_features_l14
    python coco.py --coco-dir /data/coco --encoder timm:vit_base_patch14_dinov2.lvd142m --image-size 224 \
        --out-dir coco_features_dinov2                                # DINOv2 (any timm ViT; 257 x 768 tokens)
    python coco.py --coco-dir /data/coco --karpathy-json dataset_coco.json --out-dir coco_features_karpathy
    python coco.py --karpathy-json dataset_flickr8k.json --images-dir flickr8k/images --out-dir flickr8k_features
    python coco.py --captions-jsonl my_images/captions.jsonl --out-dir my_features   # your own images
    python coco.py --limit 500                # the first 500 images of each split (a later full run continues it)
    python coco.py --download --karpathy-json data/dataset_coco.json --images-dir data/coco2014 --fetch-images \
        --limit 3000 --out-dir coco_features_3k   # no 19 GB archive: his file, then each image from COCO's server

Your own images: one JSON object per line, the image's path relative to the jsonl file and its captions,

    {"image": "photos/0001.jpg", "captions": ["a dog on a beach", "a brown dog runs by the sea"], "split": "train"}

with "split" train, val or test, or left out: then --val-fraction (0.05) of those lines go to val, the same
ones in every run (a fixed seed), and the rest to train. Their image ids are the line numbers.

The caption decoder never changes the image encoder, so every image is encoded once, here, and training reads
the stored result. We keep all of CLIP's output tokens, not just the one pooled vector: for ViT-B/32 the CLS
token and the 7x7 patches, 50 tokens of width 768, taken after the final LayerNorm `ln_post` and before the
projection to CLIP's joint text-image space. That projection (768 -> 512) was only ever trained on the pooled
CLS token, to match it with a caption; the tokens before it hold what the ViT computed for every patch, and the
decoder cross-attends to them, so it can look at where things are in the picture. Others skip that projection
too but take other tokens. SmallCap cross-attends to the same shape, 50 x 768, but not the same tokens: its
src/extract_features.py keeps Hugging Face CLIPVisionModel's last_hidden_state, which comes before that model's
post_layernorm (only the pooled CLS token goes through it). LLaVA takes the patch tokens (no CLS) of the layer
before last and passes them through a projector of its own, learned (a linear layer in LLaVA, a two-layer MLP in
LLaVA-1.5: llava/model/multimodal_projector/builder.py).

A timm encoder gives its last layer's tokens as its forward_features returns them (DINOv2 ViT-B/14 at 224 px:
CLS and 16x16 patches, 257 of width 768), from pixels normalised with its own mean and std. Whether they are
normalised depends on where timm put the final norm. A ViT that pools its CLS token (DINOv2, ImageNet ViTs such
as vit_base_patch16_224) applies it to every token, as CLIP's ln_post does, and so does DINOv3 (timm builds it
with use_fc_norm=False). A ViT that averages its tokens may instead normalise only the average: its `norm` is
then an Identity and its `fc_norm` the LayerNorm (eva02_base_patch14_224, vit_betwixt_patch16_reg4_gap_256), and
its tokens come out un-normalised.

On disk, per split (train, val; or train, val, test with Karpathy's split, or a jsonl that names test):

    coco_features/meta.json                the encoder (name, weights, preprocessing), n_tokens, width, splits,
                                           source, skipped images
    coco_features/{split}_features.npy     (N, 50, 768) float16, memory-mapped; row i is image i of the index
    coco_features/{split}_index.json       per row: image_ids, files, captions, tokens (GPT-2, no <|endoftext|>)
    coco_features/{split}_status.npy       (N,) int8 per row: 0 to do, 1 encoded, -1 missing or unreadable (skipped)

float16 halves float32's disk and memory (train2017: 118,287 x 50 x 768 is 9.1 GB instead of 18). Normalised
tokens (CLIP's, and those of the timm ViTs above that normalise every token) fit fp16's range (65504) unless the
norm's learned gain is enormous: a LayerNorm's normalised values stay below sqrt(width) in size (~28 for 768),
so only a gain above ~2,300 could take them past it (the trained encoders' gains are not measured here). fp16
keeps more mantissa bits (10) than the bf16 (7) the decoder usually computes in. For un-normalised tokens that
range is not guaranteed: a value past 65504 is stored as inf, and nothing in coco.py checks for one. (The
decoder's ln_img, after img_proj, rescales any finite value; an inf turns into NaN there, and a training batch
holding that image gets a NaN loss, on which train_caption.py's guard, check_finite, stops the run.)

Extraction is resumable: the status file is rewritten after every batch, so a killed run continues where it
stopped, and a finished split is left alone. Every split's files are made, their disk space taken, before the
first image is encoded: a disk too small says so at the start, not hours in. A missing or corrupt image is
reported by name and left out (load_split never serves its row); it is never filled with zeros. A damaged
feature file (cut short, say) is named and left as it is: neither coco.py nor load_split goes on from it.

In this file the core comes first, in the order the data flows: clip_tokens (an image -> its tokens),
extract_split (a split's images -> the files above, resumably), Split and load_split (the files -> what training
reads); then how the encoder that extract_split runs is built (ImageEncoder, load_encoder, load_clip) and how
the images reach it (ImageFiles). Then, under "The rest": downloading COCO, the caption sources,
loading timm encoders, the split files' checks and resume bookkeeping, meta.json, the command line. From Python:

    split = coco.load_split("coco_features", "train")     # .image_feats(rows), .captions, .tokens, .image_ids
    encoder = coco.load_encoder("ViT-B-32-quickgelu", "openai", "cuda")
    encoder(torch.stack([encoder.preprocess(image)]))     # (1, 3, 224, 224) preprocessed -> (1, 50, 768)
"""

import argparse
import errno
import http.client
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from generate import gpt2_encoding
from training import HelpFormatter, OutDirLock, existing_device, probe_write, use_device


# -----------------------------------------------------------------------------
# The core: an image -> its encoder's tokens -> a split's images encoded into files, once -> read back as a Split

TODO, DONE, SKIPPED = 0, 1, -1  # a row's state in {split}_status.npy


def clip_tokens(clip_model, images):
    """(B, 3, 224, 224) preprocessed images -> (B, N, width), ViT-B/32 (B, 50, 768), ViT-L/14 (B, 257, 1024):
    every token of CLIP's ViT (CLS and patches) after its final LayerNorm `ln_post`, before pooling and projection."""
    # open_clip applies ln_post to every token, then keeps only CLS (and `output_tokens=True` gives the patches
    # without CLS): a forward hook on ln_post catches them all on the way through.
    ln_post = getattr(clip_model.visual, "ln_post", None)  # a ResNet CLIP has none
    captured = []
    hook = ln_post and ln_post.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        clip_model.encode_image(images)
    finally:
        hook and hook.remove()
    if len(captured) != 1 or captured[0].dim() != 3:  # also: a ViT whose ln_post comes after pooling
        raise ValueError(f"{type(clip_model.visual).__name__}: no ln_post over the token sequence; coco.py "
                         f"needs a plain CLIP ViT")
    return captured[0]  # (B, N, width)


def extract_split(split, images, encoder, out_dir, features, status, batch_size=256, num_workers=0,
                  device="cpu"):
    """Encode a split's images into its features memmap, continuing from its status (open_split gives both),
    which is rewritten to {split}_status.npy after every batch. Returns the file names of the images that could
    not be read."""
    todo = np.flatnonzero(status == TODO)  # rows still to encode, in order
    if len(todo) == 0:
        print(f"{split}: {len(images)} images already done")
    else:
        dataset = ImageFiles([images[row].path for row in todo], encoder.preprocess)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=collate_images, pin_memory=device.startswith("cuda"))
        try:
            for positions, pixels, bad in tqdm(loader, desc=f"{split} features", unit="batch"):
                for position, reason in bad:
                    tqdm.write(f"coco.py: {images[todo[position]].path}: {reason}, skipped", file=sys.stderr)
                status[todo[[position for position, _ in bad]]] = SKIPPED
                if positions:
                    rows = todo[positions]
                    feats = encoder(pixels.to(device))  # (B, n_tokens, width)
                    features[rows] = feats.to(torch.float16).cpu().numpy()  # fp16: see the top of the file
                    features.flush()  # the features reach the disk before the status says they are there
                    status[rows] = DONE
                write_status(split_file(out_dir, split, "status"), status)
        except RuntimeError as e:
            if str(e).startswith("DataLoader worker"):  # killed: by the OOM killer, most often
                raise worker_died(e, split) from None
            raise
    skipped = [images[row].file for row in np.flatnonzero(status == SKIPPED)]
    if skipped:
        print(f"{split}: {len(skipped)} missing or unreadable images left out (listed in meta.json): "
              f"{', '.join(skipped[:5])}"
              f"{', ...' if len(skipped) > 5 else ''}")
    require_some_encoded(status, split)
    return skipped


@dataclass
class Split:
    """A split's encoded images, row-aligned: image_ids[i], captions[i], tokens[i] and image_feats([i]) are all
    the same picture. Images that could not be read are not in it."""
    all_features: np.ndarray  # (N_file, n_tokens, width) float16, memory-mapped: every row of the file
    rows: np.ndarray  # (N,) int64: the rows of all_features that hold an encoded image
    image_ids: np.ndarray  # (N,) int64: image ids (Record.image_id)
    files: list  # N file names, e.g. '000000000042.jpg' (Record.file)
    captions: list  # N lists of reference captions (5 or more per image in COCO)
    tokens: list  # N lists of GPT-2 token lists, one per caption, without <|endoftext|>

    def __len__(self):
        return len(self.rows)

    def image_feats(self, indices):
        """Images `indices` (0..N-1) -> (len(indices), n_tokens, width) float16 tensor, read from disk now."""
        return torch.from_numpy(np.asarray(self.all_features[self.rows[indices]]))

    def first(self, n):
        """The first n images only (quick evaluations)."""
        return replace(self, rows=self.rows[:n], image_ids=self.image_ids[:n], files=self.files[:n],
                       captions=self.captions[:n], tokens=self.tokens[:n])

    @property
    def n_tokens(self):
        return self.all_features.shape[1]

    @property
    def width(self):
        return self.all_features.shape[2]


def load_split(features_dir, split):
    """What coco.py wrote for one split -> Split. Refuses an unfinished extraction."""
    index_path, status_path, features_path = (split_file(features_dir, split, kind)
                                              for kind in ("index", "status", "features"))
    for path in (index_path, status_path, features_path):
        require(path, "file", f" (write it with: python coco.py --out-dir {features_dir})")
    status = read_status(status_path, split)
    if (status == TODO).any():
        raise ValueError(f"{status_path}: {int((status == TODO).sum())} of {len(status)} images not encoded yet; "
                         f"run coco.py again to finish")
    require_some_encoded(status, status_path)
    index = read_index(index_path, split)
    features = read_features(features_path, split)
    check_rows(features_path, split, features, status, len(index["image_ids"]))
    rows = np.flatnonzero(status == DONE)
    pick = lambda values: [values[row] for row in rows]
    return Split(features, rows, np.array(pick(index["image_ids"]), dtype=np.int64), pick(index["files"]),
                 pick(index["captions"]), pick(index["tokens"]))


class ImageEncoder:
    """A frozen vision transformer as the decoder sees it: (B, 3, S, S) preprocessed pixels -> (B, n_tokens,
    width), every token of its last layer (after the final LayerNorm for CLIP and for most timm ViTs, not for
    those that normalise only the pooled average: see the top of the file). `record` says how to build it again
    (meta.json and every caption checkpoint keep it, so sample.py encodes a new photo as the training images
    were): name, weights, image_size (S), prefix_tokens (the tokens ahead of the patch grid: CLS, and any
    registers) and preprocess (what the preprocessing does, as JSON)."""

    def __init__(self, tokens, preprocess, record):
        self.tokens, self.preprocess, self.record = tokens, preprocess, record

    @torch.no_grad()
    def __call__(self, pixels):
        return self.tokens(pixels)  # (B, n_tokens, width)


def load_encoder(name, weights=None, device="cpu", image_size=None):
    """name: an open_clip model ('ViT-B-32-quickgelu') or 'timm:' + a timm model ('timm:vit_small_patch14_dinov2
    .lvd142m'). weights: an open_clip tag (default 'openai'), 'pretrained' (timm's own, the default for timm),
    a local weights file, or 'none': random weights from a fixed seed, the same in every process (tests).
    image_size: timm only, another input side than the pretrained one (the position embeddings are resampled).
    -> ImageEncoder, in eval mode, float32, on device."""
    weights = weights or default_weights(name)
    if name.startswith("timm:"):
        model, preprocess = load_timm(name[len("timm:"):], weights, device, image_size)
        # DINOv2/v3's register tokens (4 extra tokens, with CLS, ahead of the patches) are kept: cross-attention
        # learns which tokens to read, and registers hold image-wide information, as CLS does.
        tokens, prefix_tokens = model.forward_features, model.num_prefix_tokens
    else:
        clip_model, preprocess = load_clip(name, weights, device)
        tokens, prefix_tokens = (lambda pixels: clip_tokens(clip_model, pixels)), 1
    record = {"name": name, "weights": weights, "image_size": input_side(preprocess), "prefix_tokens": prefix_tokens,
              "preprocess": describe_preprocess(preprocess)}
    if image_size is not None and image_size != record["image_size"]:
        raise ValueError(f"{name}: its input is {record['image_size']} px; --image-size works for timm models only")
    return ImageEncoder(tokens, preprocess, record)


def default_weights(name):
    """--encoder-weights when none is given: OpenAI's CLIP weights, or a timm model's own pretrained ones."""
    return "pretrained" if name.startswith("timm:") else "openai"


def load_clip(model_name, pretrained, device):
    """-> (clip_model, preprocess). OpenAI's CLIP was trained with QuickGELU, x * sigmoid(1.702 x): pair its
    weights with the '-quickgelu' model names. The plain names ('ViT-B-32') build exact GELU, load the weights
    all the same (open_clip only logs a warning), and give subtly worse features."""
    import open_clip  # here, not at the top: it takes seconds to import, and load_split does not need it
    if not (model_name in open_clip.list_models() or model_name.startswith(("hf-hub:", "local-dir:"))):
        raise ValueError(f"{model_name}: not an open_clip model name (see open_clip.list_models()), nor timm:NAME")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tags and pretrained not in ("none", *tags) and not os.path.isfile(pretrained):
        what = "a folder, not a weights file" if os.path.isdir(pretrained) else "no such weights file"
        raise FileNotFoundError(f"{pretrained}: {what}, nor a tag of {model_name} (its tags: "
                                f"{', '.join(tags[:3])}{', ...' if len(tags) > 3 else ''})")
    try:
        # 'none': seed 0, in a forked RNG so the caller's stays as it was. open_clip builds on the CPU first,
        # so the weights are the same on every device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip_model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=None if pretrained == "none" else pretrained, device=device)
    except Exception as e:  # offline hub, a damaged or mismatched file: the user's to fix, not a bug
        raise weights_error(pretrained, model_name, e) from None
    return clip_model.eval(), preprocess


class ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses images in DataLoader worker processes: decoding JPEGs, not the ViT, is the slow
    part on a GPU machine. A file that cannot be used gives, instead of its pixels, the reason why."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if not os.path.isfile(self.paths[i]):
            return i, "no such file"  # a gap in the user's copy of COCO, not a broken image
        try:
            with Image.open(self.paths[i]) as image:
                return i, self.preprocess(rgb_image(image))  # rgb_image decodes: a truncated file fails here
        except Image.DecompressionBombError:
            return i, "too large to decode safely"
        except (OSError, SyntaxError, ValueError):
            return i, "not a readable image"


def rgb_image(image):
    """A PIL image -> 8-bit RGB, what encoders take. convert("RGB") clips deeper pixels to 0..255: a 16-bit
    mid-grey (32,896) came out white, a float one (0.5) black. So those are scaled to 0..255 first: 16-bit
    modes ("I;16", "I;16B") by their bit depth, integer ("I") and float ("F") ones, which do not say their
    range, by the smallest of 0..1, 0..255, 0..65535 that holds their brightest pixel, else by that pixel."""
    if not (image.mode in ("I", "F") or image.mode.startswith("I;16")):
        return image.convert("RGB")  # 8 bits a channel already, or fewer (1-bit, palette)
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))  # (H, W): these modes have one channel
    brightest = pixels.max(initial=0)
    full = 65535 if image.mode.startswith("I;16") else next(top for top in (1, 255, 65535, brightest)
                                                             if brightest <= top)
    return Image.fromarray(np.round(np.clip(pixels / full, 0, 1) * 255).astype(np.uint8)).convert("RGB")


def collate_images(items):
    """[(position, pixels or why not)] -> (positions of the decoded images, their pixels (B, 3, H, W) or None,
    [(position, why not)] of the others). Bad images leave the batch here, so they are never encoded."""
    good = [(i, pixels) for i, pixels in items if torch.is_tensor(pixels)]
    bad = [(i, reason) for i, reason in items if not torch.is_tensor(reason)]
    pixels = torch.stack([pixels for _, pixels in good]) if good else None
    return [i for i, _ in good], pixels, bad


# -----------------------------------------------------------------------------
# The rest: downloading COCO, the caption sources (COCO, Karpathy, Flickr, jsonl), loading timm encoders, the split
# files' checks and resume bookkeeping, meta.json, the command line

COCO_URLS = {  # the official archives; each unpacks into the folder of its name
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",  # 241 MB
    "train2017": "http://images.cocodataset.org/zips/train2017.zip",  # 18 GB, 118,287 images
    "val2017": "http://images.cocodataset.org/zips/val2017.zip",  # 778 MB, 5,000 images
}


def download(url, path, progress=True):
    """Resumable download: bytes go to path.part, and a rerun asks the server only for those it does not have yet
    (an HTTP Range request). Only a file of the size the server announced is renamed to path. progress: a tqdm
    bar of its bytes (not for the images of --fetch-images: they have one bar for them all)."""
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # "range not satisfiable": the .part already holds every byte
            os.replace(part, path)
            return
        raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise OSError(f"{url}: {e.reason} (offline? or put the file at {path} by hand)") from None
    with response:
        if have and response.status != 206:  # the server ignored the range and sends everything: start again
            have = 0
        total = announced_size(response, have)
        try:
            with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                                desc=os.path.basename(path),
                                                                disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # a dropped connection: what arrived stays in .part
            raise OSError(f"{url}: download interrupted ({type(e).__name__}); run again to continue") from None
    got = os.path.getsize(part)
    if total is not None and got != total:
        raise OSError(f"{part}: got {got:,} of {total:,} bytes; run again to continue")
    os.replace(part, path)


def announced_size(response, have):
    """The whole file's size in bytes: from 'Content-Range: bytes 100-999/1000' when resuming, otherwise
    from Content-Length (plus what we already have). None if the server does not say."""
    content_range = re.fullmatch(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
    if content_range:
        return int(content_range.group(1))
    length = response.headers.get("Content-Length")
    return have + int(length) if length is not None else None


def extract(archive, folder, names=None):
    """Unzip (only the members `names`, if given) into a scratch folder, then move what it made into folder: an
    interrupted extraction leaves nothing that looks complete. zipfile checks every member's CRC-32 as it reads
    it, so extracting is also the integrity check (what zipfile.testzip would do, without reading 18 GB twice)."""
    scratch = archive + ".extracting"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            members = [z.getinfo(name) for name in names] if names else z.infolist()  # KeyError: not in it
            for member in tqdm(members, desc=f"extracting {os.path.basename(archive)}", unit="file"):
                z.extract(member, scratch)
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError) as e:
        shutil.rmtree(scratch, ignore_errors=True)
        os.remove(archive)  # the size matched but the content is bad: only a fresh download can help
        raise OSError(f"{archive}: damaged archive ({e}); deleted it, run again to download it anew") from None
    for name in os.listdir(scratch):
        os.replace(os.path.join(scratch, name), os.path.join(folder, name))
    os.rmdir(scratch)


def download_coco(coco_dir):
    """Download and extract the three archives that are not extracted yet. Needs ~40 GB of disk while an
    archive and its extracted copy both exist; each archive is deleted once extracted."""
    os.makedirs(coco_dir, exist_ok=True)
    for folder, url in COCO_URLS.items():
        if os.path.isdir(os.path.join(coco_dir, folder)):
            continue
        archive = os.path.join(coco_dir, os.path.basename(url))
        if not os.path.exists(archive):
            download(url, archive)
        extract(archive, coco_dir)
        os.remove(archive)


KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"  # from his page, 37 MB
KARPATHY_FILES = ("dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json")  # what that zip holds


def download_karpathy_json(path):
    """His caption_datasets.zip, downloaded beside path; of his three files only the one named like path is
    extracted, to path, and the archive is deleted."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    archive = os.path.join(folder, os.path.basename(KARPATHY_URL))
    if not os.path.exists(archive):
        download(KARPATHY_URL, archive)
    extract(archive, folder, [os.path.basename(path)])
    os.remove(archive)


# COCO's image server, where COCO_URLS's archives are: every image of COCO 2014 is also there on its own, at
# train2014/ or val2014/ + its file name, the filepath and filename of Karpathy's dataset_coco.json
COCO_IMAGES = "http://images.cocodataset.org"
# an image is ~155 KB (COCO 2014's archives: ~19 GB for 123,287 images), so a request is mostly waiting for the
# server's answer, not transferring (a guess, not measured): 8 at once hide that wait, and ask a public server
# for little more than a browser does (6 connections to one site)
FETCH_THREADS = 8


def fetch_images(splits, images_dir):
    """--fetch-images: the images of these splits that are not in images_dir yet, each from COCO's image server
    (download: through a .part, so a file there is whole). One that fails is named and left out, as a missing
    image is, and tried again by the next run. When 3 fail in a row (the network is down, from the start or
    since), or more than a tenth of those tried and at least 3, it stops; the images fetched so far are kept."""
    missing = [image for images in splits.values() for image in images if not os.path.exists(image.path)]
    pool, failed, in_a_row = ThreadPoolExecutor(FETCH_THREADS), 0, 0
    try:
        tries = [pool.submit(fetch_image, image) for image in missing]
        for tried, done in enumerate(tqdm(as_completed(tries), total=len(tries), desc=f"images into {images_dir}",
                                          unit="image"), start=1):
            try:
                done.result()
                in_a_row = 0
            except OSError as e:
                failed, in_a_row = failed + 1, in_a_row + 1
                if in_a_row == 3 or failed >= 3 and failed > tried / 10:
                    raise OSError(f"{e}; {failed} of {tried} images failed, stopped") from None
                tqdm.write(f"coco.py: {e}; left out", file=sys.stderr)
    finally:
        pool.shutdown(cancel_futures=True)  # stopped: those not started yet are not


def fetch_image(image):
    os.makedirs(os.path.dirname(image.path), exist_ok=True)
    download(f"{COCO_IMAGES}/{image.file}", image.path, progress=False)  # image.file: train2014/COCO_train2014_...


# -----------------------------------------------------------------------------
# Captions and splits: each source has its own small reader, and every reader gives the same {split: [Record]},
# sorted by image id. From there on coco.py does not ask where an image came from.


class Record(NamedTuple):
    """One captioned image of a split."""
    image_id: int  # COCO's id; in Karpathy's files his cocoid, else his imgid (Flickr); in a jsonl its line number
    path: str  # where to read the image
    file: str  # its name in the index: COCO 2017's file name, Karpathy's filepath/filename, or the jsonl's "image"
    captions: list  # its reference captions, stripped (clean_captions)


def clean_captions(captions, what):
    """Every source's one rule: captions are stripped (a few COCO captions end in a space or a newline; stripped,
    every caption tokenizes the same way), blank ones are dropped (as a target, a blank caption would teach the
    decoder to stop at once), and an image keeps at least one: without one it could be neither trained on nor
    scored."""
    if not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
        raise ValueError(f"{what} must be a list of strings")
    kept = [caption.strip() for caption in captions if caption.strip()]
    if not kept:
        raise ValueError(f"{what}: none that is not blank")
    return kept


def require(path, kind, hint=""):
    """FileNotFoundError naming path unless it is a `kind` ('file' or 'folder'). A folder where a file should
    be, or the other way round, is said as such: "no such file" would send the user looking for it."""
    if (os.path.isdir if kind == "folder" else os.path.isfile)(path):
        return
    if os.path.exists(path):
        raise FileNotFoundError(f"{path}: is a {'file' if kind == 'folder' else 'folder'}, not a {kind}")
    raise FileNotFoundError(f"{path}: no such {kind}{hint}")


def read_captions(coco_dir, split):
    """annotations/captions_{split}.json (the official schema), split 'train2017' or 'val2017' -> [Record] by id."""
    path = os.path.join(coco_dir, "annotations", f"captions_{split}.json")
    image_dir = os.path.join(coco_dir, split)
    hint = " (pass --download to fetch COCO 2017 into --coco-dir)"
    require(path, "file", hint)
    require(image_dir, "folder", hint)
    try:
        with open(path) as f:
            annotations = json.load(f)
        files = {image["id"]: image["file_name"] for image in annotations["images"]}
        captions = {image_id: [] for image_id in files}
        for annotation in sorted(annotations["annotations"], key=lambda annotation: annotation["id"]):
            captions[annotation["image_id"]].append(annotation["caption"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    records = []
    for image_id in sorted(files):
        try:
            records.append(Record(image_id, os.path.join(image_dir, files[image_id]), files[image_id],
                                  clean_captions(captions[image_id], "its captions")))
        except ValueError as e:
            raise ValueError(f"{path}: image {image_id} ({files[image_id]}): {e}") from None
    return records


# Karpathy's split files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json, from his
# caption_datasets.zip) share one schema: {"images": [{"filename", "split", "sentences": [{"raw", "tokens"}],
# "imgid"}, ...]}, and in the COCO file also "filepath" (train2014 or val2014) and "cocoid". His 'restval' (the
# COCO 2014 val images he did not hold out) is training data, as in every paper that uses his split.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def not_karpathy(karpathy_json, error):
    return ValueError(f"{karpathy_json}: not one of Karpathy's dataset_*.json files ({type(error).__name__}: "
                      f"{error})")


def read_karpathy_json(karpathy_json):
    """-> the file's list of images (dicts), unchecked: the readers below name what is missing."""
    require(karpathy_json, "file", " (--download fetches it)" if os.path.basename(karpathy_json) in KARPATHY_FILES
            else "")
    try:
        with open(karpathy_json, "rb") as f:
            images = json.load(f)["images"]
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, or JSON without "images"
        raise not_karpathy(karpathy_json, e) from None
    if not images:
        raise ValueError(f"{karpathy_json}: lists no images")
    return images


def read_karpathy_splits(karpathy_json):
    """Karpathy's dataset_coco.json -> {cocoid: 'train' | 'val' | 'test'}: his split of COCO's images."""
    try:  # a cocoid "42" would match no COCO image, and be left out
        return {whole_number(image["cocoid"], f"{karpathy_json}: cocoid"): KARPATHY_SPLITS[image["split"]]
                for image in read_karpathy_json(karpathy_json)}
    except KeyError as e:
        if e.args == ("cocoid",):  # one of his Flickr files: their images are not in --coco-dir
            raise ValueError(f"{karpathy_json}: has no COCO ids (a Flickr file?); pass the folder of its images as "
                             f"--images-dir") from None
        raise not_karpathy(karpathy_json, e) from None
    except TypeError as e:
        raise not_karpathy(karpathy_json, e) from None


def whole_number(image_id, what):
    """An image id as it is stored (int64, sorted as a number), or a ValueError naming it: "7" sorts after "10"."""
    if type(image_id) is not int:
        raise ValueError(f"{what} {json.dumps(image_id)} is not a whole number")
    return image_id


def karpathy_splits(karpathy_json, images_dir):
    """Any of Karpathy's three files, with the folder of its images -> {'train', 'val', 'test'}, captions his
    'raw' sentences. An image is images_dir/filepath/filename, and Flickr's have no filepath: a Flickr folder
    holds all its images, a COCO 2014 one holds train2014/ and val2014/. Ids: COCO's cocoid where the file has
    one (the ids of COCO's own annotations), else his imgid (0, 1, ... in the file's order)."""
    splits, first = {"train": [], "val": [], "test": []}, {}
    for image in read_karpathy_json(karpathy_json):
        try:
            file = os.path.join(image.get("filepath", ""), image["filename"])
            image_id, split = image.get("cocoid", image["imgid"]), KARPATHY_SPLITS[image["split"]]
            captions = [sentence["raw"] for sentence in image["sentences"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise not_karpathy(karpathy_json, e) from None
        # an image without sentences, in any split, is an error, as a jsonl line without captions is: no
        # reference to train on or to score against, and a file that lost some is better fixed than trimmed
        try:
            record = Record(whole_number(image_id, "its id"), os.path.join(images_dir, file), file,
                            clean_captions(captions, "its sentences"))
        except ValueError as e:
            raise ValueError(f"{karpathy_json}: {file}: {e}") from None
        same = first.setdefault(os.path.realpath(record.path), file)  # one picture, two names: in two splits?
        if same != file:
            raise ValueError(f"{karpathy_json}: {file} and {same} are one image; list each image once")
        splits[split].append(record)
    return {split: sorted(records) for split, records in splits.items()}


def parse_jsonl_line(line):
    """One line of a captions jsonl -> (image, captions, split or None). ValueError saying what is wrong."""
    try:
        entry = json.loads(line)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(entry, dict):
        raise ValueError('not a JSON object like {"image": "a.jpg", "captions": ["..."]}')
    image, split = entry.get("image"), entry.get("split")
    if not (isinstance(image, str) and image.strip()):
        raise ValueError('"image" must be the path of an image, relative to the jsonl file')
    captions = clean_captions(entry.get("captions"), '"captions"')
    if split not in (None, "train", "val", "test"):
        raise ValueError(f'"split" must be "train", "val" or "test" (or left out), not {json.dumps(split)}')
    return image, captions, split


def assign_splits(splits, val_fraction, seed=0):
    """Each line's split or None -> each line's split: of the lines without one, val_fraction (at least one, if
    the fraction is above 0) go to val, the rest to train. The seed is fixed so that every run cuts the same
    way: a killed run continues with the images it started on."""
    unsplit = [row for row, split in enumerate(splits) if split is None]
    n_val = max(1, round(val_fraction * len(unsplit))) if val_fraction > 0 and unsplit else 0
    to_val = set(np.random.default_rng(seed).permutation(unsplit)[:n_val].tolist())
    return [split or ("val" if row in to_val else "train") for row, split in enumerate(splits)]


def jsonl_splits(captions_jsonl, val_fraction=0.05):
    """Your own captioned images: one {"image", "captions", "split" (optional)} per line -> {'train', 'val'} and
    'test' if a line asks for it. An image's id is its line number, so an id in a log leads back to its line."""
    require(captions_jsonl, "file")
    folder = os.path.dirname(captions_jsonl)
    records, splits, line_of = [], [], {}  # line_of: an image's real path -> (the line, the name) that gave it
    with open(captions_jsonl, "rb") as f:  # bytes: a line that is not UTF-8 is named like any other bad line
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing one, say) hold no image
            try:
                image, captions, split = parse_jsonl_line(line)
                # listed twice it could land in train and in val, also under two names (./a.jpg and a.jpg, an
                # absolute path, a symlink): what the paths resolve to is compared
                real_path = os.path.realpath(os.path.join(folder, image))
                first, name = line_of.setdefault(real_path, (number, image))
                if first != number:
                    raise ValueError(f"{image} is on line {first} already (as {name}); give each image once, with "
                                     f"all its captions")
            except ValueError as e:
                raise ValueError(f"{captions_jsonl}, line {number}: {e}") from None
            records.append(Record(number, os.path.join(folder, image), image, captions))
            splits.append(split)
    splits = assign_splits(splits, val_fraction)
    by_split = {name: [record for record, split in zip(records, splits) if split == name]
                for name in ("train", "val", "test")}
    for name in ("train", "val"):  # train_caption.py reads both
        if not by_split[name]:
            raise ValueError(f'{captions_jsonl}: no {name} images (mark some lines "split": "{name}", or leave '
                             f'"split" out of some and set --val-fraction)')
    if not by_split["test"]:
        del by_split["test"]  # a test split only when asked for: caption_eval.py would score an empty one
    return by_split


def coco_splits(coco_dir, karpathy_json=None):
    """{'train', 'val'} as COCO 2017 cuts it, or Karpathy's {'train', 'val', 'test'}: each [Record], sorted by id."""
    train2017, val2017 = read_captions(coco_dir, "train2017"), read_captions(coco_dir, "val2017")
    if karpathy_json is None:
        return {"train": train2017, "val": val2017}
    # Karpathy cut COCO 2014: his val and test images come from val2014, and COCO 2017 moved all but 5,000 of
    # val2014 into train2017. Training on train2017 would train on most of his test set, silently. Instead every
    # image goes to the one split its id has in Karpathy's file, whichever folder its file lies in.
    split_of = read_karpathy_splits(karpathy_json)
    images = sorted(train2017 + val2017)
    unknown = len(split_of) - sum(image.image_id in split_of for image in images)
    if unknown:
        print(f"coco.py: {karpathy_json}: {unknown} images are not in COCO 2017's annotations, left out",
              file=sys.stderr)
    return {split: [image for image in images if split_of.get(image.image_id) == split]
            for split in ("train", "val", "test")}


def read_splits(args):
    """The images and captions of each split, from the source the flags name. train_caption.py reads train and
    val: both must have images; a test split only if it has some (caption_eval.py would score an empty one)."""
    if args.download and args.karpathy_json and not os.path.exists(args.karpathy_json):
        download_karpathy_json(args.karpathy_json)
    if args.captions_jsonl:
        splits = jsonl_splits(args.captions_jsonl, args.val_fraction)
    elif args.images_dir:
        if not args.fetch_images:  # else it is made as the images arrive
            require(args.images_dir, "folder")
        splits = karpathy_splits(args.karpathy_json, args.images_dir)
    else:
        if args.download:
            download_coco(args.coco_dir)
        if not os.path.isdir(args.coco_dir):
            raise FileNotFoundError(f"{args.coco_dir}: no such folder (pass --download to fetch COCO 2017 into it)")
        splits = coco_splits(args.coco_dir, args.karpathy_json)
    for split in ("train", "val"):
        if not splits[split]:
            raise ValueError(f"{args.karpathy_json or args.coco_dir}: no {split} images")
    return {split: images for split, images in splits.items() if images}


def images_dir(args):
    """The folder the index's file names are relative to, kept in meta.json for tools that show the pictures;
    None for COCO 2017, whose names are those in train2017/ or val2017/ of --coco-dir."""
    if args.captions_jsonl:
        return os.path.abspath(os.path.dirname(args.captions_jsonl))
    return os.path.abspath(args.images_dir) if args.images_dir else None


# -----------------------------------------------------------------------------
# Loading a timm encoder (DINOv2, DINOv3, ImageNet ViTs), and the record that says how to build an encoder again


def load_timm(model_name, weights, device, image_size):
    """-> (model, preprocess): a timm vision transformer without its classifier, and the preprocessing of its
    pretrained config (input size, mean, std, resize and crop), at image_size if given."""
    import timm
    if not timm.is_model(model_name):
        raise ValueError(f"{model_name}: not a timm model name (see timm.list_models('vit_*'))")
    if weights not in ("pretrained", "none") and not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: no such weights file (or: pretrained, none)")
    options = {"num_classes": 0, **({"img_size": image_size} if image_size else {}),
               **({"pretrained_cfg_overlay": {"file": weights}} if os.path.isfile(weights) else {})}
    try:
        with torch.random.fork_rng(devices=[]):  # 'none': seed 0, as for CLIP
            torch.manual_seed(0)
            model = timm.create_model(model_name, pretrained=weights != "none", **options)
    except Exception as e:
        raise weights_error(weights, model_name, e) from None
    if not hasattr(model, "num_prefix_tokens"):
        raise ValueError(f"{model_name}: not a vision transformer (no token sequence to cross-attend to)")
    # the pretrained config says 518 px for DINOv2; the model built at image_size says what it now takes
    config = timm.data.resolve_data_config({"input_size": (3, *model.patch_embed.img_size)}, model=model)
    return model.to(device).eval(), timm.data.create_transform(**config)


def weights_error(weights, model_name, e):
    reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return FileNotFoundError(f"{weights}: cannot load {model_name}'s weights ({reason}). Offline? Pass a local "
                             f"weights file as --encoder-weights PATH, or fill the Hugging Face cache (HF_HOME) on "
                             f"a machine with internet and set HF_HUB_OFFLINE=1")


def describe_preprocess(preprocess):
    """The steps of a torchvision preprocessing that decide what the encoder sees, as JSON: resize (side,
    interpolation), centre crop, normalisation (mean, std). sample.py compares them with the recorded ones."""
    if not hasattr(preprocess, "transforms"):  # not a torchvision Compose: nothing to say
        return None
    steps = []
    for step in preprocess.transforms:
        kind = type(step).__name__
        if kind == "Resize":
            steps.append([kind, step.size, str(step.interpolation.value)])
        elif kind == "CenterCrop":
            steps.append([kind, list(step.size)])
        elif kind == "Normalize":
            steps.append([kind, [round(float(m), 6) for m in step.mean], [round(float(s), 6) for s in step.std]])
    return steps


def input_side(preprocess):
    """The side of the square the preprocessing crops (224 for ViT-B/32); None if it crops none."""
    crops = [step for step in getattr(preprocess, "transforms", []) if type(step).__name__ == "CenterCrop"]
    return max(crops[0].size) if crops else None


def encoder_record(saved):
    """meta.json's dict or a caption checkpoint -> its encoder record; also from versions that knew only CLIP
    (they wrote clip_model/clip_pretrained, or clip: {model, pretrained}). None if it records none."""
    if "encoder" in saved:
        return saved["encoder"]
    clip = saved.get("clip") or {"model": saved.get("clip_model"), "pretrained": saved.get("clip_pretrained")}
    if not clip.get("model"):
        return None
    return {"name": clip["model"], "weights": clip["pretrained"], "image_size": None, "prefix_tokens": 1,
            "preprocess": None}


def trained_encoder(checkpoint, path):
    """A caption checkpoint's encoder record; ValueError naming the file if it records none."""
    record = encoder_record(checkpoint)
    if not record:
        raise ValueError(f"{path}: records no image encoder (not written by train_caption.py?)")
    return record


def same_encoder(a, b):
    """Do two records describe the same encoder (what the old CLIP-only ones say of it, at least)?"""
    return all(a[key] == b[key] or None in (a[key], b[key]) for key in ("name", "weights", "image_size", "preprocess"))


def describe_encoder(record):
    size = f", {record['image_size']} px" if record.get("image_size") else ""
    return f"{record['name']} ({record['weights']}{size})"


# -----------------------------------------------------------------------------
# The files of a split on disk: reading them with checks, writing them atomically, resuming, meta.json


def split_file(out_dir, split, kind):
    """kind: 'features' (.npy), 'index' (.json) or 'status' (.npy)."""
    return os.path.join(out_dir, f"{split}_{kind}.{'json' if kind == 'index' else 'npy'}")


def damaged(path, split, reason):
    """The error for a split file that is not what coco.py wrote, naming it and the way out. Re-running alone
    would not help: coco.py continues from these very files."""
    return ValueError(f"{path}: damaged ({reason}); delete {os.path.join(os.path.dirname(path), split)}_* and run "
                      f"coco.py again to encode the {split} images anew")


def read_index(path, split):
    """{split}_index.json -> {'image_ids', 'files', 'captions', 'tokens'}: lists of one length, one item per row."""
    try:
        with open(path, "rb") as f:
            index = json.load(f)
    except ValueError as e:  # bad JSON, bad UTF-8
        raise damaged(path, split, f"not JSON: {e}") from None
    keys = ("image_ids", "files", "captions", "tokens")
    if not (isinstance(index, dict) and all(isinstance(index.get(key), list) for key in keys)
            and len({len(index[key]) for key in keys}) == 1):
        raise damaged(path, split, f"not lists of {', '.join(keys)} of one length")
    return index


def read_status(path, split):
    """{split}_status.npy -> (N,) int8: TODO, DONE or SKIPPED per row."""
    try:
        status = np.load(path)
    except (ValueError, EOFError):  # cut short, empty, or not .npy at all (numpy then talks of pickles)
        raise damaged(path, split, "cut short, or not a .npy file") from None
    if status.dtype != np.int8 or status.ndim != 1 or not np.isin(status, (TODO, DONE, SKIPPED)).all():
        raise damaged(path, split, "not one state (-1, 0 or 1) per image")
    return status


def read_features(path, split, mode="r"):
    """{split}_features.npy -> (N, n_tokens, width) float16, memory-mapped in `mode`. It is opened read-only
    first whatever the mode: numpy's "r+" extends a file that was cut short with zeros, without a word, and
    those zeros would be served as the features of images marked encoded."""
    try:
        features = np.load(path, mmap_mode="r")
    except (ValueError, EOFError):
        raise damaged(path, split, "cut short, or not a .npy file") from None
    if features.dtype != np.float16 or features.ndim != 3:
        raise damaged(path, split, f"{features.dtype} of shape {features.shape}, not (images, tokens, width) float16")
    return features if mode == "r" else np.load(path, mmap_mode=mode)


def check_rows(features_path, split, features, status, n_images):
    """The three files of a split agree on its number of images. They differ for a moment while a --limit run
    is grown (grow_split), and for good if that was interrupted and the larger --limit is not run again."""
    if not len(features) == len(status) == n_images:
        raise ValueError(f"{features_path}: {len(features)} rows, but {len(status)} statuses and {n_images} images "
                         f"in the index (a run with a larger --limit, interrupted?); run coco.py again with that "
                         f"--limit, or delete {os.path.join(os.path.dirname(features_path), split)}_* to encode "
                         f"the {split} images anew")


def write_atomically(path, write, mode="wb"):
    """write(file) into path.tmp, then rename it over path: a rename is atomic, so a killed run never leaves half
    a file. A write that fails (a full disk) takes its path.tmp away and names path."""
    try:
        with open(path + ".tmp", mode) as f:
            write(f)
        os.replace(path + ".tmp", path)
    except OSError as e:
        with suppress(FileNotFoundError):
            os.remove(path + ".tmp")
        raise OSError(f"{path}: cannot write it ({e.strerror or e})") from None


def write_json(path, obj):
    write_atomically(path, lambda f: json.dump(obj, f), mode="w")


def write_status(path, status):
    write_atomically(path, lambda f: np.save(f, status))  # a file object: np.save(path) would append '.npy'


def new_features_file(path, shape):
    """A .npy of float16 zeros of this shape, memory-mapped, its disk space taken now. numpy makes it sparse: a
    full disk would show only when a row is written, hours in, as a SIGBUS that ends the process without a word.
    posix_fallocate takes the blocks (Linux); without it (macOS), or where the file system refuses it, the free
    space is compared. A disk too small is an OSError naming path, and no file is left."""
    features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    size, folder = os.path.getsize(path), os.path.dirname(path) or "."
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
        return features
    except (AttributeError, OSError) as e:  # AttributeError: no posix_fallocate
        if getattr(e, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and shutil.disk_usage(folder).free >= size:
            return features
    del features
    os.remove(path)
    raise OSError(f"{path}: needs {size:,} bytes of disk, {shutil.disk_usage(folder).free:,} are free")


def write_index(out_dir, split, images, prints=None):
    """The split's index; prints: the images' fingerprints if already taken (open_split), else taken here."""
    enc = gpt2_encoding()
    write_json(split_file(out_dir, split, "index"), {
        "image_ids": [image.image_id for image in images],
        "files": [image.file for image in images],
        "captions": [image.captions for image in images],
        # GPT-2 tokens of every caption, without <|endoftext|>: the training script adds those around them
        "tokens": [[enc.encode_ordinary(caption) for caption in image.captions] for image in images],
        "fingerprints": fingerprints(images) if prints is None else prints,
    })


def fingerprints(images):
    """Each image file's size and the CRC-32 of its first 4 KB (None: missing): an image edited or replaced in
    place since it was encoded changes them, and open_split encodes it again. Not modification times: a copy of
    the dataset (to a node's local disk, say) changes every one of those, and would re-encode all of it."""
    prints = []
    for image in images:
        try:
            with open(image.path, "rb") as f:
                prints.append([os.fstat(f.fileno()).st_size, zlib.crc32(f.read(4096))])
        except OSError:
            prints.append(None)
    return prints


def create_split(split, images, out_dir, feature_shape):
    """A split's three files, every row to do. The index is written last: its presence means the rest exists."""
    new_features_file(split_file(out_dir, split, "features"), (len(images), *feature_shape))  # filled as encoded
    write_status(split_file(out_dir, split, "status"), np.full(len(images), TODO, dtype=np.int8))
    write_index(out_dir, split, images)


def grow_split(split, images, out_dir, n_old, prints):
    """More images than last time (a --limit run continued by a longer one): the first n_old rows keep their
    features and status, the new ones are to do. Interrupted, it simply runs again: the index, rewritten last,
    names the old images until everything else is in place."""
    features_path, status_path = split_file(out_dir, split, "features"), split_file(out_dir, split, "status")
    old = read_features(features_path, split)
    new = new_features_file(features_path + ".tmp", (len(images), *old.shape[1:]))
    for start in range(0, n_old, 4096):  # a slice at a time: a split's features can be larger than memory
        end = min(start + 4096, n_old)
        new[start:end] = old[start:end]
    new.flush()
    del new, old
    os.replace(features_path + ".tmp", features_path)
    status = np.full(len(images), TODO, dtype=np.int8)
    status[:n_old] = read_status(status_path, split)[:n_old]
    write_status(status_path, status)
    write_index(out_dir, split, images, prints)


def open_split(split, images, out_dir, feature_shape):
    """Start a split, or pick it up where an earlier run stopped. -> (features memmap, status array)."""
    index_path, features_path = split_file(out_dir, split, "index"), split_file(out_dir, split, "features")
    # the image files' fingerprints when their rows were written, and now, taken once (an open and a 4 KB read
    # per image: 118K of them in train2017): a new split has none to compare
    recorded = now = None
    if not os.path.exists(index_path):
        create_split(split, images, out_dir, feature_shape)
    else:
        old = read_index(index_path, split)
        recorded = old.get("fingerprints")  # read now: growing the split, or new captions, rewrite the index
        now = fingerprints(images)
        # the same ids and file names: ids alone would let a jsonl with other images on its lines pass
        old_images = list(zip(old["image_ids"], old["files"]))
        if [(image.image_id, image.file) for image in images[:len(old_images)]] != old_images:
            raise ValueError(f"{index_path}: made for {len(old_images)} other images (another source, an edited "
                             f"--captions-jsonl, or a smaller --limit than before?); choose another --out-dir")
        if len(images) > len(old_images):
            print(f"{split}: {len(old_images)} images here already, growing to {len(images)}")
            grow_split(split, images, out_dir, len(old_images), now)
        elif [image.captions for image in images] != old["captions"]:
            # the same images with other captions (a jsonl edited since): the features still hold, the
            # captions and tokens are written anew
            print(f"{split}: captions changed since the last run, index rewritten")
            write_index(out_dir, split, images, now)
    features = read_features(features_path, split, mode="r+")
    status = read_status(split_file(out_dir, split, "status"), split)
    check_rows(features_path, split, features, status, len(images))
    if features.shape[1:] != tuple(feature_shape):
        raise ValueError(f"{features_path}: holds {features.shape[1:]} features per image, this encoder gives "
                         f"{tuple(feature_shape)}; choose another --out-dir")
    encode_changed_images_again(split, images, out_dir, status, recorded, now)
    return features, status


def encode_changed_images_again(split, images, out_dir, status, recorded, now):
    """Rows whose image file changed since `recorded` (the index's fingerprints) are to do again; an image gone
    since is not: its features stay. Indexes written before fingerprints were recorded are taken as they are."""
    if recorded is None:
        return
    changed = [row for row, (was, is_now) in enumerate(zip(recorded, now)) if is_now not in (None, was)
               and status[row] != TODO]
    if changed:
        print(f"{split}: {len(changed)} images changed on disk since they were encoded ({images[changed[0]].file}"
              f"{', ...' if len(changed) > 1 else ''}): encoding them again")
        status[changed] = TODO
        write_status(split_file(out_dir, split, "status"), status)  # before the index forgets the old prints
        write_index(out_dir, split, images, now)


def open_splits(splits, out_dir, feature_shape, meta):
    """meta.json, if out_dir has none yet, then every split opened (open_split: created, grown or checked) before
    any image is encoded, so that a disk too small for them all, or a split refused, is said at the start, not
    hours into train2017. Either way the folder is left as it was: what this call created is removed again.
    -> {split: (features memmap, status array)}"""
    meta_path = os.path.join(out_dir, "meta.json")
    created, opened = [] if os.path.exists(meta_path) else [meta_path], {}
    try:
        if created:  # before any split file: none exists without the record of its encoder
            write_json(meta_path, meta)
        for split, images in splits.items():
            if not os.path.exists(split_file(out_dir, split, "index")):
                created += [split_file(out_dir, split, kind) for kind in ("features", "status", "index")]
            opened[split] = open_split(split, images, out_dir, feature_shape)
    except (OSError, ValueError):
        opened.clear()  # the memmaps hold their files' disk space until they are closed
        for path in created:
            with suppress(FileNotFoundError):
                os.remove(path)
        raise
    return opened


def worker_died(error, split):
    """torch's RuntimeError for a killed DataLoader worker -> one line saying what now. The status file is
    rewritten after every batch, so a rerun continues after the last batch encoded."""
    if str(error.__cause__).startswith("DataLoader worker"):  # "... is killed by signal: Killed": says how
        error = error.__cause__
    return OSError(f"{split}: {str(error).strip().rstrip('.')}; out of memory? Fewer --num-workers or a smaller "
                   f"--batch-size need less. The images encoded so far are kept: run coco.py again to continue")


def require_some_encoded(status, what):
    """A split none of whose images could be read (a wrong --images-dir, say) is refused here: training would
    fail on it later, without saying which split it was."""
    if not (status == DONE).any():
        raise ValueError(f"{what}: none of its {len(status)} images could be read")


def read_meta(features_dir):
    """-> {'encoder', 'n_tokens', 'width', 'splits', 'karpathy_json', 'captions_jsonl',
    'images_dir', 'skipped'} (the source's three from this version on; older features lack them)"""
    path = os.path.join(features_dir, "meta.json")
    require(path, "file", f" (write it with: python coco.py --out-dir {features_dir})")
    try:
        with open(path, "rb") as f:
            meta = json.load(f)
        if not (isinstance(meta, dict) and "splits" in meta and encoder_record(meta)):
            raise ValueError("not the record of a coco.py run")
        meta["encoder"] = encoder_record(meta)  # features of the CLIP-only versions say it in other words
    except (ValueError, AttributeError) as e:  # bad JSON too
        # the features may well be fine: only the record of the encoder that made them is lost
        raise ValueError(f"{path}: damaged ({e}); delete it and run coco.py again with the --encoder and "
                         f"--encoder-weights that made these features") from None
    return meta


# -----------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--coco-dir", default="coco", help="holds annotations/, train2017/, val2017/")
    p.add_argument("--out-dir", default="coco_features", help="where the features go")
    p.add_argument("--download", action="store_true", help="first download and extract COCO 2017 into --coco-dir "
                   "(not with --images-dir), and Karpathy's --karpathy-json if it is not there yet")
    # OpenAI's weights need the -quickgelu architecture (see load_clip). --clip-model/--clip-pretrained: the
    # names these two had when CLIP was the only encoder
    p.add_argument("--encoder", "--clip-model", default="ViT-B-32-quickgelu",
                   help="an open_clip model name, or timm:NAME for a timm ViT (e.g. timm:vit_base_patch14_dinov2"
                        ".lvd142m, timm:vit_base_patch16_dinov3.lvd1689m)")
    p.add_argument("--encoder-weights", "--clip-pretrained",
                   help="an open_clip tag (default openai), pretrained (timm's own; the default for timm), a local "
                        "weights file, or none (random weights, seed 0: for tests)")
    p.add_argument("--image-size", type=int, help="timm: the encoder's input side in pixels, if not its pretrained "
                   "one (DINOv2's 518 px make 1,370 tokens an image: 224 makes 257)")
    p.add_argument("--karpathy-json", help="Karpathy's dataset_coco.json: his train/val/test split instead of 2017's; "
                   "or any of his dataset_{coco,flickr8k,flickr30k}.json with --images-dir")
    p.add_argument("--images-dir", help="with --karpathy-json: the folder of its images (Flickr's, or COCO 2014's "
                   "train2014/ and val2014/); captions and splits then all come from his file, not --coco-dir")
    p.add_argument("--fetch-images", action="store_true", help="with Karpathy's dataset_coco.json and --images-dir: "
                   "first download the images (after --limit) not in --images-dir yet, one by one from COCO's server")
    p.add_argument("--captions-jsonl", help='your own images: one {"image": path relative to this file, "captions": '
                   '[...], "split": "train" | "val" | "test" (optional)} per line')
    p.add_argument("--val-fraction", type=float, help="with --captions-jsonl: the share of lines without a split that "
                   "go to val, picked with a fixed seed (default 0.05)")
    p.add_argument("--limit", type=int, help="only the first N images of each split")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="processes decoding JPEGs")
    p.add_argument("--device", default="auto", type=existing_device, help="auto, cuda, cuda:1, mps, cpu")
    args = p.parse_args(argv)
    for name, least in (("limit", 1), ("batch_size", 1), ("num_workers", 0), ("image_size", 1)):  # --limit -3: all but 3, quietly
        if getattr(args, name) is not None and getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    for name in ("coco_dir", "out_dir", "images_dir"):
        if getattr(args, name) and os.path.exists(getattr(args, name)) and not os.path.isdir(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: is a file, not a folder")
    # one source of images and captions: COCO 2017 (--coco-dir), Karpathy's file with --images-dir, or a jsonl
    if args.images_dir and not args.karpathy_json:
        p.error("--images-dir needs --karpathy-json: the captions and splits of its images")
    if args.captions_jsonl and args.karpathy_json:
        p.error("--captions-jsonl and --karpathy-json are two sources of captions: give one")
    if args.download and args.captions_jsonl:
        p.error("--download fetches COCO 2017 and Karpathy's files: not with --captions-jsonl")
    if args.download and args.karpathy_json and not os.path.exists(args.karpathy_json) \
            and os.path.basename(args.karpathy_json) not in KARPATHY_FILES:
        p.error(f"--karpathy-json {args.karpathy_json}: no such file, and --download fetches only "
                f"{', '.join(KARPATHY_FILES)}")
    if args.fetch_images and not args.images_dir:
        p.error("--fetch-images needs --karpathy-json dataset_coco.json and --images-dir, the folder its images go in")
    if args.fetch_images and os.path.basename(args.karpathy_json) in KARPATHY_FILES[1:]:  # the two Flickr files
        p.error(f"--fetch-images fetches COCO's images, not Flickr's (--karpathy-json {args.karpathy_json})")
    if args.val_fraction is not None and not args.captions_jsonl:
        p.error("--val-fraction splits a --captions-jsonl: not used without one")
    if args.val_fraction is None:
        args.val_fraction = 0.05
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction must be at least 0 and below 1, got {args.val_fraction}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.encoder_weights is None:
        args.encoder_weights = default_weights(args.encoder)
    if os.path.isfile(args.encoder_weights):
        args.encoder_weights = os.path.abspath(args.encoder_weights)  # recorded: sample.py loads it from anywhere
    return args


def output_shape(encoder, device):
    """(n_tokens, width) of this encoder's image features, from one blank picture."""
    pixels = encoder.preprocess(Image.new("RGB", (64, 64)))[None].to(device)  # (1, 3, 224, 224)
    return tuple(encoder(pixels).shape[1:])


def check_same_encoder(old_meta, record, meta_path):
    if old_meta and not same_encoder(old_meta["encoder"], record):
        raise ValueError(f"{meta_path}: features of {describe_encoder(old_meta['encoder'])} are here, not of "
                         f"{describe_encoder(record)}; choose another --out-dir")


def output_folders(args):
    """{flag: the folder it makes this run write in}"""
    folders = {"--out-dir": args.out_dir}
    if args.download and args.karpathy_json and not os.path.exists(args.karpathy_json):
        folders["--karpathy-json"] = os.path.dirname(args.karpathy_json) or "."
    if args.download and not args.images_dir:
        folders["--coco-dir"] = args.coco_dir
    if args.fetch_images:
        folders["--images-dir"] = args.images_dir
    return folders


def require_writable(flag, folder):
    """ValueError naming flag unless files can be written in folder: asked before the downloads and the encoding,
    not after them. A folder not made yet is asked of the nearest one above it (where it will be made)."""
    above = os.path.abspath(folder)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    try:
        probe_write(above)
    except OSError as e:
        raise ValueError(f"{flag}: cannot write in {above} ({e.strerror})") from None


def main(argv=None):
    args = parse_args(argv)
    for flag, folder in output_folders(args).items():
        require_writable(flag, folder)
    splits = {split: images[:args.limit] for split, images in read_splits(args).items()}
    if args.fetch_images:
        fetch_images(splits, args.images_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    # one coco.py run per out-dir (run.lock, as training takes): two at once, with two encoders, wrote rows of
    # both into one features file under one meta.json. Held until this process exits
    OutDirLock(args.out_dir)
    meta_path = os.path.join(args.out_dir, "meta.json")
    old = read_meta(args.out_dir) if os.path.exists(meta_path) else None
    # continuing: only with the same encoder, or rows would mix two of them. Asked before it is loaded (a
    # download, maybe), and again after, when its input size and preprocessing are known
    wanted = {"name": args.encoder, "weights": args.encoder_weights, "image_size": args.image_size, "preprocess": None}
    check_same_encoder(old, wanted, meta_path)
    use_device(args.device)
    encoder = load_encoder(args.encoder, args.encoder_weights, args.device, args.image_size)
    check_same_encoder(old, encoder.record, meta_path)
    skipped = old.get("skipped", {}) if old else {}
    n_tokens, width = output_shape(encoder, args.device)
    meta = {"encoder": encoder.record, "n_tokens": n_tokens,
            "width": width, "splits": list(splits), "karpathy_json": args.karpathy_json,
            "captions_jsonl": args.captions_jsonl, "images_dir": images_dir(args), "skipped": skipped}
    # every split's files before the long work: a run refused (a full disk, other images, damaged files) leaves
    # the folder, and the record of the earlier run, as they were
    opened = open_splits(splits, args.out_dir, (n_tokens, width), meta)
    for split, (features, status) in opened.items():
        meta["skipped"][split] = extract_split(split, splits[split], encoder, args.out_dir, features, status,
                                               args.batch_size, args.num_workers, args.device)
        write_json(meta_path, meta)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, OSError) as e:  # the user's to fix: one line, naming the file
        sys.exit(f"coco.py: {e}")
    except KeyboardInterrupt:  # the status file says which images are done: nothing half-written is kept
        print("coco.py: stopped (Ctrl-C); the images encoded so far are kept, run it again to go on", file=sys.stderr)
        sys.exit(130)
