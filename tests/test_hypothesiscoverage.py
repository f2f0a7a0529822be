"""
L{tests.support.hypothesiscoverage}: a property's first examples run traced,
the rest with tracing off, every one of them run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.support.hypothesiscoverage import TRACED_EXAMPLES, executeExample, install


def _noTrace(frame: FrameType, event: str, arg: Any) -> None:
    """A trace function that traces nothing (stands for coverage's)."""


class _Plain:
    """Something examples are run for, without clean-ups."""


class _WithCleanups:
    """A test case's clean-ups, recorded."""

    def __init__(self) -> None:
        self.cleanups: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def addCleanup(self, function: Callable[..., object], *args: object) -> None:
        """Record a clean-up."""
        self.cleanups.append((function, args))


class TracerMixin:
    """Runs code with a trace function of the test's choosing."""

    def withTracer(self, tracer: Callable[..., Any] | None, run: Callable[[], None]) -> None:
        """Call C{run} with C{tracer} set; the previous one (coverage's) set again after."""
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            run()
        finally:
            sys.settrace(previous)


class ExecuteExampleTests(TracerMixin, SynchronousTestCase):
    """L{executeExample} on its own."""

    def test_untracedRunAsIs(self) -> None:
        """Without a trace function every example runs, none is counted."""
        case = _WithCleanups()
        seen: list[object] = []

        def run() -> None:
            for i in range(TRACED_EXAMPLES + 2):
                self.assertEqual(executeExample(case, lambda i=i: seen.append(i) or i), i)

        self.withTracer(None, run)
        self.assertEqual(seen, list(range(TRACED_EXAMPLES + 2)))
        self.assertEqual(case.cleanups, [])

    def test_firstExamplesTraced(self) -> None:
        """
        Without C{addCleanup}: the first L{TRACED_EXAMPLES} run with the
        trace function, the later ones without; it is set again after each,
        also after one that raises.
        """
        case = _Plain()
        seen: list[object] = []
        after: list[object] = []

        def run() -> None:
            for _ in range(TRACED_EXAMPLES + 3):
                executeExample(case, lambda: seen.append(sys.gettrace()))
                after.append(sys.gettrace())
            self.assertRaises(ValueError, executeExample, case, self.raiseValueError)
            after.append(sys.gettrace())

        self.withTracer(_noTrace, run)
        self.assertEqual(seen, [_noTrace] * TRACED_EXAMPLES + [None] * 3)
        self.assertEqual(after, [_noTrace] * (TRACED_EXAMPLES + 4))

    def test_restOfTestUntraced(self) -> None:
        """
        With C{addCleanup}: after the first L{TRACED_EXAMPLES} the trace
        function stays off, and one clean-up sets it again.
        """
        case = _WithCleanups()
        seen: list[object] = []
        after: list[object] = []

        def run() -> None:
            for _ in range(TRACED_EXAMPLES + 3):
                executeExample(case, lambda: seen.append(sys.gettrace()))
                after.append(sys.gettrace())
            self.assertEqual(len(case.cleanups), 1)
            function, args = case.cleanups[0]
            function(*args)
            after.append(sys.gettrace())

        self.withTracer(_noTrace, run)
        self.assertEqual(seen, [_noTrace] * TRACED_EXAMPLES + [None] * 3)
        self.assertEqual(after, [_noTrace] * TRACED_EXAMPLES + [None] * 3 + [_noTrace])

    def raiseValueError(self) -> None:
        """An example that fails."""
        raise ValueError("failed example")


class InstallTests(TracerMixin, SynchronousTestCase):
    """L{install} and Hypothesis going through it."""

    def test_installedOnTrialTestCases(self) -> None:
        """Importing the C{tests} package installed it on trial's test cases."""
        self.assertIs(SynchronousTestCase.execute_example, executeExample)  # type: ignore[attr-defined]

    def test_ownHookKept(self) -> None:
        """A class with an C{execute_example} of its own keeps it."""

        class Own:
            def execute_example(self, f: Callable[[], object]) -> object:
                return f()

        hook = Own.execute_example
        install(Own)
        self.assertIs(Own.execute_example, hook)
        install(Own)
        self.assertIs(Own.execute_example, hook)

    def test_propertyExamples(self) -> None:
        """
        A property of a trial test case runs every example, the first
        L{TRACED_EXAMPLES} traced, and has the trace function back once it
        ran; a failing later example still fails it.
        """
        seen: list[object] = []

        class Property(SynchronousTestCase):
            @settings(max_examples=TRACED_EXAMPLES + 20, database=None, derandomize=True)
            @given(st.integers())
            def test_passes(self, n: int) -> None:
                seen.append(sys.gettrace())

            @settings(max_examples=TRACED_EXAMPLES + 20, database=None, derandomize=True)
            @given(st.integers(min_value=0, max_value=10**6))
            def test_fails(self, n: int) -> None:
                seen.append(sys.gettrace())
                if len(seen) > TRACED_EXAMPLES + 5:
                    self.fail("a late example fails")

        result = self.run_in(Property("test_passes"))
        self.assertEqual((result.errors, result.failures), ([], []))
        self.assertEqual(seen, [_noTrace] * TRACED_EXAMPLES + [None] * 20)
        del seen[:]
        result = self.run_in(Property("test_fails"))
        self.assertEqual((len(result.failures), result.errors), (1, []))
        self.assertIn("a late example fails", str(result.failures[0][1]))
        self.assertGreater(len(seen), TRACED_EXAMPLES + 5)

    def run_in(self, case: SynchronousTestCase) -> Any:
        """Run C{case} with a trace function set; its result."""
        from twisted.trial.reporter import TestResult

        result = TestResult()
        after: list[object] = []

        def run() -> None:
            case.run(result)
            after.append(sys.gettrace())

        self.withTracer(_noTrace, run)
        self.assertEqual(after, [_noTrace])
        return result
