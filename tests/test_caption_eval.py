"""caption_eval.py: the COCO metrics agree with values worked out by hand and by an independent BLEU; captioning
is batched beam search / greedy decoding, on the GPU --device names; a missing Java stops everything before
any captioning; --gallery writes a self-contained page of pictures, captions, references and per-image CIDEr-D."""
import base64
import errno
import html
import importlib.util
import io
import json
import math
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import asdict

import numpy as np
import pytest
import tiktoken
import torch
from PIL import Image

import bench
import caption_eval
import coco
import export_hf
import hellaswag
import sample
import train_caption
import train_gpt2
from generate import beam_search, compile_decode_step, generate
from model import EOT_TOKEN, GPT, GPTConfig
from training import probe_write

needs_metrics = pytest.mark.skipif(caption_eval.shutil.which("java") is None or
                                   importlib.util.find_spec("pycocoevalcap") is None,
                                   reason="the COCO metrics need Java and pycocoevalcap")

# -----------------------------------------------------------------------------
# The metrics


@needs_metrics
def test_bleu_and_rouge_match_hand_computed_values():
    predictions = {1: "A cat sits on the mat."}
    references = {1: ["A cat is on the mat.", "There is a cat on the mat."]}
    scores = caption_eval.coco_metrics(predictions, references, meteor=False)
    # after the tokenizer: "a cat sits on the mat" against "a cat is on the mat" and "there is a cat on the mat"
    # unigrams: 5 of 6 appear in a reference; the closest reference length is 6: no brevity penalty
    assert scores["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)
    # bigrams: "a cat", "on the", "the mat" of 5; BLEU-2 is the geometric mean of the two precisions
    assert scores["BLEU-2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5, abs=1e-6)
    # ROUGE-L: the longest common subsequence is "a cat on the mat" (5 tokens) with both references: precision
    # 5/6 for both, recall 5/6 and 5/7. pycocoevalcap takes the best precision and the best recall over the
    # references, and F with beta = 1.2 (recall weighs beta^2 as much as precision)
    p, r, beta = 5 / 6, 5 / 6, 1.2
    assert scores["ROUGE-L"] == pytest.approx((1 + beta**2) * p * r / (r + beta**2 * p), abs=1e-6)


def independent_bleu(predictions, references, n):
    """Corpus BLEU-n on already tokenized word lists, written from the definition (Papineni et al. 2002): clipped
    n-gram counts summed over the corpus, geometric mean of the 1..n precisions, brevity penalty exp(1 - r/c)
    when the c predicted words are fewer than r, r summing each image's reference length closest to its
    prediction's (the shorter one on a tie)."""
    matched, total = [0] * n, [0] * n
    prediction_length = reference_length = 0
    for image_id, words in predictions.items():
        refs = references[image_id]
        for k in range(1, n + 1):
            counts = Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1))
            most_in_a_ref = Counter()
            for ref in refs:
                most_in_a_ref |= Counter(tuple(ref[i:i + k]) for i in range(len(ref) - k + 1))  # max per n-gram
            matched[k - 1] += sum(min(c, most_in_a_ref[g]) for g, c in counts.items())
            total[k - 1] += max(len(words) - k + 1, 0)
        prediction_length += len(words)
        reference_length += min((abs(len(ref) - len(words)), len(ref)) for ref in refs)[1]
    precision = math.exp(sum(math.log(m / t) for m, t in zip(matched, total)) / n)
    brevity = min(1.0, math.exp(1 - reference_length / prediction_length))
    return precision * brevity


@needs_metrics
def test_corpus_bleu_matches_an_independent_implementation():
    predictions = {
        7: "A dog runs on the beach.",
        8: "Two people riding bicycles.",
        9: "A cat.",  # short: the brevity penalty is needed
    }
    references = {
        7: ["A dog is running on the beach.", "A brown dog runs along the sandy beach.", "Dog on a beach."],
        8: ["Two people are riding bikes down a street.", "Two cyclists on a road."],
        9: ["A cat sleeping on a couch.", "A grey cat lies on the sofa.", "A cat on a couch.",
            "The cat is asleep.", "A kitten resting on a couch."],
    }
    scores = caption_eval.coco_metrics(predictions, references, meteor=False)
    # the PTB tokenizer lower-cases and drops the punctuation; for these sentences that is all it does
    words = lambda caption: caption.lower().replace(".", "").split()
    tokenized_predictions = {i: words(c) for i, c in predictions.items()}
    tokenized_references = {i: [words(c) for c in refs] for i, refs in references.items()}
    for n in (1, 2):
        expected = independent_bleu(tokenized_predictions, tokenized_references, n)
        assert scores[f"BLEU-{n}"] == pytest.approx(expected, abs=1e-6), n
    # worked out once by hand: 11 of the 12 predicted words match ("bicycles" does not), and the brevity penalty
    # applies: the closest references have 7 + 5 + 4 = 16 words
    assert scores["BLEU-1"] == pytest.approx(11 / 12 * math.exp(1 - 16 / 12), abs=1e-6)


@needs_metrics
def test_perfect_and_wrong_captions():
    references = {i: [f"a photo of a {w} on a table"] * 3 for i, w in enumerate(["cup", "book", "phone"])}
    perfect = caption_eval.coco_metrics({i: refs[0] for i, refs in references.items()}, references)
    wrong = caption_eval.coco_metrics({i: "zebras running across grass" for i in references}, references)
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["METEOR"] > 0.9
    # CIDEr-D is 10 x the cosine similarity of TF-IDF n-gram vectors: a caption equal to all its references gets 10
    assert perfect["CIDEr"] == pytest.approx(10.0, abs=1e-4)
    assert wrong["BLEU-1"] < 1e-6 and wrong["CIDEr"] < 1e-6 and wrong["ROUGE-L"] == 0.0 and wrong["METEOR"] < 0.05
    assert list(perfect) == caption_eval.METRICS


