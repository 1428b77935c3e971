"""Business hours: is the line open, closed, or on holiday at a given instant?

An IVR flow branches on opening hours ("press 1 for sales" during the day, the
voicemail menu at night). A :class:`Schedule` holds a week of opening ranges and a list
of holidays in one time zone; :meth:`Schedule.status` answers ``"open"``, ``"closed"``
or ``"holiday"`` for an aware :class:`~datetime.datetime`. The module is pure: the
caller passes the instant (so tests inject the clock) and nothing here reads the time.

Configuration
-------------

:meth:`Schedule.parse` takes the shape found in the config file::

    Schedule.parse(
        {"mon": ["09:00-12:00", "13:00-17:00"], "tue": ["09:00-17:00"], "sat": ["00:00-24:00"]},
        holidays=["2026-05-01", "12-25"],
        timezone="Europe/Paris",
    )

- Days are ``mon tue wed thu fri sat sun``, in lower case. A day that is missing (or
  has an empty list) is closed all day.
- A range is ``HH:MM-HH:MM`` on a 24-hour clock, with two digits each (``09:00``, not
  ``9:00``); whitespace around the whole range is ignored. The start is inclusive and
  the end exclusive: ``09:00-17:00`` is open at 09:00:00 and at 16:59:59, closed at
  17:00:00. ``24:00`` is allowed as an end only, so ``00:00-24:00`` is all day.
- A range cannot cross midnight: write ``fri: ["22:00-24:00"], sat: ["00:00-02:00"]``.
  Ranges of one day must not overlap; touching ranges (``09:00-12:00`` and
  ``12:00-14:00``) are fine. Their order does not matter.
- A holiday is ``YYYY-MM-DD`` (that date only) or ``MM-DD`` (that date every year; a
  ``02-29`` holiday only falls in leap years). On a holiday the status is ``"holiday"``
  for the whole local day, whatever the weekly hours say, so a flow can play its holiday
  message even on a day that would be closed anyway.
- The time zone is an IANA name (``Europe/Paris``, ``UTC``), case-sensitive.

Every mistake is a :class:`ScheduleError` (a ValueError) that names the day, range or
date at fault, e.g. ``mon: '18:00-08:00': the end must be after the start``.

Time zones and DST
------------------

``status`` converts the instant to the schedule's zone and looks at the local wall
clock, so a range means the same clock times on every day of the year, including the
days clocks change. On a spring-forward day, local times in the gap (02:00-03:00 in
Paris) never happen; on a fall-back day, the repeated hour is open (or closed) both
times, as the wall clock reads the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from itertools import pairwise
from typing import Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["DAYS", "OpenRange", "Schedule", "ScheduleError", "Status"]

Status = Literal["open", "closed", "holiday"]

DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
"""Day keys in :meth:`datetime.weekday` order (Monday is 0)."""

_MINUTES_PER_DAY: Final = 24 * 60
_RANGE_RE: Final = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
_DATE_RE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_YEARLY_RE: Final = re.compile(r"([0-9]{2})-([0-9]{2})")
_LEAP_YEAR: Final = 2000  # validates MM-DD, 02-29 included


class ScheduleError(ValueError):
    """A schedule that does not parse; the message names the day, range or date."""


@dataclass(frozen=True, order=True)
class OpenRange:
    """Open from ``start`` (inclusive) to ``end`` (exclusive), in minutes after local
    midnight: ``0 <= start < end <= 1440``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= _MINUTES_PER_DAY:
            raise ValueError(f"invalid range {self.start}..{self.end}: need 0 <= start < end <= 1440")

    def contains(self, minute: int) -> bool:
        return self.start <= minute < self.end

    def __str__(self) -> str:
        return f"{_clock(self.start)}-{_clock(self.end)}"


