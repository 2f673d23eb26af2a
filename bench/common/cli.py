"""What the command lines of ``python -m bench``, ``bench.report`` and ``bench.tasks.*`` share.

:class:`HelpFormatter` keeps a module docstring's layout in ``--help`` and appends every option's
default to its help; :func:`add_device_option` / :func:`pick_device` give each command the same
``--device``.
"""

from __future__ import annotations

import argparse

import torch


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description and epilog as written (examples stay aligned), and ``(default: X)`` after
    every option's help.

    A default of None or ``""`` means "chosen at run time" (the device, a preset's own value); such
    an option's help says in words what it defaults to, so nothing is appended to it.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, "") or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``: a torch device name; by default CUDA when a CUDA device is available, else the CPU."""
    parser.add_argument("--device", default="",
                        help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: cuda when available, "
                             "else cpu)")


def pick_device(name: str) -> torch.device:
    """The ``--device`` value as a ``torch.device`` (empty: CUDA when available, else the CPU)."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
