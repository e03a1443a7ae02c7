"""coco.py on a synthetic COCO: the official annotation schema, a few PIL-drawn JPEGs (two of them broken) and a
randomly initialised CLIP ViT-B/32 (--encoder-weights none: the same seed-0 weights in every process).

What is promised: the stored features are CLIP's 50 tokens after ln_post, row-aligned with ids and captions;
broken images are named and never served; an interrupted or --limit run finishes equal to a clean one; Karpathy's
val/test images never reach training; downloads resume and are verified; damaged feature files are named and
never patched up; user errors are one line naming a path; --device cuda:N is made the current device before CLIP
is loaded. A full disk, a killed decoding worker, a split with no readable image are one line, and a refused
start leaves the folder as it was; 16-bit and float images are scaled to 8 bits, not clipped. Karpathy's
Flickr8k/30k files (with --images-dir) and your own jsonl give features of the same form, split as their file
says (or by --val-fraction, the same way every run), which train_caption.py trains on; a bad jsonl line, or a bad
image in Karpathy's file, is one line naming the file and the line or image. Karpathy's file and a subset of COCO
2014 are fetched file by file (--fetch-images), each image once; one that fails is named and left out, and when
most fail nothing is written."""
import errno
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import zipfile

import numpy as np
import pytest
import tiktoken
import torch
from PIL import Image

import coco
from scripts import run_script

CLIP = ["--encoder", "ViT-B-32-quickgelu", "--encoder-weights", "none", "--device", "cpu"]
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (240, 230, 20), (200, 30, 200), (20, 220, 220)]
TRAIN_IDS, VAL_IDS = [1, 2, 3, 4, 5, 6], [100, 101]
TRUNCATED, NOT_AN_IMAGE = 3, 5  # two broken train2017 files, in the middle so good rows come after them


def file_name(image_id):
    return f"{image_id:012d}.jpg"


def captions_of(image_id):
    # a trailing newline, as a few real COCO captions have: it must be stripped before tokenizing
    return [f"picture {image_id}, caption {c}" + ("\n" if c == 0 else "") for c in range(5)]


def write_coco(root, split, image_ids):
    """images and captions_{split}.json in the official schema"""
    os.makedirs(root / split, exist_ok=True)
    os.makedirs(root / "annotations", exist_ok=True)
    images, annotations = [], []
    for k, image_id in enumerate(image_ids):
        rgb = np.array(COLOURS[k % len(COLOURS)], dtype=np.uint8)
        pixels = np.zeros((96, 128, 3), dtype=np.uint8) + rgb
        pixels[10 + 5 * k:60, 30:90] = 255 - rgb  # a shape that differs from image to image
        Image.fromarray(pixels).save(root / split / file_name(image_id), quality=95)
        images.append({"id": image_id, "file_name": file_name(image_id), "height": 96, "width": 128, "license": 1,
                       "coco_url": "", "flickr_url": "", "date_captured": "2013-11-14 11:18:45"})
        for c, caption in enumerate(captions_of(image_id)):
            annotations.append({"id": 10 * image_id + c, "image_id": image_id, "caption": caption})
    annotations.reverse()  # the file's order is not the images' order
    with open(root / "annotations" / f"captions_{split}.json", "w") as f:
        json.dump({"info": {"year": 2017}, "licenses": [], "images": images, "annotations": annotations}, f)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A synthetic COCO and its features from one clean command-line run: (coco_dir, features_dir, result)."""
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, "train2017", TRAIN_IDS)
    write_coco(root, "val2017", VAL_IDS)
    with open(root / "train2017" / file_name(TRUNCATED), "r+b") as f:
        f.truncate(300)  # a JPEG cut short, as an interrupted copy leaves it
    (root / "train2017" / file_name(NOT_AN_IMAGE)).write_text("<html>404 Not Found</html>")
    features = root / "features"
    result = run_script("coco.py", "--coco-dir", root, "--out-dir", features, *CLIP, "--batch-size", 2,
                        "--num-workers", 0, threads=2)
    return root, features, result


@pytest.fixture(scope="module")
def clip():
    return coco.load_clip("ViT-B-32-quickgelu", "none", "cpu")


def encode_file(clip, path):
    clip_model, preprocess = clip
    return coco.clip_tokens(clip_model, preprocess(Image.open(path).convert("RGB"))[None])[0]  # (50, 768)


def test_two_runs_into_one_out_dir_are_refused(dataset, tmp_path, monkeypatch):
    """Two coco.py runs into one out-dir with two encoders both exited 0, the features file holding rows of both.
    The second now meets the first's run.lock and stops, writing nothing."""
    root, _, _ = dataset
    out = tmp_path / "features"
    out.mkdir()
    monkeypatch.setattr(coco.OutDirLock, "HEARTBEAT", 0.05)
    first = coco.OutDirLock(str(out))  # the first run: its thread touches run.lock every heartbeat
    (out / "run.lock").write_text("node-17 4242\n")  # as if it ran on another host
    try:
        with pytest.raises(ValueError, match="features: another run is using this folder .*pid 4242"):
            coco.main(coco_args(root, out))
    finally:
        first.release()
    assert os.listdir(out) == ["run.lock"]


# -----------------------------------------------------------------------------
# What is stored


def test_features_are_fp16_clip_tokens_aligned_with_ids_and_captions(dataset, clip):
    root, features, _ = dataset
    train = coco.load_split(features, "train")
    assert train.all_features.shape == (6, 50, 768) and train.all_features.dtype == np.float16
    assert isinstance(train.all_features, np.memmap)
    good = [i for i in TRAIN_IDS if i not in (TRUNCATED, NOT_AN_IMAGE)]
    assert train.image_ids.dtype == np.int64 and train.image_ids.tolist() == good
    assert train.files == [file_name(i) for i in good]
    enc = tiktoken.get_encoding("gpt2")
    for row, image_id in enumerate(train.image_ids):
        # the captions of row i are those of image_ids[i], stripped, and tokens are their GPT-2 BPE, no EOT
        assert train.captions[row] == [c.strip() for c in captions_of(image_id)]
        assert train.tokens[row] == [enc.encode_ordinary(c.strip()) for c in captions_of(image_id)]
        # and its features are those of that image's file, as encoded directly
        expected = encode_file(clip, root / "train2017" / file_name(image_id))
        assert torch.allclose(train.image_feats(np.array([row]))[0].float(), expected, atol=1e-2)
    val = coco.load_split(features, "val")
    assert val.image_ids.tolist() == VAL_IDS and len(val) == 2 and val.image_feats(np.arange(2)).shape == (2, 50, 768)
    assert coco.read_meta(features) == {
        "encoder": {"name": "ViT-B-32-quickgelu", "weights": "none", "image_size": 224, "prefix_tokens": 1,
                    "preprocess": [["Resize", 224, "bicubic"], ["CenterCrop", [224, 224]],
                                   ["Normalize", [0.481455, 0.457827, 0.408211], [0.268630, 0.261303, 0.275777]]]},
        "n_tokens": 50, "width": 768,
        "splits": ["train", "val"], "karpathy_json": None, "captions_jsonl": None, "images_dir": None,
        "skipped": {"train": [file_name(TRUNCATED), file_name(NOT_AN_IMAGE)], "val": []}}


def test_image_features_are_every_token_after_ln_post(clip):
    """The hook's result equals the vision transformer computed by hand up to ln_post: CLS + 49 patches."""
    clip_model, _ = clip
    visual = clip_model.visual
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        x = visual.conv1(pixels)  # (2, 768, 7, 7): each 32x32 patch -> one 768-vector
        x = x.flatten(2).transpose(1, 2)  # (2, 49, 768)
        cls = visual.class_embedding.expand(2, 1, -1)  # (2, 1, 768)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding  # (2, 50, 768)
        x = visual.ln_post(visual.transformer(visual.ln_pre(x)))  # (2, 50, 768)
        pooled = x[:, 0] @ visual.proj  # CLIP's own image embedding: the CLS token, projected
        assert torch.allclose(pooled, clip_model.encode_image(pixels), atol=1e-4)
    feats = coco.clip_tokens(clip_model, pixels)
    assert feats.shape == (2, 50, 768)
    assert torch.allclose(feats, x, atol=1e-4)


def test_broken_images_are_named_and_left_out(dataset):
    root, features, result = dataset
    for image_id in (TRUNCATED, NOT_AN_IMAGE):
        assert f"coco.py: {root / 'train2017' / file_name(image_id)}: not a readable image, skipped" in result.stderr
    status = np.load(features / "train_status.npy")
    assert status.tolist() == [1, 1, -1, 1, -1, 1]
    # the broken rows were never written: they are still the file's zeros, and no Split serves them
    raw = np.load(features / "train_features.npy")
    assert not raw[[2, 4]].any() and all(raw[row].any() for row in (0, 1, 3, 5))
    assert TRUNCATED not in coco.load_split(features, "train").image_ids


# -----------------------------------------------------------------------------
# Resuming


def coco_args(root, out_dir, *extra):
    return ["--coco-dir", str(root), "--out-dir", str(out_dir), *CLIP, "--batch-size", "2", "--num-workers", "0",
            *map(str, extra)]


