#!/usr/bin/env python3
"""The observability and deployment assets' structural checks, run by scripts/check-assets.sh.

Usage: check_assets.py ROOT METRIC_NAMES. One line per check (ok or FAIL with the
problems); exit 1 on any failure. METRIC_NAMES is a JSON file of every metric the code
exports, as `cargo run -p fleet --example metric_names` prints it. Needs PyYAML
(check-assets.sh installs python3-yaml when missing) and, for the PromQL checks, the local
Prometheus.
"""
import json
import os
import re
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request

import yaml

ROOT = sys.argv[1]
failed = False


def check(desc, problems):
    """Prints one line for a check; `problems` is a list of strings (empty = ok)."""
    global failed
    if problems:
        failed = True
        print(f"FAIL  {desc}")
        for p in problems:
            print(f"      {p}")
    else:
        print(f"ok    {desc}")


def path(*parts):
    return os.path.join(ROOT, *parts)


def load_yaml(rel, multi=False):
    with open(path(rel)) as f:
        return list(yaml.safe_load_all(f)) if multi else yaml.safe_load(f)


# The metric-name contract with the Rust code: every metric it exports, from the list in
# fleet/src/metrics.rs (the `metric_names` example prints it). Histograms also expose
# _bucket/_sum/_count; the Pushgateway adds push_time_seconds / push_failure_time_seconds.
def load_known(file):
    """Every series name the code's metrics expose, or None (and a failed check) without it."""
    try:
        with open(file) as f:
            metrics = json.load(f)
        known = set()
        for m in metrics:
            name, kind = m["name"], m["kind"]
            known |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    except (OSError, ValueError, KeyError, TypeError) as e:
        check("the code's metric names", [f"{file}: {e}"])
        return None
    check(f"the code's metric names: {len(metrics)} metrics", [] if metrics else [f"{file} lists none"])
    return known


if len(sys.argv) > 2:
    KNOWN = load_known(sys.argv[2])
else:
    KNOWN = None
    check("the code's metric names", ["no METRIC_NAMES file given (see the usage)"])


def unknown_metrics(expr):
    """The batch_* metric names of `expr` the code does not export (none when unknown)."""
    if KNOWN is None:
        return []
    code = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values are not metric names
    return sorted({m for m in re.findall(r"\bbatch_[a-z_]+\b", code) if m not in KNOWN})


# --- dashboard -------------------------------------------------------------------------------
DASH = "observability/grafana/dashboards/json/batch-observability.json"
exprs = []  # (where, expr) for the PromQL check
try:
    with open(path(DASH)) as f:
        dash = json.load(f)
except (OSError, ValueError) as e:
    check(f"{DASH} parses as JSON", [str(e)])
    dash = None

