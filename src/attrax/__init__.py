"""attrax: attribution methods for PyTorch as pure, composable functions on torch.func.

    >>> import attrax as ax
    >>> model_fn, params = ax.functionalize(module)          # doctest: +SKIP
    >>> attr = ax.integrated_gradients(model_fn, params, x, target)  # doctest: +SKIP
"""

from . import canonizers, composites, concepts, distributed, layer, lm, metrics, neuron, rules, serving, targets
from . import text  # token/span perturbation for language models (Captum LLMAttribution)
from .conditional import conditional
from .core import FunctionalModel, functionalize
from .deeplift import deconvnet, deeplift, deeplift_shap, guided_backprop
from .lrp import lrp
from .serving import compile, export, value_and_attribution
from .perturbation import (
    feature_ablation,
    feature_permutation,
    kernel_shap,
    lime,
    occlusion,
    shapley_sampling,
    shapley_values,
)
from .gradients import (
    gradient,
    gradient_shap,
    input_x_gradient,
    integrated_gradients,
    noise_tunnel,
    saliency,
    smoothgrad,
)

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: testing and viz need optional dependencies; relevance is the LRP rules' old home
    if name in ("testing", "viz", "relevance"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FunctionalModel",
    "compile",
    "export",
    "serving",
    "value_and_attribution",
    "conditional",
    "deconvnet",
    "distributed",
    "deeplift",
    "deeplift_shap",
    "functionalize",
    "guided_backprop",
    "gradient",
    "gradient_shap",
    "input_x_gradient",
    "feature_ablation",
    "feature_permutation",
    "integrated_gradients",
    "kernel_shap",
    "layer",
    "lm",
    "targets",
    "lime",
    "occlusion",
    "shapley_sampling",
    "shapley_values",
    "lrp",
    "metrics",
    "neuron",
    "canonizers",
    "composites",
    "concepts",
    "rules",
    "noise_tunnel",
    "saliency",
    "smoothgrad",
]
