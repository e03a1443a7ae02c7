"""
A web page to try a captioner: drop a photo on it, read its caption and see where each word looked.

    python demo.py --checkpoint log_caption/best.pt     # then open http://127.0.0.1:7860
    python demo.py --checkpoint USER/captioner --port 8000   # export_hf.py --captioner's folder or hub id
    python demo.py --checkpoint log_caption/best.pt --host 0.0.0.0   # other machines too: anyone who reaches it

The page sends the image to POST /caption (beam size and temperature in the query) and shows the caption, one
picture per word of its attention over the image (as sample.py --attention-map draws them) and the seconds it
took. A bad upload (no image, a broken or oversized one) or a control out of range gets one line on the page.

A page of our own rather than gradio: gradio would bring a web framework and its dependencies (its 4.x
requirements.txt lists 27 packages, fastapi, pandas and uvicorn among them), where this is the standard
library's http.server and a few dozen lines of HTML and JavaScript a reader can follow. It needs no network,
not even for its page, and its tests drive it in a real browser.
"""

import argparse
import base64
import io
import json
import math
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from caption_eval import choose_checkpoint
from sample import Captioner, decode_image, encoder_view, upsample
from training import HelpFormatter, existing_device, positive_int, use_device

MAX_BEAM = 10  # one request at a time holds the model: a huge beam would keep everyone else waiting
MAP_SIZE = 112  # px, each word's picture: half the 224 px the encoder sees, small enough for a row of them
# matplotlib's "inferno" (as sample.py --attention-map uses) at 0, 1/4, 1/2, 3/4 and 1, read from matplotlib 3.11:
# interpolated between these, dark to bright, without requiring matplotlib
INFERNO = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


