"""train_caption.py (and sample.py) on a synthetic COCO (official annotation schema, PIL images) with a
randomly initialised CLIP ViT-B/32: training freezes and resumes as it should, and DDP equals gradient
accumulation. That the whole path learns to caption is tested on pipeline.py --tiny's chain
(tests/test_pipeline.py); coco.py itself in test_coco.py."""
import json
import os
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from model import GPT, GPTConfig
from scripts import run_script

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 20)}


def write_coco(root, split, colours, first_id):
    os.makedirs(root / split, exist_ok=True)
    os.makedirs(root / "annotations", exist_ok=True)
    images, annotations = [], []
    for k, (name, rgb) in enumerate(colours.items()):
        image_id = first_id + k
        file_name = f"{image_id:012d}.jpg"
        pixels = np.zeros((96, 128, 3), dtype=np.uint8) + np.array(rgb, dtype=np.uint8)
        pixels[20:60, 30:90] = 255 - np.array(rgb)  # a shape in the middle, so images differ in more than colour
        Image.fromarray(pixels).save(root / split / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": 96, "width": 128, "license": 1,
                       "coco_url": "", "date_captured": "", "flickr_url": ""})
        for c in range(5):  # five captions per image, as in COCO
            annotations.append({"id": 1000 * image_id + c, "image_id": image_id, "caption": f"a {name} square"})
    with open(root / "annotations" / f"captions_{split}.json", "w") as f:
        json.dump({"info": {}, "licenses": [], "images": images, "annotations": annotations}, f)


def build_dataset(root):
    """The synthetic COCO (4 train images, 2 val, one of them truncated) and its CLIP features: the `dataset`
    fixture, built once per test session by conftest.py for every test file that captions."""
    write_coco(root, "train2017", COLOURS, first_id=1)
    write_coco(root, "val2017", dict(list(COLOURS.items())[:2]), first_id=100)
    with open(root / "val2017" / "000000000101.jpg", "r+b") as f:  # a truncated JPEG
        f.truncate(200)
    features = root / "features"
    result = run_script("coco.py", "--coco-dir", root, "--out-dir", features, "--encoder-weights", "none",
                        "--batch-size", 2, "--num-workers", 0, "--device", "cpu", threads=2)
    return root, features, result


def tiny_lm_checkpoint(path):
    torch.manual_seed(0)
    lm = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    torch.save({"kind": "lm", "model": lm.state_dict(), "config": asdict(lm.config), "step": 0}, path)
    return lm


def read_log(out_dir, kind):
    return {int(s): float(v) for s, k, v in (line.split() for line in open(out_dir / "log.txt")) if k == kind}


def read_train_losses(out_dir):
    return read_log(out_dir, "train")


def test_default_training_changes_only_cross_attention_and_resumes_exactly(dataset, tmp_path):
    _, features, _ = dataset
    lm = tiny_lm_checkpoint(tmp_path / "lm.pt")
    common = ["--features-dir", features, "--init", tmp_path / "lm.pt", "--total-batch-size", 2, "--batch-size", 2,
              "--max-steps", 6,
              "--lr", 1e-3, "--warmup-steps", 2, "--eval-every", 3, "--val-images", 1, "--device", "cpu"]
    run_script("train_caption.py", *common, "--out-dir", tmp_path / "straight")
    run_script("train_caption.py", *common, "--out-dir", tmp_path / "split", "--stop-at", 3)
    run_script("train_caption.py", *common, "--out-dir", tmp_path / "split", "--resume", "auto")
    straight = read_train_losses(tmp_path / "straight")
    assert list(straight) == list(range(6)) and straight == read_train_losses(tmp_path / "split")

    trained = torch.load(tmp_path / "straight" / "model_000006.pt", weights_only=True)
    assert trained["kind"] == "caption" and (trained["encoder"]["name"], trained["encoder"]["weights"]) == ("ViT-B-32-quickgelu", "none")
    before = lm.state_dict()
    changed = {name for name, tensor in trained["model"].items()
               if name not in before or not torch.equal(tensor, before[name])}
    assert changed and all(coco_name_is_cross_attention(name) for name in changed), changed
    resumed = torch.load(tmp_path / "split" / "model_000006.pt", weights_only=True)
    assert all(torch.equal(resumed["model"][k], v) for k, v in trained["model"].items())


