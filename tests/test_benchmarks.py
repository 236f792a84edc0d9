"""Smoke runs of the benchmark scripts on a tiny saved checkpoint (``--model PATH``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A Qwen2 (not Llama: the scripts must go through AutoModelForCausalLM) with tied embeddings, whose
    generation config asks for sampling, a repetition penalty and EOS: the benchmarks must ignore all three."""
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.generation_config = transformers.GenerationConfig(do_sample=True, temperature=0.7,
                                                            repetition_penalty=1.5, eos_token_id=2)
    path = tmp_path_factory.mktemp("bench") / "tiny"
    model.save_pretrained(path)
    return path


def test_model_speed_runs_on_a_saved_model(tiny_checkpoint, one_thread, capsys):
    results = load_script("model_speed").main(["--model", str(tiny_checkpoint), "--quick", "--no-static"])
    assert results["model"] == str(tiny_checkpoint)
    assert results["shape"] == {"model_type": "qwen2", "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2,
                                "intermediate": 128, "vocab": 256, "tied_embeddings": True}
    assert results["decode_tokens_match"] == {"transformers dynamic": True}  # plain greedy on both sides
    assert results["decode"]["lmforge"]["decode_tok_s"] > 0 and results["roofline_tok_s"] > 0
    # tied: the decode step reads the embedding table once, as the LM head
    assert results["decode_weight_MB"] == pytest.approx(results["params"] * 4 / 1e6)
    assert "tied embeddings" in capsys.readouterr().out


def test_model_speed_refuses_shape_flags_with_model(tiny_checkpoint):
    with pytest.raises(SystemExit):
        load_script("model_speed").parse_args(["--model", str(tiny_checkpoint), "--layers", "30"])


def test_model_speed_shape_flags_default_and_quick():
    script = load_script("model_speed")
    full, quick = script.parse_args([]), script.parse_args(["--quick", "--layers", "3"])
    assert (full.hidden, full.layers, full.vocab, full.tie_embeddings) == (768, 12, 32000, False)
    assert (quick.hidden, quick.layers, quick.vocab) == (256, 3, 8000)  # a given flag wins over --quick's shape


def test_serving_runs_on_a_saved_model(tiny_checkpoint, one_thread):
    results = load_script("serving").main(["--model", str(tiny_checkpoint), "--quick"])
    assert results["model"] == str(tiny_checkpoint)
    assert results["mixed"]["lmforge"]["tokens"] == results["mixed"]["transformers"]["tokens"] > 0
    assert all(r["identical"] for r in results["speculative"].values())


def test_decode_profile_buckets_both_libraries(tiny_checkpoint, one_thread):
    results = load_script("decode_profile").main(["--model", str(tiny_checkpoint), "--new-tokens", "4", "--reps", "1",
                                                  "--profile-steps", "3", "--bandwidth-gib", "0.05"])
    for name in ("lmforge", "transformers"):
        r = results["libraries"][name]
        # every layer's linears, norms and RoPE found by the op's calling function (2 layers, 7 linears each)
        assert r["ops"]["matmul (layers)"] == 14 and r["ops"]["matmul (LM head)"] == 1
        assert r["ops"]["norms"] > 0 and r["ops"]["RoPE"] > 0 and r["ops"]["attention (SDPA)"] > 0
        assert sum(r["fraction"].values()) == pytest.approx(1.0)


def test_quant_speed_runs_on_a_saved_model(tiny_checkpoint, one_thread):
    results = load_script("quant_speed").main(["--model", str(tiny_checkpoint), "--quick", "--threads", "1",
                                               "--no-llama-cpp"])
    rows = results["models"][str(tiny_checkpoint)]["rows"]
    assert list(rows) == ["lmforge float32", "lmforge bfloat16", "lmforge int8", "lmforge int4 g32",
                          "transformers float32"]
    assert all(r["decode_tok_s"] > 0 and r["roofline_fraction"] > 0 for r in rows.values())
    order = ("lmforge float32", "lmforge bfloat16", "lmforge int8", "lmforge int4 g32")
    mb = [rows[k]["bytes_per_token"] for k in order]
    assert mb == sorted(mb, reverse=True)  # each format streams fewer bytes than the one before
    assert rows["transformers float32"]["perplexity"] == pytest.approx(rows["lmforge float32"]["perplexity"], rel=1e-4)
    assert abs(rows["lmforge int8"]["perplexity_change"]) < 0.01


def test_quant_speed_kernel_sweep_times_every_candidate(one_thread):
    results = load_script("quant_speed").main(["--kernels", "--quick", "--threads", "1"])
    sweep = results["kernels"]["tiny (2 x 64)"]
    assert set(sweep["ms_min"]) == {"fp32", "bf16", "int8 (int8pack)", "int8 (2 x int4, chosen)", "int4 g32",
                                    "int4 g64", "int4 g128"}
    assert all(v > 0 for v in sweep["ms_min"].values())


def test_vision_tokens_says_what_to_run_first(tmp_path):
    with pytest.raises(SystemExit, match="run `lmforge quickstart-vision` first"):
        load_script("vision_tokens").main(["--run", str(tmp_path)])