if dash is not None:
    check(f"{DASH} parses as JSON", [])
    check("dashboard uid is batch-observability",
          [] if dash.get("uid") == "batch-observability" else [f"uid is {dash.get('uid')!r}"])
    check("dashboard title is 'Batch Observability'",
          [] if dash.get("title") == "Batch Observability" else [f"title is {dash.get('title')!r}"])

    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    problems = []
    for name in ("namespace", "provider", "operation"):
        v = variables.get(name)
        if v is None:
            problems.append(f"variable {name} missing")
            continue
        for key in ("multi", "includeAll"):
            if v.get(key) is not True:
                problems.append(f"variable {name}: {key} is not true")
        if v.get("allValue") != ".*":
            problems.append(f"variable {name}: allValue is {v.get('allValue')!r}, want '.*'")
        ds = v.get("datasource") or {}
        if ds.get("uid") != "prometheus":
            problems.append(f"variable {name}: datasource uid is {ds.get('uid')!r}")
    check("variables namespace, provider and operation: multi, includeAll, allValue .*", problems)

    panels = dash.get("panels", [])
    # Row panels may nest their children.
    flat = []
    for p in panels:
        flat.append(p)
        flat.extend(p.get("panels", []))

    ids = [p.get("id") for p in flat]
    dup = sorted({i for i in ids if ids.count(i) > 1 or i is None}, key=str)
    check(f"{len(flat)} panels have unique ids", [f"duplicate or missing id: {d}" for d in dup])

    problems = []
    for p in flat:
        if p.get("type") == "row":
            continue
        title = p.get("title", f"id {p.get('id')}")
        if (p.get("datasource") or {}).get("uid") != "prometheus":
            problems.append(f"{title}: panel datasource uid is not prometheus")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{title}: no targets")
        refids = [t.get("refId") for t in targets]
        if len(set(refids)) != len(refids):
            problems.append(f"{title}: duplicate refId")
        for t in targets:
            if not t.get("refId"):
                problems.append(f"{title}: target without refId")
            if not (t.get("expr") or "").strip():
                problems.append(f"{title}: target {t.get('refId')} without expr")
            elif (t.get("datasource") or {}).get("uid") not in (None, "prometheus"):
                problems.append(f"{title}: target {t.get('refId')} datasource is not prometheus")
            else:
                exprs.append((f"{title} [{t.get('refId')}]", t["expr"]))
                for m in unknown_metrics(t["expr"]):
                    problems.append(f"{title}: unknown metric {m}")
                if "${DS_" in json.dumps(t):
                    problems.append(f"{title}: import placeholder ${{DS_...}}")
                # Every metric selector is filtered by the namespace variable: several fleets
                # on one Prometheus must not blend into one picture.
                for m in re.finditer(r"\b(batch_[a-z_]+|push_time_seconds)(\{[^}]*\})?", t["expr"]):
                    if "$namespace" not in (m.group(2) or ""):
                        problems.append(f"{title}: {m.group(1)} without the $namespace filter")
                if "$provider" not in t["expr"] and re.search(
                        r"batch_(jobs|items|job_duration|provider_latency|retry|errors|tokens|"
                        r"queue|concurrency)[a-z_]*\{", t["expr"]) and "provider=" not in t["expr"]:
                    problems.append(f"{title}: provider-labelled metric without $provider filter")
    check("panels: datasource uid prometheus, targets with refId and expr, known metrics", problems)

    problems = []
    cells = {}
    for p in flat:
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")):
            problems.append(f"{p.get('title')}: incomplete gridPos {g}")
            continue
        if g["x"] + g["w"] > 24:
            problems.append(f"{p.get('title')}: wider than the 24-column grid")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    problems.append(f"{p.get('title')} overlaps {cells[(x, y)]}")
                    break
                cells[(x, y)] = p.get("title")
            else:
                continue
            break
    check("panel gridPos layout: complete, within 24 columns, no overlaps", problems)

    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            exprs.append((f"annotation {a.get('name')}", a["expr"]))

# --- Grafana provisioning ---------------------------------------------------------------------
try:
    ds = load_yaml("observability/grafana/datasources/datasource.yaml")
    items = ds.get("datasources") or []
    problems = [] if any(d.get("uid") == "prometheus" and d.get("type") == "prometheus"
                         and d.get("url") == "http://prometheus:9090" for d in items) \
        else ["no prometheus datasource with uid prometheus and url http://prometheus:9090"]
except Exception as e:  # noqa: BLE001 - any parse problem is a failed check
    problems = [str(e)]
check("grafana datasource.yaml: uid prometheus", problems)

try:
    prov = load_yaml("observability/grafana/dashboards/dashboards.yaml")
    paths = [p.get("options", {}).get("path") for p in prov.get("providers") or []]
    problems = [] if "/var/lib/grafana/dashboards" in paths else [f"provider paths: {paths}"]
except Exception as e:  # noqa: BLE001
    problems = [str(e)]
check("grafana dashboards.yaml: file provider at /var/lib/grafana/dashboards", problems)

# --- alerts.yml conventions (promtool checks the syntax) ---------------------------------------
try:
    rules = [r for g in load_yaml("observability/prometheus/alerts.yml")["groups"]
             for r in g["rules"] if "alert" in r]
    problems = []
    for r in rules:
        if "for" not in r:
            problems.append(f"{r['alert']}: no 'for'")
        if "severity" not in (r.get("labels") or {}):
            problems.append(f"{r['alert']}: no severity label")
        for a in ("summary", "description"):
            if a not in (r.get("annotations") or {}):
                problems.append(f"{r['alert']}: no {a} annotation")
        for m in unknown_metrics(r["expr"]):
            problems.append(f"{r['alert']}: unknown metric {m}")
    check(f"alerts.yml: {len(rules)} alerts with for, severity, summary, description", problems)
except Exception as e:  # noqa: BLE001
    check("alerts.yml: alerts with for, severity, summary, description", [str(e)])

# --- compose ---------------------------------------------------------------------------------
COMPOSE = "docker/compose.yaml"
try:
    compose = load_yaml(COMPOSE)
    check(f"{COMPOSE} parses as YAML", [])
except Exception as e:  # noqa: BLE001
    check(f"{COMPOSE} parses as YAML", [str(e)])
    compose = None

