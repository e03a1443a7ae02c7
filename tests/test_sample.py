"""sample.py in-process: option checks (one-line errors, not tracebacks nor empty output), images decoded batch by
batch and at reduced size, decompression bombs skipped by name, and the device named by --device used for
everything. CLIP is a small stand-in here; the real one, trained end to end, is in test_caption.py."""
import errno
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import tiktoken
import torch
import torchvision
from PIL import Image

import coco
import sample
from generate import compile_decode_step, generate
from model import EOT_TOKEN, GPT, GPTConfig
from sample import recording_cross_attention
from scripts import ROOT

CLIP_WIDTH = 48


class TinyClip(torch.nn.Module):
    """Stands in for open_clip's CLIP (seconds to build, about a second per image on this CPU) with what
    coco.clip_tokens and sample.py use of it: encode_image, a visual.ln_post over the token sequence (a CLS
    token, then 7 x 7 patches row by row, as in ViT-B/32), and visual.image_size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.visual = torch.nn.Module()
        self.visual.image_size = (224, 224)
        self.visual.patches = torch.nn.Conv2d(3, CLIP_WIDTH, kernel_size=32, stride=32)  # 7 x 7 patches
        self.visual.ln_post = torch.nn.LayerNorm(CLIP_WIDTH)

    def encode_image(self, images):
        patches = self.visual.patches(images).flatten(2).transpose(1, 2)  # (B, 49, width), row by row
        cls = patches.mean(dim=1, keepdim=True)  # (B, 1, width): a whole-image token, first as in CLIP
        return self.visual.ln_post(torch.cat([cls, patches], dim=1))[:, 0]


class RecordingPreprocess:
    """Resize to 224 x 224 and make a tensor, as CLIP's preprocessing does, remembering each image's size."""

    def __init__(self):
        self.sizes = []
        self.transforms = [torchvision.transforms.CenterCrop(224)]  # where coco.load_encoder reads the input size

    def __call__(self, image):
        self.sizes.append(image.size)
        pixels = np.asarray(image.convert("RGB").resize((224, 224)), dtype=np.float32) / 255
        return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, 224, 224)


@pytest.fixture
def clip(monkeypatch):
    """coco.load_clip returns a TinyClip; -> what it was asked for and what the preprocessing saw."""
    seen = {"devices": [], "preprocess": RecordingPreprocess()}

    def load_clip(model_name, pretrained, device):
        seen["devices"].append(device)
        return TinyClip().eval(), seen["preprocess"]
    monkeypatch.setattr(coco, "load_clip", load_clip)
    return seen


def tiny_encoder():
    """A TinyClip as coco.load_encoder would give it."""
    clip_model, preprocess = TinyClip().eval(), RecordingPreprocess()
    return coco.ImageEncoder(lambda pixels: coco.clip_tokens(clip_model, pixels), preprocess,
                             {"name": "tiny", "weights": "none", "image_size": 224, "prefix_tokens": 1})


def tiny_decoder(cross_attn_every=2):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, cross_attn_every=cross_attn_every,
                         n_embd_img=CLIP_WIDTH))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A caption checkpoint (its CLIP is the TinyClip of the clip fixture) and a language-model one."""
    folder = tmp_path_factory.mktemp("checkpoints")
    caption, lm = tiny_decoder(), tiny_decoder(cross_attn_every=0)
    torch.save({"kind": "caption", "model": caption.state_dict(), "config": asdict(caption.config), "step": 0,
                "clip": {"model": "tiny", "pretrained": "none"}}, folder / "caption.pt")
    torch.save({"kind": "lm", "model": lm.state_dict(), "config": asdict(lm.config), "step": 0}, folder / "lm.pt")
    return folder / "caption.pt", folder / "lm.pt"


def write_image(path, width, height):
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def run(*args):
    return sample.main([str(a) for a in args] + ["--device", "cpu", "--max-new-tokens", "2"])


