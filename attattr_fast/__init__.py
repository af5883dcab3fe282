"""attattr-fast: self-attention attribution (AttAttr, Hao et al., AAAI 2021) for BERT-family classifiers."""

from attattr_fast.adapters import EncoderAdapter, adapter_for, register_adapter
from attattr_fast.api import AttentionAttribution
from attattr_fast.errors import AttAttrError, UnsupportedModelError
from attattr_fast.models import load_classifier
from attattr_fast.result import AttributionResult
from attattr_fast.results import load_results

__version__ = "0.1.0"

__all__ = [
    "AttAttrError",
    "AttentionAttribution",
    "AttributionResult",
    "EncoderAdapter",
    "UnsupportedModelError",
    "adapter_for",
    "load_classifier",
    "load_results",
    "register_adapter",
    "__version__",
]
