# -*- test-case-name: tests.test_config -*-
"""
The daemon's configuration: a YAML file read with PyYAML's safe loader into
frozen attrs value types.

Every option, its default and its meaning are listed in C{docs/config.md}.
Unknown keys and bad values are refused when the daemon starts, with a
message naming the file and line, the key and the value::

    /etc/xenddev.yaml:7: timeouts.create = -3: must be a number > 0

Typical use::

    config = loadConfig("/etc/xenddev.yaml").withOverrides(rundir="/tmp/run")
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import yaml

from xenddev.driverdomain.kinds import KIND_FACTORIES
from xenddev.errors import XenddevError
from xenddev.pool.errors import PoolConfigError
from xenddev.pool.keys import checkHostName

__all__ = [
    "DEFAULT_ROOT_RUNDIR",
    "Config",
    "ConfigError",
    "DriverDomainConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "PoolConfig",
    "TimeoutsConfig",
    "XmlRpcConfig",
    "defaultRundir",
    "loadConfig",
    "parseConfig",
    "validateTristate",
    "validateXenstoreAddress",
]

#: The run directory of a daemon started as root.
DEFAULT_ROOT_RUNDIR = "/var/run/xenddev"

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
TRISTATE = ("auto", "on", "off")
#: Spellings accepted for C{on}/C{off} in the tri-state keys (and by the flags).
TRISTATE_ALIASES = {"yes": "on", "true": "on", "no": "off", "false": "off"}


class ConfigError(XenddevError, ValueError):
    """
    A configuration file (or an overriding flag) is invalid.

    The message names where (file and line), the key and the value.
    """


def defaultRundir(euid: int | None = None, cwd: str | None = None) -> str:
    """C{/var/run/xenddev} as root, else C{run/} in the working directory."""
    uid = os.geteuid() if euid is None else euid
    if uid == 0:
        return DEFAULT_ROOT_RUNDIR
    return os.path.join(cwd if cwd is not None else os.getcwd(), "run")


def validateTristate(value: str) -> str:
    """
    A tri-state setting: C{auto}, C{on} or C{off} (C{yes}/C{true} and
    C{no}/C{false} mean C{on} and C{off}); raise C{ValueError} otherwise.
    """
    text = TRISTATE_ALIASES.get(value.lower(), value.lower()) if isinstance(value, str) else ""
    if text not in TRISTATE:
        raise ValueError("must be one of: auto, on (yes), off (no)")
    return text


def validateXenstoreAddress(value: str) -> str:
    """
    Check a C{xenstore} setting: C{auto}, C{embedded}, C{unix:PATH} or
    C{xenbus:PATH}; raise C{ValueError} with the reason otherwise.
    """
    if value in ("auto", "embedded"):
        return value
    kind, sep, path = value.partition(":")
    if kind in ("unix", "xenbus") and sep and path:
        if not path.startswith("/"):
            raise ValueError(f"the path in {kind}:PATH must be absolute")
        return value
    raise ValueError("expected auto, embedded, unix:PATH or xenbus:PATH")


@attrs.frozen
class DriverDomainConfig:
    """The local driver-domain agent (C{driver_domain:})."""

    enabled: bool = True
    domid: int = 0
    #: C{("auto",)}: every kind whose tools are present (resolved at start).
    kinds: tuple[str, ...] = ("auto",)
    script_dir: str = "/etc/xen/scripts"
    hotplug: str = "auto"
    hotplug_timeout: float = 40.0
    simulate: str = "auto"
    #: Hotplug scripts run in process instead (L{xenddev.driverdomain.hotplugblock}).
    builtin_scripts: tuple[str, ...] = ()


@attrs.frozen
class TimeoutsConfig:
    """Timeouts in seconds (C{timeouts:})."""

    create: float = 10.0
    destroy: float = 10.0
    request: float = 30.0
    shutdown: float = 30.0
    connect: float = 10.0
    quiesce: float = 60.0


@attrs.frozen
class XmlRpcConfig:
    """The XML-RPC listeners (C{xmlrpc:})."""

    socket: str | None = None
    socket_mode: int = 0o600
    tcp: str | None = None
    interface: str = "127.0.0.1"
    password_file: str | None = None
    tls: str | None = None


@attrs.frozen
class LimitsConfig:
    """What one client of the XML-RPC face may hold (C{limits:})."""

    #: Bytes of one request body; a larger one is refused with HTTP 413.
    body_size: int = 1 << 20
    #: Connections open at once on one listener; more are closed at once.
    connections: int = 128
    #: Seconds a connection may stay silent between requests.
    idle_timeout: float = 60.0
    #: Seconds to receive one whole request (headers and body) from its first byte.
    request_timeout: float = 30.0
    #: Quiesce handles held at once (C{datapath.quiesce}); more are fault 12.
    quiesce_handles: int = 64


@attrs.frozen
class LoggingConfig:
    """Logging (C{logging:})."""

    format: str = "text"
    level: str = "info"
    file: str | None = None


@attrs.frozen
class MetricsConfig:
    """The Prometheus metrics endpoint (C{metrics:}); off by default."""

    enabled: bool = False
    endpoint: str = "tcp:9102:interface=127.0.0.1"


@attrs.frozen
class PoolConfig:
    """
    This host in a pool over etcd (C{pool:}); absent: one host, no etcd.

    TLS and etcd's users (C{ca_file} ... C{password_file}) are checked
    together, files read, by L{xenddev.pool.etcdsecurity.loadEtcdSecurity}.
    """

    #: The etcd members' client URLs (C{http(s)://HOST:PORT}, or C{HOST:PORT}).
    endpoints: tuple[str, ...] = ()
    #: This host's name in the pool (unique: a second daemon with it is refused).
    host: str = attrs.field(factory=socket.gethostname)
    #: Seconds of the host's session lease (whole seconds, etcd's unit).
    ttl: int = 10
    #: Seconds after the last renewal at which the host pauses its data paths.
    fence_after: float = 5.0
    #: Seconds one etcd call may take, across members.
    timeout: float = 2.0
    #: The URL the other hosts' daemons reach this one at (its own
    #: C{xmlrpc.tcp}/C{xmlrpc.tls} listener), published in its membership.
    advertise: str | None = None
    #: One C{user:password} line this daemon calls the other hosts with.
    peer_password_file: str | None = None
    #: The CA certificates the etcd members' certificates must chain to
    #: (C{https://}; without it, the system's trust store).
    ca_file: str | None = None
    #: This host's client certificate and its key, for etcd's C{--client-cert-auth}.
    cert_file: str | None = None
    key_file: str | None = None
    #: The etcd user (etcd's authentication) and the file holding its password.
    user: str | None = None
    password_file: str | None = None

    def security(self) -> Any:
        """
        The TLS and credentials settings checked together and their files
        read (an L{EtcdSecurity<xenddev.pool.etcdsecurity.EtcdSecurity>});
        L{PoolSettingError<xenddev.pool.errors.PoolSettingError>} naming the
        field otherwise.
        """
        from xenddev.pool.etcdsecurity import loadEtcdSecurity

        return loadEtcdSecurity(
            self.endpoints,
            caFile=self.ca_file,
            certFile=self.cert_file,
            keyFile=self.key_file,
            user=self.user,
            passwordFile=self.password_file,
        )


@attrs.frozen
class Config:
    """
    The whole configuration.

    @ivar rundir: where the sockets live (absolute).
    @ivar xenstore: C{auto}, C{embedded}, C{unix:PATH} or C{xenbus:PATH}.
    @ivar source: the file it was read from, if any.
    """

    rundir: str = attrs.field(factory=defaultRundir)
    xenstore: str = "auto"
    driver_domain: DriverDomainConfig = attrs.field(factory=DriverDomainConfig)
    timeouts: TimeoutsConfig = attrs.field(factory=TimeoutsConfig)
    xmlrpc: XmlRpcConfig = attrs.field(factory=XmlRpcConfig)
    limits: LimitsConfig = attrs.field(factory=LimitsConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    #: The pool (C{pool:}); None: one host, no etcd.
    pool: PoolConfig | None = None
    source: str | None = None

    @property
    def socketPath(self) -> str:
        """The XML-RPC UNIX socket: C{xmlrpc.socket}, else C{<rundir>/xenddev.sock}."""
        return self.xmlrpc.socket or os.path.join(self.rundir, "xenddev.sock")

    @property
    def xenstoredSocketPath(self) -> str:
        """The embedded xenstored's socket: C{<rundir>/xenstored/socket}."""
        return os.path.join(self.rundir, "xenstored", "socket")

    def withOverrides(
        self,
        rundir: str | None = None,
        xenstore: str | None = None,
        simulate: str | None = None,
    ) -> Config:
        """
        A copy with command-line flags applied (flags override the file).

        @raise ConfigError: naming the flag and its bad value.
        """
        config = self
        if simulate is not None:
            try:
                mode = validateTristate(simulate)
            except ValueError as e:
                raise ConfigError(f"--simulate = {simulate!r}: {e}") from None
            config = attrs.evolve(
                config, driver_domain=attrs.evolve(config.driver_domain, simulate=mode)
            )
        if rundir is not None:
            if not rundir:
                raise ConfigError("--rundir = '': must not be empty")
            config = attrs.evolve(config, rundir=os.path.abspath(rundir))
        if xenstore is not None:
            try:
                validateXenstoreAddress(xenstore)
            except ValueError as e:
                raise ConfigError(f"--xenstore = {xenstore!r}: {e}") from None
            config = attrs.evolve(config, xenstore=xenstore)
        return config


