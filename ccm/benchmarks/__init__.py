"""Benchmark suites behind ``ccm benchmark``: the top of the import graph (nothing in the library
imports them)."""
