# -*- test-case-name: tests.test_sxp -*-
"""
SXP: the s-expressions xm and xend exchanged, e.g.::

    (vbd (uname phy:/dev/sda) (dev xvda) (mode w))

An expression is an atom (a string) or a list of expressions. Atoms are
bare words or quoted strings (C{"..."} or C{'...'}) with backslash escapes.
As in xend, numbers are not interpreted: C{(id 51712)} parses to
C{["id", "51712"]}. L{show} prints any nesting of lists, strings and
integers; C{parse(show(x))} gives C{x} back with integers as strings.

L{toConfig} turns a device expression into a device class and a flat
configuration dictionary, as L{xenddev.toolstack.manager.DeviceManager.createDevice}
takes it.

Our own grammar and code (xend's C{sxp.py} was read for its behaviour
only):

  - Whitespace separates atoms and is otherwise ignored; there are no
    comments.
  - A bare atom is any run of characters other than whitespace, parentheses,
    quotes and backslash.
  - Escapes in quoted strings: C{\\\\ \\" \\' \\n \\r \\t \\b \\f \\v \\0},
    C{\\xHH}, C{\\uHHHH} and C{\\UHHHHHHHH}; any other escape is an error (xend kept unknown
    escapes silently, which hid typing mistakes).
"""

from __future__ import annotations

import re
from typing import Any, TypeAlias

from xenddev.errors import FaultCode, XenddevError

#: An s-expression as parsed: a string or a list of s-expressions.
Sxpr: TypeAlias = "str | list[Sxpr]"

_SPACE = frozenset(" \t\r\n\f\v")
_DELIMITERS = _SPACE | frozenset("()\"'\\")
_BARE = re.compile(r"[^\s()\"'\\]+\Z")
_SIMPLE_ESCAPES = {
    "\\": "\\",
    '"': '"',
    "'": "'",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "b": "\b",
    "f": "\f",
    "v": "\v",
    "0": "\0",
}
_PRINT_ESCAPES = {v: "\\" + k for k, v in _SIMPLE_ESCAPES.items() if k != "'"}
#: Nesting deeper than this is refused (a guard against runaway input).
MAX_DEPTH = 100


