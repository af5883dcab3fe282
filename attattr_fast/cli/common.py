"""Options shared by the subcommands, parsed into checked values (errors are `AttAttrError`)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from attattr_fast.errors import AttAttrError
from attattr_fast.quadrature import METHODS

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="local model directory or cached hub id (default: the built-in MiniLM sentiment model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda if available)")


def add_attribution_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", default=None, help="0-based target layers, e.g. '0,3,5' or '0-5' (default: all)")
    parser.add_argument("--steps", default="20", help="quadrature steps (default 20)")
    parser.add_argument("--method", default="riemann_right", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 for the upper layers")
    parser.add_argument("--batch-size", default="8", help="examples per engine call (default 8)")


def parse_seed(value: str, name: str = "--seed") -> int:
    try:
        seed = int(value)
    except (TypeError, ValueError):
        seed = -1
    if not 0 <= seed < 2**63:
        raise AttAttrError(f"{name} must be an integer in [0, 2^63), got {value!r}")
    return seed


def parse_positive_int(value: str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise AttAttrError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise AttAttrError(f"{name} must be a positive integer, got {value!r}")
    return number


def parse_steps(value: str) -> int:
    """--steps: a positive integer up to `quadrature.MAX_STEPS`, checked before any work."""
    from attattr_fast.quadrature import too_many_steps

    steps = parse_positive_int(value, "--steps")
    if too_many := too_many_steps(steps, "--steps"):
        raise AttAttrError(too_many)
    return steps


def parse_top(value: str) -> int:
    """--top: how many strongest interactions per layer, at most `inputs.MAX_TOP_K`."""
    from attattr_fast.inputs import MAX_TOP_K

    top = parse_positive_int(value, "--top")
    if top > MAX_TOP_K:
        raise AttAttrError(f"--top {top} is more than {MAX_TOP_K}; every record keeps that many entries per layer")
    return top


IMAGE_FORMATS = ("png", "svg", "pdf")


def check_output_path(value: str | None, option: str, directory: bool = False, image: bool = False) -> Path | None:
    """An output path that can be written, checked before any work so that nothing runs for nothing.
    A file needs an existing, writable folder; a directory (made with its parents) a writable ancestor;
    an image (`image`) a .png, .svg or .pdf name."""
    if value is None:
        return None
    path = Path(value)
    if image and path.suffix.lstrip(".").lower() not in IMAGE_FORMATS:
        raise AttAttrError(f"{option} {value}: name the picture .{', .'.join(IMAGE_FORMATS)}")
    if path.is_dir() and not directory:
        raise AttAttrError(f"{option} {value} is a directory")
    if path.exists() and directory and not path.is_dir():
        raise AttAttrError(f"{option} {value} exists and is not a directory")
    folder = path if directory else path.parent
    if not directory and not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise AttAttrError(f"{option} {value}: {folder} {what}")
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not _can_create_in(folder):
        raise AttAttrError(f"{option} {value}: cannot write in {folder}")
    return path


DIRECTORY_READS = ("results",)  # the inputs that are directories; every other one is a file


class Outputs:
    """The outputs a command writes, all or none: in `with Outputs(*paths) as outputs:`, each one written is
    registered with `outputs.wrote(path)`; if a later step fails (a full disk, say), those are removed again,
    except the ones that existed before (a complete new version of the user's file beats none). The "wrote …"
    lines are printed once every write succeeded."""

    def __init__(self, *paths: Path | None):
        self.existed = {Path(path) for path in paths if path is not None and Path(path).exists()}

    def __enter__(self) -> Outputs:
        self.written: list[tuple[Path, str]] = []
        return self

    def wrote(self, path: Path, message: str | None = None, quiet: bool = False) -> None:
        """`path` is written; `message` (default "wrote PATH") is printed at the end unless `quiet`."""
        self.written.append((Path(path), "" if quiet else message or f"wrote {path}"))

    def __exit__(self, kind, exc, traceback) -> bool:
        import shutil
        import sys

        for path, message in self.written:
            if kind is None:
                if message:
                    print(message, file=sys.stderr)
            elif path in self.existed:
                continue
            elif path.is_dir():  # a directory this command made (a saved model: it must be new or empty)
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return False


def check_paths_apart(args, reads: tuple[str, ...], writes: tuple[str, ...]) -> None:
    """Refuse an empty path (it would mean the working directory), and an output (the options `writes`, by argparse
    dest) that is an input (`reads`), another output, or inside a directory read: writing it would destroy what
    the command reads or has just written."""
    def option(dest: str) -> str:
        return "--" + dest.replace("_", "-")

    for dest in reads + writes:
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            raise AttAttrError(f"{option(dest)} is empty; name a path")
        if dest in reads and dest not in DIRECTORY_READS and value and Path(value).is_dir():
            raise AttAttrError(f"{option(dest)} {value} is a directory; it takes a file")

    # as the writers take them: a "~" the shell left alone is a folder of that name, not the home directory
    read = {Path(value).resolve(): dest for dest in reads if (value := getattr(args, dest, None))}
    written: dict[Path, str] = {}
    for dest in writes:
        value = getattr(args, dest, None)
        if not value:
            continue
        path = Path(value).resolve()
        clash = read.get(path) or written.get(path)
        if clash is not None:
            raise AttAttrError(f"{option(dest)} {value} is also {option(clash)}; writing it would overwrite that")
        for folder, source in read.items():
            if folder in path.parents and folder.is_dir():
                raise AttAttrError(f"{option(dest)} {value} lies inside {option(source)} {getattr(args, source)}; "
                                   "write it elsewhere")  # fmt: skip
        written[path] = dest


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be made in `folder`, tried (permission bits do not tell for root or read-only mounts)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def parse_layers(value: str | None, n_layers: int) -> list[int] | None:
    """'0,3,5', '2-5' or a mix; checked against the model's layer count."""
    if value is None or value.strip().lower() == "all":
        return None
    if not value.strip():
        raise AttAttrError("--layers is empty; leave it out (or say 'all') for every layer")
    layers: list[int] = []
    for part in (p.strip() for p in value.split(",")):
        bounds = part.split("-", 1) if "-" in part[1:] else [part, part]
        try:
            lo, hi = int(bounds[0]), int(bounds[1])
        except ValueError:
            raise AttAttrError(f"--layers: cannot parse {value!r}; use e.g. '0,3,5' or '0-5'") from None
        if lo > hi:
            raise AttAttrError(f"--layers: range {part!r} runs backwards")
        layers.extend(range(lo, hi + 1))
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise AttAttrError(f"--layers: layer {bad[0]} out of range; the model has layers 0..{n_layers - 1}")
    if len(set(layers)) != len(layers):
        raise AttAttrError(f"--layers: duplicate layers in {value!r}")
    return layers


def parse_method(value: str) -> str:
    if value not in METHODS:
        raise AttAttrError(f"--method: unknown method {value!r}; choose one of {', '.join(METHODS)}")
    return value


def parse_dtype(value: str) -> torch.dtype | None:
    if value not in DTYPE_NAMES:
        raise AttAttrError(f"--dtype: unknown dtype {value!r}; choose float32, bfloat16 or float16")
    dtype = DTYPE_NAMES[value]
    return None if dtype == torch.float32 else dtype


def parse_device(value: str | None) -> torch.device:
    from attattr_fast.inputs import checked_device

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return checked_device(value, "--device")


def load_model(name: str | None, device: torch.device):
    from attattr_fast.models import load_classifier

    model, tokenizer = load_classifier(name)
    return model.to(device), tokenizer
