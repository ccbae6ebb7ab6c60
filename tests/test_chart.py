"""
The Helm chart, rendered and linted by real Helm (helm-python-sdk embeds
Helm v4, in-process and offline) and checked object by object against the
Kubernetes schemas, in the single-pod and the scale-out mode.

The seed deployment's properties are checked on ``ci/seed-values.yaml``,
the chart's own statement of that deployment.
"""

import base64
import functools
import json
import re
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

CHART = Path(__file__).resolve().parent.parent / "chart" / "regcache"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
NAMESPACE = "mirror"
RELEASE = "regcache"

# The oldest and newest Kubernetes versions the installed kubernetes-validate
# ships schemas for, from 1.30 on: both must accept every object.
_SHIPPED = sorted({tuple(int(x) for x in v.split(".")[:2])
                   for v in kubernetes_validate.utils.all_versions()})
_CURRENT = [v for v in _SHIPPED if v >= (1, 30)]
KUBE_VERSIONS = sorted({"%d.%d" % _CURRENT[0], "%d.%d" % _CURRENT[-1]})

SEED = yaml.safe_load((CHART / "ci" / "seed-values.yaml").read_text())
SCALE_OUT = yaml.safe_load((CHART / "ci" / "scale-out-values.yaml").read_text())
SHARED = yaml.safe_load((CHART / "ci" / "shared-values.yaml").read_text())
SEAWEEDFS = yaml.safe_load((CHART / "ci" / "seaweedfs-values.yaml").read_text())


@functools.lru_cache(maxsize=None)
def _chart():
    return helm.Chart.load(CHART)


@functools.lru_cache(maxsize=None)
def _render(values_json):
    return _chart().render(values=json.loads(values_json), name=RELEASE, namespace=NAMESPACE)


def render(values=None):
    """
    The chart's output for these values: the parsed objects and NOTES.txt.
    Renders are cached, so each values set costs one Helm call per run.
    """
    out = _render(json.dumps(values or {}, sort_keys=True))
    objects = [
        obj
        for path, text in sorted(out.items())
        if path.endswith(".yaml")
        for obj in yaml.safe_load_all(text)
        if obj
    ]
    notes = next((text for path, text in out.items() if path.endswith("NOTES.txt")), "")
    return objects, notes


def merged(*layers):
    """
    Values layered like repeated ``-f`` files: later layers win, maps merge.
    """
    result = {}
    for layer in layers:
        result = _merge(result, layer)
    return result


def _merge(base, over):
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def only(objects, kind, name=None):
    """
    The one object of this kind (and name); fails if there are none or more.
    """
    found = [o for o in objects if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def kinds(objects):
    return sorted(o["kind"] for o in objects)


def pod_spec(objects):
    workload = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")
                and o["metadata"]["name"] == RELEASE]
    assert len(workload) == 1
    return workload[0]["spec"]["template"]["spec"]


def container(objects):
    containers = pod_spec(objects)["containers"]
    assert len(containers) == 1
    return containers[0]


def env(objects):
    return {e["name"]: e for e in container(objects)["env"]}


MODES = {
    "default": {},
    "seed": SEED,
    "scale-out": SCALE_OUT,
    "everything": merged(SEED, {
        "upstream": {"existingSecret": "", "username": "hub-user", "password": "hub-token"},
        "imageCredentials": {"create": True, "registry": "registry.example.com",
                             "username": "puller", "password": "pull-token"},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "persistence": {"storageClass": "fast-ssd"},
        "auth": {"existingSecret": "regcache-htpasswd", "anonymous": "cached-only",
                 "trustedNetworks": ["10.0.0.0/8"], "trustedProxies": ["10.42.0.0/16"]},
    }),
    "scale-out-everything": merged(SCALE_OUT, {
        "upstream": {"username": "hub-user", "password": "hub-token"},
        "persistence": {"storageClass": "-"},
        "auth": {"existingSecret": "regcache-htpasswd", "secretKey": "users"},
        "config": {"upstreams": [{"name": "dockerhub", "urls": ["https://registry-1.docker.io"]}],
                   "auth": {"groups": {"robots": ["ci"]}}},
    }),
    "shared": SHARED,
    "shared-everything": merged(SHARED, {
        "storage": {"local": {"volume": "ephemeral", "storageClass": "local-ssd"},
                    "s3": {"existingSecret": "", "accessKey": "GOOG1EEXAMPLE", "secretKey": "hmac-secret",
                           "redirect": True, "prefix": "regcache/", "sweepInterval": "15m"},
                    "leases": {"ttl": "20s", "redis": "redis://redis:6379"}},
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9},
        "scaleOut": {"localityHint": True},
        "upstream": {"username": "hub-user", "password": "hub-token"},
        "auth": {"existingSecret": "regcache-htpasswd"},
        "metrics": {"port": 9102},
    }),
    "seaweedfs": SEAWEEDFS,
}


