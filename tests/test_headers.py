"""
The C{test-case-name} headers of the product modules name test modules that
exist, so C{trial --testmodule FILE} (and editors that read the header) run
the tests of a module instead of failing to import a name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from twisted.scripts.trial import getTestModules
from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The folders whose modules carry headers (the product, not the tests).
PRODUCT = ("xenddev", "controllers", os.path.join("twisted", "plugins"), "bench")

#: Headers known to be wrong in modules that are being reworked elsewhere:
#: (file relative to the checkout, the missing test module it names) -> the
#: module(s) the header should name. An entry excuses exactly that name in
#: exactly that file; once the header is fixed the entry no longer applies
#: and should be deleted.
PENDING: dict[tuple[str, str], str] = {}


def productModules(root: str = ROOT) -> Iterator[str]:
    """Every C{.py} file under L{PRODUCT}, relative to C{root}, sorted."""
    found = []
    for top in PRODUCT:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            found.extend(
                os.path.relpath(os.path.join(dirpath, f), root)
                for f in filenames
                if f.endswith(".py")
            )
    return iter(sorted(found))


def testModuleExists(name: str, root: str = ROOT) -> bool:
    """
    Whether the dotted C{name} is a test module of this checkout: a file
    C{tests/.../test_*.py} (a package's C{__init__.py} does not count).
    """
    parts = name.split(".")
    if parts[0] != "tests" or not all(p.isidentifier() for p in parts):
        return False
    return os.path.isfile(os.path.join(root, *parts) + ".py")


def brokenHeaders(root: str = ROOT) -> list[tuple[str, str]]:
    """
    (file, name) for each name a C{test-case-name} header of a product
    module gives that is not a test module of the checkout, read as trial
    reads it (L{getTestModules}: split on commas, nothing stripped).
    """
    return [
        (path, name)
        for path in productModules(root)
        for name in getTestModules(os.path.join(root, path))
        if not testModuleExists(name, root)
    ]


class HeaderTests(SynchronousTestCase):
    """Every C{test-case-name} header names test modules that exist."""

    def test_headersNameExistingTestModules(self) -> None:
        """
        No product module's header names a missing test module, except the
        known ones of L{PENDING}.
        """
        broken = [
            f"{path}: {name!r}"
            for path, name in brokenHeaders()
            if (path.replace(os.sep, "/"), name) not in PENDING
        ]
        self.assertEqual(broken, [], "headers naming test modules that do not exist")

    def test_pendingFixesNameExistingModules(self) -> None:
        """The header each L{PENDING} entry asks for names existing test modules."""
        for (path, _), wanted in PENDING.items():
            for name in wanted.split(","):
                self.assertTrue(testModuleExists(name), f"{path}: {name}")

    def test_brokenHeaderDetected(self) -> None:
        """
        The check finds a header naming a missing module, one name of a
        comma-separated list, and a name with a space trial would not strip.
        """
        root = self.mktemp()
        os.makedirs(os.path.join(root, "tests"))
        os.makedirs(os.path.join(root, "xenddev"))
        with open(os.path.join(root, "tests", "test_real.py"), "w") as f:
            f.write('"""A test module."""\n')
        headers = {
            "good.py": "tests.test_real",
            "missing.py": "tests.test_missing",
            "partly.py": "tests.test_real,tests.test_gone",
            "spaced.py": "tests.test_real, tests.test_real",
        }
        for name, header in headers.items():
            with open(os.path.join(root, "xenddev", name), "w") as f:
                f.write(f"# -*- test-case-name: {header} -*-\n")
        with open(os.path.join(root, "xenddev", "none.py"), "w") as f:
            f.write('"""No header."""\n')
        self.assertEqual(
            brokenHeaders(root),
            [
                ("xenddev/missing.py", "tests.test_missing"),
                ("xenddev/partly.py", "tests.test_gone"),
                ("xenddev/spaced.py", " tests.test_real"),
            ],
        )