def _shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True)
class Schedule:
    """A weekly schedule with holidays, in one time zone. Build one with :meth:`parse`.

    ``weekly`` holds seven tuples of sorted, non-overlapping ranges, Monday first;
    ``holiday_dates`` the one-off holidays and ``yearly_holidays`` the ``(month, day)``
    pairs that recur. The default is closed all the time, in UTC."""

    timezone: str = "UTC"
    weekly: tuple[tuple[OpenRange, ...], ...] = ((),) * 7
    holiday_dates: frozenset[date] = frozenset()
    yearly_holidays: frozenset[tuple[int, int]] = frozenset()

    def __post_init__(self) -> None:
        _zone(self.timezone)
        if len(self.weekly) != len(DAYS):
            raise ScheduleError(f"weekly needs {len(DAYS)} days (Monday first), got {len(self.weekly)}")

    @classmethod
    def parse(cls, weekly: Mapping[str, Sequence[str]], holidays: Sequence[str] = (),
              timezone: str = "UTC") -> Schedule:
        """Build a schedule from its configuration (format in the module docstring).

        Raises :class:`ScheduleError` naming the first day, range, date or zone at fault."""
        days = _parse_weekly(weekly)
        dates, yearly = _parse_holidays(holidays)
        return cls(timezone, days, dates, yearly)

    def status(self, when: datetime) -> Status:
        """``"holiday"`` if ``when`` falls on a holiday in the schedule's zone, else
        ``"open"`` if its local time is inside one of that weekday's ranges, else
        ``"closed"``. ``when`` must be timezone-aware (a naive datetime is a ValueError:
        its zone would be a guess)."""
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(f"when must be timezone-aware, got naive {when.isoformat()}")
        local = when.astimezone(_zone(self.timezone))
        if self.is_holiday(local.date()):
            return "holiday"
        minute = local.hour * 60 + local.minute
        if any(r.contains(minute) for r in self.weekly[local.weekday()]):
            return "open"
        return "closed"

    def is_holiday(self, day: date) -> bool:
        """True if the local date ``day`` is a holiday (one-off or yearly)."""
        return day in self.holiday_dates or (day.month, day.day) in self.yearly_holidays

    def describe(self) -> str:
        """A one-line summary for logs, e.g.
        ``mon-fri 09:00-12:00,13:00-17:00; sat 10:00-12:00; sun closed; holidays 2026-05-01, 12-25 (Europe/Paris)``."""
        parts = [f"{_day_span(first, last)} {_ranges_text(ranges)}" for first, last, ranges in _runs(self.weekly)]
        holidays = [d.isoformat() for d in sorted(self.holiday_dates)]
        holidays += [f"{month:02d}-{day:02d}" for month, day in sorted(self.yearly_holidays)]
        if holidays:
            parts.append("holidays " + ", ".join(holidays))
        return "; ".join(parts) + f" ({self.timezone})"


# --------------------------------------------------------------------------- parsing


