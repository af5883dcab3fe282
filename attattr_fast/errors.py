"""Errors the package raises for bad input; the CLI prints them as one line and exits non-zero."""


class AttAttrError(ValueError):
    """Bad input or an unsupported request, explained in one line."""


class UnsupportedModelError(AttAttrError):
    """The model is not of a family that has an adapter."""


class NonFiniteScores(AttAttrError):
    """A NaN or infinite score of the example at `position` in the call; `template` names it "{example}", so
    that a caller that batched the examples can name it by its own number (`renamed`)."""

    def __init__(self, template: str, position: int):
        super().__init__(template.format(example=f"example {position}"))
        self.template, self.position = template, position

    def renamed(self, example: str) -> AttAttrError:
        return AttAttrError(self.template.format(example=example))


def require_file(path, what: str) -> None:
    """AttAttrError in one line unless `path` is a file: a directory given for a file is named as such."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise AttAttrError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise AttAttrError(f"{what} not found: {path}")
