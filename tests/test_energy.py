"""Energy meters: the INA219 driver against an emulated chip, the sysfs meters on fake trees, phases, CSV."""
import csv
import json
import threading

import pytest

from edge_client.energy import CSV_COLUMNS, EnergyError, MeterOverflow, open_meter
from edge_client.energy.ina219 import CALIBRATION, CONFIG, INA219

R_SHUNT = 0.1


class EmulatedINA219:
    """An INA219 behind smbus2's block calls, computing its registers from the physical inputs
    (`bus_v` at IN-, `current_a` through the shunt) and the configuration and calibration written to
    it, as the datasheet (SBOS448, 8.5 and 8.6) says: the shunt ADC saturates at the PGA range, bit 0
    of the calibration register is void, Current = Shunt * Cal / 4096, Power = |Current| * Bus / 5000,
    and OVF is set when either result leaves its register."""

    def __init__(self, shunt_ohms: float = R_SHUNT, address: int = 0x40) -> None:
        self.shunt_ohms, self.address = shunt_ohms, address
        self.config, self.calibration = 0x399F, 0  # power-on values
        self.bus_v = self.current_a = 0.0

    def write_i2c_block_data(self, address, register, data):
        assert address == self.address and len(data) == 2
        value = data[0] << 8 | data[1]
        if register == CONFIG:
            self.config = value & 0x7FFF
        elif register == CALIBRATION:
            self.calibration = value & 0xFFFE
        else:
            raise OSError(f"register {register} is read-only")

    def read_i2c_block_data(self, address, register, length):
        assert address == self.address and length == 2
        value = self.registers()[register]
        return [value >> 8, value & 0xFF]

    def registers(self):
        full_scale = 4000 << ((self.config >> 11) & 3)  # 40, 80, 160, 320 mV in 10 uV steps
        shunt = max(-full_scale, min(full_scale, round(self.current_a * self.shunt_ohms / 10e-6)))
        bus = max(0, min(0x1FFF, round(self.bus_v / 4e-3)))
        current = int(shunt * self.calibration / 4096)  # truncates toward zero
        power = int(abs(current) * bus / 5000)
        overflow = not -32768 <= current <= 32767 or power > 0xFFFF
        current, power = max(-32768, min(32767, current)), min(0xFFFF, power)
        return {0: self.config, 1: shunt & 0xFFFF, 2: bus << 3 | 0x2 | int(overflow), 3: power,
                4: current & 0xFFFF, 5: self.calibration}


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def ina219_meter(tmp_path=None, max_current_a=3.2, **options):
    chip, clock = EmulatedINA219(), Clock()
    meter = open_meter("ina219", shunt_ohms=R_SHUNT, max_current_a=max_current_a, bus=chip, clock=clock,
                       rate_hz=0, csv_path=tmp_path / "energy.csv" if tmp_path else None, **options)
    return meter, chip, clock


def drive(meter, chip, clock, current, t1, dt=0.01):
    """Advance the clock to t1 in steps of about dt, setting the chip's current from `current(t)` and
    sampling after each step."""
    t0, steps = clock.t, round((t1 - clock.t) / dt)
    for k in range(1, steps + 1):
        clock.t = t0 + (t1 - t0) * k / steps
        chip.current_a = current(clock.t)
        meter.sample()


# --- INA219 ---------------------------------------------------------------------------------------
def test_ina219_writes_the_datasheet_calibration_and_range():
    chip = EmulatedINA219()
    driver = INA219(shunt_ohms=0.1, max_current_a=3.2, bus=chip)
    assert chip.calibration == driver.calibration == 4194  # trunc(0.04096 / (3.2/32768 * 0.1))
    assert (chip.config >> 11) & 3 == 3 and chip.config >> 13 & 1  # +-320 mV shunt, 32 V bus
    assert driver.power_lsb_w == pytest.approx(20 * 3.2 / 32768, rel=1e-3)
    small = EmulatedINA219()
    INA219(shunt_ohms=0.1, max_current_a=0.4, bus=small)  # 40 mV at most: the finest PGA range
    assert (small.config >> 11) & 3 == 0 and small.calibration == int(0.04096 / (0.4 / 32768 * 0.1))


