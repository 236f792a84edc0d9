"""Weight-only int8/int4 quantization: the arithmetic, the CPU kernels, whole models, save/load, engine, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge import load_model, save_model
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.models import generate
from lmforge.models.quant import (QuantConfig, QuantizedLinear, dequantize, quantize_int4, quantize_int8,
                                  quantize_model)

from .hf_factory import left_padded_batch, save_hf_model

pytest.importorskip("transformers")

CONFIGS = {
    "int8": QuantConfig.make("int8"),
    "int8 g32": QuantConfig.make("int8", 32),  # llama.cpp's Q8_0 layout
    "int4 g32 zero points": QuantConfig.make("int4", 32),
    "int4 g64 symmetric": QuantConfig.make("int4", 64, True),
    "int4 g128 zero points": QuantConfig.make("int4", 128),
}
# (config, kernel): every kernel the module can run
KERNELS = [("int8", "int4x2"), ("int8", "int8pack"), ("int8 g32", "int4x2"), ("int4 g32 zero points", None), ("int4 g64 symmetric", None),
           ("int4 g128 zero points", None)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_model("llama", tmp_path_factory.mktemp("quant") / "llama", seed=3)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a region runs (by overload packet name)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def bf16_up(x: float) -> float:
    """The smallest bfloat16 value >= x (x > 0), computed independently of the module."""
    b = torch.tensor(x, dtype=torch.bfloat16)
    if b.float().item() < x:
        b = torch.nextafter(b, torch.tensor(float("inf"), dtype=torch.bfloat16))
    return b.float().item()


# ---- the arithmetic ---------------------------------------------------------------------------------------------
def test_int8_codes_and_scales_by_hand():
    w = torch.tensor([[0.5, -1.27, 0.01, 0.0], [0.0, 0.0, 0.0, 0.0], [2.54, 1.0, -0.3, 0.2]])
    codes, scales = quantize_int8(w)
    s0, s2 = bf16_up(1.27 / 127), bf16_up(2.54 / 127)
    assert scales.dtype == torch.bfloat16 and scales.shape == (3, 1)
    assert scales[0, 0].item() == s0 and scales[2, 0].item() == s2
    assert codes[0].tolist() == [round(0.5 / s0), round(-1.27 / s0), round(0.01 / s0), 0]
    assert codes[1].tolist() == [0, 0, 0, 0]  # an all-zero row stays exactly zero
    assert codes[2].tolist() == [round(2.54 / s2), round(1.0 / s2), round(-0.3 / s2), round(0.2 / s2)]
    assert torch.equal(dequantize(codes, scales)[1], torch.zeros(4))
    err = (dequantize(codes, scales) - w).abs()
    assert bool((err <= scales.float() / 2 + 1e-7).all())  # half a step: no code was clipped


def test_int4_symmetric_q4_0_rule_by_hand():
    g = torch.linspace(-0.3, 0.8, 32)  # largest magnitude 0.8 (positive): s = 0.8 / -8, rounded up in magnitude
    w = torch.cat([g, -2 * g]).view(1, 64)  # second group: largest magnitude -1.6 -> s = +0.2
    codes, scales, zeros = quantize_int4(w, 32, symmetric=True)
    assert zeros is None and scales.shape == (1, 2)
    s0, s1 = -bf16_up(0.1), bf16_up(0.2)
    assert scales[0].float().tolist() == [s0, s1]
    expected = [max(-8, min(7, round(v / s0))) for v in g.tolist()] + \
               [max(-8, min(7, round(v / s1))) for v in (-2 * g).tolist()]
    assert codes[0].tolist() == expected
    assert codes[0, 31] == -8 and codes[0, 63] == -8  # the largest magnitude maps to -8 exactly


def test_int4_zero_point_error_bound_and_partial_group():
    torch.manual_seed(0)
    w = torch.randn(48, 100) * 0.05 + 0.01  # 100 inputs: groups of 32 end in a partial one of 4
    codes, scales, zeros = quantize_int4(w, 32, symmetric=False)
    assert codes.shape == (48, 100) and scales.shape == zeros.shape == (48, 4)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    deq = dequantize(codes, scales, zeros, group_size=32)
    step = scales.float().repeat_interleave(32, dim=1)[:, :100]
    zero = zeros.float().repeat_interleave(32, dim=1)[:, :100]
    # half a step, plus the rounding of the zero to bfloat16 (2^-9 relative, at most)
    assert bool(((deq - w).abs() <= step / 2 + zero.abs() * 2 ** -8 + 1e-7).all())
    # by hand for one group: s = (max - min) / 15 rounded up, z = min + 8 s rounded, q = round((w - z) / s)
    grp = w[5, 32:64]
    s = bf16_up((grp.max() - grp.min()).item() / 15)
    z = torch.tensor(grp.min().item() + 8 * s).to(torch.bfloat16).float().item()
    assert scales[5, 1].float().item() == s and zeros[5, 1].float().item() == z
    assert codes[5, 32:64].tolist() == [max(-8, min(7, round((v - z) / s))) for v in grp.tolist()]


def test_bad_configs_are_named():
    with pytest.raises(LmforgeError, match="int4 group size 48 is not supported; use one of 32, 64, 128, 256"):
        QuantConfig.make("int4", 48)
    with pytest.raises(LmforgeError, match="int8 is symmetric"):
        QuantConfig.make("int8", symmetric=False)
    with pytest.raises(LmforgeError, match="int8 group size 48 is not supported"):
        QuantConfig.make("int8", 48)
    with pytest.raises(LmforgeError, match="int8pack kernel has one scale per output channel; int8 group 32"):
        QuantizedLinear.from_linear(torch.nn.Linear(64, 64), QuantConfig.make("int8", 32), "int8pack")


def test_int8_groups_by_hand():
    w = torch.zeros(2, 64)
    w[0, :32], w[0, 32:] = torch.linspace(-1, 1, 32), torch.linspace(-0.01, 0.02, 32)
    w[1, 40] = 3.0
    codes, scales = quantize_int8(w, 32)
    assert scales.shape == (2, 2) and scales.dtype == torch.bfloat16
    assert 0.02 / 127 <= scales[0, 1].float().item() < 0.02 / 127 * (1 + 2 ** -7)  # bfloat16, rounded up
    assert codes[0, 63].item() in (126, 127) and codes[1, 40].item() in (126, 127) and codes[1, :32].abs().sum().item() == 0
    # per-channel scales would have cost row 0's second group most of its resolution
    err_group = (dequantize(codes, scales, group_size=32) - w)[0, 32:].abs().max()
    err_row = (dequantize(*quantize_int8(w)) - w)[0, 32:].abs().max()
    assert err_group < err_row / 20


# ---- one layer through the kernels -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,kernel", KERNELS)
@pytest.mark.parametrize("shape", [(80, 100), (192, 576)])  # (out, in): padded rows and a partial group; none
def test_quantized_linear_matches_dequantized_float_matmul(name, kernel, shape):
    torch.manual_seed(1)
    out_f, in_f = shape
    linear = torch.nn.Linear(in_f, out_f)
    q = QuantizedLinear.from_linear(linear, CONFIGS[name], kernel)
    x = torch.randn(2, 7, in_f)
    with torch.inference_mode():
        y = q(x)
        # the kernel's contract: bfloat16 activations, the stored (dequantized) weight, a bfloat16 result
        ref = F.linear(x.bfloat16().float(), q.weight) + linear.bias
    assert y.shape == (2, 7, out_f) and y.dtype == torch.float32
    # rounding the output to bfloat16 costs up to 2^-9 relative; accumulation order adds a little
    assert bool(((y - ref).abs() <= ref.abs() * 2 ** -8 + 2e-3).all())
    codes, scales, zeros = q.codes()
    expected = quantize_int8(linear.weight, CONFIGS[name].group_size) if name.startswith("int8") else quantize_int4(
        linear.weight, CONFIGS[name].group_size, CONFIGS[name].symmetric)
    assert torch.equal(codes, expected[0]) and torch.equal(scales, expected[1])  # read back from the packing
    assert (zeros is None) == (len(expected) == 2 or expected[2] is None)


def test_quantized_linear_passes_gradients_to_its_input_only():
    """The kernels have no derivative: a custom backward multiplies by the dequantized weight (QLoRA trains
    adapters through it); the codes are buffers, so nothing in the layer itself trains."""
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 64), CONFIGS["int8"])
    x = torch.randn(1, 64, requires_grad=True)
    q.train()(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(1, 64) @ q.weight)
    assert not list(q.parameters())


# ---- whole models ----------------------------------------------------------------------------------------------
def peaked(model):
    """Scale the LM head so that the random model's next-token choice is not a near tie (as a trained model's
    mostly is not): then greedy agreement measures quantization error, not the coin flips of flat logits."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.mark.parametrize("fmt,rel_tol,min_agree", [("int8", 0.03, 0.9), ("int4", 0.2, 0.6)])
