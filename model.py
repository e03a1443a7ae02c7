"""
GPT-2, written out by hand, with optional cross-attention so the same decoder can caption images.

This file is the model and nothing else. Read it top to bottom: attention (its formula written out once),
the MLP, the block that holds them, the cross-attention a captioner's blocks add, the config, and the model
(its init, its forward pass and loss, its optimizer groups, the projection of the image tokens, its FLOPs,
and loading OpenAI's weights).
Elsewhere: generation (sampling, the KV cache, beam search) in generate.py; checkpoint files in
checkpoint.py; writing Hugging Face folders in export_hf.py; the Muon + AdamW pair in training.py.

With `cross_attn_every=0` this is exactly GPT-2: parameter names follow OpenAI/Hugging Face
(`transformer.h.0.attn.c_attn.weight`, ...), so their weights load after a small conversion (transposes;
see convert_gpt2_weights) and give the same logits.
With `cross_attn_every=2`, every second block (blocks 1, 3, 5, ... counting from 0) also carries a
cross-attention layer whose queries come from the text and whose keys/values come from image tokens
(e.g. the 50 CLIP ViT-B/32 tokens of a picture). Its output projection starts at exactly zero, so adding
it to a trained language model changes nothing until training teaches it to look at the image.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

GPT2_VOCAB_SIZE = 50257  # tokens in GPT-2's BPE vocabulary
EOT_TOKEN = 50256  # <|endoftext|>: separates documents, and starts and ends every caption

# -----------------------------------------------------------------------------
# The layers


def causal_attention(q, k, v):
    """Attention written out, for reading; the model calls F.scaled_dot_product_attention(q, k, v,
    is_causal=True), which computes the same (tests/test_model.py checks; it adds dropout when asked) and, in
    its fused kernels, never forms the (T, T) matrix. q, k, v: (B, nh, T, hs), nh heads of hs = n_embd / nh.
    Each query is dotted with every key, scaled by 1/sqrt(hs) so the scores stay O(1) whatever hs is; softmax
    turns a row into weights summing to 1, and the output is that weighted mean of the values. Causal: position
    t sees positions <= t only."""
    T = q.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)  # True above the diagonal
    weights = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # exp(-inf) = 0: no weight there
    return weights @ v  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    """Each token attends to itself and the tokens before it, in n_head heads at once (the formula:
    causal_attention above)."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        # queries, keys and values of all heads come out of one matmul, then are split
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True  # see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()  # batch, sequence length, embedding width (n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs), nh heads of hs dimensions: the heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv_cache is None:
            # on a GPU in bf16/fp16 SDPA runs a fused kernel (flash attention on recent GPUs): no (T, T) matrix
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:  # generating (generate.py): the cache keeps k, v and attends over every token so far
            y = kv_cache.attend(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form gives other logits
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), [x + xattn(ln(x), image)], x + mlp(ln(x)). A captioner's
    block reads the image between self-attention and the MLP, where the original transformer's decoder reads
    its encoder (Vaswani et al. 2017)."""

    def __init__(self, config, cross_attn=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        if cross_attn:  # a captioner's block
            self.ln_x = nn.LayerNorm(config.n_embd)
            self.xattn = CrossAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, image_kv=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        if image_kv is not None:  # no image: the block is a plain GPT-2 block
            x = x + self.xattn(self.ln_x(x), image_kv)
        x = x + self.mlp(self.ln_2(x))
        return x


class CrossAttention(nn.Module):
    """What the captioner adds: text queries attend to image tokens. No causal mask: every caption position may
    look at every image token. Unlike attn and mlp, no residual dropout after c_proj (only SDPA's dropout of
    attention weights): a simplification that changes nothing at the default dropout of 0 (GPTConfig)."""

    def __init__(self, config):
        super().__init__()
        self.c_q = nn.Linear(config.n_embd, config.n_embd)
        self.c_kv = nn.Linear(config.n_embd, 2 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        # Zero-initialised output (GPT._init_weights reads ZERO_INIT): the layer adds exactly 0.0 until trained, so
        # a pretrained LM keeps its logits bit for bit. On the first step only c_proj gets a gradient (c_q, c_kv,
        # ln_x, img_proj, ln_img sit behind its zeros, as behind a closed gate); then they all learn. Unlike a tanh
        # gate, the opening is a full matrix moving at the learning rate, not one scalar squeezed through tanh.
        self.c_proj.ZERO_INIT = True
        self.n_head = config.n_head
        self.dropout = config.dropout

    def image_keys_values(self, image_embs):
        """(B, N, C) image tokens, already projected to n_embd -> this layer's keys and values (B, nh, N, hs)."""
        B, N, C = image_embs.size()
        k, v = self.c_kv(image_embs).split(C, dim=2)
        k = k.view(B, N, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, N, self.n_head, C // self.n_head).transpose(1, 2)
        return k, v

    def forward(self, x, image_kv):
        B, T, C = x.size()
        # (B, nh, N, hs) each. No position embedding here: the encoder gave every token its place (CLIP and DINOv2
        # add position embeddings; DINOv3 rotates its queries and keys, RoPE, and its tokens hold their place only
        # through what that attention computed: an assumption here, not tested)
        k, v = image_kv
        q = self.c_q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def is_cross_attn_param(name):
    """The parameters a captioner adds to GPT-2: cross-attention layers, their LayerNorms, the image projection."""
    return ".xattn." in name or ".ln_x." in name or ".img_proj." in name or ".ln_img." in name


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence; the number of learned position embeddings
    # GPT-2 has 50257 tokens; 50304 = 393 * 128 lets the big lm_head matmul use the fast tensor-core tiles.
    # The 47 extra rows are never real tokens: their logits are masked to -inf (see GPT.forward).
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    cross_attn_every: int = 0  # 0: plain GPT-2; k: blocks k-1, 2k-1, ... also cross-attend to the image
    n_embd_img: int = 768  # width of the image tokens (768 for CLIP ViT-B/32, 1024 for ViT-L/14)
    dropout: float = 0.0  # Hugging Face's GPT-2 config says 0.1; 0 here, as in build-nanogpt: one epoch has no
    # overfitting to fight

    def has_cross_attn(self, layer):
        # blocks k-1, 2k-1, ...: for k = 2 and 12 layers 1, 3, ..., 11, so the last block reads the image just
        # before the prediction (when k divides n_layer), while block 0 works on the raw token embeddings
        return self.cross_attn_every > 0 and (layer + 1) % self.cross_attn_every == 0


# presets: overrides of the defaults above; the four sizes OpenAI released, and one for CPU smoke runs
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # ~7M, trains on a laptop CPU
}

# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, config.has_cross_attn(i)) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        if config.cross_attn_every > 0:
            # one learned projection, shared by the cross-attention layers, maps the image tokens into the
            # decoder's space and width (at equal widths too: one path for every encoder; not measured against
            # none); each layer's c_kv makes its own keys and values from it. The LayerNorm gives them the scale
            # of the LayerNorm'd text the queries come from, whatever the encoder's output scale
            self.transformer.img_proj = nn.Linear(config.n_embd_img, config.n_embd)
            self.transformer.ln_img = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input embedding and the output classifier are one matrix (as in GPT-2);
        # it saves 38M parameters at 124M and the two roles help each other learn
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02  # GPT-2's initializer_range, the order of Xavier's 1/sqrt(768) = 0.036
            if getattr(module, "RESIDUAL_PROJECTION", False):
                # every block adds two outputs to the residual stream; scaling their init by 1/sqrt(2 * n_layer)
                # keeps the stream's variance from growing with depth (GPT-2 paper, section 2.3)
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "ZERO_INIT", False):
                torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # both embeddings at 0.02, as build-nanogpt (GPT-2's own code drew wpe at 0.01). The tied wte/lm_head
            # matrix is drawn twice, as lm_head (a Linear) and as wte: the same N(0, 0.02), so either draw serves
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, image_feats=None):
        """idx: (B, T) token ids; targets: (B, T), -1 where no loss is wanted (padding, prompt tokens);
        image_feats: (B, N_img, n_embd_img) image tokens, any N_img, or None for a text-only pass.
        Returns (logits (B, T, vocab_size), loss or None)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        image_kv = self.image_keys_values(image_feats)  # None, or per block its image (k, v) (None if no xattn)
        for i, block in enumerate(self.transformer.h):
            x = block(x, image_kv[i] if image_kv else None)  # (B, T, C)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        # The 47 padding rows are not tokens. With weights loaded from GPT-2 they are zero, so their logit would
        # be 0 while real logits sit far below it: that would swallow the softmax. -inf keeps them out of every
        # loss and every sample, whatever their weights. (Writing in place is safe for autograd: lm_head's
        # backward needs its input and weight, not its output.)
        logits[..., GPT2_VOCAB_SIZE:] = float("-inf")
        loss = None
        if targets is not None:
            # ignore_index=-1: positions whose target is -1 add nothing to the loss or to its average.
            # view needs contiguous memory, which lm_head's fresh output always has; reshape also takes targets
            # that are a strided slice (say tokens[:, 1:], which a caller may pass), copying only then.
            # (under bf16 autocast, cross_entropy runs in fp32 by itself)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, device_type, betas=(0.9, 0.95), lm_lr_scale=1.0,
                             leave_out=()):
        """AdamW over the parameters that train (requires_grad). Matrices decay, the embeddings too (as in
        build-nanogpt; the padding rows, with no gradient, just shrink: harmless, their logits are -inf); biases
        and LayerNorm gains do not: shrinking those towards 0 only hurts. The loop sets every group's rate at
        every step to the schedule's x its "lr_scale": a captioner's pretrained GPT-2 weights (when they train)
        move at lm_lr_scale of its new layers' rate. leave_out: what another optimizer steps (Muon's matrices)."""
        def decayed_and_not(params, lr_scale):
            return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": lr_scale},
                    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": lr_scale}]
        skip = {id(p) for p in leave_out}
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad and id(p) not in skip]
        new_layers = [p for name, p in trainable if is_cross_attn_param(name)]  # none in a plain GPT-2
        gpt2 = [p for name, p in trainable if not is_cross_attn_param(name)]
        groups = decayed_and_not(new_layers, 1.0) + decayed_and_not(gpt2, lm_lr_scale)
        # betas (0.9, 0.95) and eps 1e-8: GPT-3's Adam settings (its appendix B). beta2 0.95 rather than
        # PyTorch's 0.999: the second-moment estimate adapts faster, steadier for large transformers.
        # fused: on CUDA one fused kernel does each chunk of tensors' whole update (foreach, the default, launches
        # one per operation of the update)
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, eps=1e-8,
                                 fused=device_type == "cuda")

    def image_keys_values(self, image_feats):
        """Project the image tokens once, then give every cross-attention block its keys and values:
        (B, N_img, n_embd_img) -> a list, per block, of its (k, v), each (B, nh, N_img, hs), or None."""
        if image_feats is None:
            return None
        if self.config.cross_attn_every == 0:
            raise ValueError("image_feats given, but this model has no cross-attention layers (cross_attn_every=0)")
        if image_feats.size(-1) != self.config.n_embd_img:
            raise ValueError(f"image_feats are {image_feats.size(-1)} wide, the model expects "
                             f"n_embd_img={self.config.n_embd_img}")
        image_feats = image_feats.to(self.transformer.img_proj.weight.dtype)  # features are stored in fp16
        image_embs = self.transformer.ln_img(self.transformer.img_proj(image_feats))  # (B, N, C)
        return [block.xattn.image_keys_values(image_embs) if hasattr(block, "xattn") else None
                for block in self.transformer.h]

    def num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are left out by default (the token embeddings stay:
        they are also the lm_head, which does real work)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len):
        """Model FLOPs of one training token (forward + backward), the PaLM paper's estimate: 6 per
        parameter (a multiply-add is 2 FLOPs in the forward pass, twice that in the backward), plus the
        attention matmuls, which grow with the sequence length: q k^T and weights @ v are each 2 x T x C
        per token and layer forward, x3 with the backward: 12 x T x C."""
        cfg = self.config
        attention = 12 * cfg.n_layer * cfg.n_embd * seq_len
        return 6 * self.num_params() + attention

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """OpenAI's GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', from the Hugging Face hub) or a
        local folder with a GPT-2 config.json + model.safetensors (what transformers' save_pretrained and our
        export_hf.py write). Overrides such as cross_attn_every=2 add freshly initialised cross-attention."""
        config_path, weights_path = gpt2_files(name_or_path)
        with open(config_path) as f:
            hf = json.load(f)
        if hf.get("vocab_size") != GPT2_VOCAB_SIZE:
            raise ValueError(f"{config_path}: vocab_size {hf.get('vocab_size')}, expected GPT-2's {GPT2_VOCAB_SIZE}")
        # gelu_new: transformers' name for the tanh approximation of GELU, GPT-2's (see MLP)
        if hf.get("n_inner") not in (None, 4 * hf["n_embd"]) or hf.get("activation_function", "gelu_new") != "gelu_new":
            raise ValueError(f"{config_path}: not a GPT-2 architecture (n_inner or activation_function differ)")
        config = GPTConfig(block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                           n_embd=hf["n_embd"], **overrides)
        from safetensors.torch import load_file
        model = cls(config)
        load_weights(model, convert_gpt2_weights(load_file(weights_path), config), weights_path)
        return model


# -----------------------------------------------------------------------------
# OpenAI's weights: from Hugging Face's GPT-2 layout to ours

# GPT-2 was written in TensorFlow with "Conv1D" layers that store their weights as (in, out); nn.Linear
# stores (out, in), so these four are transposed on the way in (and back on the way out: export_hf.py)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_files(name_or_path):
    """A local folder, or a model name on the Hugging Face hub -> (config.json, model.safetensors) paths. A file,
    or a missing path that is plainly a file's (x.pth) or a folder's (./gpt2), is named as such, not blamed on
    the hub."""
    if os.path.isfile(name_or_path):
        raise ValueError(f"{name_or_path}: a file; a GPT-2 is a folder with config.json + model.safetensors, or a "
                         f"hub name (our own checkpoints end in .pt)")
    looks_local = name_or_path.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")) or \
        name_or_path.startswith((".", "~", os.sep))
    if looks_local and not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such file or folder")
    if os.path.isdir(name_or_path):
        paths = [os.path.join(name_or_path, f) for f in ("config.json", "model.safetensors")]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such file (a GPT-2 folder needs config.json and "
                                        f"model.safetensors)")
        return paths
    from huggingface_hub import hf_hub_download
    try:
        return [hf_hub_download(name_or_path, f) for f in ("config.json", "model.safetensors")]
    except Exception as e:
        raise FileNotFoundError(f"{name_or_path}: not a local folder and not downloadable from the Hugging Face hub "
                                f"({type(e).__name__}); offline, pass a folder with config.json + model.safetensors") from None


def convert_gpt2_weights(hf_state_dict, config):
    """Hugging Face GPT-2 names/layouts -> ours: add the 'transformer.' prefix where missing (the hub's gpt2
    files were saved from GPT2Model, whose keys are 'h.0...'; GPT2LMHeadModel writes 'transformer.h.0...'),
    transpose the Conv1D weights, drop the causal-mask buffers, tie lm_head to wte, pad the vocabulary rows."""
    state_dict = {}
    for name, tensor in hf_state_dict.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # mask buffers we do not need; lm_head is wte (tied)
        name = name if name.startswith("transformer.") else "transformer." + name
        state_dict[name] = tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor
    wte = state_dict["transformer.wte.weight"]
    padding = wte.new_zeros(config.vocab_size - wte.size(0), wte.size(1))
    state_dict["transformer.wte.weight"] = torch.cat([wte, padding])
    state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    return state_dict


def load_weights(model, state_dict, source):
    """Load a state dict strictly, except that cross-attention layers absent from it (a language model
    being turned into a captioner) keep their fresh initialisation. Mismatches name the file."""
    own = model.state_dict()
    missing = [name for name in own if name not in state_dict and not is_cross_attn_param(name)]
    unexpected = [name for name in state_dict if name not in own]
    wrong_shape = [f"{name} {tuple(state_dict[name].shape)} vs {tuple(own[name].shape)}"
                   for name in state_dict if name in own and state_dict[name].shape != own[name].shape]
    for problem, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            raise ValueError(f"{source}: weights do not fit the model: {problem} {', '.join(names[:3])}{more}")
    model.load_state_dict(state_dict, strict=False)