class Killed(Exception):
    pass


def test_limited_then_interrupted_run_finishes_equal_to_a_clean_run(dataset, tmp_path, monkeypatch, capsys):
    root, clean, _ = dataset
    out = tmp_path / "features"
    coco.main(coco_args(root, out, "--limit", 2))  # a quick look first: 2 images of each split
    assert len(coco.load_split(out, "train")) == 2 and np.load(out / "train_features.npy").shape == (2, 50, 768)

    # then the full run, killed while encoding its second batch
    real_clip_tokens, calls = coco.clip_tokens, []

    def dies_on_third_call(clip_model, pixels):  # call 1 measures the output shape, call 2 is the first batch
        calls.append(len(pixels))
        if len(calls) == 3:
            raise Killed
        return real_clip_tokens(clip_model, pixels)

    monkeypatch.setattr(coco, "clip_tokens", dies_on_third_call)
    with pytest.raises(Killed):
        coco.main(coco_args(root, out))
    monkeypatch.undo()
    assert np.load(out / "train_status.npy").tolist() == [1, 1, -1, 1, 0, 0]  # grown to 6, 2 rows still to do
    with pytest.raises(ValueError, match="train_status.npy: 2 of 6 images not encoded yet"):
        coco.load_split(out, "train")

    coco.main(coco_args(root, out))  # runs again: finishes the last two rows
    for split in ("train", "val"):
        resumed, straight = coco.load_split(out, split), coco.load_split(clean, split)
        assert resumed.image_ids.tolist() == straight.image_ids.tolist() and resumed.tokens == straight.tokens
        # equal to the last bit here; the tolerance allows a BLAS whose rounding depends on the batch it is given
        np.testing.assert_allclose(np.asarray(resumed.all_features, dtype=np.float32),
                                   np.asarray(straight.all_features, dtype=np.float32), atol=2e-3)
    assert coco.read_meta(out) == coco.read_meta(clean)

    # a finished split is left alone
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    capsys.readouterr()
    coco.main(coco_args(root, out))
    assert "train: 6 images already done" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_features_of_another_clip_or_image_set_are_not_mixed(dataset, tmp_path):
    root, clean, _ = dataset
    with pytest.raises(ValueError, match=r"meta.json: features of ViT-B-32-quickgelu \(none, 224 px\) are here, not of "
                                          r"ViT-B-32-quickgelu \(openai\)"):
        coco.main(["--coco-dir", str(root), "--out-dir", str(clean), "--encoder-weights", "openai"])
    out = tmp_path / "features"
    coco.main(coco_args(root, out, "--limit", 1))
    index = json.loads((out / "val_index.json").read_text())
    (out / "val_index.json").write_text(json.dumps({**index, "image_ids": [7]}))
    with pytest.raises(ValueError, match="val_index.json: made for 1 other images"):
        coco.main(coco_args(root, out, "--limit", 1))


# -----------------------------------------------------------------------------
# Karpathy's split


def test_karpathy_split_keeps_val_and_test_images_out_of_training(dataset, tmp_path):
    root, _, _ = dataset
    # Karpathy's file describes COCO 2014 paths; images 4 and 6 sit in train2017/ but are his val and test
    split_of = {1: "train", 2: "restval", 3: "train", 4: "val", 5: "train", 6: "test", 100: "restval", 101: "test"}
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": split,
         "sentences": [{"raw": "ignored: captions come from the 2017 annotations", "tokens": []}]}
        for i, split in split_of.items()]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))
    out = tmp_path / "features"
    coco.main(coco_args(root, out, "--karpathy-json", path))
    ids = {split: coco.load_split(out, split).image_ids.tolist() for split in ("train", "val", "test")}
    assert ids == {"train": [1, 2, 100], "val": [4], "test": [6, 101]}  # 3 and 5 are the broken files
    assert not set(ids["train"]) & (set(ids["val"]) | set(ids["test"]))
    test = coco.load_split(out, "test")
    assert test.captions[0] == [c.strip() for c in captions_of(6)]
    meta = coco.read_meta(out)
    assert meta["splits"] == ["train", "val", "test"] and meta["karpathy_json"] == str(path)


# -----------------------------------------------------------------------------
# Flickr8k and Flickr30k (Karpathy's files, with --images-dir) and your own images (--captions-jsonl)