def _zone(name: str) -> ZoneInfo:
    if not isinstance(name, str):
        raise ScheduleError(f"a time zone is a name such as 'Europe/Paris', not {_shown(name)}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(f"unknown time zone {_shown(name)}") from None


def _parse_weekly(weekly: Mapping[str, Sequence[str]]) -> tuple[tuple[OpenRange, ...], ...]:
    if not isinstance(weekly, Mapping):
        raise ScheduleError(f"weekly hours are a mapping of day to ranges, not {type(weekly).__name__}")
    for key in weekly:
        if key not in DAYS:
            raise ScheduleError(f"unknown day {_shown(key)} (expected one of {', '.join(DAYS)})")
    return tuple(_parse_day(day, weekly.get(day, ())) for day in DAYS)


def _parse_day(day: str, ranges: Sequence[str]) -> tuple[OpenRange, ...]:
    if isinstance(ranges, str) or not isinstance(ranges, Sequence):
        raise ScheduleError(f"{day}: expected a list of 'HH:MM-HH:MM' ranges, not {_shown(ranges)}")
    parsed = sorted((_parse_range(day, text), text) for text in ranges)
    for (before, before_text), (after, after_text) in pairwise(parsed):
        if after.start < before.end:
            raise ScheduleError(f"{day}: {_shown(before_text)} and {_shown(after_text)} overlap")
    return tuple(r for r, _ in parsed)


def _parse_range(day: str, text: str) -> OpenRange:
    if not isinstance(text, str):
        raise ScheduleError(f"{day}: {_shown(text)}: expected a 'HH:MM-HH:MM' string")
    match = _RANGE_RE.fullmatch(text.strip())
    if match is None:
        raise ScheduleError(f"{day}: {_shown(text)}: expected 'HH:MM-HH:MM' (24-hour clock, e.g. '09:00-17:30')")
    start_hour, start_minute, end_hour, end_minute = (int(g) for g in match.groups())
    where = f"{day}: {_shown(text)}"
    start = _minutes(where, start_hour, start_minute, is_end=False)
    end = _minutes(where, end_hour, end_minute, is_end=True)
    if end <= start:
        raise ScheduleError(f"{where}: the end must be after the start")
    return OpenRange(start, end)


def _minutes(where: str, hour: int, minute: int, *, is_end: bool) -> int:
    if hour == 24 and minute == 0:
        if not is_end:
            raise ScheduleError(f"{where}: 24:00 is allowed only as an end")
        return _MINUTES_PER_DAY
    if hour > 23:
        raise ScheduleError(f"{where}: hour {hour:02d} is not 00..23 (24:00 is allowed only as an end)")
    if minute > 59:
        raise ScheduleError(f"{where}: minute {minute:02d} is not 00..59")
    return hour * 60 + minute


def _parse_holidays(holidays: Sequence[str]) -> tuple[frozenset[date], frozenset[tuple[int, int]]]:
    if isinstance(holidays, str) or not isinstance(holidays, Sequence):
        raise ScheduleError(f"holidays are a list of 'YYYY-MM-DD' or 'MM-DD' dates, not {_shown(holidays)}")
    dates: set[date] = set()
    yearly: set[tuple[int, int]] = set()
    for text in holidays:
        day = _parse_holiday(text)
        if isinstance(day, date):
            dates.add(day)
        else:
            yearly.add(day)
    return frozenset(dates), frozenset(yearly)


def _parse_holiday(text: str) -> date | tuple[int, int]:
    """A one-off date, or ``(month, day)`` for a yearly holiday."""
    problem = f"holiday {_shown(text)}: not a valid date (expected 'YYYY-MM-DD', or 'MM-DD' for every year)"
    if not isinstance(text, str):
        raise ScheduleError(problem)
    try:
        if _DATE_RE.fullmatch(text):
            return date.fromisoformat(text)
        yearly = _YEARLY_RE.fullmatch(text)
        if yearly:
            month, day = int(yearly.group(1)), int(yearly.group(2))
            date(_LEAP_YEAR, month, day)  # raises for 13-01, 04-31...
            return month, day
    except ValueError:
        pass
    raise ScheduleError(problem)


# --------------------------------------------------------------------------- describe


def _runs(weekly: tuple[tuple[OpenRange, ...], ...]) -> list[tuple[int, int, tuple[OpenRange, ...]]]:
    """Consecutive days with the same ranges, as ``(first, last, ranges)``."""
    runs: list[tuple[int, int, tuple[OpenRange, ...]]] = []
    for index, ranges in enumerate(weekly):
        if runs and runs[-1][2] == ranges:
            runs[-1] = (runs[-1][0], index, ranges)
        else:
            runs.append((index, index, ranges))
    return runs


def _day_span(first: int, last: int) -> str:
    return DAYS[first] if first == last else f"{DAYS[first]}-{DAYS[last]}"


def _ranges_text(ranges: tuple[OpenRange, ...]) -> str:
    return ",".join(str(r) for r in ranges) if ranges else "closed"
