"""GGUF in and out: parity with transformers' ``gguf_file=`` loading, the GGUF tokenizer, bad files, export.

Two writers make the files: ``_write_llama_cpp_style`` below, written independently of lmforge from a
transformers model the way llama.cpp's ``convert_hf_to_gguf.py`` names and lays out tensors, and lmforge's own
``save_gguf``. Quantized files are compared against transformers' dequantized load of the same file, not the
original weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge import load_model
from lmforge.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.models.gguf import save_gguf

from .hf_factory import FAMILIES, left_padded_batch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
ATOL = 1e-4
VOCAB = 300

# Families whose GGUF transformers loads. Overrides make the tiny models expressible in what transformers reads
# from GGUF metadata: it ignores Gemma 2's soft-caps and query scale (using Gemma2Config's 50 / 30 / 256) and a
# llama-architecture file has no sliding window for it; its GPT-2 reads context_length into n_ctx, not n_positions.
PARITY = {
    "llama": {}, "qwen2": {}, "phi3": {}, "gpt2": {"n_positions": 1024},  # transformers sizes wpe from n_positions
    "mistral": {"sliding_window": None},
    "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
}
NOT_IN_GGUF = {"llama3_tied": "Llama 3.1 rope scaling needs llama.cpp's rope_freqs tensor, not written here",
               "mixtral": "transformers' GGUF loader has no Mixtral (llama.cpp stacks experts)"}


def hf_model(family: str, vocab: int = VOCAB, **overrides):
    cfg_cls, model_cls, kwargs = FAMILIES[family]
    kwargs = {**kwargs, **PARITY.get(family, {}), **overrides, "vocab_size": vocab}
    config = getattr(transformers, cfg_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # perturb norms and biases so their code paths (and the Gemma +1) are tested
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.02)
    return model


# ---- an independent llama.cpp-style writer ---------------------------------------------------------------------
_LAYER_NAMES = {  # HF suffix -> llama.cpp name, as convert_hf_to_gguf.py maps them
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "mlp.gate_up_proj": "ffn_up",
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
_GEMMA_LAYER_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}


def _llama_cpp_name(hf_name: str, family: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    for prefix in ("model.layers.", "transformer.h."):
        if base.startswith(prefix):
            layer, rest = base[len(prefix):].split(".", 1)
            table = {**_LAYER_NAMES, **(_GEMMA_LAYER_NAMES if family == "gemma2" else {})}
            return f"blk.{layer}.{table[rest]}.{suffix}"
    return f"{_TOP_NAMES[base]}.{suffix}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.py's LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Where each K-quant block keeps its float16 scale(s) (gguf.quants' layouts): gguf-py cannot quantize K-quants,
# so their blocks are random bytes with those scales set small, and both readers must decode them alike.
_K_SCALES = {"Q2_K": (-4, -2), "Q3_K": (-2,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2,)}


def _encode(a: np.ndarray, qtype: str) -> np.ndarray:
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    if qtype not in _K_SCALES:
        return gguf.quants.quantize(a, qt)
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = np.random.default_rng(0).integers(0, 256, (a.shape[0], a.shape[1] // block, size), dtype=np.uint8)
    half = np.frombuffer(np.float16(3e-4).tobytes(), np.uint8)
    for start in _K_SCALES[qtype]:
        start %= size
        raw[..., start:start + 2] = half
    return raw.reshape(a.shape[0], -1)


def _write_llama_cpp_style(hf, path, qtype: str, head_type: str | None = None) -> None:
    """``head_type``: output.weight's type when it differs (llama.cpp's Q4_0 files hold a Q6_K head)."""
    c = hf.config
    family = "mistral" if c.model_type == "mistral" else c.model_type
    arch = "llama" if family in ("llama", "mistral") else family
    w = gguf.GGUFWriter(path, arch)
    w.add_name("Mistral 7B" if family == "mistral" else "tiny")
    if arch == "gpt2":
        w.add_block_count(c.n_layer)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        w.add_rope_dimension_count(head_dim)
        if arch == "gemma2":
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
            w.add_sliding_window(c.sliding_window)
            w.add_attn_logit_softcapping(c.attn_logit_softcapping)
            w.add_final_logit_softcapping(c.final_logit_softcapping)
    # A placeholder vocabulary: transformers takes a GPT-2 file's vocab_size from the token count.
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    for key in ("bos", "eos", "pad"):
        if getattr(c, f"{key}_token_id", None) is not None:
            getattr(w, f"add_{key}_token_id" if key != "pad" else "add_pad_token_id")(getattr(c, f"{key}_token_id"))
    for name, t in hf.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (name == "lm_head.weight" and (
                c.tie_word_embeddings and arch != "gpt2")):
            continue
        a = t.float().numpy()
        if arch == "gpt2" and a.ndim == 2 and ".h." in name:
            a = a.T  # Conv1D -> nn.Linear layout
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            a = _permute(a, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        if arch == "gemma2" and "norm" in name:
            a = a + 1.0
        gname = _llama_cpp_name(name, family)
        kind = head_type if head_type and gname == "output.weight" else qtype
        if a.ndim == 2 and kind not in ("F32", "F16"):
            qt = getattr(gguf.GGMLQuantizationType, kind)
            w.add_tensor(gname, _encode(a, kind), raw_dtype=qt)
        elif a.ndim == 2 and kind == "F16":
            w.add_tensor(gname, a.astype(np.float16))
        else:
            w.add_tensor(gname, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, mask)


def _hf_gguf_logits(path, ids, mask) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def _max_diff(a, b, mask) -> float:
    return ((a - b).abs() * mask[..., None]).max().item()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids, mask = left_padded_batch(seed=1)
    return torch.randint(3, VOCAB, ids.shape, generator=g) * mask, mask


@pytest.mark.parametrize("family", [*PARITY, *NOT_IN_GGUF])
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_llama_cpp_style_file_matches_transformers(family, qtype, tmp_path):
    if family in NOT_IN_GGUF:
        pytest.skip(NOT_IN_GGUF[family])
    hf = hf_model(family)
    path = tmp_path / f"{family}.{qtype}.gguf"
    _write_llama_cpp_style(hf, path, qtype)
    ids, mask = _batch()
    ours = _logits(load_model(path), ids, mask)
    ref = _hf_gguf_logits(path, ids, mask)
    assert ours.shape == ref.shape == (3, 20, VOCAB)
    assert _max_diff(ours, ref, mask) <= ATOL, family
    assert ours.abs().max() > 0.1
    if qtype == "F32":  # and an unquantized file is the original model
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            orig = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert _max_diff(ours, orig, mask) <= ATOL


@pytest.mark.parametrize("qtype", ["BF16", "Q4_1", "Q5_0", "Q5_1", *_K_SCALES])
def test_other_types_match_transformers(qtype, tmp_path):
    """The remaining types on a Llama wide enough (256) for K-quant blocks in every matrix."""
    hf = hf_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    path = tmp_path / f"llama.{qtype}.gguf"
    _write_llama_cpp_style(hf, path, qtype)
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds == {qtype, "F32"}
    ids, mask = _batch()
    ours = _logits(load_model(path), ids, mask)
    assert _max_diff(ours, _hf_gguf_logits(path, ids, mask), mask) <= ATOL, qtype
    assert ours.abs().max() > 0.1


@pytest.mark.parametrize("family", list(PARITY))
def test_export_then_reload_in_lmforge_and_transformers(family, tmp_path):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    tok = train_bpe_tokenizer(CORPUS, VOCAB, min_frequency=1)  # transformers sizes GPT-2 from the token list
    ids, mask = _batch()
    before = _logits(model, ids, mask)
    for qtype, tol in (("f32", 0.0), ("f16", 5e-3), ("q8_0", 0.05)):
        path = save_gguf(model, tmp_path / f"{family}.{qtype}.gguf", qtype, tokenizer=tok)
        again = load_model(path)
        assert again.config.model_type == model.config.model_type
        ours = _logits(again, ids, mask)
        assert _max_diff(ours, before, mask) <= max(tol, 1e-6), (family, qtype)
        assert _max_diff(ours, _hf_gguf_logits(path, ids, mask), mask) <= ATOL, (family, qtype)


def test_export_keeps_what_only_lmforge_reads(tmp_path):
    """Mistral's window and Gemma 2's soft-caps and query scale survive an export -> reload exactly."""
    for family, overrides in (("mistral", {"sliding_window": 8}),
                              ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0,
                                          "final_logit_softcapping": 3.0})):
        hf = hf_model(family, **overrides)
        hf.save_pretrained(tmp_path / family)
        model = load_model(tmp_path / family)
        again = load_model(save_gguf(model, tmp_path / f"{family}.gguf", "f32"))
        assert again.config == model.config.replace(hf_extra=again.config.hf_extra)
        ids, mask = _batch()
        assert torch.equal(_logits(again, ids, mask), _logits(model, ids, mask)), family


# ---- tokenizer -------------------------------------------------------------------------------------------------
TEXTS = ["Hello world", "  two leading spaces", "def add(a, b):\n    return a + b  # sum", "tabs\tand  runs   ",
         "Ünïcödé café 你好 🙂", "numbers 1234567 and 3.14", "don't I'm we'll", "<|im_start|>user\nhi<|im_end|>",
         "<s> inside </s>", "", " ", "\n\n", "x" * 40]
CORPUS = ["hello world this is a test of the tokenizer 123 4567", "def f(x):\n    return x*2  # ok",
          "Ünïcödé 你好 🙂 tabs\tand  spaces", "don't stop; we'll see. The end."] * 30


def _write_tokenizer_file(path, arch, model, tokens, types, **kw) -> None:
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_tokenizer_model(model)
    if kw.get("pre"):
        w.add_tokenizer_pre(kw["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kw.get("merges"):
        w.add_token_merges(kw["merges"])
    if kw.get("scores"):
        w.add_token_scores(kw["scores"])
    for key in ("bos", "eos", "pad"):
        if kw.get(key) is not None:
            getattr(w, f"add_{key}_token_id")(kw[key])
    if kw.get("template"):
        w.add_chat_template(kw["template"])
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _byte_level_file(path, arch: str, pre: str) -> None:
    tok = train_bpe_tokenizer(CORPUS, 400, min_frequency=1)
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    special = set(tok.backend.get_added_tokens_decoder())
    import json
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.backend.to_str())["model"]["merges"]]
    _write_tokenizer_file(path, arch, "gpt2", tokens, [3 if vocab[t] in special else 1 for t in tokens], pre=pre,
                          merges=merges, bos=vocab["<|endoftext|>"], eos=vocab["<|im_end|>"],
                          template="{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                                   "{% endfor %}")


def _sentencepiece_file(path, arch: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if arch == "gemma2":  # Gemma's layout: <pad> <eos> <bos> <unk> <mask> first
        specials, bos, eos, pad = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], 2, 1, 0
    else:
        specials, bos, eos, pad = ["<unk>", "<s>", "</s>"], 1, 2, None
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=340, special_tokens=specials + byte_tokens,
                                                            min_frequency=1))
    vocab = backend.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    types = [2 if t == "<unk>" else 3 if t in specials else 6 if t in byte_tokens else 1 for t in tokens]
    # No merges, as llama.cpp writes SentencePiece vocabularies: they are rebuilt from the scores.
    _write_tokenizer_file(path, arch, "llama", tokens, types, scores=[-float(i) for i in range(len(tokens))],
                          bos=bos, eos=eos, pad=pad)


TOKENIZER_FILES = {"qwen2-bpe": lambda p: _byte_level_file(p, "qwen2", "qwen2"),
                   "gpt2-bpe": lambda p: _byte_level_file(p, "gpt2", "gpt-2"),
                   "llama-bpe": lambda p: _byte_level_file(p, "llama", "llama-bpe"),
                   "llama-spm": lambda p: _sentencepiece_file(p, "llama"),
                   "phi3-spm": lambda p: _sentencepiece_file(p, "phi3"),
                   "gemma2-spm": lambda p: _sentencepiece_file(p, "gemma2")}


@pytest.mark.parametrize("kind", list(TOKENIZER_FILES))
def test_tokenizer_encodes_like_transformers_gguf_tokenizer(kind, tmp_path):
    path = tmp_path / f"{kind}.gguf"
    TOKENIZER_FILES[kind](path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = load_tokenizer(path)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), (kind, text)
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), (kind, text)
    assert ours.bos_id == ref.bos_token_id and ours.eos_id == ref.eos_token_id and ours.pad_id == ref.pad_token_id
    assert len(ours.encode("Hello world")) > 1


def test_chat_template_and_eos_from_gguf(tmp_path):
    path = tmp_path / "chat.gguf"
    _byte_level_file(path, "qwen2", "qwen2")
    tok = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(chat, tokenize=False)
    assert tok.apply_chat_template(chat) == ref.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert tok.eos_token == "<|im_end|>"


def _chat_model_dir(tmp_path, family: str = "qwen2"):
    tok = train_bpe_tokenizer(CORPUS, VOCAB, min_frequency=1)
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    return tmp_path / "model", tok


def test_export_writes_the_tokenizer_and_chat_template(tmp_path):
    model_dir, tok = _chat_model_dir(tmp_path)
    path = save_gguf(load_model(model_dir), tmp_path / "m.gguf", "f16", tokenizer=tok)
    again = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    chat = [{"role": "user", "content": "what is 2+2?"}]
    assert again.apply_chat_template(chat, add_generation_prompt=True) == \
        tok.apply_chat_template(chat, add_generation_prompt=True)
    assert again.eos_ids == tok.eos_ids
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text), text
        # transformers rebuilds from the GGUF fields, where this tokenizer's digit splitting has no llama.cpp name;
        # texts without digits pre-tokenize the same way.
        if not any(ch.isdigit() for ch in text):
            assert ref.encode(text) == tok.encode(text), text
    assert ref.chat_template == tok.chat_template


def test_export_gguf_cli(tmp_path, capsys):
    from lmforge.cli import main

    model_dir, _ = _chat_model_dir(tmp_path, "llama")
    out = tmp_path / "out" / "model.gguf"
    assert main(["export-gguf", str(model_dir), "--out", str(out), "--type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    ids, mask = _batch()
    ours = _logits(load_model(out), ids, mask)
    assert _max_diff(ours, _hf_gguf_logits(out, ids, mask), mask) <= ATOL
    assert _max_diff(ours, _logits(load_model(model_dir), ids, mask), mask) < 0.05
    assert main(["export-gguf", str(model_dir), "--out", str(tmp_path / "x.bin")]) == 2
    assert "must name a .gguf file" in capsys.readouterr().err


# ---- bad input -------------------------------------------------------------------------------------------------
def test_truncated_file_is_one_clear_error(tmp_path):
    hf = hf_model("llama")
    good = tmp_path / "good.gguf"
    _write_llama_cpp_style(hf, good, "F16")
    data = good.read_bytes()
    for cut in (8, 300, len(data) // 2, len(data) - 7):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        for load in (load_model, load_tokenizer):
            with pytest.raises(CheckpointError, match="truncated"):
                load(bad)
    other = tmp_path / "notes.gguf"
    other.write_text("not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_model(other)


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "falcon.gguf"
    _write_tokenizer_file(path, "falcon", "gpt2", ["a", "b"], [1, 1])
    with pytest.raises(CheckpointError, match=r"architecture 'falcon' is not supported; supported: llama, qwen2, "
                                              r"phi3, gemma2, gpt2"):
        load_model(path)


def test_unsupported_quantization_type_is_named(tmp_path):
    hf = hf_model("llama")
    good = tmp_path / "good.gguf"
    _write_llama_cpp_style(hf, good, "F32")
    reader = gguf.GGUFReader(good)
    w = gguf.GGUFWriter(tmp_path / "iq.gguf", "llama")
    for name, f in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    iq = gguf.GGMLQuantizationType.IQ4_NL
    block, size = gguf.GGML_QUANT_SIZES[iq]
    for t in reader.tensors:
        if t.name == "blk.0.ffn_down.weight":  # any bytes of the right size: the type is refused before decoding
            rows, cols = t.data.shape
            w.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=iq)
        else:
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_down\.weight is stored as IQ4_NL, a GGUF type not "
                                              r"supported here; supported: F32, F16, BF16, Q8_0"):
        load_model(tmp_path / "iq.gguf")


def test_export_refuses_what_gguf_cannot_hold(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m")
    with pytest.raises(LmforgeError, match="GGUF type 'q3_k' cannot be written"):
        save_gguf(model, tmp_path / "x.gguf", "q3_k")
    assert not (tmp_path / "x.gguf").exists()
    cfg_cls, model_cls, kwargs = FAMILIES["mixtral"]
    mixtral = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs, vocab_size=64))
    mixtral.save_pretrained(tmp_path / "moe")
    with pytest.raises(LmforgeError, match="mixtral models cannot be exported to GGUF"):
        save_gguf(load_model(tmp_path / "moe"), tmp_path / "moe.gguf")


# ---- quantize="keep": the file's own blocks on the low-bit kernels ----------------------------------------------
def _keep_tolerance(layer) -> torch.Tensor:
    """Per-weight bound on |kept - dequantized file| from rounding each block's float16 scale (and Q4_1's zero) to
    bfloat16 (2^-9 relative each): |code * scale| 2^-8 + |zero| 2^-8. A wrong code is off by a whole scale, which
    this bound (at most half a scale for |code| <= 128, plus a zero that is small for these zero-straddling random
    weights) does not cover."""
    codes, scales, zeros = layer.codes()
    group = layer.config.group_size
    per = lambda t: t.float().repeat_interleave(group, dim=1)[:, :codes.shape[1]]  # noqa: E731
    bound = (codes.float() * per(scales)).abs()
    if zeros is not None:
        bound = bound + per(zeros).abs()
    return bound * 2 ** -8 + 1e-7


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt2", "gemma2"])  # permuted, biased, fused, tied
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_keep_runs_the_files_blocks(family, qtype, tmp_path, monkeypatch):
    from lmforge.models import gguf as ours_gguf
    from lmforge.models.quant import QuantizedLinear, quantizable_linears

    hf = hf_model(family)
    path = tmp_path / f"{family}.{qtype}.gguf"
    _write_llama_cpp_style(hf, path, qtype)
    float_model = load_model(path)  # the dequantized file
    made_float: list[str] = []
    real = ours_gguf._dequantize
    monkeypatch.setattr(ours_gguf, "_dequantize", lambda f, name: made_float.append(name) or real(f, name))
    kept = load_model(path, quantize="keep")
    # no layer matrix was ever dequantized: only embeddings (and 1-D tensors) were
    assert all(not n.startswith("blk.") or n.endswith(("_norm.weight", ".bias", "norm.bias")) for n in made_float), \
        made_float
    want = {"Q8_0": ("int8", True), "Q4_0": ("int4", True), "Q4_1": ("int4", False)}[qtype]
    assert (kept.quantization.format, kept.quantization.symmetric, kept.quantization.group_size) == (*want, 32)
    assert kept.quantization.lm_head
    names = [n for n, _, _ in quantizable_linears(kept, kept.quantization)]
    per_layer = 6 if family == "gpt2" else 7  # GPT-2's MLP has no gate
    assert "lm_head" in names and len(names) == 1 + per_layer * kept.config.num_layers
    for name in names:
        layer = kept.get_submodule(name)
        assert isinstance(layer, QuantizedLinear), name
        reference = float_model.get_submodule(name).weight.detach()
        assert bool(((layer.weight - reference).abs() <= _keep_tolerance(layer)).all()), name
    assert not isinstance(kept.model.embed_tokens, QuantizedLinear)
    assert torch.equal(kept.model.embed_tokens.weight, float_model.model.embed_tokens.weight)
    ids, mask = _batch()
    a, b = _logits(kept, ids, mask), _logits(float_model, ids, mask)
    # bfloat16 activations and scales: a few per cent of the logit range, and the same argmax nearly everywhere
    assert _max_diff(a, b, mask) <= 0.05 * b.abs().max().item(), family
    agree = ((a.argmax(-1) == b.argmax(-1)) | ~mask.bool()).float().mean().item()
    assert agree >= 0.9


def test_keep_loads_a_head_of_another_type_as_float_and_saves(tmp_path):
    from lmforge import save_model
    from lmforge.models.quant import QuantizedLinear

    hf = hf_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    path = tmp_path / "llama.Q4_0.gguf"
    _write_llama_cpp_style(hf, path, "Q4_0", head_type="Q6_K")
    kept = load_model(path, quantize="keep")
    assert kept.quantization.describe() == "int4 group 32 symmetric, LM head float"
    assert isinstance(kept.model.layers[0].mlp.down_proj, QuantizedLinear)
    assert not isinstance(kept.lm_head, QuantizedLinear)
    assert torch.equal(kept.lm_head.weight, load_model(path).lm_head.weight)
    save_model(kept, tmp_path / "q")
    again = load_model(tmp_path / "q")
    assert again.quantization == kept.quantization
    ids, mask = _batch()
    assert torch.equal(_logits(kept, ids, mask), _logits(again, ids, mask))


def test_keep_refuses_what_it_cannot_keep(tmp_path):
    hf = hf_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    for qtype in ("F16", "Q5_0", "Q4_K"):
        path = tmp_path / f"llama.{qtype}.gguf"
        _write_llama_cpp_style(hf, path, qtype)
        with pytest.raises(CheckpointError, match=f"quantize='keep' keeps matrices .* layer matrices are 7 x {qtype}. "
                                                  "Load it with quantize=None"):
            load_model(path, quantize="keep")
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(LmforgeError, match="quantize='keep' keeps a GGUF file's own .* is not a .gguf file"):
        load_model(tmp_path / "hf", quantize="keep")