# -----------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("argv, culprit", [
    (["--image", "a.jpg", "--temperature", "-1"], "--temperature"),  # would favour the unlikeliest tokens
    (["--image", "a.jpg", "--temperature", "nan"], "--temperature"),
    (["--image", "a.jpg", "--top-p", "0"], "--top-p"),  # was a traceback
    (["--image", "a.jpg", "--top-p", "1.5"], "--top-p"),
    (["--image", "a.jpg", "--top-k", "0"], "--top-k"),  # was a traceback
    (["--image", "a.jpg", "--beam", "0"], "--beam"),  # these three printed nothing and exited 0
    (["--image", "a.jpg", "--num-samples", "0"], "--num-samples"),
    (["--image", "a.jpg", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--image", "a.jpg", "--batch-size", "0"], "--batch-size"),
    (["--prompt", "Hi", "--checkpoint", "lm.pt", "--num-samples", "0"], "--num-samples"),  # was an IndexError
    (["--image", "a.jpg", "--beam", "5", "--temperature", "0.8"], "--beam"),  # the beam was ignored
    (["--image", "a.jpg", "--num-samples", "3"], "--num-samples"),  # beam search: the same caption 3 times
    (["--prompt", "Hi", "--checkpoint", "lm.pt", "--temperature", "0", "--num-samples", "2"], "--num-samples"),
    (["--prompt", "Hi", "--checkpoint", "lm.pt", "--beam", "3"], "--beam"),  # text is not beam-searched
    (["--image", "a.jpg", "--pretrained", "gpt2"], "--pretrained"),  # was ignored for the newest checkpoint
    (["--prompt", "Hi", "--checkpoint", "lm.pt", "--attention-map", "m.png"], "--attention-map"),  # no image
    (["--image", "a.jpg", "--temperature", "1", "--num-samples", "2", "--attention-map", "m.png"], "--attention-map"),
    (["--image", "a.jpg", "--attention-map", "m.xyz"], "--attention-map"),  # matplotlib cannot write it
    (["--image", "a.jpg", "--length-penalty", "nan"], "--length-penalty"),
    (["--prompt", "caf\udce9", "--checkpoint", "lm.pt"], "--prompt"),  # Latin-1 bytes: a traceback in tiktoken
    (["--image", "a.png", "--attention-map", "a.png"], "--attention-map"),  # overwrote the photo
    (["--image", "maps_a.png", "a.png", "--attention-map", "maps.png"], "--attention-map"),  # a.png's map: maps_a.png
    (["--image", "a.png", "--attention-map", "no/such/folder/m.png"], "--attention-map"),  # after decoding
    (["--image", "a.jpg", "--temperature", "1", "--length-penalty", "0"], "--length-penalty"),  # would be ignored
    (["--prompt", "Hi", "--checkpoint", "lm.pt", "--length-penalty", "0"], "--length-penalty"),
])
def test_bad_options_are_refused_in_one_line(argv, culprit, capsys):
    with pytest.raises(SystemExit) as exit:
        sample.parse_args(argv)
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in error and culprit in error, error


def test_length_penalty_reaches_beam_search(checkpoints, clip, monkeypatch, tmp_path):
    """caption_eval.py --length-penalty picks it on val; sample.py must be able to caption with that choice."""
    caption, _ = checkpoints
    asked = []
    monkeypatch.setattr(sample, "beam_search", lambda model, prompt, image_feats, beam_size, max_new_tokens,
                        length_penalty: asked.append(length_penalty) or [[] for _ in range(len(prompt))])
    image = write_image(tmp_path / "a.png", 24, 24)
    assert run("--image", image, "--checkpoint", caption, "--length-penalty", "0.5") == 0
    assert run("--image", image, "--checkpoint", caption) == 0
    assert asked == [0.5, 1.0]


