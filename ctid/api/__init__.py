"""The HTTP and websocket API (entry module: :mod:`ctid.api.server`).

``server`` (the aiohttp app and its lifetime), ``auth`` (tokens, sign-in, roles),
``commands`` (agent commands and errors shared by both transports), ``rest`` (HTTP
routes), ``websocket`` (``/ws`` and the fan-out hub), ``openapi`` (the document).
"""

from ctid.api.auth import Authenticator, Principal, Role, hash_secret, verify_secret
from ctid.api.server import ApiServer
from ctid.api.websocket import EventHub

__all__ = ["ApiServer", "Authenticator", "EventHub", "Principal", "Role", "hash_secret", "verify_secret"]
