"""
COCO 2017 captions and images -> frozen CLIP image features, computed once, for train_caption.py.

    python coco.py --download                                   # fetch COCO 2017 (~19 GB) into coco/, then extract
    python coco.py --coco-dir /data/coco                        # an existing copy
    python coco.py --coco-dir /data/coco --clip-model ViT-L-14-quickgelu --out-dir coco_features_l14
    python coco.py --coco-dir /data/coco --karpathy-json dataset_coco.json   # Karpathy's train/val/test split
    python coco.py --limit 500                                  # the first 500 images of each split, for a quick run

The caption decoder never changes the image encoder, so every image is encoded once, here: all of CLIP's
output tokens (for ViT-B/32: the CLS token + 7x7 patches = 50 tokens, 768 wide, taken after `ln_post` and
before the projection to the joint embedding) are stored in fp16 in a memory-mapped .npy per split:

    coco_features/meta.json                        the CLIP model and weights, token count and width, splits
    coco_features/{split}_features.npy             (N, 50, 768) float16
    coco_features/{split}_index.json               image ids, file names, captions, GPT-2 tokens, done/skipped

Extraction is resumable (progress is saved after every batch) and a corrupt image is reported by name and
left out, never filled with zeros.
"""

import argparse
import json
import os
import sys
import urllib.request
import zipfile
from dataclasses import dataclass, replace

import numpy as np
import tiktoken
import torch
from PIL import Image
from tqdm import tqdm

COCO_URLS = {
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
    "train2017": "http://images.cocodataset.org/zips/train2017.zip",
    "val2017": "http://images.cocodataset.org/zips/val2017.zip",
}

# -----------------------------------------------------------------------------
# Getting COCO


def download(url, path):
    """Resumable download: bytes go to path.part and continue from where they stopped (HTTP Range), the
    size is checked against the server's, and only a complete file is renamed to path."""
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        total = have + int(response.headers.get("Content-Length", 0))
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                            desc=os.path.basename(path)) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    if os.path.getsize(part) != total:
        raise OSError(f"{part}: got {os.path.getsize(part):,} of {total:,} bytes; run again to continue")
    os.replace(part, path)


def download_coco(coco_dir):
    os.makedirs(coco_dir, exist_ok=True)
    for name, url in COCO_URLS.items():
        done = os.path.join(coco_dir, "annotations" if name == "annotations" else name)
        if os.path.isdir(done):
            continue
        archive = os.path.join(coco_dir, os.path.basename(url))
        if not os.path.exists(archive):
            download(url, archive)
        with zipfile.ZipFile(archive) as z:  # a damaged archive fails here, before anything is extracted
            members = z.namelist()
            for member in tqdm(members, desc=f"extracting {os.path.basename(archive)}", unit="file"):
                z.extract(member, coco_dir)
        os.remove(archive)


def read_captions(coco_dir, split):
    """captions_{split}.json (the official schema) -> [(image_id, image path, [captions])], by image id."""
    path = os.path.join(coco_dir, "annotations", f"captions_{split}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (pass --download, or --coco-dir with COCO 2017 in it)")
    with open(path) as f:
        annotations = json.load(f)
    captions = {image["id"]: [] for image in annotations["images"]}
    files = {image["id"]: os.path.join(coco_dir, split, image["file_name"]) for image in annotations["images"]}
    for annotation in annotations["annotations"]:
        captions[annotation["image_id"]].append(annotation["caption"].strip())
    return [(image_id, files[image_id], captions[image_id]) for image_id in sorted(captions)]


def coco_splits(coco_dir, karpathy_json=None):
    """{'train': [...], 'val': [...]} from train2017/val2017, or Karpathy's train/val/test. train2017 holds most
    of Karpathy's val and test images, so with that split they are taken out of training: a silent leak otherwise."""
    train2017, val2017 = read_captions(coco_dir, "train2017"), read_captions(coco_dir, "val2017")
    if karpathy_json is None:
        return {"train": train2017, "val": val2017}
    if not os.path.isfile(karpathy_json):
        raise FileNotFoundError(f"{karpathy_json}: no such file")
    with open(karpathy_json) as f:
        karpathy = {image["cocoid"]: image["split"] for image in json.load(f)["images"]}
    split_of = {cocoid: "train" if split == "restval" else split for cocoid, split in karpathy.items()}
    return {split: [image for image in train2017 + val2017 if split_of.get(image[0]) == split]
            for split in ("train", "val", "test")}


