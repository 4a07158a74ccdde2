"""Workflows: ``chain``, ``group``, ``chord``, ``link`` / ``link_error`` (see the README)."""

from ..errors import ChordError
from .flows import ErrorInfo
from .nodes import Chain, Chord, Group, chain, chord, group
from .results import FlowResult, GroupResult

__all__ = [
    "Chain",
    "Chord",
    "ChordError",
    "ErrorInfo",
    "FlowResult",
    "Group",
    "GroupResult",
    "chain",
    "chord",
    "group",
]
