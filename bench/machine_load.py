"""What the benchmarks read off this Linux machine: RSS and its peak, and CPU time of this and other processes.

Used by bench/step.py to measure peak memory per cell and to tell quiet steps (no other process on the
CPUs) from contended ones.
"""

from __future__ import annotations

import os
import re
import resource
import time


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(reset_worked: bool) -> int:
    if reset_worked:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_jiffies() -> tuple[int, int]:
    """Busy clock ticks so far of the whole machine (hypervisor steal included) and of this process (all threads)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields from the 3rd on; utime and stime are the 14th, 15th
    return user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])


def timed(step) -> tuple[float, float]:
    """Run ``step``; return its wall seconds and the CPU cores other processes used meanwhile."""
    machine_before, own_before = cpu_jiffies()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    machine_after, own_after = cpu_jiffies()
    foreign = (machine_after - machine_before) - (own_after - own_before)
    return seconds, max(foreign, 0) / os.sysconf("SC_CLK_TCK") / seconds


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            match = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


def machine_busy_cores(seconds: float = 1.0) -> float:
    """CPU cores the machine's processes (other than this idle parent) keep busy, averaged over ``seconds``."""
    machine_before, _ = cpu_jiffies()
    time.sleep(seconds)
    machine_after, _ = cpu_jiffies()
    return (machine_after - machine_before) / os.sysconf("SC_CLK_TCK") / seconds
