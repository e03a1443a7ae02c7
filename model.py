"""
GPT-2, written out by hand, with optional cross-attention so the same decoder can caption images.

Read it top to bottom: self-attention, MLP, the block that holds them, the config and the model (its
forward pass and loss) are GPT-2, and a reader can stop there. The model then loads and saves weights
(OpenAI's GPT-2, Hugging Face folders) and generates (greedy, sampling, beam search); after it come the
cross-attention layer the captioner adds, the KV cache that makes generation fast, the optimizers, and
weight files and checkpoints.

With `cross_attn_every=0` this is exactly GPT-2: parameter names follow OpenAI/Hugging Face
(`transformer.h.0.attn.c_attn.weight`, ...), so their weights load after a small conversion (transposes;
see _convert_gpt2_weights) and give the same logits.
With `cross_attn_every=2`, every second block (blocks 1, 3, 5, ... counting from 0) also carries a
cross-attention layer whose queries come from the text and whose keys/values come from image tokens
(e.g. the 50 CLIP ViT-B/32 tokens of a picture). Its output projection starts at exactly zero, so adding
it to a trained language model changes nothing until training teaches it to look at the image.
"""

import json
import math
import os
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

GPT2_VOCAB_SIZE = 50257  # tokens in GPT-2's BPE vocabulary
EOT_TOKEN = 50256  # <|endoftext|>: separates documents, and starts and ends every caption

# -----------------------------------------------------------------------------
# The layers of GPT-2


