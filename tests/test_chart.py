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
    workload = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
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