@needs_metrics
def test_empty_caption_is_scored_not_misaligned():
    # an empty caption is one empty line for the tokenizer: it must not shift the captions after it
    references = {1: ["a red bus"], 2: ["a green tree"], 3: ["a blue sky"]}
    scores = caption_eval.coco_metrics({1: "", 2: "a green tree", 3: "a blue sky"}, references, meteor=False)
    assert scores["ROUGE-L"] == pytest.approx(2 / 3, abs=1e-6)


def test_without_java_a_one_line_error_before_anything_else(monkeypatch, tmp_path):
    monkeypatch.setattr(caption_eval.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="java: not found.*apt-get install default-jre"):
        caption_eval.coco_metrics({1: "a cat"}, {1: ["a cat"]})
    # the command line stops at once: before loading anything (this checkpoint does not even exist)
    with pytest.raises(FileNotFoundError, match="java: not found"):
        caption_eval.main(["--checkpoint", str(tmp_path / "missing.pt")])


def test_without_pycocoevalcap_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # `import pycocoevalcap` now raises ImportError
    monkeypatch.setattr(caption_eval.shutil, "which", lambda name: "/usr/bin/java")
    with pytest.raises(ImportError, match="pip install pycocoevalcap"):
        caption_eval.coco_metrics({1: "a cat"}, {1: ["a cat"]})
    # training's CIDEr-D too (its scorer may have been imported already: that module is hidden as well)
    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)
    with pytest.raises(ImportError, match="pycocoevalcap: not installed; CIDEr-D needs it: pip install"):
        caption_eval.cider_d_score({1: "a cat"}, {1: ["a cat"]})

def test_spice_is_asked_for_checked_first_and_its_failure_keeps_the_rest(monkeypatch, tmp_path, capsys):
    import pycocoevalcap.spice.spice
    monkeypatch.setattr(caption_eval.shutil, "which", lambda name: "/usr/bin/java")
    # without Stanford CoreNLP, --spice stops the command line before anything is loaded (nor downloaded)
    monkeypatch.setattr(caption_eval, "spice_corenlp_jar", lambda: str(tmp_path / "stanford-corenlp-3.6.0.jar"))
    with pytest.raises(FileNotFoundError, match="stanford-corenlp-3.6.0.jar: not found; SPICE needs Stanford"):
        caption_eval.main(["--spice", "--checkpoint", str(tmp_path / "missing.pt")])

    class Spice:  # stands in for pycocoevalcap's, which runs a Java program
        def compute_score(self, gts, res):
            if fail:
                raise caption_eval.subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])
            return 0.25, []

    monkeypatch.setattr(pycocoevalcap.spice.spice, "Spice", Spice)
    fail = False
    assert caption_eval.spice_score({1: ["a cat"]}, {1: ["a cat"]}) == {"SPICE": 0.25}
    fail = True  # e.g. on Java 17: a warning, and the metrics that did run are kept
    assert caption_eval.spice_score({1: ["a cat"]}, {1: ["a cat"]}) == {}
    assert "SPICE failed (java exited with status 1" in capsys.readouterr().err
    # a table where SPICE failed for one decoding only: that cell says so
    rows = [{"beam": 1, "length_penalty": None, "metrics": {"CIDEr": 0.9, "SPICE": 0.2}},
            {"beam": 3, "length_penalty": 1.0, "metrics": {"CIDEr": 1.0}}]
    caption_eval.print_table(rows, caption_eval.best_row(rows))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["beam", "len.pen", "CIDEr-D", "SPICE"]
    assert lines[1].split() == ["1", "-", "90.0", "20.0"]
    assert lines[2].split() == ["3", "1", "100.0", "n/a", "<-", "best", "CIDEr-D"]

# -----------------------------------------------------------------------------
# CIDEr-D during training: no Java


def test_simple_tokenize_does_what_the_ptb_tokenizer_does_to_ordinary_captions(monkeypatch):
    monkeypatch.setattr(caption_eval.shutil, "which", lambda name: None)  # no Java anywhere in this
    # the expected strings are what pycocoevalcap's PTBTokenizer printed for these captions
    cases = {
        "A man's T-shirt.": "a man 's t-shirt",
        "Two dogs, one brown; one white!": "two dogs one brown one white",
        "don't can't it's": "do n't ca n't it 's",
        "The cats' toys on 1.5 tables": "the cats toys on 1.5 tables",
        "A hot-dog & a $5 soda/drink": "a hot-dog & a $ 5 soda/drink",
        "  Several  people\nstanding. ": "several people standing",
        'He said "hello" -- twice...': "he said hello twice",
        "": "",
    }
    assert {caption: caption_eval.simple_tokenize(caption) for caption in cases} == cases


def test_training_cider_d_needs_no_java_and_ignores_case_and_punctuation(monkeypatch):
    monkeypatch.setattr(caption_eval.shutil, "which", lambda name: None)
    references = {i: [f"a photo of a {w} on a table"] * 3 for i, w in enumerate(["cup", "book", "phone"])}
    # a caption equal to all its references gets the maximum, 10, however it is capitalised and punctuated
    shouted = {i: refs[0].upper() + "." for i, refs in references.items()}
    assert caption_eval.cider_d_score(shouted, references) == pytest.approx(10.0, abs=1e-4)
    assert caption_eval.cider_d_score({i: "zebras running across grass" for i in references}, references) == 0.0
    with pytest.raises(ValueError, match="predictions for 1 images, references for 3"):
        caption_eval.cider_d_score({0: "a cup"}, references)