def test_good_options_pass_and_temperature_zero_is_accepted():
    args = sample.parse_args(["--image", "a.jpg", "--temperature", "0", "--top-p", "1", "--top-k", "5"])
    assert (args.temperature, args.top_p, args.top_k, args.beam, args.max_new_tokens) == (0.0, 1.0, 5, None, 30)
    args = sample.parse_args(["--prompt", "Hi", "--pretrained", "gpt2", "--num-samples", "4"])
    assert (args.temperature, args.num_samples, args.max_new_tokens) == (1.0, 4, 200)


@pytest.mark.parametrize("options, message", [
    ({"beam_size": 0}, "beam_size 0"),  # was greedy decoding, silently
    ({"max_new_tokens": 0}, "max_new_tokens 0"),  # was empty captions
    ({"temperature": -1.0}, "temperature -1.0"),
    ({"top_k": 0}, "top_k 0"),
    ({"top_p": 0.0}, "top_p 0.0"),
    ({"beam_size": 4, "temperature": 0.8}, "beam search or sampling"),  # was sampling, the beam ignored
])
def test_captioner_refuses_bad_options(options, message):
    captioner = sample.Captioner(tiny_decoder(), tiny_encoder(), "cpu")
    with pytest.raises(ValueError, match=message):
        captioner.caption([Image.new("RGB", (32, 32))], **options)


def test_captioner_decodes_each_way():
    captioner = sample.Captioner(tiny_decoder(), tiny_encoder(), "cpu")
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    greedy = captioner.caption([image], beam_size=1, max_new_tokens=4)
    assert captioner.caption([image], temperature=0.0, max_new_tokens=4) == greedy  # temperature 0 is greedy
    assert len(captioner.caption([image, image], max_new_tokens=4)) == 2  # beam search
    assert len(captioner.caption([image], top_k=5, max_new_tokens=4, generator=torch.Generator().manual_seed(0))) == 1
    assert captioner.caption([]) == []


@pytest.mark.parametrize("what", ["--prompt", "--image"])
def test_offline_without_gpt2s_bpe_files_is_one_line_saying_what_to_set(what, checkpoints, clip, tmp_path,
                                                                        tiktoken_offline):
    caption, lm = checkpoints
    argv = {"--prompt": ["--prompt", "Hi", "--checkpoint", lm],
            "--image": ["--image", write_image(tmp_path / "a.png", 64, 48), "--checkpoint", caption]}
    with pytest.raises(ValueError, match="cannot load GPT-2's BPE files .* set TIKTOKEN_CACHE_DIR"):
        run(*argv[what])


def test_prompt_longer_than_the_block_is_refused(checkpoints):
    _, lm = checkpoints
    with pytest.raises(ValueError, match="block_size is 64"):  # was no output and exit status 0
        run("--prompt", " word" * 70, "--checkpoint", lm)


def test_prompt_that_leaves_less_room_than_asked_says_so(checkpoints, capsys):
    _, lm = checkpoints
    sample.main(["--prompt", " word" * 60, "--checkpoint", str(lm), "--max-new-tokens", "10", "--device", "cpu"])
    assert "4 new tokens, not 10" in capsys.readouterr().err


def test_empty_prompt_starts_a_new_document(checkpoints, capsys):
    _, lm = checkpoints
    assert run("--prompt", "", "--checkpoint", lm, "--num-samples", "2") == 0  # was a crash on an empty tensor
    assert capsys.readouterr().out.count("---") == 2


# -----------------------------------------------------------------------------
# Images: large ones, bombs, memory


def test_decompression_bomb_is_skipped_by_name_and_the_rest_captioned(checkpoints, clip, tmp_path, monkeypatch,
                                                                      capsys):
    caption, _ = checkpoints
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS (179M pixels by default); a low limit makes a small file one
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    first, bomb, last = write_image(tmp_path / "first.png", 20, 20), write_image(tmp_path / "bomb.png", 64, 64), \
        write_image(tmp_path / "last.jpg", 30, 20)
    assert run("--image", first, bomb, last, "--checkpoint", caption) == 1
    out, err = capsys.readouterr()
    assert f"{first}: " in out and f"{last}: " in out and str(bomb) not in out
    errors = err.strip().splitlines()
    assert len(errors) == 1 and str(bomb) in errors[0] and "too large" in errors[0], err