@pytest.fixture
def colour_clip(monkeypatch):
    """A stand-in for CLIP, read off in milliseconds: an image's features are 2 tokens of its mean colour (width
    3), so a test sees which picture a row holds. The real CLIP is tested above, on the same code path."""
    def preprocess(image):
        return torch.tensor(np.array(image.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1)  # (3, 4, 4)

    monkeypatch.setattr(coco, "load_clip", lambda model_name, pretrained, device: (None, preprocess))
    monkeypatch.setattr(coco, "clip_tokens",
                        lambda clip_model, pixels: pixels.mean(dim=(2, 3))[:, None, :].repeat(1, 2, 1))  # (B, 2, 3)


def draw(path, colour):
    """A small picture of one colour (PNG keeps it exact; a .jpg path gets a JPEG)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (24, 16), colour).save(path)


def write_jsonl(path, lines):
    """lines: dicts (written as JSON), or strings and bytes written as they are (bad lines, blank lines)."""
    with open(path, "wb") as f:
        for line in lines:
            line = json.dumps(line) if isinstance(line, dict) else line
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")


def stub_args(out_dir, *extra):
    return ["--out-dir", str(out_dir), "--encoder-weights", "none", "--device", "cpu", "--num-workers", "0",
            "--batch-size", "2", *map(str, extra)]


def assert_colours(split, colours):
    """Row i of the split holds the picture of colours[i] (under colour_clip; JPEG may move a colour by a few units)."""
    np.testing.assert_allclose(split.image_feats(np.arange(len(split)))[:, 0].float().numpy(), colours, atol=3)


RED, GREEN, BLUE, YELLOW, GREY = (220, 30, 30), (30, 200, 40), (30, 40, 220), (240, 230, 20), (128, 128, 128)


def test_a_captions_jsonl_becomes_features_in_its_splits(tmp_path, colour_clip, capsys):
    folder = tmp_path / "mine"
    draw(folder / "photos" / "red.png", RED)
    draw(folder / "photos" / "beach" / "green.png", GREEN)
    draw(folder / "blue.png", BLUE)
    draw(folder / "photos" / "yellow.png", YELLOW)
    (folder / "notes.png").write_text("not a picture")
    jsonl = folder / "captions.jsonl"
    write_jsonl(jsonl, [
        {"image": "photos/red.png", "captions": [" a red square\n", "red"], "split": "train"},  # line 1
        "",  # a blank line holds no image, and does not shift the line numbers
        {"image": "photos/beach/green.png", "captions": ["a green square"], "split": "val"},  # line 3
        {"image": "blue.png", "captions": ["a blue square"], "split": "test"},  # line 4
        {"image": "photos/yellow.png", "captions": ["a yellow square"], "split": "train", "by": "me"},  # line 5
        {"image": "photos/missing.png", "captions": ["never drawn"], "split": "train"},  # line 6
        {"image": "notes.png", "captions": ["not an image"], "split": "train"},  # line 7
    ])
    out = tmp_path / "features"
    coco.main(stub_args(out, "--captions-jsonl", jsonl))

    err = capsys.readouterr().err  # missing and unreadable images are named and skipped, as for COCO
    assert f"coco.py: {folder / 'photos' / 'missing.png'}: no such file, skipped" in err
    assert f"coco.py: {folder / 'notes.png'}: not a readable image, skipped" in err
    train, val, test = (coco.load_split(out, split) for split in ("train", "val", "test"))
    assert train.image_ids.tolist() == [1, 5] and val.image_ids.tolist() == [3] and test.image_ids.tolist() == [4]
    assert train.files == ["photos/red.png", "photos/yellow.png"] and val.files == ["photos/beach/green.png"]
    assert train.captions == [["a red square", "red"], ["a yellow square"]]
    enc = tiktoken.get_encoding("gpt2")
    assert train.tokens[0] == [enc.encode_ordinary("a red square"), enc.encode_ordinary("red")]
    assert_colours(train, [RED, YELLOW])
    assert_colours(val, [GREEN])
    assert_colours(test, [BLUE])
    meta = coco.read_meta(out)
    assert meta["splits"] == ["train", "val", "test"] and meta["skipped"] == {
        "train": ["photos/missing.png", "notes.png"], "val": [], "test": []}
    assert meta["captions_jsonl"] == str(jsonl) and meta["images_dir"] == str(folder) and meta["karpathy_json"] is None


def test_jsonl_lines_without_a_split_go_to_val_by_fraction_the_same_way_every_run(tmp_path):
    jsonl = tmp_path / "captions.jsonl"
    write_jsonl(jsonl, [{"image": f"{i}.png", "captions": [f"picture {i}"]} for i in range(1, 41)]
                + [{"image": "41.png", "captions": ["chosen for val"], "split": "val"}])
    splits = coco.jsonl_splits(str(jsonl))  # the default --val-fraction, 0.05: 2 of the 40 lines without a split
    val = [image.image_id for image in splits["val"]]
    assert len(val) == 3 and 41 in val and len(splits["train"]) == 38 and "test" not in splits
    assert not {image.image_id for image in splits["train"]} & set(val)
    assert [image.image_id for image in coco.jsonl_splits(str(jsonl))["val"]] == val  # a fixed seed
    assert len(coco.jsonl_splits(str(jsonl), 0.25)["val"]) == 11
    assert coco.parse_args(["--captions-jsonl", str(jsonl)]).val_fraction == 0.05

    few = tmp_path / "few.jsonl"  # 5% of 3 images is none: one goes to val all the same, or training has no val
    write_jsonl(few, [{"image": f"{i}.png", "captions": ["x"]} for i in range(3)])
    assert [len(images) for images in coco.jsonl_splits(str(few)).values()] == [2, 1]
    with pytest.raises(ValueError, match=re.escape(f"{few}: no val images (mark some lines")):
        coco.jsonl_splits(str(few), 0.0)
    write_jsonl(few, [{"image": "a.png", "captions": ["x"], "split": "val"}])
    with pytest.raises(ValueError, match=re.escape(f"{few}: no train images")):
        coco.jsonl_splits(str(few))


BAD_LINES = {  # line 2 of a jsonl whose line 1 is good -> what the error says after "FILE, line 2: "
    "not JSON": ('{"image": "b.png", "captions": ["x"],}', "not JSON (Expecting property name enclosed in double "
                                                          "quotes at column 38)"),
    "not UTF-8": (b'{"image": "\xff.png", "captions": ["x"]}', "not UTF-8 text"),
    "not an object": ('["b.png", "a caption"]', "not a JSON object like"),
    "no image": ('{"captions": ["x"]}', '"image" must be the path of an image'),
    "captions a string": ('{"image": "b.png", "captions": "a blue square"}', '"captions" must be a list of strings'),
    "no captions": ('{"image": "b.png", "captions": []}', '"captions": none that is not blank'),
    "only blank captions": ('{"image": "b.png", "captions": [" ", ""]}', '"captions": none that is not blank'),
    "unknown split": ('{"image": "b.png", "captions": ["x"], "split": "validation"}',
                      '"split" must be "train", "val" or "test" (or left out), not "validation"'),
    "an image twice": ('{"image": "./a.png", "captions": ["x"]}', "./a.png is on line 1 already (as a.png); give"),
}


@pytest.mark.parametrize("bad", BAD_LINES)
def test_a_bad_jsonl_line_is_one_line_naming_the_file_and_the_line(tmp_path, bad):
    line, message = BAD_LINES[bad]
    jsonl = tmp_path / "captions.jsonl"
    write_jsonl(jsonl, [{"image": "a.png", "captions": ["a red square"]}, line])
    with pytest.raises(ValueError) as error:
        coco.jsonl_splits(str(jsonl))
    assert str(error.value).startswith(f"{jsonl}, line 2: {message}") and "\n" not in str(error.value)


@pytest.mark.parametrize("other_name", ["an absolute path", "a symlink"])
def test_one_image_under_two_names_is_refused(tmp_path, other_name):
    """Compared by name, a.png in train and its absolute path (or a link to it) in val passed: a train/val leak."""
    draw(tmp_path / "a.png", RED)
    name = str(tmp_path / "a.png")
    if other_name == "a symlink":
        os.symlink(tmp_path / "a.png", tmp_path / "same.png")
        name = "same.png"
    jsonl = tmp_path / "captions.jsonl"
    write_jsonl(jsonl, [{"image": "a.png", "captions": ["x"], "split": "train"},
                        {"image": name, "captions": ["x"], "split": "val"}])
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}, line 2: {name} is on line 1 already (as a.png); give")):
        coco.jsonl_splits(str(jsonl))


def test_a_bad_jsonl_is_said_in_one_line_by_the_command(tmp_path):
    jsonl = tmp_path / "captions.jsonl"
    write_jsonl(jsonl, [{"image": "a.png", "captions": ["a red square"]}, "", '{"image": "b.png"}'])
    result = run_script("coco.py", "--captions-jsonl", jsonl, "--out-dir", tmp_path / "out", *CLIP, check=False)
    assert result.returncode == 1
    assert result.stderr == f'coco.py: {jsonl}, line 3: "captions" must be a list of strings\n'
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written


def flickr_entry(imgid, name, split, captions):
    """One image of Karpathy's dataset_flickr8k.json or dataset_flickr30k.json: no filepath, no cocoid."""
    return {"filename": name, "imgid": imgid, "split": split, "sentid": [5 * imgid + k for k in range(len(captions))],
            "sentences": [{"raw": raw, "tokens": raw.lower().split(), "imgid": imgid, "sentid": 5 * imgid + k}
                          for k, raw in enumerate(captions)]}


def test_karpathy_flickr_json_with_images_dir(tmp_path, colour_clip):
    images = tmp_path / "flickr8k_images"
    pictures = {"1000268201_693b08cb0e.jpg": RED, "1001773457_577c3a7d70.jpg": GREEN, "1002674143_1b742ab4b8.jpg": BLUE,
                "1003163366_44323f5815.jpg": YELLOW, "101654506_8eb26cfb60.jpg": GREY}
    for name, colour in pictures.items():
        draw(images / name, colour)
    names = list(pictures)
    flickr = {"dataset": "flickr8k", "images": [  # listed out of split order, as Karpathy's files are
        flickr_entry(0, names[0], "train", ["A child in a pink dress .", "A girl going into a wooden building ."]),
        flickr_entry(1, names[1], "test", ["Two dogs on pavement ."]),
        flickr_entry(2, names[2], "val", ["A little girl covered in paint ."]),
        flickr_entry(3, names[3], "restval", ["A man lays on a bench ."]),  # none in Flickr, but the rule holds
        flickr_entry(4, names[4], "train", ["A dog shakes its head ."])]}
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps(flickr))
    out = tmp_path / "features"
    coco.main(stub_args(out, "--karpathy-json", path, "--images-dir", images))
    train, val, test = (coco.load_split(out, split) for split in ("train", "val", "test"))
    assert train.image_ids.tolist() == [0, 3, 4] and val.image_ids.tolist() == [2] and test.image_ids.tolist() == [1]
    assert train.files == [names[0], names[3], names[4]]
    assert train.captions[0] == ["A child in a pink dress .", "A girl going into a wooden building ."]
    assert_colours(train, [RED, YELLOW, GREY])
    assert_colours(val, [BLUE])
    assert_colours(test, [GREEN])
    meta = coco.read_meta(out)
    assert meta["splits"] == ["train", "val", "test"] and meta["karpathy_json"] == str(path)
    assert meta["images_dir"] == str(images) and meta["captions_jsonl"] is None
    # without --images-dir, coco.py reads --coco-dir as COCO, where Flickr's images are not
    with pytest.raises(ValueError, match=re.escape(f"{path}: has no COCO ids (a Flickr file?); pass the folder of "
                                                   f"its images as --images-dir")):
        coco.read_karpathy_splits(str(path))


KARPATHY_FAULTS = {  # the images of a Flickr-style dataset_*.json -> what the one line says after "FILE: "
    "no images": ([], "lists no images"),
    "a string imgid": ([{**flickr_entry(7, "a.png", "train", ["x"]), "imgid": "7"}],
                       'a.png: its id "7" is not a whole number'),
    # an image without sentences failed at caption training's first step
    "an image without sentences": ([flickr_entry(0, "a.png", "train", [])],
                                   "a.png: its sentences: none that is not blank"),
    "one image under two names": ([flickr_entry(0, "a.png", "train", ["x"]),
                                   {**flickr_entry(1, "a.png", "test", ["x"]), "filepath": "."}],
                                  f"{os.path.join('.', 'a.png')} and a.png are one image; list each image once"),
    "no val images": ([flickr_entry(0, "a.png", "train", ["x"])], "no val images"),
}


@pytest.mark.parametrize("fault", KARPATHY_FAULTS)
def test_a_faulty_karpathy_file_is_one_line_naming_it_and_the_image(tmp_path, fault):
    images, message = KARPATHY_FAULTS[fault]
    (tmp_path / "images").mkdir()
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    with pytest.raises(ValueError) as error:
        coco.read_splits(coco.parse_args(["--karpathy-json", str(path), "--images-dir", str(tmp_path / "images")]))
    assert str(error.value) == f"{path}: {message}"


def blank_coco_caption(root):
    annotations = json.loads((root / "annotations" / "captions_train2017.json").read_text())
    annotations["annotations"][0]["caption"] = " \n"
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(annotations))


def uncaptioned_coco_image(root):
    annotations = json.loads((root / "annotations" / "captions_train2017.json").read_text())
    annotations["annotations"] = [a for a in annotations["annotations"] if a["image_id"] != 2]
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(annotations))