def test_model_logits_close_greedy_agrees_and_kernels_run(llama_dir, fmt, rel_tol, min_agree):
    """Measured on this model: max logit error 1.5% (int8) / 12% (int4) of the largest logit; the argmax agrees
    with float32's at 95% / 70% of prompt positions and on every row's first generated token; whole 16-token
    greedy continuations agree at 83% / 44% of positions (one changed token changes the rest: these random
    weights make near-ties common, which a trained model's sharper distributions mostly do not)."""
    ids, mask = left_padded_batch(seed=2, length=12)
    fl = peaked(load_model(llama_dir))
    q = quantize_model(peaked(load_model(llama_dir)), fmt)
    n_layers = q.config.num_layers
    assert sum(isinstance(m, QuantizedLinear) for m in q.modules()) == 7 * n_layers + 1  # + LM head
    with torch.inference_mode(), OpCounter() as ops:
        lq = q(ids, mask)
    assert ops.counts.get("_weight_int4pack_mm_for_cpu") == 7 * n_layers + 1  # every linear on the low-bit kernel
    assert not {"mm", "addmm", "linear", "matmul"} & set(ops.counts)  # no float matmul of weights anywhere
    with torch.inference_mode():
        lf = fl(ids, mask)
    real = mask.bool()
    assert (lf - lq)[real].abs().max().item() <= rel_tol * lf[real].abs().max().item()
    assert (lf.argmax(-1) == lq.argmax(-1))[real].float().mean().item() >= min_agree
    gf = generate(fl, ids, mask, max_new_tokens=16, eos_ids=())
    gq = generate(q, ids, mask, max_new_tokens=16, eos_ids=())
    assert torch.equal(gf[:, 0], gq[:, 0])