# The schema: for each section, key -> converter(value, node) -> value.
# Converters raise ValueError with the reason; the caller adds where/what.

Converter = Callable[[Any, yaml.Node], Any]


def _bool(value: Any, node: yaml.Node) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _number(minimum: float = 0.0, strict: bool = True) -> Converter:
    def convert(value: Any, node: yaml.Node) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number {'>' if strict else '>='} {minimum:g}")
        if value < minimum or (strict and value == minimum) or value != value:
            raise ValueError(f"must be a number {'>' if strict else '>='} {minimum:g}")
        return float(value)

    return convert


def _integer(minimum: int) -> Converter:
    def convert(value: Any, node: yaml.Node) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be a whole number >= {minimum}")
        return value

    return convert


def _domid(value: Any, node: yaml.Node) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 0x7FF0:
        raise ValueError("must be a domain id, an integer from 0 to 32751")
    return value


def _string(value: Any, node: yaml.Node) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _optionalString(value: Any, node: yaml.Node) -> str | None:
    if value is None:
        return None
    return _string(value, node)


#: Keys holding file paths; relative ones are taken from the config's directory.
PATH_KEYS = frozenset({"script_dir", "socket", "file", "password_file", "peer_password_file"})
#: The pool's TLS files (its C{password_file} is named above).
PATH_KEYS = PATH_KEYS | {"ca_file", "cert_file", "key_file"}


