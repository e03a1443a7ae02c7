"""
Captions for images, or text from a prompt.

    python sample.py --image dog.jpg cat.png                     # log_caption/best.pt (else the newest), beam search
    python sample.py --image dog.jpg --checkpoint log_caption/model_011558.pt --beam 5
    python sample.py --image dog.jpg --temperature 0.8 --top-p 0.9 --num-samples 3
    python sample.py --image dog.jpg --attention-map dog_attention.png   # where each word looked (matplotlib)
    python sample.py --image dog.jpg --checkpoint USER/captioner        # export_hf.py --captioner's, from the hub
    python sample.py --prompt "Hello, I'm a language model,"     # the newest checkpoint in log/
    python sample.py --prompt "Hello, I'm a language model," --checkpoint log/model_019073.pt --compile
    python sample.py --prompt "Hello, I'm a language model," --pretrained gpt2 --num-samples 4

From Python:

    from sample import Captioner
    captioner = Captioner.from_checkpoint("log_caption/model_011558.pt")
    captioner = Captioner.from_pretrained("out/captioner")  # or "USER/captioner": export_hf.py --captioner's
    captioner.caption(["dog.jpg", "cat.png"])        # -> ['a dog running on the grass', ...]
    captions, attention = captioner.caption(["dog.jpg"], return_attention=True)
    attention[0].words, attention[0].patches         # -> ['a', 'dog', ...], (n_words, 7, 7) arrays

An image is encoded by the image encoder recorded in the checkpoint (the one its training features came from,
with the same preprocessing), then the decoder writes the caption after an <|endoftext|> prompt,
cross-attending to the image's tokens (50 for CLIP ViT-B/32).

Decoding: captions use beam search by default (--beam, 3 beams; 1 is greedy decoding). --temperature,
--top-k or --top-p sample instead. Text is always sampled, by default as train_gpt2.py's samples are: temperature 1
among the 50 likeliest tokens (top-k 50). Temperature 0 means greedy decoding everywhere: the likeliest token at
every step.

--compile compiles the one-token decoding step (torch.compile: CUDA graphs on a GPU, frozen prepacked weights
on the CPU). The compile takes tens of seconds, once per batch size and length, and the run says how long; it
pays for long texts and many captions, not for one short caption (BENCHMARKS.md has the numbers).

Attention maps: for each word of the caption, its cross-attention over the image's patches, averaged over
heads and cross-attention layers, laid over the image. CLIP ViT-B/32 cuts the 224 x 224 centre square it sees
into 7 x 7 patches of 32 pixels (ViT-L/14: 16 x 16 of 14); its first token, CLS, stands for the whole image
and has no place on the grid, so its share of the attention is written in each word's title (with a DINOv2
register model, CLS and the 4 registers together).
"""

import argparse
import math
import os
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

import coco
from caption_eval import choose_checkpoint
from checkpoint import is_hub_id, latest_checkpoint, load_export, load_model
from generate import beam_search, check_sampling, compile_decode_step, generate, gpt2_encoding, until_end_of_text
from model import EOT_TOKEN, GPT, GPT2_VOCAB_SIZE
from training import (HelpFormatter, autocast, default_device, default_dtype, existing_device, output_problem,
                      positive_int, random_seed, use_device)

# --prompt samples as train_gpt2.py's samples during training do (print_samples): temperature 1, top-k 50
TEXT_TOP_K = 50


