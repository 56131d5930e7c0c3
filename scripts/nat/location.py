#!/usr/bin/env python3
"""Print the location rows of a sipedge SQLite store, one per line:
   aor|contact|received|transport         (with --nated: aor|contact|received|transport|nated)
Usage: location.py [--nated] DB_FILE [AOR]   (python3's sqlite3 module; the sqlite3 CLI is not
needed). `nated` is 1 when the binding is reached at `received` (the REGISTER came through
NAT), 0 when at its Contact."""
import sqlite3
import sys

args = sys.argv[1:]
nated = "--nated" in args
args = [a for a in args if a != "--nated"]
db = sqlite3.connect(f"file:{args[0]}?mode=ro", uri=True, timeout=5)
q = "SELECT aor, contact, received, transport" + (", nated" if nated else "") + " FROM location"
params = ()
if len(args) > 1:
    q += " WHERE aor = ?"
    params = (args[1],)
for row in db.execute(q + " ORDER BY aor, contact", params):
    print("|".join(str(x) for x in row))