def _path(value: Any, node: yaml.Node) -> str:
    path = _string(value, node)
    if "\0" in path:
        raise ValueError("must not contain NUL")
    return path


def _optionalPath(value: Any, node: yaml.Node) -> str | None:
    return None if value is None else _path(value, node)


def _choice(*choices: str) -> Converter:
    def convert(value: Any, node: yaml.Node) -> str:
        # YAML 1.1 reads a bare on/off as a boolean: take the source text.
        text = node.value if isinstance(node, yaml.ScalarNode) else value
        if isinstance(value, bool | str) and isinstance(text, str) and text in choices:
            return text
        raise ValueError(f"must be one of: {', '.join(choices)}")

    return convert


def _tristate(value: Any, node: yaml.Node) -> str:
    # YAML 1.1 reads on/off/yes/no as booleans: take the source text.
    text = node.value if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(value, bool | str) or not isinstance(text, str):
        raise ValueError("must be one of: auto, on (yes), off (no)")
    return validateTristate(text)


#: Scripts that have a built-in replacement.
BUILTIN_SCRIPTS = ("block",)


def _builtinScripts(value: Any, node: yaml.Node) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [k.strip() for k in value.split(",") if k.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of script names")
    for name in value:
        if name not in BUILTIN_SCRIPTS:
            raise ValueError(
                f"no built-in script {name!r} (built in: {', '.join(BUILTIN_SCRIPTS)})"
            )
    return tuple(value)


def _kinds(value: Any, node: yaml.Node) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [k.strip() for k in value.split(",") if k.strip()]
    if not isinstance(value, list) or not value:
        raise ValueError("must be auto or a non-empty list of driver-domain kinds")
    if value == ["auto"]:
        return ("auto",)
    for kind in value:
        if kind not in KIND_FACTORIES:
            raise ValueError(
                f"unknown driver-domain kind {kind!r} (known: {', '.join(sorted(KIND_FACTORIES))})"
            )
    return tuple(value)


def _mode(value: Any, node: yaml.Node) -> int:
    # Read the digits as written (YAML would read 600 as decimal, 0600 as octal).
    text = node.value if isinstance(node, yaml.ScalarNode) else ""
    text = text.strip().removeprefix("0o")
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError("must be an octal file mode such as 600")
    mode = int(text, 8)
    if mode & 0o600 != 0o600:
        raise ValueError("must give the owner read and write access")
    if mode & 0o007:
        # Whoever may connect may attach any disk to any domain: root's power.
        raise ValueError("must not give other users access (at most 660: owner and group)")
    return mode


def _xenstore(value: Any, node: yaml.Node) -> str:
    return validateXenstoreAddress(_string(value, node))


def _endpoint(*prefixes: str) -> Converter:
    def convert(value: Any, node: yaml.Node) -> str | None:
        if value is None or value is False:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{prefixes[0]}:{value}"
        text = _string(value, node)
        if text.split(":", 1)[0] not in prefixes:
            raise ValueError(
                f"must be a Twisted endpoint string starting with {' or '.join(prefixes)}: "
                f"(e.g. {prefixes[0]}:8006), or null for off"
            )
        _checkEndpoint(text)
        return text

    return convert


def _checkEndpoint(text: str) -> None:
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), text)
    except Exception as e:  # every kind of parse error
        raise ValueError(f"not a valid endpoint: {e}") from None


