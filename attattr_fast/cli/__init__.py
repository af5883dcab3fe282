"""`attattr-fast` command line: one module per subcommand, each with `register(subparsers)`.

Every expected failure (bad input, unknown model, corrupt results) is an `AttAttrError`, and a failed
write an `OSError`: printed as one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from attattr_fast import __version__
from attattr_fast.errors import AttAttrError

# Every module of attattr_fast.cli with a `register(subparsers)` is a subcommand; these come first.
FIRST = ("attribute", "graph", "heads", "prune", "finetune", "triggers")


def subcommand_modules() -> list[str]:
    import pkgutil

    import attattr_fast.cli as package

    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    return sorted(names, key=lambda name: (FIRST.index(name) if name in FIRST else len(FIRST), name))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attattr-fast", description="Self-attention attribution for BERT-family classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in subcommand_modules():
        module = importlib.import_module(f"attattr_fast.cli.{name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def _say(line: str) -> None:
    """One line to stderr in one write: `print` writes the text and its newline separately, so the lines of
    several processes sharing stderr (torchrun's ranks) could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="attattr-fast: %(levelname)s: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from attattr_fast.cli.common import check_paths_apart

        check_paths_apart(args, args.reads, args.writes)
        return int(args.func(args) or 0)
    except AttAttrError as exc:
        _say(f"attattr-fast: error: {exc}")
        return 2
    except OSError as exc:  # a disk that fills up or a path that vanishes mid-run
        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"attattr-fast: error: {where}{exc.strerror or exc}")
        return 2
    except KeyboardInterrupt:
        _say("attattr-fast: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
