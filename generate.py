"""
Generation with a trained GPT (model.py): functions over a model, nothing the model needs for training.

Read it top to bottom: choosing the next token (greedy, temperature, top-k, top-p), the KV cache that makes
each new token cost one position instead of the whole prefix (and keeps a captioner's image keys and values),
beam search for captions, generate() for text and sampled captions, and last the compiled decoding step
(torch.compile) that beam_search() and generate() switch to once compile_decode_step(model) was called.

    from generate import generate, beam_search
    tokens = generate(model, prompt, max_new_tokens=40, temperature=0.8, top_k=50)  # (B, T + n)
"""

import math
import time

import tiktoken
import torch
from torch.nn import functional as F

from model import EOT_TOKEN, GPT2_VOCAB_SIZE


def gpt2_encoding():
    """GPT-2's BPE tokenizer (tiktoken). Its files come from OpenAI's blob store on first use, then from a cache:
    offline, with no cache, that is a ValueError in one line saying what to set, not a traceback from requests."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cached files: the set-up's to fix, not a bug
        raise ValueError(f"cannot load GPT-2's BPE files ({type(e).__name__}); offline? copy them to a folder "
                         "and set TIKTOKEN_CACHE_DIR to it (docs/pretraining.md)") from None

# -----------------------------------------------------------------------------
# Choosing the next token


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


def until_end_of_text(tokens):
    """A generated row (a list) is the text, then <|endoftext|> (and more of them, as padding once it ended)."""
    return tokens[:tokens.index(EOT_TOKEN)] if EOT_TOKEN in tokens else tokens


# -----------------------------------------------------------------------------
# The KV cache


class KVCache:
    """Keys and values of every self-attention layer for the tokens seen so far, so each generation step
    computes only the newest token: O(T) work per step instead of O(T^2) for recomputing the prefix.

    One buffer per layer, (B, nh, max_len, hs), allocated on the first step and written in place: a step at
    token 900 costs what a step at token 10 does, but for attending over more keys. (Concatenating each step's
    keys onto the cache instead copies the whole cache every step: O(T^2) copying, and at batch 8 and 900 tokens
    up to 267 ms for a step that otherwise takes ~120 ms, measured for 124M on this project's 2-core CPU.)
    Positions from pos on are not written yet. Also holds the image keys/values, computed on the first step and
    reused: the image does not change."""

    def __init__(self, max_len):
        self.max_len = max_len  # the prompt and every new token: generate() allocates exactly what it needs
        self.keys, self.values = {}, {}  # layer -> (B, nh, max_len, hs)
        self.pos = 0  # number of tokens cached
        self.image_kv = None
        # decode_step's steps (see CompiledDecodeStep): fixed_shape switches attend() to them, and their
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
        # Several new tokens after cached ones. Not is_causal=True: that mask is for T queries over the same T
        # keys, and these T queries come after the cached keys, so their mask is shifted: new token i (at
        # position pos + i) sees positions 0 .. pos + i
        query_pos = torch.arange(self.pos, end, device=q.device)[:, None]
        key_pos = torch.arange(end, device=q.device)[None, :]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=key_pos <= query_pos)  # mask (T, end)

    def _attend_fixed_shape(self, layer, q, k, v):
        """decode_step's attention: one new token (T = 1) written at self.position, and the whole buffer
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


class LayerCache:
    """What one self-attention layer sees of the cache: its attend(q, k, v) (model.CausalSelfAttention's one
    call into generation) stores k, v in this layer's slot and attends over all of them."""

    def __init__(self, cache, layer):
        self.cache, self.layer = cache, layer

    def attend(self, q, k, v):
        return self.cache.attend(self.layer, q, k, v)


def hidden_states(model, idx, image_feats=None, cache=None):
    """GPT.forward up to the final LayerNorm, continuing after the cache.pos tokens the cache holds: idx (B, T)
    are the new tokens, at positions cache.pos ... cache.pos + T - 1 -> (B, T, n_embd). The image keys/values
    are computed on the first call and kept in the cache. cache=None: a plain pass (the slow reference)."""
    B, T = idx.size()
    start = cache.pos if cache is not None else 0
    if start + T > model.config.block_size:
        raise ValueError(f"sequence of {start + T} tokens is longer than block_size {model.config.block_size}")
    pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
    x = model.transformer.drop(model.transformer.wte(idx) + model.transformer.wpe(pos))  # (B, T, C)
    if cache is None:
        image_kv = model.image_keys_values(image_feats)
    else:
        if cache.image_kv is None:
            cache.image_kv = model.image_keys_values(image_feats)
        image_kv = cache.image_kv
    for layer, block in enumerate(model.transformer.h):
        x = block(x, image_kv[layer] if image_kv else None, LayerCache(cache, layer) if cache is not None else None)
    if cache is not None:
        cache.pos += T
    return model.transformer.ln_f(x)


def next_token_logits(model, idx, image_feats=None, cache=None):
    """(B, T) -> (B, GPT2_VOCAB_SIZE) fp32 logits of the token that follows each row. Only the last
    position goes through lm_head: at 124M that matmul (768 x 50304) holds a third of the weights, and
    the other positions' logits would be thrown away. Slicing to GPT-2's 50257 leaves out the padding rows."""
    step = getattr(model, "compiled_step", None)  # set by compile_decode_step(model)
    if step is not None and cache is not None and cache.pos > 0 and idx.size(1) == 1:
        return step(idx, cache)  # one new token after the prompt: the compiled step
    x = hidden_states(model, idx, image_feats, cache)[:, -1]  # (B, C)
    return model.lm_head(x)[:, :GPT2_VOCAB_SIZE].float()


def new_cache(model, batch_size, max_len):
    """A KVCache for max_len tokens of batch_size rows: a new one, or the compiled step's own for that shape."""
    step = getattr(model, "compiled_step", None)
    return step.cache(batch_size, max_len) if step is not None else KVCache(max_len)


# -----------------------------------------------------------------------------
# Beam search (a captioner's default decoding) and generate() (text, and sampled or greedy captions)


def check_lengths(model, idx, max_new_tokens):
    """Refuse what would give nothing, or run past the position embeddings, rather than return it quietly."""
    T = idx.size(1)
    if T < 1:
        raise ValueError("the prompt has no tokens: start each row with at least one (<|endoftext|> for none)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens}: must be at least 1")
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                         f"{model.config.block_size}")


