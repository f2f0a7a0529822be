"""
The SXP parser and printer (xenddev.sxp): xm's device expressions, quoting,
errors with positions, and hypothesis round trips and fuzzing.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.support.profiles import examples
from xenddev.sxp import MAX_DEPTH, SxpError, fromConfig, parse, parseAll, show, toConfig

atoms = st.text(
    alphabet=st.characters(codec="utf-8"),
    max_size=20,
)
sxprs: Any = st.recursive(atoms, lambda children: st.lists(children, max_size=5), max_leaves=30)


class ParseTests(SynchronousTestCase):
    """Parsing xm's expressions."""

    def test_xmBlockAttach(self) -> None:
        """The expression xm block-attach sent parses into nested lists."""
        self.assertEqual(
            parse("(vbd (uname phy:/dev/sda) (dev xvda) (mode w))"),
            ["vbd", ["uname", "phy:/dev/sda"], ["dev", "xvda"], ["mode", "w"]],
        )

    def test_numbersStayStrings(self) -> None:
        """Numbers are atoms like any other, as in xend."""
        self.assertEqual(parse("(vif (id 0) (rate 10.5))"), ["vif", ["id", "0"], ["rate", "10.5"]])

    def test_quotedStringsAndEscapes(self) -> None:
        """Both quote characters, every documented escape, and spaces inside quotes."""
        text = r"""(a "x y" 'it''s' "q\"\\\n\r\t\b\f\v\0\x41\u00e9\U0001F600" 'z\'')"""
        self.assertEqual(
            parse(text),
            ["a", "x y", "it", "s", 'q"\\\n\r\t\b\f\v\0A\u00e9\U0001f600', "z'"],
        )

    def test_whitespaceAndNesting(self) -> None:
        """Newlines and tabs separate atoms; lists nest; () is the empty list."""
        self.assertEqual(parse("\n( a\t(b (c ()))\n)\n"), ["a", ["b", ["c", []]]])

    def test_parseAll(self) -> None:
        """parseAll returns every top-level expression, atoms included."""
        self.assertEqual(parseAll(" (a) b (c d) "), [["a"], "b", ["c", "d"]])
        self.assertEqual(parseAll(""), [])

    def assertErrorAt(self, text: str, problem: str, line: int, column: int) -> None:
        """parse(text) raises SxpError naming the problem and position."""
        e = self.assertRaises(SxpError, parse, text)
        self.assertIn(problem, e.problem)
        self.assertEqual((e.line, e.column), (line, column))
        self.assertIn(f"line {line}, column {column}", str(e))
        self.assertIsInstance(e, ValueError)

    def test_errors(self) -> None:
        """Each malformed input gets a typed error naming what and where."""
        self.assertErrorAt("(vbd (dev xvda)", "unterminated list", 1, 1)
        self.assertErrorAt('(vbd (dev "xvda))', "unterminated string", 1, 11)
        self.assertErrorAt("(a))", "unexpected text after", 1, 4)
        self.assertErrorAt("(a\n  (b \\c))", "backslash outside", 2, 6)
        self.assertErrorAt('(a "\\q")', "unknown escape \\q", 1, 5)
        self.assertErrorAt('(a "\\x4")', "2 hexadecimal digits", 1, 5)
        self.assertErrorAt('(a "\\ud800")', "not a character", 1, 5)
        self.assertErrorAt('(a "x\\', "backslash at the end", 1, 6)
        self.assertErrorAt("   ", "empty input", 1, 4)
        self.assertErrorAt("vbd", "expected '('", 1, 1)
        self.assertErrorAt(")", "expected '('", 1, 1)
        self.assertErrorAt("(" * (MAX_DEPTH + 1), "nested deeper", 1, MAX_DEPTH + 1)

    def test_unbalancedCloseInside(self) -> None:
        """A stray ')' in parseAll is reported where it stands."""
        e = self.assertRaises(SxpError, parseAll, "(a) )")
        self.assertEqual(e.position, 4)
        self.assertIn("without a matching '('", str(e))

    def test_notText(self) -> None:
        """Non-text input is an SxpError, not a TypeError."""
        self.assertRaises(SxpError, parse, b"(a)")
        self.assertRaises(SxpError, parseAll, None)