def causal_attention(q, k, v):
    """Attention written out; F.scaled_dot_product_attention(q, k, v, is_causal=True) computes the same
    (tests/test_model.py checks), without ever forming the (T, T) matrix. q, k, v: (B, nh, T, hs), nh heads
    of hs = n_embd / nh dimensions. Each position's query is compared with every key (a dot product, scaled by
    1/sqrt(hs) so the scores stay O(1) whatever hs is); softmax turns a row of scores into weights summing to
    1, and the output is that weighted mean of the values. Causal: position t sees positions <= t only."""
    T = q.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)  # True above the diagonal
    weights = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # exp(-inf) = 0: no weight there
    return weights @ v  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    """Each token attends to itself and the tokens before it, in n_head heads at once (causal_attention)."""

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

    def forward(self, x, cache=None, layer=0):
        """x (B, T, C). cache: while generating, a KVCache (defined further down) holding the keys and values
        of the tokens already seen, in the slot of block number `layer`; None in training."""
        B, T, C = x.size()  # batch, sequence length, embedding width (n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs), nh heads of hs dimensions: the heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            # flash attention on GPU: the (T, T) attention matrix is never materialised
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            # generation: the keys/values of earlier tokens are remembered, only new tokens are computed. Not
            # is_causal=True: that mask is for T queries over the same T keys, and these T new queries come
            # after the cached keys, so their mask is shifted (KVCache.attend makes it)
            y = cache.attend(layer, q, k, v)  # (B, nh, T, hs)
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
    """Pre-LayerNorm transformer block: x + attn(ln(x)), [x + xattn(ln(x), image)], x + mlp(ln(x))."""

    def __init__(self, config, cross_attn=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        if cross_attn:  # a captioner's block (CrossAttention is defined after the model: GPT-2 comes first)
            self.ln_x = nn.LayerNorm(config.n_embd)
            self.xattn = CrossAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, image_kv=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        if image_kv is not None:  # no image: the block is a plain GPT-2 block
            x = x + self.xattn(self.ln_x(x), image_kv)
        x = x + self.mlp(self.ln_2(x))
        return x


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
    dropout: float = 0.0  # GPT-2 used 0.1; 0 here, as in build-nanogpt: one epoch has no overfitting to fight

    def has_cross_attn(self, layer):
        return self.cross_attn_every > 0 and (layer + 1) % self.cross_attn_every == 0


# presets: overrides of the defaults above; the four sizes OpenAI released, and one for CPU smoke runs
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
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
            # image tokens come in at the encoder's width; one shared projection brings them to n_embd,
            # then each cross-attention layer makes its own keys and values from them. The LayerNorm gives them
            # the scale of the LayerNorm'd text the queries come from, whatever the encoder's output scale
            self.transformer.img_proj = nn.Linear(config.n_embd_img, config.n_embd)
            self.transformer.ln_img = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input embedding and the output classifier are one matrix (as in GPT-2);
        # it saves 38M parameters at 124M and the two roles help each other learn
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        self.compiled_step = None  # generation only: see compile_decode_step

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02  # GPT-2's initializer_range, near Xavier's 1/sqrt(768) = 0.036
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
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are left out by default (the token embeddings stay:
        they are also the lm_head, which does real work)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, image_feats=None, cache=None):
        """idx: (B, T) token ids; targets: (B, T), -1 where no loss is wanted (padding, prompt tokens);
        image_feats: (B, N_img, n_embd_img) image tokens, any N_img; cache: a KVCache while generating.
        Returns (logits (B, T, vocab_size), loss or None)."""
        logits = self.logits(self.hidden_states(idx, image_feats, cache))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            # ignore_index=-1: positions whose target is -1 add nothing to the loss or to its average.
            # (under bf16 autocast, cross_entropy runs in fp32 by itself)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, image_feats=None, cache=None):
        """(B, T) token ids -> (B, T, n_embd): the transformer up to and including the final LayerNorm."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        image_kv = self.image_keys_values(image_feats, cache)  # one (k, v) per cross-attention block
        for layer, block in enumerate(self.transformer.h):
            x = block(x, image_kv[layer] if image_kv else None, cache, layer)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def logits(self, x):
        """(..., n_embd) -> (..., vocab_size) logits, the padding entries at -inf."""
        logits = self.lm_head(x)
        if self.config.vocab_size > GPT2_VOCAB_SIZE:
            # The padding rows are not tokens. With weights loaded from GPT-2 they are zero, so their logit
            # would be 0 while real logits sit far below it: that would swallow the softmax. -inf keeps them
            # out of every loss and every sample, whatever their weights.
            logits[..., GPT2_VOCAB_SIZE:] = float("-inf")
        return logits

    def next_token_logits(self, idx, image_feats=None, cache=None):
        """(B, T) -> (B, GPT2_VOCAB_SIZE) fp32 logits of the token that follows each row. Only the last
        position goes through lm_head: at 124M that matmul (768 x 50304) holds a third of the weights, and
        the other positions' logits would be thrown away."""
        if self.compiled_step is not None and cache is not None and cache.pos > 0 and idx.size(1) == 1:
            return self.compiled_step(idx, cache)  # one new token after the prompt: the compiled step
        x = self.hidden_states(idx, image_feats, cache)[:, -1]  # (B, C)
        return self.logits(x)[:, :GPT2_VOCAB_SIZE].float()

    def image_keys_values(self, image_feats, cache=None):
        """Project the image tokens once, then give every cross-attention block its keys and values.
        While generating, they are computed on the first step and kept in the cache: the image is fixed."""
        if cache is not None and cache.image_kv is not None:
            return cache.image_kv
        if image_feats is None:
            return None
        if self.config.cross_attn_every == 0:
            raise ValueError("image_feats given, but this model has no cross-attention layers (cross_attn_every=0)")
        if image_feats.size(-1) != self.config.n_embd_img:
            raise ValueError(f"image_feats are {image_feats.size(-1)} wide, the model expects "
                             f"n_embd_img={self.config.n_embd_img}")
        image_feats = image_feats.to(self.transformer.img_proj.weight.dtype)  # features are stored in fp16
        image_embs = self.transformer.ln_img(self.transformer.img_proj(image_feats))  # (B, N, C)
        image_kv = [block.xattn.image_keys_values(image_embs) if hasattr(block, "xattn") else None
                    for block in self.transformer.h]
        if cache is not None:
            cache.image_kv = image_kv
        return image_kv

    def configure_optimizers(self, weight_decay, learning_rate, device_type, betas=(0.9, 0.95), lm_lr_scale=1.0,
                             muon_lr=None):
        """AdamW over the parameters that train (requires_grad). Matrices (embeddings, linear weights) get
        weight decay; biases and LayerNorm gains do not: shrinking those towards 0 only hurts.
        A captioner's new cross-attention layers and its pretrained GPT-2 weights (when those train too) go in
        separate groups: the training loop sets each group's rate to the schedule's x its "lr_scale", so the
        pretrained weights can move at lm_lr_scale of the new layers' rate. A plain GPT-2 has one kind.

        muon_lr: the matrices inside the blocks (attention and MLP projections) go to Muon instead, at this
        peak rate; the rest stays with AdamW (see muon_and_adamw)."""
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        groups = []
        for new_layers, lr_scale in ((True, 1.0), (False, lm_lr_scale)):
            params = [p for name, p in trainable if is_cross_attn_param(name) == new_layers]
            if params:
                groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": lr_scale},
                           {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": lr_scale}]
        # the fused kernel updates all parameters in one launch instead of a loop of small ones
        fused = device_type == "cuda"
        # betas (0.9, 0.95) and eps 1e-8: GPT-3's Adam settings (its appendix B). beta2 0.95 rather than
        # PyTorch's 0.999: the second-moment estimate adapts faster, steadier for large transformers
        if muon_lr is not None:
            return muon_and_adamw(trainable, groups, weight_decay, learning_rate, muon_lr, betas, fused)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=1e-8, fused=fused)

    def flops_per_token(self, seq_len):
        """Model FLOPs of one training token (forward + backward), the PaLM paper's estimate: 6 per
        parameter (a multiply-add is 2 FLOPs in the forward pass, twice that in the backward), plus the
        attention matmuls, which grow with the sequence length: q k^T and weights @ v are each 2 x T x C
        per token and layer forward, x3 with the backward: 12 x T x C."""
        cfg = self.config
        attention = 12 * cfg.n_layer * cfg.n_embd * seq_len
        return 6 * self.num_params() + attention

    # -------------------------------------------------------------------------
    # Loading and saving weights

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """OpenAI's GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', from the Hugging Face hub) or a
        local folder with a GPT-2 config.json + model.safetensors (what transformers' save_pretrained
        writes). Overrides such as cross_attn_every=2 add freshly initialised cross-attention on top."""
        config_path, weights_path = _gpt2_files(name_or_path)
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
        model.load_weights(_convert_gpt2_weights(load_file(weights_path), config), weights_path)
        return model

    def save_pretrained(self, folder, language_model_only=False):
        """The mirror of from_pretrained: write folder/config.json and folder/model.safetensors in Hugging
        Face's GPT-2 format (its parameter names and Conv1D layouts), which transformers'
        GPT2LMHeadModel.from_pretrained loads, and so the tools built on it (lm-evaluation-harness, the hub).
        Written with safetensors and json alone: transformers is not needed here.
        Hugging Face's GPT-2 has no cross-attention, so a captioner is refused unless language_model_only=True,
        which writes its text decoder and leaves the cross-attention layers and image projection out."""
        if self.config.cross_attn_every > 0 and not language_model_only:
            raise ValueError("this model has cross-attention layers, which Hugging Face's GPT-2 has no place for; "
                             "pass language_model_only=True to save its language model without them")
        if self.config.vocab_size < GPT2_VOCAB_SIZE:
            raise ValueError(f"vocab_size {self.config.vocab_size}: Hugging Face's GPT-2 has {GPT2_VOCAB_SIZE} tokens")
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(_hf_gpt2_config(self.config), f, indent=2)
        # "format": "pt" tells transformers these are PyTorch tensors (it refuses a file without the tag)
        save_file(_to_hf_gpt2_weights(self.state_dict()), os.path.join(folder, "model.safetensors"),
                  metadata={"format": "pt"})

    @classmethod
    def from_checkpoint(cls, path, kind=None, **overrides):
        """A checkpoint written by train_gpt2.py ('lm') or train_caption.py ('caption') -> (model, checkpoint).
        Overrides (e.g. cross_attn_every=2 on an 'lm' checkpoint) add fresh layers as in from_pretrained."""
        checkpoint = load_checkpoint(path, kind)
        try:
            config = GPTConfig(**{**checkpoint["config"], **overrides})
        except TypeError as e:
            raise ValueError(f"{path}: config does not fit this model.py ({e})") from None
        model = cls(config)
        model.load_weights(checkpoint["model"], path)
        return model, checkpoint

    def load_weights(self, state_dict, source):
        """Load a state dict strictly, except that cross-attention layers absent from it (a language model
        being turned into a captioner) keep their fresh initialisation. Mismatches name the file."""
        missing, unexpected = [], []
        own = self.state_dict()
        for name in own:
            if name not in state_dict and not is_cross_attn_param(name):
                missing.append(name)
        unexpected = [name for name in state_dict if name not in own]
        wrong_shape = [f"{name} {tuple(state_dict[name].shape)} vs {tuple(own[name].shape)}"
                       for name in state_dict if name in own and state_dict[name].shape != own[name].shape]
        for problem, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if names:
                more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
                raise ValueError(f"{source}: weights do not fit the model: {problem} {', '.join(names[:3])}{more}")
        self.load_state_dict(state_dict, strict=False)

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, image_feats=None,
                 generator=None, use_cache=True):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens. temperature=0 is greedy decoding
        (the likeliest token every time; top_k and top_p then change nothing), as in sample_next_token.
        A row that emits <|endoftext|> is finished and padded with it; generation stops when all rows are.
        Returns (B, T + n) with n <= max_new_tokens. use_cache=False recomputes the whole prefix at every
        step (the slow reference the KV cache is tested against)."""
        new_tokens = self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, image_feats, generator,
                                          use_cache)
        return torch.cat([idx, *new_tokens], dim=1)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, image_feats=None,
                        generator=None, use_cache=True):
        """generate(), one step at a time: yields each step's new tokens, (B, 1), as soon as they are chosen
        (to show text as it is written, or to time every step as bench.py generate does)."""
        self._check_lengths(idx, max_new_tokens)
        check_sampling(temperature, top_k, top_p)
        B, T = idx.size()
        cache = self.new_cache(B, T + max_new_tokens) if use_cache else None
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        tokens, new_input = idx, idx
        for _ in range(max_new_tokens):
            logits = self.next_token_logits(new_input if use_cache else tokens, image_feats, cache)  # (B, V)
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            next_token = next_token.masked_fill(finished[:, None], EOT_TOKEN)
            yield next_token
            if not use_cache:
                tokens = torch.cat([tokens, next_token], dim=1)
            finished |= next_token[:, 0] == EOT_TOKEN
            if finished.all():
                break
            new_input = next_token

    @torch.no_grad()
    def beam_search(self, idx, image_feats=None, beam_size=3, max_new_tokens=30, length_penalty=1.0):
        """Batched beam search: for each row of idx (B, T), keep the beam_size most likely continuations,
        and return the best finished one per row (a list of B token lists, without <|endoftext|>), ranked
        by log-probability / length**length_penalty so that short captions are not favoured unfairly."""
        self._check_lengths(idx, max_new_tokens)
        if beam_size < 1:
            raise ValueError(f"beam_size {beam_size}: must be at least 1 (1 is greedy decoding)")
        B, T = idx.size()
        K, V = beam_size, GPT2_VOCAB_SIZE
        device = idx.device
        # every row becomes K beams: (B*K, T); the first step expands only beam 0 (the others start at -inf)
        idx = idx.repeat_interleave(K, dim=0)
        if image_feats is not None:
            image_feats = image_feats.repeat_interleave(K, dim=0)
        scores = torch.full((B, K), float("-inf"), device=device)
        scores[:, 0] = 0.0  # summed log-probabilities of each live beam
        beams = torch.empty(B, K, 0, dtype=torch.long, device=device)  # generated tokens of each beam
        best_score = torch.full((B,), float("-inf"), device=device)  # best finished hypothesis per row
        best_tokens = [[] for _ in range(B)]
        cache = self.new_cache(B * K, T + max_new_tokens)
        new_input = idx
        for step in range(1, max_new_tokens + 1):
            logits = self.next_token_logits(new_input, image_feats, cache)  # (B*K, V)
            logprobs = F.log_softmax(logits, dim=-1).view(B, K, V)
            # 1) ending each live beam here is a finished hypothesis of length `step` (its <|endoftext|> counts)
            ended = (scores + logprobs[:, :, EOT_TOKEN]) / step ** length_penalty  # (B, K)
            self._keep_best(ended, beams, best_score, best_tokens)
            # 2) the K best ways to go on (without ending) become the new live beams
            logprobs[:, :, EOT_TOKEN] = float("-inf")
            candidates = (scores[:, :, None] + logprobs).view(B, K * V)
            scores, flat = candidates.topk(K, dim=-1)  # (B, K)
            parent, token = flat // V, flat % V
            parent_beams = beams.gather(1, parent[:, :, None].expand(-1, -1, beams.size(2)))  # (B, K, step-1)
            beams = torch.cat([parent_beams, token[:, :, None]], dim=2)  # (B, K, step)
            cache.reorder((torch.arange(B, device=device)[:, None] * K + parent).view(-1))
            new_input = token.view(B * K, 1)
            # stop when no live beam can still beat the best finished one: raw scores only fall, and the
            # length normalisation can lift them at most to score / (longest length)**length_penalty
            if (best_score >= scores.max(dim=1).values / max_new_tokens ** length_penalty).all():
                break
        # beams still alive at the length limit compete too; their length has no <|endoftext|> to count
        self._keep_best(scores / beams.size(2) ** length_penalty, beams, best_score, best_tokens)
        return best_tokens

    def new_cache(self, batch_size, max_len):
        """A KVCache for max_len tokens of batch_size rows: a new one, or the compiled step's own for that shape."""
        if self.compiled_step is not None:
            return self.compiled_step.cache(batch_size, max_len)
        return KVCache(max_len)

    def decode_step(self, token, cache):
        """One new token per row with shapes that never change, what CompiledDecodeStep compiles: token (B, 1),
        written at position cache.position (a (1,) tensor), -> (B, GPT2_VOCAB_SIZE) fp32 logits. The same as
        next_token_logits, but for attention: each layer attends over its whole cache buffer,
        (B, nh, max_len, hs), under a mask of the positions written (KVCache._attend_fixed_shape), rather
        than over the part written so far, whose length grows by one every step."""
        x = self.transformer.wte(token) + self.transformer.wpe(cache.position)  # (B, 1, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache.image_kv[layer] if cache.image_kv else None, cache, layer)
        return self.logits(self.transformer.ln_f(x)[:, -1])[:, :GPT2_VOCAB_SIZE].float()  # (B, V)

    def compile_decode_step(self, backend="inductor"):
        """From now on generate() and beam_search() run their one-token steps through torch.compile (the
        prompt still runs eagerly): see CompiledDecodeStep, which this returns. Call it once the model is on
        its device; the first step of each (batch size, length) compiles, which takes tens of seconds."""
        self.compiled_step = CompiledDecodeStep(self, backend)
        return self.compiled_step

    def _check_lengths(self, idx, max_new_tokens):
        """Refuse what would give nothing, or run past the position embeddings, rather than return it quietly."""
        T = idx.size(1)
        if T < 1:
            raise ValueError("the prompt has no tokens: start each row with at least one (<|endoftext|> for none)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens}: must be at least 1")
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                             f"{self.config.block_size}")

    @staticmethod
    def _keep_best(normalized_scores, beams, best_score, best_tokens):
        """Per row, the best of the K hypotheses scored (B, K) replaces best_tokens[b] if it beats best_score[b]."""
        top_score, top_beam = normalized_scores.max(dim=1)  # (B,)
        improved = (top_score > best_score).nonzero().flatten().tolist()
        for b in improved:
            best_score[b] = top_score[b]
            best_tokens[b] = beams[b, top_beam[b]].tolist()


