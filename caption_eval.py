"""
Caption every image of a split and score the captions with the standard COCO caption metrics.

    python caption_eval.py --checkpoint log_caption/model_011558.pt --split val
    python caption_eval.py --checkpoint model.pt --features-dir coco_features_karpathy --split test --beam 5
    python caption_eval.py --checkpoint model.pt --limit 500 --beam 1 --no-meteor     # a quick look

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D against all (about five) references of each image, computed by
pycocoevalcap exactly as the official COCO evaluation (`COCOEvalCap`) does: captions and references go through
the same PTB tokenizer, then the same scorers. Only then are the numbers comparable with published ones.
ClipCap, for instance, reports CIDEr 113 on Karpathy's test split: pycocoevalcap prints that as 1.13, papers
multiply every metric by 100. SPICE is left out: it downloads Stanford CoreNLP (~1 GB) the first time it runs.

Needs `pip install pycocoevalcap` and Java (the PTB tokenizer and METEOR are Java programs). Without Java we
stop, before any captioning, and say how to install it, rather than fall back to a home-made tokenizer: the
numbers would come out close to the real ones and yet not be them, and a paper table is exactly where that
difference goes unnoticed. Installing a JRE takes one command; a wrong number in a comparison lasts.

Writes a JSON (default: next to the checkpoint) with the metrics, the settings, and every caption in the COCO
results format [{"image_id": 42, "caption": "a dog on a beach"}, ...].
"""

import argparse
import json
import os
import re
import shutil
import sys

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

import coco
from model import EOT_TOKEN, GPT
from training import autocast, default_device, default_dtype, use_device

# the names COCOEvalCap prints, in its order (SPICE, its last, left out: see the top of the file)
METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]

# -----------------------------------------------------------------------------
# The COCO caption metrics


def require_metric_tools():
    """Fail now, in one line, if the metrics cannot run: better before an hour of captioning than after it."""
    if shutil.which("java") is None:
        raise FileNotFoundError("java: not found; the COCO caption metrics run Java (the PTB tokenizer and METEOR): "
                                "install a JRE, e.g. apt-get install default-jre")
    try:
        import pycocoevalcap  # noqa: F401  (imported here so that importing caption_eval never needs it)
    except ImportError:
        raise ImportError("pycocoevalcap: not installed; the COCO caption metrics need it: "
                          "pip install pycocoevalcap") from None


def coco_metrics(predictions, references, meteor=True):
    """predictions {image_id: caption}, references {image_id: [captions]} -> {metric: score}, every score in
    [0, 1] except CIDEr-D (up to 10). meteor=False skips METEOR, the slowest of them (it starts a Java process
    that loads a 250 MB paraphrase table)."""
    require_metric_tools()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if predictions.keys() != references.keys():
        raise ValueError(f"predictions for {len(predictions)} images, references for {len(references)}: "
                         f"they must be for the same images")
    # Stanford's PTB tokenizer, lower-cased, punctuation dropped: "A man's T-shirt." -> "a man 's t-shirt".
    # Both sides go through it, so "Dog." in a caption matches "dog" in a reference. The scorers take
    # {image_id: [tokenized strings]}, one string for the prediction.
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in references})
    scores = {}
    # BLEU-n: corpus-level, clipped n-gram precisions up to n, geometric mean, and a brevity penalty against
    # the reference length closest to each prediction's ('closest', as the COCO server computes it)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update(zip(METRICS[:4], bleu))
    if meteor:
        # METEOR: unigram matches that also count stems, synonyms and paraphrases, penalised for fragmentation
        scores["METEOR"], _ = Meteor().compute_score(gts, res)
    # ROUGE-L: longest common subsequence with the references, as an F-score weighting recall (beta = 1.2)
    scores["ROUGE-L"], _ = Rouge().compute_score(gts, res)
    # pycocoevalcap's Cider is CIDEr-D, the variant the COCO server reports: TF-IDF weighted n-grams (1..4)
    # with clipped counts and a Gaussian length penalty, x10. The IDF comes from the references of the images
    # scored, so scores on a subset (--limit) are not comparable with scores on the whole split.
    scores["CIDEr"], _ = Cider().compute_score(gts, res)
    return {name: float(scores[name]) for name in METRICS if name in scores}


# -----------------------------------------------------------------------------
# CIDEr-D during training (train_caption.py): no Java