def test_moe_experts_quantized_router_float(tmp_path):
    path = save_hf_model("mixtral", tmp_path / "mixtral", seed=1)
    model = load_model(path, quantize="int4")
    moe = model.model.layers[0].mlp
    assert isinstance(moe.gate, torch.nn.Linear)  # the router stays float
    assert all(isinstance(e.gate_proj, QuantizedLinear) and isinstance(e.down_proj, QuantizedLinear)
               for e in moe.experts)
    ids, mask = left_padded_batch(seed=2, length=8)
    with torch.inference_mode():
        diff = (load_model(path)(ids, mask) - model(ids, mask))[mask.bool()].abs().max().item()
    assert diff < 0.3


@pytest.mark.parametrize("config", [QuantConfig.make("int8"), QuantConfig.make("int8", 64), QuantConfig.make("int4", 32),
                                    QuantConfig.make("int4", 64, True, lm_head=False)])
@pytest.mark.parametrize("family", ["llama", "llama3_tied", "gpt2"])  # untied, tied, biases + Conv1D
def test_save_reload_round_trip_is_exact(tmp_path, family, config):
    src = save_hf_model(family, tmp_path / "src", seed=2)
    model = load_model(src, quantize=config)
    save_model(model, tmp_path / "q")
    raw = json.loads((tmp_path / "q" / "config.json").read_text())
    assert raw["quantization_config"] == config.to_json()
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        names = set(f.keys())
        qweight = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
    hidden = model.config.hidden_size
    if config.format == "int8":
        assert qweight.dtype == torch.int8 and qweight.shape == (hidden, hidden)
    else:  # two codes a byte
        assert qweight.dtype == torch.uint8 and qweight.shape == (hidden, hidden // 2)
    assert ("lm_head.qweight" in names) == config.lm_head
    assert ("model.layers.0.self_attn.q_proj.zeros" in names) == (config.format == "int4" and not config.symmetric)
    again = load_model(tmp_path / "q")
    assert again.quantization == config
    for (name, a), b in zip(model.named_modules(), again.modules(), strict=True):
        if isinstance(a, QuantizedLinear):
            pairs = zip(a.portable().values(), b.portable().values(), strict=True)
            assert all(torch.equal(x, y) for x, y in pairs), name
    ids, mask = left_padded_batch(seed=4, length=10)
    with torch.inference_mode():
        assert torch.equal(model(ids, mask), again(ids, mask))


def test_engine_greedy_matches_generate(llama_dir):
    from lmforge.engine import Engine, SamplingParams

    model = load_model(llama_dir, quantize="int4")
    prompts = [[5, 9, 17, 33, 2, 8], [40, 41, 42], list(range(3, 30))]
    engine = Engine(model, block_size=4, num_blocks=64, max_num_seqs=3, max_num_batched_tokens=16)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        want = generate(model, torch.tensor([prompt]), max_new_tokens=10, eos_ids=())[0].tolist()
        assert out.outputs[0].token_ids == want


@pytest.mark.slow  # compiling takes ~20-60 s on a small CPU
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_compiled_generate_matches_eager(llama_dir, fmt):
    model = load_model(llama_dir, quantize=fmt)
    ids, mask = left_padded_batch(seed=5, length=12)
    eager = generate(model, ids, mask, max_new_tokens=10)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=10, compile=True), eager)


