"""Interaction data: read chat logs in common formats and extract SDPO (x, y, o) tuples."""

from rayuid.data.extract import (
    ExtractConfig,
    ExtractReport,
    Interaction,
    NoInteractionsError,
    build_context,
    conversation_filter,
    conversation_interactions,
    extract_interactions,
    load_interactions,
    run_extract,
)
from rayuid.data.readers import RawRecord, detect_format, iter_records, normalise_conversation, normalise_message

__all__ = [
    "ExtractConfig",
    "ExtractReport",
    "Interaction",
    "NoInteractionsError",
    "RawRecord",
    "build_context",
    "conversation_filter",
    "conversation_interactions",
    "detect_format",
    "extract_interactions",
    "iter_records",
    "load_interactions",
    "normalise_conversation",
    "normalise_message",
    "run_extract",
]
