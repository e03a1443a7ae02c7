"""
Caption every image of a split and score the captions with the standard COCO caption metrics.

    python caption_eval.py --split val                       # log_caption/best.pt, or its newest model_*.pt
    python caption_eval.py --split val --beam-size 1,3,5 --length-penalty 0,0.5,1   # a table: which decoding?
    python caption_eval.py --features-dir coco_features_karpathy --split test --beam-size 3   # papers' numbers
    python caption_eval.py --checkpoint model.pt --limit 500 --beam-size 1 --no-meteor      # a quick look
    python caption_eval.py --split val --gallery val.html --gallery-order worst   # where does the model fail?
    python caption_eval.py --split val --compile             # the decoding step compiled: for whole splits

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D against all (about five) references of each image, computed by
pycocoevalcap exactly as the official COCO evaluation (`COCOEvalCap`) does: captions and references go through
the same PTB tokenizer, then the same scorers. Only then are the numbers comparable with published ones.
ClipCap, for instance, reports CIDEr 113 on Karpathy's test split (its transformer mapper, GPT-2 frozen; 108 with
an MLP and GPT-2 fine-tuned): pycocoevalcap prints that as 1.13, papers multiply every metric by 100. SPICE only
with --spice: it needs Stanford CoreNLP (~1 GB, downloaded once by
`python -m pycocoevalcap.spice.get_stanford_models`) and Java 8: SPICE's jar is reported failing on JDK 16.0.2
(github.com/audio-captioning/dcase-2020-baseline issue 14, fixed by installing Java 8) and on JRE 17 and 19
(github.com/yangbang18/MultiCapCLIP issue 2), with an InaccessibleObjectException from java.lang.

Needs `pip install pycocoevalcap` and Java (the PTB tokenizer and METEOR are Java programs). Without Java we
stop, before any captioning, and say how to install it, rather than fall back to a home-made tokenizer: the
numbers would come out close to the real ones and yet not be them, and a paper table is exactly where that
difference goes unnoticed. Installing a JRE takes one command; a wrong number in a comparison lasts.
(Training's own CIDEr-D, `cider_d` below, does use a home-made tokenizer: it only has to rank checkpoints of one
run, on machines that may lack Java. It is not a number to report.)

Several beam sizes and length penalties (comma-separated) caption the split once per combination and print one
table, the best CIDEr-D marked: choose the decoding on val, then report it on test. Greedy decoding (beam 1)
has no length penalty and is captioned once.

Writes a JSON (default: next to the checkpoint) with the metrics, the settings, and every caption in the COCO
results format [{"image_id": 42, "caption": "a dog on a beach"}, ...]; after a sweep, one such entry per row.

--gallery PAGE.html writes one self-contained web page: for --gallery-images images, the picture, the caption
and its references side by side, with the image's own CIDEr-D; --gallery-order worst puts the lowest first.
After a sweep it shows the captions of the best row. The pictures come from where coco.py read them: meta.json's
images_dir (Flickr, your own jsonl), else the COCO folder --coco-dir (COCO's features record only file names).
"""

import argparse
import base64
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import coco
from checkpoint import latest_checkpoint, load_model
from generate import beam_search, compile_decode_step, generate, gpt2_encoding, until_end_of_text
from model import EOT_TOKEN
from training import (HelpFormatter, autocast, default_device, default_dtype, existing_device, output_problem,
                      use_device)

# the names COCOEvalCap prints, in its order, but for SPICE (its last): only with --spice (see the top of the file)
METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
# the columns of a sweep's table: what captioning papers put in theirs. pycocoevalcap's "CIDEr" is CIDEr-D.
TABLE_COLUMNS = {"CIDEr": "CIDEr-D", "BLEU-4": "BLEU-4", "METEOR": "METEOR", "ROUGE-L": "ROUGE-L", "SPICE": "SPICE"}
# train_caption.py keeps the checkpoint with the best val CIDEr-D under this name, beside its model_*.pt
BEST_CHECKPOINT = "best.pt"

