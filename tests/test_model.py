"""model.py against an independent GPT-2 (Hugging Face transformers), and the promises of cross-attention,
the KV cache, ignored targets and frozen parameters."""
import math

import pytest
import torch
import transformers  # test-only: the independent reference, installed by requirements-dev.txt

import generate as generate_module
import sample
from checkpoint import load_checkpoint, load_model
from generate import KVCache, beam_search, compile_decode_step, generate, hidden_states, next_token_logits
from model import EOT_TOKEN, GPT, GPT2_VOCAB_SIZE, PRESETS, GPTConfig
from sample import recording_cross_attention


SHAPES = [  # (n_layer, n_head, n_embd, n_positions): not only 124M's proportions
    (2, 2, 64, 64),
    (3, 4, 96, 128),
    (4, 3, 48, 32),
]


def save_random_hf_gpt2(tmp_path, n_layer, n_head, n_embd, n_positions, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                                     vocab_size=GPT2_VOCAB_SIZE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    # random init leaves biases and LayerNorms at 0/1: perturb them so a missed transpose or bias shows
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / f"hf_{n_layer}_{n_head}_{n_embd}"
    hf.save_pretrained(path)
    return hf, str(path)


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(tmp_path, shape):
    hf, path = save_random_hf_gpt2(tmp_path, *shape)
    ours = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, shape[3]))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert logits.shape == (2, shape[3], ours.config.vocab_size)
    assert (logits[..., :GPT2_VOCAB_SIZE] - expected).abs().max().item() <= 1e-4
    assert torch.isneginf(logits[..., GPT2_VOCAB_SIZE:]).all()  # padded rows can never be predicted


def test_loss_matches_transformers(tmp_path):
    hf, path = save_random_hf_gpt2(tmp_path, 2, 2, 64, 64)
    ours = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 33))
    with torch.no_grad():
        expected = hf(idx, labels=idx).loss  # transformers shifts the labels inside
        _, loss = ours(idx[:, :-1], targets=idx[:, 1:])
    assert abs(loss.item() - expected.item()) <= 1e-4


def test_greedy_generation_matches_transformers(tmp_path):
    hf, path = save_random_hf_gpt2(tmp_path, 3, 4, 96, 128, seed=1)
    ours = GPT.from_pretrained(path).eval()
    prompt = torch.randint(0, EOT_TOKEN, (1, 7))
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                           pad_token_id=EOT_TOKEN, attention_mask=torch.ones_like(prompt))
    # min_new_tokens keeps transformers going past <|endoftext|>; ours stops there, so compare up to it
    got = generate(ours, prompt, max_new_tokens=20, temperature=0)
    assert got.size(1) > prompt.size(1)
    assert torch.equal(got, expected[:, :got.size(1)])


def test_missing_weights_file_is_named(tmp_path):
    _, path = save_random_hf_gpt2(tmp_path, 2, 2, 64, 64)
    (tmp_path / "hf_2_2_64" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(path)


def test_cross_attention_starts_as_identity_then_learns(tmp_path):
    _, path = save_random_hf_gpt2(tmp_path, 4, 2, 64, 64)
    lm = GPT.from_pretrained(path).eval()
    captioner = GPT.from_pretrained(path, cross_attn_every=2, n_embd_img=32).eval()
    assert [hasattr(b, "xattn") for b in captioner.transformer.h] == [False, True, False, True]
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 10))
    images = torch.randn(2, 5, 32)
    with torch.no_grad():
        plain, _ = lm(idx)
        with_image, _ = captioner(idx, image_feats=images)
        without_image, _ = captioner(idx)
    assert torch.equal(plain, with_image)  # bit-identical, not merely close
    assert torch.equal(plain, without_image)

    # one optimisation step on the cross-attention parameters only wires the image in
    for name, p in captioner.named_parameters():
        p.requires_grad = ".xattn." in name or ".ln_x." in name or "img_proj" in name or "ln_img" in name
    optimizer = captioner.configure_optimizers(0.0, 1e-2, "cpu")
    captioner.train()
    _, loss = captioner(idx, targets=idx, image_feats=images)
    loss.backward()
    optimizer.step()
    captioner.eval()
    with torch.no_grad():
        a, _ = captioner(idx[:1], image_feats=images[:1])
        b, _ = captioner(idx[:1], image_feats=images[1:])
    assert (a - b)[..., :GPT2_VOCAB_SIZE].abs().max() > 1e-4