# -----------------------------------------------------------------------------
# Cross-attention: what the captioner adds to GPT-2


class CrossAttention(nn.Module):
    """Text queries attend to image tokens. No causal mask: every caption position may look at every patch."""

    def __init__(self, config):
        super().__init__()
        self.c_q = nn.Linear(config.n_embd, config.n_embd)
        self.c_kv = nn.Linear(config.n_embd, 2 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        # Zero-initialised output: the layer adds exactly 0.0 to the residual stream until it is trained,
        # so a pretrained LM keeps its logits bit for bit when cross-attention is bolted on. Unlike a tanh
        # gate starting at 0 (which moves by ~lr per Adam step and opens slowly), these weights all learn.
        self.c_proj.ZERO_INIT = True
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.recorded = None  # a list inside recording_cross_attention(): the attention weights go there

    def image_keys_values(self, image_embs):
        B, N, C = image_embs.size()  # N image tokens, already projected to n_embd
        k, v = self.c_kv(image_embs).split(C, dim=2)
        k = k.view(B, N, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, N, hs)
        v = v.view(B, N, self.n_head, C // self.n_head).transpose(1, 2)
        return k, v

    def forward(self, x, image_kv):
        B, T, C = x.size()
        k, v = image_kv
        q = self.c_q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.recorded is not None:  # only when asked: SDPA's fused kernels never form the weights
            self.recorded.append(attention_weights(q, k))
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


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
    layer and pass, computed from the very q and k the layer uses (see attention_weights). Outside the block
    they are never computed: training and generation do not need them. (sample.py draws them.)"""
    weights = []
    layers = [block.xattn for block in model.transformer.h if hasattr(block, "xattn")]
    for layer in layers:
        layer.recorded = weights
    try:
        yield weights
    finally:
        for layer in layers:
            layer.recorded = None


# -----------------------------------------------------------------------------
# Sampling and the KV cache, used by GPT.generate and GPT.beam_search


def check_sampling(temperature, top_k, top_p):
    """Refuse settings that would crash mid-generation or quietly do something else: a negative temperature
    turns the distribution upside down (the unlikeliest token becomes the likeliest), top_k=0 or top_p=0
    keeps no token at all."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature {temperature}: must be a finite number >= 0 (0 is greedy decoding)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k {top_k}: must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p}: must be in (0, 1]")


def until_end_of_text(tokens):
    """A generated row (a list) is the text, then <|endoftext|> (and more of them, as padding once it ended)."""
    return tokens[:tokens.index(EOT_TOKEN)] if EOT_TOKEN in tokens else tokens


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B, 1). temperature 0: argmax (the limit of ever lower temperatures,
    and the usual convention). top_k keeps the k likeliest tokens, top_p the smallest set whose probability
    reaches p (nucleus sampling); both cut the unreliable tail. The arguments are checked by check_sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # shifted so the best logit is 0 (softmax does not change): a tiny temperature such as 1e-40 then sends the
    # others to -inf instead of the best one to inf, and inf - inf inside softmax would be NaN
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each token
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # the top token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class KVCache:
    """Keys and values of every self-attention layer for the tokens seen so far, so each generation step
    computes only the newest token: O(T) work per step instead of O(T^2) for recomputing the prefix.

    One buffer per layer, (B, nh, max_len, hs), allocated on the first step and written in place: a step at
    token 900 costs what a step at token 10 does, but for attending over more keys. (Concatenating each step's
    keys onto the cache instead copies the whole cache every step: O(T^2) copying, and at batch 8 and 900 tokens
    up to 267 ms for a step that otherwise takes ~120 ms, issue 24.) Positions from pos on are not written yet.
    Also holds the image keys/values, computed on the first step and reused."""

    def __init__(self, max_len):
        self.max_len = max_len  # the prompt and every new token: generate() allocates exactly what it needs
        self.keys, self.values = {}, {}  # layer -> (B, nh, max_len, hs)
        self.pos = 0  # number of tokens cached
        self.image_kv = None
        # GPT.decode_step's steps (see CompiledDecodeStep): fixed_shape switches attend() to them, and their
        # position is a (1,) tensor, not a Python int, which a compiled graph would hold as a constant
        self.fixed_shape = False
        self.position = None

    def attend(self, layer, q, k, v):
        """Store the keys and values k, v (B, nh, T, hs) of T new tokens, then attend their queries q over
        every cached position up to their own -> (B, nh, T, hs)."""
        if self.fixed_shape:
            return self._attend_fixed_shape(layer, q, k, v)
        T = q.size(2)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions: {self.pos} cached + {T} new tokens do not fit")
        keys, values = self._buffers(layer, k)
        keys[:, :, self.pos:end] = k
        values[:, :, self.pos:end] = v
        keys, values = keys[:, :, :end], values[:, :, :end]  # (B, nh, end, hs): the part written so far
        if self.pos == 0:
            # a prompt on an empty cache: plain causal attention among its own tokens (the flash kernel's case)
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        if T == 1:
            # the single newest token may see everything before it: no mask at all
            return F.scaled_dot_product_attention(q, keys, values)
        # several new tokens after cached ones: new token i (at position pos + i) sees positions 0 .. pos + i
        query_pos = torch.arange(self.pos, end, device=q.device)[:, None]
        key_pos = torch.arange(end, device=q.device)[None, :]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=key_pos <= query_pos)  # mask (T, end)

    def _attend_fixed_shape(self, layer, q, k, v):
        """GPT.decode_step's attention: one new token (T = 1) written at self.position, and the whole buffer
        attended, (B, nh, max_len, hs), under a mask of the positions written so far. Every shape is the
        same at every step, so one compiled graph serves them all."""
        keys, values = self._buffers(layer, k)
        keys.index_copy_(2, self.position, k)  # (B, nh, 1, hs) into position `position` of (B, nh, max_len, hs)
        values.index_copy_(2, self.position, v)
        written = torch.arange(self.max_len, device=q.device)[None, :] <= self.position  # (1, max_len), True = attend
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=written)

    def _buffers(self, layer, k):
        """This layer's (keys, values) buffers, allocated on first use with k's batch, heads, width and dtype
        (bf16 under autocast). Zeros, not torch.empty: the positions not written yet are masked, but a NaN in
        leftover memory would still turn into NaN through the masked weight's 0 * NaN."""
        B, nh, _, hs = k.shape
        if layer not in self.keys or self.keys[layer].dtype != k.dtype:
            self.keys[layer] = k.new_zeros(B, nh, self.max_len, hs)
            self.values[layer] = k.new_zeros(B, nh, self.max_len, hs)
        keys = self.keys[layer]
        if keys.shape != (B, nh, self.max_len, hs):
            raise ValueError(f"KV cache holds {tuple(keys.shape)} (B, nh, max_len, hs); new keys are {tuple(k.shape)}")
        return keys, self.values[layer]

    def reorder(self, index):
        """Beam search: row i of the batch now continues the beam that was row index[i]. In place, over the
        positions written so far. The image keys/values stay as they are: beam search moves rows only among
        the beams of one image, which all hold that image's."""
        for layer in self.keys:
            for buffer in (self.keys[layer], self.values[layer]):
                buffer[:, :, :self.pos] = buffer[:, :, :self.pos][index]  # the gather copies before the write

    def reset(self):
        """Empty again, the buffers kept (CompiledDecodeStep reuses a cache: see there)."""
        self.pos = 0
        self.image_kv = None
        self.fixed_shape = False


