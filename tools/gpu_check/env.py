"""GPU check, the card itself: its exact name and variant, and its clocks and power while the sections run.

- :func:`card_identity`: ``torch.cuda.get_device_name`` and the SM count, plus ``nvidia-smi --query-gpu=name,
  power.limit,clocks.max.sm,clocks.sm,memory.total`` when nvidia-smi is there, and the variant they imply
  (H100 SXM / PCIe / NVL, H200 SXM / NVL, A100 SXM / PCIe): the variants differ in SMs, clocks, power and memory,
  so a number means little without it.
- :class:`ClockSampler`: one ``nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu
  -lms N`` process streaming samples for the whole run (line-buffered through ``stdbuf`` where it exists; each
  sample keeps nvidia-smi's own timestamp, so late delivery does not move it); :meth:`ClockSampler.window`
  summarises the samples of one section (min / median / max SM clock and power, max temperature), so a slow
  section can be told from a throttled card.
"""
from __future__ import annotations

import datetime
import shutil
import statistics
import subprocess
import threading
from typing import Optional

IDENTITY_FIELDS = ("name", "power.limit", "clocks.max.sm", "clocks.sm", "memory.total")
SAMPLE_FIELDS = ("timestamp", "clocks.sm", "clocks.mem", "power.draw", "temperature.gpu")


def _number(text: str):
    try:
        return float(text.strip().split()[0])
    except (ValueError, IndexError):
        return None


def nvidia_smi(fields: tuple, index: int) -> dict:
    """{field: value} from one nvidia-smi query (numbers as floats); fields it refuses come back as None."""
    if shutil.which("nvidia-smi") is None:
        return {"unavailable": "nvidia-smi not found"}
    out = {}
    for field in fields:  # one query per field: a field this driver does not know fails only itself
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", str(index)],
                              capture_output=True, text=True, timeout=30)
        text = proc.stdout.strip() if proc.returncode == 0 else ""
        out[field] = (text or None) if field == "name" else _number(text)
    return out


def variant(name: str, sm_count: int, power_limit_w: Optional[float]) -> str:
    """The card variant from its name, SM count and power limit (the names alone do not always say SXM)."""
    upper = name.upper()
    if "GH200" in upper:
        return "GH200"
    if "H200" in upper:
        return "H200 NVL" if "NVL" in upper or (power_limit_w or 700) <= 600 else "H200 SXM"
    if "H100" in upper:
        if "NVL" in upper:
            return "H100 NVL"
        if "PCIE" in upper or sm_count == 114:
            return "H100 PCIe"
        return "H100 SXM" if sm_count == 132 else f"H100 ({sm_count} SMs)"
    if "A100" in upper:
        return "A100 PCIe" if "PCIE" in upper or (power_limit_w or 400) < 400 else "A100 SXM"
    return name


def card_identity(torch, device) -> dict:
    """Exact card: names, SMs, memory, power limit, clocks and the variant they imply."""
    props = torch.cuda.get_device_properties(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    smi = nvidia_smi(IDENTITY_FIELDS, index)
    return {"torch_name": torch.cuda.get_device_name(device), "sm_count": props.multi_processor_count,
            "capability": f"sm_{props.major}{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
            "nvidia_smi": smi,
            "variant": variant(smi.get("name") or props.name, props.multi_processor_count, smi.get("power.limit"))}


def parse_sample(line: str) -> Optional[tuple]:
    """One line of the sampler's CSV output -> (epoch seconds, {field: float}); None for a line that is not a
    sample."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(SAMPLE_FIELDS):
        return None
    try:
        stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return None
    values = [_number(p) for p in parts[1:]]
    return None if all(v is None for v in values) else (stamp, dict(zip(SAMPLE_FIELDS[1:], values)))


def summarise(samples: list) -> dict:
    """min / median / max SM clock and power and max temperature of (time, sample) pairs."""
    out: dict = {"samples": len(samples)}
    for field, key in (("clocks.sm", "sm_mhz"), ("power.draw", "power_w"), ("clocks.mem", "mem_mhz")):
        vals = [s[field] for _, s in samples if s.get(field) is not None]
        if vals:
            out[key] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
    temps = [s["temperature.gpu"] for _, s in samples if s.get("temperature.gpu") is not None]
    if temps:
        out["max_temperature_c"] = max(temps)
    return out


class ClockSampler:
    """Streams clock / power samples from nvidia-smi in the background for the whole run."""

    def __init__(self, index: int, interval_ms: int = 250):
        self.samples: list = []
        self.reason: Optional[str] = None
        self._proc = None
        if shutil.which("nvidia-smi") is None:
            self.reason = "nvidia-smi not found"
            return
        line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        self._proc = subprocess.Popen(
            line_buffered + ["nvidia-smi", f"--query-gpu={','.join(SAMPLE_FIELDS)}", "--format=csv,noheader,nounits",
                             "-lms", str(interval_ms), "-i", str(index)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            sample = parse_sample(line)
            if sample is not None:
                self.samples.append(sample)

    def window(self, t0: float, t1: float) -> dict:
        """Summary of the samples taken between epoch seconds t0 and t1."""
        if self.reason:
            return {"unavailable": self.reason}
        return summarise([(t, s) for t, s in list(self.samples) if t0 <= t <= t1])

    def stop(self) -> None:
        """Ends nvidia-smi and waits for the samples it had written."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._thread.join(timeout=10)