def _endpoints(value: Any, node: yaml.Node) -> tuple[str, ...]:
    from xenddev.pool.etcd import normaliseEndpoint

    if isinstance(value, str):
        value = [e.strip() for e in value.split(",") if e.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(e, str) for e in value):
        raise ValueError("must be a non-empty list of etcd client URLs (http://HOST:PORT)")
    try:
        urls = tuple(normaliseEndpoint(e) for e in value)
    except PoolConfigError as e:
        raise ValueError(str(e)) from None
    if len(set(urls)) != len(urls):
        raise ValueError("lists one member twice")
    return urls


def _hostName(value: Any, node: yaml.Node) -> str:
    try:
        return checkHostName(_string(value, node))
    except PoolConfigError as e:
        raise ValueError(str(e)) from None


def _etcdUser(value: Any, node: yaml.Node) -> str:
    text = _string(value, node)
    if not text or len(text) > 256 or not text.isprintable() or any(c.isspace() for c in text):
        raise ValueError("must be an etcd user name: 1-256 printable characters, no spaces")
    return text


def _advertise(value: Any, node: yaml.Node) -> str:
    from xenddev.poolpeers import checkAdvertise

    return checkAdvertise(_string(value, node))


def _interface(value: Any, node: yaml.Node) -> str:
    import ipaddress

    text = _string(value, node)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("must be an IP address such as 127.0.0.1") from None
    return text


