"""adainfer: the AdaInfer algorithm and its Hugging Face integration.

AdaInfer (Fan et al., "Not All Layers of LLMs Are Necessary During Inference", IJCAI 2025) stops
each input at the layer where a small classifier over logit-lens features (top-1 probability and
the top-1/top-2 gap) says its answer is settled. The ops live in ``adainfer_kernels``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
