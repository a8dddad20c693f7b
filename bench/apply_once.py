"""Child process for figure 2: one apply of an S3 artifact through `deployer.apply.Applier`, nothing else.

Run as its own process so the parent can read this apply's peak RSS and CPU with wait4.
Prints one JSON line: the time spent inside `Applier.apply` (the rest of the wall is interpreter start).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", required=True)
    parser.add_argument("--sha256", required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--release-id", required=True)
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    from deployer import logs
    from deployer.agent.memory import release_free_memory
    from deployer.apply.engine import Applier
    from deployer.aws.clients import make_clients
    from deployer.protocol.manifest import Manifest, SyncStrategy

    logs.configure(json=True, level="warning")  # logs to stderr; stdout carries only the result
    clients = make_clients()
    manifest = Manifest(
        src=args.src, checksum=args.sha256, dest="/opt/bench/current", sync_strategy=SyncStrategy.SYMLINK
    )
    applier = Applier(s3=clients.s3, root_dir=args.root)
    # As an agent does once booted (deployer.agent.loop): what the imports and the clients' models
    # left behind is collected and handed back, so the peak is an agent's during an apply.
    release_free_memory(freeze=True)
    imported = time.perf_counter()
    if args.profile:
        profiler = cProfile.Profile()
        threads = _profile_every_thread()
        profiler.enable()
    applier.apply(manifest, args.release_id, env={})
    if args.profile:
        profiler.disable()
        stats = pstats.Stats(profiler)
        for other in threads:
            stats.add(other)
        stats.dump_stats(f"{args.profile}.prof")
        with open(args.profile, "w") as out:
            stats.stream = out  # type: ignore[attr-defined]
            stats.sort_stats("cumulative").print_stats(25)
            stats.sort_stats("tottime").print_stats(15)
    done = time.perf_counter()
    json.dump({"setup_s": imported - started, "apply_s": done - imported}, sys.stdout)


def _profile_every_thread() -> list[cProfile.Profile]:
    """A profiler in every thread started from now on (cProfile sees only the thread that enabled
    it, and the apply's download, decompression and file writes run in threads of their own)."""
    profiles: list[cProfile.Profile] = []
    run = threading.Thread.run

    def profiled_run(thread: threading.Thread) -> None:
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()
        try:
            run(thread)
        finally:
            profile.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign, assignment]
    return profiles


if __name__ == "__main__":
    main()
