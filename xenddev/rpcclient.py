# -*- test-case-name: tests.test_cli -*-
"""
A small blocking XML-RPC client over the daemon's UNIX socket, light enough
for a command-line client that starts once per command.

Why not C{xmlrpc.client}: importing it loads C{http.client} and through it
C{email}, C{ssl}, C{base64}, C{datetime}, C{decimal} and C{urllib} — about
ninety modules, some 40 ms on a host and seconds in a dom0 emulated by QEMU
whose files are read over 9p.  This module needs only C extension modules:
C{_socket} (C{socket.py} would add another ~15 ms building its enums) and
C{pyexpat}, for answers only (imported as itself: C{xml.parsers.expat}
only re-exports it, from three more files).

What it speaks: one HTTP/1.0 C{POST} per call (the server closes the
connection after answering, so no chunked encoding and no keep-alive), the
XML-RPC types C{xmlrpc.client} produces and reads with C{allow_none}
(C{nil}; C{dateTime.iso8601} is returned as its text, C{base64} as
L{bytes}), faults as L{Fault}.  A connection refused with C{EAGAIN} (the
daemon's listen backlog is full) is retried with a short backoff until the
call's deadline.  L{serverProxy} offers the standard library's
C{ServerProxy} over the same transport, for scripts and tests.
"""

from __future__ import annotations

import _socket
import errno
from time import monotonic, sleep

TYPE_CHECKING = False
if TYPE_CHECKING:
    import xmlrpc.client
    from collections.abc import Sequence
    from typing import Any

__all__ = [
    "Fault",
    "ProtocolError",
    "call",
    "checkText",
    "decodeResponse",
    "encodeCall",
    "exchange",
    "serverProxy",
]

#: Answers larger than this are refused (no answer of the daemon comes close).
MAX_RESPONSE = 64 << 20
#: First and longest pause between connection attempts while the backlog is full.
BACKLOG_FIRST_DELAY = 0.005
BACKLOG_MAX_DELAY = 0.1

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
#: A literal CR would reach the server as LF (XML's end-of-line handling).
_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})


class Fault(Exception):
    """
    The daemon answered with an XML-RPC fault.

    @ivar faultCode: the fault's code (see C{docs/xmlrpc.md}).
    @ivar faultString: its message.
    """

    def __init__(self, faultCode: int, faultString: str) -> None:
        super().__init__(faultCode, faultString)
        self.faultCode = faultCode
        self.faultString = faultString

    def __str__(self) -> str:
        return f"fault {self.faultCode}: {self.faultString}"


