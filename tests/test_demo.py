"""demo.py: the functions behind POST /caption called directly (good images, each kind of bad upload and
control, one line each), the server over HTTP (a refused size unread, a bug answered 500 and the server going
on), its start (a port in use, a missing checkpoint), and the page itself in headless Chromium. The captioner is
test_sample.py's tiny one (its TinyClip stands in for CLIP ViT-B/32: 1 + 7 x 7 tokens in a second, where building
the real architecture takes 8 s, 5.5 of them importing open_clip)."""
import base64
import http.client
import io
import json
import os
import runpy
import socket
import sys
import threading
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import coco
import demo
from scripts import ROOT
from test_sample import RecordingPreprocess, TinyClip, opened_decoder

CHROMIUM = "/usr/bin/chromium"  # Debian's; .ci/run installs it where it is missing
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls are too small to split: on this 2-core machine, busy with other jobs, a caption
    took 0.2 s on one thread and 1-9 s on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_clip():
    """coco.load_clip gives a TinyClip while the module's tests run (the captioner is built, and main loads it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coco, "load_clip", lambda name, weights, device: (TinyClip().eval(), RecordingPreprocess()))
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A caption checkpoint whose cross-attention is open and sharpened (random weights, queries x 30), so each
    image and word gets maps of its own, peaked as a trained model's are rather than flat."""
    model, path = opened_decoder(), tmp_path_factory.mktemp("demo") / "caption.pt"
    with torch.no_grad():
        for block in model.transformer.h:
            if hasattr(block, "xattn"):
                block.xattn.c_q.weight.mul_(30)
    torch.save({"kind": "caption", "model": model.state_dict(), "config": asdict(model.config), "step": 0,
                "clip": {"model": "tiny", "pretrained": "none"}}, path)
    return path


@pytest.fixture(scope="module")
def captioner(checkpoint, tiny_clip):
    return demo.load_captioner(str(checkpoint), "cpu")  # as main loads it


@pytest.fixture(scope="module")
def server(captioner):
    """The server on a free port, in a thread."""
    with demo.open_server("127.0.0.1", 0, 1 << 20, captioner) as running:
        thread = threading.Thread(target=running.serve_forever, daemon=True)
        thread.start()
        yield running
        running.shutdown()


def image_bytes(kind, width=64, height=48):
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[10:30, 20:50] = (220, 30, 30)  # a red block: something in the noise to look at
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, kind)
    return out.getvalue()


