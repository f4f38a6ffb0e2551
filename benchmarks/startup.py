"""How long ``meowdread --help`` takes, against importing the training stack it no longer needs.

    python benchmarks/startup.py [--runs 5]

Prints the median wall time of each command over ``--runs`` fresh interpreters. The numbers depend on the
machine and its load (and on a warm file cache: run it twice); nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {
    "meowdread --help": [sys.executable, "-m", "meowdread", "--help"],
    "meowdread fit --help": [sys.executable, "-m", "meowdread", "fit", "--help"],
    "import meowdread.cli (torch, Lightning, transformers)": [sys.executable, "-c", "import meowdread.cli"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    for label, command in COMMANDS.items():
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(command, cwd=REPO, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        print(f"{label}: median {statistics.median(times):.2f} s over {runs} runs (min {min(times):.2f} s)")


if __name__ == "__main__":
    main()
