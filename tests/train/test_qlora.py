"""QLoRA: LoRA/DoRA adapters trained over a frozen int4 (or int8) base quantized by ``lmforge.models.quant``.

Tolerances. The low-bit kernels round each quantized layer's input to bfloat16 and return bfloat16 (unit roundoff
2^-9 ~ 0.2%), so the quantized model computes the float model over its *dequantized* weights only up to those
roundings, a few tenths of a percent per layer; everything else (the custom backward, merging, saving, PEFT's
loading) is float32 arithmetic on the same numbers and is compared at 1e-4 or exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge import load_model, save_model
from lmforge.cli import main
from lmforge.data.synthetic import arithmetic_examples, write_jsonl
from lmforge.data.tokenizer import train_bpe_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models import quant
from lmforge.models.quant import QuantConfig, QuantizedLinear, dequantize_model
from lmforge.train import checkpoint as ckpt
from lmforge.train.lora import LoraConfig, QLoraLinear, apply_lora, load_adapter, lora_parameters, merge_lora
from lmforge.train.trainer import read_metrics

from ..models.hf_factory import VOCAB, build_hf_model

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BF16_ROUNDOFF = 2.0 ** -9


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf_model("llama").save_pretrained(path)
    return path


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed: int = 1) -> None:
    """Non-zero adapters (B = 0 at init would make gradient comparisons of A trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())


# ---- the quantized layer's backward -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt, kernel", [("int4", None), ("int8", None), ("int8", "int8pack")])
def test_quantized_backward_is_the_dequantized_weights_gradient(fmt, kernel, monkeypatch):
    """The kernels have no derivative; ours multiplies by the dequantized weight, tile by tile. Tiles of 64 rows
    (forced here) must give what one float matmul gives: the same float32 products, summed in row order."""
    monkeypatch.setattr(quant, "_DEQUANT_TILE_ELEMENTS", 64 * 96)  # 64-row tiles: 3 of them, the last partial
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 150)
    layer = QuantizedLinear.from_linear(linear, QuantConfig.make(fmt), kernel)
    assert sum(1 for _ in layer.dequantized_tiles()) == 3
    x = torch.randn(2, 5, 96, requires_grad=True)
    grad_out = torch.randn(2, 5, 150)
    layer(x).backward(grad_out)
    reference = grad_out.reshape(-1, 150) @ layer.weight
    torch.testing.assert_close(x.grad.reshape(-1, 96), reference, rtol=1e-6, atol=1e-6)
    assert not list(layer.parameters())  # the codes are buffers: nothing in the layer can train


