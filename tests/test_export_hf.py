"""export_hf.py and its save_pretrained: a checkpoint of ours, exported, is the same model in transformers (same
logits, same greedy tokens) and comes back through GPT.from_pretrained with the same weights; a captioner
exports its language model and says what it left out (--captioner: all of it, in our own format; its round trip is
in test_sample.py); GPT-2's tokenizer goes along when tiktoken has it; the model card says what the run recorded and
no more; --push-to-hub is tested against a stand-in HfApi."""
import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import huggingface_hub.errors
import pytest
import requests
import safetensors.torch
import tiktoken
import tiktoken.load
import torch
import transformers  # test-only: the independent reader of the export
from safetensors import SafetensorError

import export_hf
from export_hf import save_pretrained
from generate import generate
from model import EOT_TOKEN, GPT, GPT2_VOCAB_SIZE, GPTConfig
from scripts import ROOT


def trained_looking(config):
    """A model whose every weight is off its initial value, so a missed transpose, bias or LayerNorm shows."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def save_checkpoint(model, path, kind):
    torch.save({"kind": kind, "model": model.state_dict(), "config": asdict(model.config), "step": 0}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny language-model checkpoint and its export, made by the command-line entry point."""
    folder = tmp_path_factory.mktemp("export")
    model = trained_looking(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    checkpoint = save_checkpoint(model, folder / "model_000010.pt", "lm")
    assert export_hf.main([str(checkpoint), str(folder / "hf")]) == 0
    return model, folder / "hf"


def test_transformers_gives_the_same_logits_and_greedy_tokens(exported):
    ours, folder = exported
    hf, loading = transformers.GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
    hf.eval()
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 64))  # every position up to block_size
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert expected.shape == (2, 64, GPT2_VOCAB_SIZE)  # the padding rows are cut off
    assert (logits[..., :GPT2_VOCAB_SIZE] - expected).abs().max().item() <= 1e-4

    prompt = torch.randint(0, EOT_TOKEN, (1, 5))
    theirs = hf.generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=EOT_TOKEN,
                         attention_mask=torch.ones_like(prompt))
    mine = generate(ours, prompt, max_new_tokens=30, temperature=0)  # stops at <|endoftext|>; theirs goes on
    assert mine.size(1) > prompt.size(1) + 5 and torch.equal(mine, theirs[:, :mine.size(1)])


def test_from_pretrained_reads_the_export_back_weight_for_weight(exported):
    ours, folder = exported
    back = GPT.from_pretrained(str(folder))
    assert back.config == ours.config
    original, loaded = ours.state_dict(), back.state_dict()
    assert original.keys() == loaded.keys()
    for name, tensor in original.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):  # the padding rows are not exported: zeros
            assert torch.equal(loaded[name][:GPT2_VOCAB_SIZE], tensor[:GPT2_VOCAB_SIZE])
            assert not loaded[name][GPT2_VOCAB_SIZE:].any()
        else:
            assert torch.equal(loaded[name], tensor), name


def test_config_describes_gpt2(exported):
    ours, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["n_positions"], config["n_layer"], config["n_head"], config["n_embd"]) == (64, 2, 2, 64)
    assert config["vocab_size"] == GPT2_VOCAB_SIZE and ours.config.vocab_size == 50304  # padding cut off
    assert config["activation_function"] == "gelu_new" and config["n_inner"] is None


def test_tokenizer_files_come_from_tiktoken_and_encode_alike(exported):
    _, folder = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tiktoken.get_encoding("gpt2")
    for text in ["Hello, I'm a language model,", " A man is sitting on a roof. he", "café  \n\n 2024 <|endoftext|>"]:
        assert tokenizer(text)["input_ids"] == enc.encode(text, allowed_special="all"), text
    assert tokenizer.eos_token_id == EOT_TOKEN and tokenizer.model_max_length == 64


def offline(url):  # what tiktoken's fetch raises with no network
    raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")