class CompiledDecodeStep:
    """GPT.decode_step under torch.compile, used by generate() and beam_search() once GPT.compile_decode_step()
    was called; the prompt still runs eagerly (its length varies from call to call). A decoding step of a
    small model is a long chain of small operations, and eagerly each pays Python, dispatch and (on a GPU) a
    kernel launch; compiled, the step is a few fused kernels:
    - on CUDA, mode="reduce-overhead" records the step as a CUDA graph and replays it: no launch cost at all.
      A graph replays the memory addresses it was recorded with, so the cache of each (batch size, length)
      is kept and reused (its buffers never move) and the cache buffers are marked static;
    - on the CPU, inductor with weight freezing: the weights become constants of the graph, prepacked once
      into the layout the CPU's matmul library reads fastest. A frozen step keeps the weights it was compiled
      with: compile again after changing them.
    decode_step's shapes never change as generation goes on, so each (batch size, cache length) compiles once;
    `compiled` records them with the seconds the first step of each took (mostly the compile)."""

    def __init__(self, model, backend="inductor"):
        self.cuda = model.lm_head.weight.device.type == "cuda"
        mode = "reduce-overhead" if self.cuda and backend == "inductor" else None
        # freezing is read when the graph compiles, from inductor's config: torch.compile(options=...) is read
        # too late for it, and setting it for the whole process would also freeze the weights of any other
        # model compiled here under no_grad (a training run's evaluation). So only around this step's calls.
        self.freezing = not self.cuda and backend == "inductor"
        # dynamic=False: every new shape gets its own specialised graph, never a shape-generic one
        self.step = torch.compile(model.decode_step, backend=backend, mode=mode, dynamic=False, fullgraph=True)
        self.compiled = {}  # (batch size, max_len) -> seconds of the first step of that shape
        self.caches = {}  # (batch size, max_len) -> the KVCache reused for it (see above)

    def cache(self, batch_size, max_len):
        """The KVCache for a generation of this shape, emptied. One generation at a time per shape: two
        running at once (two generate_tokens iterators) would share it."""
        cache = self.caches.setdefault((batch_size, max_len), KVCache(max_len))
        cache.reset()
        return cache

    def __call__(self, token, cache):
        """token (B, 1), the next position in cache.pos -> (B, GPT2_VOCAB_SIZE) fp32 logits, as next_token_logits."""
        if cache.pos >= cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} positions is full")
        if cache.position is None:
            cache.position = torch.zeros(1, dtype=torch.long, device=token.device)
            if self.cuda:  # not on the CPU: freezing would take static inputs for weights, constants
                for tensor in [cache.position, *cache.keys.values(), *cache.values.values()]:
                    torch._dynamo.mark_static_address(tensor)  # a CUDA graph reads them where it recorded them
        cache.position.fill_(cache.pos)
        cache.fixed_shape = True  # the prompt was written eagerly; from here on every step is decode_step
        shape = (token.size(0), cache.max_len)
        started = time.perf_counter()
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer read
        with torch._inductor.config.patch(freezing=self.freezing):
            logits = self.step(token, cache)
        cache.pos += 1
        if shape not in self.compiled:
            self.compiled[shape] = time.perf_counter() - started
        return logits


