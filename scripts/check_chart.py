#!/usr/bin/env python3
"""Checks the Helm chart (helm/davinci) with Helm's own engine.

helm-sdkpy bundles Helm's Go library but has no client-side `helm template`, so the chart is
installed against a local fake Kubernetes API server that answers discovery (built-in kinds plus
the custom resources whose CRDs are committed in deploy/testdata/crds/) and records every object
Helm sends. Those recorded objects are exactly what Helm rendered and would apply to a cluster.
Then:

* `helm lint` (with the values schema) passes for every values file under test;
* every recorded object is also in the release manifest Helm returns, and vice versa;
* built-in objects validate with kubernetes-validate (strict: unknown fields are errors);
  custom resources (ServiceMonitor, PrometheusRule, ScaledObject, TriggerAuthentication) against
  their CRD's openAPIV3Schema, made strict the same way;
* the rendered objects are what the values ask for (a Deployment per enabled target, GPUs, RBAC,
  sandbox NetworkPolicy, KEDA triggers, kube-prometheus-stack labels, dashboards);
* values.schema.json rejects bad values, and Helm refuses to install with them;
* the alerts pass `promtool check rules` and their unit tests (`promtool test rules`).

Needs helm-sdkpy, kubernetes-validate, jsonschema and PyYAML (`make test-deps` puts them in
.venv). Without them it prints SKIP and exits 0, except under CI=true where it fails.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "davinci"
CRDS = ROOT / "deploy" / "testdata" / "crds"
K8S_VERSION = "1.33.0"
NAMESPACE = "davinci"

try:
    import helm_sdkpy
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover - depends on the machine
    if os.environ.get("CI") == "true":
        sys.exit(f"check_chart: {e}; run `make test-deps` (required under CI=true)")
    print(f"SKIP chart checks: {e} (run `make test-deps` to install helm-sdkpy and kubernetes-validate)")
    sys.exit(0)

# Built-in kinds the chart may render: (group, version, plural, kind, namespaced).
BUILTIN = [
    ("", "v1", "configmaps", "ConfigMap", True),
    ("", "v1", "secrets", "Secret", True),
    ("", "v1", "services", "Service", True),
    ("", "v1", "serviceaccounts", "ServiceAccount", True),
    ("", "v1", "pods", "Pod", True),
    ("", "v1", "namespaces", "Namespace", False),
    ("apps", "v1", "deployments", "Deployment", True),
    ("apps", "v1", "statefulsets", "StatefulSet", True),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True),
]


def load_crds() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> {plural, namespaced, schema} from the committed CRDs."""
    out = {}
    for f in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        spec = crd["spec"]
        for v in spec["versions"]:
            if not v.get("served"):
                continue
            out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = {
                "plural": spec["names"]["plural"],
                "namespaced": spec["scope"] == "Namespaced",
                "schema": v["schema"]["openAPIV3Schema"],
            }
    if not out:
        sys.exit(f"check_chart: no CRDs under {CRDS}")
    return out


