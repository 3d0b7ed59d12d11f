"""What loading a model prints: one plain line for weights the checkpoint did not hold, instead of
transformers' ANSI "LOAD REPORT" table, and no FutureWarning for PEFT's use of the deprecated
`is_gradient_checkpointing` (our own calls use the current names)."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Inside: transformers' load report and PEFT's deprecation warning are not shown."""
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    logger.addFilter(report_filter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            yield
    finally:
        logger.removeFilter(report_filter)


def new_weights_line(source: str, loading_info: dict) -> str | None:
    """'model X: newly initialised (not in the checkpoint): score.weight', or None if nothing was."""
    missing = sorted(loading_info.get("missing_keys") or [])
    if not missing:
        return None
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return f"model '{source}': newly initialised (not in the checkpoint): {shown}"