@needs_metrics
def test_training_cider_d_equals_the_official_one_on_ordinary_captions():
    predictions = {7: "A dog runs on the beach.", 8: "Two people riding bicycles.", 9: "A cat's nap, on a couch."}
    references = {
        7: ["A dog is running on the beach.", "A brown dog runs along the sandy beach.", "Dog on a beach."],
        8: ["Two people are riding bikes down a street.", "Two cyclists on a road."],
        9: ["A cat sleeping on a couch.", "A grey cat lies on the sofa.", "The cat is asleep."],
    }
    official = caption_eval.coco_metrics(predictions, references, meteor=False)["CIDEr"]
    assert official > 0.5 and caption_eval.cider_d_score(predictions, references) == pytest.approx(official, abs=1e-9)


@needs_metrics
def test_per_image_cider_d_averages_to_the_splits():
    predictions = {7: "A dog runs on the beach.", 8: "Two people riding bicycles.", 9: "A cat."}
    references = {
        7: ["A dog is running on the beach.", "A brown dog runs along the sandy beach.", "Dog on a beach."],
        8: ["Two people are riding bikes down a street.", "Two cyclists on a road."],
        9: ["A cat sleeping on a couch.", "A grey cat lies on the sofa.", "The cat is asleep."],
    }
    per_image = caption_eval.cider_d_per_image(predictions, references)
    assert list(per_image) == [7, 8, 9] and per_image[7] > per_image[8] > 0  # the dog caption is the closest
    split = caption_eval.coco_metrics(predictions, references, meteor=False)["CIDEr"]
    assert np.mean(list(per_image.values())) == pytest.approx(split, abs=1e-9)


def test_cider_d_scores_greedy_captions_of_the_first_images_and_keeps_the_mode(monkeypatch):
    monkeypatch.setattr(caption_eval.shutil, "which", lambda name: None)
    model, features = tiny_captioner(), random_features(5)
    references = [["a big red square"], ["a small blue circle"], ["a green line", "a line that is green"],
                  ["x"], ["y"]]
    split = coco.Split(features, np.arange(5), np.arange(100, 105), [""] * 5, references, [[]] * 5)
    greedy = caption_eval.caption_images(model, features[:3], 3, 1, 8, "cpu", "float32")
    expected = caption_eval.cider_d_score(dict(enumerate(greedy)), dict(enumerate(references[:3])))
    for training in (True, False):
        model.train(training)
        score = caption_eval.cider_d(model, split, "cpu", "float32", n_images=3, batch_size=2, max_new_tokens=8)
        assert score == expected and model.training == training
    # the captions are scored against their own images' references: captions equal to them score the maximum
    # (10, for captions of at least four words: CIDEr-D averages the 1- to 4-gram similarities)
    perfect = ["a big red square", "a small blue circle"]
    monkeypatch.setattr(caption_eval, "caption_images", lambda *args, **kwargs: perfect)
    assert caption_eval.cider_d(model, split, "cpu", "float32", n_images=2) == pytest.approx(10.0, abs=1e-4)

# -----------------------------------------------------------------------------
# Captioning


def tiny_captioner(n_embd_img=16):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, cross_attn_every=2, n_embd_img=n_embd_img))
    with torch.no_grad():  # cross-attention starts at zero (ignores the image): make the image matter
        for block in model.transformer.h:
            if hasattr(block, "xattn"):
                block.xattn.c_proj.weight.normal_(0, 0.5)
    return model.eval()


def random_features(n=5):
    return np.random.default_rng(0).standard_normal((n, 7, 16)).astype(np.float16)  # (N, N_img, width)


def test_greedy_captions_are_generate_decoded():
    model, features = tiny_captioner(), random_features()
    captions = caption_eval.caption_images(model, features, 2, 1, 8, "cpu", "float32")
    # the reference: one generate() call over all images, cut at the first <|endoftext|> after the prompt
    rows = generate(model, torch.full((5, 1), EOT_TOKEN), 8, temperature=0,
                          image_feats=torch.from_numpy(features)).tolist()
    enc = tiktoken.get_encoding("gpt2")
    expected = [enc.decode(row[1:][:row[1:].index(EOT_TOKEN)] if EOT_TOKEN in row[1:] else row[1:]).strip()
                for row in rows]
    assert captions == expected
    assert len(set(captions)) > 1  # the images do steer the captions
    # batching changes nothing, and a tensor, a memmap-like array and a coco.Split all give the same
    assert caption_eval.caption_images(model, torch.from_numpy(features), 5, 1, 8, "cpu", "float32") == captions
    split = coco.Split(features, np.arange(5), np.arange(5), [""] * 5, [[]] * 5, [[]] * 5)
    assert caption_eval.caption_images(model, split, 3, 1, 8, "cpu", "float32") == captions


def test_beam_search_captions_are_beam_search_decoded():
    model, features = tiny_captioner(), random_features()
    captions = caption_eval.caption_images(model, features, 2, 3, 8, "cpu", "float32")
    token_lists = beam_search(model, torch.full((5, 1), EOT_TOKEN), torch.from_numpy(features), beam_size=3,
                                    max_new_tokens=8)
    enc = tiktoken.get_encoding("gpt2")
    assert captions == [enc.decode(tokens).strip() for tokens in token_lists]
    assert all(isinstance(c, str) and "<|endoftext|>" not in c for c in captions)

# -----------------------------------------------------------------------------
# The command line (coco.py's reading functions replaced by in-memory ones)