class Captioner:
    """A caption checkpoint together with the image encoder (coco.ImageEncoder) its features came from."""

    def __init__(self, model, encoder, device, dtype="float32"):
        self.model, self.encoder = model.eval(), encoder
        self.device, self.dtype = str(device), dtype
        self.device_type = torch.device(self.device).type  # autocast wants "cuda", not "cuda:1"
        # JPEGs are decoded at reduced size, but with both sides kept >= twice the encoder's input (448 for 224): a
        # photo under 896 px on a side, as all of COCO's are (640 px at most), is then decoded exactly as
        # coco.py decoded the training images. Reduced towards 224 instead, a 640x480 photo would decode at 1/2
        # scale and its CLIP input move by 0.02-0.08 on average (normalised pixel units; measured on two photos).
        self.image_size, self.prefix_tokens = encoder.record["image_size"], encoder.record["prefix_tokens"]
        self.decode_size = 2 * self.image_size if self.image_size else None
        self.enc = gpt2_encoding()

    @classmethod
    def from_checkpoint(cls, path, device="auto", dtype=None):
        """device: 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'; the decoder and the image encoder both go there. dtype: the
        decoder's autocast dtype, by default the best the device has (bfloat16 on a recent GPU)."""
        model, checkpoint = load_model(path, kind="caption")
        return cls.with_its_encoder(model, checkpoint, path, device, dtype)

    @classmethod
    def from_pretrained(cls, folder_or_hub_id, device="auto", dtype=None):
        """A captioner export_hf.py --captioner wrote: its folder, or the hub repository it was pushed to
        (USER/NAME). device and dtype: as for from_checkpoint."""
        model, checkpoint = load_export(folder_or_hub_id, kind="caption")
        return cls.with_its_encoder(model, checkpoint, folder_or_hub_id, device, dtype)

    @classmethod
    def load(cls, path, device="auto", dtype=None):
        """Either of the above, by what path is: a .pt checkpoint, or an export's folder or hub id (is_export)."""
        load = cls.from_pretrained if is_export(path) else cls.from_checkpoint
        return load(path, device, dtype)

    @classmethod
    def with_its_encoder(cls, model, checkpoint, path, device, dtype):
        """The decoder, with the image encoder its checkpoint (or export) records, built again."""
        device = default_device() if device == "auto" else str(device)
        trained_on = coco.trained_encoder(checkpoint, path)
        encoder = coco.load_encoder(trained_on["name"], trained_on["weights"], device, trained_on["image_size"])
        if not coco.same_encoder(trained_on, encoder.record):  # a timm or open_clip that preprocesses otherwise
            raise ValueError(f"{path}: its images were preprocessed as {trained_on['preprocess']}, but this "
                             f"installation's {trained_on['name']} does {encoder.record['preprocess']}")
        # the full device ("cuda:1"): the question "does it do bfloat16?" is about that GPU, not about GPU 0
        return cls(model.to(device), encoder, device, dtype or default_dtype(device))

    def pixels(self, image):
        """A path or a PIL image -> (3, H, W), the encoder's input. A file is decoded here, and a JPEG at reduced
        size (see open_image), so a big photo never sits in memory at full size."""
        if isinstance(image, (str, os.PathLike)):
            image = open_image(image, self.decode_size)
        return self.encoder.preprocess(coco.rgb_image(image))  # a 16-bit or float one scaled, not clipped

    def encode(self, pixels):
        """(B, 3, H, W) -> (B, N_img, width): the encoder's image tokens, what the decoder cross-attends to."""
        return self.encoder(pixels.to(self.device))

    @torch.no_grad()
    def caption(self, images, beam_size=None, max_new_tokens=30, temperature=None, top_k=None, top_p=None,
                generator=None, return_attention=False, length_penalty=1.0):
        """images: paths or PIL images -> one caption each. By default beam search (beam_size 3; 1 is greedy)
        finds the likeliest caption, ranked by log-probability / length**length_penalty (pick it on val with
        caption_eval.py --length-penalty); a temperature (0: greedy), top_k or top_p samples one instead.
        Options out of range, or asking for both, raise ValueError. return_attention=True: -> (captions, one
        CaptionAttention each), where each word of each caption looked."""
        choose_decoding(beam_size, max_new_tokens, temperature, top_k, top_p)  # checked before the slow part
        images = list(images)
        if not images:
            return ([], []) if return_attention else []
        image_feats = self.encode(torch.stack([self.pixels(image) for image in images]))
        return self.caption_features(image_feats, beam_size, max_new_tokens, temperature, top_k, top_p, generator,
                                     return_attention, length_penalty)

    @torch.no_grad()
    def caption_features(self, image_feats, beam_size=None, max_new_tokens=30, temperature=None, top_k=None,
                         top_p=None, generator=None, return_attention=False, length_penalty=1.0):
        """image_feats (B, N_img, width) from encode() -> B captions; the options are caption()'s."""
        if return_attention:
            patch_grid_side(image_feats.size(1), self.prefix_tokens)  # one that cannot be drawn fails now
        beam_size, temperature = choose_decoding(beam_size, max_new_tokens, temperature, top_k, top_p)
        prompt = torch.full((len(image_feats), 1), EOT_TOKEN, device=self.device)
        with autocast(self.device_type, self.dtype):
            if beam_size > 1:
                token_lists = beam_search(self.model, prompt, image_feats, beam_size=beam_size,
                                          max_new_tokens=max_new_tokens, length_penalty=length_penalty)
            else:
                out = generate(self.model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, image_feats=image_feats, generator=generator)
                token_lists = [until_end_of_text(row[1:]) for row in out.tolist()]
        captions = [self.enc.decode(tokens).strip() for tokens in token_lists]
        return (captions, self.attention(image_feats, token_lists)) if return_attention else captions

    @torch.no_grad()
    def attention(self, image_feats, token_lists):
        """Where each token of each caption looked: image_feats (B, N_img, width) and B captions as token lists
        -> B CaptionAttention. Each caption goes through the decoder once more, in a separate full pass after
        its <|endoftext|> prompt: the position that holds token t-1 is the query that chose token t, and causal
        attention shows it the same tokens it saw while decoding. So these are the weights decoding used, up to
        floating-point rounding (the full pass multiplies other shapes than the cached one-token steps, so its
        sums round differently; tests/test_sample.py finds them within 1e-5), however it decoded: greedy,
        sampled, or beam search (whose beams are reordered at every step, so that recording them along the way
        would mean following each beam's ancestry back)."""
        rows = [[EOT_TOKEN] + tokens[:-1] for tokens in token_lists]  # an empty caption still has its prompt
        width = max(len(row) for row in rows)
        # padded on the right: causal attention keeps the padding out of every position read below
        idx = torch.tensor([row + [EOT_TOKEN] * (width - len(row)) for row in rows], device=self.device)
        with autocast(self.device_type, self.dtype), recording_cross_attention(self.model) as layers:
            self.model(idx, image_feats=image_feats)
        weights = torch.stack(layers).mean(dim=(0, 2)).cpu()  # (layers, B, nh, T, N) -> (B, T, N)
        prefix = self.prefix_tokens
        side = patch_grid_side(weights.size(-1), prefix)
        return [CaptionAttention(words=[self.enc.decode([token]).strip() for token in tokens],
                                 # the tokens: CLS (and registers), then the patches row by row from the top left
                                 patches=weights[b, :len(tokens), prefix:].reshape(len(tokens), side, side).numpy(),
                                 cls=weights[b, :len(tokens), :prefix].sum(-1).numpy(),
                                 heads=self.model.config.n_head, layers=len(layers))
                for b, tokens in enumerate(token_lists)]


