"""What loading a model prints: one plain line for weights the checkpoint did not hold, instead of
transformers' ANSI "LOAD REPORT" table, no FutureWarning for PEFT's use of the deprecated
`is_gradient_checkpointing` (our own calls use the current names), and none of transformers' own
progress bars ("Loading weights", "Writing model shards": sub-second bars between our run's lines)."""
from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """Inside: transformers' tqdm bars are off (restored after, as the caller had them)."""
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def quiet_transformers(fn: Callable) -> Callable:
    """`fn` runs with transformers' log at errors only and its bars off; both are restored after (a
    whole-run entry point like the demo, whose own lines are the output)."""
    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        from transformers.utils import logging as hf_logging
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with no_transformers_bars():
                return fn(*args, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
    return quiet


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Inside: transformers' load report, its bars and PEFT's deprecation warning are not shown."""
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    logger.addFilter(report_filter)
    try:
        with warnings.catch_warnings(), no_transformers_bars():
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