class FakeApiServer:
    """Answers Kubernetes discovery, GETs (404: nothing exists yet) and records creations."""

    def __init__(self, crds: dict):
        self.created: list[dict] = []
        groups: dict[str, list[dict]] = {}
        for g, v, plural, kind, ns in BUILTIN:
            groups.setdefault(f"{g}/{v}" if g else v, []).append(
                {"name": plural, "singularName": kind.lower(), "namespaced": ns, "kind": kind,
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
        for (gv, kind), c in crds.items():
            groups.setdefault(gv, []).append(
                {"name": c["plural"], "singularName": kind.lower(), "namespaced": c["namespaced"],
                 "kind": kind, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
        self.groups = groups
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, obj: dict):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/version":
                    return self.reply(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.2",
                                            "platform": "linux/amd64"})
                if path == "/api":
                    return self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                            "serverAddressByClientCIDRs": [
                                                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]})
                if path == "/apis":
                    gl = []
                    for gv in sorted(server.groups):
                        if "/" in gv:
                            g, v = gv.split("/")
                            gl.append({"name": g, "versions": [{"groupVersion": gv, "version": v}],
                                       "preferredVersion": {"groupVersion": gv, "version": v}})
                    return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": gl})
                gv = path.removeprefix("/api/").removeprefix("/apis/")
                if gv in server.groups:
                    return self.reply(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                            "groupVersion": gv, "resources": server.groups[gv]})
                if path.startswith("/api/v1/namespaces/") and path.endswith("/secrets"):
                    # Helm's release storage: no release of this name yet.
                    return self.reply(200, {"kind": "SecretList", "apiVersion": "v1", "items": [],
                                            "metadata": {"resourceVersion": "1"}})
                self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "NotFound", "code": 404,
                                 "message": f"{path} not found"})

            def do_POST(self):
                body = self.body()
                if "protobuf" in (self.headers.get("Content-Type") or ""):
                    # Helm's own release record (a Secret in protobuf); not a chart object.
                    name = re.search(rb"sh\.helm\.release\.v1\.[a-z0-9.-]+", body).group().decode()
                    return self.reply(201, {"kind": "Secret", "apiVersion": "v1",
                                            "metadata": {"name": name, "resourceVersion": "2"}})
                obj = json.loads(body)
                server.created.append({"path": self.path.split("?")[0], "object": obj})
                obj.setdefault("metadata", {})["resourceVersion"] = "3"
                self.reply(201, obj)

            def do_PUT(self):
                self.body()
                name = self.path.split("?")[0].rsplit("/", 1)[1]
                self.reply(200, {"kind": "Secret", "apiVersion": "v1",
                                 "metadata": {"name": name, "resourceVersion": "4"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def kubeconfig(self) -> str:
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": NAMESPACE}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
        })

    def close(self):
        self.httpd.shutdown()


class quiet_helm:
    """Drops the Go library's INFO lines about the chart's symlinked files/ (to deploy/) from
    stderr and passes everything else through."""

    def __enter__(self):
        import tempfile
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.tmp = tempfile.TemporaryFile()
        os.dup2(self.tmp.fileno(), 2)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        for line in self.tmp.read().decode(errors="replace").splitlines():
            if "found symbolic link in path" not in line:
                print(line, file=sys.stderr)
        self.tmp.close()


def install(crds: dict, release: str, values: dict) -> tuple[list[dict], dict]:
    """The objects Helm sent to a fresh fake cluster installing the chart, and the release."""
    api = FakeApiServer(crds)
    try:
        cfg = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=api.kubeconfig())
        with quiet_helm():
            rel = asyncio.run(helm_sdkpy.Install(cfg).run(release, str(CHART), values=values,
                                                          wait=False, timeout=60))
        return api.created, rel
    finally:
        api.close()


def lint() -> dict:
    """`helm lint` of the chart with its own values (helm-sdkpy's lint takes no others)."""
    cfg = helm_sdkpy.Configuration(namespace=NAMESPACE)
    with quiet_helm():
        return asyncio.run(helm_sdkpy.Lint(cfg).run(str(CHART)))


