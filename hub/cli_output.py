"""What ``edgefleet-hub`` prints: rich tables for people, JSON for scripts.

Tables go to stdout through one rich ``Console`` with markup and highlighting off, so that
names with brackets print as they are. When stdout is not a terminal (and ``COLUMNS`` is not
set) tables are laid out 200 columns wide so that rows stay on one line for grep.
Times are UTC.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from hub.api_models import (
    CohortOut,
    DeviceDetail,
    DeviceSummary,
    EventOut,
    GateOut,
    ModelDetail,
    ModelSetOut,
    ModelVariant,
    PlanOut,
    PolicyOut,
    RolloutDetail,
    RolloutSummary,
    TelemetryItem,
)
from hub.plan import PLAN_COLUMNS

if TYPE_CHECKING:
    from hub.keys import KeyInfo

PIPE_WIDTH = 200


def console() -> Console:
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(markup=False, highlight=False, emoji=False, width=width)


# --- JSON ------------------------------------------------------------------------------------


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _data(model: BaseModel) -> Any:
    return model.model_dump(mode="json", by_alias=True)


def print_model(model: BaseModel) -> None:
    print_json(_data(model))


def print_models(models: Iterable[BaseModel]) -> None:
    print_json([_data(m) for m in models])


def print_json_line(model: BaseModel) -> None:
    sys.stdout.write(model.model_dump_json(by_alias=True) + "\n")


# --- helpers ---------------------------------------------------------------------------------


def when(ts: float | None) -> str:
    """Unix seconds as ``YYYY-MM-DD HH:MM:SS`` UTC ("-" for None)."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _size(size: int) -> str:
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{size} B"


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _table(*columns: str, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _fields(rows: Sequence[tuple[str, object]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, _text(value))
    return table


def _print(*renderables: object) -> None:
    out = console()
    for renderable in renderables:
        out.print(renderable)


def _empty(what: str) -> None:
    print(f"no {what}")


# --- keys ------------------------------------------------------------------------------------


def keys_table(keys: Sequence[KeyInfo]) -> None:
    table = _table("KEY ID", "STATE", "CREATED", "RETIRED")
    for key in keys:
        table.add_row(key.keyid, key.state, when(key.created_at), when(key.retired_at))
    _print(table)


# --- devices ---------------------------------------------------------------------------------


def devices_table(devices: Sequence[DeviceSummary]) -> None:
    if not devices:
        _empty("devices")
        return
    table = _table(
        "DEVICE", "ONLINE", "PROFILE", "LABELS", "AGENT", "GENERATION", "PHASE", "MODELS", "SEEN"
    )
    for d in devices:
        models = " ".join(
            f"{m.name}@{m.version}" + ("" if m.ready else "(not ready)") for m in d.models
        )
        table.add_row(
            d.device_id,
            _text(d.online),
            _text(d.profile),
            _labels(d.labels),
            _text(d.agent_version),
            f"{d.applied_generation}/{d.desired_generation}",
            _text(d.phase),
            models or "-",
            when(d.last_seen),
        )
    _print(table)


def device_detail(d: DeviceDetail) -> None:
    facts = d.facts
    rows: list[tuple[str, object]] = [
        ("device", d.device_id),
        ("online", d.online),
        ("labels", _labels(d.labels)),
        ("profile", f"{_text(d.profile)} ({_text(d.profile_source)})"),
        ("agent", d.agent_version),
        ("session", d.session),
        ("first seen", when(d.first_seen)),
        ("last seen", when(d.last_seen)),
    ]
    if facts is not None:
        rows.append(
            (
                "hardware",
                f"{facts.architecture}, {facts.cpu_count} CPUs, {facts.memory_total_mb} MB",
            )
        )
    rows += [
        ("phase", d.phase),
        ("applied generation", d.applied_generation),
        ("reported desired", d.desired_generation),
    ]
    if d.desired is not None:
        ref = (
            f"{d.desired.model_set.name} {d.desired.model_set.version}"
            if d.desired.model_set
            else "-"
        )
        rows += [
            ("hub's generation", d.desired.generation),
            ("hub's model set", ref),
            ("expires", when(d.desired.expires_at)),
            ("published", when(d.desired.published_at)),
        ]
    else:
        rows.append(("hub's generation", "none (no policy applies or not reconciled yet)"))
    if d.state is not None and d.state.last_error is not None:
        err = d.state.last_error
        rows.append(("last error", f"generation {err.generation}: {err.code}: {err.message}"))
    renderables: list[object] = [_fields(rows)]
    if d.state is not None and d.state.models:
        table = _table("MODEL", "VERSION", "VARIANT", "PRECISION", "PROVIDER", "READY", "REASON")
        for m in d.state.models:
            table.add_row(
                m.name,
                m.version,
                _text(m.variant),
                _text(m.precision),
                _text(m.provider),
                _text(m.ready),
                _text(m.reason),
            )
        renderables += ["", table]
    if d.last_telemetry is not None:
        renderables += ["", "last telemetry: " + telemetry_summary(d.last_telemetry)]
    _print(*renderables)


def telemetry_summary(item: TelemetryItem) -> str:
    t = item.message
    s = t.system
    parts = [
        when(t.ts),
        f"seq {t.session}:{t.seq}",
        f"cpu {s.cpu_percent:.1f}%",
        f"mem {s.memory_used_mb} MB used, {s.memory_available_mb} MB free",
    ]
    if s.temperature_c is not None:
        parts.append(f"{s.temperature_c:.1f} C" + (" THROTTLED" if s.throttled else ""))
    for name, m in sorted(t.models.items()):
        p95 = f" p95 {m.latency_ms.p95:.1f} ms" if m.latency_ms is not None else ""
        parts.append(f"{name} {m.state} {m.requests} req {m.errors} err{p95}")
    return "  ".join(parts)


def telemetry_line(item: TelemetryItem) -> None:
    sys.stdout.write(telemetry_summary(item) + "\n")


# --- models ----------------------------------------------------------------------------------


def models_table(variants: Sequence[ModelVariant]) -> None:
    if not variants:
        _empty("models")
        return
    table = _table(
        "MODEL", "VERSION", "VARIANT", "PRECISION", "SIZE", "SHA256", "MEMORY MB", "LATENCY MS"
    )
    for m in variants:
        table.add_row(
            m.name,
            m.version,
            m.variant,
            m.precision,
            _size(m.size),
            m.sha256[:12],
            _text(m.load_memory_mb),
            _text(m.latency_ms),
        )
    _print(table)


def _tensors(tensors: list[dict[str, Any]]) -> str:
    parts = []
    for t in tensors:
        shape = t.get("shape")
        dims = (
            "?" if shape is None else "x".join("?" if d is None or d < 0 else str(d) for d in shape)
        )
        parts.append(f"{t.get('name')} {t.get('type', '')} [{dims}]")
    return "; ".join(parts) or "-"


def model_detail(model: ModelDetail) -> None:
    renderables: list[object] = [
        _fields([("model", model.name), ("versions", ", ".join(model.versions))])
    ]
    for m in model.variants:
        rows: list[tuple[str, object]] = [
            ("variant", f"{m.version} {m.variant} ({m.precision})"),
            ("sha256", m.sha256),
            ("size", _size(m.size)),
            ("opset", m.opset),
            ("inputs", _tensors(m.inputs)),
            ("outputs", _tensors(m.outputs)),
            ("memory MB", m.load_memory_mb),
            ("latency ms", m.latency_ms),
        ]
        if m.drift is not None:
            rows.append(("drift", json.dumps(m.drift, sort_keys=True)))
        renderables += ["", _fields(rows)]
    _print(*renderables)


# --- model sets and policies -------------------------------------------------------------------


def model_sets_table(records: Sequence[ModelSetOut]) -> None:
    if not records:
        _empty("model sets")
        return
    table = _table("MODEL SET", "VERSION", "PUBLISHED", "MODELS", "CREATED")
    for r in records:
        models = " ".join(f"{m.name}@{m.version}" for m in r.document.models)
        table.add_row(r.name, r.version, _text(r.published), models, when(r.created_at))
    _print(table)


def model_set_detail(record: ModelSetOut) -> None:
    head = _fields(
        [
            ("model set", f"{record.name} {record.version}"),
            ("published", when(record.published_at) if record.published else "no (draft)"),
        ]
    )
    table = _table("MODEL", "VERSION", "PRIORITY", "VARIANT", "PRECISION", "MEMORY MB", "SHA256")
    for m in record.document.models:
        for v in m.variants:
            table.add_row(
                m.name,
                m.version,
                str(m.priority),
                v.name,
                v.precision,
                str(v.requires.memory_mb),
                v.artifact.sha256[:12],
            )
    _print(head, "", table)


def _selector(policy: PolicyOut) -> str:
    s = policy.document.selector
    parts = []
    if s.labels:
        parts.append(_labels(s.labels))
    if s.profiles:
        parts.append("profiles=" + ",".join(s.profiles))
    if s.devices:
        parts.append("devices=" + ",".join(s.devices))
    return " ".join(parts) or "(all devices)"


def policies_table(records: Sequence[PolicyOut]) -> None:
    if not records:
        _empty("policies")
        return
    table = _table("POLICY", "VERSION", "ACTIVE", "PRIORITY", "SELECTOR", "MODEL SET", "CREATED")
    for r in records:
        ref = r.document.model_set
        table.add_row(
            r.name,
            str(r.version),
            _text(r.active),
            str(r.document.priority),
            _selector(r),
            f"{ref.name} {ref.version}",
            when(r.created_at),
        )
    _print(table)


def policy_detail(record: PolicyOut) -> None:
    doc = record.document
    runtime = doc.runtime
    _print(
        _fields(
            [
                ("policy", f"{record.name} version {record.version}"),
                ("active", record.active),
                ("priority", doc.priority),
                ("selector", _selector(record)),
                ("model set", f"{doc.model_set.name} {doc.model_set.version}"),
                ("telemetry interval s", runtime.telemetry_interval_s),
                ("probation s", runtime.probation_s),
                ("max error rate", runtime.max_error_rate),
                ("created", when(record.created_at)),
            ]
        )
    )


# --- plan, events ------------------------------------------------------------------------------


def plan_table(plan: PlanOut) -> None:
    if not plan.items:
        _empty("devices match")
        return
    table = _table(*(c.upper().replace("_", " ") for c in PLAN_COLUMNS))
    warnings: list[str] = []
    for device in plan.items:
        for row in device.rows:
            data = row.model_dump()
            table.add_row(*(_text(data[c]) for c in PLAN_COLUMNS))
        warnings += [f"{device.device_id}: {w.message}" for w in device.warnings]
    _print(table)
    for warning in warnings:
        print(f"warning: {warning}")


def events_table(events: Sequence[EventOut]) -> None:
    if not events:
        _empty("events")
        return
    table = _table("TIME", "DEVICE", "KIND", "GENERATION", "MESSAGE")
    for e in events:
        table.add_row(when(e.ts), e.device_id, e.kind, _text(e.generation), e.message)
    _print(table)


# --- rollouts --------------------------------------------------------------------------------

BAR_WIDTH = 24
_DONE = ("healthy", "failed", "timed_out", "skipped", "unreachable")
_ORDER = ("healthy", "applied", "switched", "waiting", "failed", "timed_out", "unreachable")


def _ref(ref: Any) -> str:
    return "-" if ref is None else f"{ref.name} {ref.version}"


def _counts(counts: dict[str, int]) -> str:
    ordered = [k for k in _ORDER if counts.get(k)] + sorted(k for k in counts if k not in _ORDER)
    return ", ".join(f"{counts[k]} {k}" for k in ordered if counts.get(k)) or "-"


def _gate(gate: GateOut) -> str:
    """``success 100/95 passed``, ``health 3.00/1.5 failed``: value against threshold."""
    if gate.value is None and gate.threshold is None:
        figures = ""
    elif gate.name == "health" or gate.name.startswith("health"):
        value = "-" if gate.value is None else f"{gate.value:.2f}x"
        threshold = "-" if gate.threshold is None else f"{gate.threshold:g}x"
        figures = f" {value}/{threshold}"
    else:
        value = "-" if gate.value is None else f"{gate.value:.4g}"
        threshold = "-" if gate.threshold is None else f"{gate.threshold:g}"
        figures = f" {value}/{threshold}"
    return f"{gate.name}{figures} {gate.status}"


def _bake(cohort: CohortOut, now: float) -> str:
    if cohort.status != "baking" or cohort.bake_until is None:
        return ""
    left = cohort.bake_until - now
    return f"bake {left:.0f}s left" if left > 0 else "bake over"


def _cohort_table(detail: RolloutDetail, now: float) -> Table:
    table = _table("COHORT", "STATUS", "PROGRESS", "HEALTHY", "DEVICES", "GATES")
    for cohort in detail.cohort_progress:
        done = sum(cohort.by_status.get(k, 0) for k in _DONE)
        bar = ProgressBar(total=max(cohort.total, 1), completed=done, width=BAR_WIDTH)
        if cohort.total == 0:
            bar = ProgressBar(total=1, completed=1, width=BAR_WIDTH)
        status = cohort.status
        if detail.phase in ("running", "paused") and cohort.index == detail.cohort:
            status = f"> {status}"
        extra = _bake(cohort, now)
        gates = "; ".join(_gate(g) for g in cohort.gates)
        table.add_row(
            cohort.name,
            status + (f" ({extra})" if extra else ""),
            bar,
            f"{cohort.healthy}/{cohort.total}",
            _counts(cohort.by_status),
            gates or "-",
        )
    return table


def rollout_view(detail: RolloutDetail, *, now: float | None = None) -> RenderableType:
    """A rollout for people: what moves where, each cohort with a progress bar and its
    gate values, the rollout-wide gates, the newest events (``status --watch`` refreshes
    this)."""
    now = time.time() if now is None else now
    header = _fields(
        [
            ("rollout", f"{detail.name} (policy {detail.policy})"),
            ("moves", f"{_ref(detail.baseline)} -> {_ref(detail.model_set)}"),
            ("phase", f"{detail.phase}: {detail.reason}" if detail.reason else detail.phase),
            ("devices", f"{detail.devices}: {_counts(detail.counts)}"),
        ]
        + ([("held", detail.held)] if detail.held else [])
        + ([("gates", "; ".join(_gate(g) for g in detail.gates))] if detail.gates else [])
    )
    parts: list[RenderableType] = [header, Text(""), _cohort_table(detail, now)]
    health = [c for cohort in detail.cohort_progress for g in cohort.gates for c in g.checks]
    if health:
        checks = _table("CHECK", "STATUS", "VALUE", "ALLOWED", "WHY")
        for check in health:
            checks.add_row(
                check.name,
                check.status,
                "-" if check.value is None else f"{check.value:.3g}",
                "-" if check.threshold is None else f"{check.threshold:.3g}",
                check.reason,
            )
        parts += [Text(""), checks]
    if detail.events:
        events = _table("TIME", "EVENT", "COHORT", "DEVICE", "REASON")
        names = {c.index: c.name for c in detail.cohort_progress}
        for e in detail.events:
            cohort = names.get(e.cohort, "-") if e.cohort is not None else "-"
            events.add_row(when(e.ts), e.kind, cohort, e.device_id or "-", e.reason)
        parts += [Text(""), events]
    if detail.device_progress:
        devices = _table("DEVICE", "COHORT", "STATUS", "PINNED", "GENERATION", "REASON")
        names = {c.index: c.name for c in detail.cohort_progress}
        for d in detail.device_progress:
            devices.add_row(
                d.device_id,
                names.get(d.cohort, str(d.cohort)),
                d.status,
                _text(d.pinned),
                _text(d.generation),
                d.reason or "-",
            )
        parts += [Text(""), devices]
    return Group(*parts)


def print_rollout(detail: RolloutDetail) -> None:
    _print(rollout_view(detail))


def interactive() -> bool:
    """Whether stdout is a terminal a live display can redraw."""
    return console().is_terminal


def live(renderable: RenderableType) -> Live:
    """A display redrawn in place on a terminal (``update(..., refresh=True)``)."""
    return Live(renderable, console=console(), auto_refresh=False, transient=False)


def rollouts_table(rollouts: Sequence[RolloutSummary]) -> None:
    if not rollouts:
        _empty("rollouts")
        return
    table = _table("NAME", "POLICY", "FROM", "TO", "PHASE", "COHORT", "DEVICES", "CREATED")
    for r in rollouts:
        cohort = r.cohort_name or ("done" if r.cohort >= r.cohorts else "-")
        table.add_row(
            r.name,
            r.policy,
            _ref(r.baseline),
            _ref(r.model_set),
            r.phase,
            cohort,
            f"{r.devices}: {_counts(r.counts)}",
            when(r.created_at),
        )
    _print(table)
