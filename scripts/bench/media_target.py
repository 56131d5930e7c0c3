#!/usr/bin/env python3
"""Adapter: runs the shared harness' RTP relay throughput search (tools/media_bench.py, imported
from the harness copy in $REFBENCH, default /tmp/refbench -- nothing of it is copied here or
modified) with one more target, "sipedge": the relay crate's example
relay/examples/bench_target.rs, set up with the same stream shape as the harness' rtpengine
target (per call A -> RA -> B and B -> RB -> A, endpoints 127.0.0.1:10000+2i / 10001+2i).

    media_target.py [--sipedge-bin PATH] [--sipedge-ports 40000-47999] [--sipedge-workers 1]
                    [--rtpengine-restart "stop.sh; run.sh"]
                    <any tools/media_bench.py option, e.g. --targets udpfwd,rtpengine,sipedge>
    media_target.py --report results.jsonl      # the comparison table of scripts/bench/media.sh
    media_target.py --idle-check 3              # machine CPU busy % over 3 s and the top 3 users

What the adapter adds to each JSON result line of media_bench.py:
  mem_before / mem_after_setup / mem_after_traffic: RSS and PSS (kB, from smaps_rollup) of the
    relay's process tree before setting up the calls, right after, and after the search;
  kb_per_call: (after setup - before) / calls, for rtpengine and sipedge (udpfwd has no per-call
    setup: its sockets exist from its start, so only its absolute memory is recorded);
  setup_s: time to set up the calls; loadavg_before: /proc/loadavg when the target started;
  relay_counters (sipedge): the relay's own per-session totals at the end (`stats`).
Two changes of the harness' behaviour: udpfwd is started with a 300 s lifetime instead of
--budget + 60 s, which a search with several confirmation rounds outlives; rtpengine is restarted
(--rtpengine-restart CMD) and its calls set up again after a step that lost >= 1 % (see step()).
Everything else (steps, pinning, pass criteria, CPU accounting) is the harness' own code.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REFBENCH = os.environ.get("REFBENCH", "/tmp/refbench")
sys.path.insert(0, os.path.join(REFBENCH, "tools"))
try:
    import media_bench  # noqa: E402  (the harness' search, steps and Target)
    import procstat  # noqa: E402
except ImportError as e:
    sys.exit("media_target: cannot import the harness from %s/tools (%s); set REFBENCH" % (REFBENCH, e))

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OPTS = None  # our own options, parsed in main()


def mem_per_call(before, after, calls):
    return {k: round((after[k] - before[k]) / calls, 2) for k in ("rss_kb", "pss_kb")}


class Target(media_bench.Target):
    """The harness' Target plus the "sipedge" kind and memory accounting around setup."""

    def setup(self):
        self.mem, self.relay_proc, t0 = {}, None, time.monotonic()
        with open("/proc/loadavg") as f:
            self.mem["loadavg_before"] = f.read().split()[:3]
        n = self.a.calls
        if self.kind == "sipedge":
            self.setup_sipedge()
        elif self.kind == "rtpengine":
            pid = int(open(self.a.rtpengine_pidfile).read())
            before = procstat.mem_kb(procstat.tree(pid))
            super().setup()
            after = procstat.mem_kb(self.pids)
            self.mem.update(mem_before=before, mem_after_setup=after, kb_per_call=mem_per_call(before, after, n))
        elif self.kind == "udpfwd":
            # the harness starts udpfwd with -d budget+60 s, shorter than a search whose
            # confirmation steps down several times (up to 4 x --reps steps after the ramp):
            # udpfwd then exits mid-confirmation and the steps fail with 100 % loss. Give it
            # the longest lifetime udpfwd accepts (300 s); teardown stops it anyway.
            budget, self.a.budget = self.a.budget, 240
            try:
                super().setup()
            finally:
                self.a.budget = budget
            self.mem["mem_after_setup"] = procstat.mem_kb(self.pids)  # its sockets exist from its start
        else:  # direct: no relay
            super().setup()
        self.mem["setup_s"] = round(time.monotonic() - t0, 2)

    def ask(self, line):
        """One command to bench_target, one answer line (an empty answer = it died)."""
        p = self.relay_proc
        p.stdin.write(line + "\n")
        p.stdin.flush()
        ans = p.stdout.readline().strip()
        if not ans or ans.startswith("ERR"):
            raise RuntimeError("bench_target: %r -> %r (log: %s)" % (line, ans, self.log_path))
        return ans

    def setup_sipedge(self):
        a, n = self.a, self.a.calls
        self.log_path = os.path.join(a.workdir, "sipedge_target.log")
        cmd = [OPTS.sipedge_bin, "--ports", OPTS.sipedge_ports, "--workers", str(OPTS.sipedge_workers)]
        with open(self.log_path, "a") as log:
            self.relay_proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               stderr=log, text=True)
        ready = self.relay_proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise RuntimeError("bench_target did not start (%r, log: %s)" % (ready, self.log_path))
        pid = self.relay_proc.pid
        # every relay thread exists once it says "ready": taskset -a pins all of them to CPU1
        media_bench.pin(pid, a.relay_cpus)
        self.pids = procstat.tree(pid)
        before = procstat.mem_kb(self.pids)
        lines = []
        for i in range(n):  # same endpoints as the harness' rtpengine target
            pa, pb = 10000 + 2 * i, 10000 + 2 * i + 1
            ra, rb = map(int, self.ask("alloc %d %d" % (pa, pb)).split())
            lines += ["%d %d %d" % (pa, ra, pb), "%d %d %d" % (pb, rb, pa)]
        after = procstat.mem_kb(self.pids)
        self.mem.update(mem_before=before, mem_after_setup=after, kb_per_call=mem_per_call(before, after, n),
                        counts=self.ask("counts"))
        with open(self.streams, "w") as f:
            f.write("\n".join(lines) + "\n")

    def teardown(self):
        p, self.relay_proc = self.relay_proc, None
        if p is None:
            return super().teardown()
        try:
            p.stdin.write("stats\n")
            p.stdin.flush()
            total = None
            for _ in range(self.a.calls + 1):  # one line per session, then the total
                line = p.stdout.readline()
                if not line or line.startswith("total"):
                    total = line.strip()
                    break
            if getattr(self, "res", None) is not None and total:
                self.res["relay_counters"] = dict(kv.split("=") for kv in total.split()[1:])
            p.stdin.write("quit\n")
            p.stdin.flush()
            p.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            p.kill()  # our own child, by PID
            p.wait()


