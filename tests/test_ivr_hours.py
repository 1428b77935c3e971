"""Business hours: range boundaries, holidays, time zones, DST days, and every parse error."""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctid.ivr.hours import DAYS, OpenRange, Schedule, ScheduleError

PARIS = ZoneInfo("Europe/Paris")

OFFICE = Schedule.parse(
    {day: ["09:00-12:00", "13:00-17:30"] for day in ("mon", "tue", "wed", "thu", "fri")} | {"sat": ["10:00-14:00"]},
    holidays=["2026-05-08", "12-25"],
    timezone="Europe/Paris",
)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def paris(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
          microsecond: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=PARIS)


def parse_error(weekly: Mapping[str, Any], holidays: Sequence[Any] = (), timezone: str = "UTC") -> str:
    with pytest.raises(ScheduleError) as info:
        Schedule.parse(weekly, holidays, timezone)
    return str(info.value)


# --------------------------------------------------------------------------- weekly ranges


@pytest.mark.parametrize(("when", "status"), [
    (paris(2026, 6, 1, 8, 59, 59), "closed"),
    (paris(2026, 6, 1, 9, 0), "open"),  # the start is inclusive
    (paris(2026, 6, 1, 11, 59, 59, 999999), "open"),
    (paris(2026, 6, 1, 12, 0), "closed"),  # the end is exclusive
    (paris(2026, 6, 1, 12, 30), "closed"),  # the lunch gap
    (paris(2026, 6, 1, 13, 0), "open"),
    (paris(2026, 6, 1, 17, 29), "open"),
    (paris(2026, 6, 1, 17, 30), "closed"),
    (paris(2026, 6, 1, 0, 0), "closed"),
    (paris(2026, 6, 1, 23, 59), "closed"),
])
def test_a_range_opens_at_its_start_and_closes_at_its_end(when: datetime, status: str) -> None:
    assert when.strftime("%a") == "Mon"
    assert OFFICE.status(when) == status


def test_each_weekday_has_its_own_ranges() -> None:
    assert OFFICE.status(paris(2026, 6, 5, 16, 0)) == "open"  # Friday afternoon
    assert OFFICE.status(paris(2026, 6, 6, 11, 0)) == "open"  # Saturday morning
    assert OFFICE.status(paris(2026, 6, 6, 15, 0)) == "closed"  # Saturday afternoon
    assert all(OFFICE.status(paris(2026, 6, 7, hour, 0)) == "closed" for hour in range(24))  # Sunday: missing


def test_a_missing_or_empty_day_is_closed_all_day() -> None:
    schedule = Schedule.parse({"mon": []})
    assert all(schedule.status(utc(2026, 6, 1, hour, 30)) == "closed" for hour in range(24))
    assert Schedule.parse({}).status(utc(2026, 6, 1, 12, 0)) == "closed"


def test_all_day_runs_to_midnight() -> None:
    schedule = Schedule.parse({"mon": ["00:00-24:00"]})
    assert schedule.status(utc(2026, 6, 1, 0, 0)) == "open"
    assert schedule.status(utc(2026, 6, 1, 23, 59, 59)) == "open"
    assert schedule.status(utc(2026, 6, 2, 0, 0)) == "closed"  # Tuesday
    assert schedule.status(utc(2026, 5, 31, 23, 59, 59)) == "closed"  # Sunday


def test_a_night_shift_is_split_at_midnight() -> None:
    schedule = Schedule.parse({"fri": ["22:00-24:00"], "sat": ["00:00-02:00"]})
    assert schedule.status(utc(2026, 6, 5, 21, 59)) == "closed"
    assert schedule.status(utc(2026, 6, 5, 23, 59)) == "open"
    assert schedule.status(utc(2026, 6, 6, 0, 0)) == "open"
    assert schedule.status(utc(2026, 6, 6, 2, 0)) == "closed"


def test_touching_ranges_in_any_order_are_sorted() -> None:
    schedule = Schedule.parse({"mon": ["12:00-14:00", " 09:00-12:00 "]})
    assert schedule.weekly[0] == (OpenRange(540, 720), OpenRange(720, 840))
    assert schedule.status(utc(2026, 6, 1, 12, 0)) == "open"
    assert schedule.weekly[1:] == ((),) * 6


def test_ranges_may_be_any_sequence() -> None:
    schedule = Schedule.parse({"mon": ("09:00-10:00",)}, holidays=("01-01",))
    assert schedule.status(utc(2026, 6, 1, 9, 30)) == "open"


def test_the_default_schedule_is_always_closed_in_utc() -> None:
    assert Schedule().timezone == "UTC"
    assert Schedule().status(utc(2026, 6, 1, 12, 0)) == "closed"


