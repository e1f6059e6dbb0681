"""Where a batched transition's CPU goes: `execute_transitions` of 500 users' transitions.

    python -m benchmarks.batch_profile [--url URL] [--ops N] [--live] [--profile] [--stages]
                                       [--starts]

Without `--live` the store runs without live projections, so the figure is the command path
alone (checks, decisions, events, encoding and sealing, the insert); with it, the live
projector's work until `sync_projections()` returns counts too (as in scenario 2).
`--profile` prints a cProfile table (which slows the path about twofold), `--stages` the time per
stage of the write path and the projector (`benchmarks.stages`, wall µs per transition, every
thread); `--starts` makes every transition of the first batch start its user's flow (scenario 2
resets the users first).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import pstats
import tempfile
import time

from benchmarks.scenarios import PAYLOAD, _started_store
from benchmarks.stages import Stages


class _CollectorTime:
    """CPU time the cyclic garbage collector takes (in the thread it runs on) until `stop()`."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self._began = 0.0
        gc.callbacks.append(self._tell)

    def _tell(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.thread_time()
        else:
            self.cpu += time.thread_time() - self._began

    def stop(self) -> None:
        """Stop counting."""
        gc.callbacks.remove(self._tell)


def main() -> None:
    """Run the batches and print CPU and wall µs per transition (and the profile, if asked)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="a database URL (default: a fresh SQLite file)")
    parser.add_argument("--ops", type=int, default=5000, help="transitions, in batches of 500")
    parser.add_argument("--live", action="store_true", help="live projections on")
    parser.add_argument("--profile", action="store_true", help="print a cProfile table")
    parser.add_argument("--stages", action="store_true", help="print the time per stage")
    parser.add_argument("--starts", action="store_true", help="users without a state at first")
    args = parser.parse_args()
    url = args.url or f"sqlite:///{tempfile.mkdtemp()}/batch.db"
    users = [f"user-{i}" for i in range(500)]
    store = _started_store(url, [] if args.starts else users, live_projections=args.live)
    warm = [(u, "loop", "tick", PAYLOAD) for u in users]
    if not args.starts:
        store.execute_transitions(warm)  # caches warm, as after the first batch of scenario 2
    store.sync_projections()
    profiler = cProfile.Profile(time.thread_time) if args.profile else None
    stages = Stages() if args.stages else None
    timing = stages.active(store) if stages is not None else contextlib.nullcontext()
    timing.__enter__()
    collections = _CollectorTime()
    cpu, wall, own = time.process_time(), time.perf_counter(), time.thread_time()
    if profiler is not None:
        profiler.enable()
    for _ in range(args.ops // 500):
        results = store.execute_transitions([(u, "loop", "tick", PAYLOAD) for u in users])
        assert not any(isinstance(r, Exception) for r in results), results[:3]
    store.sync_projections()
    if profiler is not None:
        profiler.disable()
    own = time.thread_time() - own
    timing.__exit__(None, None, None)
    done = args.ops // 500 * 500
    cpu_us = (time.process_time() - cpu) / done * 1e6
    wall_us = (time.perf_counter() - wall) / done * 1e6
    collections.stop()
    print(f"{done} transitions: {cpu_us:.1f} CPU µs, {wall_us:.1f} wall µs per transition")
    print(
        f"  of which this thread (the commands) {own / done * 1e6:.1f}, the other threads (the"
        f" live projector) {cpu_us - own / done * 1e6:.1f}; the cyclic garbage collector"
        f" {collections.cpu / done * 1e6:.1f} (in any thread)"
    )
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
    if stages is not None:
        print(stages.table(done, wall_us * done / 1e6, cpu_us * done / 1e6))
    store.close()


if __name__ == "__main__":
    main()