def fake_features_dir(monkeypatch, clip_model="ViT-B-32-quickgelu", n=3):
    features = random_features(n)
    split = coco.Split(features, np.arange(n), np.arange(100, 100 + n), [f"{i}.jpg" for i in range(n)],
                       [["a red square", "a square that is red"]] * n, [[]] * n)
    encoder = {"name": clip_model, "weights": "openai", "image_size": 224, "prefix_tokens": 1, "preprocess": None}
    meta = {"encoder": encoder, "n_tokens": 7, "width": 16, "splits": ["val"]}
    monkeypatch.setattr(caption_eval.coco, "read_meta", lambda features_dir: meta)
    monkeypatch.setattr(caption_eval.coco, "load_split", lambda features_dir, split_name: split)


def save_tiny_checkpoint(path, step=0, n_embd_img=16, clip_pretrained="openai"):
    model = tiny_captioner(n_embd_img)
    torch.save({"kind": "caption", "model": model.state_dict(), "config": asdict(model.config), "step": step,
                "clip": {"model": "ViT-B-32-quickgelu", "pretrained": clip_pretrained}}, path)
    return model


@needs_metrics
def test_command_line_writes_metrics_settings_and_coco_results(monkeypatch, tmp_path):
    fake_features_dir(monkeypatch)
    model = save_tiny_checkpoint(tmp_path / "model.pt")
    caption_eval.main(["--checkpoint", str(tmp_path / "model.pt"), "--beam", "1", "--max-new-tokens", "6",
                       "--limit", "2", "--no-meteor", "--device", "cpu"])
    results = json.loads((tmp_path / "model_val_beam1.json").read_text())
    assert results["split"] == "val" and results["beam"] == 1 and results["images"] == 2
    assert set(results["metrics"]) == set(caption_eval.METRICS) - {"METEOR"}
    expected = caption_eval.caption_images(model, random_features(2), 2, 1, 6, "cpu", "float32")
    assert results["captions"] == [{"image_id": 100, "caption": expected[0]}, {"image_id": 101, "caption": expected[1]}]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("outputs, message", [
    (["--out", "a_folder"], "--out a_folder: is a folder, not a file"),
    (["--out", "r.json", "--gallery", "a_folder"], "--gallery a_folder: is a folder, not a file"),
    ([], "--out read_only/model_val_beam3.json: cannot write in .*read_only \\(Read-only file system\\)"),  # default
    (["--out", "read_only/model.pt"], "--out read_only/model.pt: would overwrite the checkpoint"),
    (["--out", "r.json", "--gallery", "r.json"], "--gallery r.json: would overwrite --out r.json"),
], ids=["--out a folder", "--gallery a folder", "the default, on a read-only mount", "--out the checkpoint",
        "--gallery the results"])
def test_an_output_that_cannot_be_written_is_refused_before_captioning(outputs, message, monkeypatch, tmp_path):
    """--out or --gallery naming a folder: the captions were computed, then a traceback lost them. The default results
    path, beside a checkpoint on a read-only mount, is checked alike; and no output may replace the checkpoint, nor
    the gallery the results."""
    monkeypatch.setattr(caption_eval, "require_metric_tools", lambda spice: None)
    monkeypatch.setattr(caption_eval, "caption_images", lambda *a, **k: pytest.fail("captioned before the check"))
    fake_features_dir(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "read_only").mkdir()
    save_tiny_checkpoint(tmp_path / "read_only" / "model.pt")

    def read_only_mount(folder):  # root may write anywhere here: a read-only mount is faked
        if os.path.basename(folder) == "read_only":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        probe_write(folder)
    monkeypatch.setattr("training.probe_write", read_only_mount)
    with pytest.raises(ValueError, match=message):
        caption_eval.main(["--checkpoint", "read_only/model.pt", *outputs, "--device", "cpu"])


@pytest.mark.parametrize("outputs, message", [
    (["--out", "feat/meta.json"], "--out feat/meta.json: inside feat \\(--features-dir\\)"),
    (["--out", "feat/val_index.json"], "--out feat/val_index.json: inside feat \\(--features-dir\\)"),
    (["--out", "feat/new.json"], "--out feat/new.json: inside feat \\(--features-dir\\)"),
    (["--gallery", "feat/val_features.npy"], "--gallery feat/val_features.npy: inside feat"),
    (["--gallery", "run/log.txt"], "--gallery run/log.txt: exists and is not an earlier --gallery of caption_eval"),
    (["--gallery", "coco/val2017/000000000100.jpg"], "--gallery coco/val2017/000000000100.jpg: inside coco/val2017 "
                                                      "\\(the gallery's pictures\\)"),
    (["--out", "other.json"], "--out other.json: exists and is not an earlier --out of caption_eval.py"),
    (["--out", "earlier_gallery.html"], "--out earlier_gallery.html: exists and is not an earlier --out"),
    (["--gallery", "earlier_results.json"], "--gallery earlier_results.json: exists and is not an earlier --gallery"),
], ids=["the features' meta.json", "their index", "a new file among them", "the features", "the run's log",
        "a picture the gallery shows", "another JSON", "a gallery as --out", "results as --gallery"])
