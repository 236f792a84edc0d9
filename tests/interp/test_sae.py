"""Sparse autoencoders: activation math and losses against the papers' formulas, training on synthetic
sparse data, streaming from a model, metrics, the SAELens format, bad input and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.interp.sae import (
    SAETrainConfig,
    SparseAutoencoder,
    _ReconstructionStats,
    auxk_loss,
    ce_loss_recovered,
    evaluate_sae,
    explained_variance,
    jumprelu,
    jumprelu_l0_loss,
    l1_sparsity_loss,
    load_sae,
    model_activations,
    reconstruction_loss,
    resample_dead_latents,
    save_sae,
    shuffled_batches,
    top_activating_contexts,
    topk_relu,
    train_sae,
)
from lmforge.models.config import Config
from lmforge.models.model import Transformer


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: extra intra-op threads only add overhead on a shared machine."""


def tiny_model(hidden: int = 32, seed: int = 0) -> Transformer:
    config = Config(vocab_size=97, hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=hidden // 4, intermediate_size=2 * hidden, max_position_embeddings=64)
    return Transformer(config).init_weights(std=0.2, seed=seed).eval()


def random_token_batches(n: int, batch: int = 4, seq_len: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 97, (batch, seq_len + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def exact_relu_sae(d: int, hook: str = "blocks.0.hook_resid_post") -> SparseAutoencoder:
    """relu([x, -x]) @ [I; -I] = relu(x) - relu(-x) = x: a ReLU SAE that reconstructs exactly."""
    sae = SparseAutoencoder(d, 2 * d, "relu", hook_name=hook)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ---- activations --------------------------------------------------------------------------------------------
def test_topk_keeps_exactly_k_largest_active():
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, "topk", k=5, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: the ReLU after TopK removes nothing
    x = torch.randn(32, 16)
    acts = sae.encode(x)
    assert ((acts != 0).sum(-1) == 5).all()
    pre = sae.pre_activations(x)
    expected = set(map(tuple, torch.topk(pre, 5, dim=-1).indices.sort(-1).values.tolist()))
    got = set(map(tuple, (acts != 0).nonzero()[:, 1].reshape(32, 5).tolist()))
    assert got == expected
    assert torch.equal(acts[acts != 0], pre[acts != 0])  # kept values pass unchanged
    # Negative winners are zeroed (ReLU after the selection), so at most k are active.
    assert torch.equal(topk_relu(torch.tensor([[-1.0, -2.0, 3.0]]), 2), torch.tensor([[0.0, 0.0, 3.0]]))


def test_relu_sae_and_l1_penalty_by_hand():
    sae = SparseAutoencoder(2, 3, "relu")
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0, 2.0], [0.5, 1.0, 0.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.5, -1.0]))
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]]))
    x = torch.tensor([[3.0, 2.0]])
    # x - b_dec = [2, 2]; pre = [2*1 + 2*0.5, -2 + 2 + 0.5, 4 - 1] = [3, 0.5, 3]
    assert torch.allclose(sae.pre_activations(x), torch.tensor([[3.0, 0.5, 3.0]]))
    acts = sae.encode(x)
    assert torch.allclose(acts, torch.tensor([[3.0, 0.5, 3.0]]))
    # x̂ = 3*[2,0] + 0.5*[0,1] + 3*[3,4] + b_dec = [15 + 1, 12.5]
    assert torch.allclose(sae(x), torch.tensor([[16.0, 12.5]]))
    # L1 weighted by decoder norms [2, 1, 5]: 3*2 + 0.5*1 + 3*5
    assert l1_sparsity_loss(acts, sae.W_dec).item() == pytest.approx(21.5)
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([-10.0, 0.5, -1.0]))
    assert sae.encode(x)[0, 0] == 0.0  # ReLU clips


