"""Attack 1: inputs that ended the process or held a TCP connection forever.

  - ~81 KB of "\\n\\rX" repeated on one TCP connection (the framer used to recurse once per
    sequence and overflow the stack);
  - a 1 MB header line that never ends;
  - a slowloris sender (one byte of a header every 0.5 s).
Defended: each connection is closed (or answered 4xx/5xx, e.g. 513) within a bound, the process
is alive and answers an OPTIONS over UDP within 1 s afterwards.
"""

import socket
import time

import sipattack as sa


def tcp_connect(server, src_ip):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((src_ip, 0))
    s.settimeout(3)
    s.connect(server)
    return s


def push(s, data, seconds):
    """Sends data until done, the peer closes, or `seconds` pass. Returns (bytes sent, closed)."""
    sent = 0
    deadline = time.monotonic() + seconds
    view = memoryview(data)
    while sent < len(data) and time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            sent += s.send(view[sent:sent + 16384])
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return sent, True
    return sent, False


def outcome(s, seconds):
    """Waits up to `seconds` for the server to close or answer. Returns (closed, status, secs)."""
    start = time.monotonic()
    deadline = start + seconds
    buf = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return True, None, time.monotonic() - start
        if not chunk:
            status = sa.Msg(buf).status if buf.startswith(b"SIP/2.0 ") else None
            return True, status, time.monotonic() - start
        buf += chunk
        if buf.startswith(b"SIP/2.0 ") and b"\r\n\r\n" in buf:
            status = sa.Msg(buf).status
            if status and status >= 400:
                return False, status, time.monotonic() - start
    status = sa.Msg(buf).status if buf.startswith(b"SIP/2.0 ") else None
    return False, status, time.monotonic() - start


def alive_and_serving(c, name, pid, server):
    is_alive = sa.alive(pid)
    secs = sa.options_ok(server, "127.0.0.1", 1.0) if is_alive else None
    c.check(f"{name}: process alive and serving", is_alive and secs is not None,
            f"pid {pid} {'alive' if is_alive else 'GONE'}, UDP OPTIONS "
            + (f"answered 200 in {secs * 1000:.0f} ms" if secs is not None else "not answered within 1 s"))
    return is_alive


def newline_flood(c, a, server, cfg):
    """~81 KB of "\\n\\rX" on one TCP connection."""
    data = b"\n\rX" * 27000
    s = tcp_connect(server, "127.0.0.2")
    sent, closed_early = push(s, data, 5)
    closed, status, _secs = (True, None, 0.0) if closed_early else outcome(s, 5)
    s.close()
    c.check("81 KB of \\n\\rX on TCP: connection closed or refused", closed or (status or 0) >= 400,
            f"{sent} B accepted, " + ("closed" if closed else "still open after 5 s")
            + (f", answered {status}" if status else ""))


def long_header(c, a, server, cfg):
    """A 1 MB header line that never ends."""
    max_size = sa.cfg_get(cfg, "server.max_message_size", 65535)
    s = tcp_connect(server, "127.0.0.2")
    head = (b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bKx\r\n"
            b"X-Never-Ends: ")
    data = head + b"a" * (1 << 20)
    sent, closed_early = push(s, data, 8)
    closed, status, _secs = (True, None, 0.0) if closed_early else outcome(s, 5)
    s.close()
    c.check("1 MB never-ending header: connection closed or refused",
            closed or (status or 0) >= 400,
            f"{sent} B accepted of {len(data)} (max_message_size {max_size}), "
            + ("closed" if closed else "still open") + (f", answered {status}" if status else ""))


def slowloris(c, a, server, cfg):
    """A header that grows by one byte every 0.5 s."""
    header_timeout = sa.cfg_get(cfg, "limits.tcp_message_timeout", None)
    bound = (header_timeout if header_timeout is not None else 10) + 5
    s = tcp_connect(server, "127.0.0.2")
    start = time.monotonic()
    closed = False
    sent = 0
    try:
        s.sendall(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nX-Slow: ")
        s.setblocking(False)
        while time.monotonic() - start < bound:
            time.sleep(0.5)
            try:
                if s.recv(4096, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed = True
                break
            try:
                sent += s.send(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
    finally:
        s.close()
    held = time.monotonic() - start
    c.check("slowloris header (1 B / 0.5 s): connection closed by the header deadline",
            closed, f"{'closed' if closed else 'still open'} after {held:.1f} s, {sent} B trickled "
            f"(limits.tcp_message_timeout {header_timeout if header_timeout is not None else 'unset'}, "
            f"bound {bound} s)")


STEPS = {"newline": newline_flood, "header": long_header, "slowloris": slowloris}


def main():
    ap = sa.common_args(__doc__)
    ap.add_argument("--step", choices=list(STEPS), required=True)
    a = ap.parse_args()
    c = sa.Checks("crash")
    server = sa.parse_addr(a.server)
    cfg = sa.load_config(a.config)
    STEPS[a.step](c, a, server, cfg)
    alive_and_serving(c, f"after {a.step}", a.pid, server)
    c.done()


if __name__ == "__main__":
    main()
