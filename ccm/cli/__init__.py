"""The ``ccm`` command line (:func:`main`)."""

from ccm.cli.main import main

__all__ = ["main"]
