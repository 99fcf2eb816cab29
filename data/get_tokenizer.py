"""
Put Qwen's BPE ranks file at data/qwen.tiktoken (the default of Tokenizer.from_pretrained).

Qwen, Qwen2, Qwen2.5, Qwen3 and Qwen3-VL share one byte-level BPE vocabulary of 151,643 ranks
(reference §1.3). Nothing can be fetched from model hubs here, but the PyPI package `dashscope`
(Alibaba's API client) ships exactly that vocabulary as `dashscope/resources/qwen.tiktoken`:
one line per token, `base64(token bytes) rank`. This script pip-installs dashscope if it is
missing, copies the file and checks its size and hash.

    python data/get_tokenizer.py
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys

DEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen.tiktoken")
N_RANKS = 151643
SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"  # dashscope 2.0.2


def dashscope_ranks_file():
    """Path of qwen.tiktoken inside the installed dashscope package, installing it if needed."""
    # find_spec locates the package without importing it (importing pulls in its HTTP client).
    spec = importlib.util.find_spec("dashscope")
    if spec is None:
        print("dashscope is not installed; pip install dashscope")
        subprocess.check_call([sys.executable, "-m", "pip", "install", "dashscope"])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("dashscope")
    return os.path.join(spec.submodule_search_locations[0], "resources", "qwen.tiktoken")


def check(path):
    with open(path, "rb") as f:
        data = f.read()
    n_lines = data.count(b"\n")
    digest = hashlib.sha256(data).hexdigest()
    if n_lines != N_RANKS:
        raise RuntimeError(f"{path} has {n_lines} ranks, expected {N_RANKS}")
    if digest != SHA256:
        # A later dashscope could re-serialise the same ranks; the count above is the hard check.
        print(f"warning: sha256 of {path} is {digest}, expected {SHA256}")


if __name__ == "__main__":
    if os.path.exists(DEST):
        check(DEST)
        print(f"{DEST} is already there")
        sys.exit(0)
    src = dashscope_ranks_file()
    check(src)
    shutil.copyfile(src, DEST)
    print(f"copied {src} -> {DEST} ({N_RANKS} ranks)")
