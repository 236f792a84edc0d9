"""Sparse autoencoders on a hook's activations: train (streamed), evaluate, find top-activating contexts.

An SAE maps an activation x [d_in] to sparse latents f [d_sae] and back:

    pre = (x - b_dec) @ W_enc + b_enc          (b_dec subtracted when ``apply_b_dec_to_input``)
    f   = activation(pre)                      TopK | JumpReLU | ReLU
    x̂   = f @ W_dec + b_dec

Parameter names, shapes ([d_in, d_sae] encoder, [d_sae, d_in] decoder: one decoder *row* per latent, the
papers' decoder *column*) and the saved format are SAELens's (6.x: ``cfg.json`` + ``sae_weights.safetensors``),
so ``sae_lens.SAE.load_from_disk`` reads what ``save_sae`` writes. Architectures and their training losses:

* ``topk`` (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): keep the k largest
  pre-activations (then ReLU); loss ||x - x̂||² + α·AuxK, where AuxK reconstructs the residual x - x̂ from
  the top-k_aux *dead* latents so that they get gradient again.
* ``jumprelu`` (Rajamanoharan et al. 2024, "Jumping Ahead"): f = pre · H(pre - θ) with a learned per-latent
  threshold θ = exp(log_threshold); loss ||x - x̂||² + λ·||f||₀. H has no gradient, so θ is trained through
  straight-through estimators with a rectangle kernel of bandwidth ε.
* ``relu`` (SAELens's "standard"; Bricken et al. 2023): f = ReLU(pre); loss ||x - x̂||² + λ·Σᵢ fᵢ·||W_dec,ᵢ||.

Training streams activations from the model over the tokenized corpus through a bounded shuffle buffer
(``shuffled_batches``): nothing but the buffer is held. Decoder rows are kept at unit norm (the gradient
component parallel to each row is removed before the Adam step and the rows are renormalized after it), and
latents that have not fired for ``dead_after_steps`` steps count as dead: AuxK revives them for TopK;
ReLU/JumpReLU can resample them (``resample_every``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.io import atomic_file

ARCHITECTURES = ("topk", "jumprelu", "relu")
# Our activation name -> SAELens's ``architecture`` field; SAELens calls the ReLU SAE "standard".
_TO_SAELENS = {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}
_FROM_SAELENS = {v: k for k, v in _TO_SAELENS.items()}
SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
# The SAELens release whose cfg.json layout we write. Its loader treats a config without a version >= 6.0
# as a pre-6.0 file and rewrites it, so the version is written too.
SAELENS_FORMAT_VERSION = "6.54.12"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- activation functions with the papers' gradients ----------------------------------------------------
def _rectangle(u: Tensor) -> Tensor:
    """The STE kernel K(u) = 1 for |u| < 1/2, else 0 (Rajamanoharan et al. 2024, eq. 11)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z·H(z - θ). Gradient to z: H(z - θ) (exact away from the jump). Pseudo-derivative to θ:
    -(θ/ε)·K((z - θ)/ε), the paper's straight-through estimator of the jump's effect."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z > threshold).to(z.dtype) * grad_out
        grad_threshold = -(threshold / eps) * _rectangle((z - threshold) / eps) * grad_out
        return grad_z, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """H(z - θ). No gradient to z (as in the paper: the L0 penalty trains only θ). Pseudo-derivative to θ:
    -(1/ε)·K((z - θ)/ε)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * _rectangle((z - threshold) / eps) * grad_out
        return None, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU_θ(z) = z·H(z - θ) with the straight-through gradient to θ (see ``_JumpReLU``)."""
    return _JumpReLU.apply(z, threshold, bandwidth)


