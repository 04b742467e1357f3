#!/usr/bin/env bash
# Checks what deploy/ ships for monitoring:
#   - deploy/prometheus/alerts.yml passes `promtool check rules`;
#   - its unit tests, deploy/prometheus/alerts.test.yml, pass `promtool test rules`;
#   - deploy/grafana/redpacket-wallet.json is valid JSON, and every panel query parses
#     as PromQL (checked by promtool as recording rules, Grafana's variables replaced);
#   - every rpw_* metric named by the dashboard, the rules and their tests is one that
#     src/metrics.rs exports (_bucket, _sum and _count stripped).
# Installs promtool when missing (scripts/services.sh promtool).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RULES=deploy/prometheus/alerts.yml
TESTS=deploy/prometheus/alerts.test.yml
DASHBOARD=deploy/grafana/redpacket-wallet.json
METRICS_SRC=src/metrics.rs

log() { printf '[check-deploy] %s\n' "$*" >&2; }

scripts/services.sh promtool

log "promtool check rules $RULES"
promtool check rules "$RULES"

log "promtool test rules $TESTS"
promtool test rules "$TESTS"

log "dashboard: $DASHBOARD"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 - "$DASHBOARD" "$tmp/dashboard-queries.yml" <<'PY'
import json
import sys

path, out = sys.argv[1], sys.argv[2]
with open(path) as f:
    dash = json.load(f)  # fails on invalid JSON

problems = []
if dash.get("schemaVersion") != 39:
    problems.append(f"schemaVersion is {dash.get('schemaVersion')}, expected 39")
variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
if variables.get("datasource", {}).get("type") != "datasource" or \
        variables["datasource"].get("query") != "prometheus":
    problems.append("no prometheus datasource variable named 'datasource'")
if "instance" not in variables or not variables["instance"].get("includeAll"):
    problems.append("no 'instance' variable with All")

exprs = []
ids = set()
for panel in dash.get("panels", []):
    if panel.get("type") == "row":
        continue
    title = panel.get("title", "?")
    if panel.get("id") in ids:
        problems.append(f"panel {title!r}: duplicate id {panel.get('id')}")
    ids.add(panel.get("id"))
    if not panel.get("description", "").strip():
        problems.append(f"panel {title!r}: no description")
    if panel.get("datasource", {}).get("uid") != "${datasource}":
        problems.append(f"panel {title!r}: datasource is not ${{datasource}}")
    targets = panel.get("targets", [])
    if not targets:
        problems.append(f"panel {title!r}: no queries")
    for t in targets:
        expr = t.get("expr", "")
        expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        if "$" in expr:
            problems.append(f"panel {title!r}: unknown variable in {t.get('expr')!r}")
        exprs.append(expr)

if problems:
    sys.exit("\n".join(problems))

# promtool parses every query as the expression of a recording rule.
with open(out, "w") as f:
    f.write("groups:\n  - name: dashboard-queries\n    rules:\n")
    for i, expr in enumerate(exprs):
        f.write(f"      - record: dashboard_query_{i}\n        expr: {json.dumps(expr)}\n")
print(f"{len(exprs)} queries in {sum(1 for p in dash['panels'] if p.get('type') != 'row')} panels",
      file=sys.stderr)
PY
promtool check rules "$tmp/dashboard-queries.yml" >/dev/null \
  || { promtool check rules "$tmp/dashboard-queries.yml" >&2 || true; log "a dashboard query does not parse"; exit 1; }

log "metric names against $METRICS_SRC"
missing=()
while read -r name; do
  grep -qF "\"$name\"" "$METRICS_SRC" || missing+=("$name")
done < <(grep -ohE 'rpw_[a-z_]+' "$DASHBOARD" "$RULES" "$TESTS" \
  | sed -E 's/_(bucket|sum|count)$//' | sort -u)
if [[ ${#missing[@]} -gt 0 ]]; then
  log "not exported by $METRICS_SRC: ${missing[*]}"
  exit 1
fi

log "ok"
