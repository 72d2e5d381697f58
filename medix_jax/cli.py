"""What every ``python -m medix_jax.<tool>`` command line shares: its parser and its one-line errors.

``parser(module, doc)`` names the program as it is run (``python -m medix_jax.train``), turns the module docstring
into plain text (no reST markup: ``literals``, ``**bold**``, ``::``) and shows each flag's default after its help.
``fail(tool, message)`` prints ``medix_jax.<tool>: message`` on stderr and gives the exit code, no traceback.
"""

from __future__ import annotations

import argparse
import re
import sys


def plain(doc: str) -> str:
    """A reST docstring as terminal text: ````x```` -> ``x``, ``**x**``/``*x*`` -> ``x``, a trailing ``::`` -> ``:``."""
    text = re.sub(r"``(.+?)``", r"\1", doc, flags=re.DOTALL)  # a literal may wrap onto the next line
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text, flags=re.DOTALL)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    return re.sub(r"::(\s*)$", r":\1", text, flags=re.MULTILINE)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (paragraphs kept) and ``(default: X)`` after each flag's help."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        shown = action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS)
        if not shown or "%(default)" in help_text:
            return help_text
        return help_text + " (default: %(default)s)"


def parser(module: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """An argument parser for ``python -m {module}`` whose description is ``doc`` as plain text."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=plain(doc or ""),
                                   formatter_class=_Formatter, **kwargs)


def fail(tool: str, message: object, code: int = 2) -> int:
    """Print ``medix_jax.<tool>: message`` on stderr (one line: what failed, where, and the command that fixes it)."""
    print(f"medix_jax.{tool}: {message}", file=sys.stderr)
    return code


class Unwritable(OSError):
    """An output directory that cannot be made or written."""


def check_writable(directory, what: str) -> None:
    """An ``Unwritable`` error naming ``what`` (the flag or key) unless ``directory`` exists or can be made, and takes a
    file: an unwritable output fails before any work, not after it."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".medix-write-check-"):
            pass
    except OSError as e:
        hint = f" (writable by {os.environ.get('USER') or 'this user'}?)" if isinstance(e, PermissionError) else ""
        raise Unwritable(f"{what} {path} cannot be written{hint}: {e.strerror or e}; choose another "
                              f"{what}") from None