def test_an_output_never_replaces_an_input_or_a_file_it_did_not_write(outputs, message, monkeypatch, tmp_path):
    """Each of these was overwritten after the captioning: the features' record (every later run then failed), a
    9 GB features file, the run's log, a picture of the data set. An output replaces only its own earlier self."""
    monkeypatch.setattr(caption_eval, "require_metric_tools", lambda spice: None)
    fake_features_dir(monkeypatch)
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(tmp_path / "model.pt")
    files = {"feat/meta.json": "{}", "feat/val_index.json": "{}", "feat/val_features.npy": "\x93NUMPY",
             "run/log.txt": "0 train 10.9", "coco/val2017/000000000100.jpg": "\xff\xd8", "other.json": '{"a": 1}',
             "earlier_results.json": json.dumps(dict.fromkeys(caption_eval.RESULTS_KEYS)),
             "earlier_gallery.html": f"<!DOCTYPE html>\n{caption_eval.GALLERY_MARK}\n"}
    for name, text in files.items():
        os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
        open(name, "w").write(text)
    monkeypatch.setattr(caption_eval, "caption_images", lambda *a, **k: pytest.fail("captioned before the check"))
    with pytest.raises(ValueError, match=message):
        caption_eval.main(["--checkpoint", "model.pt", "--features-dir", "feat", "--coco-dir", "coco", *outputs,
                           "--device", "cpu"])
    assert {name: open(name).read() for name in files} == files


def test_a_second_run_replaces_the_results_and_gallery_of_the_first(monkeypatch, tmp_path):
    monkeypatch.setattr(caption_eval, "require_metric_tools", lambda spice: None)
    monkeypatch.setattr(caption_eval, "coco_metrics", lambda predictions, references, meteor, spice: {"CIDEr": 0.5})
    monkeypatch.setattr(caption_eval, "cider_d_per_image",
                        lambda predictions, references: dict.fromkeys(references, 0.5))
    fake_features_dir(monkeypatch)
    save_tiny_checkpoint(tmp_path / "model.pt")
    for max_new_tokens in (1, 2):
        caption_eval.main([str(a) for a in ["--checkpoint", tmp_path / "model.pt", "--out", tmp_path / "results.json",
                                            "--gallery", tmp_path / "gallery.html", "--beam", 1,
                                            "--max-new-tokens", max_new_tokens, "--device", "cpu"]])
    assert json.loads((tmp_path / "results.json").read_text())["max_new_tokens"] == 2
    assert caption_eval.GALLERY_MARK in (tmp_path / "gallery.html").read_text()


