"""
The daemon's YAML configuration (L{xenddev.config}): defaults, overrides
and, above all, that every rejection names the file line, the key and the
value.
"""

from __future__ import annotations

import os

from twisted.python import usage
from twisted.trial.unittest import TestCase

from xenddev.config import (
    Config,
    ConfigError,
    PoolConfig,
    defaultRundir,
    defaultsAsMapping,
    loadConfig,
    parseConfig,
)
from xenddev.daemon import Options
from xenddev.driverdomain.kinds import availableKinds, resolveKinds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DefaultsTests(TestCase):
    """What an empty file (or no file) means."""

    def test_emptyFile(self) -> None:
        """An empty document is the defaults."""
        config = parseConfig("", "f.yaml", cwd="/srv")
        self.assertEqual(config.xenstore, "auto")
        self.assertTrue(config.driver_domain.enabled)
        self.assertEqual(config.driver_domain.domid, 0)
        self.assertEqual(config.driver_domain.kinds, ("auto",))
        self.assertEqual(config.xmlrpc.socket_mode, 0o600)
        self.assertIsNone(config.xmlrpc.tcp)
        self.assertEqual(config.xmlrpc.interface, "127.0.0.1")
        self.assertFalse(config.metrics.enabled)
        self.assertEqual(config.logging.format, "text")

    def test_defaultRundir(self) -> None:
        """C{/var/run/xenddev} as root, else C{run/} in the working directory."""
        self.assertEqual(defaultRundir(euid=0), "/var/run/xenddev")
        self.assertEqual(defaultRundir(euid=1000, cwd="/home/u"), "/home/u/run")

    def test_derivedPaths(self) -> None:
        """The sockets live in the run directory unless configured."""
        config = Config(rundir="/r")
        self.assertEqual(config.socketPath, "/r/xenddev.sock")
        self.assertEqual(config.xenstoredSocketPath, "/r/xenstored/socket")

    def test_fullFile(self) -> None:
        """Every section parses into its value type; relative paths follow the file."""
        config = parseConfig(
            "rundir: run\n"
            "xenstore: unix:/var/run/xenstored/socket\n"
            "driver_domain:\n"
            "  enabled: false\n"
            "  domid: 3\n"
            "  kinds: [netback]\n"
            "  simulate: off\n"
            "  hotplug: on\n"
            "  hotplug_timeout: 5\n"
            "timeouts: {create: 2.5, destroy: 3, request: 4, shutdown: 0, connect: 1}\n"
            "xmlrpc:\n"
            "  socket_mode: 0660\n"
            "  tcp: tcp:8006\n"
            "  password_file: secrets\n"
            "logging: {format: json, level: debug, file: xenddev.log}\n"
            "metrics: {enabled: true, endpoint: 'tcp:9102'}\n",
            "/etc/x/f.yaml",
            cwd="/etc/x",
        )
        self.assertEqual(config.rundir, "/etc/x/run")
        self.assertFalse(config.driver_domain.enabled)
        self.assertEqual(config.driver_domain.kinds, ("netback",))
        self.assertEqual(config.driver_domain.simulate, "off")
        self.assertEqual(config.driver_domain.hotplug, "on")
        self.assertEqual(config.timeouts.create, 2.5)
        self.assertEqual(config.timeouts.shutdown, 0.0)
        self.assertEqual(config.xmlrpc.socket_mode, 0o660)
        self.assertEqual(config.xmlrpc.tcp, "tcp:8006")
        self.assertEqual(config.xmlrpc.password_file, "/etc/x/secrets")
        self.assertEqual(config.logging.file, "/etc/x/xenddev.log")
        self.assertTrue(config.metrics.enabled)

    def test_portNumberIsTcp(self) -> None:
        """A bare port number for C{xmlrpc.tcp} means C{tcp:PORT}."""
        config = parseConfig("xmlrpc: {tcp: 8006, password_file: /p}\n")
        self.assertEqual(config.xmlrpc.tcp, "tcp:8006")

    def test_defaultsAsMapping(self) -> None:
        """Every section has documented defaults (docs/config.md lists each key)."""
        with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as f:
            doc = f.read()
        for section, values in defaultsAsMapping().items():
            self.assertIn(f"`{section}", doc)
            if isinstance(values, dict):
                for key in values:
                    self.assertIn(f"`{section}.{key}`", doc)


