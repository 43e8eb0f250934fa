"""`python -m workers [-Q search,evaluate] [-c 1] [-n NAME]`: run a worker (see worker_main)."""

from __future__ import annotations

import argparse
import sys

from search.errors import ArchtreeError
from workers.celery_app import worker_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description=worker_main.__doc__)
    parser.add_argument("-Q", "--queues", help="comma-separated queues (default: all)")
    parser.add_argument("-c", "--concurrency", type=int, default=1, help="tasks at once")
    parser.add_argument("-n", "--hostname", help="worker name, e.g. w1@%%h")
    args = parser.parse_args(argv)
    queues = args.queues.split(",") if args.queues else None
    try:
        worker_main(queues, args.concurrency, hostname=args.hostname)
    except ArchtreeError as error:
        print(f"archtree worker: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
