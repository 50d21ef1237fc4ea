#!/usr/bin/env python3
"""The most any storing NBD server on this machine can write: the same bytes a write workload sends, copied
into the served file by local threads, with no network, no protocol and no client. Prints MB/s.

Two shapes, matching the benchmark's write workloads:
  - `buffer`: each of N threads writes one 1 MiB buffer of random data over the whole file from offset 0,
    in 1 MiB steps (fio's sequential 1 MiB writes with N jobs: every job writes the whole file). One copy
    per byte, from a buffer in cache into the page cache.
  - `source SRC`: the file is split into N parts; each thread copies its part of SRC into the file in
    256 KiB requests through its own buffer (nbdcopy with N connections). Two copies per byte: the
    source's page cache into the buffer, the buffer into the file.

Usage: bench/store_ceiling.py FILE WRITERS buffer
       bench/store_ceiling.py FILE WRITERS source SRC
"""

import os
import sys
import threading
import time


def main() -> None:
    path, writers, shape = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    size = os.stat(path).st_size
    fd = os.open(path, os.O_WRONLY)
    if shape == "buffer":
        step = 1 << 20
        data = os.urandom(step)
        total = writers * (size // step) * step

        def run(_: int) -> None:
            for off in range(0, size - step + 1, step):
                os.pwrite(fd, data, off)

    elif shape == "source":
        src = os.open(sys.argv[4], os.O_RDONLY)
        step = 256 << 10
        part = size // writers // step * step
        total = writers * part

        def run(k: int) -> None:
            buf = bytearray(step)
            view = memoryview(buf)
            for off in range(k * part, (k + 1) * part, step):
                n = os.preadv(src, [view], off)
                os.pwrite(fd, view[:n], off)

    else:
        sys.exit(f"unknown shape {shape!r}: use buffer or source")
    # The threads copy with the interpreter lock released (pread/pwrite of large buffers), so N threads
    # run N copies at once; the clock starts when all of them are ready.
    ready = threading.Barrier(writers + 1)

    def thread(k: int) -> None:
        ready.wait()
        run(k)

    threads = [threading.Thread(target=thread, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    print(f"{total / 1e6 / (time.monotonic() - t0):.0f}")


if __name__ == "__main__":
    main()
