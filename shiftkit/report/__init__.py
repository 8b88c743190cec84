"""Robustness reports built from stress-test records."""

from .html import SECTIONS, build_report

__all__ = ["SECTIONS", "build_report"]