REF = r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*)?\}"          # ${VAR} / ${VAR:?msg}
REQUIRED_REF = r"\$\{[A-Za-z_][A-Za-z0-9_]*:?\?[^}]*\}"      # ${VAR:?msg}
EMPTY_DEFAULT_REF = r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-\}"        # ${VAR:-}
SECRET_NAME = re.compile(r"(PASS|PASSWORD|SECRET|TOKEN|API_KEY)$", re.I)

if compose is not None:
    compose_dir = path("docker")
    services = compose.get("services") or {}
    problems = []
    for name, svc in services.items():
        build = svc.get("build")
        if isinstance(build, str):
            build = {"context": build}
        if isinstance(build, dict):
            ctx = os.path.normpath(os.path.join(compose_dir, build.get("context", ".")))
            if not os.path.isdir(ctx):
                problems.append(f"{name}: build context {ctx} missing")
            dockerfile = os.path.join(ctx, build.get("dockerfile", "Dockerfile"))
            if not os.path.isfile(dockerfile):
                problems.append(f"{name}: Dockerfile {dockerfile} missing")
        for vol in svc.get("volumes") or []:
            src = vol.get("source") if isinstance(vol, dict) else vol.split(":", 1)[0]
            if src and src.startswith((".", "/")) and not os.path.exists(
                    os.path.normpath(os.path.join(compose_dir, src))):
                problems.append(f"{name}: mounted path {src} does not exist")
    check(f"{COMPOSE}: {len(services)} services, build contexts and mounted paths exist", problems)

    def environment(svc):
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
        return {k: ("" if v is None else str(v)) for k, v in env.items()}

    problems = []
    for svc_name, key in (("rabbitmq", "RABBITMQ_DEFAULT_PASS"),
                          ("rabbitmq", "RABBITMQ_DEFAULT_USER"),
                          ("grafana", "GF_SECURITY_ADMIN_PASSWORD")):
        value = environment(services.get(svc_name) or {}).get(key)
        if value is None:
            problems.append(f"{svc_name}: {key} not set")
        elif not re.fullmatch(REQUIRED_REF, value):
            problems.append(f"{svc_name}: {key} must be a ${{VAR:?message}} reference, got {value!r}")
    for svc_name, svc in services.items():
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key) and value and not re.fullmatch(
                    f"(?:{REQUIRED_REF}|{EMPTY_DEFAULT_REF})", value):
                problems.append(f"{svc_name}: {key} holds a literal value")
            for userinfo in re.findall(r"://([^/@\s]+)@", value):
                if ":" in userinfo and re.sub(REF, "", userinfo) != ":":
                    problems.append(f"{svc_name}: {key} embeds literal credentials")
    check(f"{COMPOSE}: no literal passwords (only ${{...:?...}} references)", problems)

# --- k8s -------------------------------------------------------------------------------------
K8S = "docker/k8s"
try:
    kust = load_yaml(f"{K8S}/kustomization.yaml")
    docs = []
    for res in kust.get("resources") or []:
        docs.extend(d for d in load_yaml(f"{K8S}/{res}", multi=True) if d)
    check(f"{K8S}: kustomization and its {len(docs)} manifests parse", [])
except Exception as e:  # noqa: BLE001
    check(f"{K8S}: kustomization and its manifests parse", [str(e)])
    docs = None

