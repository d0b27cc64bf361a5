"""The files of docs/observability/ match the metrics the package exposes.

Loads the Prometheus alerting rules (``alerts.yml``) and the Grafana dashboard
(``grafana-dashboard.json``), checks their structure, and checks every PromQL
expression in them (and in the README's ``promql`` blocks) against
:data:`pgflow.metrics.SERIES`: each ``pgflow_*`` metric name is a series that exists,
and each label that a matcher filters on or a ``by (...)``/``without (...)`` clause
groups by is one of the labels of that series (of one of the expression's series, for
a grouping). A renamed metric or label thus fails here rather than as an empty panel
or an alert that never fires. No database needed.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgflow.metrics import SERIES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "observability"
DASHBOARD = DOCS / "grafana-dashboard.json"
ALERTS = DOCS / "alerts.yml"
README = DOCS / "README.md"

METRIC = re.compile(r"\bpgflow_[a-z0-9_]+\b")
# Labels every scraped series carries (added by Prometheus), and the metric name itself.
TARGET_LABELS = frozenset({"instance", "job", "__name__"})
# Clauses followed by a parenthesized list of label names.
LABEL_LIST_CLAUSES = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
# Prometheus model.ParseDuration: units in decreasing order, each at most once; or "0".
DURATION = re.compile(r"^(?!$)(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$|^0$")
# Grafana's global variables that may stand in an expression.
GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__interval_ms", "__range",
                              "__range_s", "__range_ms"})
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEVERITIES = frozenset({"warning", "critical"})
EXPECTED_ALERTS = {
    "PgflowRunsStuckPending": "critical",
    "PgflowStepFailureRateHigh": "warning",
    "PgflowStepRetriesHigh": "warning",
    "PgflowClaimDelayHigh": "warning",
    "PgflowRunsFailing": "warning",
    "PgflowNoWorkerMetrics": "critical",
}
RULE_KEYS = frozenset({"alert", "expr", "for", "labels", "annotations"})
OPTIONAL_RULE_KEYS = frozenset({"keep_firing_for"})


# ---------------------------------------------------------------------------------------
# Reading PromQL: just enough of it to find metric names, matchers and label lists.

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\[\]]*\])
  | (?P<variable>\$\{[A-Za-z0-9_:.]+\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},@])
""", re.VERBOSE)
_MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})
_VARIABLE_NAME = re.compile(r"\$\{([A-Za-z0-9_]+)(?:[:.][^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.*),)?\s*(?P<label>[A-Za-z_]\w*)\s*\)\s*$",
                           re.DOTALL)


@dataclass
class Parsed:
    """What an expression names: its ``pgflow_*`` metrics, its selectors, its label lists."""

    metrics: list[str] = field(default_factory=list)
    selectors: list[tuple[str | None, list[tuple[str, str, str]]]] = field(default_factory=list)
    label_lists: list[tuple[str, list[str]]] = field(default_factory=list)
    variables: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def _tokens(expr: str) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r}")
        pos = match.end()
        kind = match.lastgroup or ""
        if kind != "space":
            yield kind, match.group()


def parse(expr: str) -> Parsed:
    parsed = Parsed(metrics=METRIC.findall(expr))
    parsed.variables = {a or b for a, b in _VARIABLE_NAME.findall(expr)}
    try:
        tokens = list(_tokens(expr))
    except ValueError as exc:
        parsed.errors.append(str(exc))
        return parsed
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "range":
            inner = text[1:-1].strip()
            parts = [part.strip() for part in inner.split(":")] if ":" in inner else [inner]
            for part in parts:
                if part and not (DURATION.match(part) or _VARIABLE_NAME.fullmatch(part)):
                    parsed.errors.append(f"range {text} is not a duration")
        if (kind, text) == ("op", "{"):
            before = tokens[i - 1] if i else ("", "")
            metric = before[1] if before[0] == "name" and METRIC.fullmatch(before[1]) else None
            i, matchers = _matchers(tokens, i + 1, parsed.errors)
            parsed.selectors.append((metric, matchers))
            continue
        if kind == "name" and METRIC.fullmatch(text) and tokens[i + 1:i + 2] != [("op", "{")]:
            parsed.selectors.append((text, []))  # a bare metric name selects without matchers
        if kind == "name" and text in LABEL_LIST_CLAUSES and tokens[i + 1:i + 2] == [("op", "(")]:
            i, labels = _label_list(tokens, i + 2, parsed.errors)
            parsed.label_lists.append((text, labels))
            continue
        i += 1
    return parsed


