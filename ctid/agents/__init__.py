"""Agents: state machine (``states``) and the in-memory registry (entry module: :mod:`ctid.agents.registry`)."""

from ctid.agents.registry import Agent, AgentCommandError, AgentError, AgentRegistry, UnknownAgentError
from ctid.agents.states import DEFAULT_PAUSE_REASONS, TRANSITIONS, AgentState, AgentStateError, Trigger

__all__ = [
    "DEFAULT_PAUSE_REASONS",
    "TRANSITIONS",
    "Agent",
    "AgentCommandError",
    "AgentError",
    "AgentRegistry",
    "AgentState",
    "AgentStateError",
    "Trigger",
    "UnknownAgentError",
]