def test_jumprelu_forward_and_straight_through_gradients_match_the_paper():
    eps = 0.1
    z = torch.tensor([[0.30, 0.52, 0.90], [0.46, 0.10, 1.04]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 1.0], requires_grad=True)
    out = jumprelu(z, theta, eps)
    assert torch.equal(out.detach(), torch.tensor([[0.0, 0.52, 0.0], [0.0, 0.0, 1.04]]))
    grad_out = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out.backward(grad_out)
    # ∂/∂z = H(z - θ); ∂/∂θ = -(θ/ε)·K((z - θ)/ε), K = 1 on |u| < 1/2: |z - θ| < 0.05 for
    # (0,1): 0.02, (1,0): -0.04, (1,2): 0.04; not (0,0) -0.2, (0,2) -0.1, (1,1) 0.4.
    assert torch.equal(z.grad, torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 6.0]]))
    expected_theta = torch.tensor([-(0.5 / eps) * 4.0, -(0.5 / eps) * 2.0, -(1.0 / eps) * 6.0])
    assert torch.allclose(theta.grad, expected_theta)

    # L0 = Σ H(z - θ) (batch mean); its STE: ∂/∂θ = -(1/ε)·K(...), nothing to z.
    z2 = z.detach().clone().requires_grad_(True)
    theta2 = theta.detach().clone().requires_grad_(True)
    l0 = jumprelu_l0_loss(z2, theta2, eps)
    assert l0.item() == pytest.approx((1 + 1) / 2)
    l0.backward()
    assert z2.grad is None
    assert torch.allclose(theta2.grad, torch.tensor([-(1 / eps) * 0.5, -(1 / eps) * 0.5, -(1 / eps) * 0.5]))


def test_jumprelu_sae_uses_exp_log_threshold():
    sae = SparseAutoencoder(4, 6, "jumprelu", jumprelu_init_threshold=0.3)
    assert torch.allclose(sae.threshold, torch.full((6,), 0.3))
    pre = torch.tensor([[0.2, 0.31, -1.0, 5.0, 0.29, 0.28]])
    assert torch.equal(sae.activate(pre), torch.tensor([[0.0, 0.31, 0.0, 5.0, 0.0, 0.0]]))


# ---- losses and metrics against hand computation ---------------------------------------------------------
def test_auxk_loss_reconstructs_the_residual_from_the_top_dead_latents():
    residual = torch.tensor([[1.0, 2.0]])
    pre = torch.tensor([[5.0, 0.5, 3.0, -1.0]])
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
    dead = torch.tensor([False, True, True, True])
    # k_aux = 2 among the dead {1, 2, 3}: latents 2 (3.0) and 1 (0.5); latent 0 is alive however large.
    # ê = 3.0*[1,1] + 0.5*[0,1] = [3, 3.5]; ||e - ê||² = 4 + 2.25
    assert auxk_loss(residual, pre, W_dec, dead, k_aux=2).item() == pytest.approx(6.25)
    assert auxk_loss(residual, pre, W_dec, torch.zeros(4, dtype=torch.bool), k_aux=2).item() == 0.0
    # k_aux larger than the dead count uses them all; a negative pre-activation contributes 0 (ReLU).
    assert auxk_loss(residual, pre, W_dec, dead, k_aux=10).item() == pytest.approx(6.25)


def test_reconstruction_loss_explained_variance_and_ce_recovered_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 4.0]])
    assert reconstruction_loss(x, x_hat).item() == pytest.approx(2 / 3)  # (1 + 1 + 0) / 3 rows
    # mean [2, 2]; Σ||x - mean||² = (1 + 4) + (1 + 0) + (0 + 4) = 10; Σ||x - x̂||² = 2
    assert explained_variance(x, x_hat) == pytest.approx(1 - 2 / 10)
    assert explained_variance(x, x) == 1.0
    assert ce_loss_recovered(ce_clean=2.0, ce_with_sae=2.5, ce_zero_ablated=6.0) == pytest.approx(3.5 / 4.0)
    assert ce_loss_recovered(2.0, 2.0, 6.0) == 1.0 and ce_loss_recovered(2.0, 6.0, 6.0) == 0.0
    # The streaming sums of evaluate_sae give the same explained variance as the whole-tensor formula.
    g = torch.Generator().manual_seed(0)
    big, noisy = torch.randn(100, 8, generator=g) + 3, None
    noisy = big + 0.3 * torch.randn(100, 8, generator=g)
    stats = _ReconstructionStats(d_sae=4)
    for lo in range(0, 100, 17):
        stats.add(big[lo:lo + 17], noisy[lo:lo + 17], torch.ones(len(big[lo:lo + 17]), 4))
    assert stats.explained_variance() == pytest.approx(explained_variance(big, noisy), abs=1e-9)


