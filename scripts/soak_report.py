#!/usr/bin/env python3
"""Sampler, verdict and plot of scripts/soak.sh (python3 standard library only).

    soak_report.py sample --pid PID --control 127.0.0.1:PORT --csv OUT.csv --sample-s 10
        --idle-s 40 --deadline UNIX_S --uac PID:STATFILE ...
      Every --sample-s seconds, one CSV row: t_s, calls_done, rss_kb, pss_kb, fds, sessions,
      ports, transactions, media_calls, packets, cpu_s, phase. Sources: /proc/PID/smaps_rollup
      (Rss, Pss), /proc/PID/fd (entries), /proc/PID/stat (utime+stime), the control endpoint's
      /api/stats (media_sessions, relay_ports_in_use, proxy_transactions{side=server} +
      {side=client}, media_calls, relay_forwarded_packets) and the callers' SIPp -trace_stat
      files (SuccessfulCall(C) + FailedCall(C)). Phase "load" while a caller runs, then "idle"
      for --idle-s seconds (one last sample at its end). At --deadline the callers still running
      are sent SIGTERM (by PID) and the run is marked over its time limit. Exit 0.

    soak_report.py report --csv OUT.csv --svg OUT.svg --warmup 0.2 --warmup-min-s 40 --rss-tol 5
        --fd-slack 16 [--fds-before N --rss-before KB --pss-before KB]
        --idle-s 40 --uac NAME:PLANNED:STATFILE ... --uas NAME:STATFILE ... [--over-time]
      Prints the RSS curve summary and the pass criteria, writes the SVG plot, exits 1 on FAIL.

RSS flatness (the definition used): the load-phase samples from the end of the warm-up
(t >= max(WARMUP x the load phase's length, WARMUP_MIN_S)) to the end of the load phase; their mean M, max and
min; the deviation max(max - M, M - min) / M must be <= RSS_TOL % (i.e. every such sample
within +-RSS_TOL % of their mean). WARMUP_MIN_S exists because the server keeps every finished
UDP transaction 32 s (RFC 3261 Timer D/J/K/L/M): the transaction table, and the memory with it,
fills for the first 32 s + the hold time before it reaches its steady state. The spread (max - min) / M and the least-squares slope of
RSS over calls done (kB per 1000 calls) are printed too.
"""
import argparse
import csv
import json
import os
import signal
import sys
import time
import urllib.request

COLUMNS = ["t_s", "calls_done", "rss_kb", "pss_kb", "fds", "sessions", "ports", "transactions",
           "media_calls", "packets", "cpu_s", "phase"]
TICKS = os.sysconf("SC_CLK_TCK")


def sipp_stat(path):
    """last row of a SIPp -trace_stat file -> dict (empty when not written yet)"""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f, delimiter=";") if r]
    except OSError:
        return {}
    if len(rows) < 2:
        return {}
    d = dict(zip(rows[0], rows[-1]))

    def num(k):
        try:
            return int(float(d.get(k, "0") or 0))
        except ValueError:
            return 0

    return {"created": num("TotalCallCreated"), "successful": num("SuccessfulCall(C)"),
            "failed": num("FailedCall(C)"), "retrans": num("Retransmissions(C)"),
            "timeouts": num("FailedTimeoutOnRecv(C)"), "unexpected": num("FailedUnexpectedMessage(C)")}


def alive(pid):
    """running and not a zombie"""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def proc_sample(pid):
    rss = pss = None
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    try:
        fds = len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        fds = None
    try:
        with open("/proc/%d/stat" % pid) as f:
            v = f.read().rsplit(")", 1)[1].split()
        cpu = (int(v[11]) + int(v[12])) / TICKS
    except (OSError, IndexError, ValueError):
        cpu = None
    return rss, pss, fds, cpu


