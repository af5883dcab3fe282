"""Errors the package raises for bad input; the CLI prints them as one line and exits non-zero."""


class AttAttrError(ValueError):
    """Bad input or an unsupported request, explained in one line."""


class UnsupportedModelError(AttAttrError):
    """The model is not of a family that has an adapter."""