@dataclass
class CaptionAttention:
    """Where the words of one caption looked. words[t] is the text of the caption's token t (one token per word
    mostly; a rare word is two or more). patches[t] (rows, cols) is token t's share of attention on each patch
    of the image, row 0 at the top, column 0 on the left, as the image is shown; cls[t] its share on the CLS
    token (and the registers, if the encoder has them). They add up to 1: patches[t].sum() + cls[t] == 1. Averaged over `heads` heads and `layers`
    cross-attention layers."""
    words: list
    patches: np.ndarray  # (n_words, rows, cols)
    cls: np.ndarray  # (n_words,)
    heads: int
    layers: int


def patch_grid_side(n_image_tokens, prefix_tokens=1):
    """A ViT's tokens are CLS (and registers) + a square grid of patches: 50 -> 7 (ViT-B/32), 257 -> 16
    (ViT-L/14); 261 with 5 prefix tokens -> 16 (DINOv2 ViT/14 with registers, at 224 px)."""
    side = math.isqrt(max(n_image_tokens - prefix_tokens, 0))
    if side < 1 or side * side != n_image_tokens - prefix_tokens:
        raise ValueError(f"{n_image_tokens} image tokens are not {prefix_tokens} (CLS, registers) + a square grid: no map "
                         f"to draw (CLIP ViT-B/32 has 1 + 7 x 7)")
    return side


