"""caption_eval.py: the COCO metrics agree with values worked out by hand, and captioning a split is batched
beam search / greedy decoding."""
import numpy as np
import pytest
import torch

import caption_eval
import coco
from model import EOT_TOKEN, GPT, GPTConfig

pytest.importorskip("pycocoevalcap")


def test_bleu_and_rouge_match_hand_computed_values():
    predictions = {1: "A cat sits on the mat."}
    references = {1: ["A cat is on the mat.", "There is a cat on the mat."]}
    scores = caption_eval.coco_metrics(predictions, references, meteor=False)
    # unigrams a cat sits on the mat: 5 of 6 appear in a reference; the closest reference length is 6: no penalty
    assert scores["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)
    # bigrams: "a cat", "on the", "the mat" of 5 appear; BLEU-2 is the geometric mean of the two precisions
    assert scores["BLEU-2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5, abs=1e-6)
    # ROUGE-L: longest common subsequence with "a cat is on the mat" is "a cat on the mat" (5 tokens), and with
    # the other reference also 5; precision 5/6, recall 5/6 resp. 5/7; pycocoevalcap takes the best P and R
    # over references and F with beta = 1.2
    p, r, beta = 5 / 6, 5 / 6, 1.2
    assert scores["ROUGE-L"] == pytest.approx((1 + beta**2) * p * r / (r + beta**2 * p), abs=1e-6)


def test_perfect_and_wrong_captions():
    refs = {i: [f"a photo of a {w} on a table", f"a {w} on a wooden table", f"the {w} sits on the table"]
            for i, w in enumerate(["cup", "book", "phone"])}
    perfect = caption_eval.coco_metrics({i: r[0] for i, r in refs.items()}, refs, meteor=False)
    wrong = caption_eval.coco_metrics({i: "zebras running across grass" for i in refs}, refs, meteor=False)
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["CIDEr"] > 1.0 and wrong["CIDEr"] < 0.01 and wrong["BLEU-1"] < 0.01


def test_no_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(caption_eval.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="java: not found"):
        caption_eval.coco_metrics({1: "a cat"}, {1: ["a cat"]})


def test_caption_images_beam_1_is_greedy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, cross_attn_every=2, n_embd_img=16)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            if hasattr(block, "xattn"):
                block.xattn.c_proj.weight.normal_(0, 0.5)
    features = np.random.default_rng(0).standard_normal((5, 7, 16)).astype(np.float16)
    split = coco.Split(features, np.arange(5), np.arange(5), [""] * 5, [[]] * 5, [[]] * 5)
    captions = caption_eval.caption_images(model, split, 2, 1, 8, "cpu", "float32")
    beam = caption_eval.caption_images(model, split, 2, 3, 8, "cpu", "float32")
    assert len(captions) == len(beam) == 5
    image_feats = torch.from_numpy(features)
    out = model.generate(torch.full((5, 1), EOT_TOKEN), 8, temperature=0, image_feats=image_feats).tolist()
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    expected = [enc.decode([t for t in row[1:]][:row[1:].index(EOT_TOKEN)] if EOT_TOKEN in row[1:] else row[1:]).strip()
                for row in out]
    assert captions == expected