if docs is not None:
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)
    problems = []
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    scaled = by_kind.get("ScaledObject", [])
    if not scaled:
        problems.append("no ScaledObject")
    for so in scaled:
        spec = so["spec"]
        ref = spec["scaleTargetRef"]
        if ref.get("name") != "worker" or "worker" not in deployments:
            problems.append(f"scaleTargetRef {ref} does not name the worker Deployment")
        triggers = spec.get("triggers", [])
        if not triggers:
            problems.append("ScaledObject has no trigger")
        for trig in triggers:
            md = trig.get("metadata", {})
            query = md.get("query", "")
            # All the work: items waiting AND items in flight, on the provider's items queue and
            # its jobs' queues (one per job, `fleet.items.openai.<job>`), and on no other queue.
            matchers = re.findall(r'queue(=~?)"([^"]*)"', query)

            def selects(name):
                return bool(matchers) and all(
                    (v == name) if op == "=" else re.fullmatch(v, name) is not None for op, v in matchers)
            covers = selects("fleet.items.openai") and selects("fleet.items.openai.job_0123abcd")
            strays = selects("fleet.items.anthropic") or selects("fleet.results.job_1")
            if (trig.get("type") != "prometheus" or not all(m in query for m in ("messages_ready", "messages_unacked"))
                    or not covers or strays):
                problems.append(f"trigger {trig.get('type')} does not scale on ready + unacked of "
                                f"fleet.items.openai and its job queues: {query!r}")
            if not md.get("serverAddress", "").startswith("http"):
                problems.append("prometheus trigger without serverAddress")
        # cooldownPeriod only acts on the last replica (scale to zero).
        if "cooldownPeriod" in spec and spec.get("minReplicaCount", 0) != 0:
            problems.append("cooldownPeriod set with minReplicaCount > 0: it would never apply")
    worker = deployments.get("worker") or {}
    if "replicas" in worker.get("spec", {}):
        problems.append("Deployment worker sets replicas: it fights the autoscaler")
    check("k8s: ScaledObject scales Deployment worker on ready + unacked of fleet.items.openai and its job queues",
          problems)

    problems = []
    pdbs = [p for p in by_kind.get("PodDisruptionBudget", [])
            if (p["spec"].get("selector", {}).get("matchLabels") or {}).get("app.kubernetes.io/name") == "worker"]
    if not pdbs:
        problems.append("no PodDisruptionBudget selects the worker pods")
    for p in pdbs:
        if not ({"minAvailable", "maxUnavailable"} & set(p["spec"])):
            problems.append("PodDisruptionBudget without minAvailable or maxUnavailable")
        elif str(p["spec"].get("minAvailable", "")) in ("0", "0%") or str(p["spec"].get("maxUnavailable", "")) == "100%":
            problems.append("PodDisruptionBudget allows evicting every worker")
    brokers = by_kind.get("RabbitmqCluster", [])
    if len(brokers) != 1 or brokers[0]["spec"].get("replicas") != 3:
        problems.append(f"want one RabbitmqCluster with 3 replicas, got {[b['spec'].get('replicas') for b in brokers]}")
    if brokers and not any(pm["spec"].get("selector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
                           == brokers[0]["metadata"]["name"] for pm in by_kind.get("PodMonitor", [])):
        problems.append("no PodMonitor scrapes the RabbitmqCluster's metrics (the autoscaler's input)")
    check("k8s: PodDisruptionBudget on the workers, RabbitmqCluster with 3 replicas, its metrics scraped", problems)

    problems = []
    try:
        cm = next(c for c in by_kind.get("ConfigMap", []) if "fleet.toml" in c.get("data", {}))
        cfg = tomllib.loads(cm["data"]["fleet.toml"])
        if cfg.get("namespace") != "fleet":
            problems.append(f"fleet.toml namespace is {cfg.get('namespace')!r}")
        if {"url", "urls"} & set(cfg.get("amqp", {})):
            problems.append("fleet.toml holds amqp.url(s) (they belong in the Secret)")
        drain = cfg.get("worker", {}).get("drain_timeout_s", 30)
        worker = deployments.get("worker")
        pod = worker["spec"]["template"]["spec"]
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < drain:
            problems.append(f"terminationGracePeriodSeconds {grace} < drain_timeout_s {drain}")
        env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
        src = env.get("FLEET__AMQP__URLS", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if (src.get("name"), src.get("key")) != ("fleet-secrets", "amqp-urls"):
            problems.append("FLEET__AMQP__URLS does not come from fleet-secrets/amqp-urls")
    except (StopIteration, KeyError, TypeError, tomllib.TOMLDecodeError) as e:
        problems.append(f"{type(e).__name__}: {e}")
    check("k8s: fleet.toml (namespace fleet), secrets via env, grace period >= drain timeout", problems)

# --- PromQL through the running Prometheus ---------------------------------------------------
SUBST = [("${namespace}", ".*"), ("$namespace", ".*"), ("${provider}", ".*"), ("$provider", ".*"), ("${operation}", ".*"), ("$operation", ".*"),
         ("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "1h")]
addr = os.environ["PROMETHEUS_ADDR"]
problems = []
unreachable = None
for where, expr in exprs:
    q = expr
    for a, b in SUBST:
        q = q.replace(a, b)
    data = urllib.parse.urlencode({"query": q}).encode()
    try:
        with urllib.request.urlopen(f"http://{addr}/api/v1/query", data=data, timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        try:
            body = json.load(e)
        except ValueError:
            body = {"status": "error", "error": f"HTTP {e.code}"}
    except (urllib.error.URLError, OSError) as e:
        unreachable = str(e)
        break
    if body.get("status") != "success":
        problems.append(f"{where}: {body.get('errorType')}: {body.get('error')}")
if unreachable:
    check(f"PromQL of the dashboard against http://{addr}",
          [f"Prometheus unreachable ({unreachable}): run scripts/stack.sh up"])
else:
    check(f"PromQL of {len(exprs)} dashboard expressions parses (http://{addr})", problems)

sys.exit(1 if failed else 0)