def strict(schema):
    """A structural CRD schema that refuses unknown fields, as `--validate=strict` does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validate(objects: list[dict], crds: dict) -> int:
    """Validates every object; returns how many were checked against a CRD."""
    custom = 0
    for o in objects:
        key = (o["apiVersion"], o["kind"])
        where = f"{o['kind']} {o['metadata'].get('name')}"
        if key in crds:
            schema = strict(crds[key]["schema"])
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(o), key=str)
            if errors:
                sys.exit(f"check_chart: {where} does not match its CRD: "
                         + "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]))
            custom += 1
        else:
            try:
                kubernetes_validate.validate(o, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                sys.exit(f"check_chart: {where}: {'.'.join(map(str, e.path))}: {e.message}")
    return custom


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def check(cond: bool, what: str):
    if not cond:
        sys.exit(f"check_chart: {what}")


def values_file(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / name).read_text()) or {}


def main() -> int:
    crds = load_crds()
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    dashboards = sorted((CHART / "files" / "dashboards").glob("*.json"))
    rules = yaml.safe_load((CHART / "files" / "alerts" / "davinci.rules.yaml").read_text())
    check(dashboards, "no dashboards under helm/davinci/files/dashboards (deploy/dashboards)")

    res = lint()
    worst = max((m["Severity"] for m in res.get("Messages") or []), default=0)
    # Severity 1 is INFO (e.g. "icon is recommended"), 2 WARNING, 3 ERROR.
    check(not res.get("Errors") and worst < 2,
          f"helm lint: {[m['Path'] for m in res['Messages'] if m['Severity'] >= 2]} "
          "(helm-sdkpy returns no message text: run the chart through `helm lint` to read it)")
    print(f"helm lint: passed ({len(res.get('Messages') or [])} info messages)")
    cases = {"defaults": {}}
    for f in sorted((CHART / "ci").glob("*-values.yaml")):
        cases[f.name] = values_file(f.name)
    for name, values in cases.items():
        objects, rel = install(crds, "dv", values)
        objs = [c["object"] for c in objects]
        manifest = [d for d in yaml.safe_load_all(rel.get("manifest", "")) if d]
        check(sorted((d["kind"], d["metadata"]["name"]) for d in manifest)
              == sorted((o["kind"], o["metadata"]["name"]) for o in objs),
              f"{name}: the objects Helm sent differ from its release manifest")
        custom = validate(objs, crds)
        merged = merge(copy.deepcopy(defaults), values)
        expect(name, merged, objs, rules, dashboards)
        print(f"chart {name}: {len(objs)} objects rendered by Helm, all valid "
              f"({custom} against CRD schemas)")

    settings_accepted(cases)
    promtool()
    rejected = bad_values(schema, defaults)
    print(f"values.schema.json: {rejected} bad values rejected by the schema and by Helm")
    return 0


def davinci_binary() -> Path | None:
    """The davinci binary `make test` built (DAVINCI_BIN names another)."""
    if os.environ.get("DAVINCI_BIN"):
        return Path(os.environ["DAVINCI_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    return next((p for p in (target / "debug" / "davinci", target / "release" / "davinci")
                 if p.exists()), None)


def settings_accepted(cases: dict):
    """davinci itself accepts the settings file each values case renders (unknown or mistyped
    keys are refused at start): `davinci serve` loads it, with only the queue and storage
    pointed at this machine, and must come up."""
    import socket
    import subprocess
    import tempfile
    import time
    binary = davinci_binary()
    if binary is None:
        check(os.environ.get("CI") != "true", "no davinci binary (cargo build) under CI=true")
        print("SKIP rendered settings check: no davinci binary (cargo build, or DAVINCI_BIN)")
        return
    for name, values in cases.items():
        objs = [c["object"] for c in install(load_crds(), "dv", values)[0]]
        text = by_kind(objs, "ConfigMap")["dv-davinci"]["data"]["davinci.yaml"]
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "davinci.yaml"
            cfg.write_text(text)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = {k: v for k, v in os.environ.items() if not k.startswith("DAVINCI")}
            env |= {"DAVINCI__QUEUE__URL": "memory://", "DAVINCI__STORAGE__URI": f"file://{tmp}/data"}
            proc = subprocess.Popen([str(binary), "serve", "--target", "conductor", "--config", str(cfg),
                                     "--listen", f"127.0.0.1:{port}", "--metrics-listen", ""],
                                    env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.time() + 30
            up = False
            while time.time() < deadline and proc.poll() is None and not up:
                with socket.socket() as s:
                    up = s.connect_ex(("127.0.0.1", port)) == 0
                time.sleep(0.1)
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
            check(up, f"{name}: davinci refuses the chart's settings file:\n{text}\n{err[-2000:]}")
    print(f"rendered settings: davinci ({binary}) starts on the davinci.yaml of every values case")


def promtool():
    """The alerts the PrometheusRule carries pass Prometheus's own checks and unit tests."""
    import shutil
    import subprocess
    tool = shutil.which("promtool")
    if tool is None:
        check(os.environ.get("CI") != "true", "promtool is required under CI=true (Debian: prometheus)")
        print("SKIP promtool: not installed (Debian package prometheus; `make deps`)")
        return
    alerts = ROOT / "deploy" / "alerts"
    for args in (["check", "rules", "davinci.rules.yaml"], ["test", "rules", "davinci.rules.test.yaml"]):
        r = subprocess.run([tool, *args], cwd=alerts, capture_output=True, text=True)
        check(r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}")
    print("promtool: deploy/alerts/davinci.rules.yaml checks and passes its unit tests")


def merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def expect(case: str, values: dict, objs: list[dict], rules: dict, dashboards: list[Path]):
    """The rendered objects are what `values` ask for."""
    deps = by_kind(objs, "Deployment")
    rel = "dv"
    keda = values["keda"]["enabled"]
    for name, t in values["targets"].items():
        d = deps.get(f"{rel}-{name}")
        if not t["enabled"]:
            check(d is None, f"{case}: disabled target {name} has a Deployment")
            continue
        check(d is not None, f"{case}: enabled target {name} has no Deployment")
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        check(c["args"][:3] == ["serve", "--target", name], f"{case}: {name} args {c['args']}")
        check(d["spec"]["replicas"] == t["replicas"], f"{case}: {name} replicas")
        check(c["securityContext"]["readOnlyRootFilesystem"] is True
              and pod["securityContext"]["runAsNonRoot"] is True, f"{case}: {name} security")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check(probe in c, f"{case}: {name} has no {probe}")
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        check((gpus or 0) == t["gpus"], f"{case}: {name} asks for {gpus} GPUs, values say {t['gpus']}")
        if t["gpus"]:
            check(pod.get("tolerations") == t["tolerations"], f"{case}: {name} GPU tolerations")
        check(f"{rel}-{name}" in by_kind(objs, "Service"), f"{case}: {name} has no Service")
        check((f"{rel}-{name}" in by_kind(objs, "PodDisruptionBudget")) == t["pdb"]["enabled"],
              f"{case}: {name} PodDisruptionBudget")
        scaled = by_kind(objs, "ScaledObject").get(f"{rel}-{name}-workers")
        if t["autoscaling"]["enabled"] and keda:
            check(scaled is not None, f"{case}: {name} autoscaling has no ScaledObject")
            check(scaled["spec"]["minReplicaCount"] == t["autoscaling"]["minReplicas"],
                  f"{case}: {name} minReplicaCount")
            streams = [tr["metadata"]["stream"] for tr in scaled["spec"]["triggers"]]
            check(streams == [f"{{{tp}}}" for tp in t["autoscaling"]["topics"]],
                  f"{case}: {name} streams {streams}")
            for tr in scaled["spec"]["triggers"]:
                check(tr["type"] == "redis-streams" and "lagCount" in tr["metadata"]
                      and "pendingEntriesCount" not in tr["metadata"],
                      f"{case}: {name} trigger must scale on lagCount: {tr}")
            check("replicas" not in deps[f"{rel}-{name}-workers"]["spec"],
                  f"{case}: KEDA owns the replicas of {name}-workers")
        else:
            check(scaled is None, f"{case}: {name} has a ScaledObject though autoscaling is off")

    roles = by_kind(objs, "Role")
    if values["targets"]["trainer"]["enabled"] and values["rbac"]["create"]:
        rules_of = {(g, r): set(v["verbs"]) for v in roles[f"{rel}-trainer"]["rules"]
                    for g in v["apiGroups"] for r in v["resources"]}
        for need, verbs in {("jobset.x-k8s.io", "jobsets"): {"create", "get", "watch", "delete"},
                            ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "watch", "delete"},
                            ("", "pods"): {"get", "list", "watch"}, ("", "pods/log"): {"get"}}.items():
            check(verbs <= rules_of.get(need, set()), f"{case}: trainer Role lacks {need} {verbs}")
    if any(values["targets"][t]["enabled"] for t in ("rollout", "evaluator", "tasks")) and values["rbac"]["create"]:
        rules_of = {(g, r): set(v["verbs"]) for v in roles[f"{rel}-sandbox"]["rules"]
                    for g in v["apiGroups"] for r in v["resources"]}
        for need, verbs in {("", "pods"): {"create", "get", "list", "delete"},
                            ("", "pods/exec"): {"create", "get"},
                            ("networking.k8s.io", "networkpolicies"): {"get", "create"}}.items():
            check(verbs <= rules_of.get(need, set()), f"{case}: sandbox Role lacks {need} {verbs}")
    if values["networkPolicy"]["sandbox"]:
        np = by_kind(objs, "NetworkPolicy")["davinci-sandbox-deny-all"]["spec"]
        check(np["podSelector"] == {"matchLabels": {"davinci.dev/sandbox": "1"}}
              and "Egress" in np["policyTypes"] and np["egress"] == [],
              f"{case}: sandbox pods must have no egress: {np}")

    mon = values["monitoring"]
    release = {"release": mon["releaseLabel"]}
    if mon["serviceMonitor"]["enabled"]:
        sm = by_kind(objs, "ServiceMonitor")[f"{rel}-davinci"]
        check(release.items() <= sm["metadata"]["labels"].items(), f"{case}: ServiceMonitor release label")
    if mon["prometheusRule"]["enabled"]:
        pr = by_kind(objs, "PrometheusRule")[f"{rel}-davinci"]
        check(release.items() <= pr["metadata"]["labels"].items(), f"{case}: PrometheusRule release label")
        check(pr["spec"] == rules, f"{case}: the PrometheusRule differs from deploy/alerts/davinci.rules.yaml")
    cms = by_kind(objs, "ConfigMap")
    if mon["dashboards"]["enabled"]:
        for path in dashboards:
            cm = cms.get(f"{rel}-dashboard-{path.stem}")
            check(cm is not None and cm["metadata"]["labels"].get("grafana_dashboard") == "1",
                  f"{case}: dashboard {path.name} has no ConfigMap labelled grafana_dashboard=1")
            check(json.loads(cm["data"][path.name]) == json.loads(path.read_text()),
                  f"{case}: dashboard {path.name} changed on its way into the ConfigMap")
    settings = yaml.safe_load(cms[f"{rel}-davinci"]["data"]["davinci.yaml"])
    want_queue = "redis://dv-redis:6379" if values["redis"]["enabled"] else values["redis"]["external"]["url"]
    check(settings["queue"]["url"] == want_queue, f"{case}: queue.url {settings['queue']}")
    check(settings["trainer"]["reattach_namespaces"] == [NAMESPACE],
          f"{case}: a restarted trainer must re-attach in the release namespace: {settings.get('trainer')}")
    check(by_kind(objs, "StatefulSet").get(f"{rel}-redis") is not None or not values["redis"]["enabled"],
          f"{case}: bundled Redis missing")


