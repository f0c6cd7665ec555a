"""The fleet simulator: many simulated agents on real MQTT connections (docs/simulator.md).

    from hub.simulate import Failures, Simulation, SimulationConfig

    config = SimulationConfig(broker_url="mqtt://127.0.0.1:1883", devices=1000,
                              trusted_keys=(key.public,), failures=Failures(fail_apply=0.05))
    with Simulation(config) as sim:
        sim.wait_connected(60)
        print(sim.stats())

``edgefleet-hub simulate`` is ``add_simulate_arguments`` and ``run_simulate``.
"""

from hub.simulate.cli import add_simulate_arguments, config_from_args, run_simulate
from hub.simulate.device import SimDevice
from hub.simulate.fleet import Simulation, raise_open_file_limit
from hub.simulate.model import (
    DeviceSpec,
    DeviceView,
    Failures,
    SimStats,
    SimulationConfig,
    SimulationError,
    default_profiles_dir,
    facts_for,
    load_profiles,
    plan_devices,
    read_public_keys,
)

__all__ = [
    "DeviceSpec",
    "DeviceView",
    "Failures",
    "SimDevice",
    "SimStats",
    "Simulation",
    "SimulationConfig",
    "SimulationError",
    "add_simulate_arguments",
    "config_from_args",
    "default_profiles_dir",
    "facts_for",
    "load_profiles",
    "plan_devices",
    "raise_open_file_limit",
    "read_public_keys",
    "run_simulate",
]
