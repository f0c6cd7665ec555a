"""`edgefleet-agent status`: what the agent serves, read from its state directory.

The daemon writes ``status.json`` (atomically) whenever its reported state changes; the
generations come from the state database. Neither read needs the daemon to be running.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.state import AgentState

STATUS_FILE = "status.json"


def write_status(state_dir: Path, report: dict[str, Any]) -> None:
    """Replace ``status.json`` in one step."""
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".status-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(report, handle, sort_keys=True)
        os.replace(tmp, state_dir / STATUS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(config: AgentConfig) -> dict[str, Any]:
    """The last reported state plus the generations on record."""
    state_dir = Path(config.state_dir)
    report: dict[str, Any] = {"device_id": config.device_id, "state_dir": str(state_dir)}
    path = state_dir / STATUS_FILE
    try:
        report["reported"] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        report["reported"] = None
    db_path = Path(config.state_db_path)
    if db_path.exists():
        with AgentState(db_path) as state:
            active, previous = state.active(), state.previous()
            report["applied_generation"] = active.generation if active else 0
            report["previous_generation"] = previous.generation if previous else None
            report["refused_generations"] = sorted(state.refused())
    else:
        report["applied_generation"] = 0
        report["previous_generation"] = None
        report["refused_generations"] = []
    return report


def render_status(report: dict[str, Any]) -> str:
    lines = [
        f"device      {report['device_id']}",
        f"generation  {report['applied_generation']}"
        + (f" (previous {report['previous_generation']})" if report["previous_generation"] else ""),
    ]
    if report["refused_generations"]:
        lines.append(f"refused     {', '.join(map(str, report['refused_generations']))}")
    reported = report.get("reported")
    if not reported:
        lines.append("state       never reported (the daemon has not run here yet)")
        return "\n".join(lines)
    lines.append(f"phase       {reported.get('phase')}")
    error = reported.get("last_error")
    if error:
        lines.append(
            f"last error  generation {error['generation']}: {error['code']}: {error['message']}"
        )
    models = reported.get("models") or []
    if models:
        lines.append("")
        lines.append(f"{'MODEL':<16} {'VERSION':<10} {'VARIANT':<10} {'PROVIDER':<26} HEALTH")
        for m in models:
            health = "ready" if m.get("ready") else f"not ready: {m.get('reason')}"
            lines.append(
                f"{m['name']:<16} {m['version']:<10} {m.get('variant') or '-':<10} "
                f"{m.get('provider') or '-':<26} {health}"
            )
    return "\n".join(lines)
