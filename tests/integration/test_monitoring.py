"""docs/monitoring: the Prometheus alert rules pass `promtool check rules` (Debian's
prometheus package), the Grafana dashboard's queries parse as PromQL too, and both name
only metrics refundsync exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "docs" / "monitoring"
RULES = MONITORING / "alerts.yml"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())
# Where refundsync names its metrics.
METRIC_SOURCES = [ROOT / "ingest" / "metrics.py", ROOT / "worker" / "metrics.py"]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is needed (Debian's prometheus package; `make test` installs it)"
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )


def _exported() -> set[str]:
    names = set()
    for source in METRIC_SOURCES:
        names |= set(re.findall(r'"(refundsync_[a-z_]+)"', source.read_text()))
    return names


def _used(expr: str) -> set[str]:
    return {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for name in re.findall(r"refundsync_[a-z_]+", expr)
    }


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    panels: list[dict[str, Any]] = DASHBOARD["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_the_alert_rules_pass_promtool() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_dashboards_queries_are_promql(tmp_path: Path) -> None:
    # promtool checks expressions in rule files: each query as a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"refundsync:panel_{n}", "expr": expr}
                    for n, expr in enumerate(_dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_and_dashboard_name_only_metrics_that_exist() -> None:
    exported = _exported()
    assert "refundsync_queue_depth" in exported
    for expr in _rule_exprs() + _dashboard_exprs():
        unknown = _used(expr) - exported
        assert not unknown, (expr, unknown)


def test_every_alert_of_operations_md_is_a_rule() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    table = operations.split("## Suggested alerts", 1)[1].split("\n## ", 1)[0]
    suggested = re.findall(r"^\| [^|]+ \| `([^`]+)`", table, flags=re.MULTILINE)
    rule_metrics = set().union(*(_used(expr) for expr in _rule_exprs()))
    for expr in suggested:
        assert _used(expr) <= rule_metrics, expr


def test_the_dashboard_is_grafana_json_with_a_datasource_choice() -> None:
    assert DASHBOARD["uid"] == "refundsync"
    variables = DASHBOARD["templating"]["list"]
    assert variables[0]["type"] == "datasource"
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