def coco_name_is_cross_attention(name):
    return any(part in name for part in (".xattn.", ".ln_x.", ".img_proj.", ".ln_img."))


def test_sample_reports_bad_images_by_name_and_captions_the_rest(dataset, tmp_path):
    root, features, _ = dataset
    tiny_lm_checkpoint(tmp_path / "lm.pt")
    out = tmp_path / "caption"
    run_script("train_caption.py", "--features-dir", features, "--init", tmp_path / "lm.pt", "--out-dir", out,
               "--total-batch-size", 2, "--batch-size", 2, "--max-steps", 1, "--val-images", 1, "--device", "cpu")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    good = root / "train2017" / "000000000001.jpg"
    corrupt = root / "val2017" / "000000000101.jpg"
    missing = tmp_path / "missing.jpg"
    result = run_script("sample.py", "--image", missing, good, not_an_image, corrupt, "--checkpoint-dir", out,
                        "--device", "cpu", check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING")]  # open_clip: random weights
    assert lines[0] == f"sample.py: using {out / 'best.pt'} (the best val CIDEr-D of the run)"  # no --checkpoint
    errors = lines[1:]
    assert len(errors) == 3, result.stderr
    for path, error in zip((missing, not_an_image, corrupt), errors):
        assert str(path) in error
    assert result.stdout.startswith(f"{good}: ") and len(result.stdout.strip().splitlines()) == 1

    # a language-model checkpoint is the wrong kind for captions
    wrong = run_script("sample.py", "--image", good, "--checkpoint", tmp_path / "lm.pt", "--device", "cpu",
                       check=False)
    assert wrong.returncode != 0 and "is a 'lm' checkpoint, expected 'caption'" in wrong.stderr
    # and the right kind for text
    text = run_script("sample.py", "--prompt", "Hello", "--checkpoint", tmp_path / "lm.pt", "--max-new-tokens", 5,
                      "--device", "cpu")
    assert text.stdout.startswith("Hello")


def features_with_captions_of_different_lengths(features, folder):
    """A copy of the synthetic features whose captions have 1 to 9 tokens: a mean of micro-batch means then
    differs from the mean over tokens."""
    shutil.copytree(features, folder)
    index_path = folder / "train_index.json"
    index = json.loads(index_path.read_text())
    index["tokens"] = [[tokens[:1] + [262] * ((i + 2 * c) % 9) for c, tokens in enumerate(captions)]
                       for i, captions in enumerate(index["tokens"])]
    index_path.write_text(json.dumps(index))
    return folder


def read_step_lines(result):
    """{step: (loss, caption-epochs)} from the printed step lines."""
    rows = [dict(field.strip().split(" ", 1) for field in line.split("|")) for line in result.stdout.splitlines()
            if "| caption-epochs" in line]
    return {int(row["step"]): (float(row["loss"]), float(row["caption-epochs"])) for row in rows}


def test_the_step_is_the_same_however_it_is_split_over_processes_and_micro_batches(dataset, tmp_path):
    """4 images per step as 1 process x 1 micro-batch of 4, 1 process x 4 micro-batches of 1, and 2 processes
    x 2 micro-batches of 1: the same images, captions, per-token loss and update."""
    _, features, _ = dataset
    features = features_with_captions_of_different_lengths(features, tmp_path / "features")
    tiny_lm_checkpoint(tmp_path / "lm.pt")
    common = ["--features-dir", features, "--init", tmp_path / "lm.pt", "--total-batch-size", 4, "--max-steps", 5,
              "--lr", 1e-3, "--warmup-steps", 2, "--eval-every", 2, "--val-images", 1, "--device", "cpu"]
    whole = run_script("train_caption.py", *common, "--batch-size", 4, "--out-dir", tmp_path / "whole")
    micro = run_script("train_caption.py", *common, "--batch-size", 1, "--out-dir", tmp_path / "micro")
    ddp = run_script("train_caption.py", *common, "--batch-size", 1, "--out-dir", tmp_path / "ddp", nproc=2)
    runs = [read_step_lines(result) for result in (whole, micro, ddp)]
    assert sorted(runs[0]) == list(range(5))
    for other in runs[1:]:
        assert sorted(other) == sorted(runs[0])
        for step, (loss, epoch) in runs[0].items():
            # float32 means over micro-batches of different token counts round differently: float32's
            # resolution at a loss of 10 is 1e-6, so the printed sixth decimal may differ by up to two units
            assert abs(other[step][0] - loss) <= 2e-6 and other[step][1] == epoch, (step, other[step], loss, epoch)
    vals = [read_log(tmp_path / name, "val") for name in ("whole", "micro", "ddp")]
    assert sorted(vals[0]) == [0, 2, 4, 5] and vals[0] == vals[1] == vals[2]


def test_unfreeze_after_trains_the_language_model_from_that_step_and_resumes(dataset, tmp_path):
    _, features, _ = dataset
    lm = tiny_lm_checkpoint(tmp_path / "lm.pt")
    common = ["--features-dir", features, "--init", tmp_path / "lm.pt", "--total-batch-size", 2, "--batch-size", 2,
              "--max-steps", 4, "--unfreeze-after", 2, "--lr", 1e-3, "--warmup-steps", 1, "--eval-every", 0, "--val-images", 1,
              "--save-every", 2, "--device", "cpu"]
    run_script("train_caption.py", *common, "--out-dir", tmp_path / "straight")
    run_script("train_caption.py", *common, "--out-dir", tmp_path / "split", "--stop-at", 3)
    run_script("train_caption.py", *common, "--out-dir", tmp_path / "split", "--resume", "auto")
    assert read_train_losses(tmp_path / "straight") == read_train_losses(tmp_path / "split")
    at_2 = torch.load(tmp_path / "straight" / "model_000002.pt", weights_only=True)["model"]
    at_4 = torch.load(tmp_path / "straight" / "model_000004.pt", weights_only=True)["model"]
    name = "transformer.h.0.mlp.c_fc.weight"  # a GPT-2 weight: frozen until step 2, trained after
    assert torch.equal(at_2[name], lm.state_dict()[name]) and not torch.equal(at_4[name], at_2[name])


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size: must be a whole number > 0, got 0"),
    (["--epochs", "-1"], "--epochs: must be a number > 0, got -1"),
    (["--max-steps", "4", "--stop-at", "5"], "--stop-at 5 is after --max-steps 4"),
    (["--weight-decay", "nan"], "--weight-decay: must be a number >= 0, got nan"),  # "Try a lower learning rate"
    (["--min-lr", "1e-3"], "--min-lr 0.001 is above --lr 0.0001"),  # the rate climbed after warmup
])
def test_bad_flags_are_refused_before_anything_runs(flags, message, capsys):
    from train_caption import parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