@pytest.mark.parametrize("fetch", ["downloads", "offline", "damaged"])
def test_tokenizer_files_come_as_tiktoken_gets_them_else_the_export_names_the_matching_one(
        fetch, exported, tmp_path, monkeypatch, capsys):
    """Through tiktoken's public read_file_cached, not a copy of its private cache layout: an empty cache downloads
    (it was 'not in the cache', no tokenizer); offline or damaged, the model is still exported and a note says which
    tokenizer matches."""
    ours, _ = exported
    checkpoint = save_checkpoint(ours, tmp_path / "lm.pt", "lm")
    downloads = {url: tiktoken.load.read_file_cached(url, sha256)  # from the shared cache, before it is emptied
                 for url, sha256 in export_hf.GPT2_TOKENIZER_FILES.values()}
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", {"downloads": downloads.__getitem__, "offline": offline,
                                                     "damaged": lambda url: downloads[url][:-100]}[fetch])
    assert export_hf.main([str(checkpoint), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    if fetch == "downloads":
        vocab_url = export_hf.GPT2_TOKENIZER_FILES["vocab.json"][0]
        assert (tmp_path / "hf" / "vocab.json").read_bytes() == downloads[vocab_url]
        assert (tmp_path / "hf" / "tokenizer_config.json").exists()
    else:
        assert not (tmp_path / "hf" / "vocab.json").exists()
        assert 'AutoTokenizer.from_pretrained("gpt2")' in capsys.readouterr().err


def test_captioner_exports_its_language_model_and_says_so(tmp_path, capsys):
    captioner = trained_looking(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, cross_attn_every=2,
                                          n_embd_img=32))
    with pytest.raises(ValueError, match="cross-attention"):  # from Python, leaving layers out is asked for
        save_pretrained(captioner, tmp_path / "refused")
    checkpoint = save_checkpoint(captioner, tmp_path / "caption.pt", "caption")
    assert export_hf.main([str(checkpoint), str(tmp_path / "hf")]) == 0
    assert "cross-attention layers and image projection" in capsys.readouterr().err
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 16))
    with torch.no_grad():  # the export is the captioner with no image: its language model
        difference = hf(idx).logits - captioner(idx)[0][..., :GPT2_VOCAB_SIZE]
    assert difference.abs().max().item() <= 1e-4


def test_help_states_what_happens_to_a_captioner(capsys):
    with pytest.raises(SystemExit):
        export_hf.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "A caption checkpoint (train_caption.py) is exported as its language model: the cross-attention " \
           "layers and the image projection are left out" in help_text


def test_export_runs_without_transformers(exported, tmp_path):
    """transformers is a test-only dependency: the export is written with safetensors and json alone."""
    ours, _ = exported
    checkpoint = save_checkpoint(ours, tmp_path / "lm.pt", "lm")
    blocked = ("import sys; sys.modules['transformers'] = None  # any `import transformers` now fails\n"
               "import export_hf; sys.exit(export_hf.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", blocked, str(checkpoint), str(tmp_path / "hf")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_bad_paths_are_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        export_hf.main([str(tmp_path / "nope.pt"), str(tmp_path / "hf")])
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit):
        export_hf.parse_args([str(tmp_path / "nope.pt"), str(tmp_path / "taken")])
    assert "taken: is a file, not a folder" in capsys.readouterr().err


