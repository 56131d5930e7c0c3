#!/usr/bin/env python3
"""Side-by-side table for scripts/bench/registrations.sh and scripts/bench/calls.sh.

Reads the JSON lines that the shared harness' tools/bench.py appended (one per search or
fixed-rate run, labelled "kamailio", "sipedge", "kamailio@common", "sipedge@common", and for
calls.sh "sipedge@accept") and prints: max authenticated registrations/s or proxied calls/s
with 0 failures (the 20 s confirmation run), proxy CPU, CPU-seconds per 1000 registrations or
calls (proxy process tree, from /proc/PID/stat over the SIPp run), memory (PSS and RSS of the
proxy tree after the run; Kamailio's shm peak), and the ratios sipedge/Kamailio. With several
rounds every number is the median over the rounds. The scenario ("reg" or "call") is taken
from the JSON lines.

With media (calls.sh SCENARIO=call_media|call_media_rtp) the CPU and memory columns are those
of the whole media path: Kamailio's process tree + rtpengine's (bench.py's "media" group:
cpu_pct["media"], media_mem_kb), sipedge's one process (relay in-process); the parts are listed
too. RELAY.jsonl (written by calls.sh) holds the relays' packet counters after each measured
run; with call_media_rtp a measured run that relayed no packet is a FAIL (last line).

    python3 scripts/bench/report.py RESULTS.jsonl [call|call_media|call_media_rtp [RELAY.jsonl]]
"""
import json
import statistics
import sys

PROXIES = ("kamailio", "sipedge")


def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None


def fmt(x, nd=0):
    return "-" if x is None else ("%%.%df" % nd) % x


def ratio(a, b, nd=2):
    return "-" if a is None or b in (None, 0) else ("%%.%df" % nd) % (a / b)


def run_numbers(c):
    """numbers of one passing run (confirmation or fixed-rate step); CPU and memory of the proxy
    plus its media relay process when it has one (rtpengine: bench.py's "media" group)"""
    if not c:
        return {}
    proxy_cpu = c["cpu_pct"].get("proxy", 0.0)
    media_cpu = c["cpu_pct"].get("media", 0.0)
    cpu = proxy_cpu + media_cpu
    cpu_s = cpu / 100.0 * c["wall_s"]
    mem = dict(c.get("proxy_mem_kb", {}))
    media_mem = c.get("media_mem_kb", {}) or {}
    return {
        "proxy_only_pct": proxy_cpu,
        "media_pct": media_cpu,
        "media_pss_mb": media_mem.get("pss_kb", 0) / 1024.0,
        "proxy_pss_mb": mem.get("pss_kb", 0) / 1024.0,
        "rate": c["rate"],
        "count": c["count"],
        "cpu_pct": cpu,
        "cpu_s": cpu_s,
        "cpu_s_per_1000": 1000.0 * cpu_s / c["count"],
        "uac_pct": c["cpu_pct"].get("uac"),
        "uas_pct": c["cpu_pct"].get("uas"),
        "pss_mb": (mem.get("pss_kb", 0) + media_mem.get("pss_kb", 0)) / 1024.0,
        "rss_mb": (mem.get("rss_kb", 0) + media_mem.get("rss_kb", 0)) / 1024.0,
        "shm_mb": mem["shm_max_used_kb"] / 1024.0 if "shm_max_used_kb" in mem else None,
        "rt1_ms": c.get("rt1_avg_ms"),
        "foreign_pct": c["cpu_pct"].get("foreign"),
        "noisy": bool(c.get("noisy")),
    }


def table(hdr, rows):
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(n) for x, n in zip(r, w)) + " |"
    print(line(hdr))
    print("|" + "|".join("-" * (n + 2) for n in w) + "|")
    for r in rows:
        print(line(r))