# -----------------------------------------------------------------------------
# CLIP


def load_clip(model_name, pretrained, device):
    """-> (clip_model, preprocess). pretrained: an open_clip tag ('openai'), a local weights file, or 'none'
    for random weights drawn from a fixed seed (tests: the same 'none' gives the same encoder everywhere).
    OpenAI's CLIP weights were trained with QuickGELU: use the '-quickgelu' model names with them, the plain
    names silently swap in exact GELU and give worse features."""
    import open_clip
    if pretrained == "none":
        torch.manual_seed(0)
        pretrained = None
    try:
        clip_model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except Exception as e:  # offline hub, missing or damaged file: all mean the same to the user
        raise FileNotFoundError(f"CLIP {model_name} ({pretrained}): cannot load the weights ({type(e).__name__}); "
                                f"offline, pass a local weights file as --clip-pretrained PATH") from None
    return clip_model.eval(), preprocess


@torch.no_grad()
def image_features(clip_model, pixels):
    """(B, 3, 224, 224) preprocessed images -> (B, N, width): every token of the vision transformer after its
    final LayerNorm (ln_post), before pooling and projection: the decoder attends to all of them."""
    captured = []
    hook = clip_model.visual.ln_post.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        clip_model.encode_image(pixels)
    finally:
        hook.remove()
    return captured[0]