def tiny_captioner(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**PRESETS["tiny"], "block_size": 64}, cross_attn_every=2, n_embd_img=48)).eval()
    with torch.no_grad():  # open the zero-initialised cross-attention so the image matters
        for block in model.transformer.h:
            if hasattr(block, "xattn"):
                block.xattn.c_proj.weight.normal_(0, 0.5)
    return model


def test_written_out_attention_is_what_sdpa_computes():
    """model.causal_attention, the formula the reader sees, against the fused kernel the model runs."""
    from model import causal_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 7, 16).unbind(0)  # (B=2, nh=4, T=7, hs=16) each
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(causal_attention(q, k, v), fused, atol=1e-6)
    # causal: changing the last token's key and value changes no earlier position's output
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1], v2[:, :, -1] = 5.0, 5.0
    assert torch.equal(causal_attention(q, k2, v2)[:, :, :-1], causal_attention(q, k, v)[:, :, :-1])


def test_recorded_cross_attention_is_the_one_sdpa_used():
    """SDPA returns no weights: recording_cross_attention computes them from the same q and k. Multiplied by the
    values they give back what SDPA handed the output projection, and each sums to 1 over the image tokens."""
    model = tiny_captioner()
    values, outputs = [], []
    for block in model.transformer.h:
        if hasattr(block, "xattn"):
            block.xattn.register_forward_pre_hook(lambda module, args: values.append(args[1][1]))  # image_kv's v
            # c_proj's input is SDPA's output, the heads side by side: (B, T, C)
            block.xattn.c_proj.register_forward_pre_hook(lambda module, args: outputs.append(args[0]))
    idx, images = torch.randint(0, EOT_TOKEN, (2, 6)), torch.randn(2, 7, 48)
    with torch.no_grad(), recording_cross_attention(model) as weights:
        model(idx, image_feats=images)
    assert len(weights) == len(values) == len(outputs) == 2  # blocks 1 and 3
    for w, v, y in zip(weights, values, outputs):
        B, nh, T, N = w.shape
        assert (B, nh, T, N) == (2, 4, 6, 7)
        assert torch.allclose(w.sum(dim=-1), torch.ones(B, nh, T), atol=1e-6)
        assert torch.allclose((w @ v).transpose(1, 2).reshape(B, T, -1), y, atol=1e-6)


def test_attention_weights_are_computed_only_while_recording(monkeypatch):
    """Training and generation never form the (T, N_img) weights: SDPA's fused kernels are left to do their job."""
    model = tiny_captioner()
    idx, images = torch.randint(0, EOT_TOKEN, (2, 6)), torch.randn(2, 7, 48)
    with recording_cross_attention(model):
        pass  # switched on and off again
    monkeypatch.setattr(sample, "attention_weights", lambda q, k: pytest.fail("weights computed unasked"))
    _, loss = model(idx, targets=idx, image_feats=images)
    loss.backward()
    generate(model, idx, 3, temperature=0, image_feats=images)


@pytest.mark.parametrize("with_image", [False, True])
def test_kv_cache_equals_recomputation(with_image):
    model = tiny_captioner()
    prompt = torch.randint(0, EOT_TOKEN, (3, 5))
    images = torch.randn(3, 7, 48) if with_image else None
    fast = generate(model, prompt, 40, temperature=0, image_feats=images, use_cache=True)
    slow = generate(model, prompt, 40, temperature=0, image_feats=images, use_cache=False)
    assert torch.equal(fast, slow)
    if with_image:  # the image changes what is generated
        other = generate(model, prompt, 40, temperature=0, image_feats=images.flip(0), use_cache=True)
        assert not torch.equal(fast, other)


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_captioner()
    prompt = torch.full((4, 1), EOT_TOKEN)
    run = lambda seed, **kw: generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    # top_k=1 and a tiny top_p are both greedy decoding
    greedy = generate(model, prompt, 20, temperature=0)
    assert torch.equal(run(3, top_k=1), greedy)
    assert torch.equal(run(4, top_p=1e-6), greedy)


