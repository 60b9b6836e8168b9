#!/usr/bin/env python3
"""What a full garbage collection costs regproxy's reactor after start-up.

Usage, from a venv with regproxy installed::

    .venv/bin/python bench/gcpause.py [--rounds N]

A full (generation 2) collection stops every thread, the reactor's too, for
as long as it takes to walk every object the collector tracks.  This starts
regproxy's services in this process as ``twistd regproxy`` does
(``makeService`` on the global reactor, which freezes the start-up heap) on
an empty cache in a temporary directory, and times ``gc.collect()`` (the
least of ``--rounds``) as shipped, then with the heap unfrozen again (as
before), and prints both and their ratio.  Nothing is served or fetched.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def collect_ms(rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from registryproxy.tap import Options, makeService

    root = tempfile.mkdtemp(prefix="regproxy-gcpause-")
    try:
        config = os.path.join(root, "regproxy.yaml")
        with open(config, "w") as f:
            json.dump(
                {
                    "cache": {"directory": os.path.join(root, "cache")},
                    "proxy": {"listen": "tcp:0:interface=127.0.0.1"},
                    "admin": {"listen": "tcp:0:interface=127.0.0.1"},
                },
                f,
            )
        options = Options()
        options.parseOptions(["--config", config])
        service = makeService(options)
        frozen = gc.get_freeze_count()
        shipped = collect_ms(args.rounds)
        gc.unfreeze()
        tracked = len(gc.get_objects())
        unfrozen = collect_ms(args.rounds)
        del service
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"objects frozen at start-up: {frozen:,} (tracked once unfrozen: {tracked:,})")
    print(f"full collection, start-up heap frozen (shipped): {shipped:8.3f} ms")
    print(f"full collection, start-up heap unfrozen:         {unfrozen:8.3f} ms")
    print(f"frozen / unfrozen: {shipped / unfrozen:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