# -----------------------------------------------------------------------------
# The COCO caption metrics


def require_metric_tools(spice=False):
    """Fail now, in one line, if the metrics cannot run: better before an hour of captioning than after it."""
    if shutil.which("java") is None:
        raise FileNotFoundError("java: not found; the COCO caption metrics run Java (the PTB tokenizer and METEOR): "
                                "install a JRE, e.g. apt-get install default-jre")
    try:
        import pycocoevalcap  # noqa: F401  (imported here so that importing caption_eval never needs it)
    except ImportError:
        raise ImportError("pycocoevalcap: not installed; the COCO caption metrics need it: "
                          "pip install pycocoevalcap") from None
    if spice and not os.path.isfile(spice_corenlp_jar()):
        # pycocoevalcap would download it (~1 GB) unasked at the end of the run, or fail there when offline
        raise FileNotFoundError(f"{spice_corenlp_jar()}: not found; SPICE needs Stanford CoreNLP: "
                                f"python -m pycocoevalcap.spice.get_stanford_models (~1 GB, once)")


def spice_corenlp_jar():
    """Where pycocoevalcap's SPICE expects Stanford CoreNLP; its get_stanford_models downloads it there."""
    from pycocoevalcap.spice import get_stanford_models as spice_setup
    return os.path.join(spice_setup.SPICEDIR, spice_setup.SPICELIB, spice_setup.JAR + ".jar")


def coco_metrics(predictions, references, meteor=True, spice=False):
    """predictions {image_id: caption}, references {image_id: [captions]} -> {metric: score}, every score in
    [0, 1] except CIDEr-D (up to 10). meteor=False skips METEOR, the slowest of them (it starts a Java process
    that loads a 250 MB paraphrase table). spice=True adds SPICE, last."""
    require_metric_tools(spice)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = ptb_tokenize(predictions, references)
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
    if spice:
        scores.update(spice_score(gts, res))
    return {name: float(scores[name]) for name in METRICS + ["SPICE"] if name in scores}


def ptb_tokenize(predictions, references):
    """-> (gts, res), what pycocoevalcap's scorers take: {image_id: [tokenized references]} and
    {image_id: [tokenized prediction]}, both through Stanford's PTB tokenizer (a Java program), lower-cased,
    punctuation dropped: "A man's T-shirt." -> "a man 's t-shirt". Both sides go through it, so "Dog." in a
    caption matches "dog" in a reference."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    if predictions.keys() != references.keys():
        raise ValueError(f"predictions for {len(predictions)} images, references for {len(references)}: "
                         f"they must be for the same images")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in references})
    return gts, res


def cider_d_per_image(predictions, references):
    """-> {image_id: CIDEr-D of its caption}, as coco_metrics computes the split's: same tokenizer, and the IDF
    from all the images given, so their mean is coco_metrics' CIDEr. The gallery shows these."""
    from pycocoevalcap.cider.cider import Cider
    gts, res = ptb_tokenize(predictions, references)
    _, scores = Cider().compute_score(gts, res)  # in the order of gts' keys
    return {image_id: float(score) for image_id, score in zip(gts, scores)}