@torch.no_grad()
def beam_search(model, idx, image_feats=None, beam_size=3, max_new_tokens=30, length_penalty=1.0):
    """Batched beam search: for each row of idx (B, T), keep the beam_size most likely continuations,
    and return the best finished one per row (a list of B token lists, without <|endoftext|>), ranked
    by log-probability / length**length_penalty. The default 1 ranks by the mean log-probability per token,
    so that short captions are not favoured unfairly (0: the raw sum, which favours short ones; below 0 favours
    them even more); caption_eval.py --length-penalty sweeps it on val."""
    check_lengths(model, idx, max_new_tokens)
    if beam_size < 1:
        raise ValueError(f"beam_size {beam_size}: must be at least 1 (1 is greedy decoding)")
    B, T = idx.size()
    K, V = beam_size, GPT2_VOCAB_SIZE
    device = idx.device
    # every row becomes K beams: (B*K, T); the first step expands only beam 0 (the others start at -inf). The
    # image is copied to each of its K beams too (not expanded): the model and the cache then see one plain
    # batch of B*K rows, at the cost of K copies of the image keys/values
    idx = idx.repeat_interleave(K, dim=0)
    if image_feats is not None:
        image_feats = image_feats.repeat_interleave(K, dim=0)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # summed log-probabilities of each live beam
    beams = torch.empty(B, K, 0, dtype=torch.long, device=device)  # generated tokens of each beam
    best_score = torch.full((B,), float("-inf"), device=device)  # best finished hypothesis per row
    best_tokens = [[] for _ in range(B)]
    cache = new_cache(model, B * K, T + max_new_tokens)
    new_input = idx
    for step in range(1, max_new_tokens + 1):
        logits = next_token_logits(model, new_input, image_feats, cache)  # (B*K, V)
        logprobs = F.log_softmax(logits, dim=-1).view(B, K, V)
        # 1) ending each live beam here is a finished hypothesis of length `step` (its <|endoftext|> counts); at
        # step 1 that is the empty caption, kept only if the model prefers it to every longer one found
        ended = (scores + logprobs[:, :, EOT_TOKEN]) / step ** length_penalty  # (B, K)
        keep_best_hypotheses(ended, beams, best_score, best_tokens)
        # 2) the K best ways to go on (without ending) become the new live beams
        logprobs[:, :, EOT_TOKEN] = float("-inf")
        candidates = (scores[:, :, None] + logprobs).view(B, K * V)
        scores, flat = candidates.topk(K, dim=-1)  # (B, K)
        parent, token = flat // V, flat % V
        parent_beams = beams.gather(1, parent[:, :, None].expand(-1, -1, beams.size(2)))  # (B, K, step-1)
        beams = torch.cat([parent_beams, token[:, :, None]], dim=2)  # (B, K, step)
        cache.reorder((torch.arange(B, device=device)[:, None] * K + parent).view(-1))
        new_input = token.view(B * K, 1)
        # Stop early when no live beam can still beat the best finished one. Raw scores (sums of
        # log-probabilities, <= 0) only fall as a beam grows, and before the last step a live beam ends at a
        # length of step + 1 to max_new_tokens. Its normalised score score / length**length_penalty is then
        # highest at the longest length when length_penalty >= 0, and at the shortest, step + 1, when it is
        # below 0 (length**length_penalty then shrinks as the length grows, pushing the score further down).
        # At the last step the loop ends anyway, and the beams still alive are scored below.
        best_length = max_new_tokens if length_penalty >= 0 else step + 1
        if step < max_new_tokens and (best_score >= scores.max(dim=1).values / best_length ** length_penalty).all():
            break
    else:  # the length limit, reached: beams still alive compete too; their length has no <|endoftext|> to count
        keep_best_hypotheses(scores / beams.size(2) ** length_penalty, beams, best_score, best_tokens)
    return best_tokens