@pytest.mark.parametrize("options, message", [
    ({"temperature": -1.0}, "temperature -1.0"),  # would pick the unlikeliest tokens, silently
    ({"temperature": float("nan")}, "temperature nan"),
    ({"top_k": 0}, "top_k 0"),  # crashed in torch.topk
    ({"top_p": 0.0}, "top_p 0.0"),  # crashed in torch.multinomial: no token left
    ({"top_p": 1.5}, "top_p 1.5"),
    ({"max_new_tokens": 0}, "max_new_tokens 0"),  # returned the prompt alone
    ({"idx": torch.zeros(2, 0, dtype=torch.long)}, "no tokens"),
    ({"idx": torch.zeros(2, 60, dtype=torch.long)}, "exceeds block_size"),
])
def test_generate_refuses_bad_options(options, message):
    call = {"idx": torch.full((2, 1), EOT_TOKEN), "max_new_tokens": 5, **options}
    with pytest.raises(ValueError, match=message):
        generate(tiny_captioner(), **call)


@pytest.mark.parametrize("options, message", [
    ({"beam_size": 0}, "beam_size 0"),  # returned empty captions
    ({"max_new_tokens": 0}, "max_new_tokens 0"),
    ({"idx": torch.zeros(2, 0, dtype=torch.long)}, "no tokens"),
])
def test_beam_search_refuses_bad_options(options, message):
    call = {"idx": torch.full((2, 1), EOT_TOKEN), "max_new_tokens": 5, **options}
    with pytest.raises(ValueError, match=message):
        beam_search(tiny_captioner(), **call)


def test_temperature_zero_and_tiny_temperatures_are_greedy():
    from generate import sample_next_token
    logits = torch.randn(4, GPT2_VOCAB_SIZE) * 10
    greedy = logits.argmax(dim=-1, keepdim=True)
    assert torch.equal(sample_next_token(logits, temperature=0), greedy)
    # 1e-40 is below float32's smallest normal number: logits / 1e-40 overflowed to inf, and softmax gave NaN
    assert torch.equal(sample_next_token(logits, temperature=1e-40, generator=torch.Generator().manual_seed(0)),
                       greedy)


def test_generation_stops_each_row_at_end_of_text(monkeypatch):
    script = iter([[11, 21], [EOT_TOKEN, 22], [13, 23], [14, EOT_TOKEN], [15, 25]])  # row 0 ends at step 2, row 1 at 4
    monkeypatch.setattr(generate_module, "sample_next_token", lambda *a, **k: torch.tensor(next(script))[:, None])
    out = generate(tiny_captioner(), torch.tensor([[5], [7]]), 10, temperature=1.0)
    assert out.tolist() == [[5, 11, EOT_TOKEN, EOT_TOKEN, EOT_TOKEN], [7, 21, 22, 23, EOT_TOKEN]]


def test_beam_search_with_one_beam_ranks_the_greedy_prefixes():
    """With one beam, the live beam is the greedy path that never ends, and every prefix of it followed by
    <|endoftext|> is a finished hypothesis: the result is the best of those by normalised log-probability."""
    model = tiny_captioner(seed=2)
    images = torch.randn(2, 7, 48)
    for length_penalty in (0.0, 1.0):
        got = beam_search(model, torch.full((2, 1), EOT_TOKEN), images, beam_size=1, max_new_tokens=12,
                                length_penalty=length_penalty)
        for b in range(2):
            path = []  # greedy without <|endoftext|>, recomputing the whole prefix each step (no cache)
            for _ in range(12):
                logits, _ = model(torch.tensor([[EOT_TOKEN] + path]), image_feats=images[b:b + 1])
                logits = logits[0, -1, :GPT2_VOCAB_SIZE].clone()
                logits[EOT_TOKEN] = float("-inf")
                path.append(logits.argmax().item())
            hypotheses = [path[:n] for n in range(12)] + [path]  # ended after n tokens, or alive at the limit
            def normalised(tokens):
                length = len(tokens) + (len(tokens) < 12)
                return sequence_logprob(model, tokens, images[b:b + 1], 12) / length ** length_penalty
            best = max(hypotheses, key=normalised)
            assert got[b] == best


def test_wider_beam_finds_a_likelier_caption():
    model = tiny_captioner(seed=2)
    prompt = torch.full((3, 1), EOT_TOKEN)
    images = torch.randn(3, 7, 48)
    beam1 = beam_search(model, prompt, images, beam_size=1, max_new_tokens=12, length_penalty=0.0)
    beam4 = beam_search(model, prompt, images, beam_size=4, max_new_tokens=12, length_penalty=0.0)
    for b in range(3):
        one = sequence_logprob(model, beam1[b], images[b:b + 1], 12)
        four = sequence_logprob(model, beam4[b], images[b:b + 1], 12)
        assert four >= one - 1e-4


