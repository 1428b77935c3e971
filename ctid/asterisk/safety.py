"""The one input-validation module: every value ctid hands to Asterisk or to a URL.

This module is a security boundary. Values that reach Asterisk travel through
text protocols whose separators are ordinary characters (CR/LF end AMI headers,
commas split ``Variable:`` and dialplan application arguments, ``&`` adds Dial
targets, whitespace and quotes split AGI arguments). A value that carries one of
those separators stops being a value and becomes protocol. So each entry point
below checks one kind of value against a strict pattern and raises a named
:class:`UnsafeValueError` subclass, instead of escaping or silently dropping.

How the pieces fit:

- ``ctid.config`` calls :func:`check_id` for tenant, service-line, agent and queue
  ids (they end up in MQTT topics, file names and AMI values).
- The AMI serializer calls :func:`check_ami_value` for every header key and value.
  Action builders call :func:`check_originate_variable` (``Variable:``),
  :func:`check_device` (the ``Channel:`` ctid dials), :func:`check_context`,
  :func:`check_extension` and :func:`check_dialplan_value` (Redirect, Setvar).
- Numbers ctid will *dial* (callback, transfer, click-to-dial) go through a
  :class:`DialPolicy`, the toll-fraud guard. Inbound caller IDs are data, never
  validated this way: use :func:`e164_or_none` to display or match them.
- FastAGI command lines are built with :func:`agi_command` / :func:`agi_quote`;
  ``agi_protocol`` re-checks every raw line with :func:`check_agi_line`.
- CRM/HTTP lookups build their URL with :func:`render_url_template`.

Error messages name the field and, for non-secret values, show a shortened
``repr`` (which escapes CR/LF, so a hostile value cannot forge log lines).
:func:`check_ami_value` never echoes the value: it may be a secret.
"""

from __future__ import annotations

import re
import string
from collections.abc import Collection, Mapping, Sequence
from typing import Final, Literal
from urllib.parse import quote

__all__ = [
    "DEVICE_PATTERN",
    "ID_PATTERN",
    "MAX_AGI_COMMAND_BYTES",
    "AGIValueError",
    "AMIValueError",
    "DialNumberRejected",
    "DialPolicy",
    "DialplanValueError",
    "InvalidDevice",
    "InvalidId",
    "UnsafeValueError",
    "agi_command",
    "agi_quote",
    "check_agi_line",
    "check_ami_value",
    "check_context",
    "check_device",
    "check_dialplan_value",
    "check_extension",
    "check_id",
    "check_originate_variable",
    "e164_or_none",
    "render_url_template",
]


# --------------------------------------------------------------------------- errors


class UnsafeValueError(ValueError):
    """A value was refused because it could change the meaning of a protocol line."""


class InvalidId(UnsafeValueError):
    """A tenant/service-line/agent/queue id does not match :data:`ID_PATTERN`."""


class AMIValueError(UnsafeValueError):
    """A value cannot be sent safely in an AMI header (or an AMI ``Variable:``)."""


class DialplanValueError(AMIValueError):
    """A context, extension or channel-variable value is not safe for the dialplan."""


class InvalidDevice(UnsafeValueError):
    """A device string is not one plain ``TECH/resource`` that ctid may dial."""


class AGIValueError(UnsafeValueError):
    """A FastAGI command or argument cannot be framed safely."""


DialRejectReason = Literal["format", "prefix"]


class DialNumberRejected(UnsafeValueError):
    """A number ctid was asked to dial was refused by a :class:`DialPolicy`.

    ``reason`` is ``"format"`` (not a plausible E.164 number after removing
    cosmetic characters) or ``"prefix"`` (well formed, but not on the allow-list,
    or on the deny-list).
    """

    def __init__(self, reason: DialRejectReason, message: str) -> None:
        super().__init__(message)
        self.reason: DialRejectReason = reason


