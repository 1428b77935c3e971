"""Hostile values against every entry point of ctid.asterisk.safety."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctid.asterisk.safety import (
    DEVICE_PATTERN,
    ID_PATTERN,
    MAX_AGI_COMMAND_BYTES,
    AGIValueError,
    AMIValueError,
    DialNumberRejected,
    DialplanValueError,
    DialPolicy,
    InvalidDevice,
    InvalidId,
    UnsafeValueError,
    agi_command,
    agi_quote,
    check_agi_line,
    check_ami_value,
    check_context,
    check_device,
    check_dialplan_value,
    check_extension,
    check_id,
    check_originate_variable,
    e164_or_none,
    render_url_template,
)
from tests.agi_trace import reference_parse_args

LINE_BREAKS = ["\r", "\n", "\r\n", "\0"]


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize("value", ["acme", "support-line_2", "a.b", "A" * 64, "0"])
def test_check_id_accepts_plain_ids(value: str) -> None:
    assert check_id(value, "tenant") == value


@pytest.mark.parametrize(
    "value",
    ["", "a/b", "a+b", "a#b", "a b", "A" * 65, "ünï", "a\nb", ".", "..", "a\0", "x:y"],
)
def test_check_id_refuses_topic_path_and_header_hazards(value: str) -> None:
    with pytest.raises(InvalidId, match="tenant"):
        check_id(value, "tenant")


def test_invalid_id_is_a_value_error_and_pattern_is_the_documented_one() -> None:
    assert issubclass(InvalidId, ValueError)
    assert ID_PATTERN == r"[A-Za-z0-9_.-]{1,64}"


# --------------------------------------------------------------------------- AMI


@pytest.mark.parametrize("brk", LINE_BREAKS)
def test_ami_value_with_line_break_is_refused_without_echoing_it(brk: str) -> None:
    secret = f"hunter2{brk}Action: Originate"
    with pytest.raises(AMIValueError) as info:
        check_ami_value(secret, "Secret")
    assert "Secret" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_ami_value_plain_text_passes_unchanged() -> None:
    assert check_ami_value('"Caller" <+1555>', "CallerID") == '"Caller" <+1555>'


def test_originate_variable_formats_name_equals_value() -> None:
    assert check_originate_variable("__CTID_CALL_ID", "ctd-1") == "__CTID_CALL_ID=ctd-1"
    assert check_originate_variable("_X", "a b") == "_X=a b"


@pytest.mark.parametrize(
    "value",
    [
        "a,B=evil",  # Asterisk splits Variable: on commas
        *[f"a{brk}Action: Hangup" for brk in LINE_BREAKS],
        'say "hi"',  # quotes are stripped by the argument splitter
        "a\\,b",  # backslash escapes
        "${SHELL(id)}",
        "$[1+1]",
        "tab\there",
    ],
)
def test_originate_variable_value_hazards_are_refused(value: str) -> None:
    with pytest.raises(AMIValueError):
        check_originate_variable("CTID_TAG", value)


@pytest.mark.parametrize("name", ["", "1X", "A-B", "A=B", "___X", "A B", "CDR(x)", "A\n"])
def test_originate_variable_bad_names_are_refused(name: str) -> None:
    with pytest.raises(AMIValueError):
        check_originate_variable(name, "v")


@pytest.mark.parametrize("brk", LINE_BREAKS)
def test_dialplan_value_with_line_break_is_refused(brk: str) -> None:
    with pytest.raises(DialplanValueError, match="Value"):
        check_dialplan_value(f"x{brk}y", "Value")


def test_dialplan_value_expressions_need_explicit_opt_in() -> None:
    with pytest.raises(DialplanValueError):
        check_dialplan_value("${SHELL(id)}", "Value")
    assert check_dialplan_value("${X}", "Value", allow_expressions=True) == "${X}"
    assert check_dialplan_value("José, 5$", "Value") == "José, 5$"


@pytest.mark.parametrize("good", ["from-agents", "ctid-redirect-target", "default", "a.b_c"])
def test_check_context_accepts_plain_contexts(good: str) -> None:
    assert check_context(good) == good


@pytest.mark.parametrize("bad", ["", "a,b", "a b", "a\nb", "x/n", "a@b", "${X}", "a" * 80])
def test_check_context_refuses_separators(bad: str) -> None:
    with pytest.raises(DialplanValueError):
        check_context(bad)


@pytest.mark.parametrize("good", ["s", "1002", "+15557654321", "*97", "#"])
def test_check_extension_accepts_literal_extensions(good: str) -> None:
    assert check_extension(good) == good


@pytest.mark.parametrize("bad", ["", "_X.", "1001,1", "1001&2", "1 2", "a\r\n", "x.y", "1@c"])
def test_check_extension_refuses_patterns_and_separators(bad: str) -> None:
    with pytest.raises(DialplanValueError):
        check_extension(bad)


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize(
    "device",
    ["PJSIP/1001", "PJSIP/agent1001", "SIP/x", "IAX2/peer-1", "DAHDI/1", "DAHDI/g1",
     "DAHDI/R2", "Local/1001@from-agents"],
)
def test_check_device_accepts_plain_devices(device: str) -> None:
    assert check_device(device, None) == device
    assert re.fullmatch(DEVICE_PATTERN, device)


@pytest.mark.parametrize(
    "device",
    [
        "PJSIP/1001&PJSIP/x",  # second Dial target
        "PJSIP/1001,60,G(ctx)",  # Dial options
        "Local/x@ctx/n",  # Local channel options
        "PJSIP/+15551234567@trunk",  # dial-out through an endpoint
        "DAHDI/g1/15551234567",  # dial-out through a span
        "PJSIP/x/sip:evil@example.com",
        "PJSIP/1001 ",
        "PJSIP/${X}",
        "PJSIP/{x}",
        'PJSIP/"x"',
        "PJSIP/a|b",
        "PJSIP/a(b)",
        "PJSIP/",
        "pjsip/1001",
        "Foo/1001",
        "PJSIP/1001\r\nAction: Hangup",
        "Local/1001",
        "PJSIP/١٠٠١",  # non-ASCII digits
    ],
)
def test_check_device_refuses_smuggled_targets_and_options(device: str) -> None:
    with pytest.raises(InvalidDevice):
        check_device(device, None)


def test_check_device_with_known_endpoints_requires_membership() -> None:
    known = {"1001", "Local/7@queues"}
    assert check_device("PJSIP/1001", known) == "PJSIP/1001"
    assert check_device("Local/7@queues", known) == "Local/7@queues"
    with pytest.raises(InvalidDevice, match="not a configured"):
        check_device("PJSIP/1002", known)
    with pytest.raises(InvalidDevice):
        check_device("Local/1001@queues", known)
    with pytest.raises(InvalidDevice):
        check_device("PJSIP/1001", set())


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+44 20 7946 0000", "+442079460000"),
        ("0044 (20) 7946-0000", "+442079460000"),
        ("+1.555.123.4567", "+15551234567"),
        ("+1 (555) 123-4567", "+15551234567"),
    ],
)
def test_dial_policy_normalises_cosmetic_forms(raw: str, expected: str) -> None:
    assert DialPolicy(["+1", "+44"]).check(raw) == expected


def test_dial_policy_national_numbers_need_a_default_country_code() -> None:
    with pytest.raises(DialNumberRejected) as info:
        DialPolicy(["+44"]).check("020 7946 0000")
    assert info.value.reason == "format"
    assert DialPolicy(["+44"], default_country_code="44").check("020 7946 0000") == "+442079460000"


def test_number_outside_allow_list_is_refused_with_prefix_reason() -> None:
    with pytest.raises(DialNumberRejected) as info:
        DialPolicy(["+44"]).check("+1 900 555 0100")
    assert info.value.reason == "prefix"


def test_denied_prefix_wins_over_allowed_prefix() -> None:
    policy = DialPolicy(["+1"], denied_prefixes=["+1900"])
    assert policy.check("+1 555 123 4567") == "+15551234567"
    with pytest.raises(DialNumberRejected) as info:
        policy.check("+1 900 555 0100")
    assert info.value.reason == "prefix"


def test_empty_allow_list_allows_nothing() -> None:
    with pytest.raises(DialNumberRejected) as info:
        DialPolicy([]).check("+442079460000")
    assert info.value.reason == "prefix"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "+",
        "+44 20 7946 0000,1",  # DTMF pause
        "+442079460000&PJSIP/x",
        "+442079460000\r\n",
        "+44207946\n0000",
        "*67+442079460000",
        "+44 20 7946 0000 ext 5",
        "+4420794600001234",  # 16 digits
        "+44123",  # too short
        "+٤٤٢٠٧٩٤٦٠٠٠٠",  # non-ASCII digits
        "++442079460000",
        "+0442079460000",
        "44+2079460000",
        "+44" + "0" * 100,
    ],
)
def test_malformed_dial_numbers_are_refused_with_format_reason(raw: str) -> None:
    with pytest.raises(DialNumberRejected) as info:
        DialPolicy(["+4"]).check(raw)
    assert info.value.reason == "format"
    assert isinstance(info.value, UnsafeValueError)


@pytest.mark.parametrize("prefix", ["44", "+", "+0", "+44a", "+1234567890123456"])
def test_dial_policy_refuses_malformed_prefixes_at_construction(prefix: str) -> None:
    with pytest.raises(ValueError):
        DialPolicy([prefix])


def test_dial_policy_refuses_a_bare_string_as_prefix_list() -> None:
    with pytest.raises(TypeError):
        DialPolicy("+44")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+15551230009", "+15551230009"),
        ("anonymous", None),
        ("unknown", None),
        ("", None),
        ("1001", None),
        ("+1555&x", None),
        ("0044 20 7946 0000", "+442079460000"),
    ],
)
def test_e164_or_none_never_raises_on_odd_caller_ids(raw: str, expected: str | None) -> None:
    assert e164_or_none(raw) == expected


def test_e164_or_none_uses_default_country_code_for_national_forms() -> None:
    assert e164_or_none("020 7946 0000", "44") == "+442079460000"
    assert e164_or_none("020 7946 0000", "not-a-code") is None


@given(st.text(max_size=40))
def test_e164_or_none_total_on_any_text(text: str) -> None:
    result = e164_or_none(text, "+1")
    assert result is None or re.fullmatch(r"\+[1-9][0-9]{6,14}", result)


# --------------------------------------------------------------------------- URLs

CRM = "https://crm.example.com/api/lookup"


def test_url_template_encodes_every_value() -> None:
    url = render_url_template(
        CRM + "?number={number}&line={line}", {"number": "+1 555", "line": "a&b=c"}
    )
    assert url == CRM + "?number=%2B1%20555&line=a%26b%3Dc"


def test_url_template_path_traversal_stays_inside_the_segment() -> None:
    url = render_url_template(CRM + "/customers/{id}", {"id": "../admin"})
    assert url == CRM + "/customers/..%2Fadmin"
    for dots in (".", ".."):
        with pytest.raises(UnsafeValueError, match="dot segment"):
            render_url_template(CRM + "/customers/{id}", {"id": dots})


def test_url_template_crlf_in_value_is_encoded() -> None:
    url = render_url_template(CRM + "?q={q}", {"q": "x\r\nHost: evil"})
    assert "\r" not in url and "\n" not in url and url.endswith("x%0D%0AHost%3A%20evil")


def test_url_template_unknown_placeholder_is_refused() -> None:
    with pytest.raises(UnsafeValueError, match="no value"):
        render_url_template(CRM + "?q={missing}", {})


@pytest.mark.parametrize(
    "template",
    [
        CRM + "?q={q.__class__}",
        CRM + "?q={q[0]}",
        CRM + "?q={q!r}",
        CRM + "?q={q:>10}",
        CRM + "?q={}",
        CRM + "?q={0}",
        CRM + "?q={q",
        CRM + "?q=q}",
        "https://{q}/x",  # the value would choose the host
        "https://crm.example.com{q}",
        "{q}/lookup",
        "//{q}/x",
        "https://crm.example.com/a b?q={q}",
        "https://crm.example.com/\n?q={q}",
    ],
)
def test_url_template_refuses_unsafe_templates(template: str) -> None:
    with pytest.raises(UnsafeValueError):
        render_url_template(template, {"q": "x", "0": "y"})


def test_url_template_literal_braces_and_none() -> None:
    url = render_url_template(CRM + "?j={{x}}&q={q}&n={n}", {"q": "1", "n": None})
    assert url == CRM + "?j={x}&q=1&n="


def test_url_template_relative_path_and_numbers() -> None:
    assert render_url_template("/lookup/{n}", {"n": 42}) == "/lookup/42"


# --------------------------------------------------------------------------- AGI

TRICKY_ARGS = [
    "",
    "plain",
    "with space",
    'quote " inside',
    'ends with "',
    "back\\slash",
    "trailing backslash\\",
    '\\"',
    "tab\tinside",
    "${CONTEXT},${EXTEN}",
    "José 张三",
    '"',
    "\\\\",
    '  " leading and trailing "  ',
]


@pytest.mark.parametrize("arg", TRICKY_ARGS)
def test_agi_quote_round_trips_through_parse_args(arg: str) -> None:
    quoted = agi_quote(arg)
    assert quoted.startswith('"') and quoted.endswith('"')
    assert reference_parse_args(f"VERBOSE {quoted} 1") == ["VERBOSE", arg, "1"]


@given(st.text(alphabet=st.characters(blacklist_characters="\r\n\0"), max_size=50))
def test_agi_quote_round_trips_any_text_without_line_breaks(arg: str) -> None:
    assert reference_parse_args("SET VARIABLE X " + agi_quote(arg)) == ["SET", "VARIABLE", "X", arg]


def test_reference_parser_matches_the_capture_command_lines() -> None:
    # Sanity of the reference model itself, on lines real Asterisk accepted.
    assert reference_parse_args('STREAM FILE beep ""') == ["STREAM", "FILE", "beep", ""]
    assert reference_parse_args('VERBOSE "ctiref fastagi routing to support" 1') == [
        "VERBOSE",
        "ctiref fastagi routing to support",
        "1",
    ]
    assert reference_parse_args('a\\ b "c\\"d" e""f') == ["a b", 'c"d', "ef"]


@pytest.mark.parametrize("brk", LINE_BREAKS)
def test_agi_quote_refuses_line_breaks(brk: str) -> None:
    with pytest.raises(AGIValueError):
        agi_quote(f"beep{brk}HANGUP")


def test_agi_command_builds_quoted_line() -> None:
    line = agi_command("STREAM FILE", "beep", "")
    assert line == 'STREAM FILE "beep" ""'
    assert agi_command("ANSWER") == "ANSWER"
    assert reference_parse_args(agi_command("SET VARIABLE", "X", 'a "b" c')) == [
        "SET",
        "VARIABLE",
        "X",
        'a "b" c',
    ]


@pytest.mark.parametrize(
    "command",
    ["", "stream file", "STREAM  FILE", " NOOP", "NOOP ", "NOOP\nANSWER", "EXEC1", "FAILURE"],
)
def test_agi_command_refuses_bad_command_words(command: str) -> None:
    with pytest.raises(AGIValueError):
        agi_command(command, "x")


def test_agi_command_refuses_argument_injection_and_no_command() -> None:
    with pytest.raises(AGIValueError):
        agi_command("SET VARIABLE", "X", "a\nEXEC System rm")
    with pytest.raises(AGIValueError):
        agi_command()


def test_agi_command_refuses_lines_longer_than_asterisk_reads() -> None:
    fits = "x" * (MAX_AGI_COMMAND_BYTES - len('VERBOSE ""'))
    assert len(agi_command("VERBOSE", fits)) == MAX_AGI_COMMAND_BYTES
    with pytest.raises(AGIValueError, match="longer"):
        agi_command("VERBOSE", fits + "x")
    with pytest.raises(AGIValueError, match="words"):
        agi_command("NOOP", *["a"] * 127)


def test_check_agi_line_refuses_failure_prefix_and_line_breaks() -> None:
    assert check_agi_line('STREAM FILE beep ""') == 'STREAM FILE beep ""'
    for bad in ("FAILURE x", "NOOP\r", "NOOP\0", "noop"):
        with pytest.raises(AGIValueError):
            check_agi_line(bad)


def test_every_error_is_an_unsafe_value_error() -> None:
    for exc in (InvalidId, AMIValueError, DialplanValueError, InvalidDevice, AGIValueError,
                DialNumberRejected):
        assert issubclass(exc, UnsafeValueError) and issubclass(exc, ValueError)
