"""
Coverage of the Python processes the tests start (C{make test}).

coverage.py measures a process it did not start itself through
C{coverage.process_startup()}, called at interpreter start-up from a C{.pth}
file when C{COVERAGE_PROCESS_START} names its configuration file; each
process then writes a data file of its own (C{parallel = true} in
C{.coveragerc}) and C{coverage combine} merges them. See
U{https://coverage.readthedocs.io/en/latest/subprocess.html}.

The tests start hundreds of Python processes that never run our code (the
stand-in C{tap-ctl} runs once per tap-ctl command, pip in the packaging
test); starting coverage in each of them doubled the suite's time. So the
C{.pth} file written here starts coverage in a process only when it first
imports C{xenddev} or C{controllers} (before their code runs, so nothing of
theirs is missed), and it is asked for with C{XENDDEV_COVERAGE_RC} rather
than C{COVERAGE_PROCESS_START}, which the C{.pth} file of coverage >= 7.10
would act on at once in every process.

Run it with the virtualenv's interpreter to (re)write the C{.pth} file in
that virtualenv; C{tests/support/run-suite.sh} does.
"""

from __future__ import annotations

import os
import sys
import sysconfig

#: The environment variable that asks for coverage: the configuration file.
ENV = "XENDDEV_COVERAGE_RC"

#: The packages whose first import starts coverage (.coveragerc's source_pkgs).
PACKAGES = ("xenddev", "controllers")

#: What the .pth file runs at every start-up of the virtualenv's interpreter.
HOOK = f'''
import os, sys
if os.environ.get({ENV!r}):
    class _XenddevStartCoverage:
        """Calls coverage.process_startup() on the first import of {PACKAGES}."""

        def find_spec(self, name, path=None, target=None):
            if name in {PACKAGES!r} and self in sys.meta_path:
                sys.meta_path.remove(self)
                previous = os.environ.get("COVERAGE_PROCESS_START")
                os.environ["COVERAGE_PROCESS_START"] = os.environ[{ENV!r}]
                try:
                    import coverage
                    coverage.process_startup()
                except Exception as e:
                    sys.stderr.write(f"coverage not started: {{e!r}}\\n")
                finally:
                    # Children decide for themselves, on their own imports.
                    if previous is None:
                        del os.environ["COVERAGE_PROCESS_START"]
                    else:
                        os.environ["COVERAGE_PROCESS_START"] = previous
            return None

    sys.meta_path.insert(0, _XenddevStartCoverage())
'''

#: The .pth file's name (after coverage's own a1_coverage.pth, harmlessly).
PTH_NAME = "xenddev_subprocess_coverage.pth"


def install(sitePackages: str | None = None) -> str:
    """Write the C{.pth} file into C{sitePackages} (default: this interpreter's); its path."""
    directory = sitePackages or sysconfig.get_paths()["purelib"]
    path = os.path.join(directory, PTH_NAME)
    line = f"import sys; exec({HOOK!r})\n"
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == line:
                return path
    except FileNotFoundError:
        pass
    with open(path, "w", encoding="utf-8") as f:
        f.write(line)
    return path


if __name__ == "__main__":
    print(install(sys.argv[1] if len(sys.argv) > 1 else None))