def keep_best_hypotheses(normalized_scores, beams, best_score, best_tokens):
    """Per row, the best of the K hypotheses scored (B, K) replaces best_tokens[b] if it beats best_score[b]."""
    top_score, top_beam = normalized_scores.max(dim=1)  # (B,)
    improved = (top_score > best_score).nonzero().flatten().tolist()
    for b in improved:
        best_score[b] = top_score[b]
        best_tokens[b] = beams[b, top_beam[b]].tolist()


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, image_feats=None,
             generator=None, use_cache=True):
    """Continue each row of idx (B, T) by up to max_new_tokens tokens. temperature=0 is greedy decoding
    (the likeliest token every time; top_k and top_p then change nothing), as in sample_next_token.
    A row that emits <|endoftext|> is finished and padded with it; generation stops when all rows are.
    Returns (B, T + n) with n <= max_new_tokens. use_cache=False recomputes the whole prefix at every
    step (the slow reference the KV cache is tested against)."""
    new_tokens = generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, image_feats, generator,
                                 use_cache)
    return torch.cat([idx, *new_tokens], dim=1)


@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, image_feats=None,
                    generator=None, use_cache=True):
    """generate(), one step at a time: yields each step's new tokens, (B, 1), as soon as they are chosen
    (to show text as it is written, or to time every step as bench.py generate does)."""
    check_lengths(model, idx, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    B, T = idx.size()
    cache = new_cache(model, B, T + max_new_tokens) if use_cache else None
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    tokens, new_input = idx, idx
    for _ in range(max_new_tokens):
        logits = next_token_logits(model, new_input if use_cache else tokens, image_feats, cache)  # (B, V)
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        next_token = next_token.masked_fill(finished[:, None], EOT_TOKEN)
        yield next_token
        if not use_cache:
            tokens = torch.cat([tokens, next_token], dim=1)
        finished |= next_token[:, 0] == EOT_TOKEN
        if finished.all():
            break
        new_input = next_token


# -----------------------------------------------------------------------------
# The compiled decoding step


def decode_step(model, token, cache):
    """One new token per row with shapes that never change, what CompiledDecodeStep compiles: token (B, 1),
    written at position cache.position (a (1,) tensor), -> (B, GPT2_VOCAB_SIZE) fp32 logits. The same as
    next_token_logits, but for attention: each layer attends over its whole cache buffer,
    (B, nh, max_len, hs), under a mask of the positions written (KVCache._attend_fixed_shape), rather
    than over the part written so far, whose length grows by one every step."""
    x = model.transformer.wte(token) + model.transformer.wpe(cache.position)  # (B, 1, C)
    for layer, block in enumerate(model.transformer.h):
        x = block(x, cache.image_kv[layer] if cache.image_kv else None, LayerCache(cache, layer))
    return model.lm_head(model.transformer.ln_f(x)[:, -1])[:, :GPT2_VOCAB_SIZE].float()  # (B, V)


def compile_decode_step(model, backend="inductor"):
    """From now on generate() and beam_search() run the model's one-token steps through torch.compile (the
    prompt still runs eagerly): see CompiledDecodeStep, which this returns and keeps as model.compiled_step
    (set it to None to decode eagerly again). Call it once the model is on its device; the first step of
    each (batch size, length) compiles, which takes tens of seconds."""
    model.compiled_step = CompiledDecodeStep(model, backend)
    return model.compiled_step


class CompiledDecodeStep:
    """decode_step under torch.compile. A decoding step of a small model is a long chain of small operations,
    and eagerly each pays Python, dispatch and (on a GPU) a kernel launch; compiled, the step is a few fused
    kernels:
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
        self.step = torch.compile(lambda token, cache: decode_step(model, token, cache), backend=backend, mode=mode,
                                  dynamic=False, fullgraph=True)
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
