"""``edgefleet-hub simulate``: run a simulated fleet against a broker until stopped."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from hub.simulate.fleet import Simulation
from hub.simulate.model import (
    OFFLINE_MODES,
    Failures,
    SimStats,
    SimulationConfig,
    SimulationError,
    parse_profile_weights,
    read_public_keys,
)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def _share(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share like 0.05 or 5%: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share is between 0 and 1 (or 0% and 100%): {text}")
    return value


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefleet-hub simulate``; sets ``handler`` to ``run_simulate``."""
    parser.description = (
        "Run N simulated agents, each on its own MQTT connection, that verify and apply "
        "signed desired states with the contract code, report state, events and telemetry, "
        "and fail on request. Stop with Ctrl-C (every device publishes offline)."
    )
    where = parser.add_argument_group("broker and trust")
    where.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=argparse.SUPPRESS,  # keeps a --config given before the command
        help="hub.toml to take the broker and the public key file from "
        "(default: $EDGEFLEET_HUB_CONFIG or ./hub.toml when present)",
    )
    where.add_argument("--broker", metavar="URL", help=f"mqtt[s]://host[:port] ({DEFAULT_BROKER})")
    where.add_argument("--username", help="broker user name (all devices share it)")
    where.add_argument("--password-file", type=Path, help="file with the broker password")
    where.add_argument("--ca-file", help="CA bundle for mqtts://")
    where.add_argument(
        "--trust-keys",
        type=Path,
        metavar="FILE",
        help="the hub's public keys (hub-keys.json) the devices trust",
    )
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument("--devices", type=int, required=True, metavar="N")
    fleet.add_argument(
        "--profiles",
        default="",
        metavar="NAME[=WEIGHT],...",
        help="firmware profiles and their weights (default: every non-fallback profile)",
    )
    fleet.add_argument("--profiles-dir", type=Path, help="firmware profile directory")
    fleet.add_argument("--id-prefix", default="sim", help="device ids are PREFIX-00000, ...")
    fleet.add_argument("--first-index", type=int, default=0, help="number of the first device")
    fleet.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label every device reports in its birth (repeatable)",
    )
    fleet.add_argument("--seed", type=int, default=0, help="chooses the failing devices")
    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument(
        "--telemetry-interval",
        type=float,
        metavar="S",
        help="seconds between telemetry reports (default: the desired state's, 10 s before)",
    )
    behaviour.add_argument("--telemetry-qos", type=int, choices=(0, 1), default=1)
    behaviour.add_argument(
        "--apply-delay",
        type=float,
        default=1.0,
        metavar="S",
        help="simulated time to stage and load a generation (+-50%%)",
    )
    behaviour.add_argument(
        "--request-rate",
        type=float,
        default=2.0,
        metavar="R",
        help="simulated inference requests per second per model",
    )
    failures = parser.add_argument_group("failures (shares of the fleet: 0.05 or 5%%)")
    failures.add_argument("--fail-apply", type=_share, default=0.0, metavar="SHARE")
    failures.add_argument("--fail-code", default="fetch_error", help="update.failed code")
    failures.add_argument("--offline", type=_share, default=0.0, metavar="SHARE")
    failures.add_argument(
        "--offline-mode",
        choices=[m.replace("_", "-") for m in OFFLINE_MODES],
        default="never",
        help="never: never connect; on-update: drop the connection when a new desired "
        "state arrives; after: drop it --offline-after seconds after connecting",
    )
    failures.add_argument("--offline-after", type=float, default=30.0, metavar="S")
    failures.add_argument(
        "--offline-for", type=float, metavar="S", help="stay away this long (default: for good)"
    )
    failures.add_argument("--slow", type=_share, default=0.0, metavar="SHARE")
    failures.add_argument("--slow-factor", type=float, default=3.0, metavar="X")
    failures.add_argument(
        "--slow-version", metavar="VERSION", help="only this model-set version is slow"
    )
    failures.add_argument("--errors", type=_share, default=0.0, metavar="SHARE")
    failures.add_argument("--error-rate", type=_share, default=0.2, metavar="SHARE")
    failures.add_argument(
        "--error-version", metavar="VERSION", help="only this model-set version errs"
    )
    failures.add_argument(
        "--crash-version",
        metavar="VERSION",
        help="model-set version whose smoke test fails (update.failed smoke_test_error)",
    )
    failures.add_argument(
        "--crash",
        type=_share,
        default=1.0,
        metavar="SHARE",
        help="share of devices on which --crash-version fails (default: all)",
    )
    scale = parser.add_argument_group("scale")
    scale.add_argument("--processes", type=int, default=1, help="worker processes")
    scale.add_argument("--threads", type=int, default=1, help="event loops per process")
    scale.add_argument(
        "--connect-rate",
        type=float,
        default=500.0,
        metavar="PER_S",
        help="connection attempts per second, all processes together",
    )
    scale.add_argument("--keepalive", type=int, default=60, metavar="S")
    run = parser.add_argument_group("run")
    run.add_argument(
        "--duration", type=float, default=0.0, metavar="S", help="stop after S seconds (0: never)"
    )
    run.add_argument("--report-interval", type=float, default=10.0, metavar="S")
    run.add_argument("--json", action="store_true", help="print the final figures as JSON")
    parser.set_defaults(handler=run_simulate)


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """A SimulationConfig from the parsed options (and hub.toml where they leave gaps)."""
    broker, username, password, ca_file, keys_path = _hub_defaults(args)
    broker = args.broker or broker or DEFAULT_BROKER
    username = args.username or username
    if args.password_file is not None:
        try:
            password = args.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SimulationError(f"{args.password_file}: cannot read ({exc.strerror})") from None
    keys_file = args.trust_keys or keys_path
    if keys_file is None:
        raise SimulationError(
            "no trusted hub keys: pass --trust-keys hub-keys.json or --config hub.toml"
        )
    return SimulationConfig(
        broker_url=broker,
        devices=args.devices,
        trusted_keys=read_public_keys(keys_file),
        profiles=parse_profile_weights(args.profiles),
        profiles_dir=args.profiles_dir,
        id_prefix=args.id_prefix,
        first_index=args.first_index,
        labels=dict(args.label),
        seed=args.seed,
        failures=Failures(
            fail_apply=args.fail_apply,
            fail_code=args.fail_code,
            offline=args.offline,
            offline_mode=args.offline_mode.replace("-", "_"),
            offline_after_s=args.offline_after,
            offline_for_s=args.offline_for,
            slow=args.slow,
            slow_factor=args.slow_factor,
            slow_version=args.slow_version,
            errors=args.errors,
            error_rate=args.error_rate,
            error_version=args.error_version,
            crash_version=args.crash_version,
            crash=args.crash,
        ),
        telemetry_interval_s=args.telemetry_interval,
        telemetry_qos=args.telemetry_qos,
        apply_delay_s=args.apply_delay,
        request_rate=args.request_rate,
        connect_rate=args.connect_rate,
        processes=args.processes,
        threads=args.threads,
        keepalive=args.keepalive,
        username=username,
        password=password,
        ca_file=args.ca_file or ca_file,
    )


