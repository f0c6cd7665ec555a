"""The fuzz targets of tests/test_fuzz.py with a much larger budget.

Every parser that reads the network (MQTT topics, each wire message type, the agent's
verdict on a desired state, the inference API's JSON and binary bodies and the real server
over loopback HTTP, the YAML manifests) runs on ``--examples`` generated examples. For each
target it prints the examples run, how many were accepted, the rejections by reason, the
largest traced allocation of one example (inference codec) and the time. A target fails
when an example raises anything but its typed errors, takes longer than the deadline, or
allocates out of proportion with its size; the run then exits 1 after the other targets.

Run: ``python bench/fuzz_long.py [--examples 5000] [--seed N] [--only decode.desired ...]``
(``--list`` names the targets). Set ``--seed`` to replay a run.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_fuzz import BY_NAME, Tally, fuzz  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="examples per target")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (replay)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these targets")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(BY_NAME))
        return 0
    names = args.only or list(BY_NAME)
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(BY_NAME)}")

    started = time.perf_counter()
    tallies: list[Tally] = []
    failed: list[str] = []
    for name in names:
        try:
            tally = fuzz(BY_NAME[name], examples=args.examples, seed=args.seed)
        except Exception:
            failed.append(name)
            print(f"{name}: FAILED", flush=True)
            traceback.print_exc()
            continue
        tallies.append(tally)
        print(tally.line(), flush=True)

    examples = sum(t.examples for t in tallies)
    accepted = sum(t.accepted for t in tallies)
    reasons: Counter[str] = Counter()
    for tally in tallies:
        reasons.update(tally.rejected)
    print()
    print(
        f"total: {examples} examples over {len(tallies)} targets in "
        f"{time.perf_counter() - started:.0f}s; {accepted} accepted, "
        f"{sum(reasons.values())} rejected, {examples - accepted - sum(reasons.values())} "
        "undecided"
    )
    if failed:
        print(f"FAILED targets: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
