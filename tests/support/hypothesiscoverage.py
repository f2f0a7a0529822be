"""
Coverage traces the first examples of each property, not every one.

Under coverage (C{make test}: the trial process and its workers run with
coverage.py's C tracer installed), Python 3.11 runs every frame of a traced
thread through its slower tracing paths, measured code or not, Hypothesis'
own engine included: C{test_diskspec} and C{test_inputchecks} took 67 s
traced against 31 s untraced in the thorough profile. The lines and
branches a property's later examples reach are, all but always, those its
first ones reached (the combined report of those two modules lost one line
and one partial branch of 14 805 lines). So a property's first
L{TRACED_EXAMPLES} examples (as many as the quick profile runs) are traced
and the others run with tracing off in the thread that runs them: 40 s
instead of 67. Every example still runs and can fail its test; only the
coverage report is concerned, and a run without coverage is not touched.

How: Hypothesis runs each example through the test case's
C{execute_example(f)} when it has one (its hook for custom function
execution); L{install} gives trial's test cases one, L{executeExample}.
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
    set or fewer than L{TRACED_EXAMPLES} have run traced, else with this
    thread's trace function off, set again when the example returns or
    raises.

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
    sys.settrace(None)
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
