"""What every command line of the package shares (``mlip-train`` / ``train.py``, ``python -m mlip_fast.eval``,
``python -m mlip_fast``): help that shows each option's effective default, a usage error as one line on stderr
(exit 2), and ``--version``."""
from __future__ import annotations

import argparse

from mlip_fast._records import version_line

__all__ = ["HelpFormatter", "Parser", "add_version", "no_bar"]


def no_bar(progress: bool):
    """tqdm's ``disable`` for a command's progress bars: off without ``progress``, else None (tqdm's "a bar only
    when the output is a terminal"), so a redirected log gets no carriage returns."""
    return None if progress else True


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to an option's help when there is a default to show (not None, not False, not
    suppressed) and the help does not already say what the default is; descriptions and epilogs keep their line
    breaks (tables)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (then exit 2) rather than the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: mlip_fast's version and those of the libraries a run depends on (read from the installed
    packages' metadata: nothing is imported)."""
    parser.add_argument("--version", action="version", version=version_line(),
                        help="show the versions of mlip_fast and its main dependencies, then exit")
