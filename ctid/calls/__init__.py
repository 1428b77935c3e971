"""Calls: a pure model of Asterisk calls, fed AMI events (entry module: :mod:`ctid.calls.model`)."""

from ctid.calls.model import (
    CHANNELVARS,
    Call,
    CallChange,
    CallModel,
    CallModelError,
    ChangeKind,
    Direction,
    HangupBy,
    Leg,
    Role,
    UnknownCallError,
    external_number,
)
from ctid.calls.states import MARKABLE, TRANSITIONS, CallState, CallStateError, Source

__all__ = [
    "CHANNELVARS",
    "MARKABLE",
    "TRANSITIONS",
    "Call",
    "CallChange",
    "CallModel",
    "CallModelError",
    "CallState",
    "CallStateError",
    "ChangeKind",
    "Direction",
    "HangupBy",
    "Leg",
    "Role",
    "Source",
    "UnknownCallError",
    "external_number",
]
