"""
Tests for L{xenddev.xenstore.paths}: path, watch path, node name, domid and
token validation, and permissions.
"""

from __future__ import annotations

import pyxs.exceptions
import pyxs.helpers
from twisted.trial.unittest import SynchronousTestCase

from xenddev.xenstore import paths
from xenddev.xenstore.errors import (
    InvalidArgumentError,
    InvalidPathError,
    InvalidPermissionError,
)
from xenddev.xenstore.paths import (
    VALID_PATHS,
    Perm,
    joinPath,
    parsePerms,
    pathArgument,
    validateDomid,
    validateNodeName,
    validatePath,
    validateToken,
    validateWatchPath,
)


class ValidatePathTests(SynchronousTestCase):
    """L{validatePath} applies xenstored's syntax and length rules."""

    def test_acceptsValidPaths(self):
        """The root, absolute and relative paths and C{@} in names pass."""
        for path in [
            "/",
            "/local/domain/0",
            "device/vbd/51712",
            "/local/domain/0/backend/vbd/3/51712/@state",
            "a",
            "/A-Z_a-z0-9",
        ]:
            self.assertEqual(validatePath(path), path)

    def test_asciiBytesAccepted(self):
        """ASCII bytes are accepted and returned as text."""
        result = validatePath(b"/local/domain/0")
        self.assertEqual(result, "/local/domain/0")
        self.assertIsInstance(result, str)

    def test_rejectsEmpty(self):
        """The empty path is refused."""
        exc = self.assertRaises(InvalidPathError, validatePath, "")
        self.assertIn("empty", str(exc))

    def test_rejectsNonAsciiText(self):
        """A non-ASCII character is refused and named."""
        exc = self.assertRaises(InvalidPathError, validatePath, "/local/d\u00e9j\u00e0")
        self.assertIn("'\u00e9'", str(exc))

    def test_rejectsNonAsciiBytes(self):
        """Bytes that do not decode as ASCII are refused."""
        exc = self.assertRaises(InvalidPathError, validatePath, b"/local/\xff")
        self.assertIn("not ASCII", str(exc))

    def test_rejectsNonString(self):
        """Anything other than text or bytes is refused."""
        exc = self.assertRaises(InvalidPathError, validatePath, 42)
        self.assertIn("int", str(exc))
        self.assertRaises(InvalidPathError, validatePath, None)

    def test_rejectsDoubleSlash(self):
        """C{//} is refused, absolute or relative."""
        for path in ["//", "/local//domain", "a//b"]:
            exc = self.assertRaises(InvalidPathError, validatePath, path)
            self.assertIn("//", str(exc))

    def test_rejectsTrailingSlash(self):
        """A trailing C{/} is refused except for the root."""
        for path in ["/local/", "device/"]:
            exc = self.assertRaises(InvalidPathError, validatePath, path)
            self.assertIn("trailing", str(exc))

    def test_badCharactersNamed(self):
        """Each forbidden character is named in the message."""
        for char in [" ", ".", "*", "\0", ":", "\n"]:
            exc = self.assertRaises(InvalidPathError, validatePath, f"/local/a{char}b")
            self.assertIn(repr(char), str(exc), repr(char))
            self.assertEqual(exc.path, f"/local/a{char}b")

    def test_absoluteLengthLimit(self):
        """Absolute paths may be 3072 bytes long, not more."""
        ok = "/" + "a" * 3071
        self.assertEqual(validatePath(ok), ok)
        exc = self.assertRaises(InvalidPathError, validatePath, ok + "a")
        self.assertIn("3073", str(exc))
        self.assertIn("3072", str(exc))

    def test_relativeLengthLimit(self):
        """Relative paths may be 2048 bytes long, not more."""
        ok = "a" * 2048
        self.assertEqual(validatePath(ok), ok)
        exc = self.assertRaises(InvalidPathError, validatePath, ok + "a")
        self.assertIn("2049", str(exc))
        self.assertIn("2048", str(exc))

    def test_pyxsRelativeLimitWorkaround(self):
        """
        pyxs's C{check_path} accepts a 3000-byte relative path (it never
        applies the relative limit); we refuse it.
        """
        path = "a" * 3000
        self.assertEqual(pyxs.helpers.check_path(path.encode("ascii")), path.encode("ascii"))
        self.assertRaises(InvalidPathError, validatePath, path)

    def test_errorsAreValueErrors(self):
        """Path errors are L{ValueError}s and pyxs C{InvalidPath}s."""
        exc = self.assertRaises(InvalidPathError, validatePath, "/a b")
        self.assertIsInstance(exc, ValueError)
        self.assertIsInstance(exc, pyxs.exceptions.InvalidPath)


