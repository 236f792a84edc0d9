"""Interpretability on the model's one forward pass: activations by TransformerLens's hook names
(``run_with_cache``, ``run_with_hooks``), the logit lens, direct logit attribution, activation patching,
steering vectors (CAA, PCA; llama.cpp control-vector GGUF) and sparse autoencoders (SAELens format).

``lmforge interp`` (``lmforge.interp.cli``) writes tables and heatmaps; ``lmforge sae`` trains and reads SAEs. Each submodule exports its own
names below; ``model.hook_names()`` lists a model's hook points.
"""

from lmforge.interp.hooks import ActivationCache, patch_positions, resolve_name, run_with_cache, run_with_hooks
from lmforge.interp.lens import LogitAttribution, LogitLens, direct_logit_attribution, logit_lens
from lmforge.interp.patching import activation_patching, logit_diff_metric, metric_value
from lmforge.interp.sae import (
                                SAEMetrics,
                                SAETrainConfig,
                                SparseAutoencoder,
                                evaluate_sae,
                                load_sae,
                                save_sae,
                                top_activating_contexts,
                                train_sae,
)
from lmforge.interp.steering import (
                                Steering,
                                SteeringVector,
                                contrastive_vector,
                                load_steering_vector,
                                paired_differences,
                                pca_vector,
                                resid_activations,
                                steering_hooks,
)

__all__ = [
    # hooks
    "ActivationCache", "patch_positions", "resolve_name", "run_with_cache", "run_with_hooks",
    # lens
    "LogitAttribution", "LogitLens", "direct_logit_attribution", "logit_lens",
    # patching
    "activation_patching", "logit_diff_metric", "metric_value",
    # sparse autoencoders
    "SAEMetrics", "SAETrainConfig", "SparseAutoencoder", "evaluate_sae", "load_sae", "save_sae",
    "top_activating_contexts", "train_sae",
    # steering
    "Steering", "SteeringVector", "contrastive_vector", "load_steering_vector", "paired_differences", "pca_vector",
    "resid_activations", "steering_hooks",
]
