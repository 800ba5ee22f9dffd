"""Results → terminal tables, JSON, HTML with plots. The only code that writes reports."""

from normlab.report.html import Page, escape, figure_data_uri
from normlab.report.io import atomic_write_text, write_json

__all__ = ["Page", "atomic_write_text", "escape", "figure_data_uri", "write_json"]
