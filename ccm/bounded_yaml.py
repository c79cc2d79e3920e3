"""YAML from other labs, parsed within bounds: device descriptions, recipes and dataset recipes.

PyYAML's ``safe_load`` runs no code but trusts a file's size and structure: a 1 KB document of nested
aliases (a "billion laughs") expands to gigabytes. ccm's YAML files are small, flat-ish mappings that
never need anchors, so :func:`load_yaml` refuses aliases outright, and files or texts over
:data:`MAX_BYTES` or nested deeper than :data:`MAX_DEPTH`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ccm.errors import UsageError

MAX_BYTES = 1_000_000
"""Largest YAML text accepted (ccm's own are a few KB)."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists accepted."""


class YAMLLimitError(UsageError):
    """A YAML text beyond the bounds of :mod:`ccm.bounded_yaml`."""


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses aliases and nesting deeper than :data:`MAX_DEPTH` while composing."""

    def __init__(self, stream, source: str):
        super().__init__(stream)
        self.source, self.depth = source, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise YAMLLimitError(f"{self.source}: line {mark.line + 1}: YAML aliases (*name) are not accepted in ccm files; "
                                 "write the values out")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise YAMLLimitError(f"{self.source}: nested deeper than {MAX_DEPTH} levels; not a ccm file")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(text: str, source: str = "<text>") -> Any:
    """Parse ``text`` (from ``source``, named in errors) within the module's bounds; YAML errors propagate as
    :class:`yaml.YAMLError`, bounds as :class:`YAMLLimitError`."""
    if len(text) > MAX_BYTES:
        raise YAMLLimitError(f"{source}: {len(text):,} characters of YAML; ccm files are below {MAX_BYTES:,}")
    loader = _BoundedLoader(text, source)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path) -> Any:
    """:func:`load_yaml` of a file, refusing one over :data:`MAX_BYTES` before reading it."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise YAMLLimitError(f"{path}: {size:,} bytes of YAML; ccm files are below {MAX_BYTES:,}")
    return load_yaml(path.read_text(), str(path))