SCHEMA: dict[str, tuple[type, dict[str, Converter]]] = {
    "driver_domain": (
        DriverDomainConfig,
        {
            "enabled": _bool,
            "domid": _domid,
            "kinds": _kinds,
            "script_dir": _path,
            "hotplug": _tristate,
            "hotplug_timeout": _number(),
            "simulate": _tristate,
            "builtin_scripts": _builtinScripts,
        },
    ),
    "timeouts": (
        TimeoutsConfig,
        {
            "create": _number(),
            "destroy": _number(),
            "request": _number(),
            "shutdown": _number(strict=False),
            "connect": _number(),
            "quiesce": _number(),
        },
    ),
    "xmlrpc": (
        XmlRpcConfig,
        {
            "socket": _optionalPath,
            "socket_mode": _mode,
            "tcp": _endpoint("tcp"),
            "interface": _interface,
            "password_file": _optionalPath,
            "tls": _endpoint("ssl"),
        },
    ),
    "limits": (
        LimitsConfig,
        {
            "body_size": _integer(1024),
            "connections": _integer(1),
            "idle_timeout": _number(),
            "request_timeout": _number(),
            "quiesce_handles": _integer(1),
        },
    ),
    "logging": (
        LoggingConfig,
        {
            "format": _choice("text", "json"),
            "level": _choice(*LOG_LEVELS),
            "file": _optionalPath,
        },
    ),
    "metrics": (
        MetricsConfig,
        {"enabled": _bool, "endpoint": _endpoint("tcp", "unix", "ssl")},
    ),
    "pool": (
        PoolConfig,
        {
            "endpoints": _endpoints,
            "host": _hostName,
            "ttl": _integer(1),
            "fence_after": _number(),
            "timeout": _number(),
            "advertise": _advertise,
            "peer_password_file": _optionalPath,
            "ca_file": _optionalPath,
            "cert_file": _optionalPath,
            "key_file": _optionalPath,
            "user": _etcdUser,
            "password_file": _optionalPath,
        },
    ),
}

TOP_LEVEL: dict[str, Converter] = {"rundir": _path, "xenstore": _xenstore}