class KindsTests(TestCase):
    """C{driver_domain.kinds: auto}: every kind whose tools are present."""

    def test_autoParses(self) -> None:
        """C{auto} as a string or a one-item list; not mixed with names."""
        for text in ("auto", "[auto]"):
            config = parseConfig(f"driver_domain:\n  kinds: {text}\n", "f.yaml", cwd="/srv")
            self.assertEqual(config.driver_domain.kinds, ("auto",))
        with self.assertRaises(ConfigError):
            parseConfig("driver_domain:\n  kinds: [auto, blkback]\n", "f.yaml", cwd="/srv")

    def test_availableKinds(self) -> None:
        """Kernel backends always; qemu and tap only with their programs, reasons given."""
        present = {"qemu-storage-daemon": "/usr/bin/qemu-storage-daemon"}
        names, missing = availableKinds(lambda tool: present.get(tool))
        self.assertEqual(names, ["blkback", "netback"])
        self.assertEqual(missing, {"qemu": "no qemu-img", "tap": "no tap-ctl"})
        present["qemu-img"] = "/usr/bin/qemu-img"
        names, missing = availableKinds(lambda tool: present.get(tool))
        self.assertEqual(names, ["blkback", "netback", "qemu"])
        self.assertEqual(missing, {"tap": "no tap-ctl"})
        names, missing = resolveKinds(["netback"], lambda tool: None)
        self.assertEqual((names, missing), (["netback"], {}))
        self.assertEqual(resolveKinds(["auto"], lambda tool: None)[0], ["blkback", "netback"])


