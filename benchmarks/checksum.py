"""Cost of the per-file checkpoint checksums (evolm_nemo.checkpoint.io.file_checksum): write a 1 GiB file of random
bytes (+ fsync), then checksum it three times with xxh3-64 (what checkpoints record) and zlib's CRC32 (the fallback).
The file is in the page cache, as a just-written checkpoint is when its commit record is made.

    .venv/bin/python benchmarks/checksum.py [path]

``path`` (default /tmp/evolm_checksum_1GiB.bin) is a scratch file this script creates and removes: an existing file
there is refused, never overwritten.
"""

import os
import sys
import time

from _args import Parser, main


def run() -> None:
    ap = Parser(__doc__)
    ap.add_argument("path", nargs="?", default="/tmp/evolm_checksum_1GiB.bin", help="the scratch file (must not exist)")
    path = ap.parse_args().path
    from evolm_nemo.checkpoint.io import file_checksum

    chunk = os.urandom(8 << 20)
    t = time.perf_counter()
    try:
        f = open(path, "xb")  # a file already there is someone's: never overwritten (and removed at the end)
    except OSError as exc:
        ap.error(f"{path}: {exc.strerror} (the scratch file must be new, in a writable directory)")
    try:  # the scratch file goes also when writing it fails or is interrupted
        with f:
            for _ in range(128):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        print(f"write+fsync 1 GiB: {time.perf_counter() - t:.2f} s")
        for algo in ("xxh3_64", "crc32"):
            times = []
            for _ in range(3):
                t = time.perf_counter()
                file_checksum(path, algo)
                times.append(time.perf_counter() - t)
            print(f"{algo}: " + ", ".join(f"{x:.2f}" for x in times) + f" s -> {1024 / min(times):.0f} MiB/s "
                  "(best of 3)")
    finally:
        os.remove(path)


if __name__ == "__main__":
    sys.exit(main(run))