# ---- the layer over a quantized base ----------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True])
def test_int4_lora_starts_as_the_int4_base(llama_dir, use_dora):
    model = load_model(llama_dir, quantize="int4")
    with torch.no_grad():
        base = model(ids())
    config = LoraConfig(r=4, target_modules=ALL, use_dora=use_dora)
    wrapped = apply_lora(model, config)
    assert config.base_quantization == QuantConfig.make("int4")  # recorded: the config rebuilds the structure
    assert all(isinstance(model.get_submodule(n), QLoraLinear) for n in wrapped) and len(wrapped) == 14
    with torch.no_grad():
        assert torch.equal(model(ids()), base)  # B = 0 (and m = ||W|| for DoRA): exactly the base
    # the base stays quantized (no float weight kept anywhere), only the float32 adapter trains
    layer = model.get_submodule(wrapped[0])
    assert isinstance(layer.base_layer, QuantizedLinear) and layer.base_layer.packed.dtype == torch.uint8
    assert not any(t.dtype == torch.float32 and t.dim() == 2 and "lora_" not in n
                   for n, t in model.named_parameters() if ".layers." in n)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = ("lora_A", "lora_B", "lora_magnitude") if use_dora else ("lora_A", "lora_B")
    assert trainable == {f"{w}.{a}" for w in wrapped for a in names}
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_gradients_match_float_lora_over_the_dequantized_base(llama_dir, use_dora):
    """Same adapters, same loss: gradients through the int4 kernels vs autograd through float LoRA over the
    dequantized weights. They differ only by the kernels' bfloat16 rounding of activations (2^-9 relative per
    rounding, two per layer and direction, over 2 layers): we allow 2^-5 (3%) of the gradient's norm. The
    tolerance separates: over the *original* float weights (int4 quantization error, not rounding) the same
    gradients differ by several times more, which the last assert checks."""
    qlora = load_model(llama_dir, quantize="int4")
    apply_lora(qlora, LoraConfig(r=4, target_modules=ALL, use_dora=use_dora))
    perturb(qlora)
    float_over_dequantized = dequantize_model(load_model(llama_dir, quantize="int4"))
    float_over_original = load_model(llama_dir)
    adapters = {n: p for n, p in qlora.named_parameters() if p.requires_grad}

    def grads(model):
        model.train()
        lm_loss(model, ids()).backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])

    def float_lora(model):
        apply_lora(model, LoraConfig(r=4, target_modules=ALL, use_dora=use_dora))
        state = {n.replace(".base_layer", ""): t.detach() for n, t in adapters.items()}
        assert not model.load_state_dict(state, strict=False).unexpected_keys
        return grads(model)

    quantized = grads(qlora)
    reference = float_lora(float_over_dequantized)
    error = (quantized - reference).norm() / reference.norm()
    assert error < 2 ** -5, float(error)
    off_base = (float_lora(float_over_original) - reference).norm() / reference.norm()
    assert off_base > 3 * error, (float(off_base), float(error))


def test_dora_needs_no_float_copy_and_merges_to_the_model_it_computes(llama_dir):
    model = load_model(llama_dir, quantize="int4")
    apply_lora(model, LoraConfig(r=4, target_modules=ALL, use_dora=True))
    perturb(model)
    with torch.no_grad():
        quantized = model(ids())
    merge_lora(model)
    assert not any(isinstance(m, (QuantizedLinear, QLoraLinear)) for m in model.modules())
    assert getattr(model, "quantization", None) is None
    with torch.no_grad():
        merged = model(ids())
    # float32 everywhere now: only the kernels' bfloat16 activation rounding separates the two
    assert (merged - quantized).abs().max() <= 8 * BF16_ROUNDOFF * quantized.abs().max()


def test_apply_lora_quantizes_a_float_model_to_the_configs_base_quantization(llama_dir):
    config = LoraConfig(r=4, base_quantization=QuantConfig.make("int4"))
    model = load_model(llama_dir)
    apply_lora(model, config)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QLoraLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)
    with pytest.raises(LmforgeError, match=r"quantized \(int8 per output channel\) but the LoRA config's base_quant"):
        apply_lora(load_model(llama_dir, quantize="int8"), config)


# ---- lmforge sft with model.quantize ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A BPE tokenizer, arithmetic chats, and a random Llama base of the tokenizer's vocabulary."""
    import transformers

    root = tmp_path_factory.mktemp("ws")
    write_jsonl(arithmetic_examples(64, seed=0, max_operand=9), root / "chats.jsonl")
    docs = root / "docs"
    docs.mkdir()
    for i in range(20):
        (docs / f"{i}.txt").write_text(f"{i} + {i + 1} = {2 * i + 1}\nuser assistant\n" * 4)
    train_bpe_tokenizer(sorted(docs.glob("*.txt")), vocab_size=320).save(root / "tok")
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    return root


def recipe(workspace, out, *extra) -> list[str]:
    return [f"model.path={workspace / 'base'}", "model.quantize=int4", f"tokenizer={workspace / 'tok'}",
            f"data.train=[{workspace / 'chats.jsonl'}]", "data.seq_len=48", "batch_size=8", "optim.lr=1e-2",
            "optim.warmup_steps=0", "lora.r=8", f"lora.target_modules=[{','.join(ALL)}]", f"out_dir={out}",
            "progress=false", "plot=false", "eval_every=0", *extra]


