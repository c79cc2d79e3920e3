"""The ``ccm`` subcommands, one module per group (see :mod:`ccm.cli.main`)."""

__all__: list[str] = []
