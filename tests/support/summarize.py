"""
Print trial's result as the plain line CI reads: C{N passed, N failed,
N skipped}. Exits non-zero if anything failed or trial printed no result.
"""

import re
import sys


def summarize(text: str) -> tuple[int, int, int]:
    """Parse trial's closing C{PASSED (...)} / C{FAILED (...)} line."""
    lines = [line for line in text.splitlines() if re.match(r"(PASSED|FAILED) \(", line)]
    if not lines:
        return 0, 1, 0
    counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1]))
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    failed = counts.get("failures", 0) + counts.get("errors", 0)
    failed += counts.get("unexpectedSuccesses", 0)
    return passed, failed, counts.get("skips", 0)


def main() -> int:
    """Read trial's output files (one per trial run), print one summary line."""
    passed = failed = skipped = 0
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8", errors="replace") as f:
            p, f_, s = summarize(f.read())
        passed, failed, skipped = passed + p, failed + f_, skipped + s
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