# ---- streaming --------------------------------------------------------------------------------------------
def test_shuffle_buffer_emits_every_row_once_and_mixes_chunks():
    chunks = [torch.arange(i * 10, i * 10 + 10, dtype=torch.float32)[:, None].repeat(1, 3) for i in range(20)]
    batches = list(shuffled_batches(iter(chunks), batch_size=8, buffer_size=40, seed=1))
    rows = torch.cat(batches)[:, 0].long()
    assert len(rows) == 200 // 8 * 8  # only the final partial batch is dropped
    assert len(set(rows.tolist())) == len(rows)  # no row twice
    first_chunk_ids = {int(r) // 10 for r in batches[0][:, 0]}
    assert len(first_chunk_ids) > 1  # a batch mixes rows from several chunks (several sequences)
    with pytest.raises(LmforgeError, match="two batches"):
        next(shuffled_batches(iter(chunks), batch_size=8, buffer_size=15))


def test_model_activations_stop_at_the_hook_and_equal_a_full_forward_capture():
    model = tiny_model()
    batch = random_token_batches(1)[0]
    seen = {}
    with torch.no_grad():
        model(batch["input_ids"], hooks={"blocks.0.hook_resid_post": lambda x, name: seen.setdefault(name, x)})
    streamed = next(model_activations(model, "blocks.0.hook_resid_post", [batch]))
    assert streamed.shape == (4 * 16, 32)
    assert torch.equal(streamed, seen["blocks.0.hook_resid_post"].reshape(-1, 32))
    calls = []
    model.model.layers[1].register_forward_hook(lambda *a: calls.append(1))
    next(model_activations(model, "blocks.0.hook_resid_post", [batch]))
    assert not calls  # block 1 never ran


# ---- training -----------------------------------------------------------------------------------------------
def synthetic_chunks(dictionary: torch.Tensor, active: int, chunk: int = 64, seed: int = 0, noise: float = 0.01):
    """Endless activations: each row a sum of ``active`` random dictionary directions with weights in [1, 2]."""
    g = torch.Generator().manual_seed(seed)
    n_feat, d = dictionary.shape
    while True:
        idx = torch.rand(chunk, n_feat, generator=g).argsort(-1)[:, :active]
        coef = torch.zeros(chunk, n_feat).scatter(1, idx, 1 + torch.rand(chunk, active, generator=g))
        yield coef @ dictionary + noise * torch.randn(chunk, d, generator=g)


def random_dictionary(n_feat: int = 64, d: int = 32, seed: int = 0) -> torch.Tensor:
    D = torch.randn(n_feat, d, generator=torch.Generator().manual_seed(seed))
    return D / D.norm(dim=-1, keepdim=True)


def recovered_fraction(sae: SparseAutoencoder, dictionary: torch.Tensor, min_cos: float = 0.9) -> float:
    W = sae.W_dec.detach()
    W = W / W.norm(dim=-1, keepdim=True)
    return float(((dictionary @ W.t()).max(dim=1).values > min_cos).float().mean())


def test_topk_sae_recovers_the_true_dictionary_from_streamed_synthetic_data():
    D = random_dictionary()
    sae = SparseAutoencoder(32, 128, "topk", k=4, seed=1)
    assert recovered_fraction(sae, D) < 0.1  # random init does not already match
    batches = shuffled_batches(synthetic_chunks(D, active=3), batch_size=256, buffer_size=2048, seed=0)
    result = train_sae(sae, batches, SAETrainConfig(steps=600, lr=3e-3, log_every=50))
    assert recovered_fraction(sae, D) >= 0.85
    evs = [r.explained_variance for r in result.history]
    assert evs[0] < 0.75 and evs[-1] > 0.9
    assert all(r.l0 == 4.0 for r in result.history)
    # Evaluated on fresh raw data (the input scale is folded into the weights).
    x = next(synthetic_chunks(D, active=3, chunk=512, seed=7))
    assert explained_variance(x, sae(x).detach()) > 0.9


def test_jumprelu_sae_learns_a_sparse_code_of_the_true_dictionary():
    D = random_dictionary()
    sae = SparseAutoencoder(32, 128, "jumprelu", jumprelu_init_threshold=0.5, jumprelu_bandwidth=0.2, seed=1)
    batches = shuffled_batches(synthetic_chunks(D, active=3), batch_size=256, buffer_size=2048, seed=0)
    threshold_before = sae.threshold.detach().clone()
    result = train_sae(sae, batches, SAETrainConfig(steps=600, lr=3e-3, l0_coefficient=0.5, log_every=50))
    assert result.history[-1].l0 < 8 < result.history[0].l0  # the L0 penalty, trained through the STE, bites
    assert not torch.allclose(sae.threshold, threshold_before)
    assert result.history[-1].explained_variance > 0.85
    assert recovered_fraction(sae, D) >= 0.3  # vs < 0.1 at random init; TopK above gets most of them


def test_decoder_rows_have_unit_norm_after_a_step_and_the_parallel_gradient_is_removed():
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 24, "relu", seed=0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(24, 1) * 3 + 0.5)  # norms far from 1
    x = torch.randn(16, 8)
    reconstruction_loss(x, sae(x)).backward()
    sae.remove_decoder_parallel_grad_()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(24), atol=1e-5)

    for arch in ("topk", "relu"):
        sae = SparseAutoencoder(8, 24, arch, k=3 if arch == "topk" else None, seed=0)
        train_sae(sae, iter([torch.randn(32, 8) for _ in range(3)]),
                  SAETrainConfig(steps=3, lr=0.05, normalize_input=False))
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(24), atol=1e-5)


