"""Static checks of k8s/: render the kustomize overlays, validate every manifest, cross-check names and ports.

No cluster is needed. Overlays are rendered by a small kustomize subset implemented here (resources,
namespace, images, strategic-merge patches) so the checks run everywhere; where `kubectl` (or `kustomize`)
is on PATH, a parity test renders with the real thing and demands identical objects.
Core kinds are validated with kubernetes-validate (offline OpenAPI schemas, strict: unknown fields fail)
against K8S_VERSION. ServiceMonitor (monitoring.coreos.com/v1) is a CRD that kubernetes-validate has no
schema for: it is checked against SERVICE_MONITOR_SCHEMA below, a strict subset of the Prometheus
Operator's CRD covering the fields this repo uses.
"""
from __future__ import annotations

import copy
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from training import recipe as R

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate not installed (pip install kubernetes-validate)"
)
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (comes with kubernetes-validate)")

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu", "tls", "auth-disabled")  # tls / auth-disabled: the cpu overlay with TLS / without tokens
K8S_VERSION = "1.32.0"  # the Kubernetes release the manifests are validated against
NAMESPACE = "mnistgen"
TRITON_METRICS = {  # counters Triton exports on :8002 that the autoscaling rule may use
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
}
# Kinds that live outside namespaces (the namespace transformer leaves them alone).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}
# Kubernetes resource quantity (apimachinery's resource.Quantity), e.g. 250m, 2, 1Gi, 1e3.
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$")

# ------------------------------------------------------------------------------------------------------
# A kustomize subset: exactly the fields k8s/ uses; anything else fails loudly rather than rendering wrong.
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
# Strategic-merge keys of the lists this repo patches (from the Kubernetes API's patchMergeKey markers).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "imagePullSecrets": "name"}


def _ports_merge_key(items: list) -> str:
    """Container ports merge on containerPort, Service ports on port."""
    return "containerPort" if any("containerPort" in i for i in items if isinstance(i, dict)) else "port"


def strategic_merge(base, patch, key: str | None = None):
    """Apply a strategic-merge patch (the subset k8s/ uses): maps merge, null deletes, keyed lists merge."""
    if isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise NotImplementedError(f"patch directives {sorted(k for k in patch if k.startswith('$'))} unsupported")
        out = copy.deepcopy(base) if isinstance(base, dict) else {}
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(base, list):
        merge_key = MERGE_KEYS.get(key) or (_ports_merge_key(base + patch) if key == "ports" else None)
        if merge_key is None:
            return copy.deepcopy(patch)  # lists without a merge key (args, tolerations, metrics) are replaced
        # kustomize's order: the patch's items first (merged with their namesakes), then the base's others
        out, merged = [], set()
        for item in patch:
            for i, existing in enumerate(base):
                if existing.get(merge_key) == item.get(merge_key):
                    out.append(strategic_merge(existing, item, None))
                    merged.add(i)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out + [copy.deepcopy(b) for i, b in enumerate(base) if i not in merged]
    return copy.deepcopy(patch)


def pod_specs(doc: dict) -> list[dict]:
    """The pod specs inside a workload (Deployment/StatefulSet/DaemonSet/Job spec.template, CronJob's)."""
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    tpl = spec.get("template", {}).get("spec")
    return [tpl] if tpl else []