@pytest.mark.parametrize("source", ["COCO", "Karpathy", "jsonl"])
def test_one_rule_for_captions_in_every_source(tmp_path, source):
    """A blank caption is no caption: the jsonl reader refused it, the others passed it on to training (a blank
    target teaches the decoder to stop at once). Now every source drops it, and refuses an image left with none."""
    def read(blank_only):
        if source == "COCO":
            write_coco(tmp_path, "train2017", [1, 2])  # annotation 0, in the file's reversed order, is image 2's
            blank_coco_caption(tmp_path)
            if blank_only:
                uncaptioned_coco_image(tmp_path)
            records = coco.read_captions(tmp_path, "train2017")
        elif source == "Karpathy":
            path = tmp_path / "dataset_flickr8k.json"
            captions = [" \n"] if blank_only else ["a red square", " \n"]
            path.write_text(json.dumps({"images": [flickr_entry(0, "a.png", "train", captions),
                                                   flickr_entry(1, "b.png", "val", ["a green square"])]}))
            records = coco.karpathy_splits(str(path), str(tmp_path))["train"]
        else:
            path = tmp_path / "captions.jsonl"
            captions = [" \n"] if blank_only else ["a red square", " \n"]
            write_jsonl(path, [{"image": "a.png", "captions": captions, "split": "train"},
                               {"image": "b.png", "captions": ["a green square"], "split": "val"}])
            records = coco.jsonl_splits(str(path))["train"]
        return {os.path.basename(record.file): record.captions for record in records}
    if source == "COCO":  # image 2's last caption, blanked, is dropped; it keeps the other four
        assert read(blank_only=False)[file_name(2)] == [c.strip() for c in captions_of(2)][:4]
    else:
        assert read(blank_only=False)["a.png"] == ["a red square"]
    with pytest.raises(ValueError, match=": none that is not blank$"):
        read(blank_only=True)


def test_karpathy_coco_json_with_images_dir_reads_coco_2014_by_cocoid(tmp_path, colour_clip):
    # Karpathy's dataset_coco.json names COCO 2014's files: images_dir/val2014/COCO_val2014_....jpg; ids are cocoids
    images = tmp_path / "coco2014"
    entries = [("train2014", 9, "train", RED), ("val2014", 42, "restval", GREEN), ("val2014", 7, "test", BLUE),
               ("val2014", 30, "val", YELLOW)]
    for folder, cocoid, _, colour in entries:
        draw(images / folder / f"COCO_{folder}_{cocoid:012d}.jpg", colour)
    karpathy = {"dataset": "coco", "images": [
        {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "imgid": imgid, "cocoid": cocoid,
         "split": split, "sentences": [{"raw": f"picture {cocoid} ", "tokens": []}]}
        for imgid, (folder, cocoid, split, _) in enumerate(entries)]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))
    out = tmp_path / "features"
    coco.main(stub_args(out, "--karpathy-json", path, "--images-dir", images))
    train = coco.load_split(out, "train")
    assert train.image_ids.tolist() == [9, 42]  # sorted by id, restval in train
    assert train.files == [os.path.join("train2014", "COCO_train2014_000000000009.jpg"),
                           os.path.join("val2014", "COCO_val2014_000000000042.jpg")]
    assert train.captions == [["picture 9"], ["picture 42"]]
    assert_colours(train, [RED, GREEN])
    assert coco.load_split(out, "test").image_ids.tolist() == [7]
    assert coco.load_split(out, "val").image_ids.tolist() == [30]


def test_a_rerun_takes_edited_captions_and_refuses_other_images(tmp_path, colour_clip, capsys):
    folder = tmp_path / "mine"
    for name, colour in (("a.png", RED), ("b.png", GREEN), ("c.png", BLUE)):
        draw(folder / name, colour)
    jsonl = folder / "captions.jsonl"
    lines = [{"image": "a.png", "captions": ["a red square"], "split": "train"},
             {"image": "b.png", "captions": ["a green square"], "split": "train"},
             {"image": "c.png", "captions": ["a blue square"], "split": "val"}]
    write_jsonl(jsonl, lines)
    out = tmp_path / "features"
    coco.main(stub_args(out, "--captions-jsonl", jsonl))
    features = (out / "train_features.npy").read_bytes()

    # a typo fixed: the images are the same, so their features stay; the captions and tokens are the new ones
    lines[1] = {**lines[1], "captions": ["a green square", "green on white"]}
    write_jsonl(jsonl, lines)
    capsys.readouterr()
    coco.main(stub_args(out, "--captions-jsonl", jsonl))
    assert "train: captions changed since the last run, index rewritten" in capsys.readouterr().out
    train = coco.load_split(out, "train")
    assert train.captions[1] == ["a green square", "green on white"] and len(train.tokens[1]) == 2
    assert (out / "train_features.npy").read_bytes() == features

    # another picture on line 2, same line number (its id): refused, not served with the old picture's features
    lines[1] = {**lines[1], "image": "c.png"}
    lines[2] = {**lines[2], "image": "b.png"}
    write_jsonl(jsonl, lines)
    with pytest.raises(ValueError, match=re.escape(f"{out / 'train_index.json'}: made for 2 other images")):
        coco.main(stub_args(out, "--captions-jsonl", jsonl))


def small_jsonl(folder):
    """Three pictures, a.png and b.png for train and c.png for val, and the captions.jsonl that lists them."""
    lines = []
    for name, colour, split in (("a.png", RED, "train"), ("b.png", GREEN, "train"), ("c.png", BLUE, "val")):
        draw(folder / name, colour)
        lines.append({"image": name, "captions": [f"the picture {name}"], "split": split})
    write_jsonl(folder / "captions.jsonl", lines)
    return folder / "captions.jsonl"


