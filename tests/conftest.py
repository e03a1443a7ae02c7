"""Shared test set-up: offline tokenizer files, the repo root on sys.path, and small helpers."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# GPT-2's BPE files come from ../shared/tiktoken on machines without internet (CI, this sandbox)
_shared_tiktoken = os.path.join(ROOT, "..", "shared", "tiktoken")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_shared_tiktoken):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_shared_tiktoken)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture
def tiktoken_offline(monkeypatch):
    """tiktoken as it is with no network and nothing in its cache: get_encoding raises what requests raises."""
    import requests
    import tiktoken

    def offline(name):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A synthetic COCO with CLIP features (test_caption.build_dataset), built once for all the files that use it."""
    from test_caption import build_dataset
    return build_dataset(tmp_path_factory.mktemp("coco"))