def test_large_jpeg_is_decoded_at_reduced_size(checkpoints, clip, tmp_path):
    caption, _ = checkpoints
    photo = write_image(tmp_path / "photo.jpg", 2000, 1500)
    assert run("--image", photo, "--checkpoint", caption) == 0
    [size] = clip["preprocess"].sizes
    # 1/2 scale: at 1/4 the short side (375) would be under twice CLIP's 224, the least sample.py keeps
    assert size == (1000, 750), size


def test_coco_sized_jpeg_is_decoded_at_full_size_as_for_training(checkpoints, clip, tmp_path):
    caption, _ = checkpoints
    photo = write_image(tmp_path / "photo.jpg", 640, 480)  # COCO's largest; coco.py decodes it whole
    assert run("--image", photo, "--checkpoint", caption) == 0
    assert clip["preprocess"].sizes == [(640, 480)]


def test_images_are_decoded_one_batch_at_a_time(checkpoints, clip, tmp_path, monkeypatch):
    caption, _ = checkpoints
    files = [write_image(tmp_path / f"{i}.png", 24, 24) for i in range(5)]
    opened, opened_when_encoding = [], []
    real_open, real_clip_tokens = Image.open, coco.clip_tokens
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    monkeypatch.setattr(coco, "clip_tokens",
                        lambda *a: opened_when_encoding.append(len(opened)) or real_clip_tokens(*a))
    assert run("--image", *files, "--checkpoint", caption, "--batch-size", 2) == 0
    assert opened_when_encoding == [2, 4, 5]  # not [5, 5, 5]: every image decoded before the first batch


# -----------------------------------------------------------------------------
# Devices


def test_named_gpu_is_used_for_everything(checkpoints, clip, monkeypatch):
    caption, _ = checkpoints
    moved_to, dtype_asked = [], []
    monkeypatch.setattr(GPT, "to", lambda model, device: moved_to.append(device) or model)  # no GPU here
    monkeypatch.setattr(sample, "default_dtype", lambda device: dtype_asked.append(device) or "bfloat16")
    captioner = sample.Captioner.from_checkpoint(caption, device="cuda:1")
    assert moved_to == clip["devices"] == dtype_asked == ["cuda:1"]  # the dtype is chosen for GPU 1, not GPU 0
    assert (captioner.device, captioner.device_type, captioner.dtype) == ("cuda:1", "cuda", "bfloat16")


@pytest.mark.parametrize("what", [["--image", "a.jpg", "--checkpoint", "caption.pt"],
                                  ["--prompt", "Hi", "--checkpoint", "lm.pt"]])
def test_command_line_makes_the_named_gpu_current_before_loading(what, monkeypatch):
    calls = []

    class Loaded(Exception):  # stops main() there: no GPU here to go on with
        pass

    def load(*what):
        calls.append(what)
        raise Loaded
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(sample.Captioner, "from_checkpoint", lambda path, device, dtype=None: load("captioner", device))
    monkeypatch.setattr(sample, "load_model", lambda path: load("lm", path))
    with pytest.raises(Loaded):
        sample.main(what + ["--device", "cuda:1"])
    assert calls[0] == ("set_device", "cuda:1") and len(calls) == 2


@pytest.mark.parametrize("device, message", [("gpu", "not a device"), ("cuda:x", "not a device"),
                                             ("cuda:2", "has 2 CUDA GPUs"), ("cuda", "has 0 CUDA GPUs")])
def test_device_that_is_not_there_is_refused_in_one_line(device, message, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0 if device == "cuda" else 2)
    with pytest.raises(SystemExit):
        sample.parse_args(["--image", "a.jpg", "--device", device])
    assert message in capsys.readouterr().err


