#!/usr/bin/env python3
"""Static checks of the deployment and monitoring stack under deploy/.

Called by deploy/monitoring/test.sh, one subcommand per check:

    check_stack.py yaml            every YAML (and JSON) file under deploy/ parses
    check_stack.py rules           alert metadata, thresholds, runbook anchors, tests in both directions
    check_stack.py dashboard       Grafana dashboard structure and PromQL metric names
    check_stack.py datasources     Grafana provisioning (uids, links between datasources)
    check_stack.py collector FILE  an OpenTelemetry Collector config (components referenced by pipelines exist)
    check_stack.py otel            deploy/monitoring/otel-collector.yaml specifics (span metrics, Jaeger, Prometheus)
    check_stack.py jaeger          deploy/monitoring/jaeger/config.yaml specifics (SPM reads the collector's series)
    check_stack.py compose         deploy/docker-compose.yml against the Dockerfile, Prometheus and Grafana configs
    check_stack.py k8s             deploy/k8s manifests (selectors, ports, KEDA trigger, thresholds)
    check_stack.py dockerfile      deploy/Dockerfile stages and COPY sources
    check_stack.py count-tests     prints how many promtool test cases there are
    check_stack.py mutate ALERT    the unit tests catch ALERT never firing and always firing

Each exits 0 when the check holds, 1 with the reasons on stderr otherwise.
Needs PyYAML.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

MON = Path(__file__).resolve().parent
DEPLOY = MON.parent
ROOT = DEPLOY.parent
RULES = MON / "rules"
TESTS = RULES / "tests"
RUNBOOKS = ROOT / "docs" / "runbooks.md"

# The metrics the binaries export (Prometheus names), plus `up`.
HISTOGRAMS = {
    "cm_command_duration_seconds",
    "cm_command_latency_seconds",
    "cm_lock_wait_seconds",
    "cm_pulumi_duration_seconds",
}
PLAIN_METRICS = {
    "challenges",
    "instances",
    "cm_commands_total",
    "cm_queue_pending",
    "cm_queue_ack_pending",
    "cm_queue_redelivered",
    "cm_queue_waiting",
    "cm_queue_oldest_pending_age_seconds",
    "cm_dead_letters",
    "cm_pool_size",
    "cm_pool_claims_total",
    "cm_pool_target",
    "cm_pool_ready",
    "cm_pool_deploying",
    "cm_pool_claim_rate",
    "cm_pool_deploy_seconds",
    "cm_janitor_ticks_total",
    "cm_janitor_expired_found_total",
    "cm_janitor_last_tick_timestamp_seconds",
    "cm_state_bytes_written_total",
    "cm_etcd_db_size_bytes",
    "cm_etcd_db_quota_bytes",
    "cm_etcd_alarm",
    "up",
}
KNOWN_METRICS = PLAIN_METRICS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
# prometheus-nats-exporter series that the rules read (and only the rules).
NATS_EXPORTER_METRICS = {
    "jetstream_consumer_num_pending",
    "jetstream_consumer_num_ack_pending",
    "jetstream_server_total_streams",
}
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan", "atan2",
}
SEVERITIES = {"critical", "warning"}

errors: list[str] = []


def fail(msg: str) -> None:
    errors.append(msg)


def finish(ok_msg: str) -> int:
    if errors:
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    print(ok_msg)
    return 0


def load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ---------------------------------------------------------------- PromQL names

def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, labels, keywords removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", " ", s)
    s = re.sub(r"`[^`]*`", " ", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)", s):
        name = m.group(1)
        rest = s[m.end():]
        if re.match(r"\s*\(", rest):
            continue  # function or aggregation
        if name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def recorded_names() -> set[str]:
    names = set()
    for f in sorted(RULES.glob("*.yml")):
        for g in (load_yaml(f) or {}).get("groups", []):
            for r in g.get("rules", []):
                if "record" in r:
                    names.add(r["record"])
    return names


def alert_rules() -> list[dict]:
    out = []
    for g in load_yaml(RULES / "alerts.yml")["groups"]:
        out.extend(r for r in g["rules"] if "alert" in r)
    return out


# ---------------------------------------------------------------- checks

def check_yaml() -> int:
    n = 0
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(ROOT)
        try:
            if path.suffix in (".yml", ".yaml"):
                docs = load_yaml_all(path)
                if not docs:
                    fail(f"{rel}: empty YAML")
                n += 1
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
                n += 1
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            fail(f"{rel}: {e}")
    return finish(f"{n} YAML/JSON files parse")


def github_anchors(md: str) -> set[str]:
    anchors = set()
    for line in md.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            text = re.sub(r"[`*_]", "", m.group(1)).strip().lower()
            slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_cases() -> list[tuple[Path, dict]]:
    out = []
    for f in sorted(TESTS.glob("*.yml")):
        for t in load_yaml(f).get("tests", []):
            out.append((f, t))
    return out


def check_rules() -> int:
    recorded = recorded_names()
    alerts = alert_rules()
    anchors = github_anchors(RUNBOOKS.read_text(encoding="utf-8")) if RUNBOOKS.exists() else set()
    if not anchors:
        fail(f"{RUNBOOKS.relative_to(ROOT)} missing or without headings")

    names = [a["alert"] for a in alerts]
    for dup in {n for n in names if names.count(n) > 1}:
        fail(f"alert {dup} defined twice")

    all_records = []
    for f in sorted(RULES.glob("*.yml")):
        for g in load_yaml(f).get("groups", []):
            all_records += [r["record"] for r in g.get("rules", []) if "record" in r]
    for dup in {n for n in all_records if all_records.count(n) > 1}:
        fail(f"recording rule {dup} defined twice")

    allowed = KNOWN_METRICS | NATS_EXPORTER_METRICS | recorded
    for f in sorted(RULES.glob("*.yml")):
        for g in load_yaml(f).get("groups", []):
            for r in g.get("rules", []):
                what = r.get("alert") or r.get("record")
                used = metric_names(str(r["expr"]))
                for name in sorted(used - allowed):
                    fail(f"{f.name}: {what}: unknown metric or rule {name!r}")
                for ref in re.findall(r"cm:(?:threshold|slo):\w+", str(r["expr"])):
                    if ref not in recorded:
                        fail(f"{f.name}: {what}: {ref} is not recorded anywhere (the alert would be inert)")

    for a in alerts:
        name = a["alert"]
        sev = (a.get("labels") or {}).get("severity")
        if sev not in SEVERITIES:
            fail(f"{name}: severity label {sev!r} not in {sorted(SEVERITIES)}")
        ann = a.get("annotations") or {}
        for key in ("summary", "description", "runbook_url"):
            if not str(ann.get(key, "")).strip():
                fail(f"{name}: annotation {key} missing")
        url = str(ann.get("runbook_url", ""))
        expected = f"docs/runbooks.md#{name.lower()}"
        if url != expected:
            fail(f"{name}: runbook_url {url!r}, expected {expected!r}")
        if name.lower() not in anchors:
            fail(f"{name}: no section '## {name}' in docs/runbooks.md")

    fires, quiet = set(), set()
    for f, t in test_cases():
        for case in t.get("alert_rule_test", []) or []:
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
            if case["alertname"] not in names:
                fail(f"{f.name}: test {t.get('name')!r} names unknown alert {case['alertname']}")
    for name in names:
        if name not in fires:
            fail(f"{name}: no unit test where it fires")
        if name not in quiet:
            fail(f"{name}: no unit test where it stays quiet")

    return finish(f"{len(alerts)} alerts, {len(recorded)} recording rules: metadata, "
                  f"thresholds, runbook anchors and two-way tests present")


def count_tests() -> int:
    cases = test_cases()
    alert_evals = sum(len(t.get("alert_rule_test", []) or []) for _, t in cases)
    expr_evals = sum(len(t.get("promql_expr_test", []) or []) for _, t in cases)
    files = len({f for f, _ in cases})
    print(f"{len(cases)} test cases in {files} files "
          f"({alert_evals} alert evaluations, {expr_evals} expression checks)")
    return 0


def provisioned_datasources() -> list[dict]:
    out = []
    for f in sorted((MON / "grafana" / "provisioning" / "datasources").glob("*.y*ml")):
        out.extend(load_yaml(f).get("datasources", []))
    return out


def check_datasources() -> int:
    ds = provisioned_datasources()
    uids = [d.get("uid") for d in ds]
    if any(not u for u in uids):
        fail("a datasource has no uid")
    for dup in {u for u in uids if uids.count(u) > 1}:
        fail(f"datasource uid {dup} used twice")
    by_uid = {d.get("uid"): d for d in ds}
    for need in ("prometheus", "jaeger"):
        if need not in {d.get("type") for d in ds}:
            fail(f"no datasource of type {need}")
    if sum(1 for d in ds if d.get("isDefault")) != 1:
        fail("exactly one datasource must be the default")
    for d in ds:
        jd = d.get("jsonData") or {}
        t2m = jd.get("tracesToMetrics")
        if d.get("type") == "jaeger":
            if not t2m:
                fail("Jaeger datasource lacks tracesToMetrics")
            elif t2m.get("datasourceUid") not in by_uid:
                fail(f"tracesToMetrics points at unknown uid {t2m.get('datasourceUid')}")
            else:
                for q in t2m.get("queries", []):
                    if "$__tags" not in q.get("query", "").replace("$$", "$"):
                        fail(f"tracesToMetrics query {q.get('name')!r} does not use $__tags")
        for ex in jd.get("exemplarTraceIdDestinations", []) or []:
            if ex.get("datasourceUid") not in by_uid:
                fail(f"{d.get('name')}: exemplar link to unknown uid {ex.get('datasourceUid')}")
    providers = []
    for f in sorted((MON / "grafana" / "provisioning" / "dashboards").glob("*.y*ml")):
        providers.extend(load_yaml(f).get("providers", []))
    if not providers:
        fail("no dashboard provider")
    return finish(f"{len(ds)} datasources ({', '.join(u for u in uids if u)}), {len(providers)} dashboard provider(s)")


def iter_panels(panels):
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []) or [])


def check_dashboard() -> int:
    uids = {d.get("uid") for d in provisioned_datasources()}
    recorded = recorded_names()
    allowed = KNOWN_METRICS | recorded
    files = sorted((MON / "grafana" / "dashboards").glob("*.json"))
    if not files:
        fail("no dashboard JSON")
    n_panels = n_exprs = 0
    for f in files:
        d = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(d.get("schemaVersion"), int):
            fail(f"{f.name}: schemaVersion missing")
        for key in ("uid", "title", "panels"):
            if not d.get(key):
                fail(f"{f.name}: {key} missing")
        ids = []
        boxes = []
        for p in iter_panels(d.get("panels", [])):
            n_panels += 1
            pid = p.get("id")
            ids.append(pid)
            label = f"{f.name}: panel {pid} {p.get('title')!r}"
            if not isinstance(pid, int):
                fail(f"{label}: id must be an integer")
            gp = p.get("gridPos")
            if not isinstance(gp, dict) or not all(isinstance(gp.get(k), int) for k in ("h", "w", "x", "y")):
                fail(f"{label}: gridPos with integer h, w, x, y required")
            else:
                if gp["x"] < 0 or gp["w"] <= 0 or gp["x"] + gp["w"] > 24:
                    fail(f"{label}: gridPos outside the 24-column grid")
                boxes.append((label, gp))
            refs = []
            if p.get("datasource"):
                refs.append(p["datasource"])
            for t in p.get("targets", []) or []:
                if t.get("datasource"):
                    refs.append(t["datasource"])
                expr = t.get("expr")
                if expr is not None:
                    n_exprs += 1
                    used = metric_names(expr)
                    if not used & allowed:
                        fail(f"{label}: expr mentions no known metric or recording rule: {expr}")
                    for name in sorted(used - allowed):
                        fail(f"{label}: unknown metric {name!r} in {expr}")
            if p.get("type") != "row" and not p.get("targets"):
                fail(f"{label}: no targets")
            for ref in refs:
                if not isinstance(ref, dict) or ref.get("uid") not in uids:
                    fail(f"{label}: datasource {ref!r} is not a provisioned uid {sorted(uids)}")
        for dup in {i for i in ids if ids.count(i) > 1}:
            fail(f"{f.name}: panel id {dup} used twice")
        for i, (la, a) in enumerate(boxes):
            for lb, b in boxes[i + 1:]:
                if (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                        and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]):
                    fail(f"{la} overlaps {lb}")
        for var in (d.get("templating") or {}).get("list", []):
            ds = var.get("datasource")
            if ds and (not isinstance(ds, dict) or ds.get("uid") not in uids):
                fail(f"{f.name}: variable {var.get('name')}: unknown datasource {ds!r}")
            q = var.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if var.get("type") == "query" and not (metric_names(str(q)) & allowed | {m for m in allowed if m in str(q)}):
                fail(f"{f.name}: variable {var.get('name')}: query uses no known metric: {q}")
    return finish(f"{len(files)} dashboard(s), {n_panels} panels, {n_exprs} PromQL expressions checked")


PIPELINE_TYPES = ("traces", "metrics", "logs")


def collector_sections(cfg: dict) -> dict[str, dict]:
    return {k: (cfg.get(k) or {}) for k in ("receivers", "processors", "exporters", "connectors", "extensions")}


def check_collector_file(path: Path) -> None:
    cfg = load_yaml(path)
    rel = path.relative_to(ROOT)
    sec = collector_sections(cfg)
    service = cfg.get("service") or {}
    pipelines = service.get("pipelines") or {}
    if not pipelines:
        fail(f"{rel}: no service.pipelines")
    used = {k: set() for k in sec}
    conn_in, conn_out = set(), set()
    for pname, p in pipelines.items():
        ptype = pname.split("/", 1)[0]
        if ptype not in PIPELINE_TYPES:
            fail(f"{rel}: pipeline {pname}: unknown signal {ptype!r}")
        if not p.get("receivers"):
            fail(f"{rel}: pipeline {pname} has no receivers")
        if not p.get("exporters"):
            fail(f"{rel}: pipeline {pname} has no exporters")
        for r in p.get("receivers", []):
            if r in sec["receivers"]:
                used["receivers"].add(r)
            elif r in sec["connectors"]:
                used["connectors"].add(r)
                conn_out.add(r)
            else:
                fail(f"{rel}: pipeline {pname}: receiver {r} is neither a receiver nor a connector")
        for pr in p.get("processors", []) or []:
            if pr in sec["processors"]:
                used["processors"].add(pr)
            else:
                fail(f"{rel}: pipeline {pname}: processor {pr} not defined")
        for e in p.get("exporters", []):
            if e in sec["exporters"]:
                used["exporters"].add(e)
            elif e in sec["connectors"]:
                used["connectors"].add(e)
                conn_in.add(e)
            else:
                fail(f"{rel}: pipeline {pname}: exporter {e} is neither an exporter nor a connector")
    for ext in service.get("extensions", []) or []:
        if ext in sec["extensions"]:
            used["extensions"].add(ext)
        else:
            fail(f"{rel}: service extension {ext} not defined")
    for kind, comps in sec.items():
        for name in comps:
            if name not in used[kind]:
                fail(f"{rel}: {kind[:-1]} {name} is defined but not used")
    for c in sec["connectors"]:
        if c not in conn_in or c not in conn_out:
            fail(f"{rel}: connector {c} must be an exporter of one pipeline and a receiver of another")


def check_collector(path: str) -> int:
    p = Path(path).resolve()
    check_collector_file(p)
    return finish(f"{p.relative_to(ROOT)}: every component a pipeline references is defined and used")


def component(sec: dict, type_names: tuple[str, ...]) -> list[str]:
    return [k for k in sec if k.split("/", 1)[0] in type_names]


def check_otel() -> int:
    path = MON / "otel-collector.yaml"
    cfg = load_yaml(path)
    sec = collector_sections(cfg)
    pipelines = cfg["service"]["pipelines"]
    otlp = component(sec["receivers"], ("otlp",))
    if not otlp:
        fail("no otlp receiver")
    else:
        protos = sec["receivers"][otlp[0]].get("protocols") or {}
        if not str((protos.get("grpc") or {}).get("endpoint", "")).endswith(":4317"):
            fail("otlp grpc receiver must listen on :4317")
        if not str((protos.get("http") or {}).get("endpoint", "")).endswith(":4318"):
            fail("otlp http receiver must listen on :4318")
    sm = component(sec["connectors"], ("span_metrics", "spanmetrics"))
    if not sm:
        fail("no span_metrics (spanmetrics) connector")
    else:
        dims = {d.get("name") for d in sec["connectors"][sm[0]].get("dimensions", [])}
        for need in ("messaging.destination.name", "cm.command.kind"):
            if need not in dims:
                fail(f"span metrics dimension {need} missing")
    jaeger = [e for e in component(sec["exporters"], ("otlp", "otlp_grpc"))
              if "jaeger" in str(sec["exporters"][e].get("endpoint", ""))]
    prom = component(sec["exporters"], ("prometheus", "prometheusremotewrite"))
    traces = [p for n, p in pipelines.items() if n.split("/")[0] == "traces"]
    metrics = [p for n, p in pipelines.items() if n.split("/")[0] == "metrics"]
    if not any(set(jaeger) & set(p.get("exporters", [])) for p in traces):
        fail("no traces pipeline exports to Jaeger over OTLP")
    if not any(set(sm) & set(p.get("exporters", [])) for p in traces):
        fail("no traces pipeline feeds the span metrics connector")
    if not any(set(sm) & set(p.get("receivers", [])) and set(prom) & set(p.get("exporters", [])) for p in metrics):
        fail("no metrics pipeline from the span metrics connector to a Prometheus exporter")
    return finish("traces -> Jaeger and span metrics -> Prometheus are wired")


def check_jaeger() -> int:
    path = MON / "jaeger" / "config.yaml"
    cfg = load_yaml(path)
    ext = cfg.get("extensions") or {}
    storage = ext.get("jaeger_storage") or {}
    query = ext.get("jaeger_query") or {}
    backends = storage.get("backends") or {}
    metric_backends = storage.get("metric_backends") or {}
    st = query.get("storage") or {}
    if st.get("traces") not in backends:
        fail(f"jaeger_query.storage.traces {st.get('traces')!r} is not a backend")
    mb = metric_backends.get(st.get("metrics"))
    if not mb or "prometheus" not in mb:
        fail("jaeger_query.storage.metrics must name a prometheus metric backend (SPM)")
    else:
        prom = mb["prometheus"]
        otel = load_yaml(MON / "otel-collector.yaml")
        sm = component(otel.get("connectors") or {}, ("span_metrics", "spanmetrics"))
        ns = (otel["connectors"][sm[0]].get("namespace", "traces.span.metrics") if sm else "").replace(".", "_")
        if prom.get("metric_namespace", "traces_span_metrics") != ns:
            fail(f"SPM metric_namespace {prom.get('metric_namespace')!r} != collector namespace {ns!r}")
        if not (prom.get("normalize_calls") and prom.get("normalize_duration")):
            fail("the collector's Prometheus exporter adds _total and unit suffixes: normalize_calls/normalize_duration must be true")
        if "prometheus:9090" not in str(prom.get("endpoint", "")):
            fail("SPM must read the stack's Prometheus")
    for e in (cfg.get("exporters") or {}).values():
        if isinstance(e, dict) and "trace_storage" in e and e["trace_storage"] not in backends:
            fail(f"exporter trace_storage {e['trace_storage']!r} is not a backend")
    return finish("Jaeger stores traces and reads SPM metrics from Prometheus with the collector's names")


def dockerfile_stages() -> set[str]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))


def env_of(svc: dict) -> dict:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return env


def listen_port(cmd: list, flag: str) -> str | None:
    for i, a in enumerate(cmd):
        if a == flag and i + 1 < len(cmd):
            return str(cmd[i + 1]).rsplit(":", 1)[-1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1].rsplit(":", 1)[-1]
    return None


def check_compose() -> int:
    path = DEPLOY / "docker-compose.yml"
    c = load_yaml(path)
    svcs = c.get("services") or {}
    required = ["nats", "etcd", "nats-exporter", "cm-api", "cm-worker", "cm-janitor",
                "otel-collector", "prometheus", "alertmanager", "jaeger", "grafana"]
    for s in required:
        if s not in svcs:
            fail(f"service {s} missing")
    stages = dockerfile_stages()
    for name, s in svcs.items():
        deps = s.get("depends_on") or {}
        for d in (deps if isinstance(deps, (list, dict)) else []):
            if d not in svcs:
                fail(f"{name}: depends_on unknown service {d}")
        for v in s.get("volumes", []) or []:
            src = v.split(":", 1)[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith((".", "/")) and not (DEPLOY / src).resolve().exists():
                fail(f"{name}: bind mount source {src} does not exist")
            elif not src.startswith((".", "/")) and src not in (c.get("volumes") or {}):
                fail(f"{name}: named volume {src} not declared")
        b = s.get("build")
        if b:
            ctx = (DEPLOY / b.get("context", ".")).resolve()
            if not (ctx / b.get("dockerfile", "Dockerfile")).exists():
                fail(f"{name}: build dockerfile not found")
            if b.get("target") and b["target"] not in stages:
                fail(f"{name}: build target {b['target']} is not a stage of deploy/Dockerfile")
        for ef in s.get("env_file", []) or []:
            p = ef["path"] if isinstance(ef, dict) else ef
            example = DEPLOY / (p.lstrip("./") + ".example")
            if not example.exists():
                fail(f"{name}: env file {p} has no {example.name} to copy from")

    for name in ("cm-api", "cm-worker", "cm-janitor"):
        env = env_of(svcs.get(name, {}))
        for var in ("CM_NATS_URL", "CM_ETCD_ENDPOINTS", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            if not env.get(var):
                fail(f"{name}: {var} not set")
        if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") != "http://otel-collector:4317":
            fail(f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT must be http://otel-collector:4317")
        if env.get("CM_NATS_URL", "").split("//")[-1].split(":")[0] not in svcs:
            fail(f"{name}: CM_NATS_URL host is not a service")
    worker = svcs.get("cm-worker", {})
    if (worker.get("deploy") or {}).get("replicas") != 2:
        fail("cm-worker must run 2 replicas")
    example = DEPLOY / "cm.env.example"
    if not example.exists() or "CM_PULUMI_PASSPHRASE=" not in example.read_text():
        fail("deploy/cm.env.example must define CM_PULUMI_PASSPHRASE")
    if "CM_PULUMI_PASSPHRASE" in env_of(worker):
        fail("cm-worker: the passphrase must come from the env file, not inline")
    for name, s in svcs.items():
        if name != "cm-worker" and any("cm.env" in str(ef) for ef in s.get("env_file", []) or []):
            fail(f"{name}: only cm-worker may read cm.env (it holds the Pulumi passphrase)")
    nats_cmd = " ".join(map(str, svcs.get("nats", {}).get("command", [])))
    if not re.search(r"(--jetstream|-js)\b", nats_cmd) or "8222" not in nats_cmd:
        fail("nats must run with JetStream and the monitoring port 8222")
    if "-jsz" not in " ".join(map(str, svcs.get("nats-exporter", {}).get("command", []))):
        fail("nats-exporter must export JetStream metrics (-jsz)")

    # Prometheus targets are compose services, on the ports the services listen on.
    prom = load_yaml(MON / "prometheus.yml")
    listen = {
        "cm-api": listen_port(svcs.get("cm-api", {}).get("command", []), "--metrics-listen")
        or listen_port(svcs.get("cm-api", {}).get("command", []), "--listen"),
        "cm-worker": listen_port(worker.get("command", []), "--metrics-listen"),
        "cm-janitor": listen_port(svcs.get("cm-janitor", {}).get("command", []), "--metrics-listen"),
    }
    jobs = {}
    for sc in prom.get("scrape_configs", []):
        targets = []
        for st in sc.get("static_configs", []) or []:
            targets += st.get("targets", [])
        for dns in sc.get("dns_sd_configs", []) or []:
            targets += [f"{n}:{dns.get('port')}" for n in dns.get("names", [])]
        jobs[sc["job_name"]] = targets
        for t in targets:
            host, port = t.rsplit(":", 1)
            if host != "localhost" and host not in svcs:
                fail(f"prometheus job {sc['job_name']}: target host {host} is not a compose service")
            if host in listen and listen[host] != port:
                fail(f"prometheus job {sc['job_name']}: port {port} but {host} listens on {listen[host]}")
    for job in ("cm-api", "cm-worker", "cm-janitor", "nats", "etcd"):
        if job not in jobs:
            fail(f"prometheus.yml: scrape job {job} missing (the alerts use it)")
    for am in (prom.get("alerting") or {}).get("alertmanagers", []):
        for st in am.get("static_configs", []):
            for t in st.get("targets", []):
                if t.rsplit(":", 1)[0] not in svcs:
                    fail(f"alertmanager target {t} is not a compose service")
    for d in provisioned_datasources():
        host = re.sub(r"^\w+://", "", d.get("url", "")).split(":")[0].split("/")[0]
        if host and host not in svcs:
            fail(f"datasource {d.get('name')}: host {host} is not a compose service")

    # Grafana's dashboard provider reads where compose mounts the dashboards.
    provider_paths = set()
    for f in (MON / "grafana" / "provisioning" / "dashboards").glob("*.y*ml"):
        for p in load_yaml(f).get("providers", []):
            provider_paths.add((p.get("options") or {}).get("path"))
    mounts = {v.split(":")[1] for v in svcs.get("grafana", {}).get("volumes", []) if isinstance(v, str)}
    for p in provider_paths:
        if p not in mounts:
            fail(f"dashboard provider path {p} is not mounted into grafana")
    return finish(f"{len(svcs)} services; builds, mounts, env, scrape targets and ports agree")


NAMESPACED = {"ConfigMap", "Deployment", "Service", "ScaledObject", "PodMonitor", "PodDisruptionBudget", "Secret", "CronJob"}


def check_k8s() -> int:
    kdir = DEPLOY / "k8s"
    docs = []
    for f in sorted(kdir.glob("*.yaml")):
        for d in load_yaml_all(f):
            docs.append((f.name, d))
    by_kind: dict[str, dict[str, dict]] = {}
    for fname, d in docs:
        for key in ("apiVersion", "kind"):
            if not d.get(key):
                fail(f"{fname}: document without {key}")
        if d.get("kind") == "Kustomization":
            for r in d.get("resources", []):
                if not (kdir / r).exists():
                    fail(f"kustomization: resource {r} missing")
            continue
        name = (d.get("metadata") or {}).get("name")
        if not name:
            fail(f"{fname}: {d.get('kind')} without metadata.name")
        if d.get("kind") in NAMESPACED and (d.get("metadata") or {}).get("namespace") != "ctf-instancer":
            fail(f"{fname}: {d.get('kind')}/{name} not in namespace ctf-instancer")
        by_kind.setdefault(d["kind"], {})[name] = d
    deps = by_kind.get("Deployment", {})
    for need in ("cm-api", "cm-worker", "cm-janitor"):
        if need not in deps and not (need == "cm-janitor" and "cm-janitor" in by_kind.get("CronJob", {})):
            fail(f"no Deployment {need}")
    ports_of = {}
    for name, d in deps.items():
        spec = d["spec"]
        sel = (spec.get("selector") or {}).get("matchLabels") or {}
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            fail(f"Deployment {name}: selector {sel} does not match template labels {labels}")
        ports = set()
        for c in spec["template"]["spec"]["containers"]:
            if not c.get("image"):
                fail(f"Deployment {name}: container {c.get('name')} without image")
            for p in c.get("ports", []) or []:
                ports.add(p.get("name"))
                ports.add(p.get("containerPort"))
            for ef in c.get("envFrom", []) or []:
                ref = (ef.get("configMapRef") or {}).get("name")
                if ref and ref not in by_kind.get("ConfigMap", {}):
                    fail(f"Deployment {name}: ConfigMap {ref} not defined")
            args = [str(a) for a in c.get("args", []) or []]
            mport = listen_port(args, "--metrics-listen") or listen_port(args, "--listen")
            if mport and int(mport) not in ports:
                fail(f"Deployment {name}: listens on {mport} but declares no such containerPort")
            if mport and listen_port(args, "--metrics-listen") and not any(
                    a.endswith(f"0.0.0.0:{mport}") for a in args):
                fail(f"Deployment {name}: --metrics-listen must bind 0.0.0.0 to be scraped")
        ports_of[name] = (labels, ports)
    for name, s in by_kind.get("Service", {}).items():
        sel = s["spec"].get("selector") or {}
        targets = [n for n, (labels, _) in ports_of.items() if all(labels.get(k) == v for k, v in sel.items())]
        if not targets:
            fail(f"Service {name}: selector {sel} matches no Deployment")
        for p in s["spec"].get("ports", []):
            tp = p.get("targetPort", p.get("port"))
            if targets and not any(tp in ports_of[t][1] for t in targets):
                fail(f"Service {name}: targetPort {tp} not declared by {targets}")
    for name, pm in by_kind.get("PodMonitor", {}).items():
        sel = (pm["spec"].get("selector") or {}).get("matchLabels") or {}
        targets = [n for n, (labels, _) in ports_of.items() if all(labels.get(k) == v for k, v in sel.items())]
        if not targets:
            fail(f"PodMonitor {name}: selector matches no Deployment")
        for ep in pm["spec"].get("podMetricsEndpoints", []):
            if targets and not any(ep.get("port") in ports_of[t][1] for t in targets):
                fail(f"PodMonitor {name}: port {ep.get('port')} not declared")
    sos = by_kind.get("ScaledObject", {})
    if not sos:
        fail("no KEDA ScaledObject")
    thresholds = {}
    for g in load_yaml(RULES / "thresholds.yml")["groups"]:
        for r in g["rules"]:
            m = re.fullmatch(r"\s*vector\(\s*([0-9.eE+-]+)\s*\)\s*", str(r["expr"]))
            if m:
                thresholds[r["record"]] = float(m.group(1))
    for name, so in sos.items():
        spec = so["spec"]
        target = (spec.get("scaleTargetRef") or {}).get("name")
        if target not in deps or target != "cm-worker":
            fail(f"ScaledObject {name}: must target the cm-worker Deployment, not {target}")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if not 1 <= lo <= hi:
            fail(f"ScaledObject {name}: need 1 <= minReplicaCount <= maxReplicaCount (CmNoWorkerConsuming)")
        trig = [t for t in spec.get("triggers", []) if t.get("type") == "nats-jetstream"]
        if not trig:
            fail(f"ScaledObject {name}: no nats-jetstream trigger")
            continue
        md = trig[0].get("metadata") or {}
        expect = {"account": "$G", "stream": "CM_COMMANDS", "consumer": "cm-workers"}
        for k, v in expect.items():
            if md.get(k) != v:
                fail(f"ScaledObject {name}: {k} = {md.get(k)!r}, expected {v!r}")
        ep = str(md.get("natsServerMonitoringEndpoint", ""))
        if not re.fullmatch(r"[\w.-]+:\d+", ep):
            fail(f"ScaledObject {name}: natsServerMonitoringEndpoint must be host:port, got {ep!r}")
        try:
            lag = float(md.get("lagThreshold"))
        except (TypeError, ValueError):
            fail(f"ScaledObject {name}: lagThreshold must be a number in a string")
            continue
        backlog = thresholds.get("cm:threshold:queue_pending_backlog")
        if backlog and abs(lag * hi - backlog) > 0.25 * backlog:
            fail(f"ScaledObject {name}: lagThreshold x maxReplicaCount = {lag * hi:g} drifted from "
                 f"cm:threshold:queue_pending_backlog = {backlog:g} (keep them within 25 %)")
    return finish(f"{len(docs)} manifests; selectors, ports, config refs and the KEDA trigger agree with the alerts")


def check_dockerfile() -> int:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    stages = dockerfile_stages()
    for need in ("rust-build", "pulumi-build", "cm-service", "cm-worker"):
        if need not in stages:
            fail(f"stage {need} missing")
    for m in re.finditer(r"^COPY\s+(.*)$", text, re.M):
        parts = [p for p in m.group(1).split() if not p.startswith("--")]
        if "--from=" in m.group(1):
            frm = re.search(r"--from=(\S+)", m.group(1)).group(1)
            if frm not in stages:
                fail(f"COPY --from={frm}: no such stage")
            continue
        for src in parts[:-1]:
            if src != "." and not (ROOT / src).exists():
                fail(f"COPY source {src} does not exist in the repository")
    if "install-pulumi.sh" not in text:
        fail("the Pulumi CLI must be built with scripts/install-pulumi.sh")
    if not re.search(r"cargo build --release", text):
        fail("no cargo release build")
    return finish(f"stages {', '.join(sorted(stages))}; COPY sources exist")


def duration_s(text) -> float:
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", str(text)):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400,
                               "w": 604800, "y": 31536000}[unit]
    return total


def mutate(alert: str) -> int:
    """Each test case about ALERT catches a broken ALERT.

    Two mutants of alerts.yml: ALERT never fires (expr `vector(1) == 2`), and
    ALERT always fires (expr `vector(1)`). Every case that expects ALERT to
    fire must fail against the first; every case that expects silence at an
    eval_time past the alert's `for:` hold must fail against the second. Each
    case runs as its own test group so that each one is accounted for.
    """
    rule = next((a for a in alert_rules() if a["alert"] == alert), None)
    if rule is None:
        fail(f"{alert}: not in alerts.yml")
        return finish("")
    hold = duration_s(rule.get("for", "0s"))
    counts = {}
    for mode, expr in (("never", "vector(1) == 2"), ("always", "vector(1)")):
        with tempfile.TemporaryDirectory() as tmp:
            rules = Path(tmp) / "rules"
            shutil.copytree(RULES, rules)
            doc = load_yaml(rules / "alerts.yml")
            for g in doc["groups"]:
                for r in g["rules"]:
                    if r.get("alert") == alert:
                        r["expr"] = expr
            with open(rules / "alerts.yml", "w", encoding="utf-8") as f:
                yaml.safe_dump(doc, f, sort_keys=False)
            groups = []
            files = []
            for src in sorted(TESTS.glob("*.yml")):
                tdoc = load_yaml(src)
                out = []
                for t in tdoc.get("tests", []):
                    for case in t.get("alert_rule_test", []) or []:
                        if case["alertname"] != alert:
                            continue
                        expects = bool(case.get("exp_alerts"))
                        if mode == "never" and not expects:
                            continue
                        if mode == "always" and (expects or duration_s(case["eval_time"]) < hold):
                            continue
                        name = f"mutant-{len(groups)}: {t.get('name')} @ {case['eval_time']}"
                        groups.append(name)
                        out.append({k: v for k, v in t.items() if k not in ("alert_rule_test", "promql_expr_test", "name")}
                                   | {"name": name, "alert_rule_test": [case]})
                if out:
                    tdoc["tests"] = out
                    dst = rules / "tests" / src.name
                    with open(dst, "w", encoding="utf-8") as f:
                        yaml.safe_dump(tdoc, f, sort_keys=False)
                    files.append(str(dst))
            counts[mode] = len(groups)
            if not groups:
                fail(f"{alert}: no test case that would catch it when it {mode} fires")
                continue
            res = subprocess.run(["promtool", "test", "rules", *files], capture_output=True, text=True)
            output = res.stdout + res.stderr
            if res.returncode == 0:
                fail(f"{alert}: the unit tests still pass when it {mode} fires")
            for name in groups:
                if name not in output:
                    fail(f"{alert}: test case {name!r} still passes when the alert {mode} fires")
    return finish(f"{alert}: {counts.get('never', 0)} firing case(s) fail when it never fires, "
                  f"{counts.get('always', 0)} quiet case(s) fail when it always fires")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    table = {
        "yaml": check_yaml, "rules": check_rules, "dashboard": check_dashboard,
        "datasources": check_datasources, "otel": check_otel, "jaeger": check_jaeger,
        "compose": check_compose, "k8s": check_k8s, "dockerfile": check_dockerfile,
        "count-tests": count_tests,
    }
    if cmd in table:
        return table[cmd]()
    if cmd == "collector" and len(args) == 1:
        return check_collector(args[0])
    if cmd == "mutate" and len(args) == 1:
        return mutate(args[0])
    if cmd == "alerts":
        print("\n".join(a["alert"] for a in alert_rules()))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
