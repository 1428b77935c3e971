"""CRM lookups: one HTTP client shared by the screen pop and the IVR ``lookup`` node.

See :mod:`ctid.crm.client` for the behaviour (errors, cache, single flight, logs).
"""

from ctid.crm.client import CONNECTION_LIMIT, MAX_BODY_BYTES, CRMClient, CRMError, CRMResult

__all__ = ["CONNECTION_LIMIT", "MAX_BODY_BYTES", "CRMClient", "CRMError", "CRMResult"]
