"""Writes the config of one attack: the base config plus the limit keys the attack wants,
keeping only the keys this sipedge knows (each one tried alone with `sipedge check-config`:
exit 2 = unknown key). A key left out is named on stderr: the attack still runs and asserts
the defended outcome, with that limit at its default (or missing, on an older sipedge).

    config.py SIPEDGE_BIN BASE.toml OUT.toml table.key=VALUE ...
VALUE is TOML (3, "s", [..]). Lines go right under their [table] header (added at the end
when the base has none).
"""

import os
import subprocess
import sys


def compose(base_lines, pairs):
    lines = list(base_lines)
    for table, key, value in pairs:
        header = f"[{table}]"
        if header in (l.strip() for l in lines):
            i = [l.strip() for l in lines].index(header)
            lines.insert(i + 1, f"{key} = {value}")
        else:
            lines += ["", header, f"{key} = {value}"]
    return lines


def main():
    binary, base, out = sys.argv[1:4]
    pairs = []
    for arg in sys.argv[4:]:
        dotted, _, value = arg.partition("=")
        table, _, key = dotted.rpartition(".")
        pairs.append((table, key, value))
    with open(base) as f:
        base_lines = f.read().splitlines()
    kept, dropped = [], []
    probe = out + ".probe.toml"
    for p in pairs:
        with open(probe, "w") as f:
            f.write("\n".join(compose(base_lines, [p])) + "\n")
        r = subprocess.run([binary, "check-config", "-c", probe], capture_output=True, text=True,
                           timeout=30)
        if r.returncode == 0:
            kept.append(p)
        elif r.returncode == 2:
            dropped.append((p, (r.stderr.strip().splitlines() or [""])[-1]))
        else:
            sys.exit(f"config.py: check-config failed ({r.returncode}): {r.stderr.strip()}")
    os.unlink(probe)
    for (table, key, value), why in dropped:
        why = why.rsplit(": ", 1)[-1]
        print(f"      note: this sipedge does not take {table}.{key} = {value} ({why}); "
              "the attack runs without it", file=sys.stderr)
    with open(out, "w") as f:
        f.write("\n".join(compose(base_lines, kept)) + "\n")


if __name__ == "__main__":
    main()