class ImageFiles(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers. An unreadable file gives a zero tensor and ok=False: the caller
    reports and skips it."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as image:
                return i, self.preprocess(image.convert("RGB")), True
        except (OSError, SyntaxError, ValueError):
            return i, torch.zeros(3, 224, 224), False


# -----------------------------------------------------------------------------
# Extraction, resumable


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def extract_split(name, images, clip_model, preprocess, out_dir, args):
    """Encode one split's images into {name}_features.npy. {name}_index.json records which rows are done and
    which images were skipped; it is rewritten after every batch, so a killed run continues where it stopped."""
    index_path = os.path.join(out_dir, f"{name}_index.json")
    features_path = os.path.join(out_dir, f"{name}_features.npy")
    enc = tiktoken.get_encoding("gpt2")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        if index["image_ids"] != [i for i, _, _ in images]:
            raise ValueError(f"{index_path}: made for another set of {len(index['image_ids'])} images (another --limit "
                             f"or split?); choose another --out-dir")
        features = np.load(features_path, mmap_mode="r+")
    else:
        index = {"image_ids": [i for i, _, _ in images], "files": [os.path.basename(p) for _, p, _ in images],
                 "captions": [c for _, _, c in images],
                 "tokens": [[enc.encode_ordinary(c) for c in caps] for _, _, caps in images],
                 "done": [False] * len(images), "skipped": []}
        with torch.no_grad():
            probe = image_features(clip_model, torch.zeros(1, 3, 224, 224, device=args.device))  # (1, N, width)
        features = np.lib.format.open_memmap(features_path, mode="w+", dtype=np.float16,
                                             shape=(len(images), *probe.shape[1:]))
        write_json(index_path, index)
    todo = [i for i, done in enumerate(index["done"]) if not done and index["files"][i] not in index["skipped"]]
    if not todo:
        print(f"{name}: {len(images)} images already done")
        return
    dataset = ImageFiles([images[i][1] for i in todo], preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    for positions, pixels, ok in tqdm(loader, desc=f"{name} features", unit="batch"):
        rows = np.array([todo[p] for p in positions.tolist()])
        for row in rows[~ok.numpy()]:
            print(f"coco.py: {images[row][1]}: not a readable image, skipped", file=sys.stderr)
            index["skipped"].append(index["files"][row])
        good = ok.numpy()
        if good.any():
            feats = image_features(clip_model, pixels[good].to(args.device))
            features[rows[good]] = feats.float().cpu().numpy().astype(np.float16)
            features.flush()
        for row in rows[good]:
            index["done"][row] = True
        write_json(index_path, index)


@dataclass
class Split:
    """The images of a split that were encoded, aligned row by row (skipped images are left out)."""
    all_features: np.ndarray  # (N_all, n_tokens, width) float16, memory-mapped, skipped rows included
    rows: np.ndarray  # (N,) the rows of all_features that hold an image
    image_ids: np.ndarray  # (N,)
    files: list
    captions: list  # N lists of reference captions
    tokens: list  # N lists of GPT-2 token lists, one per caption (no <|endoftext|>)

    def image_feats(self, indices):
        """Features of images `indices` (0..N-1) -> (len(indices), n_tokens, width) float16 tensor."""
        return torch.from_numpy(np.asarray(self.all_features[self.rows[indices]]))

    def first(self, n):
        """The first n images only (quick evaluations)."""
        return replace(self, rows=self.rows[:n], image_ids=self.image_ids[:n], files=self.files[:n],
                       captions=self.captions[:n], tokens=self.tokens[:n])

    @property
    def width(self):
        return self.all_features.shape[-1]


def load_split(features_dir, split):
    index_path = os.path.join(features_dir, f"{split}_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{index_path}: no such file (write features with: python coco.py --out-dir {features_dir})")
    with open(index_path) as f:
        index = json.load(f)
    rows = [i for i, done in enumerate(index["done"]) if done]
    if len(rows) + len(index["skipped"]) < len(index["done"]):
        raise ValueError(f"{index_path}: extraction is unfinished; run coco.py again to complete it")
    features = np.load(os.path.join(features_dir, f"{split}_features.npy"), mmap_mode="r")
    pick = lambda values: [values[i] for i in rows]
    return Split(features, np.array(rows, dtype=np.int64), np.array(pick(index["image_ids"])), pick(index["files"]),
                 pick(index["captions"]), pick(index["tokens"]))


def read_meta(features_dir):
    path = os.path.join(features_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (write features with: python coco.py --out-dir {features_dir})")
    with open(path) as f:
        return json.load(f)


# -----------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco-dir", default="coco", help="holds annotations/, train2017/, val2017/")
    p.add_argument("--out-dir", default="coco_features")
    p.add_argument("--download", action="store_true", help="download and extract COCO 2017 into --coco-dir first")
    p.add_argument("--clip-model", default="ViT-B-32-quickgelu", help="an open_clip model name")
    p.add_argument("--clip-pretrained", default="openai", help="an open_clip tag, a weights file, or none (random)")
    p.add_argument("--karpathy-json", help="Karpathy's dataset_coco.json: train/val/test splits instead of 2017's")
    p.add_argument("--limit", type=int, help="only the first N images of each split")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=8, help="processes decoding images")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main():
    args = parse_args()
    if args.download:
        download_coco(args.coco_dir)
    if not os.path.isdir(args.coco_dir):
        raise FileNotFoundError(f"{args.coco_dir}: no such folder (pass --download to fetch COCO 2017 there)")
    splits = coco_splits(args.coco_dir, args.karpathy_json)
    os.makedirs(args.out_dir, exist_ok=True)
    meta = {"clip_model": args.clip_model, "clip_pretrained": args.clip_pretrained, "splits": sorted(splits)}
    meta_path = os.path.join(args.out_dir, "meta.json")
    if os.path.exists(meta_path):
        old = read_meta(args.out_dir)
        if (old["clip_model"], old["clip_pretrained"]) != (args.clip_model, args.clip_pretrained):
            raise ValueError(f"{meta_path}: features of {old['clip_model']} ({old['clip_pretrained']}) are here; "
                             f"choose another --out-dir")
    write_json(meta_path, meta)
    clip_model, preprocess = load_clip(args.clip_model, args.clip_pretrained, args.device)
    for name, images in splits.items():
        extract_split(name, images[:args.limit], clip_model, preprocess, args.out_dir, args)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"coco.py: {e}")
