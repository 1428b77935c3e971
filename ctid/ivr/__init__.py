"""IVR flows run over FastAGI: definitions (:mod:`ctid.ivr.model`), the runner
(:mod:`ctid.ivr.runner`), conditions (:mod:`ctid.ivr.conditions`), business hours
(:mod:`ctid.ivr.hours`) and prompts (:mod:`ctid.ivr.prompts`).

This package's ``__init__`` imports nothing: :mod:`ctid.config` imports
:mod:`ctid.ivr.model`, and the runner imports :mod:`ctid.config`.
"""