# --------------------------------------------------------------------------- holidays


def test_a_dated_holiday_covers_the_whole_local_day() -> None:
    assert OFFICE.status(paris(2026, 5, 8, 10, 0)) == "holiday"  # a Friday, normally open
    assert OFFICE.status(paris(2026, 5, 8, 0, 0)) == "holiday"
    assert OFFICE.status(paris(2026, 5, 8, 23, 59, 59)) == "holiday"
    assert OFFICE.status(paris(2026, 5, 7, 23, 59, 59)) == "closed"
    assert OFFICE.status(paris(2026, 5, 9, 0, 0)) == "closed"
    assert OFFICE.status(paris(2027, 5, 8, 10, 0)) == "open"  # that year only (a Saturday, open 10-14)


def test_a_yearly_holiday_recurs_every_year() -> None:
    for year in (2025, 2026, 2030):
        assert OFFICE.status(paris(year, 12, 25, 10, 0)) == "holiday"
        assert OFFICE.status(paris(year, 12, 24, 10, 0)) != "holiday"


def test_a_holiday_wins_even_on_a_closed_day() -> None:
    assert OFFICE.status(paris(2027, 12, 25, 3, 0)) == "holiday"  # a Saturday, at night


def test_a_february_29_holiday_only_falls_in_leap_years() -> None:
    schedule = Schedule.parse({}, holidays=["02-29"])
    assert schedule.status(utc(2028, 2, 29, 12, 0)) == "holiday"
    assert schedule.status(utc(2027, 2, 28, 12, 0)) == "closed"
    assert schedule.status(utc(2027, 3, 1, 12, 0)) == "closed"


def test_holidays_are_kept_as_dates_and_month_day_pairs() -> None:
    assert OFFICE.holiday_dates == frozenset({date(2026, 5, 8)})
    assert OFFICE.yearly_holidays == frozenset({(12, 25)})
    assert OFFICE.is_holiday(date(2031, 12, 25)) and not OFFICE.is_holiday(date(2026, 5, 9))


def test_the_holiday_date_is_the_local_date_not_the_utc_date() -> None:
    # 23:30 UTC on 7 May is 01:30 on 8 May in Paris (UTC+2).
    assert OFFICE.status(utc(2026, 5, 7, 23, 30)) == "holiday"
    # 22:30 UTC on 8 May is 00:30 on 9 May in Paris.
    assert OFFICE.status(utc(2026, 5, 8, 22, 30)) == "closed"


# --------------------------------------------------------------------------- time zones


def test_utc_input_is_converted_to_the_schedules_zone() -> None:
    # Summer, UTC+2: 09:00 in Paris is 07:00 UTC.
    assert OFFICE.status(utc(2026, 6, 1, 6, 59)) == "closed"
    assert OFFICE.status(utc(2026, 6, 1, 7, 0)) == "open"
    # Winter, UTC+1: 09:00 in Paris is 08:00 UTC.
    assert OFFICE.status(utc(2026, 1, 5, 7, 30)) == "closed"
    assert OFFICE.status(utc(2026, 1, 5, 8, 0)) == "open"


def test_any_aware_datetime_is_accepted() -> None:
    new_york = ZoneInfo("America/New_York")
    assert OFFICE.status(datetime(2026, 6, 1, 3, 0, tzinfo=new_york)) == "open"  # 09:00 in Paris
    fixed = timezone(timedelta(hours=9))
    assert OFFICE.status(datetime(2026, 6, 1, 16, 0, tzinfo=fixed)) == "open"  # 09:00 in Paris
    assert OFFICE.status(datetime(2026, 6, 1, 15, 59, tzinfo=fixed)) == "closed"


def test_the_weekday_is_the_local_weekday() -> None:
    tokyo = Schedule.parse({"mon": ["00:00-03:00"]}, timezone="Asia/Tokyo")
    assert tokyo.status(utc(2026, 5, 31, 15, 0)) == "open"  # Sunday in UTC, Monday 00:00 in Tokyo
    assert tokyo.status(utc(2026, 6, 1, 1, 0)) == "closed"  # Monday 10:00 in Tokyo


def test_a_naive_datetime_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        OFFICE.status(datetime(2026, 6, 1, 10, 0))