def choose_decoding(beam_size, max_new_tokens, temperature, top_k, top_p):
    """Caption options -> (beam_size, temperature): beam search when beam_size > 1, else generate() at that
    temperature (0: greedy). Raises ValueError for a value out of range, or for beam search and sampling
    asked for together (one of them would be ignored)."""
    sampling = temperature is not None or top_k is not None or top_p is not None
    if sampling and beam_size is not None:
        raise ValueError(f"beam_size={beam_size} and temperature/top_k/top_p: beam search or sampling, not both")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens}: must be at least 1")
    if sampling:
        temperature = 1.0 if temperature is None else temperature  # top_k or top_p alone: at temperature 1
        check_sampling(temperature, top_k, top_p)
        return 1, temperature
    beam_size = 3 if beam_size is None else beam_size
    if beam_size < 1:
        raise ValueError(f"beam_size {beam_size}: must be at least 1 (1 is greedy decoding)")
    return beam_size, 0.0


def open_image(path, size=None):
    """Decode an image fully now (PIL is lazy), so a corrupt file fails here, named, and not mid-batch.
    size: the smallest side wanted. A JPEG is then decoded at 1/2, 1/4 or 1/8 scale, as long as both sides
    stay >= size: libjpeg does it while decoding, so an 8000x8000 photo costs 3 MB (1000x1000) instead of
    192 MB. Other formats are decoded at full size. An image over PIL's decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS x 2, about 179M pixels) is refused, as coco.py refuses it."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return decode_image(path, size)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def decode_image(file, size=None):
    """A path or a file object -> the decoded RGB image, a JPEG at reduced size (open_image): demo.py's uploads
    are decoded as files are."""
    with Image.open(file) as image:
        if size is not None:
            image.draft("RGB", (size, size))  # a no-op for formats other than JPEG
        return coco.rgb_image(image)  # decodes it (16-bit and float pixels scaled to 8 bits, not clipped)


# -----------------------------------------------------------------------------
# Recording where the cross-attention looks


def attention_weights(q, k):
    """The weights scaled_dot_product_attention gives the values, made explicit: softmax(q k^T / sqrt(hs)),
    in float32. q (B, nh, T, hs), k (B, nh, N, hs) -> (B, nh, T, N), each row summing to 1 over the N keys.
    (Without dropout: with it, SDPA also zeroes some weights at random while training.)"""
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, N)
    return F.softmax(scores, dim=-1)


@contextmanager
def recording_cross_attention(model):
    """with recording_cross_attention(model) as weights: every forward pass inside appends each cross-attention
    layer's attention weights to the list `weights`, in block order: one (B, nh, T, N_img) float32 tensor per
    layer and pass. SDPA's fused kernels never form the weights, so a forward hook on each model.CrossAttention
    recomputes them from its very inputs: q from c_q of the same x, k from the same image keys. Outside the
    block no hook is attached: training and generation never compute them."""
    weights = []

    def record(layer, inputs, output):
        x, (k, _) = inputs  # CrossAttention.forward(x, image_kv)
        B, T, C = x.size()
        q = layer.c_q(x).view(B, T, layer.n_head, C // layer.n_head).transpose(1, 2)  # (B, nh, T, hs)
        weights.append(attention_weights(q, k))
    hooks = [block.xattn.register_forward_hook(record) for block in model.transformer.h if hasattr(block, "xattn")]
    try:
        yield weights
    finally:
        for hook in hooks:
            hook.remove()


# -----------------------------------------------------------------------------
# Pictures of the attention (matplotlib, imported only here)


def encoder_view(image, size):
    """The part of the image the encoder sees, at the size it sees it: its preprocessing scales the short side to
    `size` and crops the centre square, and the patch grid covers that square, not the whole photo. That holds
    for open_clip's models and for timm's DINOv2 and DINOv3 (crop_pct 1). A timm model with crop_pct below 1
    (0.9 for many ImageNet ViTs) scales the short side to size / crop_pct and crops less than the full centre
    square: it sees only the middle crop_pct of it, so this view shows a margin the patch grid does not cover."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return coco.rgb_image(image).crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def upsample(grid, size):
    """(rows, cols) attention -> (size, size), bilinear, so it can lie over the image: row 0 stays at the top."""
    grid = torch.as_tensor(grid, dtype=torch.float32)[None, None]  # (1, 1, rows, cols)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def as_title(text):
    return text.replace("$", r"\$")  # matplotlib would read $...$ as mathematics