# a word, with inner hyphens and periods ("t-shirt", "1.5"); a clitic ("'s", "n't"); or "&" or "$"
WORD = re.compile(r"n't|'\w+|\w+(?:[-./]\w+)*|[&$]")


def simple_tokenize(caption):
    """What the PTB tokenizer does to an ordinary caption, in Python: lower-case, clitics split off, punctuation
    dropped. "A man's T-shirt." -> "a man 's t-shirt", "don't" -> "do n't". It differs on rarities (the PTB
    tokenizer turns brackets into "-lrb-" and "-rrb-" words): close enough to rank checkpoints, not to report."""
    text = re.sub(r"(\w)n't\b", r"\1 n't", caption.lower())  # the PTB splits "don't" as "do n't"
    return " ".join(WORD.findall(text))


def cider_d_score(predictions, references):
    """predictions {key: caption}, references {key: [captions]} -> CIDEr-D (0 to 10; papers print it x100),
    by pycocoevalcap's own scorer (pure Python) on simple_tokenize'd text: no Java."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ImportError("pycocoevalcap: not installed; CIDEr-D needs it: pip install pycocoevalcap") from None
    if predictions.keys() != references.keys():
        raise ValueError(f"predictions for {len(predictions)} images, references for {len(references)}: "
                         f"they must be for the same images")
    gts = {key: [simple_tokenize(c) for c in refs] for key, refs in references.items()}
    res = {key: [simple_tokenize(predictions[key])] for key in references}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def cider_d(model, split, device, dtype, n_images=500, batch_size=64, max_new_tokens=30):
    """CIDEr-D of greedy captions of the first n_images of a coco.Split: the number train_caption.py logs at
    each eval and keeps best.pt by. model: the GPT itself (not a DDP wrapper), on device; it is left in the mode
    (train or eval) it came in. dtype: 'bfloat16' or 'float32', as for caption_images.

    The same images every time, so the numbers of one run compare with each other. They do not compare with a
    caption_eval.py run's: the tokenizer here is simple_tokenize, not Java's PTB tokenizer (training machines
    may have no Java), and CIDEr-D's IDF comes from these n_images' references, not the whole split's.
    Under DDP one rank's call is enough: every rank would caption the same images."""
    subset = split.first(n_images)
    was_training = model.training
    try:
        captions = caption_images(model, subset, batch_size, 1, max_new_tokens, device, dtype, progress=False)
    finally:
        model.train(was_training)
    return cider_d_score(dict(enumerate(captions)), dict(enumerate(subset.captions)))

# -----------------------------------------------------------------------------
# Captioning many images


def read_features(features, start, end):
    """Images start..end-1 as a (B, N_img, width) tensor. A coco.Split reads them from its memory-mapped file
    only now: a whole split of features (5000 x 50 x 768 fp16 = 384 MB for val) never has to be in memory."""
    if isinstance(features, coco.Split):
        return features.image_feats(np.arange(start, end))
    if isinstance(features, torch.Tensor):
        return features[start:end]
    return torch.from_numpy(np.array(features[start:end]))  # numpy array or memmap: copy this batch only


@torch.no_grad()
def caption_images(model, features, batch_size, beam_size, max_new_tokens, device, dtype, length_penalty=1.0,
                   progress=True):
    """features: (N, N_img, width) array, memmap or tensor of image tokens, or a coco.Split -> N captions.
    Beam search when beam_size > 1, greedy decoding when it is 1 (length_penalty then plays no part). dtype
    'bfloat16' (what default_dtype picks on a recent GPU) runs the decoder's matmuls under bf16 autocast;
    'float32' runs them as they are. progress=False: no progress bar (training's evals)."""
    enc = tiktoken.get_encoding("gpt2")
    model.eval()
    device_type = torch.device(device).type
    captions = []
    starts = range(0, len(features), batch_size)
    for start in tqdm(starts, desc="captioning", unit="batch", disable=not progress):
        image_feats = read_features(features, start, min(start + batch_size, len(features))).to(device)
        # every caption starts after an <|endoftext|>, as in training: (B, 1)
        prompt = torch.full((len(image_feats), 1), EOT_TOKEN, dtype=torch.long, device=device)
        with autocast(device_type, dtype):
            if beam_size > 1:  # already without the prompt and the final <|endoftext|>
                token_lists = model.beam_search(prompt, image_feats, beam_size=beam_size,
                                                max_new_tokens=max_new_tokens, length_penalty=length_penalty)
            else:
                tokens = model.generate(prompt, max_new_tokens, temperature=0, image_feats=image_feats)
                token_lists = [up_to_end_of_text(row[1:]) for row in tokens.tolist()]
        captions += [enc.decode(tokens).strip() for tokens in token_lists]
    return captions


