#!/usr/bin/env python3
"""First touches of freshly allocated huge pages, without QEMU or forkd.

Allocates N MiB of anonymous hugetlb memory (surplus pages; needs root, sets
vm.nr_overcommit_hugepages for the run and puts the old value back), writes
one byte per 2 MiB page (the allocation), then reads one byte per page twelve
times, 20 ms apart, and prints each pass in ms. Run it several times in a row
and after a pause: bench/results/branch.md explains what it showed on the
machine the branch benchmark ran on.

    sudo python3 bench/probes/hugetlb_first_touch.py [MiB] [runs] [gap_s]
"""
import mmap
import sys
import time

PAGE = 2 << 20
MAP_HUGETLB = 0x40000
KNOB = "/proc/sys/vm/nr_overcommit_hugepages"


def one_run(pages):
    m = mmap.mmap(-1, pages * PAGE,
                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
    try:
        t = time.perf_counter()
        for i in range(pages):
            m[i * PAGE] = 1
        alloc = time.perf_counter() - t
        passes = []
        for _ in range(12):
            t = time.perf_counter()
            s = 0
            for i in range(pages):
                s += m[i * PAGE]
            passes.append((time.perf_counter() - t) * 1e3)
            time.sleep(0.02)
        return alloc, passes
    finally:
        m.close()


def main():
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    gap = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    pages = mib // 2
    with open(KNOB) as f:
        old = f.read().strip()
    with open(KNOB, "w") as f:
        f.write(str(int(old) + pages))
    try:
        for r in range(runs):
            alloc, passes = one_run(pages)
            print(f"run {r}: allocating {mib} MiB {alloc:.2f} s; read passes (ms): "
                  + " ".join(f"{p:.1f}" for p in passes), flush=True)
            if r + 1 < runs:
                time.sleep(gap)
    finally:
        with open(KNOB, "w") as f:
            f.write(old)


if __name__ == "__main__":
    main()