def _split_image(image: str) -> tuple[str, str | None]:
    """'repo/name:tag' -> ('repo/name', 'tag'); a registry port is not a tag."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return image, None
    return name, tag


def render(directory: Path) -> list[dict]:
    """Build a kustomization directory into a list of manifests (the subset described above)."""
    kfile = directory / "kustomization.yaml"
    kust = yaml.safe_load(kfile.read_text())
    unknown = set(kust) - KUSTOMIZATION_KEYS
    if unknown:
        raise NotImplementedError(f"{kfile}: fields {sorted(unknown)} not supported by this test's renderer; "
                                  f"supported: {sorted(KUSTOMIZATION_KEYS)}")
    docs: list[dict] = []
    for res in kust.get("resources", []):
        path = directory / res
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for p in kust.get("patches", []):
        if set(p) != {"path"}:
            raise NotImplementedError(f"{kfile}: only `patches: - path: FILE` (strategic merge) is supported")
        for patch in yaml.safe_load_all((directory / p["path"]).read_text()):
            matches = [i for i, d in enumerate(docs) if d["kind"] == patch["kind"]
                       and d["metadata"]["name"] == patch["metadata"]["name"]]
            if len(matches) != 1:
                raise ValueError(f"patch {p['path']} matches {len(matches)} resources, expected 1")
            docs[matches[0]] = strategic_merge(docs[matches[0]], patch)
    if "namespace" in kust:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = kust["namespace"]
    for img in kust.get("images", []):
        for d in docs:
            for spec in pod_specs(d):
                for c in spec.get("containers", []) + spec.get("initContainers", []):
                    name, tag = _split_image(c["image"])
                    if name == img["name"]:
                        c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag)}"
    return docs


def kubectl_render(directory: Path) -> list[dict] | None:
    """Render with the real kustomize (kubectl kustomize or kustomize build), None when neither exists."""
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(directory)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(directory)]
    else:
        return None
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


# ------------------------------------------------------------------------------------------------------
# Lookups over a rendered overlay.
def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def selects(selector: dict, labels: dict) -> bool:
    """matchLabels semantics: every selector pair is present in labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def template_labels(deploy: dict) -> dict:
    return deploy["spec"]["template"]["metadata"]["labels"]


def container(deploy: dict, name: str | None = None) -> dict:
    cs = deploy["spec"]["template"]["spec"]["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def container_port(deploy: dict, port) -> int | None:
    """Resolve a port reference (name or number) against the pod's container ports; None if absent."""
    for c in deploy["spec"]["template"]["spec"]["containers"]:
        for p in c.get("ports", []):
            if port in (p.get("name"), p["containerPort"]):
                return p["containerPort"]
    return None


def arg_value(args: list[str], flag: str) -> str | None:
    """Value of `--flag=value` or `--flag value` in an argument list."""
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def env_value(cont: dict, name: str) -> str | None:
    return next((e.get("value") for e in cont.get("env", []) if e["name"] == name), None)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def adapter_rules() -> list[dict]:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    return values["rules"]["custom"]


# ------------------------------------------------------------------------------------------------------
# The renderer itself (pure logic).
def test_strategic_merge_subset():
    base = {"spec": {"containers": [{"name": "a", "args": ["1", "2"], "env": [{"name": "X", "value": "1"}],
                                     "ports": [{"containerPort": 80, "name": "http"}]}],
                     "tolerations": [{"key": "k"}], "keep": 1, "drop": 2}}
    patch = {"spec": {"containers": [{"name": "a", "args": ["3"], "env": [{"name": "Y", "value": "2"}],
                                      "ports": [{"containerPort": 80, "protocol": "TCP"}]},
                                     {"name": "b"}],
                      "tolerations": [{"key": "gpu"}], "drop": None}}
    out = strategic_merge(base, patch)
    a, b = out["spec"]["containers"]
    assert a["args"] == ["3"]  # scalar lists are replaced
    assert [e["name"] for e in a["env"]] == ["Y", "X"]  # env merges on name (patch items first, as kustomize)
    assert a["ports"] == [{"containerPort": 80, "name": "http", "protocol": "TCP"}]  # ports merge on containerPort
    assert b == {"name": "b"}
    assert out["spec"]["tolerations"] == [{"key": "gpu"}]  # no merge key: replaced
    assert out["spec"]["keep"] == 1 and "drop" not in out["spec"]  # null deletes
    assert base["spec"]["containers"][0]["args"] == ["1", "2"]  # inputs untouched
    with pytest.raises(NotImplementedError, match=r"\$patch"):
        strategic_merge(base, {"spec": {"$patch": "replace"}})


def test_split_image():
    assert _split_image("mnistgen/triton:0.1.0") == ("mnistgen/triton", "0.1.0")
    assert _split_image("mnistgen/triton") == ("mnistgen/triton", None)
    assert _split_image("registry:5000/mnistgen/triton") == ("registry:5000/mnistgen/triton", None)


@pytest.mark.parametrize("target", [*(f"overlays/{o}" for o in OVERLAYS), "training"])
def test_renderer_matches_real_kustomize(target):
    real = kubectl_render(K8S / target)
    if real is None:
        pytest.skip("neither kustomize nor kubectl on PATH: parity with the real kustomize not checked")
    key = lambda d: (d["apiVersion"], d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])  # noqa: E731
    ours = {key(d): d for d in render(K8S / target)}
    theirs = {key(d): d for d in real}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k] == theirs[k], f"{k} differs between this renderer and kustomize"