def test_text_autocast_gets_the_device_type_and_a_dtype_for_that_gpu(monkeypatch):
    dtype_asked = []
    monkeypatch.setattr(sample, "default_dtype", lambda device: dtype_asked.append(device) or "bfloat16")
    monkeypatch.setattr(sample, "autocast", lambda device_type, dtype: (device_type, dtype))
    assert sample.autocast_for("cuda:1") == ("cuda", "bfloat16") and dtype_asked == ["cuda:1"]


# -----------------------------------------------------------------------------
# Attention maps


def opened_decoder():
    """tiny_decoder with its zero-initialised cross-attention output opened, so the image matters."""
    model = tiny_decoder()
    with torch.no_grad():
        for block in model.transformer.h:
            if hasattr(block, "xattn"):
                block.xattn.c_proj.weight.normal_(0, 0.5)
    return model


def noise_image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("decoding", [{"beam_size": 1}, {"beam_size": 3}, {"temperature": 1.0}])
def test_caption_returns_a_map_per_word_that_sums_to_one(decoding):
    captioner = sample.Captioner(opened_decoder(), tiny_encoder(), "cpu")
    images = [noise_image(64, 48), Image.new("RGB", (40, 40), (200, 30, 30))]
    options = dict(max_new_tokens=5, **decoding)
    captions, attention = captioner.caption(images, return_attention=True, generator=torch.Generator().manual_seed(0),
                                            **options)
    assert captions == captioner.caption(images, generator=torch.Generator().manual_seed(0), **options)  # unchanged
    for caption, maps in zip(captions, attention):
        n = len(maps.words)
        assert n >= 1 and all(word in caption for word in maps.words)
        assert maps.patches.shape == (n, 7, 7) and maps.cls.shape == (n,)  # 50 tokens: CLS + 7 x 7
        np.testing.assert_allclose(maps.patches.sum(axis=(1, 2)) + maps.cls, 1.0, atol=1e-5)
        assert (maps.heads, maps.layers) == (2, 1)


def test_maps_are_the_weights_decoding_used():
    """The maps come from one pass over the finished caption; recorded step by step while decoding greedily
    with the KV cache, the weights are the same: causal attention shows position t what it saw at step t."""
    model = opened_decoder()
    captioner = sample.Captioner(model, tiny_encoder(), "cpu")
    image_feats = torch.randn(2, 50, CLIP_WIDTH)
    with torch.no_grad(), recording_cross_attention(model) as steps:  # one cross-attention layer: one entry a step
        generate(model, torch.full((2, 1), EOT_TOKEN), 6, temperature=0, image_feats=image_feats)
    _, attention = captioner.caption_features(image_feats, beam_size=1, max_new_tokens=6, return_attention=True)
    for b, maps in enumerate(attention):
        n = len(maps.words)
        during = torch.stack([step[b, :, -1].mean(dim=0) for step in steps[:n]])  # (n, 50): the head average
        after = np.concatenate([maps.cls[:, None], maps.patches.reshape(n, -1)], axis=1)
        assert n >= 1 and np.abs(after - during.numpy()).max() < 1e-5