def sft(workspace, out, *extra, lora=True) -> int:
    return main(["sft", *(["--lora"] if lora else []), *recipe(workspace, out, *extra)])


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_sft_qlora_trains_saves_a_float_model_and_a_peft_adapter(workspace, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    assert sft(workspace, tmp_path / "run", "max_steps=8") == 0, capsys.readouterr().err
    run_losses = losses(tmp_path / "run")
    assert len(run_losses) == 8 and run_losses[-1] < run_losses[0] - 0.3, run_losses
    final = ckpt.latest_checkpoint(tmp_path / "run")

    # model/: float32, adapters merged into the dequantized base; load_model, transformers and generate take it
    merged = load_model(final / "model")
    assert getattr(merged, "quantization", None) is None
    x = torch.arange(1, 20)[None]
    dequantized_dir = tmp_path / "dequantized"
    save_model(dequantize_model(load_model(workspace / "base", quantize="int4")), dequantized_dir)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(dequantized_dir).eval()
    adapted = peft.PeftModel.from_pretrained(hf_base, final / "adapter").eval()
    ours_float = load_model(dequantized_dir)
    load_adapter(ours_float, final / "adapter")
    ours_qlora = load_model(workspace / "base", quantize="int4")
    load_adapter(ours_qlora, final / "adapter")
    assert isinstance(ours_qlora.model.layers[0].self_attn.q_proj, QLoraLinear)
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(final / "model").eval()
    with torch.no_grad():
        reference = adapted(x).logits
        assert (ours_float(x) - reference).abs().max() < 1e-4  # PEFT over the dequantized base = ours
        assert (merged(x) - reference).abs().max() < 1e-4  # model/ = that model
        assert (hf_merged(x).logits - reference).abs().max() < 1e-4
        qlora_logits = ours_qlora(x)  # the kernels: bfloat16 activations
        assert (qlora_logits - reference).abs().max() <= 8 * BF16_ROUNDOFF * reference.abs().max()
    capsys.readouterr()
    assert main(["generate", "--model", str(final / "model"), "--prompt", "1 + 2 =", "--max-new-tokens", "3"]) == 0


class Stop(Exception):
    pass


def test_sft_qlora_resume_continues_exactly(workspace, tmp_path):
    """Interrupted after step 3 of 4 with the last checkpoint at step 2: the resumed run reloads the int4 base,
    restores the adapters (trainable.safetensors), optimizer, schedule and RNG (LoRA dropout draws from it), and
    redoes step 3 and does step 4 exactly as the uninterrupted run."""
    from lmforge.train.recipe import load_recipe
    from lmforge.train.run import build_trainer

    def trainer(out):
        # the adapters' initialisation draws from the global RNG (build_trainer seeds it only for fresh models)
        torch.manual_seed(0)
        return build_trainer(load_recipe(None, ["task=sft", "lora.enabled=true", "lora.dropout=0.1",
                                                *recipe(workspace, out, "max_steps=4", "save_every=2")]))

    whole = trainer(tmp_path / "whole")
    whole.fit()

    def stop_after_3(_, record):
        if record["step"] == 3:
            raise Stop

    with pytest.raises(Stop):
        trainer(tmp_path / "split").fit(on_step=stop_after_3)
    assert ckpt.latest_checkpoint(tmp_path / "split").name == "step-00000002"
    resumed = trainer(tmp_path / "split")
    resumed.fit(resume=True)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # exactly, step by step
    finished = dict(whole.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, finished[name]), name


def test_quantize_without_lora_is_one_clear_error(workspace, tmp_path, capsys):
    assert sft(workspace, tmp_path / "run", "max_steps=1", lora=False) == 2
    err = capsys.readouterr().err
    assert "'model.quantize' (int4) needs lora.enabled: true" in err and "Traceback" not in err
    assert sft(workspace, tmp_path / "run", "max_steps=1", "model.quantize=int3") == 2
    assert "'model.quantize' must be one of ['int4', 'int8']" in capsys.readouterr().err