def _matchers(tokens: list[tuple[str, str]], i: int,
              errors: list[str]) -> tuple[int, list[tuple[str, str, str]]]:
    """Reads ``label op "value", ...}`` from ``tokens[i]``; returns the index after ``}``."""
    matchers = []
    while i < len(tokens) and tokens[i] != ("op", "}"):
        window = tokens[i:i + 3]
        if (len(window) < 3 or window[0][0] != "name" or window[1][1] not in _MATCH_OPS
                or window[2][0] != "string"):
            errors.append(f"cannot read a label matcher at {' '.join(t for _, t in window)!r}")
            return len(tokens), matchers
        matchers.append((window[0][1], window[1][1], window[2][1]))
        i += 3
        if i < len(tokens) and tokens[i] == ("op", ","):
            i += 1
    if i >= len(tokens):
        errors.append("a selector's '{' is never closed")
    return i + 1, matchers


def _label_list(tokens: list[tuple[str, str]], i: int, errors: list[str]) -> tuple[int, list[str]]:
    """Reads ``label, label)`` from ``tokens[i]``; returns the index after ``)``."""
    labels = []
    while i < len(tokens) and tokens[i] != ("op", ")"):
        kind, text = tokens[i]
        if kind == "name":
            labels.append(text)
        elif (kind, text) != ("op", ","):
            errors.append(f"unexpected {text!r} in a label list")
        i += 1
    if i >= len(tokens):
        errors.append("a label list's '(' is never closed")
    return i + 1, labels


def family(name: str) -> str:
    """A histogram's series name less its ``_bucket``/``_sum``/``_count``; any other as is."""
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base if base != name and f"{base}_bucket" in SERIES else name


def labels_of(metric: str, series: Mapping[str, tuple[str, ...]]) -> set[str]:
    labels = set(series.get(metric, ()))
    if metric.endswith("_bucket"):
        labels.add("le")
    return labels


def check_expression(expr: str, series: Mapping[str, tuple[str, ...]] = SERIES) -> list[str]:
    """What is wrong with ``expr``: unknown metric names, labels its metrics do not have.

    An empty list means every ``pgflow_*`` name in it is a key of ``series`` and every
    label it filters or groups on belongs to its selector's metric (to one of its
    metrics, for a grouping). ``instance`` and ``job`` are always allowed.
    """
    found = _LABEL_VALUES.match(expr)
    if found:  # a Grafana variable query: label_values(selector, label)
        selector = found.group("selector") or ""
        problems = check_expression(selector, series) if selector.strip() else []
        known = [m for m in METRIC.findall(selector) if m in series]
        label = found.group("label")
        if known and label not in TARGET_LABELS and not any(label in labels_of(m, series) for m in known):
            problems.append(f"label_values: label {label!r} is not a label of {', '.join(known)}")
        if not METRIC.findall(selector):
            problems.append("label_values names no pgflow metric")
        return problems

    parsed = parse(expr)
    problems = list(parsed.errors)
    if not parsed.metrics:
        problems.append("names no pgflow metric")
    problems += [f"unknown metric {m!r}" for m in dict.fromkeys(parsed.metrics) if m not in series]
    known = [m for m in parsed.metrics if m in series]
    every_label = set().union(*(labels_of(m, series) for m in known)) if known else set()
    for metric, matchers in parsed.selectors:
        allowed = labels_of(metric, series) if metric in series else every_label
        for label, _, _ in matchers:
            if label not in TARGET_LABELS and label not in allowed:
                where = metric or "a selector"
                problems.append(f"label {label!r} in a matcher of {where} is not one of its labels")
    for clause, labels in parsed.label_lists:
        for label in labels:
            if label not in TARGET_LABELS and label not in every_label:
                problems.append(f"label {label!r} in {clause} (...) is not a label of "
                                f"{', '.join(sorted(set(known))) or 'any known metric'}")
    return problems


def result_labels(expr: str, series: Mapping[str, tuple[str, ...]] = SERIES) -> set[str]:
    """The labels that the result of ``expr`` may carry (for legends and alert texts).

    With ``by (...)`` clauses, the labels they keep (less ``le`` once a
    ``histogram_quantile`` has used it); without, the metrics' own labels and the
    target's. A rough reading, but it catches a legend naming a label grouped away.
    """
    parsed = parse(expr)
    kept = [labels for clause, labels in parsed.label_lists if clause == "by"]
    if kept and not any(clause == "without" for clause, _ in parsed.label_lists):
        labels = set().union(*map(set, kept))
        return labels - {"le"} if "histogram_quantile" in expr else labels
    known = [m for m in parsed.metrics if m in series]
    return set().union(*(labels_of(m, series) for m in known)) | {"instance", "job"}


# ---------------------------------------------------------------------------------------
# The files.

