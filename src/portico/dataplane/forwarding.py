"""Rewriting heads as they cross the proxy: the request going up, the response coming down.

Both directions drop hop-by-hop fields (the standard set and every token named in
``Connection``) and take over body framing: Portico de-frames what it parses and re-frames
what it writes, so a framing header never passes through unchecked.
"""

from __future__ import annotations

from portico.codec.events import RequestHead, ResponseHead
from portico.codec.headers import FORWARDING, HOP_BY_HOP
from portico.dataplane.clock import date_line
from portico.runtime.snapshot import ForwardingPolicy

_SKIP_UP = HOP_BY_HOP | {b"expect"}  # Portico answers 100-continue itself (as nginx does)


class ClientInfo:
    """Facts about a client connection, computed once when it connects."""

    __slots__ = ("cert_headers", "ip", "ip_bytes", "port", "proto", "trusted")

    def __init__(self, ip: str, port: int, trusted: bool, proto: bytes = b"http") -> None:
        self.ip = ip
        self.port = port
        self.ip_bytes = ip.encode("ascii")
        self.trusted = trusted
        self.proto = proto
        # Header lines about a verified client certificate (dataplane.tls), or b"".
        self.cert_headers = b""


def _forwarded_node(ip: bytes) -> bytes:
    # RFC 7239 6: IPv6 addresses are bracketed and quoted.
    return b'"[' + ip + b']"' if 58 in ip else ip  # 58 = ":" (an int needle is cheaper)


def request_head(
    head: RequestHead,
    target: bytes,
    host: bytes | None,
    client: ClientInfo,
    policy: ForwardingPolicy,
    host_override: bytes | None,
    fallback_host: bytes,
) -> bytes:
    """The request head to send upstream (always HTTP/1.1, so it always carries a Host)."""
    tokens = head.connection_tokens
    trusted = client.trusted
    out = [head.method, b" ", target, b" HTTP/1.1\r\n"]
    xff: bytes | None = None
    fwd: bytes | None = None
    xproto: bytes | None = None
    via: bytes | None = None
    upgrade: bytes | None = None
    host_written = False
    kept_xfh = kept_real_ip = False  # a trusted proxy's own values, passed on as they are
    headers = head.headers
    strip = policy.strip  # client-certificate header names: only Portico sets them
    if strip is not None:
        headers = [(n, v) for n, v in headers if n.lower() not in strip]
    for name, value in headers:
        lname = name.lower()
        if lname in _SKIP_UP or (tokens and lname in tokens):
            if lname == b"upgrade" and head.upgrade:
                upgrade = value
            continue
        if lname in FORWARDING:
            if not trusted:
                continue
            if lname == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
                continue
            if lname == b"forwarded":
                fwd = value if fwd is None else fwd + b", " + value
                continue
            if lname == b"x-forwarded-proto":
                xproto = value
                continue
            # A trusted proxy's X-Forwarded-Host and X-Real-IP are kept as they are.
            if lname == b"x-forwarded-host":
                kept_xfh = True
            elif lname == b"x-real-ip":
                kept_real_ip = True
        elif lname == b"host":
            if host_override is not None or host_written:
                continue
            # An absolute-form target's authority replaces Host (RFC 9112 3.2.2).
            value = host if host is not None else value
            host_written = True
        elif lname == b"via":
            via = value if via is None else via + b", " + value
            continue
        out += (name, b": ", value, b"\r\n")
    if host_override is not None:
        out += (b"Host: ", host_override, b"\r\n")
    elif not host_written:
        out += (b"Host: ", host if host is not None else fallback_host, b"\r\n")
    if policy.x_forwarded:
        ip = client.ip_bytes
        out += (b"X-Forwarded-For: ", (xff + b", " + ip) if xff else ip, b"\r\n")
        out += (b"X-Forwarded-Proto: ", xproto or client.proto, b"\r\n")
        if host is not None and not kept_xfh:
            out += (b"X-Forwarded-Host: ", host, b"\r\n")
        if not kept_real_ip:
            out += (b"X-Real-IP: ", ip, b"\r\n")
    elif xff is not None:
        out += (b"X-Forwarded-For: ", xff, b"\r\n")
    if policy.forwarded:
        element = b"for=" + _forwarded_node(client.ip_bytes) + b";proto=" + client.proto
        if host is not None:
            element += b';host="' + host + b'"'
        out += (b"Forwarded: ", (fwd + b", " + element) if fwd else element, b"\r\n")
    elif fwd is not None:
        out += (b"Forwarded: ", fwd, b"\r\n")
    if policy.via is not None:
        v = b"1.0 " + policy.via[4:] if head.version == b"1.0" else policy.via
        out += (b"Via: ", (via + b", " + v) if via else v, b"\r\n")
    elif via is not None:
        out += (b"Via: ", via, b"\r\n")
    if strip is not None and client.cert_headers:  # only ever set when strip is
        out.append(client.cert_headers)
    if head.framing == "chunked":
        out.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade is not None:
        out += (b"Upgrade: ", upgrade, b"\r\nConnection: upgrade\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def response_head(
    resp: ResponseHead,
    *,
    chunked: bool,
    keep_alive: bool,
    client_version: bytes,
    via: bytes | None,
    extra: bytes = b"",
) -> bytes:
    """The response head for the client.

    ``chunked``: Portico re-chunks the body (upstream chunked or close-delimited, client 1.1).
    ``keep_alive``: whether the client connection stays open after this response.
    """
    tokens = resp.connection_tokens
    out = [b"HTTP/1.1 %d " % resp.status, resp.reason, b"\r\n"]
    upgrade = resp.status == 101
    via_in: bytes | None = None
    dated = False
    for name, value in resp.headers:
        lname = name.lower()
        if lname == b"date":
            dated = True
        if lname in HOP_BY_HOP or (tokens and lname in tokens):
            if upgrade and lname == b"upgrade":
                out += (name, b": ", value, b"\r\n")
            continue
        if lname == b"content-length" and chunked:
            continue
        if via is not None and lname == b"via":
            via_in = value if via_in is None else via_in + b", " + value
            continue
        out += (name, b": ", value, b"\r\n")
    if via is not None:
        out += (b"Via: ", (via_in + b", " + via) if via_in else via, b"\r\n")
    if not dated and resp.status >= 200:
        out.append(date_line())  # RFC 9110 6.6.1, as nginx does
    if upgrade:
        out.append(b"Connection: upgrade\r\n")
    elif chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if extra:
        out.append(extra)
    if not upgrade:
        if not keep_alive:
            out.append(b"Connection: close\r\n")
        elif client_version == b"1.0":
            out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """``http://host:port/path?q`` -> (``/path?q``, ``host:port``); None if not absolute-form."""
    scheme_end = target.find(b"://")
    if scheme_end <= 0 or target[:scheme_end].lower() not in (b"http", b"https"):
        return None
    rest = target[scheme_end + 3 :]
    slash = rest.find(b"/")
    query = rest.find(b"?")
    cut = min(i for i in (slash, query, len(rest)) if i != -1)
    authority, path = rest[:cut], rest[cut:]
    if b"@" in authority or not authority:
        return None
    if not path.startswith(b"/"):
        path = b"/" + path
    return path, authority