def test_a_full_disk_at_the_end_is_one_line_and_leaves_no_tmp(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(caption_eval, "require_metric_tools", lambda spice: None)
    monkeypatch.setattr(caption_eval, "coco_metrics", lambda predictions, references, meteor, spice: {"CIDEr": 0.5})
    fake_features_dir(monkeypatch)
    save_tiny_checkpoint(tmp_path / "model.pt")

    def full_disk(source, destination):  # it was a traceback, and a .tmp beside the checkpoint
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(ValueError, match=r"model_val_beam1.json: not written \(No space left on device\)"):
        caption_eval.main(["--checkpoint", str(tmp_path / "model.pt"), "--beam", "1", "--max-new-tokens", "4",
                           "--device", "cpu"])
    assert os.listdir(tmp_path) == ["model.pt"] and "CIDEr" in capsys.readouterr().out  # the scores were printed


def test_offline_without_gpt2s_bpe_files_is_one_line_saying_what_to_set(monkeypatch, tmp_path, tiktoken_offline):
    monkeypatch.setattr(caption_eval, "require_metric_tools", lambda spice: None)
    fake_features_dir(monkeypatch)
    save_tiny_checkpoint(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="cannot load GPT-2's BPE files .* set TIKTOKEN_CACHE_DIR"):
        caption_eval.main(["--checkpoint", str(tmp_path / "model.pt"), "--device", "cpu"])


def test_command_line_refuses_features_of_another_clip(monkeypatch, tmp_path):
    monkeypatch.setattr(caption_eval, "require_metric_tools", lambda spice: None)  # this check needs neither
    fake_features_dir(monkeypatch, clip_model="ViT-L-14-quickgelu")
    save_tiny_checkpoint(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="ViT-B-32-quickgelu.*ViT-L-14-quickgelu"):
        caption_eval.main(["--checkpoint", str(tmp_path / "model.pt"), "--device", "cpu"])


def test_command_line_on_a_numbered_gpu_uses_that_gpu_throughout(monkeypatch, tmp_path):
    # on the CPU: torch.cuda.set_device, the model's .to, the captioning and the metrics replaced by recorders
    calls = []
    monkeypatch.setattr(caption_eval, "require_metric_tools", lambda spice: None)
    monkeypatch.setattr(caption_eval, "coco_metrics", lambda predictions, references, meteor, spice: {"CIDEr": 0.5})
    fake_features_dir(monkeypatch)
    model = save_tiny_checkpoint(tmp_path / "model.pt")
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    monkeypatch.setattr(caption_eval, "load_model", lambda path, kind: (model, checkpoint))
    monkeypatch.setattr(model, "to", lambda device: calls.append(("to", device)) or model)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # --device cuda:N is checked against it
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    # the dtype is asked of the GPU in use ("cuda:1"), not of "cuda", which is GPU 0
    monkeypatch.setattr(caption_eval, "default_dtype",
                        lambda device: calls.append(("default_dtype", device)) or "bfloat16")

    def caption_images(model, features, batch_size, beam_size, max_new_tokens, device, dtype, length_penalty):
        calls.append(("caption_images", device, dtype))
        return ["a red square"] * len(features)

    monkeypatch.setattr(caption_eval, "caption_images", caption_images)
    caption_eval.main(["--checkpoint", str(tmp_path / "model.pt"), "--device", "cuda:1"])
    assert calls == [("set_device", "cuda:1"), ("default_dtype", "cuda:1"), ("to", "cuda:1"),
                     ("caption_images", "cuda:1", "bfloat16")]
    assert json.loads((tmp_path / "model_val_beam3.json").read_text())["metrics"] == {"CIDEr": 0.5}


# --- what every script that reads checkpoints shares ---------------------------------------------------------


@pytest.mark.parametrize("parse_args", [caption_eval.parse_args,
                                        lambda argv: hellaswag.parse_args(["--pretrained", "gpt2", *argv]),
                                        lambda argv: sample.parse_args(["--image", "a.jpg", *argv]),
                                        lambda argv: bench.main(["train", *argv]),
                                        train_gpt2.parse_args, train_caption.parse_args],
                         ids=["caption_eval", "hellaswag", "sample", "bench", "train_gpt2", "train_caption"])
def test_device_cuda_without_a_gpu_is_a_usage_error(parse_args, monkeypatch, capsys):
    """caption_eval, hellaswag and bench took it, then failed deep inside torch once the work had begun (the
    training scripts with an error of their own, after the data was read)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "argument --device: cuda: this machine has 0 CUDA GPUs" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["caption_eval", "sample", "hellaswag", "export_hf"])
def test_a_checkpoint_stripped_to_its_weights_is_one_line_naming_the_file(script, monkeypatch, tmp_path):
    """Someone saved only {"model": ...}. (A checkpoint without optimizer, step or args is read as usual: the
    other tests' checkpoints have none of the first, and sample.py's and export_hf.py's no args.)"""
    monkeypatch.setattr(caption_eval, "require_metric_tools", lambda spice: None)
    fake_features_dir(monkeypatch)  # read before the checkpoint: the cheap checks first
    path = str(tmp_path / "model.pt")
    torch.save({"model": tiny_captioner().state_dict()}, path)
    (tmp_path / "hellaswag.jsonl").write_text('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}\n')
    run = {"caption_eval": lambda: caption_eval.main(["--checkpoint", path, "--device", "cpu"]),
           "sample": lambda: sample.main(["--prompt", "Hi", "--checkpoint", path, "--device", "cpu"]),
           "hellaswag": lambda: hellaswag.main(hellaswag.parse_args(
               ["--checkpoint", path, "--data", str(tmp_path / "hellaswag.jsonl"), "--device", "cpu"])),
           "export_hf": lambda: export_hf.main([path, str(tmp_path / "hf")])}
    with pytest.raises(ValueError, match=re.escape(path) + r": not a checkpoint of this codebase \(.*kind.*config"):
        run[script]()


def test_checkpoint_by_default_is_best_pt_else_the_newest(tmp_path):
    assert caption_eval.choose_checkpoint("given.pt", tmp_path)[0] == "given.pt"
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no best.pt or model_\\*.pt checkpoint here"):
        caption_eval.choose_checkpoint(None, str(tmp_path))
    for step in (2, 10):
        (tmp_path / f"model_{step:06d}.pt").write_bytes(b"")
    assert caption_eval.choose_checkpoint(None, str(tmp_path))[0] == str(tmp_path / "model_000010.pt")
    (tmp_path / "best.pt").write_bytes(b"")
    assert caption_eval.choose_checkpoint(None, str(tmp_path)) == (str(tmp_path / "best.pt"),
                                                                   "the best val CIDEr-D of the run")


def test_command_line_takes_best_pt_and_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(caption_eval, "require_metric_tools", lambda spice: None)
    monkeypatch.setattr(caption_eval, "coco_metrics", lambda predictions, references, meteor, spice: {"CIDEr": 0.5})
    fake_features_dir(monkeypatch)
    save_tiny_checkpoint(tmp_path / "model_000009.pt", step=9)
    save_tiny_checkpoint(tmp_path / "best.pt", step=6)
    # greedy decoding has no length penalty: several penalties with beam 1 are one decoding, reported as before
    caption_eval.main(["--checkpoint-dir", str(tmp_path), "--beam-size", "1", "--length-penalty", "0,1",
                       "--max-new-tokens", "4", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert f"checkpoint {tmp_path / 'best.pt'} (step 6; the best val CIDEr-D of the run)" in printed
    assert "greedy (beam 1), cpu, float32" in printed and "CIDEr" in printed and "len.pen" not in printed
    results = json.loads((tmp_path / "best_val_beam1.json").read_text())
    assert results["checkpoint"] == str(tmp_path / "best.pt") and results["metrics"] == {"CIDEr": 0.5}
    assert results["beam"] == 1 and results["length_penalty"] is None and "rows" not in results


def test_list_arguments_and_their_one_line_errors(capsys):
    args = caption_eval.parse_args(["--beam-size", "1,3,5", "--length-penalty", "0,0.5,1", "--device", "cpu"])
    assert args.beam_size == [1, 3, 5] and args.length_penalty == [0.0, 0.5, 1.0]
    assert caption_eval.parse_args(["--beam", "5", "--device", "cpu"]).beam_size == [5]  # the old name still works
    for argv, error in ((["--beam-size", "1,x"], "1,x: not a comma-separated list of ints"),
                        (["--beam-size", "3,0"], "--beam-size 0: must be at least 1"),
                        (["--length-penalty", "1,nan"], "--length-penalty: must be finite numbers"),
                        (["--gallery-images", "0"], "--gallery-images must be at least 1")):
        with pytest.raises(SystemExit):
            caption_eval.parse_args(argv)
        assert error in capsys.readouterr().err
    # greedy decoding once, beam search once per penalty, nothing twice
    assert caption_eval.decodings([1, 3, 1], [0.0, 1.0, 0.0]) == [(1, None), (3, 0.0), (3, 1.0)]


def test_header_names_the_split_its_images_and_references_per_image():
    karpathy = {"karpathy_json": "dataset_coco.json"}
    assert (caption_eval.describe_split("test", karpathy, 5000, 5000, {"min": 5, "mean": 5.0, "max": 5}) ==
            "split test of Karpathy's split (dataset_coco.json): 5000 images, 5 references per image")
    assert (caption_eval.describe_split("val", {"karpathy_json": None}, 500, 5000, {"min": 5, "mean": 5.02, "max": 7})
            == "split val of COCO 2017's split (not Karpathy's): the first 500 of 5000 images, "
               "5 to 7 references per image (mean 5.02)")
    split = coco.Split(random_features(3), np.arange(3), np.arange(3), [""] * 3, [["a"] * 5, ["b"] * 5, ["c"] * 6],
                       [[]] * 3)
    assert caption_eval.references_per_image(split) == {"min": 5, "mean": 5.333, "max": 6}


def read_table(printed):
    """The sweep's table -> [(beam, length penalty, [scores], marked best?)], from the line after its header."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["beam", "len.pen"]) + 1
    rows = []
    for line in lines[start:]:
        fields = line.split()
        if not fields or not fields[0].isdigit():
            break
        rows.append((int(fields[0]), fields[1], [float(x) for x in fields[2:6]], line.endswith("<- best CIDEr-D")))
    return rows


def test_sweep_on_the_synthetic_coco_captions_once_per_decoding_and_prints_one_table(dataset, monkeypatch,
                                                                                      tmp_path, capsys):
    _, features, _ = dataset
    model = save_tiny_checkpoint(tmp_path / "model_000004.pt", step=4, n_embd_img=768, clip_pretrained="none")
    # stand-in metrics (the real ones need Java; they are tested above): a CIDEr-D per decoding, in order, so
    # that the best row is known; every call's captions are kept
    ciders, scored = iter([0.3, 0.8, 0.5, 0.2, 0.6]), []

    def metrics(predictions, references, meteor, spice):
        scored.append(predictions)
        return {"BLEU-4": 0.1, "METEOR": 0.2, "ROUGE-L": 0.3, "CIDEr": next(ciders)}

    monkeypatch.setattr(caption_eval, "require_metric_tools", lambda spice: None)
    monkeypatch.setattr(caption_eval, "coco_metrics", metrics)
    caption_eval.main(["--checkpoint-dir", str(tmp_path), "--features-dir", str(features), "--split", "train",
                       "--beam-size", "1,2,3", "--length-penalty", "0,1", "--max-new-tokens", "5", "--device", "cpu"])
    printed = capsys.readouterr().out
    newest = tmp_path / "model_000004.pt"
    assert f"checkpoint {newest} (step 4; the newest in {tmp_path}, which has no best.pt)" in printed
    assert "split train of COCO 2017's split (not Karpathy's): 4 images, 5 references per image" in printed
    assert "5 decodings, cpu, float32" in printed
    # every row, greedy once, the scores x100 in the order CIDEr-D, BLEU-4, METEOR, ROUGE-L, the best one marked
    assert read_table(printed) == [(1, "-", [30.0, 10.0, 20.0, 30.0], False), (2, "0", [80.0, 10.0, 20.0, 30.0], True),
                                   (2, "1", [50.0, 10.0, 20.0, 30.0], False), (3, "0", [20.0, 10.0, 20.0, 30.0], False),
                                   (3, "1", [60.0, 10.0, 20.0, 30.0], False)]

    results = json.loads((tmp_path / "model_000004_train_sweep.json").read_text())
    assert results["best"] == {"beam": 2, "length_penalty": 0.0}
    assert results["images"] == 4 and results["references_per_image"] == {"min": 5, "mean": 5.0, "max": 5}
    split = coco.load_split(features, "train")
    decodings = [(1, None), (2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)]
    assert [(row["beam"], row["length_penalty"]) for row in results["rows"]] == decodings
    for row, predictions, (beam_size, length_penalty) in zip(results["rows"], scored, decodings):
        expected = caption_eval.caption_images(model, split, 64, beam_size, 5, "cpu", "float32", length_penalty)
        assert [c["caption"] for c in row["captions"]] == list(predictions.values()) == expected
        assert [c["image_id"] for c in row["captions"]] == [1, 2, 3, 4]

# -----------------------------------------------------------------------------
# The gallery


def gallery_rows(page):
    """A gallery page -> {image_id: the HTML of its table row}, in the page's order."""
    return {int(image_id): row for image_id, row in re.findall(r'<tr id="image-(\d+)">(.*?)</tr>', page)}


def test_gallery_shows_the_best_rows_captions_beside_pictures_and_references(dataset, monkeypatch, tmp_path, capsys):
    root, features, _ = dataset
    # the pictures come from a copy of the synthetic COCO without image 3 (the session's copy stays whole)
    shutil.copytree(root / "train2017", tmp_path / "coco" / "train2017")
    (tmp_path / "coco" / "train2017" / "000000000003.jpg").unlink()
    save_tiny_checkpoint(tmp_path / "model.pt", n_embd_img=768, clip_pretrained="none")
    # stand-ins: captions that are markup, one set per decoding; beam 2 scores best; known per-image CIDEr-D
    monkeypatch.setattr(caption_eval, "caption_images",
                        lambda model, features, batch_size, beam_size, *args: [
                            f"<b>picture {i}</b> & beam {beam_size}" for i in range(len(features))])
    monkeypatch.setattr(caption_eval, "require_metric_tools", lambda spice: None)
    monkeypatch.setattr(caption_eval, "coco_metrics", lambda predictions, references, meteor, spice: {
        "CIDEr": 0.8 if "beam 2" in predictions[1] else 0.3})
    per_image, scored = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.3}, []
    monkeypatch.setattr(caption_eval, "cider_d_per_image",
                        lambda predictions, references: scored.append(predictions) or per_image)
    common = ["--checkpoint", tmp_path / "model.pt", "--features-dir", features, "--split", "train",
              "--beam-size", "1,2", "--coco-dir", tmp_path / "coco", "--device", "cpu"]
    caption_eval.main([str(a) for a in common + ["--gallery", tmp_path / "gallery.html"]])
    assert f"wrote {tmp_path / 'gallery.html'}" in capsys.readouterr().out
    page = (tmp_path / "gallery.html").read_text()

    # the header names the decoding whose captions these are: the best of the sweep
    assert "<p>beam 2, length penalty 1: the best CIDEr-D of 2 decodings</p>" in page
    assert scored == [{i + 1: f"<b>picture {i}</b> & beam 2" for i in range(4)}]
    # every image in the split's order, its caption escaped (no markup of ours), its references and its CIDEr-D x100
    rows = gallery_rows(page)
    assert list(rows) == [1, 2, 3, 4] and "<b>" not in page
    split = coco.load_split(features, "train")
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (240, 230, 20)]  # test_caption.COLOURS
    for i, (image_id, row) in enumerate(rows.items()):
        assert f'<div class="caption">&lt;b&gt;picture {i}&lt;/b&gt; &amp; beam 2</div>' in row
        assert f"CIDEr-D {100 * per_image[image_id]:.1f}" in row
        assert row.count(f"<li>{html.escape(split.captions[i][0])}</li>") == len(split.captions[i]) == 5
        if image_id == 3:  # named and said missing, not shown
            assert "000000000003.jpg: missing" in row and "<img" not in row
            continue
        # the picture itself, in the page: a JPEG of the image (128 x 96, not enlarged) with its colour
        jpeg = re.search(r'<img src="data:image/jpeg;base64,([^"]+)"', row).group(1)
        thumbnail = Image.open(io.BytesIO(base64.b64decode(jpeg)))
        assert thumbnail.format == "JPEG" and thumbnail.size == (128, 96)
        assert np.abs(np.array(thumbnail.getpixel((5, 5))) - colours[i]).max() < 30

    # worst first: the 3 lowest CIDEr-D of the 4, lowest first; a big image becomes a 256-pixel thumbnail
    caption_eval.main([str(a) for a in common + ["--gallery", tmp_path / "worst.html", "--gallery-order", "worst",
                                                 "--gallery-images", 3]])
    page = (tmp_path / "worst.html").read_text()
    assert list(gallery_rows(page)) == [2, 4, 3] and "<p>the 3 images of 4 with the lowest CIDEr-D" in page
    Image.new("RGB", (1024, 512), "white").save(tmp_path / "big.jpg")
    uri = caption_eval.thumbnail_uri(tmp_path / "big.jpg", 256)
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (256, 128)


# -----------------------------------------------------------------------------
# --compile: the decoding step compiled (traced with aot_eager here: test_sample.py compiles with inductor)


def test_compiled_decoding_pads_the_last_batch_and_compiles_once_per_decoding():
    from torch._dynamo.testing import CompileCounterWithBackend
    model, features = tiny_captioner(), random_features()  # 5 images: batches of 2, 2 and 1
    eager = {beam: caption_eval.caption_images(model, features, 2, beam, 8, "cpu", "float32") for beam in (1, 3)}
    torch._dynamo.reset()
    try:
        counter = CompileCounterWithBackend("aot_eager")
        compile_decode_step(model, backend=counter)
        for beam in (1, 3):
            assert caption_eval.caption_images(model, features, 2, beam, 8, "cpu", "float32") == eager[beam]
    finally:
        torch._dynamo.reset()
    # the last image padded to a batch of 2: one shape per decoding, (images x beams, 1 + 8 positions)
    assert counter.frame_count == 2 and sorted(model.compiled_step.compiled) == [(2, 9), (6, 9)]


@needs_metrics
def test_command_line_compile_says_what_it_compiled(monkeypatch, tmp_path, capsys):
    from torch._dynamo.testing import CompileCounterWithBackend
    fake_features_dir(monkeypatch)
    save_tiny_checkpoint(tmp_path / "model.pt")
    monkeypatch.setattr(caption_eval, "compile_decode_step",
                        lambda model: compile_decode_step(model, backend=CompileCounterWithBackend("aot_eager")))
    torch._dynamo.reset()
    try:
        caption_eval.main(["--checkpoint", str(tmp_path / "model.pt"), "--beam", "1", "--max-new-tokens", "6",
                           "--batch-size", "2", "--no-meteor", "--device", "cpu", "--compile"])
    finally:
        torch._dynamo.reset()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--compile")]
    assert lines == [lines[0]] and "compiled the decoding step for a batch of 2 (images x beams) and 7 positions" \
        in lines[0]


def test_own_and_flickr_images_are_named_and_found_where_coco_py_read_them(tmp_path):
    """Features of a --captions-jsonl (or Flickr) set record the folder their file names are relative to."""
    references = {"min": 5, "max": 5, "mean": 5.0}
    meta = {"karpathy_json": None, "captions_jsonl": "/data/mine.jsonl", "images_dir": str(tmp_path)}
    assert caption_eval.describe_split("val", meta, 3, 3, references).startswith(
        "split val of your images' split (/data/mine.jsonl): 3 images")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"")
    folders = caption_eval.image_folders("coco", meta)
    assert caption_eval.find_image(folders, "photos/a.jpg") == str(tmp_path / "photos" / "a.jpg")
    coco_folders = caption_eval.image_folders("coco", {"karpathy_json": None})
    assert coco_folders == [os.path.join("coco", "train2017"), os.path.join("coco", "val2017")]