def test_ina219_converts_with_the_calibration_the_chip_keeps_when_bit0_is_dropped():
    chip = EmulatedINA219(shunt_ohms=0.01)
    driver = INA219(shunt_ohms=0.01, max_current_a=10.0, bus=chip)
    assert driver.calibration == 13421 and chip.calibration == 13420
    chip.bus_v, chip.current_a = 12.0, 7.5
    reading = driver.read()
    assert reading.current_a == pytest.approx(7.5, rel=1e-3)
    assert reading.power_w == pytest.approx(90.0, rel=1e-3)


def test_ina219_reads_negative_shunt_voltage_and_current():
    chip = EmulatedINA219()
    driver = INA219(shunt_ohms=R_SHUNT, max_current_a=3.2, bus=chip)
    chip.bus_v, chip.current_a = 5.0, -1.5
    assert chip.registers()[1] == 0x10000 - 15000  # two's complement on the wire
    reading = driver.read()
    assert reading.shunt_v == pytest.approx(-0.15)
    assert reading.current_a == pytest.approx(-1.5, rel=1e-3)
    assert reading.power_w == pytest.approx(7.5, rel=1e-3)  # the power register holds magnitudes


def test_ina219_bus_voltage_drops_the_status_bits():
    chip = EmulatedINA219()
    driver = INA219(bus=chip)
    chip.bus_v, chip.current_a = 12.34, 1.0
    assert chip.registers()[2] & 0x2  # conversion ready is set in the emulated register
    assert driver.read().bus_v == pytest.approx(12.34, abs=4e-3)


def test_ina219_math_overflow_raises_instead_of_returning_garbage():
    chip = EmulatedINA219()
    driver = INA219(shunt_ohms=R_SHUNT, max_current_a=2.0, bus=chip)  # PGA 320 mV, Cal for 2 A
    chip.bus_v, chip.current_a = 5.0, 2.5  # the current register would need 40954
    assert chip.registers()[2] & 0x1
    with pytest.raises(MeterOverflow, match="overflow"):
        driver.power_w()


def test_ina219_saturated_shunt_raises():
    chip = EmulatedINA219()
    driver = INA219(shunt_ohms=R_SHUNT, max_current_a=3.2, bus=chip)
    chip.bus_v, chip.current_a = 5.0, 4.0  # 400 mV across the shunt, beyond the 320 mV range
    assert not chip.registers()[2] & 0x1  # the chip does not flag this one itself
    with pytest.raises(MeterOverflow, match="saturated"):
        driver.read()


def test_ina219_rejects_a_shunt_drop_beyond_its_input_range():
    with pytest.raises(ValueError, match="320 mV"):
        INA219(shunt_ohms=0.1, max_current_a=5.0, bus=EmulatedINA219())


def test_ina219_ramp_and_steps_integrate_to_the_analytic_energy():
    meter, chip, clock = ina219_meter()
    chip.bus_v = 5.0
    chip.current_a = 0.5
    meter.start()
    with meter.phase("train") as train:  # 0.5 A -> 2.5 A over 10 s at 5 V: 5 * (0.5*10 + 0.1*10^2) = 75 J
        start = clock.t
        drive(meter, chip, clock, lambda t: 0.5 + 0.2 * (t - start), start + 10, dt=0.1)
    with meter.phase("upload") as upload:  # 1 A for 3 s, then 2 A for 2 s: 5 * (3 + 4) = 35 J
        start = clock.t
        drive(meter, chip, clock, lambda t: 1.0 if t - start <= 3 else 2.0, start + 5, dt=0.01)
    assert train.seconds == pytest.approx(10) and upload.seconds == pytest.approx(5)
    assert train.joules == pytest.approx(75, rel=0.01)
    assert upload.joules == pytest.approx(35, rel=0.01)
    assert train.ok and upload.ok
    totals = meter.totals()
    assert list(totals) == ["train", "upload"] and totals["train"].joules == train.joules


