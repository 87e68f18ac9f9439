"""The meter every backend shares: background sampling, integration to joules, phases, the CSV log.

A backend answers one question. A power meter (INA219, INA3221, the null meter) reads the power now,
in watts, and the meter integrates those samples with the trapezoid rule; a counter meter (RAPL)
reads a cumulative energy counter, in joules, and the meter takes differences. A phase samples at
its start and at its end, so its energy is the integral over exactly its own interval; the
background thread fills in the samples between.
"""
import csv
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

log = logging.getLogger(__name__)
CSV_COLUMNS = ("t_s", "event", "phase", "power_w", "energy_j", "seconds", "error")


class EnergyError(RuntimeError):
    """A meter that cannot be opened or read: a missing device or file, no permission, a bad reading."""


class MeterOverflow(EnergyError):
    """The sensor's range was exceeded (INA219 math overflow or a saturated shunt): the reading is
    meaningless, so it is dropped rather than integrated."""


@dataclass
class Phase:
    """Energy and time of one named phase (or the sum of several phases of the same name)."""

    name: str
    seconds: float = 0.0
    joules: float = 0.0
    read_errors: int = 0  # failed or overflowed reads inside the phase: its joules bridge those gaps

    @property
    def mean_w(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.read_errors == 0


class Meter:
    """Samples a power source at `rate_hz` in a background thread (between `start()` and `close()`,
    or inside `with meter:`), integrates it to joules and books it by phase:

        with open_meter("ina219", csv_path="energy.csv") as meter:
            with meter.phase("train") as train:
                ...
            train.joules, meter.totals()["train"].joules

    `clock` (seconds, monotonic) is a parameter so tests can drive time; `rate_hz` = 0 samples only
    at phase boundaries (enough for a counter meter, not for a power meter).
    """

    name = "none"
    counter = False  # True: `_read` returns cumulative joules; False: watts now

    def __init__(self, rate_hz: float = 10.0, csv_path: Optional[Union[str, Path]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_hz < 0:
            raise ValueError(f"rate_hz must be >= 0, got {rate_hz}")
        self.rate_hz, self.clock = rate_hz, clock
        self.read_errors = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._totals: Dict[str, Phase] = {}
        self._file = open(csv_path, "w", newline="") if csv_path else None
        self._csv = csv.writer(self._file) if self._file else None
        if self._csv:
            self._csv.writerow(CSV_COLUMNS)
        self._t0 = self._t = clock()
        self._energy_j = 0.0  # integrated since the meter opened
        self._power_w = 0.0
        self._last_j = 0.0  # a counter meter's last reading
        self._started = False  # a good sample taken: integration has a left end

    # --- what a backend implements -----------------------------------------------------------------
    def _read(self) -> float:
        """Watts now (a power meter) or cumulative joules (a counter meter); EnergyError if unreadable."""
        return 0.0

    def _close_device(self) -> None:
        """Release the device (an I2C bus, say)."""

    # --- sampling -----------------------------------------------------------------------------------
    def sample(self) -> float:
        """Read the device once and integrate up to now. Returns joules since the meter opened.

        A failed read (EnergyError, MeterOverflow included) is logged and counted in `read_errors`,
        and skipped: the next good sample bridges the gap, and phases spanning it say so.
        """
        return self._sample()[1]

    def _sample(self) -> Tuple[float, float]:
        """(clock time of the read, joules since the meter opened up to the last good sample)."""
        with self._lock:
            t = self.clock()
            try:
                value = self._read()
            except EnergyError as exc:
                self.read_errors += 1
                if self.read_errors == 1 or self.read_errors % 100 == 0:
                    log.warning("%s meter: %s (%d failed reads so far)", self.name, exc, self.read_errors)
                self._write(t, "sample", "", "", "", "", str(exc))
                return t, self._energy_j
            dt = t - self._t
            if self.counter:  # value: cumulative joules
                step = value - self._last_j if self._started else 0.0
                self._last_j, power = value, step / dt if dt > 0 else self._power_w
            else:  # value: watts; trapezoid from the previous good sample
                step = 0.5 * (self._power_w + value) * dt if self._started else 0.0
                power = value
            self._energy_j += step
            self._power_w, self._t, self._started = power, t, True
            self._write(t, "sample", "", f"{self._power_w:.6g}", f"{self._energy_j:.9g}", "", "")
            return t, self._energy_j

    def start(self) -> "Meter":
        """Take a first sample and begin sampling in the background (if `rate_hz` > 0)."""
        self.sample()
        if self.rate_hz > 0 and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"energy-{self.name}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        while not self._stop.wait(period):
            try:
                self.sample()
            except Exception:  # a backend bug must not end sampling silently
                log.exception("%s meter: sampling failed", self.name)

    def close(self) -> None:
        """Stop sampling, flush the CSV, release the device. Safe to call twice."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._file:
                self._file.close()
                self._file = self._csv = None
            self._close_device()

    def __enter__(self) -> "Meter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- phases -------------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        """Book the energy between entering and leaving to phase `name`; the yielded Phase is filled
        in on exit (also when the body raises). Phases may overlap; each sees the whole device."""
        result = Phase(name)
        err0 = self.read_errors
        t0, e0 = self._sample()
        try:
            yield result
        finally:
            t1, e1 = self._sample()
            with self._lock:
                result.seconds, result.joules = t1 - t0, e1 - e0
                result.read_errors = self.read_errors - err0
                total = self._totals.setdefault(name, Phase(name))
                total.seconds += result.seconds
                total.joules += result.joules
                total.read_errors += result.read_errors
                self._write(t1, "phase", name, f"{result.mean_w:.6g}", f"{result.joules:.9g}",
                            f"{result.seconds:.6f}", f"{result.read_errors} failed reads" if result.read_errors else "")
                if self._file:
                    self._file.flush()

    def totals(self, reset: bool = False) -> Dict[str, Phase]:
        """Joules and seconds summed by phase name (since the last reset), in first-seen order."""
        with self._lock:
            out = {k: Phase(v.name, v.seconds, v.joules, v.read_errors) for k, v in self._totals.items()}
            if reset:
                self._totals.clear()
            return out

    @property
    def energy_j(self) -> float:
        """Joules integrated since the meter opened (up to the last sample)."""
        return self._energy_j

    def _write(self, t: float, *fields: str) -> None:
        if self._csv:
            self._csv.writerow((f"{t - self._t0:.6f}",) + fields)


class NullMeter(Meter):
    """No energy sensor: every phase reads 0 J but still gets its seconds. Never starts a thread."""

    name = "none"

    def start(self) -> "Meter":
        self.sample()
        return self
