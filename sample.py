"""
Captions for images, or text from a prompt.

    python sample.py --image dog.jpg cat.png                     # newest checkpoint in log_caption/, beam search
    python sample.py --image dog.jpg --checkpoint log_caption/model_020000.pt --beam 5
    python sample.py --image dog.jpg --temperature 0.8 --top-p 0.9 --num-samples 3
    python sample.py --prompt "Hello, I'm a language model," --checkpoint log/model_019073.pt
    python sample.py --prompt "Hello, I'm a language model," --pretrained gpt2 --num-samples 4

From Python:

    from sample import Captioner
    captioner = Captioner.from_checkpoint("log_caption/model_020000.pt")
    captioner.caption(["dog.jpg", "cat.png"])        # -> ['a dog running on the grass', ...]

An image is encoded by the CLIP model recorded in the checkpoint (the one its training features came from),
then the decoder writes the caption after an <|endoftext|> prompt, cross-attending to the image's 50 tokens.
"""

import argparse
import os
import sys

import tiktoken
import torch
from PIL import Image, UnidentifiedImageError

import coco
from model import EOT_TOKEN, GPT
from training import autocast, default_device, default_dtype, latest_checkpoint


class Captioner:
    """A caption checkpoint together with the CLIP encoder its features came from."""

    def __init__(self, model, clip_model, preprocess, device, dtype="float32"):
        self.model, self.clip_model, self.preprocess = model.eval(), clip_model, preprocess
        self.device, self.dtype = device, dtype
        self.enc = tiktoken.get_encoding("gpt2")

    @classmethod
    def from_checkpoint(cls, path, device="auto", dtype=None):
        device = default_device() if device == "auto" else device
        model, checkpoint = GPT.from_checkpoint(path, kind="caption")
        clip_model, preprocess = coco.load_clip(checkpoint["clip"]["model"], checkpoint["clip"]["pretrained"], device)
        return cls(model.to(device), clip_model, preprocess, device, dtype or default_dtype(device.split(":")[0]))

    @torch.no_grad()
    def caption(self, images, beam_size=3, max_new_tokens=30, temperature=None, top_k=None, top_p=None,
                generator=None):
        """images: paths or PIL images -> one caption each. beam_size > 1 searches for the likeliest caption;
        a temperature (with top_k / top_p) samples one instead; temperature=0 or beam_size=1 is greedy."""
        images = [open_image(str(im)) if isinstance(im, (str, os.PathLike)) else im.convert("RGB") for im in images]
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # (B, 3, 224, 224)
        image_feats = coco.image_features(self.clip_model, pixels)  # (B, N_img, width)
        prompt = torch.full((len(images), 1), EOT_TOKEN, device=self.device)
        with autocast(self.device.split(":")[0], self.dtype):
            if temperature is None and beam_size > 1:
                token_lists = self.model.beam_search(prompt, image_feats, beam_size=beam_size,
                                                     max_new_tokens=max_new_tokens)
            else:
                out = self.model.generate(prompt, max_new_tokens, temperature=temperature or 0.0, top_k=top_k,
                                          top_p=top_p, image_feats=image_feats, generator=generator)
                token_lists = [until_end_of_text(row[1:]) for row in out.tolist()]
        return [self.enc.decode(tokens).strip() for tokens in token_lists]


def until_end_of_text(tokens):
    return tokens[:tokens.index(EOT_TOKEN)] if EOT_TOKEN in tokens else tokens


def open_image(path):
    """Decode an image fully now (PIL is lazy), so a corrupt file fails here, named, and not mid-batch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


# -----------------------------------------------------------------------------
# The command line


def caption_files(args):
    """Caption every readable image, batch by batch; a bad file is reported and skipped. -> exit status."""
    path = args.checkpoint or latest_checkpoint(args.checkpoint_dir)
    if path is None:
        raise FileNotFoundError(f"{args.checkpoint_dir}: no caption checkpoint here; pass --checkpoint PATH "
                                f"(train one with train_caption.py)")
    captioner = Captioner.from_checkpoint(path, args.device)
    images, failed = [], 0
    for file in args.image:
        try:
            images.append((file, open_image(file)))
        except (FileNotFoundError, ValueError) as e:
            print(f"sample.py: {e}", file=sys.stderr)
            failed += 1
    generator = torch.Generator(device=captioner.device).manual_seed(args.seed)
    for start in range(0, len(images), args.batch_size):
        batch = images[start:start + args.batch_size]
        for _ in range(args.num_samples):
            captions = captioner.caption([image for _, image in batch], beam_size=args.beam,
                                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, generator=generator)
            for (file, _), caption in zip(batch, captions):
                print(f"{file}: {caption}")
    return 1 if failed else 0


def generate_text(args):
    device = default_device() if args.device == "auto" else args.device
    if args.pretrained:
        model = GPT.from_pretrained(args.pretrained)
    else:
        model, _ = GPT.from_checkpoint(args.checkpoint)  # an lm checkpoint, or a captioner used without an image
    model.to(device).eval()
    enc = tiktoken.get_encoding("gpt2")
    idx = torch.tensor([enc.encode(args.prompt)] * args.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    temperature = 1.0 if args.temperature is None else args.temperature
    max_new_tokens = min(args.max_new_tokens, model.config.block_size - idx.size(1))
    with autocast(device.split(":")[0], default_dtype(device.split(":")[0])):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                             generator=generator)
    for row in out.tolist():
        print(args.prompt + enc.decode(until_end_of_text(row[idx.size(1):])))
        print("---")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", nargs="+", help="image files to caption")
    what.add_argument("--prompt", help="text to continue")
    p.add_argument("--checkpoint", help="a .pt checkpoint (default for --image: the newest in --checkpoint-dir)")
    p.add_argument("--checkpoint-dir", default="log_caption", help="where to look for the newest caption checkpoint")
    p.add_argument("--pretrained", help="with --prompt: OpenAI weights (gpt2, gpt2-medium, ...) or a GPT-2 folder")
    p.add_argument("--beam", type=int, default=3, help="beam width for captions (1: greedy)")
    p.add_argument("--temperature", type=float, help="sample instead of beam search (0: greedy)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, help="sample among the likeliest tokens holding probability p")
    p.add_argument("--num-samples", type=int, default=1, help="samples per image or prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 30 for captions, 200 for text")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if args.prompt is not None and not (args.checkpoint or args.pretrained):
        p.error("--prompt needs --checkpoint PATH or --pretrained NAME")
    if args.max_new_tokens is None:
        args.max_new_tokens = 30 if args.image else 200
    if args.top_k is not None or args.top_p is not None:
        args.temperature = 1.0 if args.temperature is None else args.temperature
    return args


if __name__ == "__main__":
    args = parse_args()
    try:
        sys.exit(caption_files(args) if args.image else generate_text(args))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"sample.py: {e}")