def post(server, body, query="", headers=None):
    """POST /caption -> (status, JSON answer); headers replace the Content-Length http.client would send."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.putrequest("POST", "/caption" + query)
    for name, value in (headers if headers is not None else {"Content-Length": str(len(body))}).items():
        connection.putheader(name, value)
    connection.endheaders(body)
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return answer


# -----------------------------------------------------------------------------
# The functions behind POST /caption


@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
def test_an_image_gets_its_caption_a_map_per_word_and_the_seconds(captioner, kind):
    result = demo.caption_upload(captioner, image_bytes(kind), beam_size=3)
    assert set(result) == {"caption", "words", "seconds"} and result["seconds"] > 0
    words = [entry["word"] for entry in result["words"]]
    assert result["caption"] and words and "".join(words).replace(" ", "") == result["caption"].replace(" ", "")
    for entry in result["words"]:
        assert entry["map"].startswith("data:image/png;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(entry["map"].split(",", 1)[1])))
        assert (picture.format, picture.size, picture.mode) == ("PNG", (demo.MAP_SIZE, demo.MAP_SIZE), "RGB")
    assert len({entry["map"] for entry in result["words"]}) > 1  # each word looked somewhere else


def test_heat_map_is_bright_where_the_word_looked():
    grid = np.zeros((7, 7), dtype=np.float32)
    grid[1, 5] = 1.0  # row 1 (near the top), column 5 (right)
    uri = demo.heat_map(Image.new("RGB", (224, 224), (128, 128, 128)), grid, top=1.0)
    brightness = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L"))
    row, col = np.unravel_index(brightness.argmax(), brightness.shape)
    assert (row * 7 // demo.MAP_SIZE, col * 7 // demo.MAP_SIZE) == (1, 5)


def truncated_png():
    return image_bytes("PNG")[:300]


@pytest.mark.parametrize("body, message", [
    (b"", "empty upload: no image came with the request"),
    (b"%PDF-1.4 not a picture", "not an image (PNG, JPEG, WebP, GIF, ...: what Pillow reads)"),
    (truncated_png(), "not a readable image (image file is truncated"),
    (image_bytes("JPEG")[:400], "not a readable image ("),  # Pillow 13: (Truncated File Read)
])
def test_a_bad_upload_is_refused_in_one_line(captioner, body, message):
    with pytest.raises(demo.Refused) as refused:
        demo.caption_upload(captioner, body)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value) and refused.value.status == 400


@pytest.mark.parametrize("limit", [1000, 2000])  # a 64 x 48 image (3,072 pixels) is over twice it, or once only
def test_a_decompression_bomb_is_refused_before_it_is_decoded(captioner, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # PIL's error past twice the limit, its warning past it
    with pytest.raises(demo.Refused, match=r"^too large to decode safely \(Image size \(3072 pixels\) exceeds"):
        demo.caption_upload(captioner, image_bytes("PNG"))


@pytest.mark.parametrize("query, controls", [
    ("", (3, None)),  # beam search, the page's defaults
    ("beam=1&temperature=0", (1, None)),  # greedy
    ("beam=5&temperature=0.7", (None, 0.7)),  # a temperature samples: the beam is not asked for
])
def test_controls_choose_beam_search_or_sampling(query, controls):
    assert demo.read_controls(query) == controls


@pytest.mark.parametrize("query, message", [
    ("beam=0", "beam size '0': must be a whole number from 1 (greedy) to 10"),
    ("beam=11", "beam size '11': must be a whole number from 1 (greedy) to 10"),
    ("beam=2.5", "beam size '2.5': must be"),
    ("beam=" + "9" * 5000, "beam size '999"),  # more digits than int() reads
    ("beam=", "beam size '': must be"),  # the box left empty: said, not taken for the default
    ("temperature=nan", "temperature 'nan': must be a number >= 0 (0: beam search, above 0: sample)"),
    ("temperature=-1", "temperature '-1': must be"),
    ("temperature=inf", "temperature 'inf': must be"),
    ("temperature=warm", "temperature 'warm': must be"),
])
def test_bad_controls_are_refused_in_one_line(query, message):
    with pytest.raises(demo.Refused) as refused:
        demo.read_controls(query)
    assert str(refused.value).startswith(message) and refused.value.status == 400


# -----------------------------------------------------------------------------
# The server over HTTP


def test_an_upload_over_the_limit_is_refused_from_its_content_length_unread(server):
    # no body follows these headers: a server that read the upload would wait for it, and the test time out
    status, answer = post(server, b"", headers={"Content-Length": str(25 << 20)})
    assert (status, answer) == (413, {"error": "25.0 MB: over the 1 MB this server takes (--max-upload-mb)"})


@pytest.mark.parametrize("headers, status, message", [
    ({}, 411, "no Content-Length: send the image itself as the request's body"),
    ({"Content-Length": "-5"}, 400, "Content-Length '-5': not a number of bytes"),
    # more digits than int() reads
    ({"Content-Length": "9" * 5000}, 400, f"Content-Length '{'9' * 5000}': not a number of bytes"),
])
def test_a_request_without_a_usable_length_is_refused(server, headers, status, message):
    assert post(server, b"", headers=headers) == (status, {"error": message})


def test_bad_controls_and_images_are_4xx_json(server):
    assert post(server, image_bytes("PNG"), "?beam=0")[0] == 400
    assert post(server, b"hello") == (400, {"error": "not an image (PNG, JPEG, WebP, GIF, ...: what Pillow reads)"})


def test_a_bug_is_a_500_in_one_line_and_the_server_goes_on(server, monkeypatch, capsys):
    def failing(*args):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")
    with monkeypatch.context() as patch:
        patch.setattr(demo, "caption_upload", failing)
        assert post(server, image_bytes("PNG")) == (500, {"error": "the server failed (RuntimeError: CUDA out of "
                                                                    "memory.)"})
    err = capsys.readouterr().err
    assert "demo.py: /caption: RuntimeError: CUDA out of memory.\n" in err and "Traceback" not in err
    status, answer = post(server, image_bytes("PNG"))
    assert status == 200 and answer["caption"]


# -----------------------------------------------------------------------------
# Starting


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the checkpoint is missing too: the port is what main says, before it would look for the model
        with pytest.raises(ValueError, match=f"^--host 127.0.0.1 --port {port}: cannot serve there \\(Address "
                                             f"already in use\\)$"):
            demo.main(["--checkpoint", str(tmp_path / "nope.pt"), "--port", str(port), "--device", "cpu"])


@pytest.mark.parametrize("flags", [["--port", "70000"], ["--port", "-1"], ["--max-upload-mb", "0"]])
def test_bad_flags_are_one_line(flags, capsys):
    with pytest.raises(SystemExit) as stopped:
        demo.parse_args(flags)
    assert stopped.value.code == 2 and f"argument {flags[0]}: must be" in capsys.readouterr().err


def test_a_missing_checkpoint_is_one_line_and_a_failed_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["demo.py", "--checkpoint", str(tmp_path / "nope.pt"), "--port", "0"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(os.path.join(ROOT, "demo.py"), run_name="__main__")
    assert stopped.value.code == f"demo.py: {tmp_path / 'nope.pt'}: no such checkpoint file"


def test_main_prints_the_url_and_warns_when_open_to_the_network(checkpoint, tiny_clip, monkeypatch, capsys):
    def serve(server):
        raise KeyboardInterrupt  # what Ctrl-C does to serve_forever
    monkeypatch.setattr(demo.DemoServer, "serve_forever", serve)
    with pytest.raises(KeyboardInterrupt):
        demo.main(["--checkpoint", str(checkpoint), "--host", "0.0.0.0", "--port", "0", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert out.startswith("demo.py: serving on http://0.0.0.0:") and out.endswith(" (Ctrl-C to stop)\n")
    assert "demo.py: warning: --host 0.0.0.0 opens the page to the network" in err


# -----------------------------------------------------------------------------
# The page, in a real browser


def test_the_page_captions_an_upload_and_shows_a_bad_one_s_error(server, captioner):
    """A user's machine without Chromium skips this; CI (GPT2_CAPTION_CI, set by .ci/run) never does.
    DEMO_SCREENSHOT=page.png keeps a picture of the captioned page."""
    if not os.path.exists(CHROMIUM) and not os.environ.get("GPT2_CAPTION_CI"):
        pytest.skip(f"no {CHROMIUM} to show the page in (Debian: apt-get install chromium; CI fails here instead)")
    from playwright.sync_api import sync_playwright
    png = image_bytes("PNG")
    expected = demo.caption_upload(captioner, png, 3, None)  # the page's defaults: beam size 3, temperature 0
    with pytest.raises(demo.Refused) as refused:
        demo.caption_upload(captioner, b"just some notes")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto("http://%s:%d/" % server.server_address[:2])
            done = "#timing:not([hidden]), #error:not(:empty)"
            page.set_input_files("#file", {"name": "red.png", "mimeType": "image/png", "buffer": png})
            page.wait_for_selector(done, timeout=20_000)
            assert page.text_content("#error") == ""
            assert page.text_content("#caption") == expected["caption"]
            assert page.locator("#words figcaption").all_text_contents() == [w["word"] for w in expected["words"]]
            assert page.eval_on_selector_all("#words img", f"pictures => pictures.every(p => p.complete && "
                                                           f"p.naturalWidth === {demo.MAP_SIZE})")
            assert float(page.text_content("#seconds")) > 0
            if os.environ.get("DEMO_SCREENSHOT"):
                page.screenshot(path=os.environ["DEMO_SCREENSHOT"], full_page=True)

            page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain",
                                           "buffer": b"just some notes"})
            page.wait_for_selector("#error:not(:empty)", timeout=20_000)
            assert page.text_content("#error") == f"notes.txt: {refused.value}"
            assert page.text_content("#caption") == "" and page.locator("#words figure").count() == 0

            # over the server's 1 MB: refused by the page itself, as the server would refuse it
            page.set_input_files("#file", {"name": "huge.png", "mimeType": "image/png", "buffer": bytes(3 << 19)})
            page.wait_for_selector("#error:has-text('huge.png')", timeout=20_000)
            assert page.text_content("#error") == "huge.png: 1.5 MB: over the 1 MB this server takes (--max-upload-mb)"
        finally:
            browser.close()