def _hub_defaults(
    args: argparse.Namespace,
) -> tuple[str | None, str | None, str | None, str | None, Path | None]:
    """Broker url, user, password, CA file and public key file from hub.toml, if any."""
    from hub.config import config_path, load_config

    explicit: Path | None = getattr(args, "config", None)
    path = config_path(explicit)
    if explicit is None and not path.exists():
        return None, None, None, None, None
    config = load_config(path)
    keys = config.public_keys_path
    return (
        config.broker.url,
        config.broker.username,
        config.broker_password(),
        config.broker.ca_file,
        keys if keys.exists() else None,
    )


def run_simulate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the simulation until ``--duration`` ends, or SIGINT / SIGTERM; 0 when it ran."""
    stream = out or sys.stdout
    config = config_from_args(args)
    simulation = Simulation(config)
    done = threading.Event()
    restore = _on_signals(done)
    try:
        simulation.start()
        _say(
            stream,
            f"simulating {config.devices} devices ({_profiles(simulation)}) on "
            f"{config.broker_url} in {max(1, config.processes)} process(es); Ctrl-C stops",
        )
        deadline = time.monotonic() + args.duration if args.duration > 0 else None
        previous = (simulation.elapsed_s, 0, 0)
        interval = max(0.5, args.report_interval)
        while not done.is_set():
            wait = interval
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    break
            if done.wait(wait):
                break
            stats = simulation.stats()
            now = simulation.elapsed_s
            _say(stream, progress_line(stats, now, previous))
            previous = (now, stats.published, stats.received)
    except KeyboardInterrupt:
        pass
    finally:
        final = simulation.stop()
        restore()
    if args.json:
        _say(stream, json.dumps(final.as_dict(), sort_keys=True))
    else:
        _say(stream, "stopped: " + progress_line(final, simulation.elapsed_s, None))
    return 0


def progress_line(stats: SimStats, elapsed: float, previous: tuple[float, int, int] | None) -> str:
    rates = ""
    if previous is not None and elapsed > previous[0]:
        span = elapsed - previous[0]
        rates = (
            f" out {(stats.published - previous[1]) / span:.0f}/s"
            f" in {(stats.received - previous[2]) / span:.0f}/s"
        )
    generations = " ".join(
        f"g{g}:{n}" for g, n in sorted(stats.generations.items(), reverse=True)[:4]
    )
    ramp = f" ramp {stats.ramp_s:.1f}s" if stats.ramp_s is not None else ""
    return (
        f"[{elapsed:7.1f}s] connected {stats.connected}/{stats.devices}{ramp}{rates}"
        f" applied {stats.applies_ok} failed {stats.applies_failed}"
        f" refused {stats.desired_refused} rolled back {stats.rollbacks}"
        f" | {generations or 'no generation'}"
    )


def _profiles(simulation: Simulation) -> str:
    counts: dict[str, int] = {}
    for spec in simulation.specs:
        counts[spec.profile] = counts.get(spec.profile, 0) + 1
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def _say(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()


def _on_signals(done: threading.Event) -> Any:
    """SIGINT and SIGTERM set ``done``; returns a function that restores the handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        done.set()

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
