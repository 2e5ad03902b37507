"""python -m bench.proctree INTERVAL CMD...: run CMD and print its wall seconds, peak RSS bytes and
CPU seconds, counting every process it starts.

The RSS of the whole process tree is summed and its CPU time taken from /proc
every INTERVAL seconds (a Ray cluster's processes included); the peak is at
least the command's own maximum RSS. The command's stdout is dropped; its
stderr is passed on. Used by the benchmarks through :func:`bench.e2e.measure`,
from a process of its own: a child's maximum RSS starts from its parent's at
the fork, so the parent must be small.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(root: int) -> dict[int, tuple[int, int]]:
    """{pid: (RSS bytes, CPU ticks)} of ``root`` and every process descended from it (from /proc)."""
    procs: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        # after the command name, fields[0] is the state; then ppid [1], utime [11], stime [12], rss in pages [21]
        procs[int(entry)] = (int(fields[1]), int(fields[21]) * _PAGE, int(fields[11]) + int(fields[12]))
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in out:
            out[pid] = procs[pid][1:]
            todo += [c for c, v in procs.items() if v[0] == pid]
    return out


def run(cmd: list[str], interval: float) -> tuple[float, int, float, int]:
    """(wall seconds, peak RSS bytes, CPU seconds, exit code) of ``cmd`` and everything it starts."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak, ticks = 0, {}
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        tree = _tree(p.pid)
        peak = max(peak, sum(r for r, _ in tree.values()))
        ticks.update({k: c for k, (_, c) in tree.items()})
        time.sleep(interval)
    dt = time.perf_counter() - t
    return dt, max(peak, usage.ru_maxrss * 1024), sum(ticks.values()) / _TICK, os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    dt, peak, cpu, code = run(argv[1:], float(argv[0]))
    if code:
        return code
    print(dt, peak, cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