# ------------------------------------------------------------------------------------------------------
# Schema validation.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object", "required": ["name", "namespace"],
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                           "namespace": {"type": "string"},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object",
                                                            "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {"type": "object", "additionalProperties": False, "required": ["port"],
                              "properties": {"port": {"type": "string"},
                                             "path": {"type": "string", "pattern": "^/"},
                                             "scheme": {"enum": ["http", "https"]},
                                             "tlsConfig": {
                                                 "type": "object", "additionalProperties": False,
                                                 "properties": {
                                                     "serverName": {"type": "string"},
                                                     "insecureSkipVerify": {"type": "boolean"},
                                                     "ca": {"type": "object", "additionalProperties": False,
                                                            "properties": {"secret": {
                                                                "type": "object", "additionalProperties": False,
                                                                "required": ["name", "key"],
                                                                "properties": {"name": {"type": "string"},
                                                                               "key": {"type": "string"},
                                                                               "optional": {"type": "boolean"}}}}},
                                                 }},
                                             "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                                             "scrapeTimeout": {"type": "string",
                                                               "pattern": r"^(\d+(ms|s|m|h))+$"}}},
                },
            },
        },
    },
}


def validate(doc: dict) -> None:
    """Strict schema validation: core kinds by kubernetes-validate, ServiceMonitor by our CRD subset."""
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        assert doc["kind"] == "ServiceMonitor", f"no schema here for {doc['kind']}: add one to this test"
        jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def quantities(obj, path=""):
    """Yield (path, value) for every resources.requests/limits quantity in a manifest."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("requests", "limits") and path.endswith("resources") and isinstance(v, dict):
                for name, q in v.items():
                    yield f"{path}.{k}.{name}", q
            else:
                yield from quantities(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from quantities(v, f"{path}[{i}]")


@pytest.mark.parametrize("target", [*(f"overlays/{o}" for o in OVERLAYS), "training"])
def test_every_manifest_validates(target):
    docs = render(K8S / target)
    assert docs
    for d in docs:
        validate(d)
        for where, q in quantities(d):
            assert QUANTITY.match(str(q)), f"{d['kind']}/{d['metadata']['name']}{where}: {q!r} is not a quantity"


def test_validation_is_strict():
    """A misspelt field fails: the checks above would catch typos, not just parse YAML."""
    deploy = copy.deepcopy(by_kind(render(K8S / "overlays" / "cpu"), "Deployment")["gateway"])
    deploy["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        validate(deploy)
    sm = copy.deepcopy(by_kind(render(K8S / "overlays" / "cpu"), "ServiceMonitor")["gateway"])
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        validate(sm)


# ------------------------------------------------------------------------------------------------------
# Cross-references inside an overlay.
def test_namespace(overlay):
    _, docs = overlay
    assert NAMESPACE in by_kind(docs, "Namespace")
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"


def test_deployments_select_their_pods(overlay):
    _, docs = overlay
    deploys = by_kind(docs, "Deployment")
    assert set(deploys) == {"triton", "gateway"}
    for name, d in deploys.items():
        assert selects(d["spec"]["selector"]["matchLabels"], template_labels(d)), name


def test_services_select_deployments_and_ports_exist(overlay):
    _, docs = overlay
    deploys = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    expected = {"triton": {"grpc": 8001, "metrics": 8002}, "gateway": {"grpc": 50051, "http": 8080},
                "triton-grpc": {"grpc": 8001}}  # no Triton HTTP; the headless one the gateway resolves to every Triton pod
    assert set(services) == set(expected)
    for name, svc in services.items():
        deploy = name.removesuffix("-grpc")
        targets = [n for n, d in deploys.items() if selects(svc["spec"]["selector"], template_labels(d))]
        assert targets == [deploy], f"Service {name} selects {targets}"
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert {n: p["port"] for n, p in ports.items()} == expected[name]
        for p in ports.values():
            assert container_port(deploys[deploy], p["targetPort"]) == p["port"], f"{name}:{p['name']}"


def test_probes_hit_declared_ports(overlay):
    _, docs = overlay
    paths = {"triton": {"grpc.health.v1"}, "gateway": {"/readyz", "/healthz"}}
    for name, d in by_kind(docs, "Deployment").items():
        c = container(d)
        seen = set()
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe not in c:
                continue
            get = c[probe].get("httpGet") or c[probe]["grpc"]
            assert container_port(d, get["port"]) is not None, f"{name}.{probe} port {get['port']}"
            seen.add(get.get("path", "grpc.health.v1"))
        assert "readinessProbe" in c and "livenessProbe" in c, name
        assert seen == paths[name]
    # Triton's probes use the gRPC port, the one its NetworkPolicy admits (its HTTP is off)
    triton = container(by_kind(docs, "Deployment")["triton"])
    assert container_port(by_kind(docs, "Deployment")["triton"], "grpc") == triton["readinessProbe"]["grpc"]["port"]


def test_triton_args_match_ports(overlay):
    _, docs = overlay
    d = by_kind(docs, "Deployment")["triton"]
    args = container(d)["args"]
    for flag, port_name in (("--grpc-port", "grpc"), ("--metrics-port", "metrics")):
        assert int(arg_value(args, flag)) == container_port(d, port_name), flag
    assert arg_value(args, "--http-port") is None and container_port(d, "http") is None


def test_gateway_reaches_triton_service(overlay):
    _, docs = overlay
    gw = by_kind(docs, "Deployment")["gateway"]
    c = container(gw)
    url = env_value(c, "MNISTGEN_TRITON_URL")
    host, port = url.rsplit(":", 1)
    svc = by_kind(docs, "Service")[host]  # same namespace: the bare Service name resolves
    assert svc["spec"]["clusterIP"] == "None", "a ClusterIP pins each gateway's channel to one Triton pod"
    assert float(env_value(c, "MNISTGEN_RESOLVE_INTERVAL_S")) > 0
    grpc = next(p for p in svc["spec"]["ports"] if p["port"] == int(port))
    assert grpc["name"] == "grpc"
    triton = by_kind(docs, "Deployment")["triton"]
    assert container_port(triton, grpc["targetPort"]) == int(arg_value(container(triton)["args"], "--grpc-port"))
    # The flag is expanded from the env var by the kubelet, so the address is written once.
    assert arg_value(c["args"], "--triton-url") == "$(MNISTGEN_TRITON_URL)"
    assert int(arg_value(c["args"], "--grpc-port")) == container_port(gw, "grpc") == 50051
    assert int(arg_value(c["args"], "--http-port")) == container_port(gw, "http") == 8080


def test_gateway_hardening(overlay):
    _, docs = overlay
    gw = by_kind(docs, "Deployment")["gateway"]
    pod = gw["spec"]["template"]["spec"]
    c = container(gw)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1])
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    # With a read-only root, Python needs a writable /tmp.
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


def _gateway_env(cont: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in cont.get("env", []) if "value" in e}


def test_gateway_auth_and_tls_from_secrets(overlay):
    """Tokens come from the Secret gateway-tokens, required (fail closed) but in overlays/auth-disabled; the tls
    overlay's certificate from the optional gateway-tls; both mounted read-only, never inline."""
    name, docs = overlay
    gw = by_kind(docs, "Deployment")["gateway"]
    pod, c = gw["spec"]["template"]["spec"], container(gw)
    env = _gateway_env(c)
    vol = next(v for v in pod["volumes"] if v["name"] == "auth")
    sources = vol["projected"]["sources"]
    optional = {s["secret"]["name"]: s["secret"]["optional"] for s in sources}
    assert optional == {"gateway-tokens": name == "auth-disabled", "gateway-tls": True}, optional
    secrets = set(optional)
    assert secrets == {"gateway-tokens", "gateway-tls"}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "auth")
    assert mount["readOnly"] is True
    if vol["projected"]["defaultMode"] & 0o004 == 0:  # not world-readable: the gateway's group must own the files
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert not any(e["name"] == "MNISTGEN_API_TOKENS" for e in c.get("env", [])), "tokens belong in the Secret"
    assert Path(env["MNISTGEN_API_TOKEN_FILE"]).parent == Path(mount["mountPath"])
    probes = [c[p]["httpGet"].get("scheme", "HTTP") for p in ("readinessProbe", "livenessProbe")]
    svc_ports = by_kind(docs, "Service")["gateway"]["spec"]["ports"]
    (endpoint,) = by_kind(docs, "ServiceMonitor")["gateway"]["spec"]["endpoints"]
    if name == "tls":
        for var in ("MNISTGEN_TLS_CERT", "MNISTGEN_TLS_KEY"):
            assert Path(env[var]).parent == Path(mount["mountPath"]), var
        assert probes == ["HTTPS", "HTTPS"]
        assert all(p.get("appProtocol") == "https" for p in svc_ports)
        assert endpoint["scheme"] == "https"
        assert endpoint["tlsConfig"]["ca"]["secret"]["name"] in secrets
    else:
        # TLS only where the overlay says so: plain probes and scrapes would fail against a TLS port
        assert "MNISTGEN_TLS_CERT" not in env and "MNISTGEN_TLS_KEY" not in env
        assert probes == ["HTTP", "HTTP"] and endpoint.get("scheme", "http") == "http"


