"""Energy meters for the edge agent: joules per phase of a round, from the board's own sensors.

    meter = open_meter("ina219", shunt_ohms=0.1, max_current_a=3.2, rate_hz=50, csv_path="energy.csv")
    with meter:                                   # samples in a background thread until closed
        with meter.phase("train") as train:
            ...
    train.joules, train.seconds                   # this phase
    meter.totals(reset=True)                      # {"train": Phase(...), ...} summed by name since the last reset

Backends: "none" (0 J, still times phases), "rapl" (CPU package, Intel), "ina219" (I2C, needs the
`energy` extra: smbus2), "ina3221" (Jetson sysfs). Each reads as a power source; the meter integrates.
"""
import inspect
from typing import Dict, Type

from edge_client.energy.meter import CSV_COLUMNS, EnergyError, Meter, MeterOverflow, NullMeter, Phase

METERS = ("none", "rapl", "ina219", "ina3221")


def _backends() -> Dict[str, Type[Meter]]:
    from edge_client.energy.ina219 import INA219Meter  # smbus2 itself only when a bus is opened
    from edge_client.energy.sysfs import INA3221Meter, RaplMeter
    return {"none": NullMeter, "rapl": RaplMeter, "ina219": INA219Meter, "ina3221": INA3221Meter}


def open_meter(name: str, **options) -> Meter:
    """Open the meter `name` with its options (shared: rate_hz, csv_path, clock; backend ones: see
    INA219Meter, INA3221Meter, RaplMeter). It samples in the background once started (`with` or
    `start()`). EnergyError when the device is missing or unreadable, ValueError for a bad option."""
    backends = _backends()
    if name not in backends:
        raise ValueError(f"unknown energy meter {name!r}; known meters: {', '.join(METERS)}")
    cls = backends[name]
    known = set(inspect.signature(cls).parameters) | set(inspect.signature(Meter).parameters)
    unknown = sorted(set(options) - known - {"meter_options"})
    if unknown:
        raise ValueError(f"energy meter {name!r} takes no option {', '.join(unknown)}; "
                         f"it takes {', '.join(sorted(known - {'meter_options'}))}")
    return cls(**options)


__all__ = ["CSV_COLUMNS", "METERS", "EnergyError", "Meter", "MeterOverflow", "NullMeter", "Phase", "open_meter"]
