"""deploy/ without a cluster or a container runtime: the Kubernetes manifests against the API schemas,
every setting and metric they name against the code, the Dockerfile's targets, and the health checks
(videomesh.probe itself is tested with the package). Nothing here builds an image or applies a manifest
(deploy/README.md)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The newest Kubernetes whose API schemas kubernetes-validate 1.37.0 ships; strict: unknown fields fail.
K8S_VERSION = "1.37.0"
SERVICES = ("encoder", "denoiser", "upscaler", "qc", "gateway")
GLOBAL_ENV = {
    "VIDEOMESH_MESH_SECRET_FILE",
    "VIDEOMESH_GRACE_SECONDS",
    "VIDEOMESH_LOG_FORMAT",
    "VIDEOMESH_LOG_LEVEL",
}
# Dockerfile target -> the module its CMD runs
TARGETS = {
    "encoder": "services.encoder",
    "denoiser": "services.denoiser",
    "denoiser-cuda": "services.denoiser",
    "upscaler": "services.upscaler",
    "qc": "services.qc",
    "gateway": "gateway",
}
GRPC_PORT, METRICS_PORT = 50051, 9090
# the gateway's plaintext grpc.health.v1-only port (health_port): the kubelet's probe cannot speak TLS
HEALTH_PORT = 8081
KUSTOMIZE = "kustomize.config.k8s.io/v1beta1"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _base_manifests() -> list[Path]:
    """deploy/k8s/*.yaml that are Kubernetes objects (not the kustomization itself)."""
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _objects(kind: str | None = None) -> list[dict]:
    objs = [d for p in _base_manifests() for d in _docs(p)]
    return [d for d in objs if kind is None or d["kind"] == kind]


def _merge(base, patch):
    """Enough of a strategic merge for the gpu overlay: maps merge, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out = [dict(x) for x in base]
        for item in patch:
            i = next((i for i, x in enumerate(out) if x["name"] == item["name"]), None)
            if i is None:
                out.append(item)
            else:
                out[i] = _merge(out[i], item)
        return out
    return patch


def _gpu_denoiser() -> dict:
    (patch,) = _docs(K8S / "gpu" / "denoiser-cuda.yaml")
    (base,) = [d for d in _objects("Deployment") if d["metadata"]["name"] == "denoiser"]
    return _merge(base, patch)


def _deployments() -> list[dict]:
    return _objects("Deployment") + [_gpu_denoiser()]


def _container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# --- the Kubernetes API ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _base_manifests(), ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_api(path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(x) for x in err.path)
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {where}: {err.message}")


def test_gpu_overlay_patch_gives_a_valid_deployment():
    kust = _docs(K8S / "gpu" / "kustomization.yaml")[0]
    assert kust["apiVersion"] == KUSTOMIZE and kust["resources"] == ["../"]
    assert [p["path"] for p in kust["patches"]] == ["denoiser-cuda.yaml"]
    dep = _gpu_denoiser()
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    c = _container(dep)
    assert c["image"].startswith("videomesh/denoiser-cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_kustomization_lists_every_manifest_but_the_example_secrets():
    (kust,) = _docs(K8S / "kustomization.yaml")
    assert kust["apiVersion"] == KUSTOMIZE and kust["kind"] == "Kustomization"
    listed = set(kust["resources"])
    present = {p.name for p in _base_manifests()}
    # applying the placeholders would overwrite real Secrets: kubectl create secret makes those
    assert listed == present - {"secrets.example.yaml"}
    assert "Secret" not in {d["kind"] for name in listed for d in _docs(K8S / name)}
    images = {i["name"] for i in kust["images"]}
    assert images == {c["image"].split(":")[0] for d in _objects("Deployment") for c in [_container(d)]}


def test_raycluster_is_a_kuberay_cluster_whose_pods_validate():
    """RayCluster is a custom resource: kubernetes-validate has no schema for it (asserted, so that a
    release that adds one is noticed). What can be checked: the YAML, apiVersion/kind, and each pod
    template as a core/v1 Pod spec, strictly."""
    (rc,) = _docs(DEPLOY / "raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(rc, K8S_VERSION, strict=True)
    spec = rc["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for t in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray"}, "spec": t["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        for c in t["spec"]["containers"]:
            # the driver (denoiser) and the cluster must share Python and Ray versions: one image
            assert c["image"].startswith("videomesh/denoiser-cuda"), c["image"]


# --- settings named by environment variables ------------------------------------------------------------


def _env_sources() -> list[tuple[str, str, str]]:
    """(where, variable, value) for every VIDEOMESH_* variable the deployment files set."""
    out = []
    for dep in _deployments():
        for name, value in _env(_container(dep)).items():
            out.append((f"k8s Deployment/{dep['metadata']['name']}", name, value))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for svc, spec in compose["services"].items():
        for name, value in (spec.get("environment") or {}).items():
            out.append((f"compose {svc}", name, str(value)))
    for line in _dockerfile_instructions():
        if line[0] == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", line[1]):
                out.append(("Dockerfile", name, value))
    return [o for o in out if o[1].startswith("VIDEOMESH_")]


def test_every_videomesh_variable_names_a_real_setting():
    from videomesh.launch import settings_class

    fields = {s: set(settings_class(s).__dataclass_fields__) for s in SERVICES}
    wrong = []
    for where, var, _ in _env_sources():
        if var in GLOBAL_ENV:
            continue
        m = re.fullmatch(r"VIDEOMESH_(ENCODER|DENOISER|UPSCALER|QC|GATEWAY)_(\w+)", var)
        if not m:
            wrong.append(f"{where}: {var} names no service")
            continue
        svc, field = m.group(1).lower(), m.group(2).lower()
        if field not in fields[svc] and field.endswith("_file"):
            field = field.removesuffix("_file")  # <SETTING>_FILE: the setting's value is that file's content
        if field not in fields[svc]:
            wrong.append(f"{where}: {var}: {settings_class(svc).__name__} has no field {field!r}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_secret_files_are_mounted_where_the_variables_point():
    for dep in _deployments():
        spec = dep["spec"]["template"]["spec"]
        c = _container(dep)
        secret_volumes = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
        mounts = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in secret_volumes]
        for var, value in _env(c).items():
            if var.endswith(("_FILE", "_TLS_CERT", "_TLS_KEY")):
                assert any(value.startswith(m.rstrip("/") + "/") for m in mounts), (
                    dep["metadata"]["name"],
                    var,
                )
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for svc, spec in compose["services"].items():
        for var, value in (spec.get("environment") or {}).items():
            if var.endswith("_FILE"):
                name = str(value).removeprefix("/run/secrets/")
                assert name in spec.get("secrets", []), (svc, var)
                assert name in compose["secrets"] and (DEPLOY / "secrets.example" / name).is_file(), name


# --- metrics ----------------------------------------------------------------------------------------------


def _exported_metric_names() -> set[str]:
    import gateway.metrics  # noqa: F401 - registers the gateway's metrics in the process registry
    import videomesh.metrics

    return videomesh.metrics.exported_names() | {"up"}


def _alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "videomesh.json").read_text())


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_in_alerts_and_dashboard_is_exported(source):
    exprs = _alert_exprs() if source == "alerts" else _dashboard_exprs()
    assert exprs
    names = _exported_metric_names()
    # metric names are the only videomesh_* identifiers in PromQL here (labels and values are not)
    used = {m for e in exprs for m in re.findall(r"\bvideomesh_[a-z0-9_]+\b", e)}
    missing = sorted(used - names)
    assert not missing, f"{source} uses metrics the code does not export: {missing}"


def test_alerts_cover_what_operators_page_on():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    need = {
        "videomesh_rpc_requests_total": "5m",
        "videomesh_breaker_open": "2m",
        "videomesh_queue_wait_seconds_bucket": "10m",
        "videomesh_review_backlog": "15m",
        'up{job=~"videomesh.*"}': "1m",
    }
    for metric, duration in need.items():
        hits = [a for a in alerts.values() if metric in a["expr"]]
        assert hits and any(a["for"] == duration for a in hits), metric
    for a in alerts.values():
        assert a["labels"]["severity"] in ("page", "ticket") and a["annotations"]["summary"]


def test_prometheus_configs_load_the_rules_and_scrape_videomesh_jobs():
    for name in ("prometheus.yml", "prometheus-compose.yml"):
        cfg = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
        for f in cfg["rule_files"]:
            assert (DEPLOY / "prometheus" / f).is_file()
        assert all(j["job_name"].startswith("videomesh") for j in cfg["scrape_configs"])
    (job,) = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert any("__meta_kubernetes_pod_annotation_prometheus_io_scrape" in r["source_labels"] for r in keep)
    # `service` is a label of the RPC metrics themselves: a target label of that name would rename it
    assert all(r.get("target_label") != "service" for r in job["relabel_configs"])


def test_dashboard_is_schema_39_on_a_datasource_variable_with_every_panel():
    d = _dashboard()
    assert d["schemaVersion"] == 39
    (var,) = [v for v in d["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"])
    text = " ".join(_dashboard_exprs())
    for metric in (
        "videomesh_rpc_requests_total", "videomesh_rpc_duration_seconds_bucket", "videomesh_rpc_in_flight",
        "videomesh_queue_depth", "videomesh_queue_wait_seconds_bucket", "videomesh_jobs_total",
        "videomesh_rejected_total", "videomesh_stage_seconds_bucket", "videomesh_breaker_open",
        "videomesh_cache_lookups_total", "videomesh_denoiser_step_seconds_bucket",
        "videomesh_denoiser_batch_size", "videomesh_review_backlog", "videomesh_gpu_memory_bytes",
        "videomesh_denoiser_replicas", "videomesh_job_workers",
    ):  # fmt: skip
        assert metric in text, metric


# --- the Dockerfile -------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, dict]:
    """stage name -> {"from": base, "user": last USER, "cmd": CMD}."""
    stages, current = {}, None
    for word, rest in _dockerfile_instructions():
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.I)
            current = {"from": m.group(1), "user": None, "cmd": None}
            stages[m.group(2) or f"#{len(stages)}"] = current
        elif word == "USER" and current is not None:
            current["user"] = rest
        elif word == "CMD" and current is not None:
            current["cmd"] = json.loads(rest)
    return stages


def _effective(stages: dict, name: str, key: str):
    while name in stages:
        if stages[name][key] is not None:
            return stages[name][key]
        name = stages[name]["from"]
    return None


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_dockerfile_target_runs_its_service_as_non_root(target):
    stages = _stages()
    assert target in stages, f"no stage {target!r} in deploy/Dockerfile"
    user = _effective(stages, target, "user")
    assert user and user.split(":")[0] not in ("root", "0"), f"{target} runs as {user!r}"
    assert user.split(":")[0] == "10001"
    cmd = _effective(stages, target, "cmd")
    assert cmd == ["python", "-m", TARGETS[target]]
    assert importlib.util.find_spec(TARGETS[target]) is not None
    assert importlib.util.find_spec(TARGETS[target] + ".__main__") is not None, (
        f"{TARGETS[target]} has no __main__"
    )


def test_dockerfile_copies_exist_and_pass_its_dockerignore():
    copied = []
    for word, rest in _dockerfile_instructions():
        if word == "COPY" and "--from=" not in rest:
            copied += rest.split()[:-1]
    assert copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for src in copied:
        assert (ROOT / src).exists(), src
        assert src.rstrip("/") in kept, f"{src} is copied but deploy/Dockerfile.dockerignore leaves it out"


# --- Deployments: probes, resources, disruption budgets, services -----------------------------------------


def _grace(c: dict) -> float:
    return float(_env(c)["VIDEOMESH_GRACE_SECONDS"])


def _probes_port(probe: dict) -> int | None:
    """The port a probe checks gRPC health on: only the kubelet's native grpc probe counts."""
    if "grpc" not in probe or {"exec", "httpGet", "tcpSocket"} & set(probe):
        return None
    return probe["grpc"]["port"]


@pytest.mark.parametrize(
    "dep", _deployments(), ids=lambda d: d["metadata"]["name"] + ("-gpu" if "cuda" in str(d) else "")
)
def test_deployment_is_probed_bounded_budgeted_and_reachable(dep):
    name = dep["metadata"]["name"]
    pod = dep["spec"]["template"]
    c = _container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = _env(c)
    svc = name.upper()
    if name == "gateway":
        # TLS-only public port: the probes ask the plaintext health-only port, which the gateway must open
        assert env["VIDEOMESH_GATEWAY_TLS_CERT"]
        assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT, "health": HEALTH_PORT}
        assert env["VIDEOMESH_GATEWAY_HEALTH_PORT"] == str(HEALTH_PORT)
        probed = HEALTH_PORT
    else:
        assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
        probed = GRPC_PORT
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert _probes_port(c[kind]) == probed, f"{name}: {kind} is not a native gRPC probe on {probed}"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
    # liveness must not kill a drain: its failure window outlasts the termination grace
    grace_pod = pod["spec"]["terminationGracePeriodSeconds"]
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace_pod
    assert grace_pod - 10 <= _grace(c) < grace_pod
    assert grace_pod == (60 if name == "gateway" else 30)
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part]), f"{name}: resources.{part}"
    sc, psc = c["securityContext"], pod["spec"]["securityContext"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] == 10001
    assert (
        sc["readOnlyRootFilesystem"]
        and sc["capabilities"]["drop"] == ["ALL"]
        and not sc["allowPrivilegeEscalation"]
    )
    assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    assert env[f"VIDEOMESH_{svc}_HOST"] == "0.0.0.0"
    assert env[f"VIDEOMESH_{svc}_PORT"] == str(GRPC_PORT)
    assert env[f"VIDEOMESH_{svc}_METRICS_PORT"] == str(METRICS_PORT)
    assert env["VIDEOMESH_MESH_SECRET_FILE"] == "/var/run/secrets/videomesh-mesh/secret"
    labels = pod["metadata"]["labels"]
    selects = lambda sel: sel and all(labels.get(k) == v for k, v in sel.items())  # noqa: E731
    pdbs = [p for p in _objects("PodDisruptionBudget") if selects(p["spec"]["selector"]["matchLabels"])]
    assert [p["spec"]["minAvailable"] for p in pdbs] == [1], f"{name}: one PDB with minAvailable 1"
    headless = [
        s
        for s in _objects("Service")
        if s["spec"].get("clusterIP") == "None" and selects(s["spec"]["selector"])
    ]
    assert [s["metadata"]["name"] for s in headless] == [f"{name}-headless"]
    assert {p["port"] for p in headless[0]["spec"]["ports"]} >= {GRPC_PORT}
    # the health port is for the kubelet, which dials the pod IP: no Service publishes it
    for s in _objects("Service"):
        if selects(s["spec"]["selector"]):
            assert HEALTH_PORT not in {p.get("targetPort") for p in s["spec"]["ports"]}
            assert "health" not in {p.get("targetPort") for p in s["spec"]["ports"]}


def test_gateway_dials_every_internal_service_through_its_headless_name():
    (gw,) = [d for d in _objects("Deployment") if d["metadata"]["name"] == "gateway"]
    env = _env(_container(gw))
    headless = {s["metadata"]["name"] for s in _objects("Service") if s["spec"].get("clusterIP") == "None"}
    for svc in ("encoder", "denoiser", "upscaler", "qc"):
        target = env[f"VIDEOMESH_GATEWAY_{svc.upper()}"]
        assert target == f"dns:///{svc}-headless.videomesh.svc.cluster.local:{GRPC_PORT}"
        assert f"{svc}-headless" in headless
    assert env["VIDEOMESH_GATEWAY_STORAGE"] == "s3"
    # the replicas share PostgreSQL (jobs, queue, tenants and keys) and S3, nothing on disk: no RWX volume
    assert "emptyDir" in {v["name"]: v for v in gw["spec"]["template"]["spec"]["volumes"]}["data"]
    assert "VIDEOMESH_GATEWAY_DATABASE_FILE" in env and not _objects("PersistentVolumeClaim")


def test_autoscaled_deployments_leave_the_replica_count_to_their_hpa():
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in _objects("HorizontalPodAutoscaler")}
    assert set(hpas) == {"gateway", "upscaler", "qc"}
    assert hpas["gateway"]["spec"]["minReplicas"] >= 2
    deps = {d["metadata"]["name"]: d for d in _objects("Deployment")}
    for name, hpa in hpas.items():
        assert "replicas" not in deps[name]["spec"], f"{name}: an applied replica count would reset the HPA's"
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]


def test_compose_builds_each_service_from_its_target_and_checks_its_health():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for name in SERVICES:
        spec = services[name]
        assert spec["build"]["dockerfile"] == "deploy/Dockerfile" and spec["build"]["target"] == name
        assert (DEPLOY / spec["build"]["context"] / spec["build"]["dockerfile"]).is_file()
        env = {k: str(v) for k, v in (spec.get("environment") or {}).items()}
        # the port it checks: the service's own, or the gateway's plaintext health port when TLS is on
        port = env[f"VIDEOMESH_{name.upper()}_PORT"]
        if name == "gateway" and "VIDEOMESH_GATEWAY_TLS_CERT" in env:
            port = env["VIDEOMESH_GATEWAY_HEALTH_PORT"]
        assert spec["healthcheck"]["test"] == ["CMD", "python", "-m", "videomesh.probe", f"localhost:{port}"]
        assert "mesh-secret" in spec["secrets"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "-s3" in services["seaweedfs"]["command"]
    for mount in services["prometheus"]["volumes"]:
        src = mount.split(":")[0]
        assert not src.startswith(".") or (DEPLOY / src).is_file(), src
