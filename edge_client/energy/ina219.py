"""The INA219 current/power monitor over I2C (TI datasheet SBOS448), and a meter on top of it.

Registers are 16-bit big-endian: config 0x00, shunt voltage 0x01 (signed, 10 uV/bit), bus voltage
0x02 ((reg >> 3) * 4 mV; bit 1 conversion ready, bit 0 math overflow), power 0x03, current 0x04,
calibration 0x05. Calibration follows the datasheet (section 8.5.1):

    Current_LSB = Imax / 32768       A/bit
    Cal         = trunc(0.04096 / (Current_LSB * R_shunt))
    Power_LSB   = 20 * Current_LSB   W/bit

smbus2 is imported only when a bus is opened here, so the agent does not need it otherwise.
"""
import logging
from dataclasses import dataclass

from edge_client.energy.meter import EnergyError, Meter, MeterOverflow

log = logging.getLogger(__name__)

CONFIG, SHUNT, BUS, POWER, CURRENT, CALIBRATION = range(6)
SHUNT_LSB_V = 10e-6
BUS_LSB_V = 4e-3
BUS_OVF, BUS_CNVR = 0x1, 0x2
PGA_RANGES_V = (0.04, 0.08, 0.16, 0.32)  # shunt full scale for PG = /1, /2, /4, /8
ADC_12BIT = 0b0011  # 12-bit, one sample: 532 us a conversion, so shunt + bus take ~1.06 ms
MODE_CONTINUOUS = 0b111  # shunt and bus, continuous


@dataclass(frozen=True)
class Reading:
    """One INA219 conversion, in SI units."""

    bus_v: float
    shunt_v: float
    current_a: float
    power_w: float


class INA219:
    """Driver: configures range and calibration from the shunt and the largest expected current.

    `bus` is an smbus2.SMBus-like object (read_i2c_block_data / write_i2c_block_data); None opens
    /dev/i2c-`bus_number` with smbus2.
    """

    def __init__(self, shunt_ohms: float = 0.1, max_current_a: float = 3.2, address: int = 0x40,
                 bus=None, bus_number: int = 1, bus_32v: bool = True) -> None:
        if shunt_ohms <= 0 or max_current_a <= 0:
            raise ValueError(f"shunt_ohms and max_current_a must be positive, got {shunt_ohms}, {max_current_a}")
        self.address, self.shunt_ohms = address, shunt_ohms
        full_scale = [r for r in PGA_RANGES_V if r >= max_current_a * shunt_ohms * (1 - 1e-9)]
        if not full_scale:
            raise ValueError(f"{max_current_a} A through {shunt_ohms} ohm drops {max_current_a * shunt_ohms * 1e3:.0f} mV;"
                             f" the INA219 shunt input measures at most 320 mV")
        self.shunt_full_scale_v = full_scale[0]
        self._shunt_full_scale_reg = round(self.shunt_full_scale_v / SHUNT_LSB_V)
        current_lsb = max_current_a / 32768
        cal = int(0.04096 / (current_lsb * shunt_ohms))
        if not 2 <= cal <= 0xFFFE:
            raise ValueError(f"calibration {cal} out of the register's range 2..65534: choose another shunt "
                             f"({shunt_ohms} ohm) or max_current_a ({max_current_a} A)")
        self.calibration = cal
        # The chip ignores bit 0 of the calibration register, and Cal was truncated: convert with the LSB
        # the chip really uses (Current = Vshunt / R exactly), not the nominal Imax / 32768.
        self.current_lsb_a = 0.04096 / ((cal & 0xFFFE) * shunt_ohms)
        self.power_lsb_w = 20 * self.current_lsb_a
        self._owns_bus = bus is None
        if bus is None:
            try:
                from smbus2 import SMBus
            except ImportError as exc:
                raise EnergyError("the INA219 meter needs smbus2: pip install 'deltamask[energy]'") from exc
            try:
                bus = SMBus(bus_number)
            except OSError as exc:
                raise EnergyError(f"cannot open I2C bus /dev/i2c-{bus_number}: {exc}") from exc
        self.bus = bus
        pga = PGA_RANGES_V.index(self.shunt_full_scale_v)
        config = (int(bus_32v) << 13) | (pga << 11) | (ADC_12BIT << 7) | (ADC_12BIT << 3) | MODE_CONTINUOUS
        self._write(CONFIG, config)
        self._write(CALIBRATION, cal)
        log.info("INA219 at 0x%02x: shunt %g ohm, full scale %g mV, Cal %d, current LSB %.3g A",
                 address, shunt_ohms, self.shunt_full_scale_v * 1e3, cal, self.current_lsb_a)

    def _write(self, register: int, value: int) -> None:
        try:
            self.bus.write_i2c_block_data(self.address, register, [(value >> 8) & 0xFF, value & 0xFF])
        except OSError as exc:
            raise EnergyError(f"INA219 at 0x{self.address:02x}: write to register {register} failed: {exc}") from exc

    def _read(self, register: int, signed: bool = False) -> int:
        try:
            hi, lo = self.bus.read_i2c_block_data(self.address, register, 2)
        except OSError as exc:
            raise EnergyError(f"INA219 at 0x{self.address:02x}: read of register {register} failed: {exc}") from exc
        value = (hi << 8) | lo
        return value - 0x10000 if signed and value & 0x8000 else value

    def _check(self, bus_reg: int, shunt_reg: int) -> None:
        if bus_reg & BUS_OVF:
            raise MeterOverflow(f"INA219 math overflow: current or power out of range (more than "
                                f"{32767 * self.current_lsb_a:.3g} A?); raise max_current_a")
        if abs(shunt_reg) >= self._shunt_full_scale_reg:
            raise MeterOverflow(f"INA219 shunt voltage saturated at {self.shunt_full_scale_v * 1e3:g} mV;"
                                f" raise max_current_a")

    def read(self) -> Reading:
        """Bus and shunt voltage, current and power of the latest conversion; MeterOverflow when the
        chip flags overflow or the shunt input is at full scale."""
        bus_reg, shunt_reg = self._read(BUS), self._read(SHUNT, signed=True)
        self._check(bus_reg, shunt_reg)
        return Reading(bus_v=(bus_reg >> 3) * BUS_LSB_V, shunt_v=shunt_reg * SHUNT_LSB_V,
                       current_a=self._read(CURRENT, signed=True) * self.current_lsb_a,
                       power_w=self._read(POWER) * self.power_lsb_w)

    def power_w(self) -> float:
        """Power by the chip's own product of current and bus voltage (watts)."""
        bus_reg, shunt_reg = self._read(BUS), self._read(SHUNT, signed=True)
        self._check(bus_reg, shunt_reg)
        return self._read(POWER) * self.power_lsb_w

    def close(self) -> None:
        if self._owns_bus:
            self.bus.close()


class INA219Meter(Meter):
    """Board power from an INA219 on the supply line (sample rates up to ~900 Hz make sense)."""

    name = "ina219"

    def __init__(self, shunt_ohms: float = 0.1, max_current_a: float = 3.2, address: int = 0x40,
                 bus=None, bus_number: int = 1, **meter_options) -> None:
        self.chip = INA219(shunt_ohms, max_current_a, address, bus, bus_number)
        super().__init__(**meter_options)

    def _read(self) -> float:
        return self.chip.power_w()

    def _close_device(self) -> None:
        self.chip.close()


__all__ = ["INA219", "INA219Meter", "Reading"]
