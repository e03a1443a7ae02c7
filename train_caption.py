"""
Teach a pretrained GPT-2 to caption images: cross-attention layers in every second block (why: see
--cross-attn-every) read frozen features of the image (CLIP's by default, written once by coco.py), and the
decoder learns to write the COCO captions.

    python coco.py --download                                   # once: COCO 2017 -> CLIP features
    python train_caption.py --init gpt2                         # OpenAI's GPT-2 124M
    python train_caption.py --init log/model_019073.pt          # or our own pretrained checkpoint
    torchrun --standalone --nproc_per_node=8 train_caption.py --init gpt2
    python sample.py --image dog.jpg                            # caption with best.pt (else the newest)

By default only what captioning adds is trained: the cross-attention layers, their LayerNorms and the image
projection: the language model keeps what it knows, and GPT-2's weights need no gradients and no optimizer
state (the backward pass still runs through the blocks above the first cross-attention). --train cross+mlp also trains
GPT-2's MLPs and LayerNorms, --train all the whole decoder; --unfreeze-after N trains all from step N on.

A training sequence is  <|endoftext|> caption <|endoftext|> : the first token is the prompt sample.py also
starts from, the loss covers the caption tokens and the final <|endoftext|> (so the model learns to stop).

The captioning algorithm, in the order it runs (the rest of this file is plumbing):
  coco.clip_tokens          what the image tokens are (CLIP's, the default): every token of its ViT, CLS and
                            patches, after the final LayerNorm: (B, N_img, width)
  coco.extract_split        each image encoded once by coco.py and stored: the encoder stays frozen
  model.GPT.image_keys_values   the projection, once per image and shared by all layers: img_proj (width ->
                            n_embd), then ln_img; each cross-attention layer makes its keys and values from it
  model.CrossAttention      in every second model.Block (--cross-attn-every; GPT.__init__ per has_cross_attn): the
                            text's queries read the image; c_proj starts at zero: at step 0 the LM is unchanged
  caption_batch             a step's captions (CaptionLoader.next_step draws one per image) -> x, y; y is -1
                            where there is no loss, which GPT.forward's cross_entropy(ignore_index=-1) skips
  set_trainable, TRAINABLE  what trains (--train); GPT.configure_optimizers: at which rate (--lr; GPT-2's own
                            weights, when they train, at --lm-lr through their param groups' lr_scale)
  main, "one optimizer step"  forward, loss, backward, clip, learning rate, update; the loss is the mean over
                            the step's caption tokens, the same however they are split over ranks and
                            micro-batches
  evaluate                  val loss; val CIDEr-D of greedy captions, best.pt rewritten when it improves
                            (keep_best); caption_examples decodes: the <|endoftext|> prompt, then
                            generate.beam_search (sample.py's Captioner does the same for new pictures)
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import caption_eval
import coco
from checkpoint import load_model, save_checkpoint
from generate import beam_search, gpt2_encoding
from model import EOT_TOKEN, GPT, is_cross_attn_param
from training import (HelpFormatter, StepTimer, StopSignal, Tracker, all_reduce_sum, append_log, autocast,
                      check_finite, check_resume_step, check_same_run, cleanup_distributed, config_defaults, cosine_lr,
                      default_dtype, existing_device, fp16_note, grad_scaler, load_on_every_rank, non_negative_float,
                      non_negative_int, positive_float, positive_int, random_seed, restore_training_state, resume_path,
                      save_on_rank0, setup_distributed, start_log, take_out_dir, warn_if_bf16_is_emulated,
                      write_run_record)

# -----------------------------------------------------------------------------
# Data: (image features, caption) batches


def caption_batch(token_lists, max_tokens):
    """Captions (lists of token ids) -> inputs x and targets y, both (B, L).
    x = <|endoftext|> caption, y = caption <|endoftext|>; padding is -1 in y: model.GPT.forward's
    cross_entropy(ignore_index=-1) skips those positions, so they add nothing to the loss or to its mean.
    L is the longest caption + 1 (the leading <|endoftext|>) rounded up to a multiple of 16, at most
    max_tokens + 1 (41 by default). Padding every batch to 41 would mostly compute padding when captions are
    short, while a length per batch would make torch.compile (dynamic=False, wrap_model) build a new graph for
    each; this way it sees at most three (16, 32, 41)."""
    sequences = [[EOT_TOKEN] + tokens[:max_tokens] + [EOT_TOKEN] for tokens in token_lists]
    L = min(-(-(max(len(s) for s in sequences) - 1) // 16) * 16, max_tokens + 1)
    # x's padding: any valid id would do, <|endoftext|> is at hand. Causal attention keeps every padding
    # position out of the real positions before it, and y is -1 there, so padding gets no loss either
    x = torch.full((len(sequences), L), EOT_TOKEN, dtype=torch.long)
    y = torch.full((len(sequences), L), -1, dtype=torch.long)
    for i, s in enumerate(sequences):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, :len(s) - 1] = torch.tensor(s[1:])
    return x, y


class CaptionLoader:
    """Training data, one optimizer step at a time: next_step() -> this rank's (image_feats, x, y) and the number
    of caption tokens in the whole step.

    Each image-epoch (self.epoch) visits the images in a new random order, and each step takes the next
    `images_per_step` of them, whatever the number of processes or the micro-batch size. For each image one of
    its (about 5) captions is drawn at random (with replacement: a fixed function of the seed, epoch and position,
    so resuming replays it), so over the image-epochs the decoder meets nearly all (at the defaults each image is
    drawn ~25 times: a given caption is missed with probability 0.8**25, 0.4%). One caption
    per image, rather than every (image, caption) pair: a step then holds distinct images, never one picture
    five times over with its near-duplicate captions, and the batch is counted in images. (--epochs
    and the step line count caption-epochs instead: as many draws as there are pairs, ~5 image-epochs each.)
    Both draws come from (seed, image-epoch, position): every rank agrees without talking, and resuming replays
    them exactly. Only then is the
    step split: rank r of W takes the r-th of W equal slices and cuts it into micro-batches. So 8 GPUs and 1 GPU
    with 8x the accumulation train on the same images and captions at every step, and a checkpoint resumes on
    another number of GPUs. An image-epoch's last < images_per_step images are left out of that image-epoch (the
    next one draws a new order over all images, so different ones are left out each time)."""

    def __init__(self, data, images_per_step, max_tokens, seed=1337, pin_memory=False):
        self.data, self.images_per_step, self.max_tokens, self.seed = data, images_per_step, max_tokens, seed
        self.pin_memory = pin_memory
        if len(data.image_ids) < images_per_step:
            raise ValueError(f"{len(data.image_ids)} training images are fewer than one step's "
                             f"--total-batch-size {images_per_step}")
        self.load_state_dict({"epoch": 0, "pos": 0})

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "data_order": self.data_order()}

    def data_order(self):
        """What the order of images and captions depends on: resuming refuses a mismatch. The split's fingerprint
        (its image ids and file names) tells another dataset with as many images from this one."""
        images = json.dumps([self.data.image_ids.tolist(), [os.path.basename(f) for f in self.data.files]])
        return {"images": len(self.data.image_ids), "images_per_step": self.images_per_step, "seed": self.seed,
                "split": hashlib.sha1(images.encode()).hexdigest()[:16]}

    def load_state_dict(self, state):
        if "data_order" in state:
            saved, now = state["data_order"], self.data_order()
            if any(saved[key] != now[key] for key in saved):  # (checkpoints before the "split" have none)
                raise ValueError(f"the checkpoint's data order {saved} does not match this run's {now} (run "
                                 f"with the checkpoint's features and settings)")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data.image_ids))

    def next_step(self, rank=0, world_size=1):
        """-> image_feats (n, N_img, width) fp16, x and y (n, L), with n = images_per_step / world_size, and the
        step's caption tokens on all ranks (what its loss is the mean over)."""
        if self.pos + self.images_per_step > len(self.order):
            self.load_state_dict({"epoch": self.epoch + 1, "pos": 0})
        # sorted: the features file is read in ascending order (forward through the memory map, not jumping back
        # and forth); within a step the order of rows does not matter to the loss
        images = np.sort(self.order[self.pos: self.pos + self.images_per_step])
        rng = np.random.default_rng([self.seed, self.epoch, self.pos])
        captions = [self.data.tokens[i][rng.integers(len(self.data.tokens[i]))] for i in images]
        self.pos += self.images_per_step
        x, y = caption_batch(captions, self.max_tokens)  # the whole step: the same length L on every rank
        share = slice(rank * len(images) // world_size, (rank + 1) * len(images) // world_size)
        batch = self.data.image_feats(images[share]), x[share], y[share]  # each contiguous: rows of one tensor
        if self.pin_memory:  # CUDA: page-locked memory, so the copies to the GPU can run while the CPU goes on
            batch = tuple(t.pin_memory() for t in batch)
        return *batch, int((y != -1).sum())


def val_batches(data, B, max_images, max_tokens):
    """Every caption of the first max_images val images, as fixed (image indices, x, y) batches."""
    pairs = [(i, tokens) for i in range(min(max_images, len(data.image_ids))) for tokens in data.tokens[i]]
    batches = []
    for start in range(0, len(pairs), B):
        chunk = pairs[start:start + B]
        x, y = caption_batch([tokens for _, tokens in chunk], max_tokens)
        batches.append((np.array([i for i, _ in chunk]), x, y))
    return batches


# -----------------------------------------------------------------------------
# What trains (at which rate: GPT.configure_optimizers, with --lr and --lm-lr)


# What --train trains: two published recipes and one between them: only the layers captioning adds (as
# SmallCap does), those plus GPT-2's MLPs and LayerNorms (the feed-forward layers, which act as the transformer's
# key-value memories: Geva et al. 2021; two thirds of each block's weights), or everything (as ClipCap's MLP
# variant fine-tunes all of GPT-2).
TRAINABLE = {
    "cross": is_cross_attn_param,
    "cross+mlp": lambda name: is_cross_attn_param(name) or ".mlp." in name or ".ln_" in name,
    "all": lambda name: True,
}


def set_trainable(model, train):
    """Train what `train` names (a key of TRAINABLE) and freeze the rest. Frozen parameters get no gradient
    and are not handed to the optimizer: no memory for their Adam moments."""
    for name, p in model.named_parameters():
        p.requires_grad = TRAINABLE[train](name)


def unfreeze_language_model(model, optimizer, weight_decay, lm_lr_scale):
    """--unfreeze-after: the frozen GPT-2 weights join the optimizer as two new parameter groups (decayed
    matrices, undecayed vectors) at their own, lower rate, after the cross-attention groups: resuming rebuilds
    the same order. They start at the schedule's rate of that step x lm_lr_scale, with fresh Adam moments and no
    warmup of their own: a choice (--lm-lr is small), not compared with a second warmup."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad = True
    matrices, vectors = [p for p in frozen if p.dim() >= 2], [p for p in frozen if p.dim() < 2]
    for params, decay in ((matrices, weight_decay), (vectors, 0.0)):
        optimizer.add_param_group({"params": params, "weight_decay": decay, "lr_scale": lm_lr_scale})


def build_model(args, resume_from, meta, image_width, d):
    """-> (captioner, checkpoint being resumed or None). A language model gains fresh cross-attention layers,
    sized for the image features; they start at zero, so the LM's logits are unchanged at step 0. A resumed
    run must go on with its own settings and its encoder's features (the split itself: CaptionLoader)."""
    if resume_from is not None:
        model, checkpoint = load_on_every_rank(lambda: load_model(resume_from, kind="caption"), resume_from, d)
        check_same_run(checkpoint, args, resume_from, MAY_CHANGE_ON_RESUME)
        caption_eval.check_same_encoder(checkpoint, resume_from, meta, args.features_dir)
        return model, checkpoint
    new_layers = dict(cross_attn_every=args.cross_attn_every, n_embd_img=image_width)
    if args.init.endswith(".pt"):
        return load_model(args.init, kind="lm", **new_layers)[0], None
    return GPT.from_pretrained(args.init, **new_layers), None


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def validation_loss(model, data, batches, d, dtype):
    """Loss per caption token over the fixed val batches. Captions differ in length, so the mean is taken over
    tokens (sum of losses / number of tokens), reduced over ranks, and does not depend on the world size."""
    model.eval()
    total = torch.zeros(2, device=d.device)  # [sum of token losses, number of tokens]
    for i in range(d.rank, len(batches), d.world_size):
        images, x, y = batches[i]
        image_feats = data.image_feats(images).to(d.device)
        x, y = x.to(d.device), y.to(d.device)
        with autocast(d.device_type, dtype):
            loss = model(x, y, image_feats=image_feats)[1]
        n_tokens = (y != -1).sum()
        total += torch.stack([loss.float() * n_tokens, n_tokens.float()])
    all_reduce_sum(total, d)
    model.train()
    return (total[0] / total[1]).item()


def caption_examples(model, data, enc, d, dtype, n_images=4, beam_size=3):
    """Captions of a fixed few val images with their first reference, to watch the captioner learn. Beam 3,
    sample.py's default: what a user would get. (CIDEr-D for best.pt decodes greedily instead: a few hundred
    images at every eval, one row per image instead of three (cheaper; not measured), only to rank one run's
    checkpoints.) At most 30 new tokens,
    as everywhere captions are decoded: why at caption_eval.py's --max-new-tokens."""
    model.eval()
    image_feats = data.image_feats(np.arange(min(n_images, len(data.image_ids)))).to(d.device)
    prompt = torch.full((len(image_feats), 1), EOT_TOKEN, device=d.device)
    with autocast(d.device_type, dtype):
        captions = beam_search(model, prompt, image_feats, beam_size=beam_size, max_new_tokens=30)
    model.train()
    return [(int(data.image_ids[i]), enc.decode(tokens).strip(), data.captions[i][0]) for i, tokens in enumerate(captions)]


def keep_best(model, val_data, d, dtype, args, meta, step, best_cider):
    """CIDEr-D on a fixed few hundred val images (greedy), logged beside the val loss. CIDEr scores a caption by
    its n-grams (1 to 4) shared with the image's reference captions, each weighted by TF-IDF (rare words count
    more); the -D variant, the one COCO reports, clips repeated n-grams and penalises length differences
    (caption_eval.cider_d). The val loss and the captions' quality need not peak at the same step, so the
    checkpoint a paper would report is picked by the metric it reports: best.pt is rewritten (atomically) only
    when CIDEr-D improves. -> (CIDEr-D, best so far)."""
    cider = caption_eval.cider_d(model, val_data, d.device, dtype, n_images=args.eval_cider_images)
    improved = cider > best_cider
    scored = min(args.eval_cider_images, len(val_data.image_ids))  # the val split may hold fewer than asked for
    print(f"step {step:5d} | val CIDEr-D {cider * 100:.1f} ({scored} images)"
          + (" | new best: best.pt" if improved else f" | best {best_cider * 100:.1f}"))
    append_log(args.out_dir, f"{step} cider {cider:.4f}")
    if improved:
        save_checkpoint({"kind": "caption", "model": model.state_dict(), "config": asdict(model.config), "step": step,
                         "cider": cider, "encoder": meta["encoder"]},
                        os.path.join(args.out_dir, caption_eval.BEST_CHECKPOINT))
    return cider, max(cider, best_cider)


def evaluate(step, raw_model, val_data, val_data_batches, meta, enc, args, d, dtype, tracker, best_cider):
    """The val loss, then on rank 0 val CIDEr-D (best.pt kept by it) and a few captions written to samples.txt.
    raw_model: the uncompiled module, whose shapes may vary (the last val batch is short) without making
    torch.compile build new graphs; it shares the compiled model's parameters. -> the best CIDEr-D so far."""
    val_loss = validation_loss(raw_model, val_data, val_data_batches, d, dtype)
    if d.master:
        print(f"step {step:5d} | val loss {val_loss:.4f} | perplexity {math.exp(val_loss):.2f}")
        append_log(args.out_dir, f"{step} val {val_loss:.4f}")
        tracker.log(step, val_loss=val_loss)
        if args.eval_cider_images > 0:
            cider, best_cider = keep_best(raw_model, val_data, d, dtype, args, meta, step, best_cider)
            tracker.log(step, val_cider=cider)
        with open(os.path.join(args.out_dir, "samples.txt"), "a") as f:
            for image_id, caption, reference in caption_examples(raw_model, val_data, enc, d, dtype):
                print(f"  image {image_id}: {caption!r} (a reference: {reference!r})")
                f.write(f"{step}\t{image_id}\t{caption}\n")
    return best_cider


# -----------------------------------------------------------------------------
# The run: the model the step calls, the command line, the loop


def wrap_model(raw_model, use_compile, d):
    """The model the training step calls: compiled, and under torchrun wrapped in DDP. DDP only syncs the
    parameters that required gradients when it was built, so unfreezing re-wraps. dynamic=False: one graph
    for each caption length caption_batch pads to (at most three), each specialised to its shape; by default
    torch.compile would turn to one shape-generic graph at the second length."""
    model = torch.compile(raw_model, dynamic=False) if use_compile else raw_model
    if d.ddp:
        model = DDP(model, device_ids=[d.local_rank] if d.device_type == "cuda" else None)
    return model


# What a resume may change (training.check_same_run): where and how the run goes on, when it evaluates, saves and
# stops, and the schedule's shape. --lr and --lm-lr are not here: the optimizer's groups keep their ratio.
MAY_CHANGE_ON_RESUME = {"features_dir", "out_dir", "resume", "batch_size", "epochs", "max_steps", "stop_at",
                        "min_lr", "warmup_steps", "grad_clip", "eval_every", "val_images", "eval_cider_images",
                        "save_every", "keep_last", "compile", "dtype", "device", "wandb_project", "wandb_run",
                        "dist_timeout", "config"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--features-dir", default="coco_features", help="what coco.py wrote")
    p.add_argument("--init", default="gpt2", help="the language model to start from: gpt2, gpt2-medium, ... (HF hub), "
                                                  "a folder with config.json + model.safetensors, or a train_gpt2.py .pt")
    p.add_argument("--out-dir", default="log_caption", help="checkpoints, log.txt and samples.txt go here")
    # Every second block rather than every block: half the added weights and compute, for fewer places where the
    # text can look at the image. A cost/quality choice, not measured here. --cross-attn-every 1 puts one in every
    # block, as SmallCap does, though SmallCap makes its layers narrower by default: its --attention_size 7 is a
    # reduction factor of 4 (train.py PARAMS2REDUCE_FACTOR), 768 -> 192 wide (src/gpt2.py); ours are full width.
    # Flamingo-style models space theirs out too (OpenFlamingo-9B: every 4th block).
    p.add_argument("--cross-attn-every", type=positive_int, default=2,
                   help="a cross-attention layer in every k-th block")
    # The budget, a choice, not tuned: 256 images a step (8 GPUs x 32, or 1 GPU x 32 x 8 accumulation steps) for
    # 5 caption-epochs, ~3M image-caption pairs, 11,558 steps on COCO train2017. For scale: ClipCap trained 10
    # epochs at batch 40 (~5.7M pairs of Karpathy's train split). SmallCap, which like our default trains only cross-attention,
    # runs 10 epochs at batch 64 by default (its train.py: n_epochs, batch_size); the checkpoint its README names
    # as an example is checkpoint-17712, by our arithmetic 2 epochs (2 x 8,856 steps of 64: ~1.1M pairs).
    # A micro-batch of 32 captions is only 32 x L positions, L being 32 once any of the step's 256 captions passes 15 tokens (see
    # caption_batch): ~1K tokens. Raise --batch-size on a large GPU (fewer accumulation steps, the same training).
    p.add_argument("--total-batch-size", type=positive_int, default=256,
                   help="images per optimizer step, on all GPUs together (reached by gradient accumulation)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per micro-batch per process")
    p.add_argument("--epochs", type=positive_float, default=5,
                   help="caption-epochs: as many caption draws as image-caption pairs (COCO train2017: ~591K)")
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--stop-at", type=positive_int,
                   help="end this run after this step, with a checkpoint (then --resume auto)")
    # 1e-4: SmallCap's rate for the same setup (new cross-attention, frozen GPT-2). The rest are choices, not tuned
    # here: the cosine ends at 1e-5, 0.1 x --lr as in pretraining (absolute: set --min-lr when changing --lr);
    # 500 warmup steps are ~4% of the default run, as pretraining's 715 are of 19,073; weight decay 0.01 is BERT's
    # (and torch.optim.AdamW's default), lighter than pretraining's 0.1 for a short run; 40 caption tokens bound
    # L at 41 and cut fewer captions than SmallCap's 25 (its src/utils.py CAPTION_LENGTH, in GPT-2 tokens). A cut
    # caption still ends in <|endoftext|>, mid-sentence. (Decoding stops sooner, at 30: see caption_eval.py's
    # --max-new-tokens.)
    p.add_argument("--lr", type=positive_float, default=1e-4, help="peak learning rate of the new layers")
    # 2e-5: the rate ClipCap fine-tunes GPT-2 at, though its train.py runs one AdamW at 2e-5 over all it trains,
    # its new mapping network included; BLIP fine-tunes its whole pretrained captioner at 1e-5 (its
    # configs/caption_coco.yaml). Those two fine-tune pretrained weights at 1e-5 to 2e-5, and SmallCap trains
    # new layers over a frozen GPT-2 at 1e-4, but none of them uses two rates in one run: GPT-2's weights at a
    # fifth of the new layers' rate is our choice, not measured here. Both schedules follow the same cosine, scaled.
    p.add_argument("--lm-lr", type=positive_float, default=2e-5,
                   help="peak learning rate of GPT-2's own weights, when they train (--train cross+mlp or all, "
                        "--unfreeze-after)")
    p.add_argument("--min-lr", type=non_negative_float, default=1e-5, help="learning rate at the end of the cosine")
    p.add_argument("--warmup-steps", type=non_negative_int, default=500, help="linear warmup steps")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW weight decay of the matrices")
    # 1.0: GPT-3's value (its appendix B), which train_gpt2.py pretrains with: one bad batch cannot throw the
    # weights, the freshly initialised layers above all, far
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="clip the global gradient norm to this")
    p.add_argument("--max-caption-tokens", type=positive_int, default=40, help="longer captions are cut")
    p.add_argument("--train", choices=sorted(TRAINABLE), default="cross",
                   help="what trains: the cross-attention layers, those and GPT-2's MLPs and LayerNorms, or all")
    p.add_argument("--unfreeze-after", type=positive_int,
                   help="train what --train names until this step, then everything")
    p.add_argument("--eval-every", type=non_negative_int, default=500,
                   help="val loss and example captions every N steps")
    p.add_argument("--val-images", type=positive_int, default=1000,
                   help="val loss over all captions of this many val images")
    p.add_argument("--eval-cider-images", type=non_negative_int, default=500,
                   help="at each eval, CIDEr-D of greedy captions of this many val images; best.pt keeps the best "
                        "checkpoint by it (0: neither)")
    p.add_argument("--save-every", type=positive_int, default=2000, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep-last", type=positive_int, help="keep only the newest N checkpoints (default: all)")
    p.add_argument("--resume", help="'auto' (newest checkpoint in --out-dir, if any) or a checkpoint path")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="autocast dtype (default on CUDA: bfloat16 where the GPU has it, else float16; "
                        "float32 elsewhere)")
    p.add_argument("--device", default="auto", type=existing_device, help="auto, cuda, mps or cpu")
    p.add_argument("--seed", type=random_seed, default=1337, help="the new layers' initialisation and the data order")
    p.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT"),  # wandb's own convention
                   help="log to this Weights & Biases project (pip install wandb); $WANDB_PROJECT if set")
    p.add_argument("--wandb-run", help="the wandb run's name (default: wandb picks one)")
    p.add_argument("--dist-timeout", type=positive_float, default=10,
                   help="minutes a process waits for a missing peer before the run stops with an error")
    p.add_argument("--config", help="start from the settings in a run.json (another run's record); flags given "
                                    "here win")
    config_defaults(p, argv)
    args = p.parse_args(argv)
    if args.stop_at is not None and args.max_steps is not None and args.stop_at > args.max_steps:
        p.error(f"--stop-at {args.stop_at} is after --max-steps {args.max_steps}")
    if args.min_lr > args.lr:  # the rate would climb after warmup
        p.error(f"--min-lr {args.min_lr} is above --lr {args.lr}: the cosine would end above the peak")
    return args


