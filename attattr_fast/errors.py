"""Errors the package raises for bad input; the CLI prints them as one line and exits non-zero."""


class AttAttrError(ValueError):
    """Bad input or an unsupported request, explained in one line."""


class UnsupportedModelError(AttAttrError):
    """The model is not of a family that has an adapter."""


def require_file(path, what: str) -> None:
    """AttAttrError in one line unless `path` is a file: a directory given for a file is named as such."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise AttAttrError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise AttAttrError(f"{what} not found: {path}")
