"""``hifi doctor``: which perception models and backends are configured, found here, and on which device."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hifi.perception.doctor import doctor_report, runtime_versions

_COLUMNS = ("kind", "name", "what", "model", "configured", "found", "device")


def run(args: argparse.Namespace) -> int:
    versions = runtime_versions()
    rows = doctor_report()
    if args.json:
        print(json.dumps({"versions": versions, "models": rows}, indent=2))
        return 0
    for package, version in versions.items():
        print(f"{package + ':':16s} {version}")
    print()
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in _COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in _COLUMNS).rstrip())
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in _COLUMNS).rstrip())
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("doctor", help="show the configured perception models and backends, and where they are")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
