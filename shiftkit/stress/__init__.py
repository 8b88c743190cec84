"""Stress tests: an encoder under every shift and severity, as flat records."""

from .runner import RECORD_FIELDS, read_records, run_stress_test, write_records

__all__ = ["RECORD_FIELDS", "read_records", "run_stress_test", "write_records"]