class ValidateWatchPathTests(SynchronousTestCase):
    """L{validateWatchPath}: ordinary paths plus the two special ones."""

    def test_specialPaths(self):
        """C{@introduceDomain} and C{@releaseDomain} are allowed."""
        self.assertEqual(validateWatchPath("@introduceDomain"), "@introduceDomain")
        self.assertEqual(validateWatchPath("@releaseDomain"), "@releaseDomain")
        self.assertEqual(validateWatchPath(b"@releaseDomain"), "@releaseDomain")

    def test_otherSpecialRejected(self):
        """Any other path starting with C{@} is refused, listing the valid ones."""
        exc = self.assertRaises(InvalidPathError, validateWatchPath, "@other")
        self.assertIn("@introduceDomain", str(exc))
        self.assertIn("@releaseDomain", str(exc))

    def test_ordinaryPaths(self):
        """Other watch paths follow the path rules."""
        self.assertEqual(validateWatchPath("/local/domain/3"), "/local/domain/3")
        self.assertRaises(InvalidPathError, validateWatchPath, "/local/")
        self.assertRaises(InvalidPathError, validateWatchPath, "")


class NodeNameTests(SynchronousTestCase):
    """L{validateNodeName} and L{joinPath}."""

    def test_validNames(self):
        """Single components are accepted."""
        for name in ["51712", "backend", "@x", "a-b_c"]:
            self.assertEqual(validateNodeName(name), name)

    def test_invalidNames(self):
        """Slashes, dots and the empty name are refused."""
        for name in ["a/b", "..", ".", "", "/", "a b"]:
            exc = self.assertRaises(InvalidPathError, validateNodeName, name)
            self.assertIn("node name", str(exc))

    def test_joinPath(self):
        """Names (text or ints) are appended with single slashes."""
        self.assertEqual(joinPath("/local/domain", 0, "backend"), "/local/domain/0/backend")
        self.assertEqual(joinPath("/", "local"), "/local")
        self.assertEqual(joinPath("/local/", "domain"), "/local/domain")
        self.assertEqual(joinPath("device", "vbd", 51712), "device/vbd/51712")
        self.assertEqual(joinPath("/a"), "/a")
        self.assertEqual(joinPath("/"), "/")

    def test_joinPathRefusesEscape(self):
        """A component with a C{/} cannot smuggle extra path levels in."""
        self.assertRaises(InvalidPathError, joinPath, "/local/domain/7", "../0")
        self.assertRaises(InvalidPathError, joinPath, "/local/domain/7", "x/../../0")
        self.assertRaises(InvalidPathError, joinPath, "/local/domain/7", "a/b")

    def test_joinPathValidatesResult(self):
        """The joined path obeys the path rules (e.g. the length limit)."""
        self.assertRaises(InvalidPathError, joinPath, "/a b", "c")
        self.assertRaises(InvalidPathError, joinPath, "/" + "a" * 3070, "bc")


class ValidateDomidTests(SynchronousTestCase):
    """L{validateDomid}."""

    def test_bounds(self):
        """0 and 65535 are the extremes."""
        self.assertEqual(validateDomid(0), 0)
        self.assertEqual(validateDomid(65535), 65535)

    def test_outOfRange(self):
        """-1 and 65536 are refused with the range in the message."""
        for bad in [-1, 65536]:
            exc = self.assertRaises(InvalidArgumentError, validateDomid, bad)
            self.assertIn("0..65535", str(exc))

    def test_notAnInteger(self):
        """Booleans, words, floats and None are refused."""
        for bad in [True, False, "x", 1.0, None, "", "-1"]:
            exc = self.assertRaises(InvalidArgumentError, validateDomid, bad)
            self.assertIsInstance(exc, ValueError)

    def test_decimalString(self):
        """A string of ASCII digits is converted."""
        self.assertEqual(validateDomid("7"), 7)
        self.assertRaises(InvalidArgumentError, validateDomid, "70000")

    def test_superscriptDigitRefusedAsArgumentError(self):
        """
        A superscript digit passes C{str.isdigit} but not C{int()}; it must
        still be refused with L{InvalidArgumentError}, not a bare ValueError.
        """
        self.assertRaises(InvalidArgumentError, validateDomid, "\u00b2")

    def test_nonAsciiDigitsRefused(self):
        """
        Only ASCII digits make a domid: ARABIC-INDIC DIGIT THREE is not 3.
        """
        self.assertRaises(InvalidArgumentError, validateDomid, "\u0663")


class ValidateTokenTests(SynchronousTestCase):
    """L{validateToken}."""

    def test_valid(self):
        """Non-empty text without NUL is a token."""
        self.assertEqual(validateToken("tok-1"), "tok-1")

    def test_invalid(self):
        """Empty text, NULs and non-text are refused."""
        for bad in ["", "a\0b", b"tok", 5]:
            self.assertRaises(InvalidArgumentError, validateToken, bad)