def test_dead_latents_are_counted_and_auxk_revives_them():
    """16 true features, 32 latents of which 24 start dead (tiny encoder columns: they never win the TopK).
    The 8 live ones cannot cover the data, so reviving the dead ones pays; AuxK is what revives them."""
    D = random_dictionary(n_feat=16, d=16)

    def run(auxk_coefficient: float):
        sae = SparseAutoencoder(16, 32, "topk", k=2, seed=3)
        with torch.no_grad():
            sae.W_enc[:, :24] *= 0.01
            sae.b_enc[:24] = 0.1
        batches = shuffled_batches(synthetic_chunks(D, active=2), batch_size=128, buffer_size=1024, seed=0)
        cfg = SAETrainConfig(steps=150, lr=3e-3, dead_after_steps=10, auxk_coefficient=auxk_coefficient,
                             log_every=25)
        return train_sae(sae, batches, cfg)

    without = run(0.0)
    assert without.history[0].dead_latents >= 20  # counted as dead once silent for 10 steps
    assert without.history[-1].dead_latents >= 18 and without.dead_latents(10) == without.history[-1].dead_latents
    with_auxk = run(1 / 32)
    assert with_auxk.history[-1].dead_latents <= 10


def test_resampling_gives_dead_latents_new_directions_and_resets_adam():
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 16, "relu", seed=0)
    with torch.no_grad():
        sae.b_enc[:4] = -100.0
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(64, 8)
    (reconstruction_loss(x, sae(x)) + l1_sparsity_loss(sae.encode(x), sae.W_dec)).backward()
    opt.step()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:4] = True
    assert not (sae.encode(x)[:, :4] > 0).any()
    assert resample_dead_latents(sae, x, dead, opt, torch.Generator().manual_seed(0)) == 4
    assert (sae.encode(x)[:, :4] > 0).any(0).all()  # every resampled latent fires on the data again
    assert torch.allclose(sae.W_dec[:4].norm(dim=-1), torch.ones(4))
    assert torch.equal(opt.state[sae.W_dec]["exp_avg"][:4], torch.zeros(4, 8))
    assert not torch.equal(opt.state[sae.W_dec]["exp_avg"][4:], torch.zeros(12, 8))


# ---- a real model -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_streaming_from_a_tiny_model_trains_and_metrics_are_finite(arch):
    model = tiny_model()
    hook = "blocks.1.hook_resid_post"
    sae = SparseAutoencoder(32, 128, arch, k=8 if arch == "topk" else None, hook_name=hook, seed=0)
    batches = shuffled_batches(model_activations(model, hook, random_token_batches(40, seed=1)),
                               batch_size=128, buffer_size=512, seed=0)
    cfg = SAETrainConfig(steps=20, lr=1e-3, log_every=5, dead_after_steps=5,
                         resample_every=0 if arch == "topk" else 10)
    result = train_sae(sae, batches, cfg)
    assert len(result.history) == 4
    assert all(math.isfinite(r.loss) for r in result.history)
    m = evaluate_sae(model, sae, random_token_batches(3, seed=2))
    values = [m.l0, m.mse, m.explained_variance, m.ce_clean, m.ce_with_sae, m.ce_zero_ablated, m.ce_loss_recovered]
    assert all(math.isfinite(v) for v in values)
    assert m.tokens == 3 * 4 * 16 and 0 < m.l0 <= (8 if arch == "topk" else 128)
    assert 0 <= m.dead_latents <= 128 and m.dead_fraction == m.dead_latents / 128
    assert "CE loss recovered" in m.table()
    # CE clean is the model's own next-token loss on the batches.
    batches = random_token_batches(3, seed=2)
    with torch.no_grad():
        clean = torch.stack([torch.nn.functional.cross_entropy(model(b["input_ids"]).reshape(-1, 97),
                                                               b["labels"].reshape(-1)) for b in batches]).mean()
    assert m.ce_clean == pytest.approx(float(clean), rel=1e-5)


