"""The ``fedcsg`` command line, one entry point (:func:`main`) for every subcommand.

``params`` and ``bytes`` (:mod:`~fedcsg.cli.models`) look at a model without training it; ``run``,
``compare``, ``configs`` and ``report`` (:mod:`~fedcsg.cli.runs`) run and report federated
simulations; ``export`` and ``deploy`` (:mod:`~fedcsg.cli.deploy`) write model files for devices and
run a federation on real processes. Shared argument helpers live in :mod:`~fedcsg.cli.args`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fedcsg.cli import deploy, models, runs
from fedcsg.cli.args import OneLineParser, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fedcsg", description="Federated learning with CSG-backed CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)
    models.register(sub)
    runs.register(sub)
    deploy.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
