"""
Coverage traces the first examples of each property, not every one.

Under coverage (C{make test}: the trial process and its workers run with
coverage.py's C tracer installed), Python 3.11 runs every frame of a traced
thread through its slower tracing paths, measured code or not, Hypothesis'
engine included. The lines and branches that a property's later examples
reach are, all but always, those its first ones reached. So a property's
first L{TRACED_EXAMPLES} examples (as many as the quick profile runs) are
traced, and from the next one on the test runs with its thread's trace
function off, until its clean-ups run. Every example still runs and can fail
its test; only the coverage report is concerned, and a run without coverage
is not touched.

Measured one after another on this 2-core machine, the thorough profile,
C{test_diskspec} and C{test_inputchecks} under coverage: 45-64 s traced
whole, 32-36 s so, 30 s without coverage; their combined report missed two
more lines and two more partial branches (of C{controllers/blkif.py}) of
14 805 lines. Turning tracing off around each later example alone gained
little (49-55 s): Hypothesis' engine between the examples costs as much.

How: Hypothesis runs each example through the test case's
C{execute_example(f)} when it has one (its hook for custom function
execution); L{install} gives trial's test cases one, L{executeExample}.
coverage.py's tracer keeps a stack of the frames it saw called; the frames
that return while it is off (Hypothesis' and the test's, never measured
ones) are left on it, which costs nothing but a few entries.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from tests.support.profiles import QUICK_EXAMPLES

__all__ = ["TRACED_EXAMPLES", "executeExample", "install"]

T = TypeVar("T")

#: How many examples of one property run traced (the quick profile's count).
TRACED_EXAMPLES = QUICK_EXAMPLES

#: The attribute of a test case counting the examples it ran traced.
_COUNT = "_tracedExamples"


def executeExample(testCase: object, example: Callable[[], T]) -> T:
    """
    Run one of C{testCase}'s examples: as usual while no trace function is
    set or fewer than L{TRACED_EXAMPLES} have run traced. After that the
    trace function is turned off for the rest of the test and set again by
    a clean-up of C{testCase}; or, for an object without C{addCleanup}, for
    this example only.

    @param testCase: the test case (one per test method in trial).
    @param example: runs the example; what it returns is returned.
    """
    tracer = sys.gettrace()
    if tracer is None:
        return example()
    traced = getattr(testCase, _COUNT, 0)
    if traced < TRACED_EXAMPLES:
        setattr(testCase, _COUNT, traced + 1)
        return example()
    addCleanup = getattr(testCase, "addCleanup", None)
    sys.settrace(None)
    if addCleanup is not None:
        addCleanup(sys.settrace, tracer)
        return example()
    try:
        return example()
    finally:
        sys.settrace(tracer)


def install(testCaseClass: type | None = None) -> None:
    """
    Give C{testCaseClass} L{executeExample} as its C{execute_example}, unless
    it has one of its own.

    @param testCaseClass: by default trial's C{SynchronousTestCase}, which
        every test case of the suite derives from.
    """
    if testCaseClass is None:
        from twisted.trial.unittest import SynchronousTestCase

        testCaseClass = SynchronousTestCase
    if getattr(testCaseClass, "execute_example", None) is None:
        setattr(testCaseClass, "execute_example", executeExample)  # noqa: B010
