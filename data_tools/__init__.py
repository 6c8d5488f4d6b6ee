"""Data tools: `python -m data_tools COMMAND ...` (URL lists -> WebDataset shards, demo corpus)."""


class DataToolsError(Exception):
    """Bad user input (missing file, unknown column, ...): the CLI prints `error: MESSAGE` and exits 2."""