_step = media_bench.step


def step(a, t, rate):
    """The harness' step. rtpengine only: after a step that lost >= 1 % (overload), rtpengine is
    restarted (--rtpengine-restart) and the calls set up again before the next step, as the
    harness' SIP search restarts the proxy after a failed step. Once rtpengine has hit
    max_recv_iters 5 times on a socket it stops reading it ("UDP receive queue exceeded 5 times:
    discarding packet", media_socket.c stream_fd_readable), and here it forwarded nothing at all
    afterwards, even on new calls: without the restart every later step of the search fails."""
    r = _step(a, t, rate)
    if t.kind == "rtpengine" and r["loss_pct"] >= 1.0 and OPTS.rtpengine_restart:
        print("    (rtpengine overloaded: restarted, calls set up again for the next step)", flush=True)
        try:
            media_bench.Target.teardown(t)
        except RuntimeError:  # no ng answer: it is restarted anyway
            pass
        subprocess.run(OPTS.rtpengine_restart, shell=True, check=True, stdout=subprocess.DEVNULL, timeout=60)
        media_bench.Target.setup(t)
        r["rtpengine_restarted"] = True
    return r


_search = media_bench.search


def search(a, t):
    """The harness' search, plus the memory figures (the result dict is written after teardown,
    so teardown can still add the relay's own counters)."""
    res = _search(a, t)
    res.update(t.mem)
    if t.pids:
        res["mem_after_traffic"] = procstat.mem_kb(t.pids)
    t.res = res
    return res


# ---------------------------------------------------------------- report

def fmt(v, spec="%.0f", none="-"):
    return none if v is None else spec % v


def cpu_per_mpkt(r):
    """CPU-seconds of the relay tree per million packets forwarded, at the maximum (median of
    the confirmation runs): cpu% / 100 / recv_pps * 1e6."""
    if r.get("median_relay_cpu_pct") is None or not r.get("median_recv_pps"):
        return None
    return r["median_relay_cpu_pct"] * 1e4 / r["median_recv_pps"]