def test_spring_forward_day_keeps_wall_clock_hours() -> None:
    # Paris, Sunday 2026-03-29: 02:00 CET jumps to 03:00 CEST (UTC+1 -> UTC+2).
    schedule = Schedule.parse({"sun": ["09:00-17:00"], "sat": ["09:00-17:00"]}, timezone="Europe/Paris")
    assert schedule.status(utc(2026, 3, 29, 6, 59)) == "closed"  # 08:59 CEST
    assert schedule.status(utc(2026, 3, 29, 7, 0)) == "open"  # 09:00 CEST
    assert schedule.status(utc(2026, 3, 29, 14, 59)) == "open"  # 16:59 CEST
    assert schedule.status(utc(2026, 3, 29, 15, 0)) == "closed"  # 17:00 CEST
    # The day before, still on CET, the same wall-clock hours are an hour later in UTC.
    assert schedule.status(utc(2026, 3, 28, 7, 0)) == "closed"  # 08:00 CET
    assert schedule.status(utc(2026, 3, 28, 8, 0)) == "open"  # 09:00 CET
    assert schedule.status(utc(2026, 3, 28, 16, 0)) == "closed"  # 17:00 CET


def test_a_range_over_the_spring_forward_gap() -> None:
    schedule = Schedule.parse({"sun": ["01:00-04:00"]}, timezone="Europe/Paris")
    assert schedule.status(utc(2026, 3, 28, 23, 59)) == "closed"  # 00:59 CET
    assert schedule.status(utc(2026, 3, 29, 0, 30)) == "open"  # 01:30 CET
    assert schedule.status(utc(2026, 3, 29, 1, 0)) == "open"  # 03:00 CEST, right after the gap
    assert schedule.status(utc(2026, 3, 29, 1, 59)) == "open"  # 03:59 CEST
    assert schedule.status(utc(2026, 3, 29, 2, 0)) == "closed"  # 04:00 CEST


def test_the_repeated_hour_of_a_fall_back_day_is_open_both_times() -> None:
    # Paris, Sunday 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:xx happens twice.
    schedule = Schedule.parse({"sun": ["02:00-03:00"]}, timezone="Europe/Paris")
    assert schedule.status(utc(2026, 10, 24, 23, 59)) == "closed"  # 01:59 CEST
    assert schedule.status(utc(2026, 10, 25, 0, 0)) == "open"  # 02:00 CEST
    assert schedule.status(utc(2026, 10, 25, 0, 59)) == "open"  # 02:59 CEST
    assert schedule.status(utc(2026, 10, 25, 1, 0)) == "open"  # 02:00 CET, again
    assert schedule.status(utc(2026, 10, 25, 1, 59)) == "open"  # 02:59 CET
    assert schedule.status(utc(2026, 10, 25, 2, 0)) == "closed"  # 03:00 CET


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("weekly", "message"), [
    ({"monday": ["09:00-17:00"]}, "unknown day 'monday' (expected one of mon, tue, wed, thu, fri, sat, sun)"),
    ({"Mon": ["09:00-17:00"]}, "unknown day 'Mon'"),
    ({"mon": "09:00-17:00"}, "mon: expected a list of 'HH:MM-HH:MM' ranges, not '09:00-17:00'"),
    ({"mon": None}, "mon: expected a list of 'HH:MM-HH:MM' ranges, not None"),
    ({"tue": [900]}, "tue: 900: expected a 'HH:MM-HH:MM' string"),
    ({"wed": ["9:00-17:00"]}, "wed: '9:00-17:00': expected 'HH:MM-HH:MM'"),
    ({"wed": ["09:00 - 17:00"]}, "wed: '09:00 - 17:00': expected 'HH:MM-HH:MM'"),
    ({"wed": ["09:00"]}, "wed: '09:00': expected 'HH:MM-HH:MM'"),
    ({"wed": ["09h00-17h00"]}, "wed: '09h00-17h00': expected 'HH:MM-HH:MM'"),
    ({"wed": [""]}, "wed: '': expected 'HH:MM-HH:MM'"),
    ({"thu": ["25:00-26:00"]}, "thu: '25:00-26:00': hour 25 is not 00..23"),
    ({"thu": ["09:00-24:30"]}, "thu: '09:00-24:30': hour 24 is not 00..23 (24:00 is allowed only as an end)"),
    ({"thu": ["09:60-17:00"]}, "thu: '09:60-17:00': minute 60 is not 00..59"),
    ({"thu": ["09:00-17:99"]}, "thu: '09:00-17:99': minute 99 is not 00..59"),
    ({"fri": ["24:00-24:00"]}, "fri: '24:00-24:00': 24:00 is allowed only as an end"),
    ({"mon": ["18:00-08:00"]}, "mon: '18:00-08:00': the end must be after the start"),
    ({"sat": ["09:00-09:00"]}, "sat: '09:00-09:00': the end must be after the start"),
    ({"sun": ["09:00-12:00", "11:00-14:00"]}, "sun: '09:00-12:00' and '11:00-14:00' overlap"),
    ({"sun": ["11:00-14:00", "09:00-12:00"]}, "sun: '09:00-12:00' and '11:00-14:00' overlap"),
    ({"sun": ["08:00-18:00", "10:00-11:00"]}, "sun: '08:00-18:00' and '10:00-11:00' overlap"),
    ({"sun": ["10:00-11:00", "10:00-11:00"]}, "sun: '10:00-11:00' and '10:00-11:00' overlap"),
])
def test_weekly_errors_name_the_day_and_range(weekly: Mapping[str, Any], message: str) -> None:
    assert message in parse_error(weekly)