def step(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(z - θ) with the straight-through gradient to θ (see ``_Step``)."""
    return _Step.apply(z, threshold, bandwidth)


def topk_relu(z: Tensor, k: int) -> Tensor:
    """Keep the k largest entries of each row (then ReLU, as Gao et al. and SAELens do), zero the rest."""
    values, indices = torch.topk(z, k, dim=-1, sorted=False)
    return torch.zeros_like(z).scatter(-1, indices, values.relu())


# ---- losses: pure functions of tensors -------------------------------------------------------------------
def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x̂||² summed over the feature dimension, averaged over the batch (all three papers' L_recon)."""
    return (x - x_hat).pow(2).sum(-1).mean()


def l1_sparsity_loss(acts: Tensor, W_dec: Tensor) -> Tensor:
    """Σᵢ fᵢ·||W_dec,ᵢ||, batch mean. Weighting by the decoder norm keeps the penalty from being dodged by
    shrinking f and growing W_dec; with unit-norm decoder rows it is exactly ||f||₁."""
    return (acts * W_dec.norm(dim=-1)).sum(-1).mean()


def jumprelu_l0_loss(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """||f||₀ = Σᵢ H(preᵢ - θᵢ), batch mean; differentiable in θ through the step's STE."""
    return step(pre, threshold, bandwidth).sum(-1).mean()


def auxk_loss(residual: Tensor, pre: Tensor, W_dec: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """Gao et al. 2024's AuxK: ||e - ê||² with e = x - x̂ (the main reconstruction's residual, held fixed)
    and ê = W_dec^T·TopK_aux(pre restricted to dead latents). Zero when no latent is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return residual.new_zeros(())
    k = min(k_aux, n_dead)
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    aux_acts = topk_relu(dead_pre, k)
    return (residual.detach() - aux_acts @ W_dec).pow(2).sum(-1).mean()


# ---- metrics: pure functions ------------------------------------------------------------------------------
def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - Σ||x - x̂||² / Σ||x - mean(x)||², sums over every row of [N, d] (mean over rows)."""
    x, x_hat = x.double(), x_hat.double()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return float(1.0 - residual / total)


def ce_loss_recovered(ce_clean: float, ce_with_sae: float, ce_zero_ablated: float) -> float:
    """(CE_zero-ablated - CE_with_SAE) / (CE_zero-ablated - CE_clean): 1 when splicing in the SAE costs
    nothing, 0 when it is as bad as zeroing the activation."""
    denominator = ce_zero_ablated - ce_clean
    if denominator == 0:
        return float("nan")
    return (ce_zero_ablated - ce_with_sae) / denominator


# ---- the module -------------------------------------------------------------------------------------------
class SparseAutoencoder(nn.Module):
    """A TopK, JumpReLU or ReLU SAE with SAELens's parameter names (see the module docstring)."""

    def __init__(self, d_in: int, d_sae: int, activation: str = "topk", k: int | None = None, *,
                 hook_name: str | None = None, model_name: str | None = None, apply_b_dec_to_input: bool = True,
                 jumprelu_init_threshold: float = 0.01, jumprelu_bandwidth: float = 0.05,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 seed: int | None = None) -> None:
        super().__init__()
        if activation not in ARCHITECTURES:
            raise LmforgeError(f"unknown SAE activation {activation!r}; expected one of {', '.join(ARCHITECTURES)}")
        if d_in < 1 or d_sae < 1:
            raise LmforgeError(f"SAE sizes must be positive, got d_in={d_in}, d_sae={d_sae}")
        if activation == "topk" and (k is None or not 1 <= k <= d_sae):
            raise LmforgeError(f"a TopK SAE needs 1 <= k <= d_sae={d_sae}, got k={k}")
        self.d_in, self.d_sae, self.activation, self.k = d_in, d_sae, activation, k if activation == "topk" else None
        self.hook_name, self.model_name = hook_name, model_name
        self.apply_b_dec_to_input = apply_b_dec_to_input
        # The STE kernel width: a training setting, not saved. The paper's 0.001 (and θ₀ = 0.001) suit Gemma's
        # thousands-wide activations; with few hundred dimensions thresholds then hardly move, so the defaults
        # are SAELens's (ε = 0.05, θ₀ = 0.01).
        self.bandwidth = jumprelu_bandwidth
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # Random unit-norm decoder rows; encoder = decoder transpose (Gao et al.: it avoids dead latents early).
        w_dec = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float32)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec.to(dtype=dtype, device=device))
        self.W_enc = nn.Parameter(w_dec.t().contiguous().to(dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        if activation == "jumprelu":
            # θ = exp(log θ) stays positive, as in the paper (so JumpReLU output is never negative).
            init = torch.full((d_sae,), math.log(jumprelu_init_threshold), dtype=dtype, device=device)
            self.log_threshold = nn.Parameter(init)

    # -- forward pieces --
    @property
    def threshold(self) -> Tensor:
        if self.activation != "jumprelu":
            raise AttributeError(f"a {self.activation} SAE has no threshold")
        return self.log_threshold.exp()

    def pre_activations(self, x: Tensor) -> Tensor:
        """Encoder pre-activations [..., d_sae] of activations x [..., d_in] (cast to the SAE's dtype)."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        if self.activation == "topk":
            return topk_relu(pre, self.k)
        if self.activation == "jumprelu":
            return jumprelu(pre, self.threshold, self.bandwidth)
        return F.relu(pre)

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction x̂ of x, in x's dtype (so it can replace x in the model's forward pass)."""
        return self.decode(self.encode(x)).to(x.dtype)

    # -- the decoder-norm constraint --
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_decoder_parallel_grad_(self) -> None:
        """Project out of each decoder row's gradient its component along the (unit) row, so the step moves
        the direction and not the norm (Bricken et al. 2023)."""
        if self.W_dec.grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad.sub_((self.W_dec.grad * unit).sum(-1, keepdim=True) * unit)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """An SAE trained on ``scale * x`` rewritten to take x and return x̂ in x's units, with identical
        latents: pre = (s·x - b_dec)·W_enc + b_enc = (x - b_dec/s)·(s·W_enc) + b_enc, x̂ = f·W_dec/s + b_dec/s.
        (SAELens's ``fold_activation_norm_scaling_factor``.) Thresholds act on ``pre``, which is unchanged."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    @property
    def hook_layer(self) -> int | None:
        return hook_layer(self.hook_name)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation}{k}, hook={self.hook_name}"


def hook_layer(hook_name: str | None) -> int | None:
    """The block index of ``blocks.{i}.hook_*`` (0 for ``hook_embed``; None for the final norm or no name)."""
    if hook_name is None:
        return None
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    if match:
        return int(match.group(1))
    return 0 if hook_name == "hook_embed" else None


# ---- checks against a model -------------------------------------------------------------------------------
def hook_width(model: nn.Module, hook_name: str) -> int:
    """The activation width at ``hook_name``, read from a one-token forward pass. SAEs here take activations of
    shape [batch, position, d] (the residual stream, sub-layer outputs, norm outputs, MLP activations); per-head
    points ([batch, position, heads, d_head]) and the attention pattern are refused. Raises LmforgeError naming
    the hook when the model lacks it."""
    model.check_hook_names([hook_name])
    shapes: list[tuple[int, ...]] = []
    ids = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)

    def record(x: Tensor, name: str) -> None:
        shapes.append(tuple(x.shape))
        raise _StopForward  # nothing after the hook is needed

    with torch.no_grad():
        try:
            model(ids, hooks={hook_name: record})
        except _StopForward:
            pass
    if not shapes or len(shapes[0]) != 3:
        raise LmforgeError(f"{hook_name} gives activations of shape {shapes[0] if shapes else '?'} per one-token "
                           "prompt; an SAE reads [batch, position, width] points such as blocks.{i}.hook_resid_post")
    return shapes[0][-1]


def check_sae_fits_model(sae: SparseAutoencoder, model: nn.Module, hook_name: str | None = None) -> str:
    """The hook the SAE reads (``hook_name`` or its own); raises LmforgeError naming both sides when the model
    lacks that hook or its width there is not the SAE's d_in."""
    hook = hook_name or sae.hook_name
    if hook is None:
        raise LmforgeError("the SAE does not say which hook it was trained on; pass the hook name")
    width = hook_width(model, hook)
    if width != sae.d_in:
        trained_on = f" (trained on {sae.model_name})" if sae.model_name else ""
        raise LmforgeError(f"the SAE{trained_on} takes d_in={sae.d_in} activations at {hook}, but this model's "
                           f"width there is {width}; it was trained for another model")
    return hook


# ---- SAELens format ---------------------------------------------------------------------------------------
def saelens_config(sae: SparseAutoencoder, **metadata: Any) -> dict[str, Any]:
    """The cfg.json dict, laid out as SAELens 6.x's ``SAEConfig.to_dict()`` (see SAELENS_FORMAT_VERSION)."""
    dtype = str(sae.W_enc.dtype).removeprefix("torch.")
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
            "model_name": sae.model_name, "hook_name": sae.hook_name, "hook_layer": sae.hook_layer,
            "hook_head_index": None, "prepend_bos": False, **metadata}
    cfg: dict[str, Any] = {"d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": dtype, "device": "cpu",
                           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
                           "reshape_activations": "none", "metadata": meta}
    if sae.activation == "topk":
        # Our TopK selects on raw pre-activations, so SAELens must not rescale them by decoder norms.
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    cfg["architecture"] = _TO_SAELENS[sae.activation]
    return cfg


def save_sae(sae: SparseAutoencoder, path: str | Path, **metadata: Any) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens's names) under ``path``; extra ``metadata``
    keys (e.g. ``context_size``, ``dataset_path``) go into cfg.json's ``metadata``. Weights first, config
    last, each atomically: a present cfg.json means the weights beside it are complete."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.activation == "jumprelu":
        tensors["threshold"] = sae.threshold
    payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    with atomic_file(path / SAE_WEIGHTS_FILENAME, "wb") as f:
        f.write(payload)
    with atomic_file(path / SAE_CFG_FILENAME, "w") as f:
        json.dump(saelens_config(sae, **metadata), f, indent=2)
    return path


def load_sae(path: str | Path, model: nn.Module | None = None, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> SparseAutoencoder:
    """Read an SAE in SAELens's format (``topk``, ``jumprelu`` or ``standard``). With ``model``, check that
    the model has the SAE's hook and that its width there is the SAE's d_in (LmforgeError otherwise)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, weights_path = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
    if not cfg_path.is_file() or not weights_path.is_file():
        raise LmforgeError(f"{path} is not an SAE directory: it needs {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}")
    try:
        cfg = json.loads(cfg_path.read_text())
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise LmforgeError(f"{cfg_path}: not a readable SAE config ({e})") from None
    architecture = cfg.get("architecture", "standard")
    if architecture not in _FROM_SAELENS:
        raise LmforgeError(f"{cfg_path}: SAE architecture {architecture!r} is not supported "
                           f"(supported: {', '.join(_FROM_SAELENS)})")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise LmforgeError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
                           "fold the normalization into the weights first")
    # SAELens >= 6 nests hook/model names under "metadata"; older files have them at the top level.
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    hook_name = meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
    model_name = meta.get("model_name", cfg.get("model_name"))
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        raise LmforgeError(f"{cfg_path}: TopK with rescale_acts_by_decoder_norm=true is not supported")
    weights = load_file(str(weights_path))
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        expected["threshold"] = (d_sae,)
    for name, shape in expected.items():
        if name not in weights:
            raise LmforgeError(f"{weights_path}: missing tensor {name!r}")
        if tuple(weights[name].shape) != shape:
            raise LmforgeError(f"{weights_path}: {name} has shape {tuple(weights[name].shape)}, "
                               f"expected {shape} for d_in={d_in}, d_sae={d_sae}")
    dtype = dtype or _DTYPES.get(str(cfg.get("dtype", "float32")).removeprefix("torch."), torch.float32)
    sae = SparseAutoencoder(d_in, d_sae, _FROM_SAELENS[architecture], k=k, hook_name=hook_name,
                            model_name=model_name, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                            dtype=dtype, device=device)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(weights[name])
        if architecture == "jumprelu":
            if bool((weights["threshold"] <= 0).any()):
                # θ is stored as log θ; SAELens allows θ <= 0, where JumpReLU (ReLU first) acts as ReLU.
                raise LmforgeError(f"{weights_path}: JumpReLU thresholds must be positive")
            sae.log_threshold.copy_(weights["threshold"].log())
    if model is not None:
        check_sae_fits_model(sae, model)
    return sae


# ---- streaming activations --------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by the capture hook: the layers after the hook are not needed to read its activations."""


def model_activations(model: nn.Module, hook_name: str, token_batches: Iterable[dict[str, Tensor]]
                      ) -> Iterator[Tensor]:
    """The activations at ``hook_name`` for each token batch, flattened to [B*T, d]; the forward pass stops
    at the hook. Padding positions (``attention_mask`` == 0) are dropped."""
    hook_width(model, hook_name)
    captured: list[Tensor] = []

    def capture(x: Tensor, name: str) -> None:
        captured.append(x)
        raise _StopForward

    for batch in token_batches:
        ids = batch["input_ids"].to(model.device)
        mask = batch.get("attention_mask")
        with torch.no_grad():
            try:
                model(ids, None if mask is None else mask.to(model.device), hooks={hook_name: capture})
            except _StopForward:
                pass
        acts = captured.pop()
        if mask is not None:
            acts = acts[mask.to(acts.device).bool()]
        yield acts.reshape(-1, acts.shape[-1])


def shuffled_batches(chunks: Iterable[Tensor], batch_size: int, buffer_size: int,
                     seed: int = 0) -> Iterator[Tensor]:
    """Re-batch a stream of activation chunks [n_i, d] into shuffled batches [batch_size, d] through a buffer
    of ``buffer_size`` rows (SAELens-style: fill, shuffle, emit half, refill). Consecutive tokens of one
    sequence are correlated; mixing many sequences' tokens makes each batch closer to i.i.d., while memory
    stays bounded by the buffer. Every row is emitted exactly once; a final partial batch is dropped."""
    if batch_size < 1 or buffer_size < 2 * batch_size:
        raise LmforgeError(f"the shuffle buffer ({buffer_size} rows) must hold at least two batches "
                           f"of {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    buffer: Tensor | None = None
    filled = 0
    for chunk in chunks:
        chunk = chunk.detach()
        if buffer is None:
            buffer = torch.empty(buffer_size, chunk.shape[-1], dtype=chunk.dtype, device=chunk.device)
        start = 0
        while start < chunk.shape[0]:
            take = min(buffer_size - filled, chunk.shape[0] - start)
            buffer[filled:filled + take] = chunk[start:start + take]
            filled, start = filled + take, start + take
            if filled == buffer_size:
                buffer = buffer[torch.randperm(buffer_size, generator=gen).to(buffer.device)]
                half = (buffer_size // 2) // batch_size * batch_size  # emit whole batches only
                for i in range(0, half, batch_size):
                    yield buffer[i:i + batch_size].clone()
                buffer[:buffer_size - half] = buffer[half:].clone()
                filled = buffer_size - half
    if buffer is not None and filled >= batch_size:
        rest = buffer[:filled][torch.randperm(filled, generator=gen).to(buffer.device)]
        for i in range(0, filled - batch_size + 1, batch_size):
            yield rest[i:i + batch_size].clone()


def token_batches(tokens: Any, seq_len: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                  repeat: bool = False, max_tokens: int | None = None) -> Iterator[dict[str, Tensor]]:
    """Batches of packed windows {input_ids, labels} [B, seq_len] from a ``TokenCache`` (the pretraining
    corpus, see ``lmforge.data.pretrain``), in a seeded random order (``shuffle``), once or forever
    (``repeat``), stopping after ``max_tokens`` input tokens."""
    from lmforge.data.pretrain import PackedDataset

    dataset = PackedDataset(tokens, seq_len)
    gen = torch.Generator().manual_seed(seed)
    served = 0
    while True:
        order = torch.randperm(len(dataset), generator=gen) if shuffle else torch.arange(len(dataset))
        for start in range(0, len(order), batch_size):
            items = [dataset[int(i)] for i in order[start:start + batch_size]]
            if max_tokens is not None:
                room = (max_tokens - served) // seq_len
                if room <= 0:
                    return
                items = items[:room]
            served += len(items) * seq_len
            yield {"input_ids": torch.stack([it["input_ids"] for it in items]),
                   "labels": torch.stack([it["labels"] for it in items])}
        if not repeat:
            return


# ---- training ---------------------------------------------------------------------------------------------
@dataclass
class SAETrainConfig:
    """Hyperparameters of ``train_sae``. Coefficients apply to inputs rescaled so that E||x||² = d_in
    (``normalize_input``, as in the JumpReLU paper), which makes them transferable between models."""

    steps: int = 2000
    lr: float = 4e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    normalize_input: bool = True
    unit_norm_decoder: bool = True  # constrain decoder rows to unit norm (all three architectures)
    auxk_coefficient: float = 1 / 32  # TopK: α of Gao et al.
    k_aux: int | None = None  # TopK: dead latents used by AuxK; None: d_in // 2 (Gao et al.'s heuristic)
    l1_coefficient: float = 5.0  # ReLU: λ of the L1 penalty
    l0_coefficient: float = 0.1  # JumpReLU: λ of the L0 penalty
    dead_after_steps: int = 200  # a latent that has not fired for this many steps is dead
    resample_every: int = 0  # ReLU/JumpReLU: resample dead latents every N steps (0: never)
    log_every: int = 50

    def validate(self, sae: SparseAutoencoder) -> None:
        if self.steps < 1 or self.lr <= 0:
            raise LmforgeError(f"steps must be >= 1 and lr > 0, got steps={self.steps}, lr={self.lr}")
        if self.dead_after_steps < 1:
            raise LmforgeError(f"dead_after_steps must be >= 1, got {self.dead_after_steps}")
        if self.resample_every and sae.activation == "topk":
            raise LmforgeError("TopK SAEs revive dead latents with the AuxK loss; resample_every is for relu/jumprelu")


@dataclass
class TrainStep:
    step: int
    loss: float
    mse: float  # ||x - x̂||² per token, in normalized units
    sparsity_loss: float  # AuxK, L1 or L0 term (before its coefficient)
    l0: float
    explained_variance: float
    dead_latents: int


@dataclass
class TrainResult:
    history: list[TrainStep]
    steps_since_fired: Tensor  # [d_sae] at the end of training
    input_scale: float  # the factor folded into the weights (1.0 without normalize_input)
    resampled: int = 0  # latents resampled in all

    def dead_latents(self, after_steps: int) -> int:
        return int((self.steps_since_fired >= after_steps).sum())


def _sparsity_term(sae: SparseAutoencoder, cfg: SAETrainConfig, x: Tensor, x_hat: Tensor, pre: Tensor,
                   acts: Tensor, dead: Tensor) -> tuple[Tensor, float]:
    """(the weighted sparsity/auxiliary loss, its unweighted value) for the SAE's architecture."""
    if sae.activation == "topk":
        k_aux = cfg.k_aux or max(sae.d_in // 2, 1)
        term = auxk_loss(x - x_hat, pre, sae.W_dec, dead, k_aux)
        return cfg.auxk_coefficient * term, term.item()
    if sae.activation == "jumprelu":
        term = jumprelu_l0_loss(pre, sae.threshold, sae.bandwidth)
        return cfg.l0_coefficient * term, term.item()
    term = l1_sparsity_loss(acts, sae.W_dec)
    return cfg.l1_coefficient * term, term.item()


@torch.no_grad()
def resample_dead_latents(sae: SparseAutoencoder, x: Tensor, dead: Tensor, optimizer: torch.optim.Adam,
                          generator: torch.Generator | None = None) -> int:
    """Anthropic's resampling (Bricken et al. 2023): each dead latent gets a new direction, an input drawn
    with probability ∝ its squared reconstruction loss (so poorly reconstructed inputs get a latent); the
    decoder row is that (centred) input normalized, the encoder column the same scaled to 0.2 × the mean
    alive encoder norm, b_enc = 0, and the Adam moments of those entries are reset. Returns how many."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    centred = x.to(sae.W_enc.dtype) - sae.b_dec
    losses = (x - sae.decode(sae.encode(x))).pow(2).sum(-1)
    probs = losses.pow(2)
    if float(probs.sum()) <= 0:
        return 0
    picks = torch.multinomial(probs.cpu(), n_dead, replacement=True, generator=generator)
    directions = centred[picks.to(x.device)]
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
    idx = dead.nonzero().squeeze(-1)
    sae.W_dec[idx] = directions
    sae.W_enc[:, idx] = directions.t() * 0.2 * enc_norm
    sae.b_enc[idx] = 0.0
    for param, rows in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        state = optimizer.state.get(param)
        if state:
            state["exp_avg"][rows] = 0.0
            state["exp_avg_sq"][rows] = 0.0
    return n_dead


def train_sae(sae: SparseAutoencoder, batches: Iterator[Tensor], config: SAETrainConfig | None = None,
              progress: Callable[[TrainStep], None] | None = None) -> TrainResult:
    """Train ``sae`` on activation batches [batch, d_in] (e.g. ``shuffled_batches(model_activations(...))``)
    for ``config.steps`` steps with Adam. On return the input scale is folded into the weights, so the SAE
    takes raw activations. ``progress`` is called every ``log_every`` steps and at the end."""
    cfg = config or SAETrainConfig()
    cfg.validate(sae)
    device = sae.W_enc.device
    first = next(batches, None)
    if first is None:
        raise LmforgeError("no activations to train the SAE on")
    first = first.to(device=device, dtype=sae.W_enc.dtype)
    if first.shape[-1] != sae.d_in:
        raise LmforgeError(f"activations have width {first.shape[-1]}, the SAE expects d_in={sae.d_in}")
    # One scalar so that E||s·x||² = d_in (JumpReLU paper, Sec. 5), estimated on the first batch.
    scale = math.sqrt(sae.d_in / float(first.pow(2).sum(-1).mean())) if cfg.normalize_input else 1.0
    with torch.no_grad():
        sae.b_dec.copy_((first * scale).mean(0))  # start the decoder bias at the data mean (Gao et al.: median)
        if cfg.unit_norm_decoder:
            sae.normalize_decoder_()
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    steps_since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    history: list[TrainStep] = []
    gen = torch.Generator().manual_seed(0)
    resampled = 0
    sae.train()

    def all_batches() -> Iterator[Tensor]:
        yield first
        for b in batches:
            yield b.to(device=device, dtype=sae.W_enc.dtype)

    stream = all_batches()
    for step_no in range(1, cfg.steps + 1):
        x = next(stream, None)
        if x is None:
            raise LmforgeError(f"the activation stream ended after {step_no - 1} of {cfg.steps} steps")
        x = x * scale
        dead = steps_since_fired >= cfg.dead_after_steps
        pre = sae.pre_activations(x)
        acts = sae.activate(pre)
        x_hat = sae.decode(acts)
        mse = reconstruction_loss(x, x_hat)
        weighted, sparsity = _sparsity_term(sae, cfg, x, x_hat, pre, acts, dead)
        loss = mse + weighted
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.unit_norm_decoder:
            sae.remove_decoder_parallel_grad_()
        optimizer.step()
        if cfg.unit_norm_decoder:
            sae.normalize_decoder_()
        with torch.no_grad():
            fired = (acts > 0).any(0)
            steps_since_fired = torch.where(fired, torch.zeros_like(steps_since_fired), steps_since_fired + 1)
            if cfg.resample_every and step_no % cfg.resample_every == 0 and step_no < cfg.steps:
                resampled += resample_dead_latents(sae, x, steps_since_fired >= cfg.dead_after_steps,
                                                   optimizer, gen)
        if step_no % cfg.log_every == 0 or step_no == cfg.steps:
            record = TrainStep(step_no, loss.item(), mse.item(), sparsity, float((acts > 0).sum(-1).float().mean()),
                               explained_variance(x.detach(), x_hat.detach()),
                               int((steps_since_fired >= cfg.dead_after_steps).sum()))
            history.append(record)
            if progress is not None:
                progress(record)
    sae.eval()
    sae.fold_input_scale_(scale)
    return TrainResult(history, steps_since_fired.cpu(), scale, resampled)


# ---- evaluation -------------------------------------------------------------------------------------------
@dataclass
class SAEMetrics:
    tokens: int
    l0: float  # mean number of active latents per token
    mse: float  # mean squared error per activation element
    explained_variance: float  # 1 - Σ||x - x̂||² / Σ||x - mean||²
    ce_clean: float
    ce_with_sae: float
    ce_zero_ablated: float
    ce_loss_recovered: float
    dead_latents: int  # latents that never fired on these tokens
    d_sae: int
    hook_name: str = ""

    @property
    def dead_fraction(self) -> float:
        return self.dead_latents / self.d_sae

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dead_fraction": self.dead_fraction}

    def table(self) -> str:
        """A Markdown table of the metrics (what ``lmforge sae train|eval`` prints)."""
        rows = [("hook", self.hook_name), ("tokens", f"{self.tokens:,}"), ("L0", f"{self.l0:.2f}"),
                ("explained variance", f"{self.explained_variance:.4f}"), ("MSE", f"{self.mse:.6g}"),
                ("CE clean", f"{self.ce_clean:.4f}"), ("CE with SAE", f"{self.ce_with_sae:.4f}"),
                ("CE zero-ablated", f"{self.ce_zero_ablated:.4f}"),
                ("CE loss recovered", f"{self.ce_loss_recovered:.4f}"),
                ("dead latents", f"{self.dead_latents} / {self.d_sae} ({self.dead_fraction:.1%})")]
        width = max(len(name) for name, _ in rows)
        lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
        return "\n".join(lines)


@dataclass
class _ReconstructionStats:
    """Streaming sums for L0, MSE and explained variance (float64: sums over many tokens)."""

    d_sae: int
    n: int = 0
    l0_sum: float = 0.0
    err_sum: float = 0.0
    x_sq_sum: float = 0.0
    x_sum: Tensor | None = None
    fired: Tensor | None = None

    def add(self, x: Tensor, x_hat: Tensor, acts: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.l0_sum += float((acts > 0).sum())
        self.err_sum += float((x - x_hat).pow(2).sum())
        self.x_sq_sum += float(x.pow(2).sum())
        self.x_sum = x.sum(0) if self.x_sum is None else self.x_sum + x.sum(0)
        fired = (acts > 0).any(0).cpu()
        self.fired = fired if self.fired is None else self.fired | fired

    def explained_variance(self) -> float:
        # Σ||x - mean||² = Σ||x||² - n·||mean||²
        total = self.x_sq_sum - float(self.x_sum.pow(2).sum()) / self.n
        return 1.0 - self.err_sum / total if total > 0 else float("nan")


def _next_token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


def evaluate_sae(model: nn.Module, sae: SparseAutoencoder, batches: Iterable[dict[str, Tensor]],
                 hook_name: str | None = None) -> SAEMetrics:
    """Reconstruction (L0, MSE, explained variance, dead latents) and the model's next-token CE with the
    activation at the hook kept (clean), replaced by the SAE's reconstruction, and zeroed, over ``batches``
    of {input_ids, labels}."""
    hook = check_sae_fits_model(sae, model, hook_name)
    stats = _ReconstructionStats(sae.d_sae)
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_targets = 0
    was_training = sae.training
    sae.eval()
    for batch in batches:
        ids, labels = batch["input_ids"].to(model.device), batch["labels"].to(model.device)
        seen: list[Tensor] = []
        with torch.no_grad():
            clean = model(ids, hooks={hook: lambda x, name, seen=seen: seen.append(x)})  # read, keep x
            x = seen[0].reshape(-1, sae.d_in)
            acts = sae.encode(x)
            stats.add(x, sae.decode(acts), acts)
            spliced = model(ids, hooks={hook: lambda x, name: sae(x)})
            zeroed = model(ids, hooks={hook: lambda x, name: torch.zeros_like(x)})
        ce["clean"] += float(_next_token_ce(clean, labels))
        ce["sae"] += float(_next_token_ce(spliced, labels))
        ce["zero"] += float(_next_token_ce(zeroed, labels))
        n_targets += int((labels != -100).sum())
    sae.train(was_training)
    if stats.n == 0 or n_targets == 0:
        raise LmforgeError("no tokens to evaluate the SAE on")
    clean, with_sae, zero = (ce[k] / n_targets for k in ("clean", "sae", "zero"))
    return SAEMetrics(tokens=stats.n, l0=stats.l0_sum / stats.n, mse=stats.err_sum / (stats.n * sae.d_in),
                      explained_variance=stats.explained_variance(), ce_clean=clean, ce_with_sae=with_sae,
                      ce_zero_ablated=zero, ce_loss_recovered=ce_loss_recovered(clean, with_sae, zero),
                      dead_latents=int((~stats.fired).sum()), d_sae=sae.d_sae, hook_name=hook)


# ---- top-activating contexts ------------------------------------------------------------------------------
@dataclass
class LatentExamples:
    latent: int
    max_activation: float
    density: float  # fraction of scanned tokens on which the latent fired
    examples: list[dict[str, Any]] = field(default_factory=list)


def top_activating_contexts(model: nn.Module, sae: SparseAutoencoder, batches: Iterable[dict[str, Tensor]],
                            latents: Sequence[int] | None = None, top_n: int = 10, context: int = 8,
                            decode_token: Callable[[int], str] | None = None) -> list[LatentExamples]:
    """For each latent (default all), the ``top_n`` tokens with its largest activations over ``batches`` (bound
    the scan with ``token_batches(max_tokens=...)``) and the window of ``context`` tokens each side, with the
    latent's activation on each window token. Only the current best examples are kept while streaming."""
    hook = check_sae_fits_model(sae, model)
    chosen = torch.arange(sae.d_sae) if latents is None else torch.tensor(list(latents), dtype=torch.long)
    if chosen.numel() == 0 or int(chosen.min()) < 0 or int(chosen.max()) >= sae.d_sae:
        raise LmforgeError(f"latents must be in [0, {sae.d_sae}), got {list(latents or [])}")
    n_lat, width = chosen.numel(), 2 * context + 1
    best_vals = torch.full((n_lat, top_n), float("-inf"))
    best_tokens = torch.full((n_lat, top_n, width), -1, dtype=torch.long)
    best_acts = torch.zeros(n_lat, top_n, width)
    fire_counts = torch.zeros(n_lat, dtype=torch.long)
    scanned = 0
    offsets = torch.arange(-context, context + 1)
    for batch in batches:
        ids = batch["input_ids"]
        b, t = ids.shape
        with torch.no_grad():
            x = next(model_activations(model, hook, [{"input_ids": ids}]))
            acts = sae.encode(x).float().cpu()[..., chosen].reshape(b, t, n_lat)
        scanned += b * t
        fire_counts += (acts > 0).reshape(-1, n_lat).sum(0)
        flat = acts.reshape(-1, n_lat).t()  # [n_lat, B*T]
        n_take = min(top_n, flat.shape[1])
        vals, pos = flat.topk(n_take, dim=1)  # [n_lat, n_take]
        rows, cols = pos // t, pos % t
        window_cols = cols[..., None] + offsets  # [n_lat, n_take, width]
        valid = (window_cols >= 0) & (window_cols < t)
        safe_cols = window_cols.clamp(0, t - 1)
        window_tokens = ids[rows[..., None].expand_as(safe_cols), safe_cols].masked_fill(~valid, -1)
        lat_index = torch.arange(n_lat)[:, None, None].expand_as(safe_cols)
        window_acts = acts[rows[..., None].expand_as(safe_cols), safe_cols, lat_index].masked_fill(~valid, 0.0)
        merged_vals = torch.cat([best_vals, vals], dim=1)
        keep_vals, keep = merged_vals.topk(top_n, dim=1)
        best_tokens = torch.cat([best_tokens, window_tokens], 1).gather(1, keep[..., None].expand(-1, -1, width))
        best_acts = torch.cat([best_acts, window_acts], 1).gather(1, keep[..., None].expand(-1, -1, width))
        best_vals = keep_vals
    if scanned == 0:
        raise LmforgeError("no tokens to scan for top-activating contexts")
    out = []
    for i, latent in enumerate(chosen.tolist()):
        examples = []
        for j in range(top_n):
            value = float(best_vals[i, j])
            if not value > 0:  # -inf (fewer tokens than top_n) or a token where the latent did not fire
                break
            keep_mask = best_tokens[i, j] >= 0
            token_ids = best_tokens[i, j][keep_mask].tolist()
            token_acts = [round(a, 4) for a in best_acts[i, j][keep_mask].tolist()]
            center = int(keep_mask[:context].sum())  # position of the max token inside the kept window
            example: dict[str, Any] = {"activation": value, "token_ids": token_ids, "activations": token_acts,
                                       "max_index": center}
            if decode_token is not None:
                example["tokens"] = [decode_token(tid) for tid in token_ids]
            examples.append(example)
        out.append(LatentExamples(latent, float(best_vals[i, 0]) if examples else 0.0,
                                  int(fire_counts[i]) / scanned, examples))
    return out


def highlight(example: dict[str, Any]) -> str:
    """The example's window as text with the max-activating token in ⟦ ⟧ (newlines shown as ⏎)."""
    tokens = example.get("tokens") or [str(t) for t in example["token_ids"]]
    parts = [f"⟦{tok}⟧" if i == example["max_index"] else tok for i, tok in enumerate(tokens)]
    return "".join(parts).replace("\n", "⏎")


def features_markdown(features: Sequence[LatentExamples], hook_name: str | None = None) -> str:
    lines = [f"# Top-activating contexts{f' at {hook_name}' if hook_name else ''}", ""]
    for feat in features:
        lines.append(f"## latent {feat.latent} — max {feat.max_activation:.3f}, density {feat.density:.3%}")
        if not feat.examples:
            lines.append("(never fired on the scanned tokens)")
        for ex in feat.examples:
            lines.append(f"- `{ex['activation']:.3f}` {highlight(ex)}")
        lines.append("")
    return "\n".join(lines)


__all__ = [
    "ARCHITECTURES",
    "LatentExamples",
    "SAEMetrics",
    "SAETrainConfig",
    "SparseAutoencoder",
    "TrainResult",
    "TrainStep",
    "auxk_loss",
    "ce_loss_recovered",
    "check_sae_fits_model",
    "evaluate_sae",
    "explained_variance",
    "features_markdown",
    "highlight",
    "hook_layer",
    "hook_width",
    "jumprelu",
    "jumprelu_l0_loss",
    "l1_sparsity_loss",
    "load_sae",
    "model_activations",
    "reconstruction_loss",
    "resample_dead_latents",
    "saelens_config",
    "save_sae",
    "shuffled_batches",
    "step",
    "token_batches",
    "top_activating_contexts",
    "topk_relu",
    "train_sae",
]
