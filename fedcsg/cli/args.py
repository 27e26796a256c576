"""What the ``fedcsg`` subcommands share: the one-line parser, argument types, the model options,
and running a parsed command (one-line errors, exit code 2)."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Callable, Sequence

from fedcsg.nn.models import MODELS, PAPER_MODELS
from fedcsg.runs.records import RunFailed
from fedcsg.spec.checks import OneLineParser as OneLineParser  # the CLI's parser, re-exported
from fedcsg.spec.checks import shown

# One line, exit code 2. An OSError that names a file the user gave (no permission to write it, a
# directory where a file was asked for) is the user's too: the checks before writing should catch it first.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    ConnectionError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


# A write the machine refused (full disk, quota, read-only file system): one line naming the path, exit code 1.
# The files written before are whole (every write is atomic, fedcsg.io.atomic_write_bytes).
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def storage_error(error: OSError) -> str:
    """The one line for a write that :data:`STORAGE_ERRORS` refused."""
    where = f" writing {str(error.filename)!r}" if error.filename else ""
    return (
        f"{error.strerror or os.strerror(error.errno or 0)}{where} (errno {errno.errorcode.get(error.errno or 0)}): "
        "the files written before are intact; free space (or choose another --out) and pass --resume DIR to continue"
    )


def ascii_digits(text: str) -> str:
    """``text`` if it is an integer in ASCII digits (``int`` alone takes '٣' for 3), else ValueError."""
    if not text.strip().lstrip("+-").isascii():
        raise ValueError(text)
    return text


def integer(text: str) -> int:
    """argparse type: an integer in ASCII digits (range checked by the command)."""
    try:
        return int(ascii_digits(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer") from None


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(ascii_digits(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer (a positive integer is accepted)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive (a positive integer is accepted)")
    return value


def port(text: str) -> int:
    """argparse type: a TCP port, 0 for a free one."""
    try:
        value = int(ascii_digits(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a port number (0..65535; 0 = a free one)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0..65535; 0 = a free one)")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, its CSG settings, ``--num-classes`` and ``--in-channels``."""
    parser.add_argument(
        "--model",
        required=True,
        help=f"registry model ({', '.join([*MODELS, *PAPER_MODELS])}, densenet40-kN), or package.module:factory "
        "(your own), torchvision:NAME, timm:NAME",
    )
    parser.add_argument(
        "--slice", dest="slice_shape", help="slice shape OUTxINxKxK (default: the model's, e.g. 12x12x3x3)"
    )
    parser.add_argument("--code-dim", type=positive_int, help="code dimension (default: slice numel / 18)")
    parser.add_argument("--pointwise-slice", help="also generate 1x1 convs with this slice, e.g. 16x16x1x1")
    parser.add_argument(
        "--num-classes", type=positive_int, help="default: the model's own (resnet50 1000, deeplabv3 21), else 10"
    )
    parser.add_argument("--in-channels", type=positive_int, default=None, help="default: 1 for fmnist-cnn, else 3")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand's handler; a user error is one line on stderr, exit 2."""
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except USER_ERRORS as error:
        print(f"fedcsg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:  # nothing trained: its records are written, the exit code says it failed
        print(f"fedcsg {args.command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        if error.errno not in STORAGE_ERRORS:
            raise
        print(f"fedcsg {args.command}: error: {storage_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        # Ctrl-C or SIGTERM (see fedcsg.fl.ray_cluster.interruptible); what the run started is stopped.
        # Exit at once: the ServerApp thread of Flower's simulation engine is not a daemon and would
        # hold the interpreter open waiting for replies that no longer come.
        signum = getattr(stop, "signum", signal.SIGINT)
        print(
            f"fedcsg {args.command}: {signal.Signals(signum).name}: stopped; the records hold every completed round",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)


def table(rows: Sequence[Sequence[object]], left: int = 1) -> list[str]:
    """Lines of a plain-text table: integers with thousands separators, the first ``left`` columns
    left-aligned and the others right-aligned, every column as wide as its widest cell plus two spaces,
    so that no two numbers ever run together."""
    cells = [[f"{c:,}" if isinstance(c, int) and not isinstance(c, bool) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "".join(
            cell.ljust(widths[i] + 2) if i < left else cell.rjust(widths[i] + 2) for i, cell in enumerate(row)
        ).rstrip()
        for row in cells
    ]