def up_to_end_of_text(tokens):
    """A generated row is the caption, then <|endoftext|> (and more of them as padding once it has finished)."""
    return tokens[:tokens.index(EOT_TOKEN)] if EOT_TOKEN in tokens else tokens


# -----------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a caption checkpoint written by train_caption.py")
    p.add_argument("--features-dir", default="coco_features", help="what coco.py wrote")
    p.add_argument("--split", default="val", help="val; test with Karpathy's split (coco.py --karpathy-json)")
    p.add_argument("--beam", type=int, default=3, help="beam width; 1 is greedy decoding")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search ranks captions by log-probability / length**this")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=30, help="longest caption, in GPT-2 tokens")
    p.add_argument("--limit", type=int, help="only the first N images (CIDEr then differs: see coco_metrics)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR, the slowest metric")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:1, mps, cpu")
    p.add_argument("--out", help="results JSON (default: CHECKPOINT_SPLIT_beamK.json beside the checkpoint)")
    args = p.parse_args(argv)
    for name in ("beam", "batch_size", "max_new_tokens", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device == "auto":
        args.device = default_device()
    if args.out is None:
        args.out = os.path.splitext(args.checkpoint)[0] + f"_{args.split}_beam{args.beam}.json"
    return args


def check_same_clip(checkpoint, checkpoint_path, meta, features_dir):
    """Features from another image encoder give fluent captions of nothing in particular, silently: refuse."""
    clip = checkpoint.get("clip")
    if not clip:
        raise ValueError(f"{checkpoint_path}: records no CLIP encoder (not written by train_caption.py?)")
    trained_on = (clip["model"], clip["pretrained"])
    here = (meta["clip_model"], meta["clip_pretrained"])
    if trained_on != here:
        raise ValueError(f"{checkpoint_path}: trained on features of CLIP {trained_on[0]} ({trained_on[1]}), "
                         f"but {features_dir} holds CLIP {here[0]} ({here[1]})")


def print_metrics(scores):
    print(f"{'metric':8s} {'score':>7s} {'x100':>6s}  (papers report x100)")
    for name, value in scores.items():
        print(f"{name:8s} {value:7.4f} {100 * value:6.1f}")


def write_json(path, obj):
    """Write to a temporary file, then rename: a crash never leaves half a results file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    args = parse_args(argv)
    # everything that could stop the run at the end is checked at the start, before the captioning hours
    require_metric_tools()
    out_dir = os.path.dirname(args.out) or "."
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir}: no such folder (for --out {args.out})")
    use_device(args.device)

    model, checkpoint = GPT.from_checkpoint(args.checkpoint, kind="caption")
    meta = coco.read_meta(args.features_dir)
    check_same_clip(checkpoint, args.checkpoint, meta, args.features_dir)
    if args.split not in meta["splits"]:
        raise ValueError(f"{args.features_dir}: has the splits {', '.join(meta['splits'])}, not {args.split} "
                         f"(test exists with Karpathy's split: coco.py --karpathy-json)")
    split = coco.load_split(args.features_dir, args.split)
    if args.limit:
        split = split.first(args.limit)
    dtype = default_dtype(args.device)  # asked of the GPU in use, not of GPU 0
    print(f"{args.split}: {len(split)} images, beam {args.beam}, {args.device}, {dtype}")

    model.to(args.device)
    captions = caption_images(model, split, args.batch_size, args.beam, args.max_new_tokens, args.device, dtype,
                              args.length_penalty)
    image_ids = [int(i) for i in split.image_ids]
    predictions = dict(zip(image_ids, captions))
    references = dict(zip(image_ids, split.captions))
    scores = coco_metrics(predictions, references, meteor=not args.no_meteor)

    print_metrics(scores)
    write_json(args.out, {
        "checkpoint": args.checkpoint, "features_dir": args.features_dir, "split": args.split, "beam": args.beam,
        "length_penalty": args.length_penalty, "max_new_tokens": args.max_new_tokens, "images": len(captions),
        "metrics": scores,
        "captions": [{"image_id": i, "caption": c} for i, c in predictions.items()],  # COCO results format
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:  # the user's to fix: one line, naming the file
        sys.exit(f"caption_eval.py: {e}")