class ShowTests(SynchronousTestCase):
    """Printing."""

    def test_bareAndQuoted(self) -> None:
        """Plain words stay bare; anything else is quoted and escaped."""
        self.assertEqual(
            show(["vbd", ["uname", "phy:/dev/sda"], ["dev", "xvda"], ["mode", "w"]]),
            "(vbd (uname phy:/dev/sda) (dev xvda) (mode w))",
        )
        self.assertEqual(
            show(["a", "", "x y", 'q"', "(", "\n\x01"]), r'(a "" "x y" "q\"" "(" "\n\x01")'
        )

    def test_integersAndTuples(self) -> None:
        """Integers print as numbers; tuples as lists (xmlrpclib's shapes)."""
        self.assertEqual(show(("vbd", ("dom", 5, "id", 51712))), "(vbd (dom 5 id 51712))")

    def test_refusesOtherTypes(self) -> None:
        """Floats, dicts, None and booleans cannot be shown."""
        for bad in (1.5, {"a": 1}, None, True, ["a", [False]]):
            self.assertRaises(SxpError, show, bad)

    @given(sxprs)
    @settings(max_examples=examples(300), deadline=None)
    def test_roundTrip(self, expr: Any) -> None:
        """parse(show(x)) == x for every list expression; parseAll for atoms."""
        text = show(expr)
        if isinstance(expr, list):
            self.assertEqual(parse(text), expr)
        self.assertEqual(parseAll(text), [expr])
        self.assertNotIn("\n", text)

    @given(st.text(max_size=60))
    @settings(max_examples=examples(500), deadline=None)
    def test_fuzzParse(self, text: str) -> None:
        """Any text either parses (and then round-trips) or raises SxpError."""
        try:
            expr = parse(text)
        except SxpError as e:
            self.assertIsNotNone(e.position)
            assert e.position is not None
            self.assertTrue(0 <= e.position <= len(text))
        else:
            self.assertEqual(parse(show(expr)), expr)

    @given(st.text(alphabet="()\"'\\ abx0u\n", max_size=40))
    @settings(max_examples=examples(500), deadline=None)
    def test_fuzzDelimiters(self, text: str) -> None:
        """Inputs dense in delimiters and escapes never raise anything but SxpError."""
        try:
            parseAll(text)
        except SxpError:
            pass


class ToConfigTests(SynchronousTestCase):
    """Device expressions into (class, config)."""

    def test_vbd(self) -> None:
        """xm's vbd expression, text or nested list, gives the flat config."""
        expected = ("vbd", {"uname": "phy:/dev/sda", "dev": "xvda", "mode": "w"})
        self.assertEqual(toConfig("(vbd (uname phy:/dev/sda) (dev xvda) (mode w))"), expected)
        self.assertEqual(
            toConfig(["vbd", ["uname", "phy:/dev/sda"], ["dev", "xvda"], ["mode", "w"]]),
            expected,
        )

    def test_deviceWrapperAndIntegers(self) -> None:
        """xend's (device (vif ...)) wrapper is accepted; integers become strings."""
        self.assertEqual(
            toConfig(["device", ["vif", ["mac", "00:16:3e:00:00:01"], ["backend", 0]]]),
            ("vif", {"mac": "00:16:3e:00:00:01", "backend": "0"}),
        )

    def test_fromConfigInverse(self) -> None:
        """fromConfig then toConfig is the identity."""
        cfg = {"uname": "file:/a b.img", "dev": "xvdb", "mode": "r"}
        self.assertEqual(toConfig(show(fromConfig("vbd", cfg))), ("vbd", cfg))

    def test_shapeErrors(self) -> None:
        """Each wrong shape is an SxpError naming the entry at fault."""
        for bad, words in (
            ("(vbd (dev))", "without a value"),
            ("(vbd (dev a b))", "(key value)"),
            ("(vbd dev)", "(key value)"),
            ("(vbd (dev (a b)))", "must be an atom"),
            ("(vbd (dev a) (dev b))", "given twice"),
            ("()", "non-empty list"),
            ("((vbd) (dev a))", "device class"),
            ("(VBD! (dev a))", "device class"),
            ("(vbd (() a))", "key must be a word"),
        ):
            e = self.assertRaises(SxpError, toConfig, bad)
            self.assertIn(words, str(e), bad)
        self.assertRaises(SxpError, toConfig, ["vbd", ["dev", 1.5]])
        self.assertRaises(SxpError, toConfig, "vbd")
