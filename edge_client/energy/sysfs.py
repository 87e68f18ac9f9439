"""Meters that read the kernel's sysfs files: the Jetson's INA3221 rails and Intel RAPL.

`root` is the file-system root ("/" on a device), a parameter so tests can build a fake tree.

    Jetson, JetPack 4.x (iio):   sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/
                                 rail_name_N, in_powerN_input (mW)   N = 0..2; POM_5V_IN is the board input
    Jetson, JetPack 5+ (hwmon):  sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/
                                 inN_label, inN_input (mV), currN_input (mA)   N = 1..3; VDD_IN the input
    RAPL:                        sys/class/powercap/intel-rapl:0/energy_uj (cumulative uJ, wraps
                                 at max_energy_range_uj)
"""
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from edge_client.energy.meter import EnergyError, Meter

log = logging.getLogger(__name__)
JETPACK4 = "sys/bus/i2c/drivers/ina3221x/*/iio:device*"
JETPACK5 = "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
RAPL = "sys/class/powercap"


def read_int(path: Path) -> int:
    """An integer sysfs attribute; EnergyError naming the file when it cannot be read."""
    try:
        return int(path.read_text().strip())
    except PermissionError as exc:
        raise EnergyError(f"no permission to read {path} (run as root, or let a udev rule make it "
                          f"readable)") from exc
    except (OSError, ValueError) as exc:
        raise EnergyError(f"cannot read {path}: {exc}") from exc


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: watts = product of its files' integers * scale."""

    name: str
    files: Tuple[Path, ...]
    scale: float

    def watts(self) -> float:
        value = self.scale
        for f in self.files:
            value *= read_int(f)
        return value


def find_rails(root: Union[str, Path] = "/") -> List[Rail]:
    """Every INA3221 rail under `root`, in either layout (JetPack 4 first)."""
    root, rails = Path(root), []
    for d in sorted(root.glob(JETPACK4)):
        for label in sorted(d.glob("rail_name_*")):
            n = label.name.rsplit("_", 1)[1]
            rails.append(Rail(label.read_text().strip(), (d / f"in_power{n}_input",), 1e-3))
    for d in sorted(root.glob(JETPACK5)):
        for label in sorted(d.glob("in*_label")):
            n = re.fullmatch(r"in(\d+)_label", label.name)
            if n and (d / f"curr{n[1]}_input").exists():
                rails.append(Rail(label.read_text().strip(), (d / f"in{n[1]}_input", d / f"curr{n[1]}_input"), 1e-6))
    return rails


class INA3221Meter(Meter):
    """Power of the Jetson's on-board INA3221 rails (sum of `rails`; default: the board input rail,
    POM_5V_IN / VDD_IN). The driver refreshes its figures every few ms; 10-50 Hz is plenty."""

    name = "ina3221"

    def __init__(self, rails: Optional[Sequence[str]] = None, root: Union[str, Path] = "/", **meter_options) -> None:
        found = find_rails(root)
        if not found:
            raise EnergyError(f"no INA3221 rails: neither {Path(root) / JETPACK4} (JetPack 4) nor "
                              f"{Path(root) / JETPACK5} (JetPack 5+) exists")
        names = [r.name for r in found]
        if rails is None:
            rails = [n for n in names if n.endswith("_IN")] or names
            if len(rails) > 1 or not rails[0].endswith("_IN"):
                log.warning("ina3221: no single input rail among %s; summing %s", names, rails)
        missing = [r for r in rails if r not in names]
        if missing:
            raise EnergyError(f"INA3221 rails {missing} not found; this board has {names}")
        self.rails = [r for r in found if r.name in rails]
        log.info("ina3221: measuring %s", [r.name for r in self.rails])
        super().__init__(**meter_options)

    def _read(self) -> float:
        return sum(r.watts() for r in self.rails)


class RaplMeter(Meter):
    """CPU package energy from Intel RAPL's cumulative counter (not the whole board). The counter
    wraps at max_energy_range_uj (minutes at high power): sample faster than one wrap."""

    name = "rapl"
    counter = True

    def __init__(self, domain: str = "intel-rapl:0", root: Union[str, Path] = "/", **meter_options) -> None:
        base = Path(root) / RAPL / domain
        self.energy_file = base / "energy_uj"
        if not self.energy_file.exists():
            raise EnergyError(f"no RAPL on this machine: {self.energy_file} does not exist")
        self.range_uj = read_int(base / "max_energy_range_uj")
        self._raw_uj = read_int(self.energy_file)
        self._total_uj = 0
        super().__init__(**meter_options)

    def _read(self) -> float:
        """Cumulative joules since opening, unwrapped."""
        raw = read_int(self.energy_file)
        step = raw - self._raw_uj
        if step < 0:  # the counter passed max_energy_range_uj and restarted from 0
            step += self.range_uj
        self._raw_uj, self._total_uj = raw, self._total_uj + step
        return self._total_uj * 1e-6


__all__ = ["INA3221Meter", "RaplMeter", "Rail", "find_rails"]