def test_an_exact_sae_recovers_all_the_ce_loss_and_splicing_really_replaces_the_activation():
    model = tiny_model()
    hook = "blocks.0.hook_resid_post"
    exact = evaluate_sae(model, exact_relu_sae(32, hook), random_token_batches(2, seed=3))
    assert exact.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert exact.ce_with_sae == pytest.approx(exact.ce_clean, abs=1e-4)
    assert exact.ce_loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert exact.ce_zero_ablated != pytest.approx(exact.ce_clean, abs=1e-3)
    broken = exact_relu_sae(32, hook)
    with torch.no_grad():
        broken.W_dec.mul_(0.0)  # reconstructs 0: as bad as zero ablation
    m = evaluate_sae(model, broken, random_token_batches(2, seed=3))
    assert m.ce_with_sae == pytest.approx(m.ce_zero_ablated, abs=1e-5)
    assert m.ce_loss_recovered == pytest.approx(0.0, abs=1e-4)


def test_top_activating_contexts_find_the_max_token_and_its_window():
    model = tiny_model()
    hook = "blocks.0.hook_resid_post"
    sae = exact_relu_sae(32, hook)
    batches = random_token_batches(3, seed=4)
    found = top_activating_contexts(model, sae, batches, latents=[0, 5], top_n=3, context=2,
                                    decode_token=lambda t: f"<{t}>")
    acts = torch.cat([next(model_activations(model, hook, [b])).reshape(4, 16, 32) for b in batches])
    ids = torch.cat([b["input_ids"] for b in batches])
    for feat in found:
        values = torch.relu(acts[..., feat.latent])  # latent j of the exact SAE is relu(x_j)
        top = values.flatten().topk(3)
        assert [e["activation"] for e in feat.examples] == pytest.approx(top.values.tolist(), rel=1e-5)
        row, col = divmod(int(top.indices[0]), 16)
        first = feat.examples[0]
        lo = max(col - 2, 0)
        assert first["token_ids"] == ids[row, lo:col + 3].tolist()
        assert first["token_ids"][first["max_index"]] == int(ids[row, col])
        assert first["activations"][first["max_index"]] == pytest.approx(float(values[row, col]), rel=1e-4)
        assert first["tokens"][0] == f"<{first['token_ids'][0]}>"
        assert feat.density == pytest.approx(float((values > 0).float().mean()))


# ---- SAELens format -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_saelens_format_round_trip(arch, tmp_path):
    sae = SparseAutoencoder(12, 40, arch, k=6 if arch == "topk" else None, hook_name="blocks.1.hook_resid_post",
                            model_name="tiny", jumprelu_init_threshold=0.2, seed=0)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_sae(sae, tmp_path / "sae", context_size=16)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    keys = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
            "reshape_activations", "metadata", "architecture"}
    assert set(cfg) == keys | ({"k", "rescale_acts_by_decoder_norm"} if arch == "topk" else set())
    assert cfg["architecture"] == {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (12, 40, "float32", "none")
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["hook_layer"] == 1
    assert cfg["metadata"]["sae_lens_version"].startswith("6.") and cfg["metadata"]["context_size"] == 16
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "sae" / "sae_weights.safetensors")))
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    loaded = load_sae(tmp_path / "sae")
    assert (loaded.activation, loaded.k, loaded.hook_name, loaded.model_name) == (arch, sae.k, sae.hook_name, "tiny")
    x = torch.randn(20, 12)
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-6)
    assert torch.allclose(loaded(x), sae(x), atol=1e-6)


def _import_sae_lens():
    try:
        import sae_lens
    except Exception as e:  # noqa: BLE001 - an incompatible transformer_lens raises at import, not ImportError only
        pytest.skip(f"sae_lens is not importable here ({type(e).__name__}: {e}); "
                    "SAELens 6.x needs transformer-lens < 4")
    return sae_lens


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_saelens_loads_our_sae_and_computes_the_same_latents(arch, tmp_path):
    sae_lens = _import_sae_lens()
    ours = SparseAutoencoder(12, 40, arch, k=6 if arch == "topk" else None, hook_name="blocks.1.hook_resid_post",
                             jumprelu_init_threshold=0.2, seed=0)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_sae(ours, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    assert theirs.cfg.architecture() == {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}[arch]
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(20, 12)
    with torch.no_grad():
        acts = theirs.encode(x)
        assert torch.allclose(acts, ours.encode(x), atol=1e-5)
        assert torch.allclose(theirs.decode(acts), ours.decode(acts), atol=1e-5)
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)