@pytest.fixture(scope="module")
def alerts() -> dict[str, Any]:
    return yaml.safe_load(ALERTS.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rules(alerts: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in alerts["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in a collapsed row."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    return query.get("query", "") if isinstance(query, dict) else str(query or "")


def readme_expressions() -> list[str]:
    """The expressions of the README's ```promql blocks: separated by blank lines."""
    found = []
    for block in re.findall(r"```promql\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL):
        lines = [line for line in block.splitlines() if not line.lstrip().startswith("#")]
        chunks = re.split(r"\n\s*\n", "\n".join(lines))
        found += [chunk.strip() for chunk in chunks if chunk.strip()]
    return found


def expressions(rules: list[dict[str, Any]], dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, expression)`` for every PromQL expression in the three files."""
    found = [(f"alert {rule['alert']}", rule["expr"]) for rule in rules]
    for panel in graph_panels(dashboard):
        found += [(f"panel {panel['title']!r} {t['refId']}", t["expr"]) for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            found.append((f"variable {variable['name']}", variable_query(variable)))
    found += [("README", expr) for expr in readme_expressions()]
    return found


# ---------------------------------------------------------------------------------------
# The checker itself: it must find faults, or the tests below prove nothing.

@pytest.mark.parametrize(("expr", "fault"), [
    ("rate(pgflow_nope_total[5m])", "unknown metric 'pgflow_nope_total'"),
    ('sum(rate(pgflow_steps_total{queue="default"}[5m]))', "label 'queue' in a matcher"),
    ("sum by (queue) (rate(pgflow_steps_total[5m]))", "label 'queue' in by"),
    ('pgflow_worker_runs_in_flight{workflow=~"$workflow"}', "label 'workflow' in a matcher"),
    ("histogram_quantile(0.9, sum by (le) (rate(pgflow_step_duration_seconds_sum[5m])))",
     "label 'le' in by"),
    ("sum without (step) (pgflow_queue_runs)", "label 'step' in without"),
    ("rate(pgflow_steps_total[5 minutes])", "not a duration"),
    ("label_values(pgflow_queue_runs, workflow)", "label 'workflow' is not a label"),
    ("label_values(pgflow_queue_run, queue)", "unknown metric 'pgflow_queue_run'"),
    ("sum(rate(up[5m]))", "names no pgflow metric"),
])
def test_the_checker_reports_a_fault(expr: str, fault: str) -> None:
    problems = check_expression(expr)
    assert any(fault in problem for problem in problems), problems


@pytest.mark.parametrize("expr", [
    'sum by (le, workflow) (rate(pgflow_step_duration_seconds_bucket{workflow=~"a|b"}[5m]))',
    'pgflow_queue_runs{queue!="x", status=~"pending|held", instance="w1"} > 0',
    "sum by (queue) (rate(pgflow_claim_delay_seconds_sum[$__rate_interval]))"
    " / on (queue) sum by (queue) (rate(pgflow_claim_delay_seconds_count[$__rate_interval]))",
    "absent(pgflow_worker_runs_in_flight)",
    "label_values(pgflow_steps_total, outcome)",
])
def test_the_checker_accepts_a_correct_expression(expr: str) -> None:
    assert check_expression(expr) == []


def test_the_contract_is_what_the_checker_expects() -> None:
    assert SERIES, "pgflow.metrics.SERIES is empty"
    for name, labels in SERIES.items():
        assert METRIC.fullmatch(name), name
        assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", label) for label in labels), (name, labels)


# ---------------------------------------------------------------------------------------
# Every expression in the docs.

def test_every_expression_uses_known_metrics_and_their_labels(
        rules: list[dict[str, Any]], dashboard: dict[str, Any]) -> None:
    found = expressions(rules, dashboard)
    assert len({expr for _, expr in found}) >= 8, found
    problems = [f"{where}: {problem}\n    {expr}"
                for where, expr in found for problem in check_expression(expr)]
    assert not problems, "\n".join(problems)


def test_the_docs_cover_every_series(rules: list[dict[str, Any]], dashboard: dict[str, Any]) -> None:
    """Each series family is charted or alerted on, and the README's table lists exactly them."""
    families = {family(name) for name in SERIES}
    used = {family(m) for _, expr in expressions(rules, dashboard) for m in METRIC.findall(expr)}
    assert families <= used, f"never charted nor alerted on: {sorted(families - used)}"
    table = re.findall(r"^\| `(pgflow_[a-z0-9_]+)` \|", README.read_text(encoding="utf-8"), re.MULTILINE)
    assert Counter(table) == Counter(families), sorted(table)


# ---------------------------------------------------------------------------------------
# The alerting rules.

def test_the_rules_are_one_group_of_well_formed_alerts(alerts: dict[str, Any],
                                                       rules: list[dict[str, Any]]) -> None:
    assert [group["name"] for group in alerts["groups"]] == ["pgflow"]
    for rule in rules:
        name = rule.get("alert", "?")
        assert RULE_KEYS <= rule.keys() <= RULE_KEYS | OPTIONAL_RULE_KEYS, (name, sorted(rule))
        assert re.fullmatch(r"Pgflow[A-Z][A-Za-z]+", name), name
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
        assert isinstance(rule["for"], str) and DURATION.match(rule["for"]), (name, rule["for"])
        assert rule["labels"].get("severity") in SEVERITIES, (name, rule["labels"])
        for key in ("summary", "description"):
            text = rule["annotations"].get(key)
            assert isinstance(text, str) and text.strip(), (name, key)
            assert text.count("{{") == text.count("}}"), (name, key, text)
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), [n for n, c in Counter(names).items() if c > 1]
    assert {rule["alert"]: rule["labels"]["severity"] for rule in rules} == EXPECTED_ALERTS


def test_alert_texts_name_only_labels_the_alert_carries(rules: list[dict[str, Any]]) -> None:
    problems = []
    for rule in rules:
        carried = result_labels(rule["expr"]) | set(rule["labels"])
        for key, text in rule["annotations"].items():
            problems += [f"{rule['alert']} {key}: $labels.{label} (the alert carries {sorted(carried)})"
                         for label in re.findall(r"\$labels\.([A-Za-z_]\w*)", text)
                         if label not in carried]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------
# The dashboard.

def test_the_dashboard_is_identified_and_refreshes(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "pgflow-overview"
    assert dashboard["title"] == "pgflow"
    assert dashboard["refresh"] == "30s"
    assert isinstance(dashboard["schemaVersion"], int) and 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("id") is None  # importable into any Grafana


def test_the_dashboard_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    expected = {"workflow": "workflow", "queue": "queue"}
    for name, label in expected.items():
        variable = variables[name]
        assert variable["type"] == "query", name
        assert variable["datasource"] == DATASOURCE, name
        query = variable_query(variable)
        found = _LABEL_VALUES.match(query)
        assert found and found.group("label") == label, (name, query)
        assert variable.get("definition", query) == query, name
        assert variable["includeAll"] and variable["multi"], name
        assert variable.get("allValue") == ".*", name  # "All" also keeps series without the label


def test_every_panel_is_well_formed(dashboard: dict[str, Any]) -> None:
    panels = all_panels(dashboard)
    ids = [panel.get("id") for panel in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), [i for i, c in Counter(ids).items() if c > 1]
    for panel in panels:
        assert isinstance(panel.get("title"), str) and panel["title"].strip(), panel.get("id")
    for panel in graph_panels(dashboard):
        title = panel["title"]
        assert panel["type"] in {"timeseries", "stat"}, title
        assert panel["datasource"] == DATASOURCE, title
        assert isinstance(panel.get("description"), str) and panel["description"].strip(), title
        assert panel["fieldConfig"]["defaults"].get("unit"), title
        targets = panel["targets"]
        assert targets, title
        ref_ids = [target.get("refId") for target in targets]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), (title, ref_ids)
        for target in targets:
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), title
            assert target.get("datasource", DATASOURCE) == DATASOURCE, title


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    boxes = []
    for panel in all_panels(dashboard):
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0, panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        boxes.append((panel["title"], grid))
    for (one, a), (other, b) in itertools.combinations(boxes, 2):
        apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                 or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])
        assert apart, (one, other)