def test_gateway_cli_accepts_the_deployment(overlay):
    """The real gateway CLI parses the Deployment's args and MNISTGEN_* env (TLS both-or-neither included)."""
    gateway = pytest.importorskip("serving.gateway")
    name, docs = overlay
    c = container(by_kind(docs, "Deployment")["gateway"])
    env = _gateway_env(c)
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]  # the kubelet's expansion
    cfg = gateway.parse_args(argv, environ=env)
    assert cfg.api_token_file == env["MNISTGEN_API_TOKEN_FILE"] and cfg.api_tokens == ""
    assert bool(cfg.tls_cert) == bool(cfg.tls_key) == (name == "tls")
    # fail closed: a token file without tokens stops the gateway (it listens beyond loopback), but where opted out
    from serving.gateway.config import unauthenticated_refusal

    assert (unauthenticated_refusal(cfg, has_tokens=False) is None) == (name == "auth-disabled")
    assert unauthenticated_refusal(cfg, has_tokens=True) is None


def test_triton_key_from_a_required_secret_restricts_every_api_but_health(overlay):
    """Triton's restricted APIs take their key from Secret triton-key, required by both pods; HTTP is off."""
    from serving.triton_access import ALL_BUT_HEALTH, KEY_ENV, KEY_HEADER

    _, docs = overlay
    deploys = by_kind(docs, "Deployment")
    triton = container(deploys["triton"])
    cmd = triton["command"]
    assert cmd[:2] == ["/opt/nvidia/nvidia_entrypoint.sh", "tritonserver"] and "--allow-http=false" in cmd
    assert arg_value(cmd, "--grpc-restricted-protocol") == f"{','.join(ALL_BUT_HEALTH)}:{KEY_HEADER}=$({KEY_ENV})"
    for c in (triton, container(deploys["gateway"])):
        (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == KEY_ENV]
        assert ref["name"] == "triton-key" and not ref.get("optional"), ref