class ProtocolError(Exception):
    """
    The answer was not a well-formed XML-RPC response over HTTP.

    @ivar status: the HTTP status when that was the problem, else L{None}.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# Requests


def checkText(text: str) -> None:
    """
    Check that C{text} can be sent: XML 1.0 has no form for most control
    characters, and text from the command line that was not UTF-8 holds
    surrogates (C{surrogateescape}).

    @raise ValueError: naming the value and the problem.
    """
    for char in text:
        code = ord(char)
        if 0xD800 <= code < 0xE000:  # a byte that was not UTF-8 (surrogateescape)
            raise ValueError(f"{text!r} is not valid UTF-8")
        if (code < 0x20 and char not in "\t\n\r") or code in (0xFFFE, 0xFFFF):
            raise ValueError(f"{text!r} holds the character {char!r}, which XML cannot carry")


def _escape(text: str) -> str:
    """C{text} checked (L{checkText}) and escaped for XML."""
    checkText(text)
    return text.translate(_ESCAPES)


def _encode(value: object, out: list[str]) -> None:
    """Append C{value} as an XML-RPC C{<value>} to C{out}."""
    if value is None:
        out.append("<value><nil/></value>")
    elif isinstance(value, bool):
        out.append(f"<value><boolean>{int(value)}</boolean></value>")
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"{value} is beyond XML-RPC's 32-bit integers")
        out.append(f"<value><int>{value}</int></value>")
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value} cannot be sent over XML-RPC")
        out.append(f"<value><double>{value!r}</double></value>")
    elif isinstance(value, str):
        out.append(f"<value><string>{_escape(value)}</string></value>")
    elif isinstance(value, list | tuple):
        out.append("<value><array><data>")
        for item in value:
            _encode(item, out)
        out.append("</data></array></value>")
    elif isinstance(value, dict):
        out.append("<value><struct>")
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"struct keys must be strings, not {type(key).__name__}")
            out.append(f"<member><name>{_escape(key)}</name>")
            _encode(item, out)
            out.append("</member>")
        out.append("</struct></value>")
    else:
        raise TypeError(f"cannot send a {type(value).__name__} over XML-RPC")


def encodeCall(method: str, params: Sequence[object]) -> bytes:
    """
    The XML-RPC C{methodCall} body for C{method(*params)}.

    @raise ValueError: a value XML-RPC or XML cannot carry (an integer beyond
        32 bits, NaN, a control character, text that is not UTF-8).
    @raise TypeError: a value of a type XML-RPC has no form for.
    """
    out = [f"<?xml version='1.0'?>\n<methodCall><methodName>{_escape(method)}</methodName>"]
    out.append("<params>")
    for param in params:
        out.append("<param>")
        _encode(param, out)
        out.append("</param>")
    out.append("</params></methodCall>\n")
    return "".join(out).encode("utf-8")


# Responses


class _Decoder:
    """Builds the values of an XML-RPC response from expat's events."""

    def __init__(self) -> None:
        self.stack: list[Any] = []
        self.marks: list[int] = []  # where each open array or struct starts in stack
        self.values: list[int] = []  # len(stack) when each open <value> began
        self.data: list[str] = []
        self.fault = False

    def start(self, tag: str, attributes: object) -> None:
        if tag in ("array", "struct"):
            self.marks.append(len(self.stack))
        elif tag == "value":
            self.values.append(len(self.stack))
        self.data = []

    def text(self, data: str) -> None:
        self.data.append(data)

    def end(self, tag: str) -> None:
        text = "".join(self.data)
        if tag in ("int", "i4", "i8"):
            self.stack.append(_number(int, text, tag))
        elif tag == "boolean":
            if text.strip() not in ("0", "1"):
                raise ProtocolError(f"bad boolean {text!r}")
            self.stack.append(text.strip() == "1")
        elif tag == "double":
            self.stack.append(_number(float, text, tag))
        elif tag in ("string", "dateTime.iso8601", "name"):
            self.stack.append(text)
        elif tag == "nil":
            self.stack.append(None)
        elif tag == "base64":
            import binascii

            try:
                self.stack.append(binascii.a2b_base64(text.encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                raise ProtocolError("bad base64 value") from None
        elif tag == "array":
            mark = self.marks.pop()
            items = self.stack[mark:]
            del self.stack[mark:]
            self.stack.append(items)
        elif tag == "struct":
            mark = self.marks.pop()
            items = self.stack[mark:]
            del self.stack[mark:]
            if len(items) % 2:
                raise ProtocolError("struct member without a value")
            self.stack.append(dict(zip(items[::2], items[1::2], strict=True)))
        elif tag == "value":
            if len(self.stack) == self.values.pop():  # no type element: a string
                self.stack.append(text)
        elif tag == "fault":
            self.fault = True
        elif tag not in ("methodResponse", "params", "param", "data", "member"):
            raise ProtocolError(f"unknown XML-RPC element <{tag}>")
        self.data = []


def _number(kind: type[int] | type[float], text: str, tag: str) -> Any:
    try:
        return kind(text.strip())
    except ValueError:
        raise ProtocolError(f"bad {tag} {text[:40]!r}") from None


def decodeResponse(body: bytes) -> Any:
    """
    The result of an XML-RPC C{methodResponse}.

    @raise Fault: the response is a fault.
    @raise ProtocolError: it is not a well-formed response.
    """
    import pyexpat

    decoder = _Decoder()
    parser = pyexpat.ParserCreate()
    parser.buffer_text = True
    parser.StartElementHandler = decoder.start
    parser.EndElementHandler = decoder.end
    parser.CharacterDataHandler = decoder.text
    try:
        parser.Parse(body, True)
    except pyexpat.ExpatError as e:
        raise ProtocolError(f"malformed XML-RPC response: {e}") from None
    stack = decoder.stack
    if decoder.fault:
        fault = stack[0] if len(stack) == 1 else None
        if not isinstance(fault, dict) or not isinstance(fault.get("faultCode"), int):
            raise ProtocolError("malformed XML-RPC fault")
        raise Fault(fault["faultCode"], str(fault.get("faultString", "")))
    if len(stack) != 1:
        raise ProtocolError(f"an XML-RPC response holds one value, not {len(stack)}")
    return stack[0]


# HTTP over the socket


def _connect(path: str, deadline: float | None) -> Any:
    """
    A socket connected to C{path}; while the listen backlog is full
    (C{EAGAIN}), try again with a growing pause until C{deadline}.

    @raise TimeoutError: the backlog stayed full until the deadline.
    """
    delay = BACKLOG_FIRST_DELAY
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(path)
            return sock
        except BlockingIOError as e:
            sock.close()
            if e.errno != errno.EAGAIN:
                raise
            left = _remaining(deadline)
            if left is not None and left <= delay:
                raise TimeoutError(
                    errno.ETIMEDOUT, "the daemon did not accept the connection (backlog full)"
                ) from None
            sleep(delay)
            delay = min(delay * 2, BACKLOG_MAX_DELAY)
        except BaseException:
            sock.close()
            raise


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until C{deadline} (L{None}: no deadline)."""
    if deadline is None:
        return None
    left = deadline - monotonic()
    if left <= 0:
        raise TimeoutError(errno.ETIMEDOUT, "timed out")
    return left


def exchange(path: str, body: bytes, timeout: float | None, handler: str = "/RPC2") -> bytes:
    """
    POST C{body} to the XML-RPC server on socket C{path}; the answer's body.

    @param timeout: seconds for the whole exchange (L{None}: no limit).
    @raise OSError: the connection failed (C{TimeoutError} past the timeout).
    @raise ProtocolError: the answer is not a complete HTTP 200 answer.
    """
    deadline = None if timeout is None else monotonic() + timeout
    head = (
        f"POST {handler} HTTP/1.0\r\nHost: xenddev\r\nUser-Agent: xenddev-cli\r\n"
        f"Content-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock = _connect(path, deadline)
    try:
        sock.sendall(head.encode("ascii") + body)
        chunks = []
        size = 0
        while True:
            sock.settimeout(_remaining(deadline))
            chunk = sock.recv(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_RESPONSE:
                raise ProtocolError(f"the answer exceeds {MAX_RESPONSE} bytes")
            chunks.append(chunk)
    finally:
        sock.close()
    return _httpBody(b"".join(chunks))


def _httpBody(answer: bytes) -> bytes:
    """The body of an HTTP/1.x answer read to its end; only 200 is accepted."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        raise ProtocolError("the daemon closed the connection without a complete answer")
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
        raise ProtocolError(f"not an HTTP answer: {lines[0][:80]!r}")
    if code != "200":
        raise ProtocolError(f"HTTP {code} {reason}".rstrip(), int(code))
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length" and value.isascii() and value.isdigit():
            if int(value) != len(body):
                raise ProtocolError(f"answer truncated: {len(body)} of {value} bytes")
        elif name == "transfer-encoding" and value.lower() != "identity":
            raise ProtocolError(f"unexpected transfer encoding {value!r}")
    return body


def call(path: str, method: str, params: Sequence[object], timeout: float | None) -> Any:
    """
    Call C{method(*params)} on the XML-RPC server on socket C{path}.

    @param timeout: seconds for the whole call, connecting included (L{None}:
        no limit).
    @raise Fault: the server answered with a fault.
    @raise ProtocolError: the answer is not a well-formed XML-RPC answer.
    @raise OSError: the connection failed; C{TimeoutError} past the timeout.
    @raise ValueError: a parameter XML-RPC cannot carry (see L{encodeCall}).
    """
    return decodeResponse(exchange(path, encodeCall(method, params), timeout))


class _StdlibTransport:
    """C{xmlrpc.client}'s transport interface over L{exchange}."""

    def __init__(self, path: str, timeout: float | None) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, host: str, handler: str, body: bytes, verbose: bool = False) -> Any:
        """One call: the response's parameters (faults raise C{xmlrpc.client.Fault})."""
        import xmlrpc.client

        try:
            answer = exchange(self.path, body, self.timeout, handler or "/RPC2")
        except ProtocolError as e:
            if e.status is None:
                raise
            raise xmlrpc.client.ProtocolError(host + handler, e.status, str(e), {}) from None
        return xmlrpc.client.loads(answer)[0]

    def close(self) -> None:
        """Nothing to close: each call has its own connection."""


def serverProxy(path: str, timeout: float | None) -> xmlrpc.client.ServerProxy:
    """
    The standard library's C{ServerProxy} for the daemon on socket C{path}
    (C{allow_none}), over this module's transport: faults raise
    C{xmlrpc.client.Fault}; the connection is retried while the backlog is
    full.
    """
    import xmlrpc.client
    from typing import cast

    transport = cast(xmlrpc.client.Transport, _StdlibTransport(path, timeout))
    return xmlrpc.client.ServerProxy("http://xenddev/RPC2", transport=transport, allow_none=True)