def fails_on_call(n, real, error):
    """real, except that its n-th call raises error."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)
    return fake


def contents(folder):
    return {name: (folder / name).read_bytes() for name in os.listdir(folder) if name != "run.lock"} \
        if folder.exists() else {}


NO_SPACE = OSError(errno.ENOSPC, "No space left on device")
FULL_DISKS = {  # what finds the disk full (or fails otherwise) -> (an earlier --limit run?, the file, the error)
    "val's features, after train's": (None, "val_features.npy", "needs 140 bytes of disk, "),  # 128 header + 12
    "growing train's features": (1, "train_features.npy.tmp", "needs 152 bytes of disk, "),
    "no posix_fallocate, the free space compared": (None, "train_features.npy", "needs 152 bytes of disk, 10 are free"),
    "val's status file": (None, "val_status.npy", "cannot write it (No space left on device)"),
    "the tokenizer, offline": (None, None, "cannot load GPT-2's BPE files"),
}


def offline():
    raise ValueError("cannot load GPT-2's BPE files (ConnectionError); offline?")


@pytest.mark.parametrize("full", FULL_DISKS)
def test_a_full_disk_is_said_before_any_image_is_encoded_and_the_folder_stays_as_it_was(tmp_path, colour_clip,
                                                                                       monkeypatch, full):
    """The features file was sparse: a full disk showed only when a row was written, hours in, as a SIGBUS."""
    jsonl = small_jsonl(tmp_path / "mine")
    out = tmp_path / "features"
    earlier_limit, file, message = FULL_DISKS[full]
    if earlier_limit:
        coco.main(stub_args(out, "--captions-jsonl", jsonl, "--limit", earlier_limit))
    before = contents(out)
    if "posix_fallocate" in full:  # macOS has none
        monkeypatch.delattr(os, "posix_fallocate")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    elif "features" in full:  # val's is the second file allocated; a grown train's the first
        monkeypatch.setattr(os, "posix_fallocate", fails_on_call(1 if earlier_limit else 2, os.posix_fallocate,
                                                                 NO_SPACE))
    elif "status" in full:
        monkeypatch.setattr(np, "save", fails_on_call(2, np.save, NO_SPACE))
    else:
        monkeypatch.setattr(coco, "gpt2_encoding", offline)
    encoded, real_clip_tokens = [], coco.clip_tokens
    monkeypatch.setattr(coco, "clip_tokens", lambda model, pixels: encoded.append(len(pixels)) or
                        real_clip_tokens(model, pixels))
    with pytest.raises((OSError, ValueError)) as error:
        coco.main(stub_args(out, "--captions-jsonl", jsonl))
    assert str(error.value).startswith(f"{out / file}: {message}" if file else message)
    assert encoded == [1]  # only output_shape's blank picture
    assert contents(out) == before  # nothing half-made left: no split files, no meta.json, no .tmp


def test_a_killed_decoding_worker_is_one_line_and_a_rerun_continues(tmp_path, colour_clip, monkeypatch):
    """A DataLoader worker killed (by the OOM killer, say) ended coco.py in a traceback."""
    jsonl = small_jsonl(tmp_path / "mine")
    out, pytest_pid, killed = tmp_path / "features", os.getpid(), tmp_path / "killed"
    real_load_clip = coco.load_clip

    def load_clip(model_name, pretrained, device):
        clip_model, preprocess = real_load_clip(model_name, pretrained, device)

        def dies_once(image):  # the first image a worker decodes kills that worker
            if os.getpid() != pytest_pid and not killed.exists():
                killed.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return preprocess(image)
        return clip_model, dies_once

    monkeypatch.setattr(coco, "load_clip", load_clip)
    with pytest.raises(OSError) as error:
        coco.main(stub_args(out, "--captions-jsonl", jsonl, "--num-workers", 1))
    assert re.fullmatch(r"train: DataLoader worker \(pid.*\) (is killed by signal: Killed|exited unexpectedly); "
                        r"out of memory\? .* run coco.py again to continue", str(error.value))
    coco.main(stub_args(out, "--captions-jsonl", jsonl, "--num-workers", 1))
    assert_colours(coco.load_split(out, "train"), [RED, GREEN])


def test_a_split_none_of_whose_images_can_be_read_is_refused(tmp_path, colour_clip):
    """An unreadable val (a wrong path, say) made training fail later with "max() arg is an empty sequence"."""
    jsonl = small_jsonl(tmp_path / "mine")
    with open(jsonl, "a") as f:
        f.write(json.dumps({"image": "d.png", "captions": ["never drawn"], "split": "val"}) + "\n")
    os.remove(tmp_path / "mine" / "c.png")
    out = tmp_path / "features"
    with pytest.raises(ValueError, match="^val: none of its 2 images could be read$"):
        coco.main(stub_args(out, "--captions-jsonl", jsonl))
    with pytest.raises(ValueError, match=re.escape(f"{out / 'val_status.npy'}: none of its 2 images could be read")):
        coco.load_split(out, "val")  # features an older coco.py made


GREY_16 = 128 * 257  # mid-grey at 16 bits: 128 at 8
MID_GREYS = {  # (16, 24) pictures of mid-grey in deeper formats, and the file they are saved as
    "16-bit PNG": (lambda: Image.fromarray(np.full((16, 24), GREY_16, np.uint16)), "grey.png"),
    "big-endian 16-bit TIFF": (lambda: Image.frombytes("I;16B", (24, 16), np.full((16, 24), GREY_16, ">u2").tobytes()),
                               "grey.tif"),
    "float TIFF, 0..1": (lambda: Image.fromarray(np.full((16, 24), 0.5, np.float32)), "grey.tif"),
    "32-bit TIFF of 16-bit values": (lambda: Image.fromarray(np.full((16, 24), GREY_16, np.int32)), "grey.tif"),
    "8-bit PNG, as before": (lambda: Image.fromarray(np.full((16, 24), 128, np.uint8)), "grey.png"),
}


@pytest.mark.parametrize("kind", MID_GREYS)
def test_deep_images_are_scaled_to_8_bits_not_clipped_to_white_or_black(tmp_path, kind):
    image, file = MID_GREYS[kind]
    image().save(tmp_path / file)
    _, pixels = coco.ImageFiles([str(tmp_path / file)], lambda rgb: torch.from_numpy(np.array(rgb)))[0]
    assert pixels.shape == (16, 24, 3) and (pixels == 128).all()
    dark = Image.fromarray(np.full((4, 4), 10 * 257, np.uint16))  # 16 bits say their range: not stretched
    assert np.array(coco.rgb_image(dark)).max() == 10


@pytest.mark.parametrize("argv, message", [
    (["--images-dir", "."], "--images-dir needs --karpathy-json"),
    (["--captions-jsonl", "a.jsonl", "--karpathy-json", "k.json"], "--captions-jsonl and --karpathy-json are two "
                                                                   "sources of captions: give one"),
    (["--captions-jsonl", "a.jsonl", "--download"], "--download fetches COCO 2017 and Karpathy's files: not with "
                                                    "--captions-jsonl"),
    (["--download", "--karpathy-json", "my_split.json"], "--karpathy-json my_split.json: no such file, and --download "
                                                         "fetches only dataset_coco.json, dataset_flickr8k.json"),
    (["--fetch-images"], "--fetch-images needs --karpathy-json dataset_coco.json and --images-dir"),
    (["--karpathy-json", "dataset_flickr8k.json", "--images-dir", ".", "--fetch-images"],
     "--fetch-images fetches COCO's images, not Flickr's (--karpathy-json dataset_flickr8k.json)"),
    (["--val-fraction", "0.1"], "--val-fraction splits a --captions-jsonl: not used without one"),
    (["--captions-jsonl", "a.jsonl", "--val-fraction", "1"], "--val-fraction must be at least 0 and below 1, got 1.0"),
    (["--captions-jsonl", "a.jsonl", "--val-fraction", "-0.1"], "--val-fraction must be at least 0 and below 1"),
    (["--karpathy-json", "k.json", "--images-dir", "a_file"], "--images-dir a_file: is a file, not a folder"),
])
def test_flags_of_the_other_sources_are_checked(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        coco.parse_args(argv)
    assert exit_info.value.code == 2
    assert f": error: {message}" in capsys.readouterr().err.splitlines()[-1]


def test_train_caption_trains_on_features_of_a_jsonl(tmp_path, clip, monkeypatch):
    """The folder a jsonl makes is what train_caption.py reads: nothing downstream knows the source."""
    from test_caption import tiny_lm_checkpoint
    folder = tmp_path / "mine"
    lines = []
    for k, colour in enumerate((RED, GREEN, BLUE, YELLOW)):
        draw(folder / "pictures" / f"{k}.png", colour)
        lines.append({"image": f"pictures/{k}.png", "captions": [f"a square of colour {k}", f"colour {k}"],
                      **({"split": "val"} if k == 3 else {})})
    jsonl = folder / "captions.jsonl"
    write_jsonl(jsonl, lines)
    out = tmp_path / "features"
    # the real CLIP architecture (random weights, seed 0, as --encoder-weights none builds it), built once per module
    monkeypatch.setattr(coco, "load_clip", lambda model_name, pretrained, device: clip)
    coco.main(["--captions-jsonl", str(jsonl), "--out-dir", str(out), "--val-fraction", "0", *CLIP,
               "--num-workers", "0"])
    assert coco.read_meta(out)["n_tokens"] == 50 and len(coco.load_split(out, "train")) == 3

    tiny_lm_checkpoint(tmp_path / "lm.pt")
    run_script("train_caption.py", "--features-dir", out, "--init", tmp_path / "lm.pt", "--out-dir", tmp_path / "run",
               "--total-batch-size", 2, "--batch-size", 2, "--max-steps", 2, "--eval-every", 2, "--val-images", 1,
               "--eval-cider-images", 0, "--device", "cpu")
    checkpoint = torch.load(tmp_path / "run" / "model_000002.pt", weights_only=True)
    assert checkpoint["kind"] == "caption"
    encoder = checkpoint["encoder"]  # from the features' meta.json
    assert (encoder["name"], encoder["weights"], encoder["image_size"]) == ("ViT-B-32-quickgelu", "none", 224)
    logged = (tmp_path / "run" / "log.txt").read_text().split()
    assert "train" in logged and "val" in logged


def test_a_timm_dinov2_encoder_end_to_end(tmp_path):
    """timm:NAME as the encoder (DINOv2 ViT-S/14, random weights, at 224 px instead of its 518): its tokens and
    preprocessing are recorded in meta.json and the checkpoints, train_caption.py reads the width from there, and
    sample.py rebuilds the same encoder from the checkpoint alone, and refuses a preprocessing that changed."""
    from test_caption import tiny_lm_checkpoint
    import sample
    folder = tmp_path / "mine"
    lines = []
    for k, colour in enumerate((RED, GREEN, BLUE)):
        draw(folder / f"{k}.png", colour)
        lines.append({"image": f"{k}.png", "captions": [f"colour {k}"], "split": "val" if k == 2 else "train"})
    write_jsonl(folder / "captions.jsonl", lines)
    out = tmp_path / "features"
    dinov2 = "timm:vit_small_patch14_dinov2.lvd142m"
    coco.main(["--captions-jsonl", str(folder / "captions.jsonl"), "--out-dir", str(out), "--encoder", dinov2,
               "--encoder-weights", "none", "--image-size", "224", "--device", "cpu", "--num-workers", "0"])
    meta = coco.read_meta(out)
    assert (meta["n_tokens"], meta["width"]) == (257, 384)  # CLS + 16 x 16 patches of 14 px, ViT-S width
    assert coco.load_split(out, "train").image_feats(np.arange(2)).shape == (2, 257, 384)
    encoder = meta["encoder"]
    assert (encoder["name"], encoder["weights"], encoder["image_size"], encoder["prefix_tokens"]) == (
        dinov2, "none", 224, 1)
    assert encoder["preprocess"][-1] == ["Normalize", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]  # ImageNet's
    with pytest.raises(ValueError, match=r"features of timm:vit_small_patch14_dinov2.lvd142m \(none, 224 px\) are "
                                         r"here, not of timm:vit_small_patch14_dinov2.lvd142m \(none, 518 px\)"):
        coco.main(["--captions-jsonl", str(folder / "captions.jsonl"), "--out-dir", str(out), "--encoder", dinov2,
                   "--encoder-weights", "none", "--device", "cpu", "--num-workers", "0"])  # its own 518 px

    tiny_lm_checkpoint(tmp_path / "lm.pt")
    run_script("train_caption.py", "--features-dir", out, "--init", tmp_path / "lm.pt", "--out-dir", tmp_path / "run",
               "--total-batch-size", 2, "--batch-size", 2, "--max-steps", 1, "--eval-every", 1, "--val-images", 1,
               "--eval-cider-images", 0, "--device", "cpu")
    checkpoint_path = tmp_path / "run" / "model_000001.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["encoder"] == encoder and checkpoint["config"]["n_embd_img"] == 384
    result = run_script("sample.py", "--image", folder / "0.png", "--checkpoint", checkpoint_path,
                        "--max-new-tokens", 3, "--device", "cpu")
    assert result.stdout.startswith(f"{folder / '0.png'}:")

    checkpoint["encoder"]["preprocess"][-1][1] = [0.5, 0.5, 0.5]  # as if another timm normalised otherwise
    torch.save(checkpoint, checkpoint_path)
    with pytest.raises(ValueError, match=r"model_000001.pt: its images were preprocessed as .*0.5, 0.5, 0.5.*, but this "
                                         r"installation's timm:vit_small_patch14_dinov2.lvd142m does .*0.485"):
        sample.main(["--image", str(folder / "0.png"), "--checkpoint", str(checkpoint_path), "--device", "cpu"])


def test_register_tokens_are_kept_ahead_of_the_patch_grid():
    """DINOv2 with registers: CLS + 4 registers + 16 x 16 patches at 224 px; the attention map's grid skips all 5."""
    import sample
    encoder = coco.load_encoder("timm:vit_small_patch14_reg4_dinov2.lvd142m", "none", "cpu", image_size=224)
    feats = encoder(encoder.preprocess(Image.new("RGB", (300, 200), RED))[None])
    assert feats.shape == (1, 261, 384) and encoder.record["prefix_tokens"] == 5
    assert sample.patch_grid_side(261, encoder.record["prefix_tokens"]) == 16