def main(path, scen="call", relay_path=None):
    media = scen in ("call_media", "call_media_rtp")
    runs = {}
    for line in open(path):
        line = line.strip()
        if line:
            r = json.loads(line)
            runs.setdefault(r.get("label"), []).append(r)

    agg = {}
    for p in PROXIES:
        searches = runs.get(p, [])
        commons = runs.get(p + "@common", [])
        conf = [run_numbers(r.get("confirm")) for r in searches]
        conf = [c for c in conf if c]
        com = [run_numbers(r.get("confirm")) for r in commons]
        com = [c for c in com if c]
        a = {"rounds": len(searches),
             "max_per_round": [r.get("max_pass_rate") for r in searches],
             "max": med([r.get("max_pass_rate") for r in searches]),
             "first_fail": med([r.get("first_fail_probe") for r in searches])}
        for k in ("cpu_pct", "cpu_s_per_1000", "uac_pct", "uas_pct", "pss_mb", "rss_mb", "shm_mb", "rt1_ms",
                  "proxy_only_pct", "media_pct", "proxy_pss_mb", "media_pss_mb"):
            a[k] = med([c.get(k) for c in conf])
        a["common_rate"] = med([c["rate"] for c in com])
        a["common_failed"] = sum(1 for r in commons if not r.get("confirm"))
        for k in ("cpu_pct", "cpu_s_per_1000", "pss_mb", "shm_mb", "proxy_only_pct", "media_pct",
                  "proxy_pss_mb", "media_pss_mb"):
            a["common_" + k] = med([c.get(k) for c in com])
        steps = [s for r in searches + commons + runs.get(p + "@accept", []) for s in r.get("steps", [])]
        a["noisy_steps"] = sum(1 for s in steps if s.get("noisy"))
        a["max_foreign"] = max([s["cpu_pct"].get("foreign", 0) for s in steps], default=None)
        a["steps"] = steps
        a["fail_steps"] = [s for s in steps if not s.get("pass")]
        agg[p] = a

    k, s = agg["kamailio"], agg["sipedge"]
    scenario = next((r.get("scenario") for v in runs.values() for r in v if r.get("scenario")), "reg")
    if scenario == "call":
        u, uu = "calls", "calls/s"
        hold = max([st["wall_s"] - st["dur_s"] for st in k["steps"] + s["steps"] if st.get("pass")], default=None)
        what = {
            "call": "no media relay",
            "call_media": "SDP through the media relay (sipedge: in-process relay, media=\"always\";"
                          " Kamailio: rtpengine offer/answer/delete), no RTP sent",
            "call_media_rtp": "SDP through the media relay AND RTP (uac_invite_rtp.xml plays g711a.pcap,"
                              " 50 packets/s, caller -> relay -> callee until the BYE)",
        }.get(scen, scen)
        print("\nProxied call (INVITE -> 100/180/200 -> ACK -> hold -> BYE -> 200), SIPp %s -> proxy ->"
              " uas.xml on 127.0.0.1:5070 (extension 2000), UDP, record-routed, %s, loopback"
              % ("uac_invite_rtp.xml" if scen == "call_media_rtp" else "uac_invite.xml", what))
        rt1 = "RT1 (INVITE..200 through the proxy) avg ms at max"
    else:
        u, uu = "reg", "reg/s"
        hold = None
        print("\nAuthenticated REGISTER (REGISTER -> 401 -> REGISTER+digest -> 200), SIPp reg_auth.xml over UDP,"
              " 1000 subscribers, loopback")
        rt1 = "RT1 (REGISTER..200 incl. 401) avg ms at max"
    kname = "Kamailio 5.6 + rtpengine" if media else "Kamailio 5.6"
    pname = "proxy + relay" if media else "proxy"
    hdr = ("", kname, "sipedge", "sipedge / Kamailio")
    rows = [
        ("max %s, 0 failures (confirmation run)" % uu, fmt(k["max"]), fmt(s["max"]), ratio(s["max"], k["max"])),
        ("  per round", ",".join(fmt(x) for x in k["max_per_round"]),
         ",".join(fmt(x) for x in s["max_per_round"]), ""),
        ("first failing probe, %s" % uu, fmt(k["first_fail"]), fmt(s["first_fail"]), ""),
        ("%s CPU at max, %% of one core" % pname, fmt(k["cpu_pct"]), fmt(s["cpu_pct"]), ratio(s["cpu_pct"], k["cpu_pct"])),
    ]
    if media:
        rows += [
            ("  of which Kamailio / rtpengine, %", "%s / %s" % (fmt(k["proxy_only_pct"]), fmt(k["media_pct"])),
             "(one process)", ""),
        ]
    rows += [
        ("%s CPU-s per 1000 %s at max" % (pname, u), fmt(k["cpu_s_per_1000"], 3), fmt(s["cpu_s_per_1000"], 3),
         ratio(s["cpu_s_per_1000"], k["cpu_s_per_1000"])),
        ("SIPp UAC CPU at max, %", fmt(k["uac_pct"]), fmt(s["uac_pct"]), ""),
    ]
    if scenario == "call":
        rows.append(("SIPp UAS CPU at max, %", fmt(k["uas_pct"]), fmt(s["uas_pct"]), ""))
    rows += [
        (rt1, fmt(k["rt1_ms"], 1), fmt(s["rt1_ms"], 1), ""),
        ("%s PSS after the max run, MB" % pname, fmt(k["pss_mb"], 1), fmt(s["pss_mb"], 1), ratio(s["pss_mb"], k["pss_mb"])),
    ]
    if media:
        rows.append(("  of which Kamailio / rtpengine, MB", "%s / %s" % (fmt(k["proxy_pss_mb"], 1), fmt(k["media_pss_mb"], 1)),
                     "(one process)", ""))
    rows += [
        ("%s RSS after the max run, MB" % pname, fmt(k["rss_mb"], 1), fmt(s["rss_mb"], 1), ratio(s["rss_mb"], k["rss_mb"])),
        ("Kamailio shm peak, MB", fmt(k["shm_mb"], 1), "-", ""),
    ]
    if k["common_rate"] or s["common_rate"]:
        rate = k["common_rate"] or s["common_rate"]
        rows += [
            ("same load for both: %s" % uu, fmt(k["common_rate"]), fmt(s["common_rate"]), ""),
            ("  %s CPU at %s %s, %%" % (pname, fmt(rate), uu), fmt(k["common_cpu_pct"]), fmt(s["common_cpu_pct"]),
             ratio(s["common_cpu_pct"], k["common_cpu_pct"])),
        ]
        if media:
            rows.append(("    of which Kamailio / rtpengine, %",
                         "%s / %s" % (fmt(k["common_proxy_only_pct"]), fmt(k["common_media_pct"])), "(one process)", ""))
        rows += [
            ("  %s CPU-s per 1000 %s at %s %s" % (pname, u, fmt(rate), uu), fmt(k["common_cpu_s_per_1000"], 3),
             fmt(s["common_cpu_s_per_1000"], 3), ratio(s["common_cpu_s_per_1000"], k["common_cpu_s_per_1000"])),
            ("  %s PSS after that run, MB" % pname, fmt(k["common_pss_mb"], 1), fmt(s["common_pss_mb"], 1),
             ratio(s["common_pss_mb"], k["common_pss_mb"])),
        ]
        if media:
            rows.append(("    of which Kamailio / rtpengine, MB",
                         "%s / %s" % (fmt(k["common_proxy_pss_mb"], 1), fmt(k["common_media_pss_mb"], 1)), "(one process)", ""))
        if scenario == "call":
            rows.append(("  Kamailio shm peak in that run, MB", fmt(k["common_shm_mb"], 1), "-", ""))
        if k["common_failed"] or s["common_failed"]:
            rows.append(("  same-load runs that FAILED", str(k["common_failed"]), str(s["common_failed"]), ""))
    rows += [
        ("steps flagged noisy (other processes > 15 % CPU)", str(k["noisy_steps"]), str(s["noisy_steps"]), ""),
        ("max CPU of other processes during a step, %", fmt(k["max_foreign"]), fmt(s["max_foreign"]), ""),
    ]
    table(hdr, rows)
    print("\nCPU = utime+stime of the proxy's whole process tree (Kamailio: all its processes; sipedge: all threads)"
          "%s over the SIPp run, %% of ONE core (the box has %s)%s."
          % (" plus rtpengine's (all its threads)" if media else "", _ncpu(),
             "; memory (PSS, RSS) likewise summed over Kamailio and rtpengine" if media else ""))
    if scenario == "call":
        print("Call runs: the UAC run lasts duration + hold (~%s s) + teardown; CPU-s per call counts all of it;"
              " memory is taken right after the run, while the finished transactions are still kept"
              " (Kamailio tm wait timer 5 s; sipedge RFC 3261 timers, 32 s over UDP)."
              % (fmt(hold, 1) if hold is not None else "?"))

    if media:
        relay_table(relay_path, runs, scen)

    for p in PROXIES:
        print("\nAll steps, %s (rate, result, ok/failed, retransmissions, timeouts, unexpected msgs, kernel UDP"
              " RcvbufErrors, proxy CPU %%):" % p)
        for st in agg[p]["steps"]:
            print("  %-6d %-4s dur=%-4g ok=%-6s fail=%-6s retr=%-6s timeouts=%-5s unexpected=%-6s rcvbuf_drops=%-5s"
                  " cpu=%s%%%s foreign=%s%%%s"
                  % (st["rate"], "PASS" if st["pass"] else "FAIL", st["dur_s"], st.get("successful"),
                     st.get("failed"), st.get("retrans"), st.get("timeouts"), st.get("unexpected"),
                     st["udp"].get("RcvbufErrors"), fmt(st["cpu_pct"].get("proxy")),
                     (" media=%s%%" % fmt(st["cpu_pct"].get("media"))) if media and p == "kamailio" else "",
                     fmt(st["cpu_pct"].get("foreign")), " NOISY" if st.get("noisy") else "")
                  + ("" if st.get("uas_failed") in (None, 0) else " uas_failed=%s" % st.get("uas_failed"))
                  + (" (%s)" % st["label"] if st.get("label", p) not in (p, None) else ""))