def test_panels_filter_on_the_variables(dashboard: dict[str, Any]) -> None:
    """A selector of a metric with a workflow (queue) label filters on $workflow ($queue)."""
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    problems = []
    for panel in graph_panels(dashboard):
        for target in panel["targets"]:
            parsed = parse(target["expr"])
            unknown = parsed.variables - variables - GRAFANA_BUILTINS
            if unknown:
                problems.append(f"{panel['title']}: unknown variables {sorted(unknown)}")
            for metric, matchers in parsed.selectors:
                for label in ("workflow", "queue"):
                    wanted = (label, "=~", f'"${label}"')
                    if metric and label in labels_of(metric, SERIES) and wanted not in matchers:
                        problems.append(f'{panel["title"]}: {metric} is not filtered by {label}=~"${label}"')
            if any(metric is None for metric, _ in parsed.selectors):
                problems.append(f"{panel['title']}: a selector without a metric name")
    assert not problems, "\n".join(problems)


def test_legends_name_only_labels_the_series_carry(dashboard: dict[str, Any]) -> None:
    problems = []
    for panel in graph_panels(dashboard):
        for target in panel["targets"]:
            carried = result_labels(target["expr"])
            legend = target.get("legendFormat", "")
            problems += [f"{panel['title']} {target['refId']}: {{{{{label}}}}} (carried: {sorted(carried)})"
                         for label in re.findall(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}", legend)
                         if label not in carried]
    assert not problems, "\n".join(problems)