def test_triton_shm_and_resources(overlay):
    name, docs = overlay
    d = by_kind(docs, "Deployment")["triton"]
    pod = d["spec"]["template"]["spec"]
    c = container(d)
    shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    vol = next(v for v in pod["volumes"] if v["name"] == shm["name"])
    assert vol["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > int(arg_value(c["args"], "--exit-timeout-secs"))
    limits = c["resources"]["limits"]
    repo = arg_value(c["args"], "--model-repository")
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        assert repo == "/models"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert pod["nodeSelector"]
    else:
        assert repo == "/models-cpu"
        assert "nvidia.com/gpu" not in str(docs), "the cpu overlay must not ask for GPUs"


def test_autoscalers(overlay, adapter_rules):
    _, docs = overlay
    deploys = by_kind(docs, "Deployment")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"gateway", "triton"}
    for name, h in hpas.items():
        assert h["apiVersion"] == "autoscaling/v2"
        ref = h["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", name) and ref["name"] in deploys
        assert 1 <= h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"]
        # A replicas field would reset the autoscaled count on every `kubectl apply`.
        assert "replicas" not in deploys[name]["spec"], f"Deployment {name} is autoscaled: drop spec.replicas"
    (gw_metric,) = hpas["gateway"]["spec"]["metrics"]
    assert gw_metric["type"] == "Resource" and gw_metric["resource"]["name"] == "cpu"
    # Utilization is a percentage of requests.cpu: every container needs one.
    for c in deploys["gateway"]["spec"]["template"]["spec"]["containers"]:
        assert "cpu" in c["resources"]["requests"]
    (tr_metric,) = hpas["triton"]["spec"]["metrics"]
    assert tr_metric["type"] == "Pods"
    served = {r["name"]["as"] for r in adapter_rules}
    assert tr_metric["pods"]["metric"]["name"] in served, "the Triton HPA metric has no Prometheus Adapter rule"


