"""The ``ccm`` command line: the parser, the dispatch and the error mapping. Each subcommand has ``--help``; errors
print one clear line and exit 2. The commands live in :mod:`ccm.cli.commands`, one module per group."""

from __future__ import annotations

import argparse
import errno
import sys

from ccm._version import __version__
from ccm.cli.commands import acquire, data, learn, reconstruct
from ccm.errors import CcmError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccm", description="Computational cannula microscopy and see-through cameras.")
    parser.add_argument("--version", action="version", version=f"ccm {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (data, learn, reconstruct, acquire):
        group.add_parsers(sub)
    return parser


USER_OS_ERRORS = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is larger than this file system allows",
                  errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied",
                  errno.EROFS: "the file system is read-only"}
"""OS errors that are about the user's disk, not a bug: shown as one line (with the file) like a CcmError."""


def main(argv: list[str] | None = None) -> int:
    """Run one ``ccm`` command; returns the exit status (0 done, 2 an error in the user's input, 130 interrupted).

    A :class:`~ccm.errors.CcmError` (and a full disk) prints one line; anything else is a bug in ccm and
    prints its traceback. ``--debug`` prints the traceback for every error.
    """
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CcmError, OSError) as err:
        if args.debug or (isinstance(err, OSError) and not isinstance(err, CcmError) and err.errno not in USER_OS_ERRORS):
            raise
        message = _one_line(str(err)) if isinstance(err, CcmError) else _os_error_line(err)
        print(f"ccm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"ccm {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _one_line(message: str) -> str:
    """A CcmError re-raised by torch's DataLoader from a reader process carries the worker's formatted
    traceback in its message ("Caught RecordingError in DataLoader worker process 0. Original
    Traceback …"); the user's line is its last one, without the exception's class name."""
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.split(": ", 1)[0].rsplit(".", 1)[-1].endswith("Error") and ": " in last else last


def _os_error_line(err: OSError) -> str:
    what = USER_OS_ERRORS.get(err.errno, err.strerror or str(err))
    where = f"{err.filename}: " if err.filename else ""
    hint = " — free some space and run the same command again to resume" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
    return f"{where}{what}{hint}"


if __name__ == "__main__":
    sys.exit(main())