class SxpError(XenddevError, ValueError):
    """
    An s-expression could not be parsed or does not have the expected shape.

    @ivar problem: what is wrong, without the position.
    @ivar position: the character offset (0-based) where it was noticed, or
        L{None} for a shape error in an already parsed expression.
    @ivar line: the 1-based line of C{position} (or L{None}).
    @ivar column: the 1-based column of C{position} (or L{None}).
    """

    faultCode = FaultCode.BAD_CONFIG

    def __init__(self, problem: str, text: str | None = None, position: int | None = None):
        self.problem = problem
        self.position = position
        self.line: int | None = None
        self.column: int | None = None
        if text is not None and position is not None:
            self.line = text.count("\n", 0, position) + 1
            self.column = position - (text.rfind("\n", 0, position) + 1) + 1
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.position is None:
            return f"bad s-expression: {self.problem}"
        return (
            f"bad s-expression at line {self.line}, column {self.column} "
            f"(offset {self.position}): {self.problem}"
        )


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, problem: str, position: int | None = None) -> SxpError:
        return SxpError(problem, self.text, self.pos if position is None else position)

    def skipSpace(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in _SPACE:
            pos += 1
        self.pos = pos

    def expressions(self) -> list[Sxpr]:
        out: list[Sxpr] = []
        self.skipSpace()
        while self.pos < len(self.text):
            out.append(self.expression(0))
            self.skipSpace()
        return out

    def expression(self, depth: int) -> Sxpr:
        char = self.text[self.pos]
        if char == "(":
            return self.list(depth)
        if char == ")":
            raise self.error("unexpected ')' without a matching '('")
        if char in "\"'":
            return self.quoted()
        if char == "\\":
            raise self.error("backslash outside a quoted string")
        return self.bare()

    def list(self, depth: int) -> list[Sxpr]:
        if depth >= MAX_DEPTH:
            raise self.error(f"lists nested deeper than {MAX_DEPTH}")
        start = self.pos
        self.pos += 1
        out: list[Sxpr] = []
        while True:
            self.skipSpace()
            if self.pos >= len(self.text):
                raise self.error("unterminated list: '(' has no matching ')'", start)
            if self.text[self.pos] == ")":
                self.pos += 1
                return out
            out.append(self.expression(depth + 1))

    def bare(self) -> str:
        start = self.pos
        text = self.text
        while self.pos < len(text) and text[self.pos] not in _DELIMITERS:
            self.pos += 1
        return text[start : self.pos]

    def quoted(self) -> str:
        start = self.pos
        quote = self.text[start]
        self.pos += 1
        out: list[str] = []
        text = self.text
        while True:
            if self.pos >= len(text):
                raise self.error(f"unterminated string: {quote} has no closing {quote}", start)
            char = text[self.pos]
            if char == quote:
                self.pos += 1
                return "".join(out)
            if char == "\\":
                out.append(self.escape())
            else:
                out.append(char)
                self.pos += 1

    def escape(self) -> str:
        start = self.pos
        if start + 1 >= len(self.text):
            raise self.error("backslash at the end of the input")
        code = self.text[start + 1]
        if code in _SIMPLE_ESCAPES:
            self.pos += 2
            return _SIMPLE_ESCAPES[code]
        width = {"x": 2, "u": 4, "U": 8}.get(code)
        if width is None:
            raise self.error(f"unknown escape \\{code}")
        digits = self.text[start + 2 : start + 2 + width]
        if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise self.error(f"\\{code} needs {width} hexadecimal digits")
        value = int(digits, 16)
        if 0xD800 <= value <= 0xDFFF or value > 0x10FFFF:
            raise self.error(f"\\{code}{digits} is not a character")
        self.pos += 2 + width
        return chr(value)


def parseAll(text: str) -> list[Sxpr]:
    """Every top-level expression in C{text} (possibly none)."""
    if not isinstance(text, str):
        raise SxpError(f"expected text, not {type(text).__name__}")
    return _Parser(text).expressions()


def parse(text: str) -> list[Sxpr]:
    """
    Exactly one list expression: C{"(vbd (dev xvda))"} → C{["vbd", ["dev", "xvda"]]}.

    @raise SxpError: naming the position and the problem.
    """
    parser = _Parser(text) if isinstance(text, str) else None
    if parser is None:
        raise SxpError(f"expected text, not {type(text).__name__}")
    parser.skipSpace()
    if parser.pos >= len(text):
        raise parser.error("empty input: expected an expression like (vbd (dev xvda))")
    if text[parser.pos] != "(":
        raise parser.error("expected '(' to start a list")
    result = parser.expression(0)
    parser.skipSpace()
    if parser.pos < len(text):
        raise parser.error("unexpected text after the expression")
    assert isinstance(result, list)
    return result


def showAtom(atom: str | int) -> str:
    """An atom as SXP text: bare when it can be, otherwise quoted."""
    if isinstance(atom, bool):
        raise SxpError(f"cannot show a boolean ({atom!r}): use a string")
    if isinstance(atom, int):
        return str(atom)
    if _BARE.match(atom):
        return atom
    out = ['"']
    for char in atom:
        escaped = _PRINT_ESCAPES.get(char)
        if escaped is not None:
            out.append(escaped)
        elif char.isprintable() and not 0xD800 <= ord(char) <= 0xDFFF:
            out.append(char)
        elif ord(char) <= 0xFF:
            out.append(f"\\x{ord(char):02x}")
        elif 0xD800 <= ord(char) <= 0xDFFF:
            raise SxpError(f"cannot show the lone surrogate U+{ord(char):04X}")
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    out.append('"')
    return "".join(out)


def show(sxpr: Any) -> str:
    """
    An expression (lists of strings, integers and lists) as one line of SXP
    text; C{parse(show(x))} is C{x} with integers turned into strings.

    @raise SxpError: for anything else (floats, dicts, None, booleans).
    """
    parts: list[str] = []

    def visit(node: Any, depth: int) -> None:
        if isinstance(node, list | tuple):
            if depth >= MAX_DEPTH:
                raise SxpError(f"lists nested deeper than {MAX_DEPTH}")
            parts.append("(")
            for i, child in enumerate(node):
                if i:
                    parts.append(" ")
                visit(child, depth + 1)
            parts.append(")")
        elif isinstance(node, str | int):
            parts.append(showAtom(node))
        else:
            raise SxpError(f"cannot show a {type(node).__name__} ({node!r})")

    visit(sxpr, 0)
    return "".join(parts)


def normalise(sxpr: Any) -> Sxpr:
    """An expression from xmlrpclib (tuples, integers) in parsed form."""
    if isinstance(sxpr, bool):
        raise SxpError(f"unexpected boolean {sxpr!r} in an s-expression")
    if isinstance(sxpr, int):
        return str(sxpr)
    if isinstance(sxpr, str):
        return sxpr
    if isinstance(sxpr, list | tuple):
        return [normalise(x) for x in sxpr]
    raise SxpError(f"unexpected {type(sxpr).__name__} in an s-expression")


def toConfig(sxpr: Any) -> tuple[str, dict[str, str]]:
    """
    A device expression as a class and a flat configuration::

        ["vbd", ["uname", "phy:/dev/sda"], ["dev", "xvda"], ["mode", "w"]]
        → ("vbd", {"uname": "phy:/dev/sda", "dev": "xvda", "mode": "w"})

    Accepts the text form too, and xend's wrapper C{(device (vbd ...))}.
    Integers become strings. Each entry must be C{(key value)} with an atom
    value, and a key may appear once.

    @raise SxpError: naming the entry at fault.
    """
    expr = parse(sxpr) if isinstance(sxpr, str) else normalise(sxpr)
    if isinstance(expr, list) and len(expr) == 2 and expr[0] == "device":
        expr = expr[1]
    if not isinstance(expr, list) or not expr:
        raise SxpError(f"a device expression is a non-empty list like (vbd ...), not {show(expr)}")
    devclass, *entries = expr
    if not isinstance(devclass, str) or not re.match(r"[a-z][a-z0-9_]*\Z", devclass):
        raise SxpError(f"the device class must be a word like vbd or vif, not {show(devclass)}")
    config: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2:
            raise SxpError(
                f"each {devclass} entry must be (key value), not {show(entry)}"
                + (
                    " (a key without a value)"
                    if isinstance(entry, list) and len(entry) == 1
                    else ""
                )
            )
        key, value = entry
        if not isinstance(key, str) or not key:
            raise SxpError(f"entry key must be a word, not {show(key)}")
        if not isinstance(value, str):
            raise SxpError(f"the value of {key} must be an atom, not the list {show(value)}")
        if key in config:
            raise SxpError(f"{key} given twice in the {devclass} expression")
        config[key] = value
    return devclass, config


def fromConfig(devclass: str, config: dict[str, Any]) -> list[Sxpr]:
    """The inverse of L{toConfig} (keys in the given order)."""
    return [devclass, *([k, normalise(v)] for k, v in config.items())]