def sequence_logprob(model, tokens, image, max_new_tokens):
    """log p(tokens [+ EOT if it ended before the limit] | <|endoftext|>, image), computed without the cache."""
    ended = len(tokens) < max_new_tokens
    seq = [EOT_TOKEN] + tokens + ([EOT_TOKEN] if ended else [])
    idx = torch.tensor([seq])
    with torch.no_grad():
        logits, _ = model(idx[:, :-1], image_feats=image)
    logprobs = torch.log_softmax(logits[0, :, :GPT2_VOCAB_SIZE], dim=-1)
    return logprobs[torch.arange(len(seq) - 1), idx[0, 1:]].sum().item()


def test_ignored_targets_add_nothing_to_the_loss():
    model = tiny_captioner()
    idx = torch.randint(0, EOT_TOKEN, (2, 12))
    targets = torch.randint(0, EOT_TOKEN, (2, 12))
    masked = targets.clone()
    masked[:, :5] = -1
    _, loss = model(idx, targets=masked)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, logits.size(-1)), targets[:, 5:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)
    # changing an ignored target does not move the loss
    masked2 = masked.clone()
    masked2[:, :5] = 0
    masked2[:, :5] = -1
    assert model(idx, targets=masked2)[1].item() == loss.item()


def test_frozen_parameters_get_no_gradient_and_no_optimizer_slot():
    model = tiny_captioner()
    for name, p in model.named_parameters():
        p.requires_grad = ".xattn." in name
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable and len(trainable) > 0
    _, loss = model(torch.randint(0, EOT_TOKEN, (2, 8)), targets=torch.randint(0, EOT_TOKEN, (2, 8)),
                    image_feats=torch.randn(2, 3, 48))
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_checkpoint_round_trip_and_errors(tmp_path):
    from dataclasses import asdict
    model = tiny_captioner()
    path = tmp_path / "ckpt.pt"
    torch.save({"kind": "caption", "model": model.state_dict(), "config": asdict(model.config), "step": 3}, path)
    loaded, checkpoint = load_model(str(path), kind="caption")
    assert checkpoint["step"] == 3
    idx = torch.randint(0, EOT_TOKEN, (1, 6))
    assert torch.equal(model(idx)[0], loaded(idx)[0])

    with pytest.raises(ValueError, match=r"ckpt.pt: is a 'caption' checkpoint, expected 'lm'"):
        load_checkpoint(str(path), kind="lm")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.pt: not a readable checkpoint"):
        load_checkpoint(str(truncated))
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ValueError, match="other.pt: not a checkpoint of this codebase"):
        load_checkpoint(str(other))
    wrong_shape = tmp_path / "wide.pt"
    config = asdict(model.config) | {"n_embd": 64}
    torch.save({"kind": "caption", "model": model.state_dict(), "config": config}, wrong_shape)
    with pytest.raises(ValueError, match="wide.pt: weights do not fit the model: wrong shape"):
        load_model(str(wrong_shape))


def test_checkpoint_is_memory_mapped_not_read_into_ram(tmp_path):
    """8 ranks resuming a large model share the file's pages instead of each holding a copy: the tensors
    come back backed by the file itself (it shows in this process's memory maps)."""
    from dataclasses import asdict
    model = tiny_captioner()
    path = tmp_path / "mapped.pt"
    torch.save({"kind": "caption", "model": model.state_dict(), "config": asdict(model.config)}, path)
    checkpoint = load_checkpoint(str(path))
    with open("/proc/self/maps") as f:
        assert str(path) in f.read()
    assert torch.equal(checkpoint["model"]["lm_head.weight"], model.lm_head.weight)