def attention_figure(image, caption, attention, size=224):
    """-> a matplotlib Figure: the image as the encoder saw it, titled with the caption, then one panel per word with its
    attention laid over the image, titled with the word and the CLS token's share. One colour scale for all."""
    from matplotlib.figure import Figure
    view = encoder_view(image, size)
    n = len(attention.words)
    columns = min(6, n + 1)
    rows = math.ceil((n + 1) / columns)
    figure = Figure(figsize=(2.3 * columns, 2.5 * rows + 0.5), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes:
        ax.axis("off")
    axes[0].imshow(view)
    axes[0].set_title(as_title(textwrap.fill(caption, 28)), fontsize=8)
    top = float(attention.patches.max()) if n else 1.0
    grey = view.convert("L")  # under the heat map in grey, so that its colours are the attention's alone
    for ax, word, grid, cls in zip(axes[1:], attention.words, attention.patches, attention.cls):
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
        ax.imshow(upsample(grid, size), cmap="inferno", alpha=0.6, vmin=0.0, vmax=top)
        ax.set_title(f"{as_title(word)}\nCLS {cls:.0%}", fontsize=9)
    grid_rows, grid_cols = attention.patches.shape[1:]
    layers = f"{attention.layers} cross-attention layer{'s' if attention.layers != 1 else ''}"
    note = (f"Attention of each word over the {grid_rows}x{grid_cols} patches, averaged over {attention.heads} heads "
            f"and {layers} (bright: most). CLS: the share on the whole-image token")
    # 9-point text runs ~15 characters to the inch (measured on this note): ~30 fit a 2.3-inch panel
    figure.suptitle(textwrap.fill(note, 30 * columns), fontsize=9)
    return figure


def attention_map_paths(path, images):
    """--attention-map PATH -> {image: figure file}. One image: PATH. Several: PATH with each image's name added
    (maps.png -> maps_dog.png, maps_cat.png), and its place in the list too where two images share a name."""
    if len(set(images)) == 1:
        return {images[0]: path}
    root, extension = os.path.splitext(path)
    names = [os.path.splitext(os.path.basename(image))[0] for image in images]
    return {image: f"{root}_{name}{extension}" if names.count(name) == 1 else f"{root}_{i}_{name}{extension}"
            for i, (image, name) in enumerate(zip(images, names), start=1)}


def save_attention_map(captioner, file, caption, attention, path):
    figure = attention_figure(open_image(file, captioner.decode_size), caption, attention, captioner.image_size)
    try:  # into path.tmp, then renamed: a full disk or a kill never leaves half a picture over the last one
        figure.savefig(path + ".tmp", format=os.path.splitext(path)[1][1:].lower(), dpi=100)
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise ValueError(f"--attention-map {path}: not written ({e.strerror or e})") from None
    print(f"sample.py: {file}: attention map in {path}", file=sys.stderr)


# -----------------------------------------------------------------------------
# The command line


def caption_files(args):
    """Caption every readable image, batch by batch; a bad file is reported and skipped. -> exit status."""
    # caption_eval.py's choice: the run's best.pt (best val CIDEr-D) when there is one, else its newest checkpoint
    path, why = choose_checkpoint(args.checkpoint, args.checkpoint_dir)
    if not args.checkpoint:
        print(f"sample.py: using {path} ({why})", file=sys.stderr)
    captioner = Captioner.load(path, args.device)
    if args.compile:
        compile_decode_step(captioner.model)
    generator = torch.Generator(device=captioner.device).manual_seed(args.seed)
    drawing = args.attention_map is not None
    map_paths = attention_map_paths(args.attention_map, args.image) if drawing else {}
    failed = 0
    # images are decoded one batch at a time, just before they are captioned: memory holds one batch of
    # encoder inputs however many files there are
    for start in range(0, len(args.image), args.batch_size):
        batch = args.image[start:start + args.batch_size]
        files, pixels = read_images(captioner, batch)
        failed += len(batch) - len(files)
        if not files:
            continue
        image_feats = captioner.encode(torch.stack(pixels))  # once, for all the samples
        for _ in range(args.num_samples):
            result = captioner.caption_features(image_feats, args.beam, args.max_new_tokens, args.temperature,
                                                args.top_k, args.top_p, generator, return_attention=drawing,
                                                length_penalty=1.0 if args.length_penalty is None else args.length_penalty)
            captions, attentions = result if drawing else (result, None)
            for i, (file, caption) in enumerate(zip(files, captions)):
                print(f"{file}: {caption}")
                if drawing:
                    save_attention_map(captioner, file, caption, attentions[i], map_paths[file])
    say_what_compiled(captioner.model)
    return 1 if failed else 0


def read_images(captioner, files):
    """-> (the files that could be read, their encoder inputs). Each one that cannot is named on stderr."""
    good, pixels = [], []
    for file in files:
        try:
            pixels.append(captioner.pixels(file))
            good.append(file)
        except (FileNotFoundError, ValueError) as e:
            print(f"sample.py: {e}", file=sys.stderr)
    return good, pixels


def generate_text(args):
    device = default_device() if args.device == "auto" else args.device
    if args.pretrained:
        model = GPT.from_pretrained(args.pretrained)
    else:  # an lm checkpoint, or a captioner (a .pt or an export) without an image
        path = text_checkpoint(args)
        model, _ = load_export(path) if is_export(path) else load_model(path)
    model.to(device).eval()
    if args.compile:
        compile_decode_step(model)
    enc = gpt2_encoding()
    # "<|endoftext|>" in the prompt is the token that starts a document; an empty prompt is just that token
    prompt = enc.encode(args.prompt, allowed_special={"<|endoftext|>"}) or [EOT_TOKEN]
    max_new_tokens = new_tokens_that_fit(len(prompt), args.max_new_tokens, model.config.block_size)
    idx = torch.tensor([prompt] * args.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with autocast_for(device):
        out = generate(model, idx, max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       generator=generator)
    for row in out.tolist():
        print(args.prompt + enc.decode(until_end_of_text(row[len(prompt):])))
        print("---")
    say_what_compiled(model)
    return 0


def is_export(checkpoint):
    """--checkpoint names a folder export_hf.py --captioner wrote, or a hub repository (USER/NAME, and no path
    here), rather than a .pt file."""
    return os.path.isdir(checkpoint) or (not os.path.exists(checkpoint) and not checkpoint.endswith(".pt")
                                         and is_hub_id(checkpoint))


def text_checkpoint(args):
    """--checkpoint, else the newest checkpoint train_gpt2.py wrote in --checkpoint-dir (log/), named on stderr."""
    if args.checkpoint:
        return args.checkpoint
    path = latest_checkpoint(args.checkpoint_dir)
    if path is None:
        raise FileNotFoundError(f"{args.checkpoint_dir}: no model_*.pt checkpoint here; pass --checkpoint PATH or "
                                f"--pretrained NAME (or train one with train_gpt2.py)")
    print(f"sample.py: using {path} (the newest in {args.checkpoint_dir})", file=sys.stderr)
    return path


def say_what_compiled(model):
    """--compile: one line on stderr per (batch size, cache length) the decoding step was compiled for."""
    step = getattr(model, "compiled_step", None)  # set by compile_decode_step
    if step is None:
        return
    for (batch_size, max_len), seconds in step.compiled.items():
        print(f"sample.py: --compile: compiled the decoding step for a batch of {batch_size} and {max_len} "
              f"positions in {seconds:.1f} s (once for this shape)", file=sys.stderr)


def autocast_for(device):
    """Autocast for the device ("cuda:1"): its type ("cuda") is what torch.autocast takes, while the dtype
    is chosen for that very GPU, not for GPU 0: bfloat16 where it runs natively, float16 on older GPUs, float32
    (no autocast) off the GPU."""
    return autocast(torch.device(device).type, default_dtype(device))


def new_tokens_that_fit(prompt_tokens, max_new_tokens, block_size):
    """The model sees at most block_size tokens. A prompt that fills them is refused; one that leaves fewer
    than max_new_tokens is continued as far as they go, and a note on stderr says so."""
    room = block_size - prompt_tokens
    if room < 1:
        raise ValueError(f"--prompt is {prompt_tokens} tokens and the model's block_size is {block_size}: no room "
                         f"for a new token")
    if max_new_tokens > room:
        print(f"sample.py: note: {room} new tokens, not {max_new_tokens}: the prompt's {prompt_tokens} tokens leave "
              f"no more room in the model's block_size of {block_size}", file=sys.stderr)
    return min(max_new_tokens, room)


def temperature_value(text):
    """argparse type of --temperature: a number >= 0. A negative one would turn the distribution upside down,
    the unlikeliest token becoming the likeliest."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0 is greedy decoding), not {text!r}")
    return value


def finite_float(text):
    """argparse type of --length-penalty: any finite number (below 0 favours short captions, 0 is the raw sum)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def probability(text):
    """argparse type of --top-p: a number in (0, 1]. At 0 no token would be left to sample."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text!r}")
    return value


def check_attention_map(p, args):
    """--attention-map needs an image, one caption per image and matplotlib: refused now, not after decoding."""
    if args.attention_map is None:
        return
    if args.prompt is not None:
        p.error("--attention-map is for captions (--image): text has no image to look at")
    if args.num_samples > 1:
        p.error(f"--attention-map draws one caption per image; --num-samples {args.num_samples} would draw over it")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        p.error("--attention-map needs matplotlib: pip install matplotlib")
    extension = os.path.splitext(args.attention_map)[1].lstrip(".").lower()
    if extension not in Figure().canvas.get_supported_filetypes():
        p.error(f"--attention-map {args.attention_map}: matplotlib writes .png, .pdf, .svg, ..., not "
                f"{'.' + extension if extension else 'a file without an extension'}")
    inputs = {os.path.realpath(image) for image in args.image}
    for path in attention_map_paths(args.attention_map, args.image).values():  # checked before any decoding
        if os.path.realpath(path) in inputs:
            p.error(f"--attention-map {path}: is one of the --image files, which it would overwrite")
        problem = output_problem(path)
        if problem:
            p.error(f"--attention-map {path}: {problem}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", nargs="+", help="image files to caption")
    what.add_argument("--prompt", help="text to continue ('' for text from nothing, as after <|endoftext|>)")
    p.add_argument("--checkpoint", help="a .pt checkpoint, or a captioner export_hf.py --captioner wrote: its folder "
                                        "or hub id, USER/NAME (default: from --checkpoint-dir, with --image its "
                                        "best.pt if there is one, else the newest)")
    p.add_argument("--checkpoint-dir", help="where to look when --checkpoint is not given (default: log_caption for "
                                            "--image, log for --prompt)")
    p.add_argument("--pretrained", help="with --prompt: OpenAI weights (gpt2, gpt2-medium, ...) or a GPT-2 folder")
    p.add_argument("--beam", type=positive_int, help="beam width for captions (default 3; 1: greedy)")
    p.add_argument("--length-penalty", type=finite_float, help="beam search ranks captions by log-probability / "
                   "length**this (default 1, the mean per token; choose it on val: caption_eval.py --length-penalty)")
    p.add_argument("--temperature", type=temperature_value,
                   help="sample instead of beam search (0: greedy; default 1 for --prompt, as train_gpt2.py's samples)")
    p.add_argument("--top-k", type=positive_int,
                   help=f"sample among the k likeliest tokens (default {TEXT_TOP_K} for --prompt, as train_gpt2.py's "
                        f"samples; {GPT2_VOCAB_SIZE}: all of them)")
    p.add_argument("--top-p", type=probability, help="sample among the likeliest tokens holding probability p")
    p.add_argument("--num-samples", type=positive_int, default=1, help="samples per image or prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: 30 for captions, 200 for text")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per batch")
    p.add_argument("--device", default="auto", type=existing_device, help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=random_seed, default=42, help="for sampling (--temperature above 0)")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decoding step (tens of seconds per batch size and length; pays for "
                        "long texts and many captions)")
    p.add_argument("--attention-map", metavar="PATH",
                   help="with --image: draw where each word of the caption looked, into PATH (.png, .pdf, .svg); "
                        "several images: PATH_<image name>.png each. Needs matplotlib")
    args = p.parse_args(argv)
    check_attention_map(p, args)
    if args.checkpoint_dir is None:
        args.checkpoint_dir = "log_caption" if args.image else "log"
    if args.image and args.pretrained:
        p.error("--pretrained is for --prompt: captions need a caption checkpoint (--checkpoint)")
    sampling = args.temperature is not None or args.top_k is not None or args.top_p is not None
    if args.prompt is not None:
        try:  # bytes the terminal sent that are not UTF-8 reach Python as lone surrogates, which tiktoken refuses
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:
            p.error("--prompt: not UTF-8 text (set the terminal to UTF-8, or type the prompt again)")
    if args.beam is not None and args.prompt is not None:
        p.error("--beam is for captions (--image); text is sampled")
    if args.beam is not None and sampling:
        p.error("--beam searches, --temperature/--top-k/--top-p sample: choose one")
    if args.length_penalty is not None and (args.prompt is not None or sampling):
        p.error("--length-penalty ranks beam search's captions: not for --prompt or --temperature/--top-k/--top-p")
    if args.prompt is not None or sampling:
        args.temperature = 1.0 if args.temperature is None else args.temperature
    if args.prompt is not None and args.top_k is None:
        args.top_k = TEXT_TOP_K
    if args.num_samples > 1 and not args.temperature:  # None: beam search; 0: greedy. Both are deterministic
        p.error(f"--num-samples {args.num_samples} would print the same output {args.num_samples} times: beam search "
                f"and --temperature 0 are deterministic; sample with --temperature above 0")
    if args.max_new_tokens is None:  # captions: 30, as everywhere they are decoded (why: caption_eval.py's flag)
        args.max_new_tokens = 30 if args.image else 200
    return args


def main(argv=None):
    args = parse_args(argv)
    use_device(args.device)  # cuda:1 becomes the current GPU: what names no device goes there too, not to GPU 0
    return caption_files(args) if args.image else generate_text(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as e:  # the user's to fix: one line, naming the file
        sys.exit(f"sample.py: {e}")
    except KeyboardInterrupt:
        print("sample.py: stopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
