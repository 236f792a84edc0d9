"""A tiny random chat model saved with its BPE tokenizer, and a uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

CORPUS = "hello world, the quick brown fox jumps over the lazy dog. "


def save_tiny_chat_model(path: Path, corpus: str = CORPUS, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                         context: int = 128, init_std: float = 0.2) -> Path:
    from lmforge import save_model
    from lmforge.data.tokenizer import train_bpe_tokenizer
    from lmforge.models.config import Config
    from lmforge.models.model import Transformer

    tok = train_bpe_tokenizer([corpus * 30], vocab_size=300)
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                              max_position_embeddings=context, eos_token_id=tok.eos_ids))
    return save_model(Transformer(cfg).init_weights(std=init_std, seed=0), path, tokenizer=tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, **config: Any) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 in a thread; yields the base URL; stops it afterwards. ``config``: more
    uvicorn.Config arguments (e.g. ``lmforge.serve.server.uvicorn_settings(limits)``)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