class Refused(Exception):
    """A request answered with a 4xx status and this one-line reason: the user's to fix, not a bug."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def read_controls(query):
    """The page's controls, from the query string ("beam=3&temperature=0") -> (beam_size, temperature) as
    Captioner.caption takes them: temperature 0 means beam search, (beam, None); above 0 it samples, (None, t)."""
    values = {name: values[-1] for name, values in parse_qs(query, keep_blank_values=True).items()}
    beam, temperature = values.get("beam", "3"), values.get("temperature", "0")
    if beam not in [str(size) for size in range(1, MAX_BEAM + 1)]:
        raise Refused(f"beam size {beam!r}: must be a whole number from 1 (greedy) to {MAX_BEAM}")
    try:
        value = float(temperature)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise Refused(f"temperature {temperature!r}: must be a number >= 0 (0: beam search, above 0: sample)")
    return (None, value) if value > 0 else (int(beam), None)


def decode_upload(body, size=None):
    """Image bytes -> a decoded RGB PIL image, as sample.open_image decodes a file (sample.decode_image: a JPEG
    at reduced size, all of it now: PIL is lazy, and a truncated file fails only when its pixels are read)."""
    if not body:
        raise Refused("empty upload: no image came with the request")
    try:
        # PIL only warns between MAX_IMAGE_PIXELS (~89M) and twice that, and decodes: a server that anyone can
        # send a picture to refuses from the warning on (a 179M-pixel PNG would take ~540 MB to decode)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode_image(io.BytesIO(body), size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Refused(f"too large to decode safely ({e})") from None
    except Image.UnidentifiedImageError:  # its message names a BytesIO object, no help to the user
        raise Refused("not an image (PNG, JPEG, WebP, GIF, ...: what Pillow reads)") from None
    except (OSError, SyntaxError, ValueError) as e:  # a truncated or corrupt file of a known format
        raise Refused(f"not a readable image ({e})") from None


def heat_map(view, grid, top):
    """One word's attention, (rows, cols) -> a PNG data URI: its heat over the grey image, 60% heat as
    sample.attention_figure lays it, on one colour scale for all words (`top`: the brightest of them)."""
    heat = np.clip(upsample(grid, MAP_SIZE) / top, 0, 1)  # (S, S)
    colour = np.stack([np.interp(heat, np.linspace(0, 1, len(INFERNO)), INFERNO[:, c]) for c in range(3)], -1)
    grey = np.asarray(view.convert("L").resize((MAP_SIZE, MAP_SIZE), Image.BICUBIC), dtype=np.float32)[..., None]
    png = io.BytesIO()
    Image.fromarray(np.round(0.4 * grey + 0.6 * colour).astype(np.uint8)).save(png, "PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii")


def caption_upload(captioner, body, beam_size=None, temperature=None):
    """The uploaded bytes -> {"caption", "words": [{"word", "map"}], "seconds"}: the JSON POST /caption answers.
    seconds: encoding the image, decoding the caption and the one pass more that reads the attention."""
    image = decode_upload(body, captioner.decode_size)
    start = time.perf_counter()
    [caption], [attention] = captioner.caption([image], beam_size=beam_size, temperature=temperature,
                                               return_attention=True)
    seconds = time.perf_counter() - start
    view = encoder_view(image, captioner.image_size or 224)  # the square the patch grid covers
    top = float(attention.patches.max()) if attention.words else 1.0
    return {"caption": caption, "seconds": round(seconds, 3),
            "words": [{"word": word, "map": heat_map(view, grid, top)}
                      for word, grid in zip(attention.words, attention.patches)]}


# -----------------------------------------------------------------------------
# The page and the server: a thin layer over the functions above

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Try the captioner</title><link rel="icon" href="data:,"><style>
body { font: 16px system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; }
#drop { display: block; border: 2px dashed #888; border-radius: 8px; padding: 2em; text-align: center; }
#drop.over { background: #e8eeff; }
#image { display: block; max-width: 100%; max-height: 20em; margin: 1em 0; }
#caption { font-size: 1.5em; } #error { color: #b00020; } input[type=number] { width: 4em; }
figure { display: inline-block; margin: 0 .4em .4em 0; text-align: center; }
figure img { display: block; width: 112px; height: 112px; }
</style></head><body>
<h1>Try the captioner</h1>
<label id="drop">Drop an image here, or choose one: <input type="file" id="file" accept="image/*"></label>
<p><label>Beam size <input type="number" id="beam" min="1" max="MAX_BEAM" value="3"></label> (1: greedy)
<label>Temperature <input type="number" id="temperature" min="0" step="0.1" value="0"></label>
(above 0: sample at that temperature instead of beam search) <button id="go">Caption</button></p>
<p id="error"></p><img id="image" alt="" hidden><p id="caption"></p>
<p id="timing" hidden>Captioned in <span id="seconds"></span> s (encoding, decoding, the attention pass).
Where each word looked, bright: most.</p><div id="words"></div>
<script>
const maxBytes = MAX_UPLOAD_BYTES, $ = id => document.getElementById(id);
let file = null;
async function caption() {
  if (!file) return;
  for (const id of ["error", "caption", "seconds"]) $(id).textContent = "";
  $("words").replaceChildren(); $("timing").hidden = true;
  $("image").src = URL.createObjectURL(file);
  // checked here too: a server that refuses before reading resets the connection under a large upload
  if (file.size > maxBytes) return show({error: `${(file.size / 2 ** 20).toFixed(1)} MB: over the ` +
                                                `${maxBytes / 2 ** 20} MB this server takes (--max-upload-mb)`});
  $("go").disabled = true;
  const query = new URLSearchParams({beam: $("beam").value, temperature: $("temperature").value});
  try {
    show(await (await fetch("/caption?" + query, {method: "POST", body: file})).json());
  } catch (e) {
    show({error: `no answer from the server (${e.message})`});
  }
  $("go").disabled = false;
}
function show(result) {
  $("image").hidden = Boolean(result.error);
  if (result.error) return $("error").textContent = `${file.name}: ${result.error}`;
  $("caption").textContent = result.caption || "(no words: the model ended the caption at once)";
  $("seconds").textContent = result.seconds.toFixed(2);
  $("timing").hidden = false;
  for (const {word, map} of result.words) {
    const figure = document.createElement("figure"), img = document.createElement("img");
    const label = document.createElement("figcaption");
    img.src = map; img.alt = label.textContent = word;
    figure.append(img, label); $("words").append(figure);
  }
}
$("file").onchange = () => { file = $("file").files[0]; caption(); };
$("go").onclick = caption;
$("drop").ondragover = e => { e.preventDefault(); $("drop").classList.add("over"); };
$("drop").ondragleave = () => $("drop").classList.remove("over");
$("drop").ondrop = e => { e.preventDefault(); $("drop").ondragleave(); file = e.dataTransfer.files[0]; caption(); };
</script></body></html>
"""


