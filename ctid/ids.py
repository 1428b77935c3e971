"""The id type of ctid's pydantic models: ``[A-Za-z0-9_.-]{1,64}``, not only dots.

Ids go into MQTT topics, file names, AMI values and AGI arguments, so the config
(:mod:`ctid.config`) and the IVR flow definitions (:mod:`ctid.ivr.model`) share this one
definition (the check itself is :func:`ctid.asterisk.safety.check_id`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from ctid.asterisk.safety import UnsafeValueError, check_id

__all__ = ["Id"]


def _check_id(value: str) -> str:
    try:
        return check_id(value)
    except UnsafeValueError:
        raise ValueError("must match [A-Za-z0-9_.-]{1,64} and not be only dots") from None


Id = Annotated[str, AfterValidator(_check_id)]