# -----------------------------------------------------------------------------
# Weight files and checkpoints

CHECKPOINT_KINDS = ("lm", "caption")  # written by train_gpt2.py and train_caption.py
# GPT-2 was written in TensorFlow with "Conv1D" layers that store their weights as (in, out); nn.Linear
# stores (out, in), so these four are transposed on the way in, and back on the way out
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def muon_and_adamw(trainable, adamw_groups, weight_decay, learning_rate, muon_lr, betas, fused):
    """Muon for the 2-D weights inside the blocks, AdamW for everything else, stepped as one optimizer.

    Muon (momentum, then Newton-Schulz iterations that make the update matrix nearly orthogonal) suits the
    hidden layers' matmuls: every direction of a weight matrix gets a comparable step, however skewed the
    gradient is. It is not meant for the embedding table (a lookup: each row is updated by its own tokens;
    here it is also the tied lm_head) or for vectors (biases, LayerNorm gains), which AdamW keeps.
    adjust_lr_fn="match_rms_adamw" scales each update to the size an AdamW update would have (Moonshot's
    "Muon is Scalable": an orthogonalised (A, B) update has RMS ~1/sqrt(max(A, B)), so its rate is multiplied
    by 0.2 x sqrt(max(A, B)), 0.2 being a typical AdamW update's RMS): Muon's rate and weight decay then mean
    what AdamW's do. Its groups carry
    lr_scale = muon_lr / learning_rate, so the one schedule drives both optimizers."""
    hidden = {id(p) for name, p in trainable if p.dim() == 2 and ".h." in name and "wte" not in name}
    for group in adamw_groups:
        group["params"] = [p for p in group["params"] if id(p) not in hidden]
    adamw = torch.optim.AdamW([g for g in adamw_groups if g["params"]], lr=learning_rate, betas=betas, eps=1e-8,
                              fused=fused)
    muon = torch.optim.Muon([{"params": [p for _, p in trainable if id(p) in hidden],
                              "lr_scale": muon_lr / learning_rate}],
                            lr=muon_lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return Optimizers(adamw, muon)


class Optimizers:
    """Several optimizers used as one: what the training loop (param_groups, step, zero_grad) and checkpoints
    (state_dict, load_state_dict) ask of an optimizer, and torch.amp.GradScaler too."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state):
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)


def is_cross_attn_param(name):
    """The parameters a captioner adds to GPT-2: cross-attention layers, their LayerNorms, the image projection."""
    return ".xattn." in name or ".ln_x." in name or ".img_proj." in name or ".ln_img." in name


def _gpt2_files(name_or_path):
    """A local folder, or a model name on the Hugging Face hub -> (config.json, model.safetensors) paths."""
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


def _convert_gpt2_weights(hf_state_dict, config):
    """Hugging Face GPT-2 names/layouts -> ours: add the 'transformer.' prefix where missing (the hub's gpt2
    files were saved from GPT2Model, whose keys are 'h.0...'; GPT2LMHeadModel writes 'transformer.h.0...'),
    transpose the Conv1D weights, drop the causal-mask buffers, tie lm_head to wte, pad the vocabulary rows."""
    state_dict = {}
    for name, tensor in hf_state_dict.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # mask buffers we do not need; lm_head is wte (tied)
        name = name if name.startswith("transformer.") else "transformer." + name
        state_dict[name] = tensor.t().contiguous() if name.endswith(_CONV1D_WEIGHTS) else tensor
    wte = state_dict["transformer.wte.weight"]
    padding = wte.new_zeros(config.vocab_size - wte.size(0), wte.size(1))
    state_dict["transformer.wte.weight"] = torch.cat([wte, padding])
    state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    return state_dict


def _to_hf_gpt2_weights(state_dict):
    """Ours -> Hugging Face GPT-2 names/layouts, the inverse of _convert_gpt2_weights: the Conv1D weights
    transposed back to (in, out), the vocabulary cut to GPT-2's 50257 rows (the padding rows are no tokens),
    lm_head left out (it is wte: transformers ties the two again on loading, as tie_word_embeddings says),
    and the captioner's cross-attention parameters left out."""
    hf_state_dict = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" or is_cross_attn_param(name):
            continue
        if name.endswith(_CONV1D_WEIGHTS):
            tensor = tensor.t()
        if name == "transformer.wte.weight":
            tensor = tensor[:GPT2_VOCAB_SIZE]
        # safetensors writes each tensor's own memory: a contiguous CPU copy, shared with no other tensor
        hf_state_dict[name] = tensor.detach().cpu().contiguous().clone()
    return hf_state_dict


def _hf_gpt2_config(config):
    """Our config -> the config.json of a Hugging Face GPT-2 (the fields of transformers' GPT2Config that
    describe this architecture; the rest keep transformers' defaults)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": GPT2_VOCAB_SIZE,  # the real tokens: our padding rows are not written
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # None means 4 * n_embd, our MLP's width
        "activation_function": "gelu_new",  # transformers' name for the tanh approximation of GELU (our MLP's)
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which we use
        "resid_pdrop": config.dropout,  # our one dropout rate is used in all three places
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,  # GPT._init_weights's std, for anyone training the export further
        "scale_attn_weights": True,  # scores / sqrt(head size), as F.scaled_dot_product_attention does
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,  # lm_head is wte
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "use_cache": True,
    }


def load_checkpoint(path, kind=None):
    """Read a checkpoint of this codebase onto the CPU, checking it is one, and of the expected kind.
    Every error names the file: a wrong path, a truncated file, some other .pt, an LM where a captioner
    was expected."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    # mmap: the tensors stay in the file and are paged in as they are used, so 8 ranks resuming a large model
    # share the file's pages in the OS cache instead of each reading a private copy into host RAM. (The map is
    # copy-on-write: changing a loaded tensor never changes the file; and save_checkpoint replaces a file by
    # renaming, never rewrites it in place under a reader.)
    # Only torch.save's zip format can be mapped; anything else (the pre-1.6 format, a truncated file, not a
    # checkpoint at all) is read whole, which loads the old format and gives the true reason for the others.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        reason = str(e).splitlines()[0][:120] if str(e).strip() else "no message"  # an empty file's has none
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or not {"kind", "model", "config"} <= checkpoint.keys():
        raise ValueError(f"{path}: not a checkpoint of this codebase (needs the keys kind, model, config)")
    if kind is not None and checkpoint["kind"] != kind:
        raise ValueError(f"{path}: is a '{checkpoint['kind']}' checkpoint, expected '{kind}'")
    return checkpoint

