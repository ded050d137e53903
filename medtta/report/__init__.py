"""Reports: the table `medtta run` prints, and `medtta report`, which turns the finished runs of an MLflow store into
`report.md`, CSV tables and PNG figures (`write_report`).

Modules: `text` (plain-text, Markdown and CSV tables), `store` (reading MLflow), `tables` (the statistics of
`medtta.stats` arranged per method, site, modality and paradigm), `figures` (matplotlib), `benchmark` (the report).
"""

from medtta.report.benchmark import Report, compute_tables, write_report
from medtta.report.store import Cell, SiteRun, Store, read_store
from medtta.report.tables import Bootstrap
from medtta.report.text import (
                                cost_line,
                                format_table,
                                markdown_table,
                                recovery_notes,
                                source_site_line,
                                store_args,
                                summary_table,
                                write_csv,
)

__all__ = ["Bootstrap", "Cell", "Report", "SiteRun", "Store", "compute_tables", "format_table", "markdown_table",
           "read_store", "cost_line", "recovery_notes", "source_site_line", "store_args", "summary_table", "write_csv",
           "write_report"]