def test_maps_have_the_image_orientation():
    """Image tokens that are zero but for the patch at row 1, column 5, and queries that only its key can match:
    the map peaks at (1, 5), not at (5, 1), and so does the picture laid over the image."""
    row, col = 1, 5
    model = tiny_decoder()
    patch = 1 + 7 * row + col  # CLIP's order: CLS, then the patches row by row from the top left
    image_feats = torch.zeros(1, 50, CLIP_WIDTH)
    image_feats[0, patch] = torch.randn(CLIP_WIDTH)
    with torch.no_grad():
        # with zero biases (their initial value) a zero token embeds to zero and gets a zero key: score 0
        image_embs = model.transformer.ln_img(model.transformer.img_proj(image_feats))  # (1, 50, n_embd)
        block = model.transformer.h[1]
        key = block.xattn.c_kv(image_embs[0, patch])[:model.config.n_embd]  # the patch's key, heads side by side
        block.xattn.c_q.weight.zero_()
        block.xattn.c_q.bias.copy_(100 * key)  # every query is that key: a high score there, 0 everywhere else
    captioner = sample.Captioner(model, tiny_encoder(), "cpu")
    caption = "a red square"
    [maps] = captioner.attention(image_feats, [captioner.enc.encode(caption)])  # the maps of a given caption
    assert maps.words == ["a", "red", "square"]
    for grid in maps.patches:
        assert np.unravel_index(grid.argmax(), grid.shape) == (row, col)
        assert grid[row, col] > 0.5
    figure = sample.attention_figure(noise_image(300, 200), caption, maps)
    drawn = figure.axes[1].images[1].get_array()  # the first word's map, as laid over the 224 x 224 view
    y, x = np.unravel_index(np.argmax(drawn), drawn.shape)
    assert drawn.shape == (224, 224) and (y // 32, x // 32) == (row, col)  # 32-pixel patches, as in ViT-B/32
    assert figure.axes[1].get_title() == f"{maps.words[0]}\nCLS {maps.cls[0]:.0%}"


def test_attention_maps_are_drawn_for_the_synthetic_captioning_set(checkpoints, clip, tmp_path, capsys):
    from test_caption import COLOURS, write_coco  # test_caption.py's COCO images: coloured squares
    caption, _ = checkpoints
    write_coco(tmp_path, "train2017", COLOURS, first_id=1)
    images = sorted((tmp_path / "train2017").glob("*.jpg"))
    assert run("--image", *images, "--checkpoint", caption, "--attention-map", tmp_path / "maps.png") == 0
    err = capsys.readouterr().err
    for image in images:  # several images: one figure each, named after it
        figure = tmp_path / f"maps_{image.stem}.png"
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert f"{image}: attention map in {figure}" in err


def test_an_attention_map_that_cannot_be_written_leaves_the_last_one_whole(checkpoints, clip, tmp_path, monkeypatch):
    import matplotlib.figure
    caption, _ = checkpoints
    image, out = write_image(tmp_path / "dog.png", 64, 48), tmp_path / "map.png"
    out.write_bytes(b"yesterday's map")

    def full_disk(figure, path, **kwargs):  # it was a traceback, and half a picture over yesterday's
        open(path, "wb").write(b"half a m")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(ValueError, match=f"--attention-map {out}: not written \\(No space left on device\\)"):
        run("--image", image, "--checkpoint", caption, "--attention-map", out)
    assert out.read_bytes() == b"yesterday's map" and sorted(os.listdir(tmp_path)) == ["dog.png", "map.png"]


def test_attention_map_files_are_named_after_the_images():
    assert sample.attention_map_paths("dog_attention.png", ["dog.jpg"]) == {"dog.jpg": "dog_attention.png"}
    assert sample.attention_map_paths("out/maps.png", ["a/dog.jpg", "cat.png"]) == {
        "a/dog.jpg": "out/maps_dog.png", "cat.png": "out/maps_cat.png"}
    assert sample.attention_map_paths("maps.pdf", ["a/x.jpg", "b/x.jpg", "y.jpg"]) == {  # two called x
        "a/x.jpg": "maps_1_x.pdf", "b/x.jpg": "maps_2_x.pdf", "y.jpg": "maps_y.pdf"}


def test_image_tokens_without_a_square_grid_are_refused():
    captioner = sample.Captioner(tiny_decoder(), tiny_encoder(), "cpu")
    with pytest.raises(ValueError, match=r"49 image tokens are not 1 \(CLS, registers\) \+ a square grid"):  # patches without CLS
        captioner.caption_features(torch.randn(1, 49, CLIP_WIDTH), beam_size=1, return_attention=True)
    assert sample.patch_grid_side(257) == 16  # ViT-L/14


def test_attention_map_without_matplotlib_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit):
        sample.parse_args(["--image", "a.jpg", "--attention-map", "m.png"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--attention-map needs matplotlib: pip install matplotlib")


def test_matplotlib_is_imported_only_for_attention_maps():
    check = "import sys, sample; sample.parse_args(['--image', 'a.jpg']); print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "False", result.stderr


# -----------------------------------------------------------------------------
# Defaults: which checkpoint, how text is sampled; --compile


def test_text_is_sampled_as_training_samples_are_and_help_says_so(checkpoints, monkeypatch, capsys):
    """--prompt with no sampling option: the temperature, top-k and top-p of train_gpt2.py's print_samples."""
    import argparse

    import train_gpt2
    asked = []
    recorder = lambda model, idx, max_new_tokens, **options: asked.append(options) or idx
    monkeypatch.setattr(sample, "generate", recorder)
    monkeypatch.setattr(train_gpt2, "generate", recorder)
    _, lm = checkpoints
    run("--prompt", "Hi", "--checkpoint", lm)
    train_gpt2.print_samples(tiny_decoder(cross_attn_every=0), tiktoken.get_encoding("gpt2"),
                             argparse.Namespace(device="cpu"))
    ours, training = asked
    for option in ("temperature", "top_k", "top_p"):
        assert ours.get(option) == training.get(option), option
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    assert "default 50 for --prompt, as train_gpt2.py's samples" in " ".join(capsys.readouterr().out.split())


def copy_checkpoint(source, folder, name):
    folder.mkdir(exist_ok=True)
    shutil.copy(source, folder / name)
    return folder / name


def test_prompt_without_checkpoint_takes_the_newest_in_log(checkpoints, tmp_path, monkeypatch, capsys):
    _, lm = checkpoints
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^log: no model_\*.pt checkpoint here; pass --checkpoint PATH"):
        run("--prompt", "Hi")
    copy_checkpoint(lm, tmp_path / "log", "model_000100.pt")
    (tmp_path / "log" / "model_000020.pt").write_text("an older step: not this one")
    assert run("--prompt", "Hi") == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hi") and "sample.py: using log/model_000100.pt (the newest in log)" in err


def test_image_without_checkpoint_takes_best_pt_else_the_newest(checkpoints, clip, tmp_path, monkeypatch, capsys):
    caption, _ = checkpoints
    monkeypatch.chdir(tmp_path)
    image = write_image(tmp_path / "a.png", 24, 24)
    copy_checkpoint(caption, tmp_path / "log_caption", "model_000200.pt")
    best = copy_checkpoint(caption, tmp_path / "log_caption", "best.pt")
    assert run("--image", image) == 0
    assert "sample.py: using log_caption/best.pt (the best val CIDEr-D of the run)" in capsys.readouterr().err
    best.unlink()
    assert run("--image", image) == 0
    assert "sample.py: using log_caption/model_000200.pt (the newest in log_caption" in capsys.readouterr().err


def test_compile_gives_the_eager_text_and_says_what_it_compiled(checkpoints, capsys, monkeypatch):
    """Traced with aot_eager, in seconds; test_model.py compiles the step for real with inductor."""
    from torch._dynamo.testing import CompileCounterWithBackend
    _, lm = checkpoints
    argv = ["--prompt", "Hello", "--checkpoint", str(lm), "--temperature", "0", "--max-new-tokens", "12",
            "--device", "cpu"]
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(sample, "compile_decode_step", lambda model: compile_decode_step(model, backend=counter))
    torch._dynamo.reset()
    try:
        assert sample.main(argv) == 0
        eager = capsys.readouterr()
        assert counter.frame_count == 0
        assert sample.main(argv + ["--compile"]) == 0
        compiled = capsys.readouterr()
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1 and compiled.out == eager.out and len(eager.out) > len("Hello---\n")
    assert "compile" not in eager.err
    lines = [line for line in compiled.err.splitlines() if "--compile" in line]
    assert len(lines) == 1 and "compiled the decoding step for a batch of 1 and 13 positions" in lines[0], compiled.err


def test_a_16_bit_photo_is_captioned_as_it_looks_not_clipped_to_white(tmp_path):
    """convert("RGB") clipped a 16-bit PNG's mid-grey (32,896) to white: the caption was of a white picture."""
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(path)  # saved as a 16-bit greyscale PNG
    assert Image.open(path).mode.startswith("I")
    assert sample.open_image(path).getpixel((4, 4)) == (128, 128, 128)


# -----------------------------------------------------------------------------
# A captioner shared as export_hf.py --captioner writes it: a folder, or a hub repository


@pytest.fixture
def exported_captioner(tmp_path):
    """A caption checkpoint whose image matters (opened_decoder), and its export_hf.py --captioner folder."""
    import export_hf
    model = opened_decoder()
    torch.save({"kind": "caption", "model": model.state_dict(), "config": asdict(model.config), "step": 7,
                "clip": {"model": "tiny", "pretrained": "none"}}, tmp_path / "caption.pt")  # the old record: kept
    assert export_hf.main([str(tmp_path / "caption.pt"), str(tmp_path / "captioner"), "--captioner"]) == 0
    return tmp_path / "caption.pt", tmp_path / "captioner"


def test_an_exported_captioner_is_its_checkpoint(exported_captioner, clip):
    path, folder = exported_captioner
    original = sample.Captioner.from_checkpoint(path, device="cpu")
    exported = sample.Captioner.from_pretrained(folder, device="cpu")
    images = [noise_image(64, 48), noise_image(40, 40, seed=1)]
    image_feats = original.encode(torch.stack([original.pixels(image) for image in images]))
    idx = torch.randint(0, EOT_TOKEN, (2, 8))
    with torch.no_grad():
        logits, expected = (captioner.model(idx, image_feats=image_feats)[0] for captioner in (exported, original))
    assert torch.equal(logits, expected)
    assert exported.caption(images, max_new_tokens=6) == original.caption(images, max_new_tokens=6)
    assert exported.encoder.record == original.encoder.record


def test_checkpoint_may_be_an_export_folder_or_its_hub_id(exported_captioner, clip, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    path, folder = exported_captioner
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",  # the hub's copy: the same files
                        lambda repo_id, **options: asked.append(repo_id) or str(folder))
    image = write_image(tmp_path / "a.png", 64, 48)
    outputs = []
    for checkpoint in (path, folder, "me/captioner"):
        for what in (["--image", image], ["--prompt", "Hi", "--temperature", "0"]):  # text: the decoder, no image
            assert run(*what, "--checkpoint", checkpoint) == 0
            outputs.append(capsys.readouterr().out)
    assert outputs[0:2] == outputs[2:4] == outputs[4:6] and asked == ["me/captioner"] * 2


@pytest.mark.parametrize("checkpoint, message", [
    ("gpt2", r"gpt2/config.json: not what export_hf.py --captioner writes \(a GPT-2 export\? .*--pretrained"),
    ("empty", r"empty: no config.json here, so not a folder export_hf.py --captioner wrote"),
    ("me/captioner", r"^me/captioner: not a folder here, and not downloadable from the Hugging Face hub "
                     r"\(LocalEntryNotFoundError\); offline, download it elsewhere"),
    ("no/such.pt", r"no/such.pt: no such checkpoint file"),  # a missing .pt file is not taken for a hub id
], ids=["a GPT-2 export", "no config.json", "a hub id, offline", "a missing .pt"])
def test_a_checkpoint_that_is_no_captioner_export_is_one_line(checkpoint, message, checkpoints, tmp_path,
                                                             monkeypatch):
    import export_hf
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    _, lm = checkpoints
    monkeypatch.chdir(tmp_path)
    export_hf.main([str(lm), "gpt2"])  # transformers' GPT-2 format: GPT.from_pretrained's, not a captioner
    os.mkdir("empty")

    def offline(repo_id, **options):  # what snapshot_download raises offline with nothing in the cache
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    for what in (["--image", "a.png"], ["--prompt", "Hi"]):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run(*what, "--checkpoint", checkpoint)