# -----------------------------------------------------------------------------
# Damaged feature files: named, with the way out, by load_split and by coco.py alike; never patched up


def without_clip(monkeypatch):
    """coco.main up to the point where it would encode images: enough to see it refuse, in a fraction of a second."""
    monkeypatch.setattr(coco, "load_clip", lambda model_name, pretrained, device: (None, None))
    monkeypatch.setattr(coco, "output_shape", lambda encoder, device: (50, 768))


def cut(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


DAMAGES = {  # file -> what happens to it (a disk that filled up, a copy cut short, a hand edit)
    "features cut short": ("train_features.npy", lambda path: cut(path, 20_000)),
    "features not .npy": ("train_features.npy", lambda path: path.write_bytes(b"garbage" * 100)),
    "features of another shape": ("train_features.npy", lambda path: np.save(path, np.zeros(6, np.float32))),
    "status cut short": ("train_status.npy", lambda path: cut(path, 130)),
    "status not .npy": ("train_status.npy", lambda path: path.write_bytes(b"garbage" * 10)),
    "status with unknown states": ("train_status.npy", lambda path: np.save(path, np.array([1, 7, 1, 1, 1, 1], np.int8))),
    "index cut short": ("train_index.json", lambda path: cut(path, 40)),
    "index not an object": ("train_index.json", lambda path: path.write_text("[1, 2]")),
    "index without tokens": ("train_index.json", lambda path: path.write_text(json.dumps({"image_ids": [1]}))),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_split_file_is_named_and_left_as_it_is(dataset, tmp_path, monkeypatch, damage):
    root, clean, _ = dataset
    out = tmp_path / "features"
    shutil.copytree(clean, out)
    name, spoil = DAMAGES[damage]
    spoil(out / name)
    before = {file: (out / file).read_bytes() for file in os.listdir(out)}
    expected = (f"{out / name}: damaged (", f"); delete {out / 'train'}_* and run coco.py again to encode the "
                                             f"train images anew")
    with pytest.raises(ValueError) as error:  # what train_caption.py and caption_eval.py call
        coco.load_split(out, "train")
    assert str(error.value).startswith(expected[0]) and str(error.value).endswith(expected[1])
    assert "\n" not in str(error.value)
    without_clip(monkeypatch)
    with pytest.raises(ValueError) as error:  # coco.py continuing in that folder
        coco.main(coco_args(root, out))
    assert str(error.value).startswith(expected[0]) and str(error.value).endswith(expected[1])
    # nothing patched up: numpy's "r+" used to extend a cut-short features file with zeros, served as images
    assert {file: (out / file).read_bytes() for file in os.listdir(out)} == before


@pytest.mark.parametrize("damage", ['{"clip_model": "ViT-B', '["not", "a", "record"]'])
def test_a_damaged_meta_json_is_named_and_left_as_it_is(dataset, tmp_path, monkeypatch, damage):
    root, clean, _ = dataset
    out = tmp_path / "features"
    shutil.copytree(clean, out)
    (out / "meta.json").write_text(damage)
    expected = re.escape(f"{out / 'meta.json'}: damaged (") + ".*" + re.escape(
        "); delete it and run coco.py again with the --encoder and --encoder-weights that made these features")
    with pytest.raises(ValueError, match=f"^{expected}$"):
        coco.read_meta(out)
    without_clip(monkeypatch)
    with pytest.raises(ValueError, match=f"^{expected}$"):
        coco.main(coco_args(root, out))
    assert (out / "meta.json").read_text() == damage


def test_a_refused_run_leaves_meta_json_as_it_was(dataset, tmp_path, monkeypatch):
    root, clean, _ = dataset
    out = tmp_path / "features"
    shutil.copytree(clean, out)
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [{"cocoid": 1, "split": "test"}, {"cocoid": 2, "split": "train"},
                                               {"cocoid": 100, "split": "val"}]}))
    before = (out / "meta.json").read_bytes()
    without_clip(monkeypatch)
    with pytest.raises(ValueError, match="train_index.json: made for 6 other images"):
        coco.main(coco_args(root, out, "--karpathy-json", karpathy))
    assert (out / "meta.json").read_bytes() == before  # still says: COCO 2017's train and val, no Karpathy file


def test_a_missing_image_is_called_missing_and_a_broken_one_unreadable(tmp_path, monkeypatch, capsys):
    root = tmp_path / "coco"
    write_coco(root, "train2017", [1, 2, 3])
    images = coco.read_captions(root, "train2017")
    os.remove(images[0][1])  # a gap in the copy
    with open(images[1][1], "wb") as f:
        f.write(b"GIF89a, then nothing")  # a broken image
    out = tmp_path / "out"
    out.mkdir()
    # no CLIP: every readable image is a (2, 4) block of ones
    encoder = coco.ImageEncoder(lambda pixels: torch.ones(len(pixels), 2, 4), lambda image: torch.zeros(3, 8, 8), {})
    features, status = coco.open_split("train", images, str(out), (2, 4))
    skipped = coco.extract_split("train", images, encoder, str(out), features, status)
    assert skipped == [file_name(1), file_name(2)]
    err = capsys.readouterr().err
    assert f"coco.py: {images[0][1]}: no such file, skipped" in err
    assert f"coco.py: {images[1][1]}: not a readable image, skipped" in err
    assert np.load(out / "train_status.npy").tolist() == [-1, -1, 1]


# -----------------------------------------------------------------------------
# Errors a user can make: one line, naming the path


def test_missing_coco_dir_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "no_coco_here"
    result = run_script("coco.py", "--coco-dir", missing, "--out-dir", tmp_path / "out", *CLIP, check=False)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"coco.py: {missing}: ")
    assert "--download" in result.stderr


def test_missing_pieces_are_named(dataset, tmp_path):
    root, _, _ = dataset
    partial = tmp_path / "coco"
    (partial / "annotations").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{partial / 'annotations' / 'captions_train2017.json'}: "
                                                          f"no such file (pass --download")):
        coco.coco_splits(partial)
    (partial / "annotations" / "captions_train2017.json").write_bytes(
        (root / "annotations" / "captions_train2017.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=re.escape(f"{partial / 'train2017'}: no such folder (pass --download")):
        coco.coco_splits(partial)
    (partial / "train2017").mkdir()
    (partial / "annotations" / "captions_val2017.json").write_text("{not json")
    (partial / "val2017").mkdir()
    with pytest.raises(ValueError, match="captions_val2017.json: not a COCO captions file"):
        coco.coco_splits(partial)
    with pytest.raises(FileNotFoundError, match="nope.json: no such file"):
        coco.coco_splits(root, str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'train_index.json'}: no such file")):
        coco.load_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="meta.json: no such file"):
        coco.read_meta(tmp_path)


def test_a_folder_where_a_file_should_be_is_said_as_such(dataset, tmp_path):
    # and the other way round: "no such file" for something that is there sends the user looking for it
    root, _, _ = dataset
    (tmp_path / "dataset_coco.json").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'dataset_coco.json'}: is a folder, not a file")):
        coco.coco_splits(root, str(tmp_path / "dataset_coco.json"))
    partial = tmp_path / "coco"
    (partial / "annotations" / "captions_train2017.json").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{partial / 'annotations' / 'captions_train2017.json'}: "
                                                          "is a folder, not a file")):
        coco.coco_splits(partial)
    shutil.rmtree(partial / "annotations" / "captions_train2017.json")
    shutil.copy(root / "annotations" / "captions_train2017.json", partial / "annotations")
    (partial / "train2017").write_text("")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{partial / 'train2017'}: is a file, not a folder")):
        coco.coco_splits(partial)
    (tmp_path / "train_index.json").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'train_index.json'}: is a folder, not a file")):
        coco.load_split(tmp_path, "train")


