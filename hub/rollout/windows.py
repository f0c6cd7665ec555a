"""Maintenance windows: a 5-field cron expression in a time zone, outside which no device of
a rollout is switched.

A window is open

* without ``duration_s``: during every minute its cron expression matches (``* 1-4 * * *``
  is open from 01:00 to 04:59 every day);
* with ``duration_s``: for ``duration_s`` seconds from every minute the expression matches
  (``0 2 * * 6`` with ``duration_s: 10800`` is open Saturdays from 02:00 to 04:59:59).

The expression is matched against the wall-clock time in ``timezone`` (an IANA name, read
with ``zoneinfo``), so a window follows daylight saving time: a local time that does not
exist on a spring-forward day never matches, one that repeats in autumn matches twice.

Cron syntax (Vixie cron, the five fields ``minute hour day-of-month month day-of-week``):
``*``, a number, a range ``a-b``, a step ``*/n``, ``a-b/n`` or ``a/n`` (from ``a`` to the
end), lists of these with ``,``; month names ``jan``-``dec`` and day names ``sun``-``sat``
(any case); day of week 0 or 7 is Sunday. When both day fields are restricted (neither
starts with ``*``) a day matches when *either* matches, as in cron. ``L``, ``W``, ``#``,
``?`` and the ``@daily`` macros are refused.

Pure: no clock; callers pass the time as Unix seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from contract.base import ManifestModel

MAX_WINDOW_S = 7 * 24 * 3600
"""The longest ``duration_s`` a window may have (one week)."""
SEARCH_LIMIT_S = 8 * 24 * 3600
"""How far ``next_open`` looks ahead before giving up (a window opens at least weekly)."""

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    names_from: int = 0


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12, _MONTHS, 1),
    _Field("day of week", 0, 7, _DAYS, 0),
)


@dataclass(frozen=True)
class Cron:
    """A parsed 5-field cron expression; ``matches`` takes a (local) wall-clock time."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    """0 is Sunday (a 7 in the expression is folded to 0)."""
    days_restricted: bool
    weekdays_restricted: bool

    def matches(self, when: datetime) -> bool:
        """Whether the minute of ``when`` (its own wall-clock fields) matches."""
        if (
            when.minute not in self.minutes
            or when.hour not in self.hours
            or when.month not in self.months
        ):
            return False
        day = when.day in self.days
        weekday = (when.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day or weekday
        return day and weekday


@functools.lru_cache(maxsize=256)
def parse_cron(text: str) -> Cron:
    """Parse a 5-field cron expression; ``ValueError`` says which field is wrong and why."""
    parts = text.split()
    if len(parts) != len(_FIELDS):
        raise ValueError(
            f"cron expression {text!r} has {len(parts)} fields; expected 5: "
            "minute hour day-of-month month day-of-week"
        )
    values = [_parse_field(part, spec) for part, spec in zip(parts, _FIELDS, strict=True)]
    weekdays = frozenset(0 if d == 7 else d for d in values[4])
    return Cron(
        text=" ".join(parts),
        minutes=values[0],
        hours=values[1],
        days=values[2],
        months=values[3],
        weekdays=weekdays,
        days_restricted=not parts[2].startswith("*"),
        weekdays_restricted=not parts[4].startswith("*"),
    )


def _parse_field(text: str, spec: _Field) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError(f"{spec.name}: empty list item in {text!r}")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{spec.name}: step {step_text!r} must be a positive integer")
            step = int(step_text)
        if base == "*":
            low, high = spec.low, spec.high
        elif "-" in base:
            first, _, last = base.partition("-")
            low, high = _value(first, spec), _value(last, spec)
            if low > high:
                raise ValueError(f"{spec.name}: range {base!r} runs backwards")
        else:
            low = _value(base, spec)
            high = spec.high if slash else low
        values.update(range(low, high + 1, step))
    return frozenset(values)


def _value(text: str, spec: _Field) -> int:
    lowered = text.lower()
    if lowered in spec.names:
        return spec.names.index(lowered) + spec.names_from
    if not text.isdigit():
        raise ValueError(f"{spec.name}: {text!r} is not a number{_names_hint(spec)}")
    value = int(text)
    if not spec.low <= value <= spec.high:
        raise ValueError(f"{spec.name}: {value} is outside {spec.low}-{spec.high}")
    return value


def _names_hint(spec: _Field) -> str:
    return f" or a name ({spec.names[0]}-{spec.names[-1]})" if spec.names else ""


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (expected an IANA name)") from exc


class MaintenanceWindow(ManifestModel):
    """When devices may be switched: a cron expression in a time zone, and how long each
    matching minute keeps the window open (default: the minute itself)."""

    cron: str = Field(description="5-field cron expression: minute hour day month weekday.")
    timezone: str = Field(default="UTC", description="IANA time zone the cron is read in.")
    duration_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_WINDOW_S,
        description="Open for this long from each matching minute; None: matching minutes.",
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        return parse_cron(value).text

    @field_validator("timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        _zone(value)
        return value

    def is_open(self, now: float) -> bool:
        """Whether the window is open at Unix time ``now``."""
        cron = parse_cron(self.cron)
        zone = _zone(self.timezone)
        minute = int(now // 60) * 60
        if self.duration_s is None:
            return cron.matches(_local(minute, zone))
        start = minute
        # A start at ``start`` keeps the window open until start + duration_s (exclusive).
        while start > now - self.duration_s:
            if cron.matches(_local(start, zone)):
                return True
            start -= 60
        return False


def _local(ts: float, zone: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC).astimezone(zone)


def any_open(windows: Sequence[MaintenanceWindow], now: float) -> bool:
    """Whether devices may be switched at ``now``: no windows at all, or any window open."""
    return not windows or any(window.is_open(now) for window in windows)


def next_open(
    windows: Sequence[MaintenanceWindow], now: float, *, limit_s: float = SEARCH_LIMIT_S
) -> float | None:
    """The first time at or after ``now`` at which a window is open (``now`` itself when one
    is open), or None when none opens within ``limit_s``. A closed window opens only at a
    minute its expression matches, so only those minutes are searched."""
    if any_open(windows, now):
        return now
    crons = [(parse_cron(w.cron), _zone(w.timezone)) for w in windows]
    minute = (int(now // 60) + 1) * 60
    end = now + limit_s
    while minute <= end:
        if any(cron.matches(_local(minute, zone)) for cron, zone in crons):
            return float(minute)
        minute += 60
    return None
