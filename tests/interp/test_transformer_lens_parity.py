"""Every activation both libraries name the same agrees with TransformerLens's HookedTransformer (3.x).

The reference is built offline by TransformerLens's own loading code: ``convert_hf_model_config`` reads the
saved random-initialised transformers model's ``config.json`` from its directory, and
``get_pretrained_state_dict(..., hf_model=...)`` runs its weight converter for the architecture
(``convert_gpt2_weights``, ``convert_llama_weights``, ...). All processing is off: no LayerNorm folding, no
centring of writing weights or the unembedding, no value-bias folding.

Gemma 2 is not covered: TransformerLens 3.x derives Gemma 2 configs from the hub model name alone (the
released sizes), so a small random Gemma 2 cannot be converted offline.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lmforge import load_model
from lmforge.interp import run_with_cache

from ..models.hf_factory import VOCAB, build_hf_model

pytest.importorskip("transformers")
tl = pytest.importorskip("transformer_lens")
from transformer_lens.loading_from_pretrained import convert_hf_model_config, get_pretrained_state_dict  # noqa: E402

TOLERANCE = 1e-4
FAMILIES = ["gpt2", "llama", "llama3_tied", "mistral", "mixtral", "qwen2", "phi3"]


def hooked_transformer(path, hf_model):
    """TransformerLens's HookedTransformer for the transformers model saved at ``path``, processing off."""
    fields = convert_hf_model_config(str(path))
    fields.update(dtype=torch.float32, device="cpu", tokenizer_name=None)  # no tokenizer: ids go in directly
    cfg = tl.HookedTransformerConfig(**{k: v for k, v in fields.items()
                                        if k in tl.HookedTransformerConfig.__dataclass_fields__})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.x announces 4.0's TransformerBridge
        model = tl.HookedTransformer(cfg)
    model.load_and_process_state_dict(get_pretrained_state_dict(str(path), cfg, hf_model=hf_model), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    hf = build_hf_model(request.param)
    if request.param == "gpt2":
        # TransformerLens 3.x reads GPT2Config.n_ctx, which transformers 5 no longer sets; config.json keeps it.
        hf.config.n_ctx = hf.config.n_positions
    # TransformerLens picks some architectures by name ("llama", "gemma" in the path): keep it neutral.
    path = tmp_path_factory.mktemp("reference") / "checkpoint"
    hf.save_pretrained(path)
    return request.param, hf, hooked_transformer(path, hf), load_model(path).eval()


def test_every_shared_activation_matches_transformer_lens(pair):
    family, hf, reference, ours = pair
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))  # Mistral's window is 8
    with torch.no_grad():
        ref_logits, ref_cache = reference.run_with_cache(ids)
        hf_logits = hf(ids).logits
    logits, cache = run_with_cache(ours, ids)
    shared = [name for name in ours.hook_names() if name in ref_cache]
    # TransformerLens has every point we have, under the same name, except the MoE router's (compared below).
    assert [name for name in ours.hook_names() if name not in ref_cache and "mlp.hook_router_logits" not in name
            and "mlp.hook_expert_choice" not in name] == []
    worst = {}
    for name in shared:
        ref, mine = ref_cache[name], cache[name]
        assert ref.shape == mine.shape, (name, ref.shape, mine.shape)
        if name.endswith("hook_attn_scores"):  # masked: TransformerLens -inf, ours the dtype's minimum
            allowed = torch.isfinite(ref)
            assert torch.equal(allowed, mine > torch.finfo(mine.dtype).min), name
            ref, mine = ref[allowed], mine[allowed]
        worst[name] = float((ref - mine).abs().max())
    assert max(worst.values()) < TOLERANCE, {k: v for k, v in worst.items() if v >= TOLERANCE}
    assert float((logits - ref_logits).abs().max()) < TOLERANCE
    assert float((logits - hf_logits).abs().max()) < TOLERANCE  # caching everything keeps transformers parity
    for i in range(ours.config.num_layers if ours.config.num_experts else 0):
        # TransformerLens: hook_expert_weights = the router's softmax [B*T, E], hook_expert_indices [B*T, k].
        probs = torch.softmax(cache["router_logits", i].float(), -1).flatten(0, 1)
        assert float((probs - ref_cache[f"blocks.{i}.mlp.hook_expert_weights"]).abs().max()) < TOLERANCE
        assert torch.equal(cache["expert_choice", i].flatten(0, 1), ref_cache[f"blocks.{i}.mlp.hook_expert_indices"])
    print(f"{family}: {len(shared)} activations, max |ours - TransformerLens| = {max(worst.values()):.2e}, "
          f"logits {float((logits - ref_logits).abs().max()):.2e}")
