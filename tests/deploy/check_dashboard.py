#!/usr/bin/python3
"""Checks the Grafana dashboard and the alert rules against what adapterd really exports:
every adapterd_* metric they query must be declared in server/metrics.cc (histograms may be
queried through _bucket/_count/_sum). Usage: check_dashboard.py REPO_ROOT"""
import json
import re
import sys

root = sys.argv[1]
declared = set(re.findall(r'\.Name\("(adapterd_[a-z_]+)"\)', open(f"{root}/server/metrics.cc").read()))
passed = failed = 0


def check(where, expr):
    global passed, failed
    for name in re.findall(r"adapterd_[a-z_]+", expr):
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        if name in declared or base in declared:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {where}: {name} is not a metric adapterd exports")


dash = json.load(open(f"{root}/deploy/grafana/dashboards/adapterd.json"))
assert dash["panels"], "dashboard has no panels"
for p in dash["panels"]:
    for t in p["targets"]:
        check(f"dashboard panel '{p['title']}'", t["expr"])
for line in open(f"{root}/deploy/prometheus/rules.yml"):
    if "adapterd_" in line:
        check("rules.yml", line)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