class DemoHandler(BaseHTTPRequestHandler):
    timeout = 60  # s: a client that stops sending mid-upload frees its thread, not holds it forever

    def do_GET(self):
        if urlsplit(self.path).path != "/":
            return self.send_error(404, "the page is at /")
        page = PAGE.replace("MAX_UPLOAD_BYTES", str(self.server.max_upload_bytes)).replace("MAX_BEAM", str(MAX_BEAM))
        self.reply(200, page.encode("utf-8"), "text/html; charset=utf-8")

    def do_POST(self):
        url = urlsplit(self.path)
        try:
            # the body first: a connection closed on unread bytes is reset, and the browser sees no answer
            body = self.read_body()
            if url.path != "/caption":
                raise Refused(f"POST {url.path}: nothing here (images go to POST /caption)", 404)
            beam_size, temperature = read_controls(url.query)
            with self.server.lock:  # one request at a time through the model, and one image in memory
                status, answer = 200, caption_upload(self.server.captioner, body, beam_size, temperature)
        except Refused as e:
            status, answer = e.status, {"error": str(e)}
        except Exception as e:  # a bug, or the device out of memory: said in one line, and the server goes on
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
            print(f"demo.py: {self.path}: {message}", file=sys.stderr)
            status, answer = 500, {"error": f"the server failed ({message})"}
        self.reply(status, json.dumps(answer).encode("utf-8"), "application/json")

    def read_body(self):
        """The upload, refused by its Content-Length, before a byte of it is read, when it is over the limit."""
        length, limit = self.headers.get("Content-Length"), self.server.max_upload_bytes
        if length is None:
            raise Refused("no Content-Length: send the image itself as the request's body", 411)
        if not (length.isascii() and length.isdigit() and len(length) < 19):  # int() raises past 4,300 digits
            raise Refused(f"Content-Length {length!r}: not a number of bytes")
        if int(length) > limit:
            raise Refused(f"{int(length) / 2 ** 20:.1f} MB: over the {limit / 2 ** 20:g} MB this server takes "
                          f"(--max-upload-mb)", 413)
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            raise Refused(f"the upload stopped after {len(body)} of its {length} bytes")
        return body

    def reply(self, status, content, content_type):
        self.send_response(status)
        for name, value in (("Content-Type", content_type), ("Content-Length", str(len(content)))):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(content)


class DemoServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A browser closed mid-answer, say: one line, where socketserver prints a traceback."""
        print(f"demo.py: {client_address[0]}: {sys.exc_info()[1]!r}", file=sys.stderr)


def open_server(host, port, max_upload_bytes, captioner=None):
    """The server, bound at once: a port in use is said before the model's slow load, not after it."""
    try:
        server = DemoServer((host, port), DemoHandler)
    except OSError as e:  # the port in use, an address not of this machine, a host name that does not resolve
        raise ValueError(f"--host {host} --port {port}: cannot serve there ({e.strerror or e})") from None
    server.captioner, server.lock, server.max_upload_bytes = captioner, threading.Lock(), max_upload_bytes
    return server


def load_captioner(checkpoint, device):
    """A .pt checkpoint, or export_hf.py --captioner's folder or hub id, chosen as sample.py chooses."""
    path, why = choose_checkpoint(checkpoint, "log_caption")
    print(f"demo.py: loading {path} ({why})", file=sys.stderr)
    return Captioner.load(path, device)


def port_number(text):
    """argparse type of --port: 0 to 65535 (socket's bind raises OverflowError, not OSError, beyond)."""
    if not (text.isascii() and text.isdigit() and int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, not {text!r}")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", help="a caption .pt checkpoint, or a captioner export_hf.py --captioner wrote: "
                                        "its folder or hub id, USER/NAME (default: log_caption/best.pt if there "
                                        "is one, else the newest checkpoint there)")
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on; 127.0.0.1 is this machine alone, "
                                                       "0.0.0.0 every machine that can reach it")
    p.add_argument("--port", type=port_number, default=7860, help="the port to serve on (0: any free one)")
    p.add_argument("--max-upload-mb", type=positive_int, default=20, help="larger uploads are refused unread")
    p.add_argument("--device", default="auto", type=existing_device, help="auto, cpu, cuda, cuda:1, mps")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    use_device(args.device)  # cuda:1 becomes the current GPU, as in sample.py
    with open_server(args.host, args.port, args.max_upload_mb * 2 ** 20) as server:
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"demo.py: warning: --host {args.host} opens the page to the network: anyone who reaches this "
                  f"machine can use the model, with no password", file=sys.stderr)
        server.captioner = load_captioner(args.checkpoint, args.device)
        host, port = server.server_address[:2]
        print(f"demo.py: serving on http://{host}:{port} (Ctrl-C to stop)")
        server.serve_forever()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as e:  # the user's to fix: one line, naming the file or flag
        sys.exit(f"demo.py: {e}")
    except KeyboardInterrupt:
        print("demo.py: stopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