def _shown(value: object, limit: int = 40) -> str:
    """A short, escaped rendering of a non-secret value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_LINE_BREAKS: Final = ("\r", "\n", "\0")


def _has_line_break(value: str) -> bool:
    return any(ch in value for ch in _LINE_BREAKS)


def _has_control(value: str) -> bool:
    """C0 controls (tab included) and DEL; they have no business in dialplan values."""
    return any(ord(ch) < 0x20 or ch == "\x7f" for ch in value)


def _has_expression(value: str) -> bool:
    """``${...}`` and ``$[...]`` are evaluated wherever Asterisk substitutes text."""
    return "${" in value or "$[" in value


# --------------------------------------------------------------------------- ids

ID_PATTERN: Final = r"[A-Za-z0-9_.-]{1,64}"
_ID_RE: Final = re.compile(ID_PATTERN)


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe id, else raise :class:`InvalidId`.

    Ids are 1-64 characters of ``A-Z a-z 0-9 _ . -``, so they are safe as an MQTT
    topic level (no ``/ + #``), as a file name, and as an AMI value. An id made
    only of dots (``.``, ``..``) is refused as well: as a file name it is a
    directory reference.
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidId(f"invalid {what}: {_shown(value)} (expected {ID_PATTERN})")
    if value.strip(".") == "":
        raise InvalidId(f"invalid {what}: {_shown(value)} (dots only)")
    return value


# --------------------------------------------------------------------------- AMI


def check_ami_value(value: str, field: str) -> str:
    """Return ``value`` if it can be one AMI header key or value; else raise.

    CR, LF or NUL would end the header (or the whole action) early and let the
    rest be read as extra headers, for example a second ``Action:``. The error
    names ``field`` and never shows the value, which may be a secret.
    """
    if not isinstance(value, str):
        raise AMIValueError(f"AMI field {_shown(field)} is not a string")
    if _has_line_break(value):
        raise AMIValueError(f"AMI field {_shown(field)} contains CR, LF or NUL")
    return value


_VARIABLE_NAME_RE: Final = re.compile(r"(?:__|_)?[A-Za-z][A-Za-z0-9_]{0,79}")


def check_originate_variable(name: str, value: str) -> str:
    """Return ``"NAME=value"`` for one AMI ``Variable:`` header, or raise.

    ``name`` is a channel variable name (``[A-Za-z_][A-Za-z0-9_]*`` after an
    optional ``_``/``__`` inheritance prefix; ``__CTID_CALL_ID`` is inherited by
    every channel the call creates). Asterisk splits a ``Variable:`` value on
    commas and removes double quotes and backslashes while doing so, so ``value``
    must contain none of ``, " \\``, no control character (CR/LF/NUL included) and
    no ``${``/``$[`` expression. Raises :class:`AMIValueError`.
    """
    if not isinstance(name, str) or not _VARIABLE_NAME_RE.fullmatch(name):
        raise AMIValueError(f"invalid channel variable name {_shown(name)}")
    if not isinstance(value, str):
        raise AMIValueError(f"value of channel variable {name} is not a string")
    if _has_control(value):
        raise AMIValueError(f"value of channel variable {name} contains a control character")
    if any(ch in value for ch in ',"\\'):
        raise AMIValueError(
            f"value of channel variable {name} contains a comma, quote or backslash"
        )
    if _has_expression(value):
        raise AMIValueError(f"value of channel variable {name} contains a ${{}} or $[] expression")
    return f"{name}={value}"


def check_dialplan_value(value: str, field: str, *, allow_expressions: bool = False) -> str:
    """Return ``value`` if it is safe as a plain dialplan value (e.g. Setvar ``Value:``).

    Refuses CR, LF and NUL (header smuggling) and, unless ``allow_expressions``,
    ``${...}``/``$[...]`` so data from callers or a CRM never becomes dialplan
    code. Raises :class:`DialplanValueError`.
    """
    if not isinstance(value, str):
        raise DialplanValueError(f"dialplan value {_shown(field)} is not a string")
    if _has_line_break(value):
        raise DialplanValueError(f"dialplan value {_shown(field)} contains CR, LF or NUL")
    if not allow_expressions and _has_expression(value):
        raise DialplanValueError(
            f"dialplan value {_shown(field)} contains a ${{}} or $[] expression"
        )
    return value


_CONTEXT_PATTERN: Final = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,78}"
_EXTENSION_PATTERN: Final = r"[A-Za-z0-9+*#][A-Za-z0-9+*#_-]{0,78}"
_CONTEXT_RE: Final = re.compile(_CONTEXT_PATTERN)
_EXTENSION_RE: Final = re.compile(_EXTENSION_PATTERN)


def check_context(value: str, field: str = "Context") -> str:
    """Return ``value`` if it is a plain dialplan context name (at most 79 chars)."""
    if not isinstance(value, str) or not _CONTEXT_RE.fullmatch(value):
        raise DialplanValueError(f"invalid {field} {_shown(value)}")
    return value


def check_extension(value: str, field: str = "Exten") -> str:
    """Return ``value`` if it is a literal extension (``1001``, ``s``, ``+15551234567``).

    Pattern extensions (leading ``_``), dots and every separator are refused.
    """
    if not isinstance(value, str) or not _EXTENSION_RE.fullmatch(value):
        raise DialplanValueError(f"invalid {field} {_shown(value)}")
    return value


# --------------------------------------------------------------------------- devices

_RESOURCE_PATTERN: Final = r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}"
DEVICE_PATTERN: Final = (
    rf"(?P<tech>PJSIP|SIP|IAX2)/(?P<endpoint>{_RESOURCE_PATTERN})"
    r"|DAHDI/[gGrR]?[0-9]{1,4}"
    rf"|Local/{_EXTENSION_PATTERN}@{_CONTEXT_PATTERN}"
)
_DEVICE_RE: Final = re.compile(DEVICE_PATTERN)


def check_device(device: str, known_endpoints: Collection[str] | None) -> str:
    """Return ``device`` if it is exactly one plain device ctid may dial, else raise.

    Accepted: ``PJSIP/<endpoint>``, ``SIP/<peer>``, ``IAX2/<peer>``, ``DAHDI/<n>``,
    ``DAHDI/g<n>`` (also ``G``, ``r``, ``R``) and ``Local/<exten>@<context>``.
    Everything else is refused with :class:`InvalidDevice`: ``&`` (a second Dial
    target), ``,`` (Dial options such as ``G(ctx)``), ``/`` after the resource
    (``Local/x@ctx/n`` options, ``DAHDI/g1/<number>`` dial-out, ``PJSIP/x/sip:...``),
    ``@`` outside Local (``PJSIP/<number>@trunk`` dials out), spaces, quotes,
    ``$``, ``{``, ``(``, ``|`` and any other character.

    If ``known_endpoints`` is given, the full device string, or for PJSIP/SIP/IAX2
    the endpoint name, must be in it.
    """
    if not isinstance(device, str):
        raise InvalidDevice(f"device is not a string: {_shown(device)}")
    match = _DEVICE_RE.fullmatch(device)
    if match is None:
        raise InvalidDevice(f"invalid device {_shown(device)}")
    if known_endpoints is not None:
        endpoint = match.group("endpoint")
        if device not in known_endpoints and (endpoint is None or endpoint not in known_endpoints):
            raise InvalidDevice(f"device {_shown(device)} is not a configured endpoint")
    return device


# --------------------------------------------------------------------------- numbers

_NUMBER_CHARS: Final = frozenset("0123456789+ -.()")
_COSMETIC: Final = str.maketrans("", "", " -.()")
_E164_PREFIX_RE: Final = re.compile(r"\+[1-9][0-9]{0,14}")
_COUNTRY_CODE_RE: Final = re.compile(r"\+?([1-9][0-9]{0,2})")
_MAX_NUMBER_INPUT: Final = 64


def _normalise_number(
    number: object, country_code: str | None, min_digits: int, max_digits: int
) -> str | None:
    """Normalise to ``+<digits>`` or return None; never raises.

    Cosmetic spaces, dashes, dots and parentheses are dropped; ``00`` becomes
    ``+``. A number with neither is national: one leading trunk ``0`` is dropped
    and ``country_code`` prepended (no country code: not normalisable).
    """
    if not isinstance(number, str) or len(number) > _MAX_NUMBER_INPUT:
        return None
    text = number.strip(" ")
    if not text or any(ch not in _NUMBER_CHARS for ch in text):
        return None
    international = text.startswith("+")
    body = text[1:] if international else text
    if "+" in body:
        return None
    digits = body.translate(_COSMETIC)
    if not digits:
        return None
    if international:
        e164 = digits
    elif digits.startswith("00"):
        e164 = digits[2:]
    elif country_code is not None:
        e164 = country_code + (digits[1:] if digits.startswith("0") else digits)
    else:
        return None
    if not min_digits <= len(e164) <= max_digits or e164.startswith("0"):
        return None
    return "+" + e164


def _country_code(value: str | None) -> str | None:
    if value is None:
        return None
    match = _COUNTRY_CODE_RE.fullmatch(value) if isinstance(value, str) else None
    return match.group(1) if match else None


class DialPolicy:
    """Toll-fraud guard for numbers ctid will dial (callback, transfer, click-to-dial).

    ``allowed_prefixes`` are E.164 prefixes such as ``["+1", "+44"]``; a number
    must start with one of them. An empty allow-list allows nothing.
    ``denied_prefixes`` (for example ``["+1900"]``) win over the allow-list.
    ``default_country_code`` (``"44"`` or ``"+44"``) lets agents type national
    numbers (``020 7946 0000``); without it only ``+``/``00`` numbers are accepted.

    Only numbers ctid originates go through this. Inbound caller IDs are data:
    they are stored and shown as received (see :func:`e164_or_none`) and never
    rejected by a dial policy.
    """

    def __init__(
        self,
        allowed_prefixes: Sequence[str],
        *,
        denied_prefixes: Sequence[str] = (),
        default_country_code: str | None = None,
        min_digits: int = 7,
        max_digits: int = 15,
    ) -> None:
        if isinstance(allowed_prefixes, str) or isinstance(denied_prefixes, str):
            raise TypeError("prefixes must be a sequence of strings, not one string")
        for prefix in (*allowed_prefixes, *denied_prefixes):
            if not isinstance(prefix, str) or not _E164_PREFIX_RE.fullmatch(prefix):
                raise ValueError(f"dial prefix {_shown(prefix)} is not '+' and 1-15 digits")
        country_code = _country_code(default_country_code)
        if default_country_code is not None and country_code is None:
            raise ValueError(f"invalid default_country_code {_shown(default_country_code)}")
        if not 1 <= min_digits <= max_digits <= 15:
            raise ValueError("need 1 <= min_digits <= max_digits <= 15")
        self.allowed_prefixes: tuple[str, ...] = tuple(allowed_prefixes)
        self.denied_prefixes: tuple[str, ...] = tuple(denied_prefixes)
        self.default_country_code = country_code
        self.min_digits = min_digits
        self.max_digits = max_digits

    def check(self, number: str) -> str:
        """Return the normalised E.164 form (``+`` and digits) or raise.

        Raises :class:`DialNumberRejected` with ``reason="format"`` when the input
        is not a plausible number (letters, ``*``/``#``, ``,`` pauses, ``&``, control
        characters, wrong length) and ``reason="prefix"`` when it is not allowed.
        """
        e164 = _normalise_number(
            number, self.default_country_code, self.min_digits, self.max_digits
        )
        if e164 is None:
            raise DialNumberRejected("format", f"not a dialable number: {_shown(number)}")
        if any(e164.startswith(prefix) for prefix in self.denied_prefixes):
            raise DialNumberRejected("prefix", f"number {e164} is on a denied prefix")
        if not any(e164.startswith(prefix) for prefix in self.allowed_prefixes):
            raise DialNumberRejected("prefix", f"number {e164} is not on an allowed prefix")
        return e164


def e164_or_none(number: str, default_country_code: str | None = None) -> str | None:
    """Best-effort E.164 form of a caller ID for display and matching; never raises.

    Returns None for anything that is not plausibly a phone number
    (``anonymous``, ``unknown``, short extensions, ...): odd caller IDs are data,
    not errors.
    """
    try:
        return _normalise_number(number, _country_code(default_country_code), 7, 15)
    except Exception:  # pragma: no cover - the helpers above do not raise
        return None


# --------------------------------------------------------------------------- URLs

_FORMATTER: Final = string.Formatter()
_PLACEHOLDER_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The first placeholder must come after the authority (host) part, so a value can
# never choose the host the lookup goes to.
_SAFE_URL_PREFIX_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#{}]+[/?#]|/(?!/)|[?#]")


def _url_encoded(value: object, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return quote(value, safe="")
    text = str(value)
    if text in {".", ".."}:
        # quote() leaves dots alone and "/{x}/" with ".." is a path traversal.
        raise UnsafeValueError(f"URL template value for {{{name}}} is a dot segment")
    return quote(text, safe="")


def render_url_template(template: str, values: Mapping[str, object]) -> str:
    """Fill ``{name}`` placeholders with URL-encoded values.

    Every value is encoded with ``urllib.parse.quote(..., safe="")``, so ``/``,
    ``&``, ``=``, ``?``, ``#`` and ``%`` in a value stay inside that value. ``None``
    renders as empty. ``{{`` and ``}}`` are literal braces. Raises
    :class:`UnsafeValueError` for an unknown placeholder, a format spec or
    conversion (``{x:>5}``, ``{x!r}``), attribute or index access (``{x.y}``),
    a placeholder in the scheme or host, whitespace or control characters in the
    template, or a value that is exactly ``.`` or ``..``.
    """
    if any(ord(ch) <= 0x20 or ch == "\x7f" for ch in template):
        raise UnsafeValueError("URL template contains whitespace or control characters")
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise UnsafeValueError(f"malformed URL template: {exc}") from None
    out: list[str] = []
    seen_placeholder = False
    for literal, field, spec, conversion in parsed:
        out.append(literal)
        if field is None:
            continue
        if not _PLACEHOLDER_RE.fullmatch(field) or spec or conversion:
            raise UnsafeValueError(f"URL template placeholder {_shown(field)} is not a plain name")
        if not seen_placeholder and not _SAFE_URL_PREFIX_RE.match("".join(out)):
            raise UnsafeValueError(f"URL template placeholder {{{field}}} is in the scheme or host")
        seen_placeholder = True
        if field not in values:
            raise UnsafeValueError(f"URL template placeholder {{{field}}} has no value")
        out.append(_url_encoded(values[field], field))
    return "".join(out)


# --------------------------------------------------------------------------- AGI

# res_agi reads a command line with fgets() into a 2048-byte buffer: at most 2047
# bytes including the '\n'. A longer line is cut and its tail read as a second
# command, so the limit is a safety rule, not a nicety.
MAX_AGI_COMMAND_BYTES: Final = 2046
# parse_args() keeps at most MAX_ARGS - 1 = 127 words and truncates the rest.
_MAX_AGI_WORDS: Final = 127
_AGI_COMMAND_RE: Final = re.compile(r"[A-Z]+(?: [A-Z]+)*")
_AGI_LINE_START_RE: Final = re.compile(r"[A-Z]+(?: |$)")


def agi_quote(arg: str) -> str:
    """Quote one AGI argument so res_agi's ``parse_args()`` yields exactly ``arg``.

    ``parse_args()`` splits on spaces and tabs outside double quotes; a double
    quote toggles quoting (an opening quote after whitespace starts a word, even
    an empty one); a backslash makes the next character literal, inside or outside
    quotes. So the safe form is always ``"..."`` with ``\\`` and ``"`` backslashed;
    ``""`` is the empty argument (e.g. no escape digits for STREAM FILE: pass
    ``""`` the Python empty string, not the two-character string ``'""'``).

    CR, LF or NUL raise :class:`AGIValueError`: they would end the command line.
    Quoting protects AGI framing only; it does not neutralise ``${...}`` in
    commands that evaluate it (GET FULL VARIABLE, EXEC data): check such values
    with :func:`check_dialplan_value`.
    """
    if not isinstance(arg, str):
        raise AGIValueError(f"AGI argument is not a string: {_shown(arg)}")
    if _has_line_break(arg):
        raise AGIValueError("AGI argument contains CR, LF or NUL")
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_agi_line(line: str) -> str:
    """Return ``line`` if it is safe to send as one FastAGI command line.

    The line must start with an upper-case command word, contain no CR/LF/NUL,
    fit res_agi's read buffer (:data:`MAX_AGI_COMMAND_BYTES` UTF-8 bytes without
    the ``\\n``), and not start with ``FAILURE`` (res_agi ends the session on it).
    Raises :class:`AGIValueError`.
    """
    if not isinstance(line, str):
        raise AGIValueError(f"AGI command line is not a string: {_shown(line)}")
    if _has_line_break(line):
        raise AGIValueError("AGI command line contains CR, LF or NUL")
    if not _AGI_LINE_START_RE.match(line):
        raise AGIValueError(f"AGI command line must start with a command word: {_shown(line)}")
    if line.startswith("FAILURE"):
        raise AGIValueError("AGI command line must not start with FAILURE")
    if len(line.encode("utf-8")) > MAX_AGI_COMMAND_BYTES:
        raise AGIValueError(f"AGI command line longer than {MAX_AGI_COMMAND_BYTES} bytes")
    return line


def agi_command(*parts: str) -> str:
    """Build one FastAGI command line (without the ``\\n``).

    ``parts[0]`` is the command, sent verbatim but validated as upper-case words
    (``"STREAM FILE"``, ``"GET VARIABLE"``); every further part is one argument,
    quoted with :func:`agi_quote`. ``agi_command("STREAM FILE", "beep", "")``
    gives ``STREAM FILE "beep" ""``. Raises :class:`AGIValueError`.
    """
    if not parts:
        raise AGIValueError("agi_command() needs a command")
    command, *args = parts
    if not isinstance(command, str) or not _AGI_COMMAND_RE.fullmatch(command):
        raise AGIValueError(f"invalid AGI command {_shown(command)} (expected [A-Z ]+)")
    if command.count(" ") + 1 + len(args) > _MAX_AGI_WORDS:
        raise AGIValueError(f"AGI command has more than {_MAX_AGI_WORDS} words")
    return check_agi_line(" ".join([command, *(agi_quote(arg) for arg in args)]))