# ---- bad input --------------------------------------------------------------------------------------------------
def test_an_sae_for_another_models_width_or_a_missing_hook_is_one_clear_error(tmp_path):
    model = tiny_model(hidden=32)
    save_sae(SparseAutoencoder(16, 32, "topk", k=4, hook_name="blocks.1.hook_resid_post", model_name="wide"),
             tmp_path / "narrow")
    with pytest.raises(LmforgeError, match=r"d_in=16 activations at blocks\.1\.hook_resid_post.*width there is 32"):
        load_sae(tmp_path / "narrow", model=model)
    save_sae(SparseAutoencoder(32, 64, "topk", k=4, hook_name="blocks.7.hook_resid_post"), tmp_path / "deep")
    with pytest.raises(LmforgeError, match=r"unknown hook point.*'blocks\.7\.hook_resid_post'.*for i in 0\.\.1"):
        load_sae(tmp_path / "deep", model=model)
    with pytest.raises(LmforgeError, match="needs cfg.json"):
        load_sae(tmp_path / "nothing")
    with pytest.raises(LmforgeError, match="1 <= k <= d_sae"):
        SparseAutoencoder(8, 16, "topk", k=0)


# ---- CLI ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_workspace(tmp_path_factory):
    from lmforge.data.tokenizer import train_bpe_tokenizer
    from lmforge.models import save_model

    root = tmp_path_factory.mktemp("sae_cli")
    docs = root / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"{i}.txt").write_text(f"def function_{i}(x):\n    return x * {i} + {i * 7}\n" * 5)
    tok = train_bpe_tokenizer(sorted(docs.glob("*.txt")), vocab_size=300)
    tok.save(root / "tok")
    config = Config(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=64, max_position_embeddings=64)
    save_model(Transformer(config).init_weights(std=0.1, seed=0), root / "model")
    return root


def test_cli_sae_train_eval_features(cli_workspace, tmp_path, capsys):
    import lmforge.interp.sae_cli  # noqa: F401 - registers `sae` (until lmforge.cli imports it among its plugins)
    from lmforge.cli import main

    ws = cli_workspace
    common = ["--model", str(ws / "model"), "--tokenizer", str(ws / "tok"), "--data", str(ws / "docs"),
              "--seq-len", "16", "--model-batch-size", "4", "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "sae"
    code = main(["sae", "train", *common, "--hook", "blocks.0.hook_resid_post", "--out", str(out),
                 "--expansion", "4", "--k", "4", "--steps", "15", "--batch-size", "64", "--buffer-tokens", "256",
                 "--eval-tokens", "256", "--log-every", "5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "cfg.json").is_file() and (out / "sae_weights.safetensors").is_file()
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["architecture"]) == (32, 128, 4, "topk")
    report = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(report["metrics"]["explained_variance"]) and len(report["history"]) == 3
    assert "CE loss recovered" in captured.out and "step 15/15" in captured.err

    code = main(["sae", "eval", *common, "--sae", str(out), "--tokens", "128", "--json", str(tmp_path / "m.json")])
    assert code == 0 and 0 < json.loads((tmp_path / "m.json").read_text())["tokens"] <= 128
    code = main(["sae", "features", *common, "--sae", str(out), "--tokens", "128", "--num-latents", "4",
                 "--top", "2", "--out", str(tmp_path / "f.json")])
    assert code == 0
    feats = json.loads((tmp_path / "f.json").read_text())
    assert [f["latent"] for f in feats["latents"]] == [0, 1, 2, 3]
    assert (tmp_path / "f.md").read_text().startswith("# Top-activating contexts at blocks.0.hook_resid_post")
    capsys.readouterr()

    save_sae(SparseAutoencoder(16, 32, "topk", k=4, hook_name="blocks.0.hook_resid_post"), tmp_path / "narrow")
    code = main(["sae", "eval", *common, "--sae", str(tmp_path / "narrow")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lmforge sae: error: ") and "d_in=16" in err and "width there is 32" in err