@pytest.mark.parametrize("flag, value, message", [("--limit", "0", "--limit must be at least 1, got 0"),
                                                  ("--limit", "-3", "--limit must be at least 1, got -3"),
                                                  ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
                                                  ("--num-workers", "-1", "--num-workers must be at least 0, got -1"),
                                                  ("--coco-dir", "a_file", "--coco-dir a_file: is a file, not a folder"),
                                                  ("--out-dir", "a_file", "--out-dir a_file: is a file, not a folder"),
                                                  ("--device", "cuda", "argument --device: cuda: this machine "
                                                                       "has 0 CUDA GPUs"),
                                                  ("--device", "cuda:1", "argument --device: cuda:1: this machine "
                                                                         "has 0 CUDA GPUs")])
def test_bad_flag_values_name_the_flag(tmp_path, monkeypatch, capsys, flag, value, message):
    # --limit -3 used to take all images but the last 3, quietly; the others ended in a message without the flag.
    # --device cuda without a GPU got as far as loading the encoder, and then blamed its weights
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        coco.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


def test_clip_weights_that_cannot_be_found_are_named(tmp_path):
    missing = tmp_path / "ViT-B-32.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: no such weights file")):
        coco.load_clip("ViT-B-32-quickgelu", str(missing), "cpu")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: a folder, not a weights file, nor a tag")):
        coco.load_clip("ViT-B-32-quickgelu", str(tmp_path), "cpu")
    with pytest.raises(ValueError, match="ViT-Q-99: not an open_clip model name"):
        coco.load_clip("ViT-Q-99", "none", "cpu")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(FileNotFoundError, match="cannot load ViT-B-32-quickgelu's weights .* --encoder-weights"):
        coco.load_clip("ViT-B-32-quickgelu", str(broken), "cpu")


# -----------------------------------------------------------------------------
# Downloading, from a local HTTP server that honours Range requests as images.cocodataset.org does


class ArchiveServer(http.server.BaseHTTPRequestHandler):
    archives = {}  # url path -> bytes
    requests = []  # (url path, first byte asked for)
    cut_after = {}  # url path -> send only this many bytes, then hang up (a dropped connection)

    def do_GET(self):
        data = self.archives.get(self.path)
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers["Range"] else 0
        self.requests.append((self.path, start))
        if data is None:
            self.send_error(404)  # "HTTP 404 Not Found", as images.cocodataset.org answers for a name it lacks
            return
        if start >= len(data):
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:start + self.cut_after.get(self.path, len(data))])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ArchiveServer)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()  # polls: shutdown waits one
    monkeypatch.setattr(ArchiveServer, "archives", {})
    monkeypatch.setattr(ArchiveServer, "requests", [])
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def zip_folder(folder, name):
    path = folder.parent / f"{name}.zip.src"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for file in sorted((folder / name).iterdir()):
            z.write(file, f"{name}/{file.name}")
    return path.read_bytes()


def serve_coco(server, root, monkeypatch):
    urls = {}
    for name in coco.COCO_URLS:
        ArchiveServer.archives[f"/{name}.zip"] = zip_folder(root, name)
        urls[name] = f"http://127.0.0.1:{server.server_address[1]}/{name}.zip"
    monkeypatch.setattr(coco, "COCO_URLS", urls)


def test_download_resumes_verifies_and_extracts(dataset, tmp_path, server, monkeypatch):
    root, _, _ = dataset
    serve_coco(server, root, monkeypatch)
    train_zip = ArchiveServer.archives["/train2017.zip"]
    target = tmp_path / "coco"
    monkeypatch.setattr(ArchiveServer, "cut_after", {"/train2017.zip": len(train_zip) // 3})  # drops after a third
    with pytest.raises(OSError, match=re.escape(f"{target / 'train2017.zip.part'}: got")):
        coco.download_coco(str(target))
    assert (target / "train2017.zip.part").stat().st_size == len(train_zip) // 3
    assert os.path.isdir(target / "annotations") and not os.path.exists(target / "train2017")
    monkeypatch.setattr(ArchiveServer, "cut_after", {})
    (target / "val2017.zip.part").write_bytes(ArchiveServer.archives["/val2017.zip"])  # all there, not renamed yet

    coco.download_coco(str(target))
    assert ("/train2017.zip", len(train_zip) // 3) in ArchiveServer.requests  # asked only for the rest
    assert ("/val2017.zip", len(ArchiveServer.archives["/val2017.zip"])) in ArchiveServer.requests  # 416: complete
    assert sorted(os.listdir(target)) == ["annotations", "train2017", "val2017"]  # archives gone once extracted
    for name in ("annotations", "train2017", "val2017"):
        for file in (root / name).iterdir():
            assert (target / name / file.name).read_bytes() == file.read_bytes()
    requests = len(ArchiveServer.requests)
    coco.download_coco(str(target))  # everything extracted: nothing to fetch
    assert len(ArchiveServer.requests) == requests


def test_damaged_archive_is_reported_deleted_and_not_extracted(dataset, tmp_path, server, monkeypatch):
    root, _, _ = dataset
    serve_coco(server, root, monkeypatch)
    data = bytearray(ArchiveServer.archives["/val2017.zip"])
    jpeg = (root / "val2017" / file_name(100)).read_bytes()
    data[data.find(jpeg) + 100] ^= 0xFF  # one flipped bit pattern inside an image: same size, wrong CRC-32
    ArchiveServer.archives["/val2017.zip"] = bytes(data)
    target = tmp_path / "coco"
    with pytest.raises(OSError, match=re.escape(f"{target / 'val2017.zip'}: damaged archive")):
        coco.download_coco(str(target))
    assert sorted(os.listdir(target)) == ["annotations", "train2017"]  # no half-extracted val2017/, no archive


# A subset of COCO 2014 (--fetch-images), fetched image by image, and Karpathy's file from his caption_datasets.zip

KARPATHY_COCO = [  # (filepath, cocoid, split, colour), out of id order as in his file: 3 images of each split
    ("val2014", 42, "restval", GREEN), ("train2014", 9, "train", RED), ("train2014", 77, "train", GREY),
    ("val2014", 31, "val", BLUE), ("val2014", 30, "val", YELLOW), ("val2014", 39, "val", RED),
    ("val2014", 8, "test", GREEN), ("val2014", 5, "test", YELLOW), ("val2014", 7, "test", BLUE)]
FIRST_TWO = {"train": [9, 42], "val": [30, 31], "test": [5, 7]}  # --limit 2: the first two ids of each split


def coco_2014_file(folder, cocoid):
    return f"{folder}/COCO_{folder}_{cocoid:012d}.jpg"


def karpathy_coco_json():
    return json.dumps({"dataset": "coco", "images": [
        {"filepath": folder, "filename": os.path.basename(coco_2014_file(folder, cocoid)), "imgid": imgid,
         "cocoid": cocoid, "split": split, "sentences": [{"raw": f"picture {cocoid}", "tokens": ["picture"]}]}
        for imgid, (folder, cocoid, split, _) in enumerate(KARPATHY_COCO)]}).encode()


def serve_coco_2014(server, monkeypatch, unserved=()):
    """Karpathy's zip and every image of KARPATHY_COCO but those of the ids `unserved`, on the local server."""
    port = server.server_address[1]
    for folder, cocoid, _, colour in KARPATHY_COCO:
        if cocoid not in unserved:
            jpeg = io.BytesIO()
            Image.new("RGB", (24, 16), colour).save(jpeg, "JPEG", quality=95)
            ArchiveServer.archives[f"/{coco_2014_file(folder, cocoid)}"] = jpeg.getvalue()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("dataset_coco.json", karpathy_coco_json())
        z.writestr("dataset_flickr8k.json", '{"images": []}')
        z.writestr("dataset_flickr30k.json", '{"images": []}')
    ArchiveServer.archives["/caption_datasets.zip"] = archive.getvalue()
    monkeypatch.setattr(coco, "KARPATHY_URL", f"http://127.0.0.1:{port}/caption_datasets.zip")
    monkeypatch.setattr(coco, "COCO_IMAGES", f"http://127.0.0.1:{port}")


def fetch_args(data, *extra):
    return ["--karpathy-json", data / "dataset_coco.json", "--images-dir", data / "coco2014", "--fetch-images",
            "--limit", 2, *extra]


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(top, name), folder) for top, _, names in os.walk(folder)
                  for name in names)


def test_a_coco_subset_is_fetched_image_by_image_the_first_n_of_each_split_once(tmp_path, colour_clip, server,
                                                                                 monkeypatch):
    serve_coco_2014(server, monkeypatch)
    data, out = tmp_path / "data", tmp_path / "features"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{data / 'dataset_coco.json'}: no such file "
                                                          f"(--download fetches it)")):
        coco.main(stub_args(out, *fetch_args(data)))
    assert not os.path.exists(data) and not os.path.exists(out)

    coco.main(stub_args(out, "--download", *fetch_args(data)))
    # of his zip only dataset_coco.json is kept; of the images only the first two of each split were asked for
    assert (data / "dataset_coco.json").read_bytes() == karpathy_coco_json()
    assert sorted(os.listdir(data)) == ["coco2014", "dataset_coco.json"]
    wanted = sorted(coco_2014_file(folder, cocoid) for folder, cocoid, split, _ in KARPATHY_COCO
                    if cocoid in FIRST_TWO[coco.KARPATHY_SPLITS[split]])
    assert sorted(path[1:] for path, _ in ArchiveServer.requests if path.endswith(".jpg")) == wanted
    assert files_under(data / "coco2014") == wanted
    colour = {cocoid: colour for _, cocoid, _, colour in KARPATHY_COCO}
    for split, ids in FIRST_TWO.items():
        features = coco.load_split(out, split)
        assert features.image_ids.tolist() == ids
        assert_colours(features, [colour[cocoid] for cocoid in ids])

    asked = len(ArchiveServer.requests)
    coco.main(stub_args(out, "--download", *fetch_args(data)))  # all there: nothing is fetched again
    assert len(ArchiveServer.requests) == asked