def resume_state(checkpoint, raw_model, optimizer, scaler, train_loader, max_steps, unfreezes, lm_lr_scale, path,
                 args, d):
    """The rest of an exact resume (training.restore_training_state), GPT-2's groups added back first, after the
    cross-attention ones, if the run had unfrozen them. -> (its step, the best val CIDEr-D so far)."""
    check_resume_step(checkpoint["step"], max_steps, args.stop_at, path)
    if unfreezes and checkpoint["step"] >= args.unfreeze_after:
        unfreeze_language_model(raw_model, optimizer, args.weight_decay, lm_lr_scale)
    restore_training_state(checkpoint, optimizer, scaler, train_loader, d, args.seed)
    return checkpoint["step"], checkpoint["best_cider"]


def print_plan(args, raw_model, train_data, n_pairs, meta, d, dtype, use_compile, grad_accum_steps, max_steps,
               resume_from, start_step):
    """Two lines before the first step: what runs where, what trains, and how long."""
    B = args.batch_size
    n_trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    n_all = raw_model.num_params(non_embedding=False)  # both counts with the position embeddings, which may train
    print(f"{d.world_size} process(es) on {d.device}, {dtype}, compile={use_compile} | "
          f"{len(train_data.image_ids):,} train images, {n_pairs:,} captions | {n_trainable / 1e6:.1f}M of "
          f"{n_all / 1e6:.1f}M parameters train | encoder {coco.describe_encoder(meta['encoder'])}")
    print(f"{args.total_batch_size} images/step = {B} x {d.world_size} ranks x {grad_accum_steps} accumulation "
          f"steps | {max_steps:,} steps = {max_steps * args.total_batch_size:,} image-caption pairs = "
          f"{max_steps * args.total_batch_size / n_pairs:.2f} caption-epochs"
          + (f" | resuming {resume_from} at step {start_step}" if resume_from else ""))
    warn_if_bf16_is_emulated(dtype, d.device)