class PermTests(SynchronousTestCase):
    """L{Perm} and L{parsePerms}."""

    def test_parseEachAccess(self):
        """n, r, w and b parse, with their read/write meaning."""
        cases = {
            "n0": (False, False),
            "r5": (True, False),
            "w7": (False, True),
            "b65535": (True, True),
        }
        for text, (canRead, canWrite) in cases.items():
            perm = Perm.parse(text)
            self.assertEqual(perm.access, text[0])
            self.assertEqual(perm.domid, int(text[1:]))
            self.assertEqual((perm.canRead, perm.canWrite), (canRead, canWrite), text)

    def test_strRoundTrip(self):
        """str() gives back the wire form."""
        for text in ["n0", "r5", "w7", "b32752"]:
            self.assertEqual(str(Perm.parse(text)), text)
        self.assertEqual(Perm.parse(b"r3"), Perm("r", 3))

    def test_badStrings(self):
        """Malformed permissions raise L{InvalidPermissionError}."""
        for bad in ["x1", "r", "r-1", "r70000", "b1a", "", " r1", "R1"]:
            exc = self.assertRaises(InvalidPermissionError, Perm.parse, bad)
            self.assertIsInstance(exc, ValueError)
            self.assertIsInstance(exc, pyxs.exceptions.InvalidPermission)
            self.assertIn(repr(bad), str(exc))

    def test_hugeDomidIsInvalidPermission(self):
        """
        A domid with thousands of digits is an L{InvalidPermissionError}
        (C{int()} refuses strings over 4300 digits with a bare ValueError).
        """
        exc = self.assertRaises(InvalidPermissionError, Perm.parse, "r" + "9" * 5000)
        self.assertIn("invalid permission", str(exc))

    def test_notText(self):
        """A permission must be text or bytes."""
        self.assertRaises(InvalidPermissionError, Perm.parse, 5)

    def test_constructorValidates(self):
        """Perm() itself checks access letter and domid."""
        self.assertRaises(ValueError, Perm, "x", 1)
        self.assertRaises(InvalidArgumentError, Perm, "r", 65536)
        self.assertEqual(Perm("r", "5").domid, 5)

    def test_parsePerms(self):
        """A list of Perms and strings is normalised to Perms."""
        self.assertEqual(parsePerms([Perm("n", 0), "r5"]), [Perm("n", 0), Perm("r", 5)])

    def test_parsePermsEmpty(self):
        """An empty list is refused: the owner entry is mandatory."""
        exc = self.assertRaises(InvalidPermissionError, parsePerms, [])
        self.assertIn("owner", str(exc))

    def test_parsePermsBadEntry(self):
        """A bad entry anywhere in the list is refused."""
        self.assertRaises(InvalidPermissionError, parsePerms, ["n0", "q1"])


class PathArgumentTests(SynchronousTestCase):
    """L{pathArgument} and the cache of valid paths (the client's hot path)."""

    def test_argument(self):
        """A valid path comes back as text and as ASCII bytes with a NUL."""
        self.assertEqual(pathArgument("/local/domain/7"), ("/local/domain/7", b"/local/domain/7\0"))
        self.assertEqual(pathArgument(b"rel/path"), ("rel/path", b"rel/path\0"))

    def test_cached(self):
        """A valid text path is cached with its argument; the same bytes come back."""
        path = "/cache/test/argument"
        VALID_PATHS.pop(path, None)
        _, first = pathArgument(path)
        self.assertEqual(VALID_PATHS[path], b"/cache/test/argument\0")
        self.assertIs(pathArgument(path)[1], first)
        self.assertEqual(validatePath(path), path)

    def test_invalidNotCached(self):
        """An invalid path raises every time and is never cached."""
        for _ in range(2):
            self.assertRaises(InvalidPathError, pathArgument, "/a//b")
            self.assertRaises(InvalidPathError, validatePath, "/a//b")
        self.assertNotIn("/a//b", VALID_PATHS)

    def test_bytesAndSubclassesNotKeys(self):
        """Only exact C{str} keys enter the cache (bytes and str subclasses are checked)."""

        class Text(str):
            pass

        VALID_PATHS.pop("/sub/class", None)
        self.assertEqual(pathArgument(Text("/sub/class")), ("/sub/class", b"/sub/class\0"))
        self.assertNotIn("/sub/class", VALID_PATHS)
        self.assertRaises(InvalidPathError, pathArgument, Text("/bad path"))
        self.assertRaises(InvalidPathError, pathArgument, ["/a"])

    def test_bounded(self):
        """The cache is emptied when full, so it cannot grow without bound."""
        self.patch(paths, "_VALID_PATHS_MAX", len(VALID_PATHS) + 2)
        pathArgument("/bounded/1")
        pathArgument("/bounded/2")
        self.assertIn("/bounded/2", VALID_PATHS)
        pathArgument("/bounded/3")
        self.assertEqual(list(VALID_PATHS), ["/bounded/3"])
        self.assertEqual(validatePath("/bounded/1"), "/bounded/1")


class AllErrorsAreValueErrorsTests(SynchronousTestCase):
    """Every validation error can be caught as a L{ValueError}."""

    def test_valueErrors(self):
        """Each validator's error is a ValueError subclass."""
        calls = [
            (validatePath, "/a b"),
            (validateWatchPath, "@x"),
            (validateNodeName, "a/b"),
            (validateDomid, -1),
            (validateToken, ""),
            (Perm.parse, "x1"),
            (parsePerms, []),
        ]
        for fn, arg in calls:
            self.assertRaises(ValueError, fn, arg)