class RejectionTests(TestCase):
    """Each bad file is refused with file:line, key and value in the message."""

    def assertRejected(self, text: str, *expected: str) -> str:
        """Parse C{text} as C{f.yaml}; the error must contain every C{expected}."""
        e = self.assertRaises(ConfigError, parseConfig, text, "f.yaml")
        for part in expected:
            self.assertIn(part, str(e))
        return str(e)

    def test_unknownTopLevelKey(self) -> None:
        """An unknown top-level key names the line and lists the known keys."""
        self.assertRejected("xenstore: auto\nfrobnicate: 1\n", "f.yaml:2", "frobnicate", "known")

    def test_unknownSectionKey(self) -> None:
        """An unknown key in a section is named with its section."""
        self.assertRejected("timeouts:\n  create: 3\n  creat: 4\n", "f.yaml:3", "timeouts.creat")

    def test_negativeTimeout(self) -> None:
        """A negative timeout names key, value and line."""
        self.assertRejected("timeouts:\n  create: -3\n", "f.yaml:2", "timeouts.create", "-3")

    def test_textTimeout(self) -> None:
        """A timeout that is not a number is refused."""
        self.assertRejected("timeouts: {destroy: soon}\n", "f.yaml:1", "timeouts.destroy", "soon")

    def test_badXenstore(self) -> None:
        """A XenStore address must be auto, embedded, unix:PATH or xenbus:PATH."""
        self.assertRejected("\nxenstore: tcp:1\n", "f.yaml:2", "xenstore", "'tcp:1'", "embedded")

    def test_relativeXenstorePath(self) -> None:
        """A unix: address needs an absolute path."""
        self.assertRejected("xenstore: unix:sock\n", "f.yaml:1", "xenstore", "unix:sock")

    def test_unknownKind(self) -> None:
        """An unknown driver-domain kind is named with the known ones."""
        self.assertRejected(
            "driver_domain:\n  kinds: [blkback, qdisk9]\n",
            "f.yaml:2",
            "driver_domain.kinds",
            "qdisk9",
            "blkback, netback",
        )

    def test_builtinScripts(self) -> None:
        """C{builtin_scripts}: a list (or comma list) of scripts with a built-in; others refused."""
        for text in ("[block]", "block"):
            config = parseConfig(f"driver_domain:\n  builtin_scripts: {text}\n", "f.yaml")
            self.assertEqual(config.driver_domain.builtin_scripts, ("block",))
        self.assertEqual(parseConfig("").driver_domain.builtin_scripts, ())
        with self.assertRaises(ConfigError) as cm:
            parseConfig("driver_domain:\n  builtin_scripts: [vif-bridge]\n", "f.yaml")
        self.assertIn("vif-bridge", str(cm.exception))
        self.assertIn("builtin_scripts", str(cm.exception))

    def test_badDomid(self) -> None:
        """A domid out of range is refused."""
        self.assertRejected("driver_domain: {domid: 70000}\n", "driver_domain.domid", "70000")

    def test_badSimulate(self) -> None:
        """simulate is auto, on or off; anything else is refused with its line."""
        self.assertRejected(
            "driver_domain:\n  simulate: maybe\n", "f.yaml:2", "driver_domain.simulate", "maybe"
        )
        self.assertRejected(
            "driver_domain:\n  kinds: [blkback]\n  simulate: 1\n",
            "f.yaml:3",
            "driver_domain.simulate = 1",
            "auto, on (yes), off (no)",
        )
        self.assertRejected("driver_domain: {simulate: [on]}\n", "f.yaml:1", "simulate")

    def test_simulateSpellings(self) -> None:
        """yes/true mean on and no/false mean off, for simulate and hotplug."""
        for text, expected in (
            ("yes", "on"),
            ("true", "on"),
            ("On", "on"),
            ("no", "off"),
            ("False", "off"),
            ("auto", "auto"),
        ):
            config = parseConfig(f"driver_domain: {{simulate: {text}, hotplug: {text}}}\n")
            self.assertEqual(config.driver_domain.simulate, expected, text)
            self.assertEqual(config.driver_domain.hotplug, expected, text)

    def test_badQuiesceBound(self) -> None:
        """timeouts.quiesce must be a positive number; it defaults to 60 s."""
        self.assertEqual(parseConfig("").timeouts.quiesce, 60.0)
        self.assertEqual(parseConfig("timeouts: {quiesce: 5}").timeouts.quiesce, 5.0)
        self.assertRejected(
            "timeouts:\n  create: 1\n  quiesce: 0\n", "f.yaml:3", "timeouts.quiesce = 0", "> 0"
        )

    def test_limits(self) -> None:
        """
        The limits of the XML-RPC face have defaults and take whole numbers
        (sizes, counts) or positive seconds (timeouts).
        """
        limits = parseConfig("").limits
        self.assertEqual(
            (limits.body_size, limits.connections, limits.quiesce_handles), (1 << 20, 128, 64)
        )
        self.assertEqual((limits.idle_timeout, limits.request_timeout), (60.0, 30.0))
        limits = parseConfig(
            "limits: {body_size: 4096, connections: 2, idle_timeout: 5, "
            "request_timeout: 0.5, quiesce_handles: 1}\n"
        ).limits
        self.assertEqual(
            (limits.body_size, limits.connections, limits.quiesce_handles), (4096, 2, 1)
        )
        self.assertEqual((limits.idle_timeout, limits.request_timeout), (5.0, 0.5))

    def test_badLimits(self) -> None:
        """A bad limit names the line, the key and the value."""
        self.assertRejected(
            "limits:\n  connections: 0\n", "f.yaml:2", "limits.connections = 0", ">= 1"
        )
        self.assertRejected("limits: {body_size: 1.5e6}\n", "f.yaml:1", "limits.body_size")
        self.assertRejected("limits: {body_size: 100}\n", "limits.body_size = 100", ">= 1024")
        self.assertRejected(
            "limits:\n\n  request_timeout: -1\n", "f.yaml:3", "limits.request_timeout = -1"
        )
        self.assertRejected("limits: {quiesce_handles: many}\n", "'many'", "whole number")
        self.assertRejected("limits: {connectons: 3}\n", "limits.connectons", "unknown key")

    def test_badBool(self) -> None:
        """enabled must be a boolean."""
        self.assertRejected("driver_domain: {enabled: 2}\n", "driver_domain.enabled", "2")

    def test_badMode(self) -> None:
        """A socket mode must be octal and give the owner read/write."""
        self.assertRejected(
            "xmlrpc:\n  socket_mode: 999\n", "f.yaml:2", "xmlrpc.socket_mode", "999"
        )
        self.assertRejected("xmlrpc: {socket_mode: 400}\n", "xmlrpc.socket_mode", "400")
        # Issue 13: a mode letting other users in is refused, not accepted silently.
        for mode in ("777", "606", "664"):
            self.assertRejected(f"xmlrpc: {{socket_mode: {mode}}}\n", "xmlrpc.socket_mode", mode)

    def test_tcpNeedsPasswords(self) -> None:
        """A TCP listener without a password file is refused, naming its line."""
        self.assertRejected(
            "xmlrpc:\n  tcp: tcp:8006\n", "f.yaml:2", "xmlrpc.tcp", "tcp:8006", "password_file"
        )

    def test_badEndpoint(self) -> None:
        """The TCP endpoint must be a tcp: endpoint string that parses."""
        self.assertRejected(
            "xmlrpc: {tcp: 'unix:/x', password_file: /p}\n", "xmlrpc.tcp", "unix:/x"
        )
        self.assertRejected(
            "xmlrpc: {tcp: 'tcp:port=notaport', password_file: /p}\n", "xmlrpc.tcp", "notaport"
        )

    def test_badInterface(self) -> None:
        """The interface must be an IP address."""
        self.assertRejected("xmlrpc: {interface: localhost}\n", "xmlrpc.interface", "localhost")

    def test_badLogLevel(self) -> None:
        """Log levels are twisted.logger's."""
        self.assertRejected("logging:\n  level: loud\n", "f.yaml:2", "logging.level", "loud")

    def test_badLogFormat(self) -> None:
        """The log format is text or json."""
        self.assertRejected("logging: {format: xml}\n", "logging.format", "xml")

    def test_sectionNotMapping(self) -> None:
        """A section given as a scalar is refused."""
        self.assertRejected("timeouts: 5\n", "f.yaml:1", "timeouts", "mapping")

    def test_duplicateKey(self) -> None:
        """A key given twice is refused (YAML would silently keep the last)."""
        self.assertRejected("timeouts:\n  create: 1\n  create: 2\n", "f.yaml:3", "duplicate")

    def test_notYaml(self) -> None:
        """A syntax error names the line."""
        self.assertRejected("timeouts:\n  create: [1\n", "f.yaml:", "not valid YAML")

    def test_unsafeTagRefused(self) -> None:
        """Safe loading only: a Python object tag is an error, never executed."""
        self.assertRejected("rundir: !!python/object/apply:os.system ['true']\n", "f.yaml:1")

    def test_unreadableFile(self) -> None:
        """A missing file is named."""
        e = self.assertRaises(ConfigError, loadConfig, "/nonexistent/xenddev.yaml")
        self.assertIn("/nonexistent/xenddev.yaml", str(e))

    def test_loadConfigRelativeToFile(self) -> None:
        """loadConfig reads a file; relative paths are relative to it."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("rundir: here\n")
        self.assertEqual(loadConfig(path).rundir, os.path.join(os.path.dirname(path), "here"))


class OverrideTests(TestCase):
    """Command-line flags override the file."""

    def test_overrides(self) -> None:
        """--rundir and --xenstore replace the file's values."""
        config = parseConfig("rundir: /a\nxenstore: auto\n").withOverrides(
            rundir="/b", xenstore="embedded"
        )
        self.assertEqual((config.rundir, config.xenstore), ("/b", "embedded"))

    def test_badFlag(self) -> None:
        """A bad --xenstore is named as the flag."""
        e = self.assertRaises(ConfigError, Config().withOverrides, xenstore="nowhere")
        self.assertIn("--xenstore", str(e))
        self.assertIn("nowhere", str(e))

    def test_daemonOptions(self) -> None:
        """twistd's options load the file and apply the flags."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("xenstore: embedded\ntimeouts: {create: 7}\n")
        options = Options()
        options.parseOptions(["--config", path, "--rundir", "/tmp/r"])
        config = options["configObject"]
        self.assertEqual(config.rundir, "/tmp/r")
        self.assertEqual(config.xenstore, "embedded")
        self.assertEqual(config.timeouts.create, 7.0)

    def test_simulateFlag(self) -> None:
        """--simulate overrides the file, accepts yes/no, and names itself when bad."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("driver_domain: {simulate: off}\n")
        options = Options()
        options.parseOptions(["--config", path, "--simulate", "yes", "--xenstore", "unix:/s"])
        self.assertEqual(options["configObject"].driver_domain.simulate, "on")
        self.assertEqual(options["configObject"].xenstore, "unix:/s")
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["--simulate", "perhaps"])
        self.assertIn("--simulate = 'perhaps'", str(e))

    def test_daemonOptionsBadFile(self) -> None:
        """A bad file is a usage error carrying the config's message."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("bogus: 1\n")
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", path])
        self.assertIn(f"{path}:1", str(e))


class PoolTests(TestCase):
    """C{pool:}: absent means one host; present, its keys are checked together at start."""

    def test_absentByDefault(self) -> None:
        """Without C{pool:} there is no pool."""
        self.assertIsNone(parseConfig("xenstore: embedded\n").pool)

    def test_parsed(self) -> None:
        """Endpoints normalised (a list or a comma-separated string), the defaults filled in."""
        config = parseConfig(
            "pool:\n  endpoints: 10.0.0.1:2379, http://10.0.0.2:2379\n  host: h1\n  ttl: 4\n"
            "  fence_after: 2\n",
            "f.yaml",
        )
        self.assertEqual(
            config.pool,
            PoolConfig(("http://10.0.0.1:2379", "http://10.0.0.2:2379"), "h1", 4, 2.0, 2.0),
        )

    def test_refused(self) -> None:
        """Each bad value is named with its key, value and line."""
        for text, words in (
            ("pool:\n", "f.yaml: pool.endpoints = []: required"),
            ("pool:\n  endpoints: [ftp://e:1]\n", "f.yaml:2: pool.endpoints = "),
            ("pool:\n  endpoints: [e:1, e:1]\n", "lists one member twice"),
            ("pool:\n  endpoints: [e:1]\n  host: 'a b'\n", "f.yaml:3: pool.host = 'a b'"),
            ("pool:\n  endpoints: [e:1]\n  ttl: 1.5\n", "pool.ttl = 1.5: must be a whole"),
            (
                "pool:\n  endpoints: [e:1]\n  ttl: 5\n  fence_after: 5\n",
                "f.yaml:4: pool.fence_after = 5.0: pool lease TTL (5 s) must be longer",
            ),
            (
                "pool:\n  endpoints: [e:1]\n  timeout: 6\n",
                "f.yaml:3: pool.timeout = 6.0: must be at most pool.fence_after (5)",
            ),
            ("pool:\n  endpoints: [e:1]\n  tls: yes\n", "pool.tls: unknown key"),
        ):
            with self.assertRaises(ConfigError, msg=text) as cm:
                parseConfig(text, "f.yaml")
            self.assertIn(words, str(cm.exception))
