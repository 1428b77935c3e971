"""Skills-based routing (ACD).

- :mod:`ctid.acd.expr`: the skill-expression language (``lang:zh>=5 & product:*``).
- :mod:`ctid.acd.rules`: a queue's routing rules (policy, relaxation, priority, sticky
  agent, overflow, limits), built from :class:`ctid.config.QueueConfig`.

This file imports nothing on purpose: :mod:`ctid.config` imports :mod:`ctid.acd.expr`
to validate expressions, and :mod:`ctid.acd.rules` imports :mod:`ctid.config`.
"""
