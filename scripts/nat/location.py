#!/usr/bin/env python3
"""Print the location rows of a sipedge SQLite store, one per line:
   aor|contact|received|transport
Usage: location.py DB_FILE [AOR]   (python3's sqlite3 module; the sqlite3 CLI is not needed)."""
import sqlite3
import sys

db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=5)
q = "SELECT aor, contact, received, transport FROM location"
args = ()
if len(sys.argv) > 2:
    q += " WHERE aor = ?"
    args = (sys.argv[2],)
for row in db.execute(q + " ORDER BY aor, contact", args):
    print("|".join(str(x) for x in row))