def test_an_image_that_cannot_be_fetched_is_named_and_left_out_until_a_rerun_gets_it(tmp_path, colour_clip,
                                                                                     server, monkeypatch, capsys):
    serve_coco_2014(server, monkeypatch, unserved=[42])
    data, out = tmp_path / "data", tmp_path / "features"
    coco.main(stub_args(out, "--download", *fetch_args(data)))
    url = f"{coco.COCO_IMAGES}/{coco_2014_file('val2014', 42)}"
    assert f"coco.py: {url}: HTTP 404 Not Found; left out\n" in capsys.readouterr().err
    assert coco.load_split(out, "train").image_ids.tolist() == [9]
    assert coco.read_meta(out)["skipped"]["train"] == [coco_2014_file("val2014", 42)]

    serve_coco_2014(server, monkeypatch)  # back on the server: the next run fetches and encodes it
    coco.main(stub_args(out, *fetch_args(data)))
    assert coco.load_split(out, "train").image_ids.tolist() == [9, 42]


@pytest.mark.parametrize("failure", ["HTTP 404 Not Found", "Connection refused"])
def test_when_most_images_cannot_be_fetched_it_stops_in_one_line_writing_nothing(tmp_path, colour_clip, server,
                                                                                 monkeypatch, failure):
    serve_coco_2014(server, monkeypatch, unserved=[cocoid for _, cocoid, _, _ in KARPATHY_COCO])
    if failure == "Connection refused":  # offline: a port nothing listens on
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            monkeypatch.setattr(coco, "COCO_IMAGES", f"http://127.0.0.1:{closed.getsockname()[1]}")
    data, out = tmp_path / "data", tmp_path / "features"
    data.mkdir()
    (data / "dataset_coco.json").write_bytes(karpathy_coco_json())
    with pytest.raises(OSError) as error:
        coco.main(stub_args(out, *fetch_args(data)))
    assert re.fullmatch(rf"{re.escape(coco.COCO_IMAGES)}/\w+/COCO_\w+\.jpg: .*{failure}.*; 3 of 3 images failed, "
                        rf"stopped", str(error.value))
    assert files_under(data) == ["dataset_coco.json"] and not os.path.exists(out)


def test_a_network_lost_midway_stops_the_fetching_within_a_few_images(monkeypatch):
    """Stopping only past 10% failed would try ~110 more images after 1,000 fetched, each waiting for its timeout."""
    images = [coco.Record(i, f"/nowhere/{i}.jpg", f"train2014/{i}.jpg", ["x"]) for i in range(2000)]
    tried = []

    def fetch_image(image):
        tried.append(image.image_id)
        if image.image_id >= 1000:  # the network is gone: each waits for its timeout (here 50 ms), then fails
            time.sleep(0.05)
            raise OSError(f"{image.file}: timed out")
    monkeypatch.setattr(coco, "fetch_image", fetch_image)
    with pytest.raises(OSError, match=r"timed out; \d+ of \d+ images failed, stopped$"):
        coco.fetch_images({"train": images}, "images")
    assert len(tried) < 1060  # 3 in a row, and those already started; not the 112 failures that make 10%


@pytest.mark.parametrize("flag, argv", [
    ("--out-dir", ["--download", "--out-dir", "a_file/features"]),  # was asked only after the 19 GB of COCO 2017
    ("--coco-dir", ["--download", "--coco-dir", "a_file/coco"]),
    ("--karpathy-json", ["--download", "--karpathy-json", "a_file/dataset_coco.json", "--images-dir", "coco2014"]),
    ("--images-dir", ["--karpathy-json", "dataset_coco.json", "--images-dir", "a_file/coco2014", "--fetch-images"]),
])
def test_the_folders_written_in_are_checked_before_anything_is_downloaded(tmp_path, monkeypatch, flag, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")  # a file where a folder should be: unwritable even for root
    monkeypatch.setattr(coco, "download", lambda url, path, progress=True: pytest.fail(f"downloaded {url}"))
    with pytest.raises(ValueError, match=re.escape(f"{flag}: cannot write in {tmp_path / 'a_file'} (Not a directory)")):
        coco.main(argv)
    assert os.listdir(tmp_path) == ["a_file"]


# -----------------------------------------------------------------------------
# The CUDA path, on the CPU


def test_a_numbered_gpu_is_made_current_before_clip_is_loaded(tmp_path, monkeypatch):
    # otherwise the DataLoader's pin-memory thread, which takes the current device, works for GPU 0
    root = tmp_path / "coco"
    write_coco(root, "train2017", [1])
    write_coco(root, "val2017", [2])
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # --device cuda:N is checked against it
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))

    def load_clip(model_name, pretrained, device):
        calls.append(("load_clip", device))
        raise Killed  # far enough: the rest needs a GPU

    monkeypatch.setattr(coco, "load_clip", load_clip)
    with pytest.raises(Killed):
        coco.main(coco_args(root, tmp_path / "features", "--device", "cuda:1"))
    assert calls == [("set_device", "cuda:1"), ("load_clip", "cuda:1")]


def test_the_old_clip_flag_names_still_work():
    """--clip-model and --clip-pretrained were the two flags' names when CLIP was the only encoder."""
    args = coco.parse_args(["--clip-model", "ViT-L-14-quickgelu", "--clip-pretrained", "none"])
    assert (args.encoder, args.encoder_weights) == ("ViT-L-14-quickgelu", "none")
    assert coco.parse_args(["--encoder", "timm:vit_small_patch14_dinov2.lvd142m"]).encoder_weights == "pretrained"
    assert coco.parse_args([]).encoder_weights == "openai"


def test_loading_an_encoder_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    coco.load_encoder("timm:vit_small_patch14_dinov2.lvd142m", "none", "cpu", image_size=56)
    assert torch.equal(torch.rand(3), expected)


def test_an_image_changed_in_place_is_encoded_again_and_a_deleted_one_keeps_its_features(tmp_path, colour_clip,
                                                                                          capsys):
    """A rerun trusted the status file alone: a photo fixed or replaced since it was encoded kept its old
    features, silently. Now a changed size sends it back to be encoded; a file deleted since (to save disk, say)
    keeps the features it has."""
    jsonl = small_jsonl(tmp_path)  # a.png red and b.png green for train, c.png blue for val
    coco.main(stub_args(tmp_path / "out", "--captions-jsonl", jsonl))
    Image.new("RGB", (48, 32), (0, 0, 0)).save(tmp_path / "a.png")  # a.png replaced: another picture, another size
    os.remove(tmp_path / "c.png")
    capsys.readouterr()
    coco.main(stub_args(tmp_path / "out", "--captions-jsonl", jsonl))
    assert "train: 1 images changed on disk since they were encoded (a.png): encoding them again" in capsys.readouterr().out
    train, val = coco.load_split(str(tmp_path / "out"), "train"), coco.load_split(str(tmp_path / "out"), "val")
    assert train.image_feats(np.arange(2))[:, 0].tolist() == [[0, 0, 0], list(GREEN)]  # a.png now black
    assert val.image_feats(np.arange(1))[0, 0].tolist() == list(BLUE)  # c.png's features kept


def test_an_image_changed_before_its_split_grows_is_encoded_again(tmp_path, colour_clip, capsys):
    """Growing a split (a --limit run continued by a longer one) rewrites its index: the fingerprints compared
    must be those recorded before, or an image changed in between keeps its old features."""
    jsonl = small_jsonl(tmp_path)  # a.png red and b.png green for train, c.png blue for val
    coco.main(stub_args(tmp_path / "out", "--captions-jsonl", jsonl, "--limit", 1))
    Image.new("RGB", (48, 32), (0, 0, 0)).save(tmp_path / "a.png")
    coco.main(stub_args(tmp_path / "out", "--captions-jsonl", jsonl))
    assert "train: 1 images changed on disk since they were encoded (a.png)" in capsys.readouterr().out
    train = coco.load_split(str(tmp_path / "out"), "train")
    assert train.image_feats(np.arange(2))[:, 0].tolist() == [[0, 0, 0], list(GREEN)]