@pytest.mark.parametrize("holiday", [
    "2026-02-30", "2026-13-01", "2026-1-1", "26-01-01", "20260101", "2026-01-01T00:00", "13-01", "04-31",
    "1-1", "christmas", "", 20260101,
])
def test_a_bad_holiday_is_named(holiday: Any) -> None:
    message = parse_error({}, [holiday])
    assert message.startswith(f"holiday {holiday!r}: not a valid date")
    assert "'YYYY-MM-DD', or 'MM-DD' for every year" in message


def test_holidays_must_be_a_list() -> None:
    assert "holidays are a list" in parse_error({}, "2026-01-01")  # a str is a Sequence: caught at run time


def test_weekly_must_be_a_mapping() -> None:
    assert "mapping of day to ranges" in parse_error([("mon", ["09:00-10:00"])])  # type: ignore[arg-type]


@pytest.mark.parametrize("zone", ["Mars/Base", "europe/paris", "Europe", "", "../etc/passwd", "/etc/localtime"])
def test_an_unknown_time_zone_is_named(zone: str) -> None:
    assert parse_error({}, (), zone) == f"unknown time zone {zone!r}"


def test_a_very_long_value_is_shortened_in_the_message() -> None:
    message = parse_error({}, ["x" * 5000])
    assert len(message) < 200 and "..." in message
    assert len(parse_error({}, (), "x" * 5000)) < 100


def test_the_constructor_checks_the_zone_and_the_week() -> None:
    with pytest.raises(ScheduleError, match="unknown time zone 'Mars/Base'"):
        Schedule("Mars/Base")
    with pytest.raises(ScheduleError, match="7 days"):
        Schedule("UTC", ((),) * 6)


@pytest.mark.parametrize(("start", "end"), [(-1, 10), (10, 10), (10, 5), (0, 1441)])
def test_an_open_range_checks_its_bounds(start: int, end: int) -> None:
    with pytest.raises(ValueError):
        OpenRange(start, end)


# --------------------------------------------------------------------------- describe, value semantics


def test_describe_groups_consecutive_days() -> None:
    assert OFFICE.describe() == (
        "mon-fri 09:00-12:00,13:00-17:30; sat 10:00-14:00; sun closed; holidays 2026-05-08, 12-25 (Europe/Paris)"
    )
    assert Schedule.parse({"sat": ["00:00-24:00"]}).describe() == "mon-fri closed; sat 00:00-24:00; sun closed (UTC)"
    assert Schedule().describe() == "mon-sun closed (UTC)"
    assert str(OpenRange(0, 1440)) == "00:00-24:00"


def test_schedules_are_values() -> None:
    again = Schedule.parse(
        {day: ["13:00-17:30", "09:00-12:00"] for day in ("fri", "thu", "wed", "tue", "mon")} | {"sat": ["10:00-14:00"]},
        holidays=["12-25", "2026-05-08", "12-25"],
        timezone="Europe/Paris",
    )
    assert again == OFFICE and hash(again) == hash(OFFICE)
    assert pickle.loads(pickle.dumps(OFFICE)) == OFFICE
    with pytest.raises(AttributeError):
        OFFICE.timezone = "UTC"  # type: ignore[misc]


# --------------------------------------------------------------------------- properties


minutes = st.integers(0, 24 * 60)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(minutes, minutes), max_size=4), st.integers(0, 24 * 60 - 1), st.sampled_from(DAYS))
def test_status_agrees_with_a_minute_by_minute_reading(
    pairs: list[tuple[int, int]], minute: int, day: str
) -> None:
    ranges = [OpenRange(min(a, b), max(a, b)) for a, b in pairs if a != b]
    texts = [str(r) for r in ranges]
    overlapping = any(
        x.start < y.end and y.start < x.end for i, x in enumerate(ranges) for y in ranges[i + 1 :]
    )
    if overlapping:
        with pytest.raises(ScheduleError, match="overlap"):
            Schedule.parse({day: texts})
        return
    schedule = Schedule.parse({day: texts})
    monday = date(2026, 6, 1)
    when = datetime.combine(monday + timedelta(days=DAYS.index(day)), datetime.min.time(), UTC)
    when += timedelta(minutes=minute, seconds=30)
    expected = "open" if any(r.start <= minute < r.end for r in ranges) else "closed"
    assert schedule.status(when) == expected
