"""attattr-fast: self-attention attribution (AttAttr, Hao et al., AAAI 2021) for BERT-family classifiers.

The public names load on first use, so `import attattr_fast.reference` stays free of the engine and the
kernels (DESIGN §6).
"""

from __future__ import annotations

import importlib

# 0.2.0: heads of a pruned model keep their unpruned numbers in results (0.1.0 numbered the kept heads 0, 1, …)
__version__ = "0.2.0"

_EXPORTS = {
    "AttAttrError": "attattr_fast.errors",
    "AttentionAttribution": "attattr_fast.api",
    "AttributionResult": "attattr_fast.result",
    "EncoderAdapter": "attattr_fast.adapters",
    "UnsupportedModelError": "attattr_fast.errors",
    "adapter_for": "attattr_fast.adapters",
    "load_classifier": "attattr_fast.models",
    "load_results": "attattr_fast.results",
    "register_adapter": "attattr_fast.adapters",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attattr_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