def test_training_compiles_once_and_once_more_when_gpt2_unfreezes(dataset, tmp_path, monkeypatch):
    """Captions of 1 to 9 tokens, train + eval + unfreeze in 8 steps: padding to multiples of 16 and evaluating
    the uncompiled module keep torch.compile to one graph, plus one for the unfrozen model."""
    import functools
    import torch._dynamo
    import train_caption
    _, features, _ = dataset
    features = features_with_captions_of_different_lengths(features, tmp_path / "features")
    tiny_lm_checkpoint(tmp_path / "lm.pt")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))  # no C++ build
    train_caption.main(train_caption.parse_args([
        "--features-dir", str(features), "--init", str(tmp_path / "lm.pt"), "--out-dir", str(tmp_path / "out"),
        "--total-batch-size", "2", "--batch-size", "1", "--max-steps", "8", "--eval-every", "3",
        "--unfreeze-after", "4", "--val-images", "2", "--device", "cpu", "--compile"]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    torch._dynamo.reset()


def test_the_training_model_is_compiled_with_a_graph_per_caption_length(monkeypatch):
    """dynamic=False: the at most three caption lengths (16, 32, 41) get a specialised graph each; torch.compile's
    default would replace them with one shape-generic graph at the second length."""
    import train_caption
    from training import Distributed
    asked = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: asked.append(options) or module)
    train_caption.wrap_model(torch.nn.Linear(2, 2), True, Distributed(False, 0, 0, 1, "cpu"))
    assert asked == [{"dynamic": False}]


def test_gpt2_weights_train_at_their_own_lower_rate(dataset, tmp_path):
    from model import is_cross_attn_param
    from train_caption import set_trainable, unfreeze_language_model
    captioner = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, cross_attn_every=2, n_embd_img=16))
    names = {id(p): name for name, p in captioner.named_parameters()}

    def groups(optimizer):
        return [(g["lr_scale"], g["weight_decay"], {is_cross_attn_param(names[id(p)]) for p in g["params"]})
                for g in optimizer.param_groups]

    set_trainable(captioner, "all")
    from_the_start = captioner.configure_optimizers(0.01, 1e-4, "cpu", lm_lr_scale=0.2)
    expected = [(1.0, 0.01, {True}), (1.0, 0.0, {True}), (0.2, 0.01, {False}), (0.2, 0.0, {False})]
    assert groups(from_the_start) == expected
    assert sum(len(g["params"]) for g in from_the_start.param_groups) == len(list(captioner.parameters()))
    set_trainable(captioner, "cross")  # --unfreeze-after: the same groups, in the same order, later
    later = captioner.configure_optimizers(0.01, 1e-4, "cpu", lm_lr_scale=0.2)
    assert groups(later) == expected[:2]
    unfreeze_language_model(captioner, later, 0.01, 0.2)
    assert groups(later) == expected

    # and the training loop gives each group its rate: after a step, GPT-2's groups sit at --lm-lr / --lr of it
    _, features, _ = dataset
    tiny_lm_checkpoint(tmp_path / "lm.pt")
    run_script("train_caption.py", "--features-dir", features, "--init", tmp_path / "lm.pt", "--out-dir",
               tmp_path / "out", "--total-batch-size", 2, "--batch-size", 2, "--max-steps", 1, "--warmup-steps", 2,
               "--lr", 1e-3, "--lm-lr", 1e-4, "--train", "all", "--eval-every", 0, "--val-images", 1, "--device", "cpu")
    saved = torch.load(tmp_path / "out" / "model_000001.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in saved] == pytest.approx([5e-4, 5e-4, 5e-5, 5e-5])  # warmup step 1 of 2


def test_best_pt_changes_only_when_val_cider_improves(dataset, tmp_path, monkeypatch, capsys):
    import sys
    import caption_eval
    import train_caption
    from test_train_gpt2 import FakeWandb
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    _, features, _ = dataset
    tiny_lm_checkpoint(tmp_path / "lm.pt")
    ciders = iter([0.1, 0.3, 0.2, 0.3, 0.25])  # step 0, 1, 2, 3 and the end (4)
    written = []
    real_cider = caption_eval.cider_d
    monkeypatch.setattr(caption_eval, "cider_d", lambda *a, **k: real_cider(*a, **k) * 0 + next(ciders))
    real_save = train_caption.save_checkpoint
    monkeypatch.setattr(train_caption, "save_checkpoint",
                        lambda checkpoint, path: (written.append((os.path.basename(path), checkpoint["step"])),
                                                  real_save(checkpoint, path)))
    out = tmp_path / "out"
    train_caption.main(train_caption.parse_args([
        "--features-dir", str(features), "--init", str(tmp_path / "lm.pt"), "--out-dir", str(out),
        "--total-batch-size", "2", "--batch-size", "2", "--max-steps", "4", "--eval-every", "1", "--save-every", "10",
        "--val-images", "1", "--eval-cider-images", "2", "--device", "cpu", "--wandb-project", "captions"]))
    assert [w for w in written if w[0] == "best.pt"] == [("best.pt", 0), ("best.pt", 1)]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["kind"] == "caption" and best["step"] == 1 and best["cider"] == 0.3
    assert read_log(out, "cider") == {0: 0.1, 1: 0.3, 2: 0.2, 3: 0.3, 4: 0.25}
    import coco
    scored = min(2, len(coco.load_split(str(features), "val").image_ids))  # the images there are, of the 2 asked for
    assert f"val CIDEr-D 30.0 ({scored} images) | new best: best.pt" in capsys.readouterr().out
    # the best so far travels with the periodic checkpoint, so a resumed run keeps comparing with it
    assert torch.load(out / "model_000004.pt", weights_only=True)["best_cider"] == 0.3
    # and wandb got the same numbers
    assert [values["val_cider"] for _, values in wandb.logged if "val_cider" in values] == [0.1, 0.3, 0.2, 0.3, 0.25]
    assert [step for step, values in wandb.logged if "train_loss" in values] == [0, 1, 2, 3]


@pytest.mark.parametrize("train", ["cross+mlp", "all"])
def test_exactly_what_train_names_changes(dataset, tmp_path, train, capsys):
    import train_caption
    from model import is_cross_attn_param
    _, features, _ = dataset
    lm = tiny_lm_checkpoint(tmp_path / "lm.pt").state_dict()
    train_caption.main(train_caption.parse_args([
        "--features-dir", str(features), "--init", str(tmp_path / "lm.pt"), "--out-dir", str(tmp_path / "out"),
        "--total-batch-size", "2", "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3", "--warmup-steps", "1",
        "--eval-every", "0", "--val-images", "1", "--eval-cider-images", "0", "--device", "cpu", "--train", train]))
    trained = torch.load(tmp_path / "out" / "model_000002.pt", weights_only=True)["model"]
    changed = {name for name, tensor in trained.items() if name not in lm or not torch.equal(tensor, lm[name])}
    gpt2_changed = {name for name in changed if not is_cross_attn_param(name)}
    if train == "all":
        assert gpt2_changed == set(lm)  # lm_head.weight too: it is tied to transformer.wte.weight
    else:
        assert gpt2_changed == {name for name in lm if ".mlp." in name or ".ln_" in name}
    assert {name for name in trained if is_cross_attn_param(name)} <= changed
    n_trainable = sum(t.numel() for name, t in trained.items() if name in changed and name != "lm_head.weight")
    assert f"{n_trainable / 1e6:.1f}M of" in capsys.readouterr().out


def test_the_run_prints_the_numbers_it_names(monkeypatch, capsys, tmp_path):
    """A run on 4 val images printed "val CIDEr-D ... (500 images)", the count asked for, and its plan "3.5M of
    3.4M parameters train", two counts made differently. Each number is now the thing it names."""
    import argparse
    import caption_eval
    import train_caption
    from training import Distributed
    monkeypatch.setattr(caption_eval, "cider_d", lambda *a, **k: 0.25)
    val = argparse.Namespace(image_ids=[1, 2, 3, 4])
    args = argparse.Namespace(eval_cider_images=500, out_dir=str(tmp_path), batch_size=2, total_batch_size=2)
    train_caption.keep_best(None, val, Distributed(False, 0, 0, 1, "cpu"), "float32", args, {}, 3, best_cider=1.0)
    assert "val CIDEr-D 25.0 (4 images)" in capsys.readouterr().out
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, cross_attn_every=2, n_embd_img=16))
    monkeypatch.setattr(train_caption.coco, "describe_encoder", lambda record: "tiny")
    train_caption.print_plan(args, model, val, 20, {"encoder": None}, Distributed(False, 0, 0, 1, "cpu"), "float32",
                             False, 1, 10, None, 0)
    line = capsys.readouterr().out.splitlines()[0]
    total = sum(p.numel() for p in model.parameters())
    assert f"{total / 1e6:.1f}M of {total / 1e6:.1f}M parameters train" in line  # --train all: all of them