def report(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    by = {}
    for r in rows:
        by[(r["calls"], r["target"])] = r  # the last line per (calls, target)
    calls = sorted({c for c, _ in by})
    print("RTP relay, 172-byte packets, relay pinned to CPU1, generator+sink on CPU0; max = highest rate with "
          "loss < 0.1 % and p99 < 20 ms (the harness' criteria), a majority of 3 confirmation runs passing; "
          "loss-free = highest single step with loss < 0.1 % whatever its latency (not confirmed). CPU-s/Mpkt = "
          "relay process tree CPU per million packets forwarded (= us/packet). KB/call = (after setup - before)/calls.")
    hdr = ("calls", "target", "max pps", "1st fail (cause)", "loss-free", "cpu% @max", "CPU-s/Mpkt @max", "CPU-s/Mpkt @ref",
           "pps/core est.", "RSS KB/call", "PSS KB/call", "loadavg", "noisy", "rcvbuf drops (fail)")
    out = [hdr]
    for c in calls:
        for t in ("direct", "udpfwd", "rtpengine", "sipedge"):
            r = by.get((c, t))
            if not r:
                continue
            cpm = cpu_per_mpkt(r)
            low = r.get("lowest_failing_pps")
            gl = r.get("fail_was_generator_limited")
            mx = r.get("max_pass_pps")
            fails = [s for s in r["steps"] if not s["pass"]]
            rcv = sum(s.get("udp", {}).get("RcvbufErrors", 0) for s in fails)
            kpc = r.get("kb_per_call") or {}
            lf = [s["target_pps"] for s in r["steps"] if s["loss_pct"] < 0.1 and not s["gen_limited"]]
            # "≥": the failure was the generator's, or the ramp budget ran out before any failure
            lower_bound = mx and (gl or r.get("first_fail_pps") is None)
            out.append((
                str(c), t, ("≥" if lower_bound else "") + fmt(mx),
                "%s (%s)" % (fmt(low), r.get("lowest_fail_cause") or "-") if low else "none",
                fmt(max(lf) if lf else None),
                fmt(r.get("median_relay_cpu_pct"), "%.0f"), fmt(cpm, "%.2f"),
                "%s @%dk" % (fmt(r.get("ref_us_per_pkt"), "%.2f"), (r.get("ref_pps") or 0) // 1000)
                if r.get("ref_us_per_pkt") else "-",
                fmt(1e6 / cpm if cpm else None, "%.0f"),
                fmt(kpc.get("rss_kb"), "%.1f"), fmt(kpc.get("pss_kb"), "%.1f"),
                " ".join(r.get("loadavg_before", [])[:1]) or "-",
                str(sum(1 for s in r["steps"] if s.get("noisy"))),
                str(rcv) if fails else "-",
            ))
    widths = [max(len(row[i]) for row in out) for i in range(len(hdr))]
    for i, row in enumerate(out):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for c in calls:
        rc = (by.get((c, "sipedge")) or {}).get("relay_counters")
        if rc:
            print("sipedge relay's own counters after the %d-call search: %s" % (
                c, " ".join("%s=%s" % kv for kv in rc.items())))
    print()
    print("ratios (sipedge / reference; CPU ratio = reference CPU-s/Mpkt / sipedge's, i.e. packets per CPU-second;"
          " > 1 = sipedge better). DESIGN §6 target: >= 2x rtpengine per core, zero loss under the rate.")
    for c in calls:
        s = by.get((c, "sipedge"))
        if not s:
            continue
        for ref in ("rtpengine", "udpfwd"):
            r = by.get((c, ref))
            if not r:
                continue
            pps = (s["max_pass_pps"] / r["max_pass_pps"]) if s.get("max_pass_pps") and r.get("max_pass_pps") else None
            a, b = cpu_per_mpkt(s), cpu_per_mpkt(r)
            cpu = b / a if a and b else None
            refc = (r["ref_us_per_pkt"] / s["ref_us_per_pkt"]) if s.get("ref_us_per_pkt") and r.get("ref_us_per_pkt") else None
            ka, kb = (s.get("kb_per_call") or {}).get("pss_kb"), (r.get("kb_per_call") or {}).get("pss_kb")
            lim = [n for n, x in (("sipedge", s), (ref, r))
                   if x.get("fail_was_generator_limited") or x.get("first_fail_pps") is None]
            print("  %5d calls  sipedge/%-9s  max pps %s   pkts per CPU-s @max %s   @ref rate %s   PSS/call %s%s" % (
                c, ref, fmt(pps, "%.2fx"), fmt(cpu, "%.2fx"), fmt(refc, "%.2fx"),
                fmt(ka / kb if ka is not None and kb else None, "%.2fx"),
                ("   (no relay failure found for %s (generator limit or ramp budget) -- max pps is a lower bound)" % ", ".join(lim)) if lim else ""))


def idle_check(seconds):
    """Whole-machine CPU busy % over `seconds` (per-process accounting, as the harness' quiet
    check) and the top 3 processes: 'BUSY top: comm pct, ...'."""
    a = procstat.all_ticks()
    time.sleep(seconds)
    b = procstat.all_ticks()
    d = sorted(((t - a.get(p, (0,))[0], comm) for p, (t, comm, _) in b.items()), reverse=True)
    pct = lambda x: 100.0 * x / procstat.CLK_TCK / seconds
    print("%.0f top: %s" % (pct(sum(x for x, _ in d if x > 0)),
                            ", ".join("%s %.0f%%" % (c, pct(x)) for x, c in d[:3] if x > 0) or "-"))


def main():
    global OPTS
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--report")
    ap.add_argument("--idle-check", type=float)
    ap.add_argument("--sipedge-bin", default=os.path.join(ROOT, "target/release/examples/bench_target"))
    ap.add_argument("--sipedge-ports", default="40000-47999")
    ap.add_argument("--sipedge-workers", type=int, default=1)
    ap.add_argument("--rtpengine-restart", help="shell command restarting rtpengine (after an overloaded step)")
    OPTS, rest = ap.parse_known_args()
    if OPTS.report:
        return report(OPTS.report)
    if OPTS.idle_check:
        return idle_check(OPTS.idle_check)
    media_bench.Target = Target
    media_bench.search = search
    media_bench.step = step
    sys.argv = [sys.argv[0]] + rest
    media_bench.main()


if __name__ == "__main__":
    main()