FULL_DISK = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing, error, message", [
    ("json.dump", FULL_DISK, r"export not written \(No space left on device\); the previous one"),  # config.json
    ("save_file", FULL_DISK, r"export not written \(No space left on device\); the previous one"),  # the weights
    # what safetensors really raises on a full disk (measured on a 64 KB tmpfs): it was a traceback
    ("save_file", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     r"export not written \(.*No space left on device.*\); the previous one"),
    ("write_tokenizer", FULL_DISK, r"export not written \(No space left on device\); the previous one"),
    ("tempfile.mkdtemp", OSError(errno.EROFS, os.strerror(errno.EROFS)), r"cannot write there \(Read-only file"),
], ids=["config", "weights", "weights, as safetensors says it", "tokenizer", "read-only parent folder"])
def test_a_failed_export_leaves_the_previous_one_whole(exported, tmp_path, monkeypatch, failing, error, message):
    """A full disk (or a kill) mid-export left a new config.json beside the old weights: loadable by nothing. The
    export is written beside the folder and swapped in only when complete; a failure is one line."""
    ours, _ = exported
    checkpoint = save_checkpoint(ours, tmp_path / "lm.pt", "lm")
    out = tmp_path / "hf"
    assert export_hf.main([str(checkpoint), str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(f"export_hf.{failing}", fail)
    with pytest.raises(ValueError, match=f"{out}: {message}"):
        export_hf.main([str(checkpoint), str(out)])
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["hf", "lm.pt"]  # no half-written folder left beside it


def test_an_export_never_replaces_a_folder_holding_other_files(exported, tmp_path):
    ours, _ = exported
    checkpoint = save_checkpoint(ours, tmp_path / "lm.pt", "lm")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes: holds todo.txt, not part of an export"):
        export_hf.main([str(checkpoint), str(tmp_path / "notes")])
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]


# -----------------------------------------------------------------------------
# The model card, --push-to-hub, --captioner


def training_run(folder, model, recorded):
    """A run's folder as train_gpt2.py leaves it: a checkpoint at step 300 and, if `recorded`, its args, run.json
    and a log.txt with val and HellaSwag numbers before, at and after that step."""
    folder.mkdir()
    checkpoint = {"kind": "lm", "model": model.state_dict(), "config": asdict(model.config), "step": 300}
    if recorded:
        checkpoint["args"] = {"total_batch_size": 4096, "data_dir": "edu_fineweb10B"}
        (folder / "run.json").write_text(json.dumps({"command": "train_gpt2.py --max-steps 500", "args": {}}))
        (folder / "log.txt").write_text("100 val 4.5000\n100 hella 0.2600\n300 train 3.912345\n300 val 3.9000\n"
                                        "500 val 3.1000\n500 hella 0.3100\n")  # step 500: other weights than these
    torch.save(checkpoint, folder / "model_000300.pt")
    return folder / "model_000300.pt"


@pytest.mark.parametrize("recorded", [True, False], ids=["the run's record", "a bare checkpoint"])
def test_the_model_card_says_what_the_run_recorded_and_never_more(recorded, exported, tmp_path):
    ours, _ = exported
    checkpoint = training_run(tmp_path / "log", ours, recorded)
    assert export_hf.main([str(checkpoint), str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\nlibrary_name: transformers\n")  # the hub's front matter
    assert "| checkpoint | `model_000300.pt`, step 300 |" in card
    assert f'GPT2LMHeadModel.from_pretrained("{tmp_path / "hf"}")' in card
    if recorded:
        assert "| tokens seen | 1,228,800 (300 steps x 4,096) |" in card
        assert "| data | `--data-dir edu_fineweb10B` |" in card
        assert "| val loss | 3.9000 (step 300, log.txt) |" in card  # not step 500's 3.1000
        assert "| HellaSwag acc_norm | 0.2600 (step 100, log.txt) |" in card
        assert "Trained with: `train_gpt2.py --max-steps 500`" in card
    else:
        assert "| tokens seen | not recorded |" in card and "| val loss | not logged |" in card
        assert "| HellaSwag acc_norm | not logged |" in card and "Trained with: not recorded" in card


class StandInHfApi:
    """Records what export_hf.py asks of the hub, and what the folder it uploads holds at that moment."""
    calls = []
    fails = None  # (method, exception) to raise instead

    def create_repo(self, repo_id, **options):
        self.record("create_repo", repo_id, options)

    def upload_folder(self, folder_path, repo_id, **options):
        self.record("upload_folder", repo_id, sorted(os.listdir(folder_path)))

    def record(self, method, *what):
        if self.fails and self.fails[0] == method:
            raise self.fails[1]
        self.calls.append((method, *what))


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(StandInHfApi, "calls", [])
    monkeypatch.setattr(export_hf, "HfApi", StandInHfApi)
    return StandInHfApi


def test_push_to_hub_uploads_the_finished_export(exported, hub, tmp_path):
    ours, _ = exported
    checkpoint = save_checkpoint(ours, tmp_path / "lm.pt", "lm")
    assert export_hf.main([str(checkpoint), str(tmp_path / "hf"), "--push-to-hub", "me/gpt2-tiny"]) == 0
    files = sorted(os.listdir(tmp_path / "hf"))
    assert "README.md" in files and "model.safetensors" in files
    assert hub.calls == [("create_repo", "me/gpt2-tiny", {"exist_ok": True}), ("upload_folder", "me/gpt2-tiny", files)]
    assert 'GPT2LMHeadModel.from_pretrained("me/gpt2-tiny")' in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.parametrize("method, error", [
    ("create_repo", huggingface_hub.errors.LocalTokenNotFoundError("Token is required but no token found.")),
    ("upload_folder", ConnectionError("Failed to resolve 'huggingface.co'")),
], ids=["not logged in", "offline"])
def test_a_failed_push_changes_nothing_and_says_how_to_log_in(method, error, exported, hub, tmp_path, monkeypatch):
    ours, _ = exported
    checkpoint = save_checkpoint(ours, tmp_path / "lm.pt", "lm")
    out = tmp_path / "hf"
    assert export_hf.main([str(checkpoint), str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    monkeypatch.setattr(hub, "fails", (method, error))
    with pytest.raises(ValueError, match=rf"^--push-to-hub me/x: not pushed \({type(error).__name__}: .*\), and "
                                         rf"nothing written; be online and logged in \(hf auth login, or set "
                                         rf"HF_TOKEN\)"):
        export_hf.main([str(checkpoint), str(out), "--push-to-hub", "me/x"])
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["hf", "lm.pt"]


@pytest.mark.parametrize("repo_id", ["gpt2-tiny", "me/gpt2/tiny", "me/", "/gpt2-tiny", "me/gpt2 tiny"])
def test_push_to_hub_needs_user_slash_name_before_any_work(repo_id, capsys):
    with pytest.raises(SystemExit):
        export_hf.parse_args(["lm.pt", "hf", "--push-to-hub", repo_id])
    assert f"--push-to-hub {repo_id}: not a hub repository id, USER/NAME" in capsys.readouterr().err


def test_captioner_whole_keeps_our_names_and_records_its_encoder(tmp_path):
    captioner = trained_looking(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, cross_attn_every=2,
                                          n_embd_img=32))
    encoder = {"name": "ViT-B-32-quickgelu", "weights": "openai", "image_size": 224, "prefix_tokens": 1,
               "preprocess": None}
    torch.save({"kind": "caption", "model": captioner.state_dict(), "config": asdict(captioner.config), "step": 5,
                "encoder": encoder}, tmp_path / "caption.pt")
    assert export_hf.main([str(tmp_path / "caption.pt"), str(tmp_path / "hf"), "--captioner"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == {"kind": "caption", "config": asdict(captioner.config), "step": 5, "encoder": encoder}
    weights = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert weights.keys() == captioner.state_dict().keys() - {"lm_head.weight"}  # tied to wte: written once
    for name, tensor in weights.items():  # cross-attention and image projection included
        assert torch.equal(tensor, captioner.state_dict()[name]), name
    assert "Captioner.from_pretrained" in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.parametrize("kind, message", [("lm", "a language model; --captioner is for train_caption.py's"),
                                           ("caption", "records no image encoder")])
def test_captioner_flag_needs_a_captioner_that_records_its_encoder(kind, message, exported, tmp_path):
    ours, _ = exported
    checkpoint = save_checkpoint(ours, tmp_path / "model.pt", kind)
    with pytest.raises(ValueError, match=f"model.pt: {message}"):
        export_hf.main([str(checkpoint), str(tmp_path / "hf"), "--captioner"])
    assert not (tmp_path / "hf").exists()


def test_an_export_into_a_symlink_replaces_the_targets_export_and_keeps_the_link(exported, tmp_path):
    """The link itself was renamed away and replaced by a folder: the target kept its old export, and a
    .export_hf.*.old link was left beside it at each export."""
    ours, earlier = exported
    shutil.copytree(earlier, tmp_path / "real")
    os.symlink("real", tmp_path / "link")
    smaller = trained_looking(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=64))
    checkpoint = save_checkpoint(smaller, tmp_path / "lm.pt", "lm")
    assert export_hf.main([str(checkpoint), str(tmp_path / "link")]) == 0
    assert os.readlink(tmp_path / "link") == "real" and sorted(os.listdir(tmp_path)) == ["link", "lm.pt", "real"]
    assert json.loads((tmp_path / "real" / "config.json").read_text())["n_layer"] == 1


def test_the_exported_files_are_readable_as_any_new_file_is(exported, tmp_path):
    """safetensors writes model.safetensors 0600: colleagues and an lm-eval job under another account could not
    read the weights."""
    checkpoint = save_checkpoint(exported[0], tmp_path / "lm.pt", "lm")
    umask = os.umask(0o022)
    try:
        export_hf.main([str(checkpoint), str(tmp_path / "out")])
    finally:
        os.umask(umask)
    modes = {name: oct(os.stat(tmp_path / "out" / name).st_mode & 0o777) for name in os.listdir(tmp_path / "out")}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_the_export_folder_is_readable_as_any_new_folder_is(tmp_path):
    """tempfile.mkdtemp makes 0700 folders: the export, swapped in from one, was unreadable to colleagues."""
    import export_hf
    umask = os.umask(0o022)
    try:
        with export_hf.export_folder(str(tmp_path / "out")):
            pass
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