def test_old_format_checkpoint_still_loads_and_errors_keep_their_reason(tmp_path):
    """The pre-zip format (torch < 1.6) cannot be memory-mapped: it is read whole rather than refused, and a
    file that is no zip at all gets its own reason, not mmap's complaint about the format."""
    from dataclasses import asdict
    model = tiny_captioner()
    path = tmp_path / "legacy.pt"
    torch.save({"kind": "caption", "model": model.state_dict(), "config": asdict(model.config)}, path,
               _use_new_zipfile_serialization=False)
    assert load_checkpoint(str(path), kind="caption")["kind"] == "caption"
    for name, content in (("text.pt", b"hello, not a checkpoint"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}: not a readable checkpoint") as error:
            load_checkpoint(str(tmp_path / name))
        assert "mmap" not in str(error.value) and "\n" not in str(error.value)


def test_lm_checkpoint_becomes_captioner_with_identical_logits(tmp_path):
    from dataclasses import asdict
    torch.manual_seed(0)
    lm = GPT(GPTConfig(**PRESETS["tiny"])).eval()
    path = tmp_path / "lm.pt"
    torch.save({"kind": "lm", "model": lm.state_dict(), "config": asdict(lm.config)}, path)
    captioner, _ = load_model(str(path), kind="lm", cross_attn_every=2)
    idx = torch.randint(0, EOT_TOKEN, (2, 9))
    assert torch.equal(lm(idx)[0], captioner.eval()(idx, image_feats=torch.randn(2, 50, 768))[0])


# -----------------------------------------------------------------------------
# The preallocated KV cache and the compiled decode step (issue 24)


class ConcatenatingKVCache:
    """The KV cache as it was before issue 24, kept as the reference for "the same tokens as before": each step's
    keys and values concatenated onto the cache (a copy of all of it every step), a mask built for every prompt,
    and beam search's reorder copying the image keys/values too."""

    def __init__(self, max_len):
        self.keys, self.values, self.pos, self.image_kv, self.fixed_shape = {}, {}, 0, None, False

    def attend(self, layer, q, k, v):
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        T = q.size(2)
        mask = None if T == 1 else torch.arange(k.size(2))[None, :] <= torch.arange(self.pos, self.pos + T)[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def reorder(self, index):
        for layer in self.keys:
            self.keys[layer], self.values[layer] = self.keys[layer][index], self.values[layer][index]
        self.image_kv = [kv if kv is None else (kv[0][index], kv[1][index]) for kv in self.image_kv]


def decode_each_way(model, prompt, images):
    """Greedy, seeded top-k sampling and beam search of one prompt batch: what the cache must not change."""
    return (generate(model, prompt, 30, temperature=0, image_feats=images),
            generate(model, prompt, 30, temperature=1.0, top_k=20, image_feats=images,
                           generator=torch.Generator().manual_seed(7)),
            beam_search(model, prompt, images, beam_size=3, max_new_tokens=12))


def test_preallocated_cache_gives_the_tokens_of_the_concatenating_one(monkeypatch):
    model = tiny_captioner(seed=3)
    prompt, images = torch.randint(0, EOT_TOKEN, (3, 4)), torch.randn(3, 7, 48)
    now = decode_each_way(model, prompt, images)
    monkeypatch.setattr(generate_module, "KVCache", ConcatenatingKVCache)
    before = decode_each_way(model, prompt, images)
    assert torch.equal(now[0], before[0]) and torch.equal(now[1], before[1]) and now[2] == before[2]
    assert not torch.equal(now[0], now[1])  # sampling really sampled


def test_cache_is_one_buffer_per_layer_written_in_place_and_bounded():
    model = tiny_captioner()
    cache = KVCache(max_len=9)
    next_token_logits(model, torch.randint(0, EOT_TOKEN, (2, 5)), None, cache)  # the prompt
    buffers = [(cache.keys[layer], cache.values[layer]) for layer in range(4)]
    assert all(k.shape == v.shape == (2, 4, 9, 32) for k, v in buffers)  # (B, nh, max_len, hs), from the start
    for _ in range(4):
        next_token_logits(model, torch.randint(0, EOT_TOKEN, (2, 1)), None, cache)
    assert cache.pos == 9
    for layer, (k, v) in enumerate(buffers):  # still the very same memory: written in place, never reallocated
        assert cache.keys[layer] is k and cache.values[layer] is v
    with pytest.raises(ValueError, match=r"^KV cache of 9 positions: 9 cached \+ 1 new tokens do not fit$"):
        next_token_logits(model, torch.randint(0, EOT_TOKEN, (2, 1)), None, cache)


def test_a_prompt_continued_in_pieces_gives_the_logits_of_one_pass():
    """Several new tokens after cached ones (the explicit-mask case) see exactly what one causal pass shows them."""
    model = tiny_captioner()
    idx = torch.randint(0, EOT_TOKEN, (2, 11))
    with torch.no_grad():
        whole, _ = model(idx)
        cache = KVCache(max_len=11)
        pieces = [model.lm_head(hidden_states(model, idx[:, a:b], cache=cache)) for a, b in ((0, 4), (4, 5), (5, 11))]
    V = GPT2_VOCAB_SIZE  # the padding columns are -inf in model()'s logits
    assert torch.allclose(torch.cat(pieces, dim=1)[..., :V], whole[..., :V], atol=1e-5)


def test_prompt_is_causal_and_a_single_new_token_needs_no_mask(monkeypatch):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((q.size(2), k.size(2), is_causal, attn_mask is None))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).eval()
    generate(model, torch.randint(0, EOT_TOKEN, (2, 5)), 3, temperature=0)
    # (new tokens, keys attended, is_causal, no mask): 2 layers x (the prompt, then 2 one-token steps)
    assert calls == [(5, 5, True, True)] * 2 + [(1, 6, False, True)] * 2 + [(1, 7, False, True)] * 2


def test_beam_search_reorders_the_cache_in_place(monkeypatch):
    seen = []

    class RecordingKVCache(KVCache):
        def reorder(self, index):
            super().reorder(index)
            seen.append([buffer.data_ptr() for buffer in (*self.keys.values(), *self.values.values())])
    monkeypatch.setattr(generate_module, "KVCache", RecordingKVCache)
    beam_search(tiny_captioner(seed=2), torch.full((2, 1), EOT_TOKEN), torch.randn(2, 7, 48), beam_size=3,
                                       max_new_tokens=8)
    assert len(seen) >= 3 and all(pointers == seen[0] for pointers in seen)


def test_image_keys_values_are_computed_once_per_generation(monkeypatch):
    import model as model_module
    calls = []
    real = model_module.CrossAttention.image_keys_values
    monkeypatch.setattr(model_module.CrossAttention, "image_keys_values",
                        lambda self, image_embs: calls.append(1) or real(self, image_embs))
    model = tiny_captioner()
    images = torch.randn(2, 7, 48)
    generate(model, torch.full((2, 1), EOT_TOKEN), 10, temperature=0, image_feats=images)
    assert len(calls) == 2  # the two cross-attention layers, on the first step only
    beam_search(model, torch.full((2, 1), EOT_TOKEN), images, beam_size=3, max_new_tokens=10)
    assert len(calls) == 4


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after: the graphs counted are this test's own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_gives_the_eager_tokens_and_compiles_once_per_shape(fresh_dynamo):
    """The step is traced with aot_eager (the graph inductor would get, run by PyTorch's own kernels: seconds,
    not a C++ compile); test_sample.py compiles it for real with inductor."""
    from torch._dynamo.testing import CompileCounterWithBackend
    model = tiny_captioner(seed=1)
    prompt, images = torch.full((3, 1), EOT_TOKEN), torch.randn(3, 7, 48)
    eager = [generate(model, prompt, 24, temperature=0, image_feats=images),
             generate(model, prompt, 24, temperature=0, image_feats=images.flip(0)),
             beam_search(model, prompt, images, beam_size=3, max_new_tokens=10)]
    counter = CompileCounterWithBackend("aot_eager")
    step = compile_decode_step(model, backend=counter)
    assert torch.equal(generate(model, prompt, 24, temperature=0, image_feats=images), eager[0])
    assert counter.frame_count == 1  # 23 steps, one graph: nothing in it changes as the position grows
    # the same shape again, other images: the same graph and the same (emptied) cache
    assert torch.equal(generate(model, prompt, 24, temperature=0, image_feats=images.flip(0)), eager[1])
    assert counter.frame_count == 1
    assert beam_search(model, prompt, images, beam_size=3, max_new_tokens=10) == eager[2]
    assert counter.frame_count == 2  # 3 images x 3 beams and 11 positions: a new shape, compiled once
    assert sorted(step.compiled) == [(3, 25), (9, 11)]  # (batch size, cache length) -> seconds of the compile


def test_inductor_compiled_step_gives_the_eager_tokens(fresh_dynamo):
    """The one real compile of the test suite (inductor's C++ code for this CPU, with weight freezing: about 10 s
    here, 25 s without inductor's on-disk cache)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).eval()
    with torch.no_grad():  # sharper: at GPT-2's init scale a tiny model repeats one token whatever its cache holds,
        for name, p in model.named_parameters():  # and a step reading a stale cache would go unnoticed
            if p.dim() == 2 and name.startswith("transformer.h."):
                p.mul_(10)
    prompt = torch.randint(0, EOT_TOKEN, (3, 5))
    eager = generate(model, prompt, 16, temperature=0)
    assert all(len(row[5:].unique()) > 8 for row in eager)
    compile_decode_step(model)
    assert torch.equal(generate(model, prompt, 16, temperature=0), eager)
    assert list(model.compiled_step.compiled) == [(3, 21)]


def test_compiled_step_refuses_a_full_cache():
    from generate import CompiledDecodeStep
    model = tiny_captioner()
    step = CompiledDecodeStep(model, backend="eager")  # the bound is checked before anything is compiled
    cache = KVCache(max_len=5)
    next_token_logits(model, torch.randint(0, EOT_TOKEN, (1, 5)), None, cache)
    with pytest.raises(ValueError, match=r"^KV cache of 5 positions is full$"):
        step(torch.full((1, 1), EOT_TOKEN), cache)


def scripted_logits(script):
    """A stand-in for generate.next_token_logits: at step n every row gets the log-probabilities script[n] names,
    the rest of the probability spread evenly over the other tokens (so log_softmax leaves them as they are)."""
    calls = []

    def next_token_logits(model, idx, image_feats=None, cache=None):
        calls.append(1)
        chosen = script.get(len(calls), {})
        rest = 1 - sum(math.exp(logprob) for logprob in chosen.values())
        logprobs = torch.full((idx.size(0), GPT2_VOCAB_SIZE), math.log(rest / (GPT2_VOCAB_SIZE - len(chosen))))
        for token, logprob in chosen.items():
            logprobs[:, token] = logprob
        return logprobs
    return next_token_logits


def test_beam_search_with_a_negative_length_penalty_does_not_stop_before_the_best_caption(monkeypatch):
    """The model wants 5, 7, <|endoftext|>. Below 0 a length penalty favours short captions, but ending at once
    (log-prob -2) still loses to [5, 7] (-0.61 x 3 = -1.83 at length_penalty -1). The early stop used the bound
    of length_penalty >= 0, stopped after the first step and returned the unfinished beam [5]."""
    model = tiny_captioner()
    for length_penalty in (1.0, 0.0, -0.5, -1.0):
        script = {1: {EOT_TOKEN: -2.0, 5: -0.5}, 2: {7: -0.1, EOT_TOKEN: -5.0}, 3: {EOT_TOKEN: -0.01}}
        monkeypatch.setattr(generate_module, "next_token_logits", scripted_logits(script))
        assert beam_search(model, torch.full((1, 1), EOT_TOKEN), beam_size=2, max_new_tokens=10,
                           length_penalty=length_penalty) == [[5, 7]], length_penalty


def test_beam_search_scores_the_live_beams_at_the_length_limit(monkeypatch):
    """At length_penalty -1 and max_new_tokens 3: [5] ended scores (-0.3 - 1.45) x 2 = -3.5, the live [5, 7, 9]
    -1.0 x 3 = -3.0 at the limit, and wins. The early-stop bound, meant for beams that can still grow (length
    step + 1 = 4: -4.0), ended the search on the last step before the live beams were scored."""
    script = {1: {5: -0.3, EOT_TOKEN: -5.0}, 2: {7: -0.3, EOT_TOKEN: -1.45}, 3: {9: -0.4, EOT_TOKEN: -10.0}}
    monkeypatch.setattr(generate_module, "next_token_logits", scripted_logits(script))
    assert beam_search(tiny_captioner(), torch.full((1, 1), EOT_TOKEN), beam_size=2, max_new_tokens=3,
                       length_penalty=-1.0) == [[5, 7, 9]]


def test_a_pretrained_path_that_is_plainly_local_is_named_not_blamed_on_the_hub(tmp_path):
    """--init x.pth said "not downloadable from the Hugging Face hub"."""
    from model import gpt2_files
    (tmp_path / "weights.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.pth: a file; a GPT-2 is a folder with config.json"):
        gpt2_files(str(tmp_path / "weights.pth"))
    for missing in ("x.pth", "./gpt2-folder", str(tmp_path / "gone.safetensors")):
        with pytest.raises(FileNotFoundError, match=f"{missing}: no such file or folder"):
            gpt2_files(missing)