def main(args):
    d = setup_distributed(args.device, args.dist_timeout)
    dtype = args.dtype or default_dtype(d.device)
    use_compile = args.compile if args.compile is not None else d.device_type == "cuda"
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision("high")
    enc = gpt2_encoding()

    B = args.batch_size
    if args.total_batch_size % (B * d.world_size):
        raise ValueError(f"--total-batch-size {args.total_batch_size} is not divisible by batch-size x world size = "
                         f"{B} x {d.world_size} = {B * d.world_size}")
    grad_accum_steps = args.total_batch_size // (B * d.world_size)

    # --- data, model, optimizer
    meta = coco.read_meta(args.features_dir)
    train_data, val_data = coco.load_split(args.features_dir, "train"), coco.load_split(args.features_dir, "val")
    train_loader = CaptionLoader(train_data, args.total_batch_size, args.max_caption_tokens, args.seed,
                                 pin_memory=d.device_type == "cuda")
    n_pairs = sum(len(tokens) for tokens in train_data.tokens)  # one caption-epoch
    max_steps = args.max_steps or math.ceil(args.epochs * n_pairs / args.total_batch_size)
    val_data_batches = val_batches(val_data, B, args.val_images, args.max_caption_tokens)
    take_out_dir(args.out_dir, d)  # one run per out-dir, and a writable one
    resume_from = resume_path(args.out_dir, args.resume, d)
    raw_model, checkpoint = build_model(args, resume_from, meta, train_data.width, d)
    raw_model.to(d.device)
    if args.max_caption_tokens + 1 > raw_model.config.block_size:  # <|endoftext|> + caption: at step 1, not later
        raise ValueError(f"--max-caption-tokens {args.max_caption_tokens}: with its <|endoftext|> longer than the "
                         f"model's block_size {raw_model.config.block_size}")
    set_trainable(raw_model, args.train)
    lm_lr_scale = args.lm_lr / args.lr
    unfreezes = args.unfreeze_after is not None and args.train != "all"  # the rest of GPT-2 joins at that step
    optimizer = raw_model.configure_optimizers(args.weight_decay, args.lr, d.device_type, lm_lr_scale=lm_lr_scale)
    scaler = grad_scaler(d, dtype)
    start_step, best_cider = 0, float("-inf")
    tracker = Tracker(args.wandb_project, args.wandb_run, vars(args), d,
                      run_id=checkpoint.get("wandb_id") if checkpoint is not None else None)
    if checkpoint is not None:
        start_step, best_cider = resume_state(checkpoint, raw_model, optimizer, scaler, train_loader, max_steps,
                                              unfreezes, lm_lr_scale, resume_from, args, d)
        del checkpoint
    model = wrap_model(raw_model, use_compile, d)  # after the resume: GPT-2's weights may train again by now
    write_run_record(args, d)  # run.json (every setting, the commit, torch, the GPUs), once nothing can refuse
    if d.master:
        for name in ("log.txt", "samples.txt"):
            start_log(os.path.join(args.out_dir, name), start_step if resume_from else None)
        print_plan(args, raw_model, train_data, n_pairs, meta, d, dtype, use_compile, grad_accum_steps, max_steps,
                   resume_from, start_step)

    stop, timer, saved = StopSignal(), StepTimer(max_steps), None  # SIGTERM / Ctrl-C end the run with a save
    for step in range(start_step, max_steps + 1):
        last = step == max_steps
        stopping = step == args.stop_at or stop.requested(d)
        if unfreezes and step == args.unfreeze_after and step > start_step:
            unfreeze_language_model(raw_model, optimizer, args.weight_decay, lm_lr_scale)
            model = wrap_model(raw_model, use_compile, d)
            if d.master:
                print(f"step {step:5d} | GPT-2's weights train from here (--unfreeze-after)"
                      + (": the model is compiled again, once" if use_compile else ""))
        if not stopping and ((args.eval_every > 0 and step % args.eval_every == 0) or last):
            best_cider = evaluate(step, raw_model, val_data, val_data_batches, meta, enc, args, d, dtype, tracker,
                                  best_cider)
        if step > start_step and (step % args.save_every == 0 or last or stopping):
            saved = save_on_rank0({"kind": "caption", "model": raw_model.state_dict(), "config": asdict(raw_model.config),
                                   "step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                   "loader": train_loader.state_dict(), "best_cider": best_cider,
                                   "wandb_id": tracker.run_id, "args": vars(args), "encoder": meta["encoder"]},
                                  step, args, d)
        if last or stopping:
            break

        # --- one optimizer step (as in train_gpt2.py; lines marked fp16 or DDP do nothing in other runs)
        t0 = time.time()
        image_feats_step, x_step, y_step, n_tokens = train_loader.next_step(d.rank, d.world_size)
        # the step's loss for the step line, summed in float64 so the order of the sum (ranks x micro-steps) does
        # not show in its printed digits (MPS has no float64)
        loss_accum = torch.zeros((), device=d.device, dtype=torch.float32 if d.device_type == "mps" else torch.float64)
        for micro_step in range(grad_accum_steps):
            micro = slice(micro_step * B, (micro_step + 1) * B)
            image_feats, x, y = (t[micro].to(d.device, non_blocking=True) for t in (image_feats_step, x_step, y_step))
            if d.ddp:  # DDP: all-reduce the gradients on the last micro-step only (set before the forward)
                model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
            with autocast(d.device_type, dtype):
                loss = model(x, y, image_feats=image_feats)[1]  # the mean over this micro-batch's caption tokens
            # The step's loss is the mean over all its caption tokens, on every rank: captions differ in length,
            # so each micro-batch's mean is weighted by its share of those tokens (a mean of micro-batch means
            # would change with the split). DDP averages the ranks' gradients: x world_size undoes that.
            loss = loss * (y != -1).sum() / n_tokens
            loss_accum += loss.detach()
            scaler.scale(loss * d.world_size).backward()  # fp16: times the loss scale; otherwise as it is
        all_reduce_sum(loss_accum, d)  # DDP: the step's loss over all ranks, for the step line
        scaler.unscale_(optimizer)  # fp16: the true gradients, before they are clipped
        trainable = [p for p in raw_model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        # the NaN/inf guard: a diverging run stops here, before its update poisons the weights (waits for the GPU)
        loss_value, norm_value = check_finite(loss_accum, norm, step, args.out_dir, scaler)
        lr = cosine_lr(step, args.lr, args.min_lr, args.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]  # GPT-2's own weights, when they train, at --lm-lr / --lr of it
        scaler.step(optimizer)  # = optimizer.step(); fp16: skipped when a gradient overflowed
        scaler.update()  # fp16: adjust the loss scale
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        if d.master:
            caption_epochs = (step + 1) * args.total_batch_size / n_pairs  # what --epochs counts
            print(f"step {step:5d} | loss {loss_value:.6f} | lr {lr:.4e} | norm {norm_value:.4f} | "
                  f"dt {dt * 1000:.1f}ms | img/s {args.total_batch_size / dt:,.0f} | "
                  f"caption-epochs {caption_epochs:.3f} | "
                  f"eta {timer.eta(step, dt)}" + fp16_note(scaler, norm_value))
            append_log(args.out_dir, f"{step} train {loss_value:.6f}", lr=f"{lr:.4e}", norm=f"{norm_value:.4f}",
                       img_s=f"{args.total_batch_size / dt:.0f}")
            tracker.log(step, train_loss=loss_value, lr=lr, grad_norm=norm_value,
                        images_per_sec=args.total_batch_size / dt, caption_epochs=caption_epochs)

    tracker.finish()
    cleanup_distributed(d)
    return stop.close(step, saved, d)


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"train_caption.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C before StopSignal takes it, or a second one: at once, without a save
        print("train_caption.py: stopped (Ctrl-C); --resume auto continues from the last checkpoint", file=sys.stderr)
        sys.exit(130)  # the status a shell gives ^C (128 + SIGINT), as the other scripts