def test_disruption_budgets(overlay):
    _, docs = overlay
    deploys = by_kind(docs, "Deployment")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert set(pdbs) == {"gateway", "triton"}
    for name, pdb in pdbs.items():
        matched = [n for n, d in deploys.items() if selects(pdb["spec"]["selector"]["matchLabels"],
                                                            template_labels(d))]
        assert matched == [name]
    hpa_min = by_kind(docs, "HorizontalPodAutoscaler")["gateway"]["spec"]["minReplicas"]
    assert pdbs["gateway"]["spec"]["minAvailable"] < hpa_min, "a gateway PDB as large as the fleet blocks drains"


def test_service_monitors(overlay):
    _, docs = overlay
    services = by_kind(docs, "Service")
    monitors = by_kind(docs, "ServiceMonitor")
    assert set(monitors) == {"gateway", "triton"}
    for name, sm in monitors.items():
        matched = [n for n, s in services.items() if selects(sm["spec"]["selector"]["matchLabels"],
                                                             s["metadata"]["labels"])]
        assert matched == [name]
        port_names = {p["name"] for p in services[name]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in port_names and ep["path"] == "/metrics"
    assert monitors["triton"]["spec"]["endpoints"][0]["port"] == "metrics"


def test_network_policy_only_gateway_reaches_triton(overlay):
    _, docs = overlay
    deploys = by_kind(docs, "Deployment")
    (pol,) = by_kind(docs, "NetworkPolicy").values()
    spec = pol["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert [n for n, d in deploys.items() if selects(spec["podSelector"]["matchLabels"], template_labels(d))] \
        == ["triton"]
    allowed = {}
    for rule in spec["ingress"]:
        ports = [container_port(deploys["triton"], p["port"]) for p in rule["ports"]]
        assert None not in ports, "a NetworkPolicy port names no Triton container port"
        for peer in rule["from"]:
            in_ns = [n for n, d in deploys.items() if "namespaceSelector" not in peer
                     and selects(peer["podSelector"]["matchLabels"], template_labels(d))]
            key = "gateway" if in_ns == ["gateway"] else "prometheus" if "namespaceSelector" in peer else str(in_ns)
            allowed.setdefault(key, set()).update(ports)
    assert allowed == {"gateway": {8001}, "prometheus": {8002}}
    url_port = int(env_value(container(deploys["gateway"]), "MNISTGEN_TRITON_URL").rsplit(":", 1)[1])
    assert url_port in allowed["gateway"]


def test_images_are_pinned(overlay):
    _, docs = overlay
    for d in docs:
        for spec in pod_specs(d):
            for c in spec["containers"]:
                name, tag = _split_image(c["image"])
                assert tag and tag != "latest", f"{d['metadata']['name']}: image {c['image']} has no pinned tag"


# ------------------------------------------------------------------------------------------------------
# Training jobs and the Prometheus Adapter rule.
def test_training_jobs():
    docs = render(K8S / "training")
    pvcs = by_kind(docs, "PersistentVolumeClaim")
    jobs = by_kind(docs, "Job")
    assert set(jobs) == {"train-gan", "train-ddpm"}
    modules = set()
    for name, job in jobs.items():
        pod = job["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert job["metadata"]["namespace"] == NAMESPACE
        assert pod["restartPolicy"] == "Never"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert pod["securityContext"]["runAsNonRoot"] is True
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims and set(claims) <= set(pvcs)
        options, extra = recipe_args(c)
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        assert options.nproc_per_node == "$(NPROC_PER_NODE)"
        assert int(env["NPROC_PER_NODE"]) == c["resources"]["limits"]["nvidia.com/gpu"]
        assert extra[-2:] == ["--device", "cuda"]
        modules.add(R.TRAINERS[R.load_recipe(options.recipe).trainer][0])
    assert modules == {"training.train_gan", "training.train_ddpm"}


def recipe_args(container: dict):
    """A training Job's args (the image's entrypoint is `python -m`): training.recipe's options and the trainer
    arguments it passes to every stage."""
    args = container["args"]
    assert args[0] == "training.recipe", args
    return R.parse_args(args[1:])


@pytest.mark.parametrize("job, recipe", [("train-gan", "dcgan-baseline"), ("train-ddpm", "ddpm")])
def test_training_job_arguments_parse(job, recipe):
    """Every stage of the Job's recipe, as the runner launches it (torchrun, the Job's extra arguments), parses with
    the real training CLI, on CUDA, and the run directory and checkpoint land on the volume."""
    (doc,) = [d for d in render(K8S / "training") if d["kind"] == "Job" and d["metadata"]["name"] == job]
    c = doc["spec"]["template"]["spec"]["containers"][0]
    options, extra = recipe_args(c)
    rec = R.load_recipe(options.recipe)
    assert rec.name == recipe
    mount = Path(next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "runs"))
    workdir = Path("/opt/mnistgen")  # the training image's WORKDIR; relative paths resolve from there
    run_dir, checkpoint = workdir / options.run_dir, workdir / options.checkpoint
    assert run_dir.is_relative_to(mount) and checkpoint.is_relative_to(mount), (run_dir, checkpoint)
    mod = importlib.import_module(R.TRAINERS[rec.trainer][0])
    for stage in rec.stages:
        cmd = R.stage_command(rec, stage, run_dir, checkpoint, extra, nproc=2)
        assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        parsed = mod.parse_args(cmd[7:])  # after `-m training.train_*`
        cfg = parsed[0] if isinstance(parsed, tuple) else parsed
        assert cfg.device == "cuda" and cfg.stop_at == stage.until
        assert Path(cfg.checkpoint) == checkpoint and Path(cfg.run_dir) == run_dir


def test_prometheus_adapter_rule(adapter_rules):
    for rule in adapter_rules:
        series = re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1)
        assert series in TRITON_METRICS
        used = set(re.findall(r"\b(nv_\w+)\{", rule["metricsQuery"]))
        assert used and used <= TRITON_METRICS, used - TRITON_METRICS
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        overrides = rule["resources"]["overrides"]
        assert overrides["pod"]["resource"] == "pod" and overrides["namespace"]["resource"] == "namespace"
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series)