def bad_values(schema: dict, defaults: dict) -> int:
    """Each bad value is refused by the schema (naming the field) and by Helm itself."""
    bad = [
        ({"targets": {"crawler": {"replicas": "two"}}}, "replicas"),
        ({"targets": {"crawlr": {"enabled": True}}}, "crawlr"),
        ({"targets": {"reconstructor": {"autoscaling": {"enabled": True, "topics": []}}}}, "topics"),
        ({"settings": {"queue": {"url": "redis://elsewhere:6379"}}}, "queue"),
        ({"redis": {"enabled": False}}, "external"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"targets": {"trainer": {"gpus": -1}}}, "gpus"),
        ({"settings": {"qeue": {"group": "g"}}}, "qeue"),
    ]
    for over, field in bad:
        merged = merge(copy.deepcopy(defaults), over)
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(merged))
        check(errors, f"values.schema.json accepts {over}")
        said = " ".join(f"{'.'.join(map(str, e.absolute_path))} {e.message}" for e in errors)
        check(field in said, f"the schema's error for {over} does not name {field}: {said}")
        try:
            install(load_crds(), "bad", over)
        except helm_sdkpy.exceptions.HelmError:
            continue
        sys.exit(f"check_chart: Helm installed the chart with the bad values {over}")
    return len(bad)


if __name__ == "__main__":
    sys.exit(main())