# --- Helm lint and Kubernetes schemas -------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_helm_lint_strict_is_clean(mode, kube_version):
    """
    helm lint --strict reports no warning or error for the chart, in every
    mode, for each current Kubernetes version (info-level hints such as a
    missing icon are allowed).
    """
    report = helm.lint(CHART, MODES[mode], strict=True, kube_version=f"v{kube_version}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_object_validates_against_kubernetes_schemas(mode, kube_version):
    """
    Every rendered object is valid for the Kubernetes version (strict schema:
    unknown fields fail too).  The ServiceMonitor is a CRD with no schema
    there; its shape is checked by its own test.
    """
    objects, _ = render(MODES[mode])
    checked = 0
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(obj, kube_version, strict=True)
        checked += 1
    assert checked >= 4


def test_validator_rejects_a_broken_object():
    """
    The schema check really checks: a Deployment with a string replica count
    and an unknown field fails it.
    """
    objects, _ = render(SEED)
    broken = json.loads(json.dumps(only(objects, "Deployment")))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)
    broken = json.loads(json.dumps(only(objects, "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("path", CI_VALUES, ids=lambda p: p.name)
def test_ci_values_files_pass_the_schema(path):
    """
    The values files under ci/ (the seed and scale-out examples the docs
    point to) are valid values.
    """
    _chart().validate_schema(yaml.safe_load(path.read_text()))


# --- The seed deployment, property by property ----------------------------


def test_seed_runs_one_pod_from_a_deployment_recreated_on_update():
    """
    One replica from a Deployment whose strategy is Recreate: the RWO volume
    cannot be attached to an old and a new pod at once.
    """
    objects, _ = render(SEED)
    deployment = only(objects, "Deployment", RELEASE)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "StatefulSet" not in kinds(objects)


def test_seed_pvc_is_64gi_rwo_mounted_at_var_lib_registry():
    """
    The store is a 64Gi ReadWriteOnce claim, mounted where the image keeps
    its cache and where REGCACHE_STORAGE points.
    """
    objects, _ = render(SEED)
    pvc = only(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "64Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    spec = pod_spec(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
    assert volumes[mounts["/var/lib/registry"]]["persistentVolumeClaim"]["claimName"] \
        == pvc["metadata"]["name"]
    assert env(objects)["REGCACHE_STORAGE"]["value"] == "/var/lib/registry"


def test_seed_service_account_token_is_not_mounted():
    """
    The ServiceAccount and the pod both say automountServiceAccountToken:
    false, and the pod runs as that ServiceAccount.
    """
    objects, _ = render(SEED)
    account = only(objects, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    spec = pod_spec(objects)
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == account["metadata"]["name"]


def test_seed_security_contexts():
    """
    Pod: uid, gid and fsGroup 1000, non-root, seccomp RuntimeDefault.
    Container: no privilege escalation, read-only root, every capability
    dropped.
    """
    objects, _ = render(SEED)
    pod = pod_spec(objects)["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (1000, 1000, 1000)
    assert pod["runAsNonRoot"] is True
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    ctr = container(objects)["securityContext"]
    assert ctr["allowPrivilegeEscalation"] is False
    assert ctr["readOnlyRootFilesystem"] is True
    assert ctr["capabilities"]["drop"] == ["ALL"]


def test_seed_writable_paths_are_the_store_and_tmp_only():
    """
    With a read-only root, the container mounts exactly the store, an
    emptyDir at /tmp, and (when credentials exist) a read-only secret.
    """
    objects, _ = render(MODES["everything"])
    spec = pod_spec(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = container(objects)["volumeMounts"]
    writable = sorted(m["mountPath"] for m in mounts if not m.get("readOnly"))
    assert writable == ["/tmp", "/var/lib/registry"]
    tmp = next(m["name"] for m in mounts if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp]


def test_seed_image_pull_secrets():
    """
    The pod pulls regcache's own image with the seed's pull secret.
    """
    objects, _ = render(SEED)
    assert pod_spec(objects)["imagePullSecrets"] == [{"name": "registry-example-com"}]
    assert container(objects)["image"] == "registry.example.com/infra/regcache:0.1.0"


def test_seed_port_5000_on_container_and_service():
    """
    The container listens on 5000 (and is told so); the Service exposes
    5000 as the seed's NodePort, while the chart's default type is ClusterIP.
    """
    objects, _ = render(SEED)
    assert container(objects)["ports"] == [{"name": "http", "containerPort": 5000, "protocol": "TCP"}]
    assert env(objects)["REGCACHE_LISTEN"]["value"] == "tcp:5000"
    service = only(objects, "Service", RELEASE)
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"][0]["port"] == 5000
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    default_service = only(render({})[0], "Service", RELEASE)
    assert default_service["spec"]["type"] == "ClusterIP"


def test_seed_probes_use_health_endpoints_with_the_seed_timing():
    """
    Liveness GETs /healthz and readiness /readyz on port 5000, with the
    seed's timing: every 30 s and 20 s, 4 s timeout, 4 failures.
    """
    objects, _ = render(SEED)
    ctr = container(objects)
    port_names = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    live, ready = ctr["livenessProbe"], ctr["readinessProbe"]
    assert live["httpGet"]["path"] == "/healthz"
    assert ready["httpGet"]["path"] == "/readyz"
    for probe in (live, ready):
        assert port_names[probe["httpGet"]["port"]] == 5000
        assert probe["timeoutSeconds"] == 4
        assert probe["failureThreshold"] == 4
    assert live["periodSeconds"] == 30
    assert ready["periodSeconds"] == 20


def test_seed_upstream_url_and_credentials_come_from_env_and_secret():
    """
    The upstream URL is plain env; the user name is a secretKeyRef and the
    password a file from the same existing Secret.  No Secret is made.
    """
    objects, _ = render(SEED)
    variables = env(objects)
    assert variables["REGCACHE_UPSTREAM"]["value"] == "https://registry-1.docker.io"
    assert variables["REGCACHE_USERNAME"]["valueFrom"]["secretKeyRef"] == {
        "name": "regcache-upstream", "key": "username"}
    password_file = variables["REGCACHE_PASSWORD_FILE"]["value"]
    mount = next(m for m in container(objects)["volumeMounts"]
                 if password_file.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "regcache-upstream"
    assert volume["secret"]["items"] == [
        {"key": "password", "path": password_file.rsplit("/", 1)[1]}]
    assert "Secret" not in kinds(objects)
    assert "REGCACHE_PASSWORD" not in variables


def test_seed_ingress_v1_with_class_annotations_and_tls():
    """
    Ingress networking.k8s.io/v1 with ingressClassName nginx (the seed's
    kubernetes.io/ingress.class), the seed's other annotations, TLS for the
    host from a secret, and / routed to the Service on port 5000.
    """
    objects, _ = render(SEED)
    ingress = only(objects, "Ingress")
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"] == {
        "fluentbit.io/parser": "nginx",
        "kubernetes.io/tls-acme": "true",
        "certmanager.k8s.io/cluster-issuer": "letsencrypt-prod",
    }
    assert ingress["spec"]["tls"] == [{
        "hosts": ["registry-mirror.example.com"],
        "secretName": "registry-mirror-example-com-tls",
    }]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "registry-mirror.example.com"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/"
    assert path["backend"]["service"] == {"name": RELEASE, "port": {"number": 5000}}


def test_ingress_class_annotation_alone_still_works():
    """
    For controllers that only read the legacy annotation, leaving className
    empty renders kubernetes.io/ingress.class and no ingressClassName.
    """
    values = merged(SEED, {"ingress": {"className": "", "annotations": {
        "kubernetes.io/ingress.class": "nginx"}}})
    ingress = only(render(values)[0], "Ingress")
    assert ingress["metadata"]["annotations"]["kubernetes.io/ingress.class"] == "nginx"
    assert "ingressClassName" not in ingress["spec"]


def test_ingress_class_annotation_and_class_name_together_fail():
    """
    Kubernetes rejects an Ingress with both the class annotation and
    ingressClassName, so the chart fails first and says which to keep.
    """
    values = merged(SEED, {"ingress": {"annotations": {"kubernetes.io/ingress.class": "nginx"}}})
    with pytest.raises(helm.HelmError, match="ingress.className or the kubernetes.io/ingress.class"):
        render(values)


# --- Credentials ----------------------------------------------------------


def test_chart_made_secret_keeps_the_password_out_of_the_workload():
    """
    Credentials given as values land only in the chart's Secret: no other
    object holds the password, in plain text or base64, and the pod template
    carries the Secret's checksum so a new password rolls the pods.
    """
    password = "hunter2-unmistakable"
    values = merged(SEED, {"upstream": {"existingSecret": "", "username": "hub-user",
                                        "password": password}})
    objects, notes = render(values)
    secret = only(objects, "Secret")
    assert base64.b64decode(secret["data"]["password"]).decode() == password
    assert base64.b64decode(secret["data"]["username"]).decode() == "hub-user"
    encoded = base64.b64encode(password.encode()).decode()
    for obj in objects:
        if obj is not secret:
            text = json.dumps(obj)
            assert password not in text and encoded not in text, obj["kind"]
    assert password not in notes
    variables = env(objects)
    assert variables["REGCACHE_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] \
        == secret["metadata"]["name"]
    annotations = only(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    other = merged(values, {"upstream": {"password": "another-one"}})
    other_annotations = only(render(other)[0], "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/upstream-secret"] != other_annotations["checksum/upstream-secret"]


def test_no_credentials_means_no_secret_and_no_credential_env():
    """
    Anonymous upstream: no Secret, no user name, no password file.
    """
    objects, notes = render({})
    assert "Secret" not in kinds(objects)
    assert not {"REGCACHE_USERNAME", "REGCACHE_PASSWORD_FILE", "REGCACHE_PASSWORD"} & set(env(objects))
    assert "anonymous" in notes


def test_image_credentials_make_a_dockerconfigjson_secret_used_by_the_pod():
    """
    imageCredentials.create makes a kubernetes.io/dockerconfigjson Secret
    that docker and the kubelet can read, and adds it to imagePullSecrets.
    """
    objects, _ = render(MODES["everything"])
    pull = only(objects, "Secret", f"{RELEASE}-pull")
    assert pull["type"] == "kubernetes.io/dockerconfigjson"
    config = json.loads(base64.b64decode(pull["data"][".dockerconfigjson"]))
    entry = config["auths"]["registry.example.com"]
    assert base64.b64decode(entry["auth"]).decode() == "puller:pull-token"
    assert {"name": f"{RELEASE}-pull"} in pod_spec(objects)["imagePullSecrets"]
    assert {"name": "registry-example-com"} in pod_spec(objects)["imagePullSecrets"]


# --- Settings -------------------------------------------------------------


@pytest.mark.parametrize("size, expected", [
    ("64Gi", "58982Mi"),      # 64 * 1024 * 0.9 = 58982.4
    ("100G", "85830Mi"),      # 100e9 * 0.9 / 2**20 = 85830.68
    ("1.5Ti", "1415577Mi"),   # 1.5 * 2**20 * 0.9 = 1415577.6
])
def test_max_size_defaults_to_90_percent_of_the_volume(size, expected):
    """
    Without cache.maxSize, regcache evicts at 90% of persistence.size, so
    the volume never fills up; in both modes.
    """
    for base in ({}, SCALE_OUT):
        objects, _ = render(merged(base, {"persistence": {"size": size}}))
        assert env(objects)["REGCACHE_MAX_SIZE"]["value"] == expected


def test_max_size_and_other_settings_pass_through():
    """
    Explicit settings reach regcache's environment as given; unset ones are
    left to regcache's defaults rather than copied into the chart.
    """
    objects, _ = render({"cache": {"maxSize": "500Gi", "tagTTL": "5m", "maxStale": "7d"},
                         "upstream": {"url": "https://ghcr.io", "idleTimeout": "30s"}})
    variables = {k: v.get("value") for k, v in env(objects).items()}
    assert variables["REGCACHE_MAX_SIZE"] == "500Gi"
    assert variables["REGCACHE_TAG_TTL"] == "5m"
    assert variables["REGCACHE_MAX_STALE"] == "7d"
    assert variables["REGCACHE_UPSTREAM"] == "https://ghcr.io"
    assert variables["REGCACHE_IDLE_TIMEOUT"] == "30s"
    assert "REGCACHE_CONNECT_TIMEOUT" not in variables
    assert "REGCACHE_TAG_TTL" not in env(render({})[0])


def test_persistence_disabled_uses_a_sized_emptydir():
    """
    Without persistence there is no claim, and the store is an emptyDir
    capped at persistence.size.
    """
    objects, _ = render({"persistence": {"enabled": False, "size": "10Gi"}})
    assert "PersistentVolumeClaim" not in kinds(objects)
    data = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "data")
    assert data["emptyDir"] == {"sizeLimit": "10Gi"}


def test_storage_class_dash_means_no_class():
    """
    persistence.storageClass "-" asks for no class ("" in the claim); a name
    is used as is; empty leaves the cluster default.
    """
    pvc = only(render({"persistence": {"storageClass": "-"}})[0], "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == ""
    pvc = only(render({"persistence": {"storageClass": "fast"}})[0], "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "fast"
    pvc = only(render({})[0], "PersistentVolumeClaim")
    assert "storageClassName" not in pvc["spec"]


def test_existing_claim_is_used_and_none_is_made():
    """
    persistence.existingClaim mounts that claim and makes none.
    """
    objects, _ = render({"persistence": {"existingClaim": "old-registry-data"}})
    assert "PersistentVolumeClaim" not in kinds(objects)
    data = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == "old-registry-data"


# --- Scale-out ------------------------------------------------------------


def test_scale_out_is_a_statefulset_with_a_volume_per_pod():
    """
    replicaCount > 1 renders a StatefulSet (no Deployment, no shared PVC)
    whose volumeClaimTemplates give each pod its own RWO store, governed by
    a headless Service.
    """
    objects, _ = render(SCALE_OUT)
    assert "Deployment" not in kinds(objects)
    assert "PersistentVolumeClaim" not in kinds(objects)
    sts = only(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
    assert mounts["/var/lib/registry"] == "data"
    assert "data" not in {v["name"] for v in pod_spec(objects)["volumes"]}
    headless = only(objects, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]


def test_scale_out_ingress_hashes_the_uri_to_one_pod():
    """
    In scale-out the Ingress asks ingress-nginx for consistent hashing on
    the URI, so a digest always reaches the same pod; it still routes to
    the regular Service, whose endpoints are all the pods.
    """
    objects, _ = render(SCALE_OUT)
    ingress = only(objects, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$uri"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
    service = only(objects, "Service", backend)
    assert service["spec"].get("clusterIP") != "None"
    assert service["spec"]["selector"] == only(objects, "StatefulSet")["spec"]["selector"]["matchLabels"]
    request_uri = merged(SCALE_OUT, {"scaleOut": {"hashBy": "$request_uri"}})
    assert only(render(request_uri)[0], "Ingress")["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/upstream-hash-by"] == "$request_uri"


def test_single_pod_has_no_hashing_and_no_headless_service():
    """
    One pod needs neither the hash annotation nor a headless Service.
    """
    objects, _ = render(SEED)
    assert "nginx.ingress.kubernetes.io/upstream-hash-by" not in only(objects, "Ingress")["metadata"]["annotations"]
    assert [s["metadata"]["name"] for s in objects if s["kind"] == "Service"] == [RELEASE]


def test_scale_out_refuses_a_shared_existing_claim():
    """
    One existing claim cannot back several pods: the chart says so.
    """
    with pytest.raises(helm.HelmError, match="existingClaim works with one pod only"):
        render(merged(SCALE_OUT, {"persistence": {"existingClaim": "x"}}))


def test_service_monitor_scrapes_each_pod_once():
    """
    The ServiceMonitor scrapes /metrics on the http port of the regular
    Service, and its selector excludes the headless Service, which selects
    the same pods.
    """
    objects, _ = render(SCALE_OUT)
    monitor = only(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    selector = monitor["spec"]["selector"]

    def selects(service):
        labels = service["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in selector["matchLabels"].items()):
            return False
        return all(e["key"] not in labels for e in selector.get("matchExpressions", [])
                   if e["operator"] == "DoesNotExist")

    selected = [s["metadata"]["name"] for s in objects if s["kind"] == "Service" and selects(s)]
    assert selected == [RELEASE]
    assert "ServiceMonitor" not in kinds(render({})[0])


def test_metrics_port_moves_the_scrape_off_the_registry_port():
    """
    metrics.port gives /metrics a container and Service port of its own
    (REGCACHE_METRICS_LISTEN), which the ServiceMonitor scrapes; the
    rate-limit probe is passed through when set.
    """
    objects, _ = render(merged(SCALE_OUT, {"metrics": {"port": 9102, "ratelimitProbe": "10m"}}))
    monitor = only(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    service = only(objects, "Service", RELEASE)
    assert {"name": "metrics", "port": 9102, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
    (container,) = only(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 9102, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["REGCACHE_METRICS_LISTEN"], env["REGCACHE_RATELIMIT_PROBE"]) == ("tcp:9102", "10m")
    (plain,) = only(render({})[0], "Deployment")["spec"]["template"]["spec"]["containers"]
    assert not {"REGCACHE_METRICS_LISTEN", "REGCACHE_RATELIMIT_PROBE"} & {e["name"] for e in plain["env"]}


# --- Sharing an Ingress across namespaces ---------------------------------


def test_external_name_service_shares_an_ingress_in_another_namespace():
    """
    externalNameService puts an ExternalName Service in the Ingress's
    namespace pointing at this release's Service by its cluster DNS name,
    and the chart's Ingress goes there and routes to it.
    """
    values = merged(SEED, {"externalNameService": {"enabled": True, "namespace": "ingress"}})
    objects, _ = render(values)
    external = only(objects, "Service", f"{RELEASE}-{NAMESPACE}")
    assert external["metadata"]["namespace"] == "ingress"
    assert external["spec"]["type"] == "ExternalName"
    assert external["spec"]["externalName"] == f"{RELEASE}.{NAMESPACE}.svc.cluster.local"
    ingress = only(objects, "Ingress")
    assert ingress["metadata"]["namespace"] == "ingress"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": external["metadata"]["name"], "port": {"number": 5000}}
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    assert "ExternalName" not in json.dumps(render(SEED)[0])


def test_external_name_service_refuses_scale_out():
    """
    Through an ExternalName the Ingress sees one Service IP and cannot hash
    to pods, so the chart refuses the combination with a reason.
    """
    values = merged(SCALE_OUT, {"externalNameService": {"enabled": True, "namespace": "ingress"}})
    with pytest.raises(helm.HelmError, match="cannot hash"):
        render(values)


# --- values.schema.json ---------------------------------------------------


@pytest.mark.parametrize("values, where", [
    ({"replicaCount": -1}, "/replicaCount"),
    ({"replicaCount": "two"}, "/replicaCount"),
    ({"service": {"type": "Bogus"}}, "/service/type"),
    ({"service": {"port": 70000}}, "/service/port"),
    ({"persistence": {"size": "lots"}}, "/persistence/size"),
    ({"persistence": {"accessModes": ["ReadWriteSometimes"]}}, "/persistence/accessModes/0"),
    ({"replicas": 2}, "replicas"),
    ({"upstream": {"url": "registry-1.docker.io"}}, "/upstream/url"),
    ({"upstream": {"url": "https://mirror.example/v2?x=1"}}, "/upstream/url"),
    ({"upstream": {"url": "https://user:pw@mirror.example"}}, "/upstream/url"),
    ({"upstream": {"password": "token-without-user"}}, "/upstream/username"),
    ({"cache": {"tagTTL": "a minute"}}, "/cache/tagTTL"),
    ({"cache": {"maxSizePercent": 120}}, "/cache/maxSizePercent"),
    ({"cache": {"maxSize": "0"}}, "/cache/maxSize"),
    ({"cache": {"maxSize": "0.0Gi"}}, "/cache/maxSize"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"ingress": {"enabled": True, "hosts": []}}, "/ingress/hosts"),
    ({"ingress": {"hosts": [{"host": "h", "paths": [{"path": "no-slash", "pathType": "Prefix"}]}]}},
     "/ingress/hosts/0/paths/0/path"),
    ({"imageCredentials": {"create": True}}, "/imageCredentials"),
])
def test_schema_rejects_bad_values_and_names_the_key(values, where):
    """
    A bad value fails at render (so at install) with a message naming the
    offending key.
    """
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert where in str(caught.value)


def test_schema_accepts_what_the_docs_show():
    """
    The value shapes used in docs/kubernetes.md pass the schema.
    """
    _chart().validate_schema({
        "replicaCount": 3,
        "image": {"repository": "registry.example.com/regcache", "tag": "0.1.0"},
        "upstream": {"existingSecret": "hub", "connectTimeout": "3s",
                     "url": "https://artifactory.example/api/docker/hub"},
        "cache": {"maxStale": "unlimited", "maxSize": "", "tagTTL": "90"},
        "service": {"type": "NodePort", "nodePort": 30500},
        "persistence": {"size": "1.5Ti", "storageClass": "-"},
    })


# --- NOTES.txt ------------------------------------------------------------


def test_notes_print_working_dockerd_and_containerd_snippets():
    """
    NOTES.txt prints a daemon.json that parses and names the mirror URL,
    and a hosts.toml with that URL as a pull/resolve host.
    """
    _, notes = render(SEED)
    url = "https://registry-mirror.example.com"
    daemon = json.loads(re.search(r"^\{\n.*?^\}$", notes, re.S | re.M).group(0))
    assert daemon == {"registry-mirrors": [url]}
    hosts_text = re.search(r'^server = .*?capabilities = \[.*?\]$', notes, re.S | re.M).group(0)
    hosts = tomllib.loads(hosts_text)
    assert hosts["server"] == "https://registry-1.docker.io"
    assert hosts["host"][url]["capabilities"] == ["pull", "resolve"]


def test_notes_point_nodes_at_a_reachable_address_without_ingress():
    """
    Without an Ingress, NOTES gives the in-cluster URL and warns that nodes
    need the Service IP; with a NodePort, the node-port commands.
    """
    _, notes = render({})
    assert f"http://{RELEASE}.{NAMESPACE}.svc.cluster.local:5000" in notes
    assert "clusterIP" in notes
    _, notes = render({"service": {"type": "NodePort"}})
    assert "nodePort" in notes


# --- Logs -----------------------------------------------------------------


def test_logs_are_json_by_default_and_plain_text_on_request():
    """
    By default the container runs the image's twistd command with the JSON
    logger; logFormat text keeps the image's own entrypoint.
    """
    ctr = container(render({})[0])
    assert ctr["command"] == ["twistd", "-n", "--pidfile=", "--logger=regcache.logs.json", "regcache"]
    assert "args" not in ctr
    assert "command" not in container(render({"logFormat": "text"})[0])


def test_helm_test_gets_v2_through_the_service_with_regcache_image():
    """
    `helm test` runs a hook Pod from regcache's own image (no Docker Hub
    pull) that GETs /v2/ through the Service, as locked down as the server.
    """
    objects, _ = render(SEED)
    pod = only(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (ctr,) = pod["spec"]["containers"]
    assert ctr["image"] == container(objects)["image"]
    assert f"http://{RELEASE}:5000/v2/" in ctr["command"][-1]
    compile(ctr["command"][-1], "test-connection", "exec")
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["imagePullSecrets"] == pod_spec(objects)["imagePullSecrets"]


def test_config_values_become_a_mounted_config_file(tmp_path):
    """
    values.config is a ConfigMap mounted into the pod, named by
    REGCACHE_CONFIG, with no single-upstream variables beside it; the
    file it holds is one regcache loads.
    """
    from regcache.config import load

    config = {"upstreams": [
        {"name": "dockerhub", "alias": "dockerhub", "urls": ["https://registry-1.docker.io"]},
        {"name": "ghcr", "alias": "ghcr", "hosts": ["ghcr.io"], "urls": ["https://ghcr.io"]},
    ]}
    objects, _ = render(merged(SEED, {"config": config}))
    variables = env(objects)
    path = variables["REGCACHE_CONFIG"]["value"]
    assert not {"REGCACHE_UPSTREAM", "REGCACHE_USERNAME", "REGCACHE_PASSWORD_FILE"} & set(variables)
    mount = next(m for m in container(objects)["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == mount["name"])
    configmap = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"])
    (tmp_path / "regcache.yaml").write_text(configmap["data"][path.rsplit("/", 1)[1]])
    loaded = load({"config": str(tmp_path / "regcache.yaml")}, {})
    assert [u.name for u in loaded.upstreams] == ["dockerhub", "ghcr"]


def test_config_values_are_checked_by_the_schema():
    """A config without upstreams, or with a policy that is no mapping, fails the chart's schema."""
    for bad, where in (({"upstreams": []}, "/config/upstreams"),
                       ({"upstreams": [{"name": "a", "urls": ["https://a.io"]}], "policy": ["x"]}, "/config/policy")):
        with pytest.raises(helm.errors.HelmValuesError, match=where):
            _chart().validate_schema(merged(SEED, {"config": bad}))


def test_no_config_means_no_configmap():
    """Without values.config there is no ConfigMap and no REGCACHE_CONFIG."""
    objects, _ = render(SEED)
    assert "ConfigMap" not in kinds(objects)
    assert "REGCACHE_CONFIG" not in env(objects)


# --- Client authentication ------------------------------------------------


AUTH = {"existingSecret": "regcache-htpasswd", "secretKey": "users", "anonymous": "cached-only",
        "trustedNetworks": ["10.0.0.0/8", "fd00::/8"], "trustedProxies": ["10.42.0.0/16"]}


def test_auth_values_become_a_mounted_htpasswd_and_settings_regcache_reads(tmp_path):
    """
    auth.existingSecret is mounted as a file (not a subPath, so the kubelet
    updates it and regcache re-reads it) that REGCACHE_HTPASSWD names; the
    networks and the anonymous mode become the variables regcache reads,
    and regcache loads them as given.
    """
    from regcache.config import load

    objects, _ = render(merged(SEED, {"auth": AUTH}))
    variables = env(objects)
    path = variables["REGCACHE_HTPASSWD"]["value"]
    mount = next(m for m in container(objects)["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert "subPath" not in mount and mount["readOnly"]
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "regcache-htpasswd"
    assert volume["secret"]["items"] == [{"key": "users", "path": path.rsplit("/", 1)[1]}]
    given = {name: e["value"] for name, e in variables.items()
             if name in ("REGCACHE_HTPASSWD", "REGCACHE_ANONYMOUS", "REGCACHE_TRUSTED_NETWORKS",
                         "REGCACHE_TRUSTED_PROXIES")}
    auth = load({"storage": str(tmp_path)}, given).auth
    assert (auth.htpasswd, auth.anonymous) == (path, "cached-only")
    assert [str(n) for n in auth.trusted_networks] == AUTH["trustedNetworks"]
    assert [str(n) for n in auth.trusted_proxies] == AUTH["trustedProxies"]


def test_no_auth_values_mean_no_auth():
    """Without auth values no auth variable is set and no htpasswd is mounted: authentication stays off."""
    objects, _ = render(SEED)
    assert not {"REGCACHE_HTPASSWD", "REGCACHE_ANONYMOUS", "REGCACHE_TRUSTED_NETWORKS",
                "REGCACHE_TRUSTED_PROXIES"} & set(env(objects))
    assert "htpasswd" not in {v["name"] for v in pod_spec(objects)["volumes"]}


def test_auth_values_are_checked_by_the_schema():
    """A mode regcache does not know, a network that is a name, or an unknown key fails the chart's schema."""
    for bad, where in (({"anonymous": "open"}, "/auth/anonymous"),
                       ({"trustedNetworks": ["cluster"]}, "/auth/trustedNetworks/0"),
                       ({"htpasswd": "/etc/htpasswd"}, "/auth")):
        with pytest.raises(helm.errors.HelmValuesError, match=where):
            _chart().validate_schema(merged(SEED, {"auth": bad}))


def test_a_config_change_rolls_the_pods():
    """The config file (with its pull policy) is read at start: its checksum is a pod annotation."""
    def annotation(policy):
        config = {"upstreams": [{"name": "dockerhub", "urls": ["https://registry-1.docker.io"]}], "policy": policy}
        objects, _ = render(merged(SEED, {"config": config}))
        workload = next(o for o in objects if o["kind"] == "Deployment")
        return workload["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert annotation({"rules": []}) != annotation({"rules": [{"deny": "**"}]})


# --- A config file's settings are not shadowed ------------------------------


def test_config_file_max_size_is_not_overridden_by_the_chart(tmp_path):
    """
    A max_size in the config file's cache section is the one regcache uses:
    the chart sets no REGCACHE_MAX_SIZE then (an environment variable wins
    over the file), unless cache.maxSize asks for one explicitly.
    """
    from regcache.config import load

    config = {"upstreams": [{"name": "dockerhub", "urls": ["https://registry-1.docker.io"]}],
              "cache": {"max_size": "10Gi"}}
    objects, _ = render(merged(SEED, {"config": config}))
    variables = {name: e["value"] for name, e in env(objects).items() if "value" in e}
    assert "REGCACHE_MAX_SIZE" not in variables
    configmap = only(objects, "ConfigMap")
    (tmp_path / "regcache.yaml").write_text(configmap["data"]["regcache.yaml"])
    variables["REGCACHE_CONFIG"] = str(tmp_path / "regcache.yaml")
    variables["REGCACHE_STORAGE"] = str(tmp_path)
    assert load({}, variables).max_size == 10 * 2 ** 30
    explicit = merged(SEED, {"config": config, "cache": {"maxSize": "20Gi"}})
    assert env(render(explicit)[0])["REGCACHE_MAX_SIZE"]["value"] == "20Gi"
    assert env(render(merged(SEED, {"config": {"upstreams": config["upstreams"]}}))[0])[
        "REGCACHE_MAX_SIZE"]["value"] == "58982Mi"


@pytest.mark.parametrize("section, message", [
    ({"storage": {"backend": "s3"}}, "config.storage"),
    ({"cache": {"storage": "/data"}}, "config.cache.storage"),
])
def test_config_file_settings_the_chart_owns_are_refused(section, message):
    """
    The store's place and backend decide the workload the chart renders
    (its volume, a Deployment or StatefulSet), so a config file that sets
    them, which the chart's variables would silently override, fails with
    the value to use instead.
    """
    config = merged({"upstreams": [{"name": "dockerhub", "urls": ["https://registry-1.docker.io"]}]}, section)
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(merged(SEED, {"config": config}))


# --- The shared level (storage.backend s3) ---------------------------------


STORAGE_ENV = {"REGCACHE_STORAGE_BACKEND", "REGCACHE_ADVERTISE", "POD_IP"}


def test_local_backend_renders_no_shared_level():
    """
    The default backend is local: no variable of the shared level, no
    PodDisruptionBudget, autoscaler or SeaweedFS, and scale-out stays a
    StatefulSet.
    """
    for values in ({}, SEED, SCALE_OUT):
        objects, _ = render(values)
        names = set(env(objects))
        assert not STORAGE_ENV & names and not [n for n in names if n.startswith("REGCACHE_S3_")]
        assert not {"PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"} & set(kinds(objects))
        assert "seaweedfs" not in json.dumps(objects)
    assert "StatefulSet" in kinds(render(SCALE_OUT)[0])


def test_shared_level_is_a_deployment_of_replicas_behind_the_plain_service():
    """
    With s3 the pods keep nothing of their own worth a stable identity: a
    Deployment (never the StatefulSet) of replicaCount pods, rolled one new
    pod at a time, no claim, no headless Service, and the one Service
    selects them all.
    """
    objects, _ = render(SHARED)
    deployment = only(objects, "Deployment", RELEASE)
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "StatefulSet" not in kinds(objects)
    assert "PersistentVolumeClaim" not in kinds(objects)
    (service,) = [o for o in objects if o["kind"] == "Service"]
    assert service["spec"].get("clusterIP") != "None"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())


def test_shared_pods_spread_across_nodes_and_zones():
    """
    topologySpreadConstraints spread the pods over nodes and zones, so a
    preempted node or a lost zone takes few of them; ScheduleAnyway by
    default, so a small cluster still runs them all.
    """
    spec = pod_spec(render(SHARED)[0])
    constraints = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    assert set(constraints) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    deployment = only(render(SHARED)[0], "Deployment")
    for c in constraints.values():
        assert c["whenUnsatisfiable"] == "ScheduleAnyway"
        assert c["maxSkew"] == 1
        assert c["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    strict = pod_spec(render(merged(SHARED, {"topologySpread": {"whenUnsatisfiable": "DoNotSchedule"}}))[0])
    assert {c["whenUnsatisfiable"] for c in strict["topologySpreadConstraints"]} == {"DoNotSchedule"}
    off = pod_spec(render(merged(SHARED, {"topologySpread": {"enabled": False}}))[0])
    assert "topologySpreadConstraints" not in off


def test_shared_level_one_is_a_sized_emptydir_with_max_size_below_it():
    """
    Each pod's own store is an emptyDir capped at storage.local.size, and
    regcache evicts at maxSizePercent of it, so the kubelet never evicts
    the pod for filling it; persistence.size does not apply.
    """
    objects, _ = render(SHARED)
    data = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "data")
    assert data == {"name": "data", "emptyDir": {"sizeLimit": "20Gi"}}
    assert env(objects)["REGCACHE_MAX_SIZE"]["value"] == "18432Mi"   # 20 * 1024 * 0.9
    mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
    assert mounts["/var/lib/registry"] == "data"


def test_shared_level_one_can_be_a_generic_ephemeral_volume():
    """
    storage.local.volume ephemeral gives each pod a claim of its own from a
    StorageClass (a local SSD class, say), made and deleted with the pod.
    """
    objects, _ = render(merged(SHARED, {"storage": {"local": {"volume": "ephemeral",
                                                              "storageClass": "local-ssd"}}}))
    data = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "data")
    claim = data["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "local-ssd"
    assert claim["accessModes"] == ["ReadWriteOnce"]
    assert claim["resources"]["requests"]["storage"] == "20Gi"
    assert "PersistentVolumeClaim" not in kinds(objects)


def resolved_env(objects, tmp_path):
    """
    The container's environment as the kubelet would give it to regcache:
    secretKeyRefs read from the rendered Secret (or a stand-in for one the
    user manages), $(POD_IP) expanded, and mounted secret files written
    under tmp_path with their variables pointing there.
    """
    secrets = {o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in o["data"].items()}
               for o in objects if o["kind"] == "Secret"}
    secrets.setdefault("regcache-gcs-hmac", {"accessKey": "GOOG1EMANAGED", "secretKey": "managed-secret"})
    spec = pod_spec(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    out = {}
    for e in container(objects)["env"]:
        source = e.get("valueFrom", {})
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            out[e["name"]] = secrets[ref["name"]][ref["key"]]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "status.podIP"
            out[e["name"]] = "10.8.0.7"
        else:
            out[e["name"]] = e["value"].replace("$(POD_IP)", out.get("POD_IP", "$(POD_IP)"))
    for mount in container(objects)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if not secret:
            continue
        for item in secret["items"]:
            path = f"{mount['mountPath']}/{item['path']}"
            local = tmp_path / mount["name"] / item["path"]
            local.parent.mkdir(exist_ok=True)
            local.write_text(secrets.get(secret["secretName"], {}).get(item["key"], "file-from-a-managed-secret"))
            for name, value in out.items():
                if value == path:
                    out[name] = str(local)
    out["REGCACHE_STORAGE"] = str(tmp_path / "store")
    return out


def test_shared_settings_reach_regcache_as_it_loads_them(tmp_path):
    """
    The bucket's endpoint, name, region, prefix, size limit, sweep
    interval and redirect flag, the credentials (the access key from a secretKeyRef, the secret
    key as a mounted file), the lease settings and the address peers
    forward to (the pod IP from the downward API) are what regcache's own
    config loader makes of the pod's environment.
    """
    from regcache.config import load

    objects, _ = render(MODES["shared-everything"])
    shared = load({}, resolved_env(objects, tmp_path)).shared
    bucket = shared.bucket
    assert (bucket.endpoint, bucket.bucket, bucket.region, bucket.prefix) == (
        "https://storage.googleapis.com", "example-regcache", "auto", "regcache/")
    assert (bucket.access_key, bucket.secret_key) == ("GOOG1EEXAMPLE", "hmac-secret")
    assert shared.advertise == "http://10.8.0.7:5000"
    assert shared.redirect is True
    assert (shared.max_size, shared.sweep_interval) == (2 * 2 ** 40, 900.0)
    assert (shared.lease_ttl, shared.redis) == (20.0, "redis://redis:6379")
    variables = env(objects)
    assert "REGCACHE_S3_SECRET_KEY" not in variables
    assert [e["name"] for e in container(objects)["env"]].index("POD_IP") < \
        [e["name"] for e in container(objects)["env"]].index("REGCACHE_ADVERTISE")
    plain = load({}, resolved_env(render(SHARED)[0], tmp_path)).shared
    assert (plain.redirect, plain.lease_ttl, plain.redis, plain.bucket.prefix, plain.sweep_interval) == (
        False, 30.0, None, "", 300.0)
    assert plain.bucket.access_key == "GOOG1EMANAGED"


def test_shared_credentials_stay_in_their_secret():
    """
    Keys given as values land only in the chart's Secret, whose checksum
    rolls the pods when they change; with existingSecret the chart makes
    none and reads the named keys from it.
    """
    values = MODES["shared-everything"]
    objects, notes = render(values)
    secret = only(objects, "Secret", f"{RELEASE}-s3")
    assert base64.b64decode(secret["data"]["secretKey"]).decode() == "hmac-secret"
    encoded = base64.b64encode(b"hmac-secret").decode()
    for obj in objects:
        if obj is not secret:
            assert "hmac-secret" not in json.dumps(obj) and encoded not in json.dumps(obj), obj["kind"]
    assert "hmac-secret" not in notes

    def checksum(v):
        return only(render(v)[0], "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/s3-secret"]

    assert checksum(values) != checksum(merged(values, {"storage": {"s3": {"secretKey": "rotated"}}}))
    managed = merged(SHARED, {"storage": {"s3": {"accessKeyKey": "id", "secretKeyKey": "key"}}})
    objects, _ = render(managed)
    assert "Secret" not in kinds(objects)
    assert env(objects)["REGCACHE_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "regcache-gcs-hmac", "key": "id"}
    volume = next(v for v in pod_spec(objects)["volumes"] if v.get("secret", {}).get("secretName")
                  == "regcache-gcs-hmac")
    assert [i["key"] for i in volume["secret"]["items"]] == ["key"]


def test_shared_and_seaweedfs_pods_write_only_their_stores_and_tmp():
    """
    With a read-only root, a shared-level pod writes its level-1 store and
    /tmp only (the key is a read-only mount), and SeaweedFS its data claim
    and /tmp; both run as the locked-down user the server does.
    """
    objects, _ = render(MODES["shared-everything"])
    mounts = container(objects)["volumeMounts"]
    assert sorted(m["mountPath"] for m in mounts if not m.get("readOnly")) == ["/tmp", "/var/lib/registry"]
    objects, _ = render(SEAWEEDFS)
    spec = seaweed(objects)["spec"]["template"]["spec"]
    (ctr,) = spec["containers"]
    assert sorted(m["mountPath"] for m in ctr["volumeMounts"] if not m.get("readOnly")) == ["/data", "/tmp"]
    assert spec["securityContext"] == pod_spec(objects)["securityContext"]
    assert ctr["securityContext"] == container(objects)["securityContext"]
    assert spec["automountServiceAccountToken"] is False


def test_shared_pod_disruption_budget_keeps_all_but_one_up():
    """
    With more than one replica a PodDisruptionBudget lets a drain take one
    pod at a time (maxUnavailable 1 by default); one replica gets none,
    since a budget for it would block every drain.
    """
    objects, _ = render(SHARED)
    pdb = only(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == only(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert "PodDisruptionBudget" not in kinds(render(merged(SHARED, {"replicaCount": 1}))[0])
    two = only(render(merged(SHARED, {"podDisruptionBudget": {"maxUnavailable": 2}}))[0], "PodDisruptionBudget")
    assert two["spec"]["maxUnavailable"] == 2
    assert "PodDisruptionBudget" not in kinds(render(merged(SHARED, {"podDisruptionBudget": {"enabled": False}}))[0])


def test_shared_autoscaler_is_optional_and_owns_the_replica_count():
    """
    autoscaling.enabled adds an autoscaling/v2 HorizontalPodAutoscaler on
    CPU for the Deployment, which then leaves replicas to it (an upgrade
    would otherwise reset the count); off by default.
    """
    assert "HorizontalPodAutoscaler" not in kinds(render(SHARED)[0])
    objects, _ = render(MODES["shared-everything"])
    hpa = only(objects, "HorizontalPodAutoscaler")
    deployment = only(objects, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "replicas" not in deployment["spec"]
    assert "PodDisruptionBudget" in kinds(objects)


def test_autoscaler_needs_the_shared_level():
    """
    Each pod count change moves keys between the StatefulSet's volumes and
    costs cold misses: the chart refuses an autoscaler without s3.
    """
    with pytest.raises(helm.HelmError, match="autoscaling.enabled needs storage.backend s3"):
        render(merged(SCALE_OUT, {"autoscaling": {"enabled": True}}))


def test_shared_ingress_hashing_is_an_optional_locality_hint():
    """
    With s3 any pod can answer any request, so the Ingress hashes nothing
    by default; scaleOut.localityHint turns the URI hashing back on, so a
    digest mostly lands on the pod whose level-1 store has it.
    """
    annotations = only(render(SHARED)[0], "Ingress")["metadata"].get("annotations", {})
    assert "nginx.ingress.kubernetes.io/upstream-hash-by" not in annotations
    hinted = only(render(MODES["shared-everything"])[0], "Ingress")
    assert hinted["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$uri"


def test_shared_level_works_through_an_external_name_service():
    """
    Without hashing an Ingress in another namespace can reach the pods
    through one Service address: the combination scale-out refuses is
    fine with s3.
    """
    objects, _ = render(merged(SHARED, {"externalNameService": {"enabled": True, "namespace": "ingress"}}))
    assert only(objects, "Ingress")["metadata"]["namespace"] == "ingress"


# --- SeaweedFS in the chart --------------------------------------------------


def seaweed(objects):
    return only(objects, "StatefulSet", f"{RELEASE}-seaweedfs")


def test_seaweedfs_is_a_statefulset_with_a_volume_running_weed_mini():
    """
    seaweedfs.enabled runs `weed mini` (master, volume, filer and S3 in one
    process) from chrislusf/seaweedfs in a one-pod StatefulSet whose data
    is a claim of seaweedfs.persistence.size, creating the bucket at start,
    with its admin UI, WebDAV, telemetry and extra gateways off, logging
    to the kubelet rather than to files.
    """
    objects, _ = render(SEAWEEDFS)
    sts = seaweed(objects)
    assert sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    (ctr,) = sts["spec"]["template"]["spec"]["containers"]
    assert ctr["image"].startswith("chrislusf/seaweedfs:")
    argv = ctr["command"] + ctr["args"]
    assert argv[:3] == ["/usr/bin/weed", "-logtostderr=true", "mini"]   # no log files in /tmp
    flags = dict(a.lstrip("-").split("=", 1) for a in argv[3:])
    assert flags["bucket"] == "regcache"
    assert (flags["admin.ui"], flags["webdav"], flags["master.telemetry"]) == ("false", "false", "false")
    assert (flags["s3.port.iceberg"], flags["s3.port.lance"]) == ("0", "0")
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    assert mounts[flags["dir"]]["name"] == claim["metadata"]["name"]
    config_dir, config_file = flags["s3.config"].rsplit("/", 1)
    assert mounts[config_dir]["readOnly"] is True
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(e["name"] == "GOMEMLIMIT" for e in ctr["env"])


def test_regcache_points_at_the_in_chart_seaweedfs_with_its_credentials(tmp_path):
    """
    With seaweedfs.enabled regcache's endpoint is SeaweedFS's Service, its
    bucket the one SeaweedFS creates, and its keys the identity in
    SeaweedFS's S3 config, made by the chart when none are given.
    """
    from regcache.config import load

    objects, _ = render(SEAWEEDFS)
    sts = seaweed(objects)
    service = only(objects, "Service", f"{RELEASE}-seaweedfs")
    (port,) = service["spec"]["ports"]
    shared = load({}, resolved_env(objects, tmp_path)).shared
    assert shared.bucket.endpoint == f"http://{service['metadata']['name']}:{port['port']}"
    assert shared.bucket.bucket == "regcache"
    assert shared.redirect is False
    (ctr,) = sts["spec"]["template"]["spec"]["containers"]
    flags = dict(a.lstrip("-").split("=", 1) for a in ctr["args"][2:])
    assert int(flags["s3.port"]) == next(p["containerPort"] for p in ctr["ports"] if p["name"] == port["targetPort"])
    volume_name = next(m["name"] for m in ctr["volumeMounts"]
                       if flags["s3.config"].startswith(m["mountPath"] + "/"))
    volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == volume_name)
    secret = only(objects, "Secret", volume["secret"]["secretName"])
    item = next(i for i in volume["secret"]["items"] if i["path"] == flags["s3.config"].rsplit("/", 1)[1])
    identities = json.loads(base64.b64decode(secret["data"][item["key"]]))
    (identity,) = identities["identities"]
    assert identity["credentials"] == [{"accessKey": shared.bucket.access_key,
                                        "secretKey": shared.bucket.secret_key}]
    assert len(shared.bucket.secret_key) >= 32
    assert {"Read", "Write", "List"} <= set(identity["actions"])
    assert "Admin" not in identity["actions"]   # weed makes the bucket; regcache never needs to
    given = render(merged(SEAWEEDFS, {"storage": {"s3": {"accessKey": "mine", "secretKey": "my-secret-key"}}}))[0]
    shared = load({}, resolved_env(given, tmp_path)).shared
    assert (shared.bucket.access_key, shared.bucket.secret_key) == ("mine", "my-secret-key")


def test_seaweedfs_is_reached_by_regcache_pods_only():
    """
    SeaweedFS's Service selects its own pod and never regcache's (nor does
    regcache's Service select SeaweedFS); a NetworkPolicy admits only
    regcache's pods, on the S3 port, since weed's other ports (master,
    filer, admin) listen too.
    """
    objects, _ = render(SEAWEEDFS)
    pod_labels = seaweed(objects)["spec"]["template"]["metadata"]["labels"]
    regcache_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]

    def selects(selector, labels):
        return all(labels.get(k) == v for k, v in selector.items())

    store = only(objects, "Service", f"{RELEASE}-seaweedfs")
    assert selects(store["spec"]["selector"], pod_labels)
    assert not selects(store["spec"]["selector"], regcache_labels)
    assert not selects(only(objects, "Service", RELEASE)["spec"]["selector"], pod_labels)
    policy = only(objects, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert selects(peer["podSelector"]["matchLabels"], regcache_labels)
    assert rule["ports"] == [{"port": "s3", "protocol": "TCP"}]
    assert "NetworkPolicy" not in kinds(render(merged(SEAWEEDFS, {"seaweedfs": {"networkPolicy": False}}))[0])


# --- The shared level's values in the schema ---------------------------------


@pytest.mark.parametrize("values, where", [
    ({"storage": {"backend": "gcs"}}, "/storage/backend"),
    ({"storage": {"backend": "s3", "s3": {"existingSecret": "k", "bucket": "mirror-cache"}}}, "/storage/s3"),
    ({"storage": {"backend": "s3", "s3": {"existingSecret": "k", "endpoint": "https://s3.example"}}}, "/storage/s3"),
    ({"storage": {"backend": "s3", "s3": {"endpoint": "s3.example", "bucket": "mirror-cache", "existingSecret": "k"}}},
     "/storage/s3/endpoint"),
    ({"storage": {"backend": "s3", "s3": {"endpoint": "https://s3.example", "bucket": "mirror-cache"}}}, "/storage/s3"),
    ({"storage": {"s3": {"maxSize": "lots"}}}, "/storage/s3/maxSize"),
    ({"storage": {"s3": {"sweepInterval": "often"}}}, "/storage/s3/sweepInterval"),
    ({"storage": {"leases": {"ttl": "soon"}}}, "/storage/leases/ttl"),
    ({"storage": {"leases": {"redis": "http://redis:6379"}}}, "/storage/leases/redis"),
    ({"storage": {"local": {"volume": "hostPath"}}}, "/storage/local/volume"),
    ({"storage": {"local": {"size": "big"}}}, "/storage/local/size"),
    ({"storage": {"advertise": "10.0.0.1:5000"}}, "/storage/advertise"),
    ({"topologySpread": {"whenUnsatisfiable": "Sometimes"}}, "/topologySpread/whenUnsatisfiable"),
    ({"podDisruptionBudget": {"maxUnavailable": 0}}, "/podDisruptionBudget/maxUnavailable"),
    ({"autoscaling": {"maxReplicas": 0}}, "/autoscaling/maxReplicas"),
    ({"seaweedfs": {"enabled": True}}, "/storage/backend"),
    ({"storage": {"backend": "s3", "s3": {"existingSecret": "k"}}, "seaweedfs": {"enabled": True}},
     "/storage/s3/existingSecret"),
    ({"storage": {"backend": "s3", "s3": {"endpoint": "https://s3.example"}}, "seaweedfs": {"enabled": True}},
     "/storage/s3/endpoint"),
    ({"seaweedfs": {"persistence": {"size": "huge"}}}, "/seaweedfs/persistence/size"),
])
def test_schema_rejects_bad_shared_level_values_and_names_the_key(values, where):
    """
    The shared level's values fail at install with the key named: an
    unknown backend, s3 without a bucket, an endpoint or credentials
    (unless SeaweedFS provides them), a bad size, duration or URL, and
    SeaweedFS without the s3 backend or with settings it makes itself.
    """
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert where in str(caught.value)


def test_schema_accepts_the_shared_level_the_docs_show():
    """
    The shared-level shapes used in docs/kubernetes.md pass the schema:
    S3 with keys as values, GCS with an existing Secret, the in-chart
    SeaweedFS with nothing else.
    """
    for values in (
        {"replicaCount": 3, "storage": {"backend": "s3", "s3": {
            "endpoint": "https://s3.eu-west-1.amazonaws.com", "bucket": "mirror-cache", "region": "eu-west-1",
            "accessKey": "AKIAEXAMPLE", "secretKey": "s", "redirect": True, "maxSize": "1Ti"}}},
        {"storage": {"backend": "s3", "advertise": "http://[$(POD_IP)]:5000", "s3": {
            "endpoint": "https://storage.googleapis.com", "bucket": "mirror-cache", "region": "auto",
            "existingSecret": "hmac"}, "leases": {"ttl": "30s", "redis": "redis://redis:6379/0"}},
         "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8,
                         "targetCPUUtilizationPercentage": 60}},
        {"storage": {"backend": "s3"}, "seaweedfs": {"enabled": True}},
    ):
        _chart().validate_schema(values)


def test_notes_describe_the_shared_level_and_warn_of_what_cannot_work():
    """
    NOTES.txt names the bucket the pods share (not the scale-out caveats
    of per-pod volumes), warns that redirects to the in-chart SeaweedFS
    point at a name nodes cannot resolve, and that keys the chart made up
    are new on every render without a cluster to look them up in.
    """
    _, notes = render(SHARED)
    assert "3 pods share the bucket example-regcache at https://storage.googleapis.com" in notes
    assert "own cache volume" not in notes
    _, notes = render(merged(SEAWEEDFS, {"storage": {"s3": {"redirect": True}}}))
    assert "WARNING: storage.s3.redirect" in notes
    assert "made up" in notes
    _, notes = render(merged(SEAWEEDFS, {"storage": {"s3": {"accessKey": "a", "secretKey": "b"}}}))
    assert "WARNING" not in notes and "made up" not in notes
    _, notes = render(MODES["shared-everything"])
    assert "3 to 9 pods" in notes