def test_bf16_model_runs_without_casts(llama_dir):
    model = load_model(llama_dir, dtype=torch.bfloat16, quantize="int8")
    ids, mask = left_padded_batch(seed=2, length=8)
    with torch.inference_mode(), OpCounter() as ops:
        logits = model(ids, mask)
    assert logits.dtype == torch.bfloat16 and ops.counts.get("_weight_int4pack_mm_for_cpu") == 15


# ---- bad input ------------------------------------------------------------------------------------------------
def test_unknown_quantize_value_is_one_clear_error(tmp_path):
    # checked before anything is read: even a missing directory reports the bad value
    with pytest.raises(LmforgeError, match=r"quantize='int3' is not a quantization format; use one of 'int8', 'int4'"):
        load_model(tmp_path / "nowhere", quantize="int3")
    with pytest.raises(LmforgeError, match="quantize=8 is not a quantization format"):
        load_model(tmp_path / "nowhere", quantize=8)


def test_quantized_directory_refuses_requantizing_and_other_methods(llama_dir, tmp_path):
    save_model(load_model(llama_dir, quantize="int8"), tmp_path / "q8")
    with pytest.raises(CheckpointError, match="already quantized \\(int8 per output channel\\)"):
        load_model(tmp_path / "q8", quantize="int4")
    assert isinstance(load_model(tmp_path / "q8", quantize="int8").lm_head, QuantizedLinear)  # same: fine
    with pytest.raises(LmforgeError, match="already quantized"):
        quantize_model(load_model(tmp_path / "q8"), "int4")
    cfg = json.loads((tmp_path / "q8" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "q8" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method is 'gptq'; lmforge loads only its own"):
        load_model(tmp_path / "q8")


def test_a_quantized_models_linears_hold_no_parameters(llama_dir):
    model = load_model(llama_dir, quantize="int4").train()  # train mode is allowed: QLoRA trains adapters over it
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized and not any(name.rsplit(".", 1)[0] in quantized for name, _ in model.named_parameters())


# ---- CLI --------------------------------------------------------------------------------------------------------
def test_cli_quantize_writes_a_directory_lmforge_reloads(llama_dir, tmp_path, capsys):
    from lmforge.cli import main

    (llama_dir / "tokenizer.json").write_text("{}")  # stands in for the tokenizer files chat/serve need
    try:
        out = tmp_path / "q4"
        assert main(["quantize", str(llama_dir), "--to", "int4", "--group-size", "64", "--out", str(out)]) == 0
    finally:
        (llama_dir / "tokenizer.json").unlink()
    assert "int4 group 64 with zero points" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    model = load_model(out)
    assert model.quantization == QuantConfig.make("int4", 64)
    ids, mask = left_padded_batch(seed=2, length=8)
    with torch.inference_mode():
        expected = load_model(llama_dir, quantize=QuantConfig.make("int4", 64))(ids, mask)
        assert torch.equal(model(ids, mask), expected)


def test_cli_quantize_bad_group_size_is_one_line(llama_dir, tmp_path, capsys):
    from lmforge.cli import main

    assert main(["quantize", str(llama_dir), "--to", "int4", "--group-size", "48", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge quantize: error: int4 group size 48 is not supported") and "Traceback" not in err
    assert not (tmp_path / "x").exists()