def test_overflowed_samples_are_skipped_and_flag_the_phase(tmp_path):
    meter, chip, clock = ina219_meter(tmp_path, max_current_a=2.0)
    chip.bus_v, chip.current_a = 5.0, 1.0
    meter.start()
    with meter.phase("train") as train:
        drive(meter, chip, clock, lambda t: 1.0, clock.t + 1)
        drive(meter, chip, clock, lambda t: 3.0, clock.t + 1)  # overflows: not integrated
        drive(meter, chip, clock, lambda t: 1.0, clock.t + 1)
    meter.close()
    assert not train.ok and train.read_errors == 100
    assert train.joules == pytest.approx(15.0, rel=0.01)  # 5 W bridged across the gap, never 15 W
    rows = list(csv.DictReader(open(tmp_path / "energy.csv")))
    assert sum("overflow" in r["error"] for r in rows) == 100
    assert rows[-1]["event"] == "phase" and rows[-1]["error"] == "100 failed reads"


# --- sysfs meters ---------------------------------------------------------------------------------
def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text}\n")


def jetpack4_tree(root):
    d = root / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for n, (rail, mw) in enumerate([("POM_5V_IN", 4000), ("POM_5V_GPU", 500), ("POM_5V_CPU", 1200)]):
        write(d / f"rail_name_{n}", rail)
        write(d / f"in_power{n}_input", mw)
        write(d / f"in_current{n}_input", mw // 5)
        write(d / f"in_voltage{n}_input", 5000)
    return d


def jetpack5_tree(root):
    d = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    for n, (rail, mv, ma) in enumerate([("VDD_IN", 5000, 1200), ("VDD_CPU_GPU_CV", 5000, 300),
                                        ("VDD_SOC", 5000, 200)], start=1):
        write(d / f"in{n}_label", rail)
        write(d / f"in{n}_input", mv)
        write(d / f"curr{n}_input", ma)
        write(d / f"in{n + 3}_input", 12)  # shunt voltages: no label, no current
    write(d / "name", "ina3221")
    return d


def test_ina3221_jetpack4_iio_layout_reads_the_input_rail_in_milliwatts(tmp_path):
    jetpack4_tree(tmp_path)
    clock = Clock()
    meter = open_meter("ina3221", root=tmp_path, clock=clock, rate_hz=0)
    assert [r.name for r in meter.rails] == ["POM_5V_IN"]
    meter.start()
    with meter.phase("train") as train:
        clock.t += 2.5
    assert train.joules == pytest.approx(10.0)
    chosen = open_meter("ina3221", root=tmp_path, rails=["POM_5V_GPU", "POM_5V_CPU"], rate_hz=0)
    assert chosen.sample() == 0 and chosen._read() == pytest.approx(1.7)


def test_ina3221_jetpack5_hwmon_layout_multiplies_millivolts_by_milliamps(tmp_path):
    d = jetpack5_tree(tmp_path)
    clock = Clock()
    meter = open_meter("ina3221", root=tmp_path, clock=clock, rate_hz=0)
    assert [r.name for r in meter.rails] == ["VDD_IN"]
    meter.start()
    with meter.phase("encode") as encode:
        clock.t += 1.0
        write(d / "curr1_input", 1800)  # 6 W -> 9 W: the trapezoid gives 7.5 J over the second
        meter.sample()
    assert encode.joules == pytest.approx(7.5)
    with pytest.raises(EnergyError, match="VDD_SOC"):  # names what the board has
        open_meter("ina3221", root=tmp_path, rails=["POM_5V_GPU"])


def test_ina3221_missing_names_both_layouts(tmp_path):
    with pytest.raises(EnergyError, match="ina3221x.*ina3221/"):
        open_meter("ina3221", root=tmp_path)


def rapl_tree(root, energy_uj, range_uj=1_000_000):
    d = root / "sys/class/powercap/intel-rapl:0"
    write(d / "max_energy_range_uj", range_uj)
    write(d / "energy_uj", energy_uj)
    return d / "energy_uj"


def test_rapl_unwraps_the_counter_at_max_energy_range(tmp_path):
    counter = rapl_tree(tmp_path, 900_000)
    clock = Clock()
    meter = open_meter("rapl", root=tmp_path, clock=clock, rate_hz=0)
    meter.start()
    with meter.phase("train") as train:
        for t, uj in [(1, 950_000), (2, 50_000), (3, 300_000)]:  # wraps between the first two
            write(counter, uj)
            clock.t += 1
            meter.sample()
    assert train.joules == pytest.approx(0.4)
    assert train.seconds == pytest.approx(3)


def test_rapl_missing_names_the_path(tmp_path):
    with pytest.raises(EnergyError, match="no RAPL.*intel-rapl:0/energy_uj"):
        open_meter("rapl", root=tmp_path)


# --- the meter itself -----------------------------------------------------------------------------
def test_null_meter_times_phases_at_zero_joules_without_a_thread():
    clock = Clock()
    with open_meter("none", clock=clock) as meter:
        assert meter._thread is None
        with meter.phase("download") as download:
            clock.t += 4.0
        with meter.phase("download"):
            clock.t += 1.0
    assert download.seconds == 4.0 and download.joules == 0.0
    assert meter.totals()["download"].seconds == 5.0
    assert meter.totals(reset=True) and meter.totals() == {}


def test_csv_holds_every_sample_and_phase(tmp_path):
    jetpack4_tree(tmp_path)
    clock = Clock()
    path = tmp_path / "energy.csv"
    with open_meter("ina3221", root=tmp_path, clock=clock, rate_hz=0, csv_path=path) as meter:
        for name in ("download", "train", "encode", "upload"):
            with meter.phase(name):
                clock.t += 0.5
                meter.sample()
                clock.t += 0.5
    rows = list(csv.DictReader(open(path)))
    assert tuple(rows[0]) == CSV_COLUMNS
    phases = [r for r in rows if r["event"] == "phase"]
    assert [r["phase"] for r in phases] == ["download", "train", "encode", "upload"]
    assert all(float(r["energy_j"]) == pytest.approx(4.0) and float(r["seconds"]) == 1.0 for r in phases)
    samples = [r for r in rows if r["event"] == "sample"]
    assert len(samples) == 1 + 4 * 3 and float(samples[-1]["energy_j"]) == pytest.approx(16.0)
    assert float(samples[-1]["t_s"]) == pytest.approx(4.0)


def test_background_thread_samples_between_phase_boundaries(tmp_path):
    jetpack4_tree(tmp_path)
    meter = open_meter("ina3221", root=tmp_path, rate_hz=200)
    enough = threading.Event()
    sample = meter.sample

    def counting_sample():
        energy = sample()
        if threading.current_thread() is meter._thread:
            enough.set()
        return energy

    meter.sample = counting_sample
    with meter:
        with meter.phase("train") as train:
            assert enough.wait(timeout=30)  # a bound on a hung thread, not a timing assertion
    assert meter._thread is None  # joined on exit
    assert train.joules == pytest.approx(4.0 * train.seconds, rel=1e-9)


def test_open_meter_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="known meters: none, rapl, ina219, ina3221"):
        open_meter("joulescope")
    with pytest.raises(ValueError, match="no option shunt_ohms"):
        open_meter("rapl", shunt_ohms=0.1)


# --- deltamask-energy -----------------------------------------------------------------------------
def test_energy_table_prints_every_filter_codec_and_says_energy_was_not_measured(capsys, tmp_path):
    from edge_client.energy_table import main
    assert main(["--entries", "2000", "--json", str(tmp_path / "t.json"), "--csv", str(tmp_path / "e.csv")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "codec" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["xor8", "xor16", "bfuse8", "bfuse16"]
    assert "N = 2,000 entries, d = 200,000" in out and "BFuse8 / Xor8, same run" in out
    assert "Energy not measured (--meter none)" in out
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [r["codec"] for r in saved["rows"]] == ["xor8", "xor16", "bfuse8", "bfuse16"] and saved["d"] == 200_000


def test_energy_table_rejects_a_meter_this_machine_lacks(capsys, monkeypatch, tmp_path):
    from edge_client import energy_table
    real = energy_table.open_meter
    monkeypatch.setattr(energy_table, "open_meter", lambda name, **kw: real(name, root=tmp_path, **kw))
    with pytest.raises(SystemExit) as stop:
        energy_table.main(["--entries", "100", "--meter", "rapl"])
    assert stop.value.code == 2 and "intel-rapl:0/energy_uj does not exist" in capsys.readouterr().err