def test_captions_longer_than_the_model_are_refused_at_the_start(dataset, tmp_path):
    """--max-caption-tokens above the model's block_size failed at step 2, in the position embeddings."""
    import train_caption
    _, features, _ = dataset
    tiny_lm_checkpoint(tmp_path / "lm.pt")  # block_size 64
    with pytest.raises(ValueError, match="--max-caption-tokens 64: with its <.endoftext.> longer than the model's "
                                         "block_size 64"):
        train_caption.main(train_caption.parse_args([
            "--features-dir", str(features), "--init", str(tmp_path / "lm.pt"), "--out-dir", str(tmp_path / "out"),
            "--total-batch-size", "2", "--batch-size", "2", "--max-steps", "2", "--max-caption-tokens", "64",
            "--device", "cpu"]))


def test_a_resume_refuses_other_settings_another_encoder_and_another_split(dataset, tmp_path):
    """Features of another encoder of the same width, or of another dataset with as many images, trained on
    silently and the checkpoints were mislabelled: each is refused, as are flags that define the run."""
    import train_caption
    _, features, _ = dataset
    tiny_lm_checkpoint(tmp_path / "lm.pt")
    out = tmp_path / "out"
    args = lambda features_dir, *more: train_caption.parse_args([
        "--features-dir", str(features_dir), "--init", str(tmp_path / "lm.pt"), "--out-dir", str(out),
        "--total-batch-size", "2", "--batch-size", "2", "--max-steps", "3", "--eval-every", "0", "--device", "cpu",
        *more])
    train_caption.main(args(features, "--stop-at", "1"))
    with pytest.raises(ValueError, match=r"its run had --cross-attn-every 2 \(now 1\), --train cross \(now all\)"):
        train_caption.main(args(features, "--cross-attn-every", "1", "--train", "all", "--resume", "auto"))
    other_encoder = tmp_path / "other_encoder"
    shutil.copytree(features, other_encoder)
    meta = json.loads((other_encoder / "meta.json").read_text())
    meta["encoder"]["weights"] = "openai"  # the same architecture and width, other weights
    (other_encoder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="trained on features of ViT-B-32-quickgelu \\(none"):
        train_caption.main(args(other_encoder, "--resume", "auto"))
    other_split = tmp_path / "other_split"
    shutil.copytree(features, other_split)
    index = json.loads((other_split / "train_index.json").read_text())
    index["files"] = ["other_" + name for name in index["files"]]  # as many images, other pictures
    (other_split / "train_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="data order .* does not match"):
        train_caption.main(args(other_split, "--resume", "auto"))


def test_a_cuda_run_s_batches_are_pinned_and_contiguous_for_asynchronous_copies(dataset, monkeypatch):
    """Three blocking copies per micro-step were made from pageable memory; pinned, .to(non_blocking=True) lets
    them run while the CPU goes on. A slice of rows of a pinned tensor stays pinned only if it is contiguous."""
    import coco
    from train_caption import CaptionLoader
    _, features, _ = dataset
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t.shape) or t.clone())  # no CUDA here
    loader = CaptionLoader(coco.load_split(str(features), "train"), images_per_step=4, max_tokens=16,
                           pin_memory=True)
    image_feats, x, y, n_tokens = loader.next_step(rank=1, world_size=2)
    assert pinned == [image_feats.shape, x.shape, y.shape] and x.shape[0] == 2
    assert all(t.is_contiguous() and t[:1].is_contiguous() for t in (image_feats, x, y))