def relay_table(path, runs, scen):
    """packets the relay forwarded in each measured run (read by calls.sh while the proxy still ran);
    prints 'rtp check: PASS|FAIL ...' for call_media_rtp"""
    rows, bad = [], []
    rel = []
    if path:
        try:
            rel = [json.loads(l) for l in open(path) if l.strip()]
        except (OSError, ValueError):
            rel = []
    print("\nRelay counters after each measured run (the proxy restarted before it: that run alone;"
          " sipedge /api/stats, rtpengine CLI 'list totals'):")
    for r in rel:
        last = [s for x in runs.get(r["label"], []) for s in x.get("steps", [])][-1:]
        calls = last[0].get("successful") if last else None
        pk = r.get("packets")
        per = "-" if not calls or pk is None else "%.1f" % (pk / calls)
        rows.append((r["label"], r["relay"], fmt(pk), per, fmt(calls), fmt(r.get("sessions_left")),
                     fmt(r.get("ports_left")) if r["relay"] == "sipedge" else "-",
                     fmt(r.get("not_relayed")) if r["relay"] == "sipedge" else "-"))
        if scen == "call_media_rtp" and (not r.get("ok") or not pk):
            bad.append("%s: %s packets" % (r["label"], "no counter" if pk is None else pk))
    if rows:
        table(("run", "relay", "packets relayed", "per successful call", "successful calls", "sessions left",
               "ports left", "calls not relayed (WARN)"), rows)
    else:
        print("  none recorded")
    if scen == "call_media_rtp":
        labels = {r["label"] for r in rel}
        for want in ("kamailio", "sipedge"):
            if want in runs and want not in labels:
                bad.append("%s: no counters read" % want)
        print("rtp check: %s" % ("PASS (RTP relayed in every measured run)" if not bad else "FAIL (" + "; ".join(bad) + ")"))


def _ncpu():
    import os
    return os.cpu_count()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3, 4):
        sys.exit("usage: report.py RESULTS.jsonl [call|call_media|call_media_rtp [RELAY.jsonl]]")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "call", sys.argv[3] if len(sys.argv) > 3 else None)
