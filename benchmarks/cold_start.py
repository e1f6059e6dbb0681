"""Cold start of the `flowstore` command: `--help` and a simple read, as a user's shell runs them.

    python -m benchmarks.cold_start [--runs N]

Each run is a fresh interpreter (`python -m flowstore.adapters.cli`, what the console script
calls), so it pays every import. Prints the median and the best of N runs in seconds, and the
interpreter's own start (`python -c pass`) as the floor. Target (issue 16): `--help` under 0.3 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELP_TARGET_SECONDS = 0.3


def _time(argv: list[str], env: dict[str, str], runs: int) -> tuple[float, float]:
    """Median and best wall time of `runs` fresh processes running `argv`."""
    seconds = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True)
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), min(seconds)


def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit 1 when `--help` misses its target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cli = [sys.executable, "-m", "flowstore.adapters.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/cold.db"
        flow = Path(tmp) / "flow.json"
        flow.write_text(
            '{"flow": "f", "initialStep": "a", "steps": {'
            '"a": {"index": 0, "step": "a", "service": "s", "transitions": '
            '{"go": {"transition": "go", "step": "b"}}},'
            '"b": {"index": 1, "step": "b", "service": "s"}}}',
            encoding="utf-8",
        )
        subprocess.run([*cli, "--url", url, "flows", "create", str(flow)], env=env, check=True,
                       capture_output=True)  # fmt: skip
        subprocess.run([*cli, "--url", url, "transition", "ann", "f", "go"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        rows = [
            ("python -c pass (floor)", [sys.executable, "-c", "pass"]),
            ("flowstore --help", [*cli, "--help"]),
            ("flowstore state get", [*cli, "--url", url, "--json", "state", "get", "ann", "f"]),
        ]
        results = {name: _time(command, env, args.runs) for name, command in rows}
    for name, (median, best) in results.items():
        print(f"{name:<28} median {median:.3f} s   best {best:.3f} s   ({args.runs} runs)")
    help_median = results["flowstore --help"][0]
    verdict = "meets" if help_median < HELP_TARGET_SECONDS else "MISSES"
    print(f"--help {verdict} the {HELP_TARGET_SECONDS} s target")
    return 0 if help_median < HELP_TARGET_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())