def _where(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _shown(node: yaml.Node, value: Any) -> str:
    if isinstance(node, yaml.ScalarNode):
        return repr(node.value) if isinstance(value, str) else str(node.value or "null")
    return repr(value)


def _mapping(
    node: yaml.Node, source: str, what: str, loader: yaml.SafeLoader
) -> list[tuple[str, yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(source, node)}: {what}: must be a mapping of key: value")
    seen: dict[str, yaml.Node] = {}
    out = []
    for keyNode, valueNode in node.value:
        try:
            key = loader.construct_object(keyNode, deep=True)
        except yaml.YAMLError:
            key = None
        name = f"{what}.{key}" if what != "(top level)" else str(key)
        if not isinstance(key, str):
            raise ConfigError(f"{_where(source, keyNode)}: {name}: keys must be strings")
        if key in seen:
            raise ConfigError(
                f"{_where(source, keyNode)}: {name}: duplicate key "
                f"(first at line {seen[key].start_mark.line + 1})"
            )
        seen[key] = keyNode
        out.append((key, keyNode, valueNode))
    return out


def parseConfig(text: str, source: str = "<config>", cwd: str | None = None) -> Config:
    """
    Parse YAML text (safe loading only) into a L{Config}.

    Relative paths are taken relative to the config file's directory (or
    C{cwd}).

    @raise ConfigError: naming the line, key and value of the first problem.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            line = e.problem_mark.line + 1 if e.problem_mark else 0
            raise ConfigError(f"{source}:{line}: not valid YAML: {e.problem}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if root is None:
            return Config(source=source)
        base = cwd if cwd is not None else os.getcwd()
        values: dict[str, Any] = {}
        for key, keyNode, valueNode in _mapping(root, source, "(top level)", loader):
            if key in TOP_LEVEL:
                values[key] = _convert(TOP_LEVEL[key], key, valueNode, source, loader)
                if key == "rundir":
                    values[key] = os.path.normpath(os.path.join(base, values[key]))
            elif key in SCHEMA:
                cls, table = SCHEMA[key]
                section: dict[str, Any] = {}
                if not (isinstance(valueNode, yaml.ScalarNode) and valueNode.value in ("", "~")):
                    for sub, subKeyNode, subNode in _mapping(valueNode, source, key, loader):
                        name = f"{key}.{sub}"
                        if sub not in table:
                            raise ConfigError(
                                f"{_where(source, subKeyNode)}: {name}: unknown key "
                                f"(known in {key}: {', '.join(table)})"
                            )
                        conv = _convert(table[sub], name, subNode, source, loader)
                        if isinstance(conv, str) and sub in PATH_KEYS:
                            conv = os.path.normpath(os.path.join(base, conv))
                        section[sub] = conv
                values[key] = cls(**section)
            else:
                known = ", ".join([*TOP_LEVEL, *SCHEMA])
                raise ConfigError(f"{_where(source, keyNode)}: {key}: unknown key (known: {known})")
        config = Config(source=source, **values)
    finally:
        loader.dispose()
    _crossCheck(config, root, source)
    return config


def _convert(
    conv: Converter, name: str, node: yaml.Node, source: str, loader: yaml.SafeLoader
) -> Any:
    try:
        value = loader.construct_object(node, deep=True)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{_where(source, node)}: {name} = {node.tag}: {problem}") from None
    try:
        return conv(value, node)
    except ValueError as e:
        raise ConfigError(f"{_where(source, node)}: {name} = {_shown(node, value)}: {e}") from None


def _lineOf(root: yaml.Node | None, section: str, key: str) -> int | None:
    if not isinstance(root, yaml.MappingNode):
        return None
    for k, v in root.value:
        if k.value == section and isinstance(v, yaml.MappingNode):
            for sk, _ in v.value:
                if sk.value == key:
                    return int(sk.start_mark.line) + 1
    return None


def _crossCheck(config: Config, root: yaml.Node | None, source: str) -> None:
    if config.pool is not None:
        _checkPool(config.pool, root, source)
    rpc = config.xmlrpc
    if config.pool is not None and config.pool.advertise and not (rpc.tcp or rpc.tls):
        line = _lineOf(root, "pool", "advertise")
        raise ConfigError(
            f"{source}:{line}: pool.advertise = {config.pool.advertise!r}: the other hosts "
            "reach this daemon on a network listener: set xmlrpc.tcp or xmlrpc.tls"
        )
    if (rpc.tcp or rpc.tls) and not rpc.password_file:
        key = "tcp" if rpc.tcp else "tls"
        line = _lineOf(root, "xmlrpc", key)
        raise ConfigError(
            f"{source}:{line}: xmlrpc.{key} = {getattr(rpc, key)!r}: a network listener "
            f"needs xmlrpc.password_file (HTTP Basic credentials, one user:password a line)"
        )


def _checkPool(pool: PoolConfig, root: yaml.Node | None, source: str) -> None:
    """
    The pool's keys together: endpoints given, a host name, timings that
    can fence, TLS and etcd's user usable (their files read and checked).
    """
    from xenddev.pool.errors import PoolSettingError
    from xenddev.pool.session import checkTiming

    def refuse(key: str, value: Any, why: str) -> ConfigError:
        line = _lineOf(root, "pool", key)
        where = f"{source}:{line}" if line is not None else source
        return ConfigError(f"{where}: pool.{key} = {value!r}: {why}")

    if not pool.endpoints:
        raise refuse("endpoints", [], "required: the etcd members' client URLs")
    try:
        checkHostName(pool.host)  # a host given was checked: this is the default
    except PoolConfigError as e:
        raise refuse("host", pool.host, f"this machine's name (the default): {e}") from None
    try:
        checkTiming(pool.ttl, pool.fence_after)
    except PoolConfigError as e:
        raise refuse("fence_after", pool.fence_after, str(e)) from None
    if pool.timeout > pool.fence_after:
        raise refuse(
            "timeout",
            pool.timeout,
            f"must be at most pool.fence_after ({pool.fence_after:g}): a renewal that can "
            "take longer than the self-fence deadline cannot keep the host live",
        )
    if pool.advertise is not None and pool.peer_password_file is None:
        raise refuse(
            "advertise",
            pool.advertise,
            "needs pool.peer_password_file (the user:password this daemon calls the other "
            "hosts with)",
        )
    try:
        pool.security()
    except PoolSettingError as e:
        raise refuse(e.field, e.value, e.why) from None


def loadConfig(path: str) -> Config:
    """
    Read and check a configuration file.

    @raise ConfigError: if it cannot be read or is invalid.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from None
    return parseConfig(text, path, cwd=os.path.dirname(os.path.abspath(path)))


def defaultsAsMapping() -> Mapping[str, Any]:
    """Every option with its default, as nested dicts (for docs and tests)."""
    out: dict[str, Any] = {"rundir": None, "xenstore": "auto"}
    for section, (cls, _) in SCHEMA.items():
        out[section] = attrs.asdict(cls())
    return out