def spice_score(gts, res):
    """{'SPICE': score}: the F-score of the scene-graph tuples (objects, attributes, relations) that caption and
    references share. {} if the SPICE program fails: the other metrics took the same captioning hours and are
    kept. (It is reported failing on Java 16, 17 and 19, and running on Java 8: see the top of the file.)"""
    from pycocoevalcap.spice.spice import Spice
    try:
        score, _ = Spice().compute_score(gts, res)
    except subprocess.CalledProcessError as e:
        print(f"caption_eval.py: SPICE failed (java exited with status {e.returncode}; it runs on Java 8), "
              f"left out", file=sys.stderr)
        return {}
    return {"SPICE": score}

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
    (train or eval) it came in. dtype: as for caption_images. max_new_tokens: 30, as everywhere captions are
    decoded (why: at --max-new-tokens in parse_args).

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
    'bfloat16' or 'float16' (what default_dtype picks on a recent or an older GPU) runs the decoder's matmuls
    under autocast; 'float32' runs them as they are. progress=False: no progress bar (training's evals).
    With the model's decoding step compiled (generate.compile_decode_step), a last batch of fewer images is padded to
    batch_size by repeating its last image: one compiled shape for the whole split instead of a second compile
    (tens of seconds) for a few images."""
    enc = gpt2_encoding()
    model.eval()
    device_type = torch.device(device).type
    captions = []
    starts = range(0, len(features), batch_size)
    for start in tqdm(starts, desc="captioning", unit="batch", disable=not progress):
        image_feats = read_features(features, start, min(start + batch_size, len(features))).to(device)
        n_images = len(image_feats)
        rows = min(batch_size, len(features))  # every batch's size but the last's
        if getattr(model, "compiled_step", None) is not None and n_images < rows:
            padding = image_feats[-1:].expand(rows - n_images, *image_feats.shape[1:])
            image_feats = torch.cat([image_feats, padding])  # (rows, N_img, width)
        # every caption starts after an <|endoftext|>, as in training: (B, 1)
        prompt = torch.full((len(image_feats), 1), EOT_TOKEN, dtype=torch.long, device=device)
        with autocast(device_type, dtype):
            if beam_size > 1:  # already without the prompt and the final <|endoftext|>
                token_lists = beam_search(model, prompt, image_feats, beam_size=beam_size,
                                          max_new_tokens=max_new_tokens, length_penalty=length_penalty)
            else:
                tokens = generate(model, prompt, max_new_tokens, temperature=0, image_feats=image_feats)
                token_lists = [until_end_of_text(row[1:]) for row in tokens.tolist()]
        captions += [enc.decode(tokens).strip() for tokens in token_lists[:n_images]]
    return captions


def decodings(beam_sizes, length_penalties):
    """Every (beam size, length penalty) to caption with, in the order given. Greedy decoding (beam 1) keeps no
    beams to rank, so it has no length penalty (None): it is captioned once, not once per penalty."""
    combinations = []
    for beam_size in beam_sizes:
        for length_penalty in ([None] if beam_size == 1 else length_penalties):
            if (beam_size, length_penalty) not in combinations:
                combinations.append((beam_size, length_penalty))
    return combinations

# -----------------------------------------------------------------------------
# The gallery: one web page to look at the captions


# coco.py reads the pictures from these folders of its --coco-dir; Karpathy's splits take from both
IMAGE_FOLDERS = ("train2017", "val2017")
# marks a page as this command's gallery: a later --gallery may replace it, and no other file (check_outputs)
GALLERY_MARK = "<!-- caption_eval.py gallery -->"
GALLERY_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th { text-align: left; padding: 6px 10px; border-bottom: 2px solid #888; }
td { vertical-align: top; padding: 10px; border-bottom: 1px solid #ccc; }
td.picture { width: 260px; }
.file { color: #777; font-size: 0.8em; }
.missing { width: 240px; padding: 40px 8px; background: #eee; color: #a00; text-align: center; }
.caption { font-size: 1.15em; font-weight: bold; }
.cider { color: #555; margin-top: 0.4em; }
ol { margin: 0; padding-left: 1.4em; }
"""


def image_folders(coco_dir, meta):
    """Where the gallery looks for a split's pictures: the folder coco.py read them from when it recorded one
    (Flickr, your own jsonl: meta.json's images_dir, file names relative to it), else --coco-dir's COCO 2017
    folders (the features record only COCO's file names, e.g. '000000000042.jpg')."""
    if meta.get("images_dir"):
        return [meta["images_dir"]]
    return [os.path.join(coco_dir, folder) for folder in IMAGE_FOLDERS]


def find_image(folders, file_name):
    """The path of one of coco.py's images, or None if it is no longer there."""
    for folder in folders:
        path = os.path.join(folder, file_name)
        if os.path.isfile(path):
            return path
    return None


def thumbnail_uri(path, size):
    """An image file -> a data: URI of a JPEG at most `size` pixels wide and high. Embedded rather than linked,
    so the page is one file that still shows its pictures when copied off the cluster or mailed. Thumbnails
    keep it small: 256 pixels made 18 to 26 KB of base64 from three 512- to 720-pixel photos (one is
    matplotlib's grace_hopper.jpg), about 1 MB for 50 images; COCO's own JPEGs (val2017: 778 MB for 5,000
    images, 155 KB each) would make 10 MB."""
    with Image.open(path) as image:
        image = coco.rgb_image(image)  # decodes: a truncated file fails here, with OSError
    image.thumbnail((size, size))  # keeps the aspect ratio
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode("ascii")


def picture_cell(folders, file_name, size):
    """The image, or its name and why it is not shown: a gallery with a gap beats no gallery."""
    name = html.escape(file_name)
    path = find_image(folders, file_name)
    if path is None:
        return f'<div class="missing">{name}: missing (not in {html.escape(" or ".join(folders))})</div>'
    try:
        uri = thumbnail_uri(path, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # what PIL raises for bad files
        return f'<div class="missing">{name}: unreadable ({html.escape(str(e))})</div>'
    return f'<img src="{uri}" alt="{name}"><div class="file">{name}</div>'


def gallery_images(image_ids, cider_per_image, order, n_images):
    """Which images (positions in the split) the gallery shows, in its order: the first n_images of the split, or
    the n_images with the lowest CIDEr-D, lowest first (equal ones in the split's order)."""
    positions = range(len(image_ids))
    if order == "worst":
        positions = sorted(positions, key=lambda i: cider_per_image[int(image_ids[i])])  # sorted() is stable
    return list(positions)[:n_images]


def gallery_page(split, row, cider_per_image, header, order, n_images, folders, thumbnail_size=256):
    """-> the HTML of the gallery: the header lines (plain text), then one table row per image: picture,
    generated caption with its CIDEr-D, references. row: one of caption_and_score's rows. Every text is
    escaped: captions, references and paths are data, not markup."""
    captions = {entry["image_id"]: entry["caption"] for entry in row["captions"]}
    shown = gallery_images(split.image_ids, cider_per_image, order, n_images)
    if order == "worst":
        header = header + [f"the {len(shown)} images of {len(split)} with the lowest CIDEr-D, lowest first"]
    else:
        header = header + [f"the first {len(shown)} images of {len(split)}, in the split's order"]
    lines = ["<!DOCTYPE html>", GALLERY_MARK, '<html><head><meta charset="utf-8">',
             f"<title>{html.escape(header[0])}</title><style>{GALLERY_STYLE}</style></head><body>",
             f"<h1>{html.escape(header[0])}</h1>"]
    lines += [f"<p>{html.escape(line)}</p>" for line in header[1:]]
    lines.append("<table><tr><th>image</th><th>generated caption</th><th>references</th></tr>")
    for i in shown:
        image_id = int(split.image_ids[i])
        references = "".join(f"<li>{html.escape(reference)}</li>" for reference in split.captions[i])
        lines.append(f'<tr id="image-{image_id}">'
                     f'<td class="picture">{picture_cell(folders, split.files[i], thumbnail_size)}</td>'
                     f'<td><div class="caption">{html.escape(captions[image_id])}</div>'
                     f'<div class="cider">CIDEr-D {100 * cider_per_image[image_id]:.1f}</div></td>'
                     f"<td><ol>{references}</ol></td></tr>")
    lines.append("</table></body></html>")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# The command line


def comma_list(convert):
    """An argparse type: "1,3,5" -> [1, 3, 5], each item through convert (int or float)."""
    def parse(text):
        try:
            return [convert(item) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: not a comma-separated list of {convert.__name__}s") from None
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", help=f"a caption checkpoint written by train_caption.py (default: "
                                        f"{BEST_CHECKPOINT} in --checkpoint-dir, else its newest model_*.pt)")
    p.add_argument("--checkpoint-dir", default="log_caption", help="where train_caption.py wrote its checkpoints")
    p.add_argument("--features-dir", default="coco_features", help="what coco.py wrote")
    p.add_argument("--split", default="val", help="val; test with Karpathy's split (coco.py --karpathy-json)")
    p.add_argument("--beam-size", "--beam", type=comma_list(int), default=[3],
                   help="beam width, or several: 1,3,5 (1 is greedy decoding)")
    # 1: a caption's score is its mean log-probability per token (generate.beam_search), so a short caption does
    # not win by being short, as it would under the raw sum (0). Not tuned here: sweep 0,0.5,1 on val (the top of
    # this file, docs/captioning.md), then report test with the best row's decoding.
    p.add_argument("--length-penalty", type=comma_list(float), default=[1.0],
                   help="beam search ranks captions by log-probability / length**this; several: 0,0.5,1")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    # 30, here and wherever captions are decoded (sample.py, train_caption.py's examples, cider_d): a choice, not
    # measured: room for a long caption, while a decoding that runs on, repeating itself, stops there instead of
    # at block_size. COCO's caption lengths are not measured in this repo; for scale, SmallCap decodes at most 25
    # GPT-2 tokens (its infer.py CAPTION_LENGTH). Training keeps captions up to 40 tokens (train_caption.py
    # --max-caption-tokens), where a cut loses words to learn from; BLIP truncates its training text at 40 of its
    # own tokens (models/blip.py; its prompt included) and decodes COCO with max_length 20 (configs/caption_coco.yaml,
    # again counting its "a picture of" prompt). A caption cut at 30 never reached its <|endoftext|>: it is scored unfinished, as it stands.
    p.add_argument("--max-new-tokens", type=int, default=30, help="longest caption, in GPT-2 tokens")
    p.add_argument("--limit", type=int, help="only the first N images (CIDEr then differs: see coco_metrics)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR, the slowest metric")
    p.add_argument("--spice", action="store_true", help="add SPICE (needs Stanford CoreNLP and Java 8)")
    p.add_argument("--device", default="auto", type=existing_device, help="auto, cuda, cuda:1, mps, cpu")
    p.add_argument("--out", help="results JSON (default beside the checkpoint: CHECKPOINT_SPLIT_beamK.json, "
                                 "or CHECKPOINT_SPLIT_sweep.json for several decodings)")
    p.add_argument("--gallery", help="also write this web page: images, captions, references, CIDEr-D each")
    p.add_argument("--gallery-images", type=int, default=50, help="how many images the gallery shows (default 50)")
    p.add_argument("--gallery-order", choices=["split", "worst"], default="split",
                   help="the split's order, or the lowest CIDEr-D first")
    p.add_argument("--coco-dir", default="coco", help="the COCO folder coco.py read: the gallery's pictures")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decoding step: tens of seconds once per beam size, which a whole "
                        "split repays (see BENCHMARKS.md)")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "limit", "gallery_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.beam_size) < 1:
        p.error(f"--beam-size {min(args.beam_size)}: must be at least 1")
    if not all(math.isfinite(penalty) for penalty in args.length_penalty):
        p.error("--length-penalty: must be finite numbers")
    if args.device == "auto":
        args.device = default_device()
    return args


def choose_checkpoint(checkpoint, checkpoint_dir):
    """-> (path, why this one): --checkpoint when given; else the run's best.pt (its best val CIDEr-D, which
    train_caption.py keeps), else its newest model_*.pt."""
    if checkpoint:
        return checkpoint, "given by --checkpoint"
    best = os.path.join(checkpoint_dir, BEST_CHECKPOINT)
    if os.path.isfile(best):
        return best, "the best val CIDEr-D of the run"
    newest = latest_checkpoint(checkpoint_dir)
    if newest:
        return newest, f"the newest in {checkpoint_dir}, which has no {BEST_CHECKPOINT}"
    raise FileNotFoundError(f"{checkpoint_dir}: no {BEST_CHECKPOINT} or model_*.pt checkpoint here "
                            f"(pass --checkpoint, or --checkpoint-dir where train_caption.py wrote them)")


def default_out(checkpoint_path, split, combinations):
    """Beside the checkpoint: model_011558_val_beam3.json for one decoding, model_011558_val_sweep.json for more."""
    decoding = f"beam{combinations[0][0]}" if len(combinations) == 1 else "sweep"
    return os.path.splitext(checkpoint_path)[0] + f"_{split}_{decoding}.json"


# the settings every results JSON of this command holds: a later --out may replace such a file, and no other
RESULTS_KEYS = {"checkpoint", "features_dir", "split", "images", "max_new_tokens"}


def check_outputs(outputs, checkpoint_path, input_folders):
    """{flag: path} of the files to write, each checked before the captioning hours (why_refused says what for).
    input_folders: {folder: what it is}, the folders this command reads."""
    taken = {os.path.realpath(checkpoint_path): "the checkpoint"}
    for flag, path in outputs.items():
        if not path:
            continue
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such folder (for {flag} {path})")
        problem = why_refused(flag, path, taken, input_folders)
        if problem:
            raise ValueError(f"{flag} {path}: {problem}")
        taken[os.path.realpath(path)] = f"{flag} {path}"


def why_refused(flag, path, taken, input_folders):
    """Why path may not be written, or None. An output replaces no input, and of existing files only an earlier
    output of its own kind: a results JSON over model.pt, a gallery over log.txt, val_features.npy or a picture it
    shows would lose them."""
    real = os.path.realpath(path)
    if real in taken:
        return f"would overwrite {taken[real]}"
    for folder, what in input_folders.items():
        if os.path.commonpath([real, os.path.realpath(folder)]) == os.path.realpath(folder):
            return f"inside {folder} ({what}), which this command reads"
    problem = output_problem(path)
    if not problem and os.path.exists(path) and not earlier_output(path, flag):
        problem = f"exists and is not an earlier {flag} of caption_eval.py; remove it, or choose another name"
    return problem


def earlier_output(path, flag):
    """Whether path is a file this command wrote, under flag: a gallery page, or a results JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            if flag == "--gallery":
                return GALLERY_MARK in f.read(1000)
            if f.read(1) != "{":  # not a JSON object: not read on (a features file can be gigabytes)
                return False
            f.seek(0)
            return RESULTS_KEYS <= json.load(f).keys()
    except (OSError, ValueError, AttributeError):  # unreadable, not UTF-8 or JSON, a JSON list
        return False


def check_same_encoder(checkpoint, checkpoint_path, meta, features_dir):
    """Features from another image encoder give fluent captions of nothing in particular, silently: refuse."""
    trained_on = coco.trained_encoder(checkpoint, checkpoint_path)
    if not coco.same_encoder(trained_on, meta["encoder"]):
        raise ValueError(f"{checkpoint_path}: trained on features of {coco.describe_encoder(trained_on)}, "
                         f"but {features_dir} holds {coco.describe_encoder(meta['encoder'])}'s")


def references_per_image(split):
    """{'min', 'mean', 'max'} references per image: COCO has 5 for most images, a few more for some."""
    counts = [len(captions) for captions in split.captions]
    return {"min": min(counts), "mean": round(float(np.mean(counts)), 3), "max": max(counts)}


def describe_split(split_name, meta, n_images, n_in_split, references):
    """The header line a reader needs to compare our numbers with a paper's: which split (papers report
    Karpathy's test split), how many images, how many references each (more references, higher scores)."""
    karpathy_json = meta.get("karpathy_json")
    if meta.get("captions_jsonl"):
        source = f"your images' split ({meta['captions_jsonl']})"
    else:
        source = f"Karpathy's split ({karpathy_json})" if karpathy_json else "COCO 2017's split (not Karpathy's)"
    images = f"{n_images} images" if n_images == n_in_split else f"the first {n_images} of {n_in_split} images"
    if references["min"] == references["max"]:
        per_image = f"{references['min']} references per image"
    else:
        per_image = (f"{references['min']} to {references['max']} references per image "
                     f"(mean {references['mean']:.2f})")
    return f"split {split_name} of {source}: {images}, {per_image}"


def describe_decoding(beam_size, length_penalty):
    if beam_size == 1:
        return "greedy (beam 1)"
    return f"beam {beam_size}, length penalty {length_penalty:g}"


def print_metrics(scores):
    print(f"{'metric':8s} {'score':>7s} {'x100':>6s}  (papers report x100)")
    for name, value in scores.items():
        print(f"{name:8s} {value:7.4f} {100 * value:6.1f}")


def best_row(rows):
    """The row with the highest CIDEr-D (the first of equals): the metric captioning papers rank by."""
    return max(range(len(rows)), key=lambda i: (rows[i]["metrics"]["CIDEr"], -i))


def print_table(rows, best):
    """One line per decoding, the metrics x100 as papers print them, the best CIDEr-D marked."""
    columns = [name for name in TABLE_COLUMNS if any(name in row["metrics"] for row in rows)]
    print(f"{'beam':>4s} {'len.pen':>7s} " + " ".join(f"{TABLE_COLUMNS[name]:>7s}" for name in columns)
          + "   (x100, as papers print them)")
    for i, row in enumerate(rows):
        penalty = "-" if row["length_penalty"] is None else f"{row['length_penalty']:g}"
        cells = " ".join(f"{100 * row['metrics'][name]:7.1f}" if name in row["metrics"] else f"{'n/a':>7s}"
                         for name in columns)
        print(f"{row['beam']:4d} {penalty:>7s} {cells}" + ("   <- best CIDEr-D" if i == best else ""))


def write_text(path, text):
    """Write to a temporary file, then rename: a crash never leaves half a file, a full disk not even the .tmp."""
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise ValueError(f"{path}: not written ({e.strerror or e})") from None


def caption_and_score(model, split, combinations, args, dtype):
    """Caption the split once per (beam size, length penalty) and score the captions -> one row per decoding:
    {'beam', 'length_penalty', 'metrics', 'captions' (COCO results format)}."""
    image_ids = [int(i) for i in split.image_ids]
    references = dict(zip(image_ids, split.captions))
    rows = []
    for beam_size, length_penalty in combinations:
        if len(combinations) > 1:
            print(describe_decoding(beam_size, length_penalty))
        captions = caption_images(model, split, args.batch_size, beam_size, args.max_new_tokens, args.device,
                                  dtype, length_penalty)
        predictions = dict(zip(image_ids, captions))
        scores = coco_metrics(predictions, references, meteor=not args.no_meteor, spice=args.spice)
        rows.append({"beam": beam_size, "length_penalty": length_penalty, "metrics": scores,
                     "captions": [{"image_id": i, "caption": c} for i, c in predictions.items()]})
    return rows


def report(rows, settings, out):
    """Print the metrics (one decoding) or the table (several), and write them to the results JSON."""
    if len(rows) == 1:
        print_metrics(rows[0]["metrics"])
        write_text(out, json.dumps({**settings, **rows[0]}))
    else:
        best = best_row(rows)
        print_table(rows, best)
        write_text(out, json.dumps({**settings, "best": {key: rows[best][key] for key in ("beam", "length_penalty")},
                                    "rows": rows}))
    print(f"wrote {out}")


def write_gallery(path, rows, split, checkpoint_path, split_line, args, meta):
    """The gallery of the best row's captions (the only row's, without a sweep), each with its own CIDEr-D."""
    best = best_row(rows)
    row = rows[best]
    references = dict(zip((int(i) for i in split.image_ids), split.captions))
    predictions = {entry["image_id"]: entry["caption"] for entry in row["captions"]}
    cider_per_image = cider_d_per_image(predictions, references)
    decoding = describe_decoding(row["beam"], row["length_penalty"])
    if len(rows) > 1:
        decoding += f": the best CIDEr-D of {len(rows)} decodings"
    metrics = ", ".join(f"{TABLE_COLUMNS.get(name, name)} {100 * value:.1f}" for name, value in row["metrics"].items())
    header = [f"{args.split} captions of {checkpoint_path}", split_line, decoding,
              f"{metrics} (x100, as papers print them); beside each caption its image's CIDEr-D: their mean over "
              f"the split is the CIDEr-D here"]
    write_text(path, gallery_page(split, row, cider_per_image, header, args.gallery_order, args.gallery_images,
                                  image_folders(args.coco_dir, meta)))
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    # everything that could stop the run at the end is checked at the start, before the captioning hours
    require_metric_tools(args.spice)
    checkpoint_path, why = choose_checkpoint(args.checkpoint, args.checkpoint_dir)
    combinations = decodings(args.beam_size, args.length_penalty)
    out = args.out or default_out(checkpoint_path, args.split, combinations)
    meta = coco.read_meta(args.features_dir)
    pictures = {folder: "the gallery's pictures" for folder in image_folders(args.coco_dir, meta)}
    check_outputs({"--out": out, "--gallery": args.gallery}, checkpoint_path,
                  {args.features_dir: "--features-dir", **pictures})
    if args.gallery and not os.path.isdir(args.coco_dir):  # a gallery without pictures still shows the captions
        print(f"caption_eval.py: {args.coco_dir}: no such folder (--coco-dir); the gallery will name its images "
              f"without showing them", file=sys.stderr)
    use_device(args.device)

    model, checkpoint = load_model(checkpoint_path, kind="caption")
    print(f"checkpoint {checkpoint_path} (step {checkpoint.get('step', '?')}; {why})")
    check_same_encoder(checkpoint, checkpoint_path, meta, args.features_dir)
    if args.split not in meta["splits"]:
        raise ValueError(f"{args.features_dir}: has the splits {', '.join(meta['splits'])}, not {args.split} "
                         f"(test exists with Karpathy's split: coco.py --karpathy-json)")
    split = coco.load_split(args.features_dir, args.split)
    n_in_split = len(split)
    if args.limit:
        split = split.first(args.limit)
    references = references_per_image(split)
    dtype = default_dtype(args.device)  # asked of the GPU in use, not of GPU 0
    split_line = describe_split(args.split, meta, len(split), n_in_split, references)
    print(split_line)
    decoding = f"{len(combinations)} decodings" if len(combinations) > 1 else describe_decoding(*combinations[0])
    print(f"{decoding}, {args.device}, {dtype}")

    model.to(args.device)
    if args.compile:
        compile_decode_step(model)
    rows = caption_and_score(model, split, combinations, args, dtype)
    if args.compile:
        for (rows_at_once, max_len), seconds in model.compiled_step.compiled.items():
            print(f"--compile: compiled the decoding step for a batch of {rows_at_once} (images x beams) and "
                  f"{max_len} positions in {seconds:.1f} s (once for this shape)")
    settings = {"checkpoint": checkpoint_path, "features_dir": args.features_dir, "split": args.split,
                "karpathy_json": meta.get("karpathy_json"), "images": len(split),
                "references_per_image": references, "max_new_tokens": args.max_new_tokens}
    report(rows, settings, out)
    if args.gallery:
        write_gallery(args.gallery, rows, split, checkpoint_path, split_line, args, meta)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:  # the user's to fix: one line, naming the file
        sys.exit(f"caption_eval.py: {e}")
    except KeyboardInterrupt:  # ^C: one line, not a traceback, and the status a shell gives it (128 + SIGINT)
        print("caption_eval.py: stopped (Ctrl-C)", file=sys.stderr)  # each output is written whole or not at all
        sys.exit(130)
