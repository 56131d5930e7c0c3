#!/usr/bin/env python3
"""Side-by-side table for scripts/bench/registrations.sh.

Reads the JSON lines that the shared harness' tools/bench.py appended (one per search or
fixed-rate run, labelled "kamailio", "sipedge", "kamailio@common", "sipedge@common") and prints:
max authenticated registrations/s with 0 failures (the 20 s confirmation run), proxy CPU,
CPU-seconds per 1000 registrations (proxy process tree, from /proc/PID/stat over the SIPp run),
memory (PSS and RSS of the proxy tree after the run; Kamailio's shm peak), and the ratios
sipedge/Kamailio. With several rounds every number is the median over the rounds.

    python3 scripts/bench/report.py RESULTS.jsonl
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
    """numbers of one passing run (confirmation or fixed-rate step)"""
    if not c:
        return {}
    cpu = c["cpu_pct"].get("proxy", 0.0)
    cpu_s = cpu / 100.0 * c["wall_s"]
    mem = c.get("proxy_mem_kb", {})
    return {
        "rate": c["rate"],
        "count": c["count"],
        "cpu_pct": cpu,
        "cpu_s": cpu_s,
        "cpu_s_per_1000": 1000.0 * cpu_s / c["count"],
        "uac_pct": c["cpu_pct"].get("uac"),
        "pss_mb": mem.get("pss_kb", 0) / 1024.0,
        "rss_mb": mem.get("rss_kb", 0) / 1024.0,
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


def main(path):
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
        for k in ("cpu_pct", "cpu_s_per_1000", "uac_pct", "pss_mb", "rss_mb", "shm_mb", "rt1_ms"):
            a[k] = med([c.get(k) for c in conf])
        a["common_rate"] = med([c["rate"] for c in com])
        a["common_failed"] = sum(1 for r in commons if not r.get("confirm"))
        for k in ("cpu_pct", "cpu_s_per_1000", "pss_mb"):
            a["common_" + k] = med([c.get(k) for c in com])
        steps = [s for r in searches + commons for s in r.get("steps", [])]
        a["noisy_steps"] = sum(1 for s in steps if s.get("noisy"))
        a["max_foreign"] = max([s["cpu_pct"].get("foreign", 0) for s in steps], default=None)
        a["steps"] = steps
        a["fail_steps"] = [s for s in steps if not s.get("pass")]
        agg[p] = a

    k, s = agg["kamailio"], agg["sipedge"]
    print("\nAuthenticated REGISTER (REGISTER -> 401 -> REGISTER+digest -> 200), SIPp reg_auth.xml over UDP,"
          " 1000 subscribers, loopback")
    hdr = ("", "Kamailio 5.6", "sipedge", "sipedge / Kamailio")
    rows = [
        ("max reg/s, 0 failures (confirmation run)", fmt(k["max"]), fmt(s["max"]), ratio(s["max"], k["max"])),
        ("  per round", ",".join(fmt(x) for x in k["max_per_round"]),
         ",".join(fmt(x) for x in s["max_per_round"]), ""),
        ("first failing probe, reg/s", fmt(k["first_fail"]), fmt(s["first_fail"]), ""),
        ("proxy CPU at max, % of one core", fmt(k["cpu_pct"]), fmt(s["cpu_pct"]), ratio(s["cpu_pct"], k["cpu_pct"])),
        ("proxy CPU-s per 1000 reg at max", fmt(k["cpu_s_per_1000"], 3), fmt(s["cpu_s_per_1000"], 3),
         ratio(s["cpu_s_per_1000"], k["cpu_s_per_1000"])),
        ("SIPp UAC CPU at max, %", fmt(k["uac_pct"]), fmt(s["uac_pct"]), ""),
        ("RT1 (REGISTER..200 incl. 401) avg ms at max", fmt(k["rt1_ms"], 1), fmt(s["rt1_ms"], 1), ""),
        ("proxy PSS after the max run, MB", fmt(k["pss_mb"], 1), fmt(s["pss_mb"], 1), ratio(s["pss_mb"], k["pss_mb"])),
        ("proxy RSS after the max run, MB", fmt(k["rss_mb"], 1), fmt(s["rss_mb"], 1), ratio(s["rss_mb"], k["rss_mb"])),
        ("Kamailio shm peak, MB", fmt(k["shm_mb"], 1), "-", ""),
    ]
    if k["common_rate"] or s["common_rate"]:
        rate = k["common_rate"] or s["common_rate"]
        rows += [
            ("same load for both: reg/s", fmt(k["common_rate"]), fmt(s["common_rate"]), ""),
            ("  proxy CPU at %s reg/s, %%" % fmt(rate), fmt(k["common_cpu_pct"]), fmt(s["common_cpu_pct"]),
             ratio(s["common_cpu_pct"], k["common_cpu_pct"])),
            ("  proxy CPU-s per 1000 reg at %s reg/s" % fmt(rate), fmt(k["common_cpu_s_per_1000"], 3),
             fmt(s["common_cpu_s_per_1000"], 3), ratio(s["common_cpu_s_per_1000"], k["common_cpu_s_per_1000"])),
            ("  proxy PSS after that run, MB", fmt(k["common_pss_mb"], 1), fmt(s["common_pss_mb"], 1),
             ratio(s["common_pss_mb"], k["common_pss_mb"])),
        ]
        if k["common_failed"] or s["common_failed"]:
            rows.append(("  same-load runs that FAILED", str(k["common_failed"]), str(s["common_failed"]), ""))
    rows += [
        ("steps flagged noisy (other processes > 15 % CPU)", str(k["noisy_steps"]), str(s["noisy_steps"]), ""),
        ("max CPU of other processes during a step, %", fmt(k["max_foreign"]), fmt(s["max_foreign"]), ""),
    ]
    table(hdr, rows)
    print("\nCPU = utime+stime of the proxy's whole process tree (Kamailio: all its processes; sipedge: all threads)"
          " over the SIPp run, %% of ONE core (the box has %s)." % _ncpu())

    for p in PROXIES:
        print("\nAll steps, %s (rate, result, ok/failed, retransmissions, timeouts, unexpected msgs, kernel UDP"
              " RcvbufErrors, proxy CPU %%):" % p)
        for st in agg[p]["steps"]:
            print("  %-6d %-4s dur=%-4g ok=%-6s fail=%-6s retr=%-6s timeouts=%-5s unexpected=%-6s rcvbuf_drops=%-5s"
                  " cpu=%s%% foreign=%s%%%s"
                  % (st["rate"], "PASS" if st["pass"] else "FAIL", st["dur_s"], st.get("successful"),
                     st.get("failed"), st.get("retrans"), st.get("timeouts"), st.get("unexpected"),
                     st["udp"].get("RcvbufErrors"), fmt(st["cpu_pct"].get("proxy")),
                     fmt(st["cpu_pct"].get("foreign")), " NOISY" if st.get("noisy") else ""))


def _ncpu():
    import os
    return os.cpu_count()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: report.py RESULTS.jsonl")
    main(sys.argv[1])
