"""Small random-initialised transformers models for parity tests (configs only, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128

# name -> (transformers config class name, model class name, config kwargs)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "llama3_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        tie_word_embeddings=True, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, rope_theta=500000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}


def build_hf_model(family: str, seed: int = 0):
    import transformers

    cfg_cls, model_cls, kwargs = FAMILIES[family]
    kwargs = dict(kwargs)
    kwargs.setdefault("vocab_size", VOCAB)
    config = getattr(transformers, cfg_cls)(**kwargs)
    config._attn_implementation = "eager"  # the reference math, including Gemma 2 soft-capping
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    # Random init leaves norms at 1 (or 0 for Gemma): perturb them so norm code paths are tested too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 1:  # biases
                p.add_(torch.randn_like(p) * 0.02)
    return model


def save_hf_model(family: str, path: Path, seed: int = 0, **save_kwargs) -> Path:
    model = build_hf_model(family, seed)
    model.save_pretrained(path, **save_kwargs)
    return path


def left_padded_batch(seed: int = 0, batch: int = 3, length: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate([0, 5, 11][:batch]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def write_word_tokenizer(path: Path, words: list[str], vocab_size: int, image_token: str, template: str) -> None:
    """A word-level tokenizer.json + tokenizer_config.json for the vision-language tests: ``words`` first, fillers
    up to ``vocab_size``, then ``image_token``; <s>/</s>/<pad> specials; ``template`` as the chat template."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(len(words), vocab_size)] + [image_token])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([image_token, "<pad>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": template,
         "tokenizer_class": "PreTrainedTokenizerFast"}))


def assert_in_memory_layout_loads(hf, tmp_path: Path) -> None:
    """``hf`` saved by ``save_pretrained`` (the hub layout) and as its in-memory state dict (the layout newer
    transformers keep, e.g. model.language_model.*): ``load_model`` gives the same tensors from both."""
    from safetensors.torch import save_file

    from lmforge import load_model

    hf.save_pretrained(tmp_path / "hub")
    (tmp_path / "mem").mkdir()
    (tmp_path / "mem" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "mem" / "model.safetensors")
    a, b = load_model(tmp_path / "hub"), load_model(tmp_path / "mem")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