def control_stats(addr):
    try:
        with urllib.request.urlopen("http://%s/api/stats" % addr, timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def cmd_sample(a):
    uacs = [(int(p), f) for p, f in (x.split(":", 1) for x in a.uac)]
    t0 = time.monotonic()
    idle_from = None
    over = False
    out = open(a.csv, "w", newline="")
    w = csv.writer(out)
    w.writerow(COLUMNS)

    def sample(phase):
        rss, pss, fds, cpu = proc_sample(a.pid)
        st = control_stats(a.control) or {}
        done = 0
        for _, f in uacs:
            s = sipp_stat(f)
            done += s.get("successful", 0) + s.get("failed", 0)
        txn = None
        if "proxy_transactions{side=server}" in st:
            txn = st["proxy_transactions{side=server}"] + st.get("proxy_transactions{side=client}", 0)
        row = [round(time.monotonic() - t0, 1), done, rss, pss, fds, st.get("media_sessions"),
               st.get("relay_ports_in_use"), txn, st.get("media_calls"), st.get("relay_forwarded_packets"),
               None if cpu is None else round(cpu, 2), phase]
        w.writerow(["" if v is None else v for v in row])
        out.flush()
        print("  t=%6.1fs %-4s calls=%-7s rss=%s kB pss=%s kB fds=%s sessions=%s ports=%s transactions=%s"
              " packets=%s" % (row[0], phase, done, rss, pss, fds, row[5], row[6], txn, row[9]), flush=True)

    sample("load")
    next_t = time.monotonic() + a.sample_s
    while True:
        now = time.monotonic()
        if idle_from is None and not any(alive(p) for p, _ in uacs):
            idle_from = now
            print("  callers done at t=%.1fs; %d s idle (transaction timers, relay)" % (now - t0, a.idle_s),
                  flush=True)
            sample("idle")
            next_t = now + a.sample_s
        if idle_from is not None and now >= idle_from + a.idle_s:
            sample("idle")
            break
        if idle_from is None and time.time() >= a.deadline:
            over = True
            print("  HARD LIMIT reached at t=%.1fs: stopping the callers" % (now - t0), flush=True)
            for p, _ in uacs:
                if alive(p):
                    try:
                        os.kill(p, signal.SIGTERM)
                    except OSError:
                        pass
            time.sleep(2)
            idle_from = time.monotonic()
            continue
        if not alive(a.pid):
            print("  sipedge pid %d is gone (crash?)" % a.pid, flush=True)
            sample(("idle" if idle_from is not None else "load"))
            break
        if now >= next_t:
            sample("load" if idle_from is None else "idle")
            next_t += a.sample_s
        end = idle_from + a.idle_s if idle_from is not None else next_t
        time.sleep(max(0.05, min(0.5, min(next_t, end) - time.monotonic())))
    out.close()
    if over:
        open(a.csv + ".over_time", "w").close()


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def svg_plot(path, rows, warm_t, load_end, band):
    """two panels by hand: memory (RSS, PSS; MB) and the relay/transaction gauges, over t"""
    W, H, L, R, T, P = 900, 560, 70, 160, 30, 230
    ts = [r["t_s"] for r in rows]
    tmax = max(ts) or 1.0
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">'
           % (W, H), '<rect width="100%" height="100%" fill="white"/>']

    def panel(y0, series, title, unit):
        vals = [v for _, _, pts in series for _, v in pts if v is not None]
        vmax = max(vals + [1.0]) * 1.1
        x = lambda t: L + (W - L - R) * t / tmax
        y = lambda v: y0 + P - P * v / vmax
        out.append('<text x="%d" y="%d" font-size="13">%s</text>' % (L, y0 - 8, title))
        out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#888"/>' % (L, y0, W - L - R, P))
        for i in range(5):
            v = vmax * i / 4
            out.append('<text x="%d" y="%.1f" text-anchor="end">%.0f %s</text>' % (L - 4, y(v) + 4, v, unit))
            out.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#eee"/>' % (L, W - R, y(v), y(v)))
        for t in (warm_t, load_end):
            if t is not None:
                out.append('<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#999" stroke-dasharray="4,3"/>'
                           % (x(t), x(t), y0, y0 + P))
        for i, (name, color, pts) in enumerate(series):
            p = " ".join("%.1f,%.1f" % (x(t), y(v)) for t, v in pts if v is not None)
            out.append('<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>' % (color, p))
            out.append('<text x="%d" y="%d" fill="%s">%s</text>' % (W - R + 8, y0 + 14 + 14 * i, color, name))
        return y

    mem = [("RSS", "#c00", [(r["t_s"], r["rss_kb"] / 1024 if r["rss_kb"] is not None else None) for r in rows]),
           ("PSS", "#06c", [(r["t_s"], r["pss_kb"] / 1024 if r["pss_kb"] is not None else None) for r in rows])]
    y = panel(T + 10, mem, "sipedge memory (MB); dashed: end of warm-up, end of calls", "MB")
    if band:
        lo, hi = band
        out.append('<rect x="%d" y="%.1f" width="%d" height="%.1f" fill="#c00" fill-opacity="0.08"/>'
                   % (L, y(hi / 1024), W - L - R, y(lo / 1024) - y(hi / 1024)))
        out.append('<text x="%d" y="%d" fill="#c00">+-band around the</text>' % (W - R + 8, T + 10 + 50))
        out.append('<text x="%d" y="%d" fill="#c00">post-warm-up mean</text>' % (W - R + 8, T + 10 + 64))
    g = [("sessions", "#090", [(r["t_s"], r["sessions"]) for r in rows]),
         ("ports / 4", "#c60", [(r["t_s"], r["ports"] / 4 if r["ports"] is not None else None) for r in rows]),
         ("transactions / 10", "#609", [(r["t_s"], r["transactions"] / 10 if r["transactions"] is not None else None)
                                        for r in rows]),
         ("open fds", "#555", [(r["t_s"], r["fds"]) for r in rows])]
    panel(T + 10 + P + 50, g, "relay sessions, ports, transactions, fds (t in s, last sample at %.0f s)" % tmax, "")
    out.append('<text x="%d" y="%d">t (s)</text>' % ((W - R) // 2, H - 8))
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def cmd_report(a):
    rows = []
    with open(a.csv, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (r[k] if k == "phase" else num(r[k])) for k in COLUMNS})
    fails = []
    if not rows:
        print("soak: no samples")
        return 1
    load = [r for r in rows if r["phase"] == "load"]
    idle = [r for r in rows if r["phase"] == "idle"]
    load_end = idle[0]["t_s"] if idle else rows[-1]["t_s"]
    warm_t = max(a.warmup * load_end, a.warmup_min_s)
    steady = [r for r in load if r["t_s"] >= warm_t and r["rss_kb"] is not None]
    band = None
    print("\nRSS curve (sipedge, kB; %d samples every ~%s s; load phase %.0f s; warm-up %.0f s = the larger of"
          " %.0f %% of it and %.0f s):" % (len(rows), a.sample_s, load_end, warm_t, a.warmup * 100, a.warmup_min_s))
    if a.fds_before is not None:
        print("  before the calls:      RSS %s  PSS %s  fds %d" % (fmt(a.rss_before), fmt(a.pss_before), a.fds_before))
    first = next((r for r in rows if r["rss_kb"] is not None), None)
    if first:
        print("  first sample:          RSS %d  PSS %d  fds %s" % (first["rss_kb"], first["pss_kb"] or 0, fmt(first["fds"])))
    peak = max((r for r in rows if r["rss_kb"] is not None), key=lambda r: r["rss_kb"], default=None)
    if peak:
        print("  peak:                  RSS %d at t=%.0f s" % (peak["rss_kb"], peak["t_s"]))
    if len(steady) >= 3:
        v = [r["rss_kb"] for r in steady]
        mean = sum(v) / len(v)
        dev = max(max(v) - mean, mean - min(v)) / mean * 100
        spread = (max(v) - min(v)) / mean * 100
        xs = [r["calls_done"] for r in steady]
        mx = sum(xs) / len(xs)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = (sum((x - mx) * (y - mean) for x, y in zip(xs, v)) / sxx * 1000) if sxx else 0.0
        band = (mean * (1 - a.rss_tol / 100), mean * (1 + a.rss_tol / 100))
        print("  after warm-up (%d samples, t %.0f..%.0f s, calls %d..%d): mean %.0f, min %d, max %d;"
              " deviation from the mean %.2f %% (limit %.1f %%), spread (max-min)/mean %.2f %%,"
              " slope %+.1f kB per 1000 calls"
              % (len(v), steady[0]["t_s"], steady[-1]["t_s"], xs[0], xs[-1], mean, min(v), max(v), dev,
                 a.rss_tol, spread, slope))
        pss = [r["pss_kb"] for r in steady if r["pss_kb"] is not None]
        if pss:
            print("  PSS after warm-up: min %d, max %d, mean %.0f" % (min(pss), max(pss), sum(pss) / len(pss)))
        if dev > a.rss_tol:
            fails.append("RSS after warm-up deviates %.2f %% from its mean (limit %.1f %%)" % (dev, a.rss_tol))
    else:
        fails.append("only %d load samples after warm-up (need >= 3: more CALLS or a shorter SAMPLE_S)" % len(steady))
    last = rows[-1]
    print("  after %s s idle:        RSS %s  PSS %s  fds %s" % (a.idle_s, fmt(last["rss_kb"]), fmt(last["pss_kb"]),
                                                             fmt(last["fds"])))
    cpu0 = next((r["cpu_s"] for r in rows if r["cpu_s"] is not None), None)
    cpu1 = next((r["cpu_s"] for r in reversed(load + idle[:1]) if r["cpu_s"] is not None), None)
    done = max((r["calls_done"] or 0) for r in rows)
    if cpu0 is not None and cpu1 is not None and done:
        print("  sipedge CPU over the load phase: %.1f s = %.3f ms per call (%d calls, all endings)"
              % (cpu1 - cpu0, (cpu1 - cpu0) * 1000 / done, done))
    peak_s = max((r["sessions"] or 0) for r in rows)
    peak_t = max((r["transactions"] or 0) for r in rows)
    print("  peak relay sessions %d, peak ports %d, peak transactions %d"
          % (peak_s, max((r["ports"] or 0) for r in rows), peak_t))

    print("\nSIPp (planned, successful, failed, retransmissions; callers then callees):")
    for spec in a.uac:
        name, planned, f = spec.split(":", 2)
        s = sipp_stat(f)
        print("  caller %-11s planned %-7s ok %-7s failed %-5s retrans %s"
              % (name, planned, s.get("successful"), s.get("failed"), s.get("retrans")))
        if s.get("failed", 1) != 0 or s.get("successful") != int(planned):
            fails.append("caller %s: %s of %s calls successful, %s failed"
                         % (name, s.get("successful"), planned, s.get("failed")))
    for spec in a.uas:
        name, f = spec.split(":", 1)
        s = sipp_stat(f)
        print("  callee %-11s ok %-7s failed %-5s retrans %s" % (name, s.get("successful"), s.get("failed"),
                                                               s.get("retrans")))
        if s.get("failed", 1) != 0:
            fails.append("callee %s: %s failed calls" % (name, s.get("failed")))

    print("\nafter the calls ended and %s s idle (RFC 3261 timers: 32 s):" % a.idle_s)
    for k in ("sessions", "ports", "media_calls", "transactions"):
        print("  %-13s %s" % (k, fmt(last[k])))
        if last[k] is None:
            fails.append("%s not readable at the end (control endpoint down?)" % k)
        elif last[k] != 0:
            fails.append("%s left after %s s idle: %d" % (k, a.idle_s, last[k]))
    if idle and idle[-1]["t_s"] - load_end < min(34, a.idle_s) - 1:
        fails.append("idle phase shorter than %s s" % min(34, a.idle_s))
    pk = last["packets"]
    print("  RTP/RTCP packets the relay forwarded: %s" % fmt(pk))
    if not pk:
        fails.append("the relay forwarded no packet (RTP did not flow)")
    fds0 = a.fds_before if a.fds_before is not None else (first["fds"] if first else None)
    if fds0 is not None and last["fds"] is not None:
        print("  open fds: %d before the calls, %d at the end (allowed: +%d)" % (fds0, last["fds"], a.fd_slack))
        if last["fds"] > fds0 + a.fd_slack:
            fails.append("open fds grew from %d to %d" % (fds0, last["fds"]))
    if a.over_time:
        fails.append("the load did not finish within the hard limit")
    for line in a.extra_fail or []:
        fails.append(line)

    svg_plot(a.svg, rows, warm_t, load_end, band)
    print("\nplot: %s   samples: %s" % (a.svg, a.csv))
    if fails:
        print("soak: FAIL (%s)" % "; ".join(fails))
        return 1
    print("soak: PASS (RSS within +-%.1f %% of its mean after warm-up; 0 sessions, 0 ports, 0 relayed calls,"
          " 0 transactions after %s s idle; every call as planned; RTP relayed)" % (a.rss_tol, a.idle_s))
    return 0


def fmt(v):
    return "-" if v is None else ("%d" % v if float(v).is_integer() else "%s" % v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--control", required=True)
    s.add_argument("--csv", required=True)
    s.add_argument("--sample-s", type=float, default=10)
    s.add_argument("--idle-s", type=float, default=40)
    s.add_argument("--deadline", type=float, required=True, help="Unix time: stop the callers")
    s.add_argument("--uac", action="append", default=[], help="PID:SIPP_STAT_FILE of a caller")
    r = sub.add_parser("report")
    r.add_argument("--csv", required=True)
    r.add_argument("--svg", required=True)
    r.add_argument("--sample-s", type=float, default=10)
    r.add_argument("--idle-s", type=float, default=40)
    r.add_argument("--warmup", type=float, default=0.2)
    r.add_argument("--rss-tol", type=float, default=5.0)
    r.add_argument("--fd-slack", type=int, default=16)
    r.add_argument("--warmup-min-s", type=float, default=40)
    r.add_argument("--fds-before", type=int)
    r.add_argument("--rss-before", type=int)
    r.add_argument("--pss-before", type=int)
    r.add_argument("--uac", action="append", default=[], help="NAME:PLANNED:SIPP_STAT_FILE")
    r.add_argument("--uas", action="append", default=[], help="NAME:SIPP_STAT_FILE")
    r.add_argument("--over-time", action="store_true")
    r.add_argument("--extra-fail", action="append", help="a failure found by the caller (printed, fails the run)")
    a = ap.parse_args()
    if a.cmd == "sample":
        if not a.control.startswith(("127.", "[::1]")):
            sys.exit("soak_report: the control endpoint must be on loopback")
        cmd_sample(a)
        return 0
    return cmd_report(a)


if __name__ == "__main__":
    sys.exit(main())
