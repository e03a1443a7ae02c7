"""
Caption a whole split and score it with the standard COCO caption metrics.

    python caption_eval.py --checkpoint log_caption/model_020000.pt --split val
    python caption_eval.py --checkpoint model.pt --features-dir coco_features_karpathy --split test --beam 5

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D against all (about five) references per image, computed by pycocoevalcap
exactly as the official COCO evaluation does: the same PTB tokenizer, the same scorers. That is what makes the
numbers comparable with papers (ClipCap reports CIDEr 113 on the Karpathy test split; pycocoevalcap prints it
as 1.13, papers multiply by 100). SPICE is left out: it downloads Stanford CoreNLP at run time.

Needs `pip install pycocoevalcap` and Java (the PTB tokenizer and METEOR are Java programs). Without Java we
stop and say so rather than fall back to another tokenizer: numbers from a different tokenization look
comparable and are not.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

import coco
from model import EOT_TOKEN, GPT
from training import autocast, default_device, default_dtype

METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def coco_metrics(predictions, references, meteor=True):
    """predictions {image_id: caption}, references {image_id: [captions]} -> {metric: score}."""
    if shutil.which("java") is None:
        raise FileNotFoundError("java: not found; the COCO caption metrics need Java for the PTB tokenizer and METEOR: install a JRE "
                           "(e.g. apt-get install default-jre)")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise ImportError("the COCO caption metrics need pycocoevalcap: pip install pycocoevalcap") from None
    tokenizer = PTBTokenizer()  # lower-cases and strips punctuation, as the COCO server does
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in references})
    scores = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update(zip(METRICS[:4], bleu))
    if meteor:
        scores["METEOR"], _ = Meteor().compute_score(gts, res)
    scores["ROUGE-L"], _ = Rouge().compute_score(gts, res)
    scores["CIDEr"], _ = Cider().compute_score(gts, res)  # pycocoevalcap's Cider is the COCO server's CIDEr-D
    return {name: float(value) for name, value in scores.items()}


@torch.no_grad()
def caption_images(model, split, batch_size, beam_size, max_new_tokens, device, dtype):
    """Every image of a coco.Split -> its caption: beam search, or greedy when beam_size is 1."""
    enc = tiktoken.get_encoding("gpt2")
    model.eval()
    captions = []
    for start in tqdm(range(0, len(split.image_ids), batch_size), desc="captioning", unit="batch"):
        image_feats = split.image_feats(np.arange(start, min(start + batch_size, len(split.image_ids)))).to(device)
        prompt = torch.full((len(image_feats), 1), EOT_TOKEN, device=device)
        with autocast(device.split(":")[0], dtype):
            if beam_size > 1:
                token_lists = model.beam_search(prompt, image_feats, beam_size=beam_size, max_new_tokens=max_new_tokens)
            else:
                out = model.generate(prompt, max_new_tokens, temperature=0, image_feats=image_feats).tolist()
                token_lists = [row[1:row.index(EOT_TOKEN, 1)] if EOT_TOKEN in row[1:] else row[1:] for row in out]
        captions += [enc.decode(tokens).strip() for tokens in token_lists]
    return captions


def write_results(path, results):
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a caption checkpoint written by train_caption.py")
    p.add_argument("--features-dir", default="coco_features")
    p.add_argument("--split", default="val", help="val, or test with Karpathy's split")
    p.add_argument("--beam", type=int, default=3, help="beam width (1: greedy)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (the slowest metric)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="results JSON (default: next to the checkpoint)")
    args = p.parse_args()
    device = default_device() if args.device == "auto" else args.device

    model, checkpoint = GPT.from_checkpoint(args.checkpoint, kind="caption")
    meta = coco.read_meta(args.features_dir)
    trained_on = (checkpoint["clip"]["model"], checkpoint["clip"]["pretrained"])
    if trained_on != (meta["clip_model"], meta["clip_pretrained"]):
        # features of another encoder give fluent nonsense, silently: refuse
        raise ValueError(f"{args.checkpoint}: trained on {trained_on[0]} ({trained_on[1]}) features, but "
                         f"{args.features_dir} holds {meta['clip_model']} ({meta['clip_pretrained']})")
    split = coco.load_split(args.features_dir, args.split)
    if args.limit:
        split = split.first(args.limit)
    model.to(device)
    captions = caption_images(model, split, args.batch_size, args.beam, args.max_new_tokens, device,
                              default_dtype(device.split(":")[0]))
    predictions = {int(i): c for i, c in zip(split.image_ids, captions)}
    references = {int(i): refs for i, refs in zip(split.image_ids, split.captions)}
    scores = coco_metrics(predictions, references, meteor=not args.no_meteor)
    for name, value in scores.items():
        print(f"{name:8s} {value:.4f}")
    out = args.out or os.path.splitext(args.checkpoint)[0] + f"_{args.split}_beam{args.beam}.json"
    write_results(out, {"checkpoint": args.checkpoint, "split": args.split, "beam": args.beam, "images": len(captions),
                        "metrics": scores,
                        "captions": [{"image_id": i, "caption": c} for i, c in predictions.items()]})
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"caption_eval.py: error: {e}")
