"""deploy/: Kubernetes manifests, compose file and Dockerfile, checked offline.

The Kustomize overlays are rendered by a small renderer that implements only the kustomization
fields deploy/k8s uses (resources, namespace, labels, images, JSON 6902 patches) and refuses any
other, then every object is validated against the Kubernetes JSON schemas shipped in
kubernetes-validate (strict: unknown fields fail) for the oldest and newest versions we support.
On top of the schemas, the tests check the wiring a schema cannot see: probes, selectors,
references between objects, and that every COLGRID_* variable is a real setting.
"""
from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from colgrid_server.config import ENV_PREFIX, Settings
from colgrid_server.encoders.bundled import DEFAULT_ENCODER_NAME

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
# Oldest: native gRPC probes are GA from 1.27 and the preStop `sleep` action from 1.30.
KUBERNETES_VERSIONS = ("1.30", "1.37")
SETTINGS_ENV = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
GRPC_PORT = Settings().port
SERVER_CONTAINER = "colgrid"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")

# ---------------------------------------------------------------------------- kustomize subset

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}


def render(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build directory`, for the subset of kustomize that deploy/k8s uses, applied in
    kustomize's order: resources, patches, namespace, labels, images."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(spec) - SUPPORTED_FIELDS
    assert not unsupported, f"{directory}: kustomization fields this renderer does not implement: {unsupported}"
    assert spec["kind"] == "Kustomization"
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else load_yaml_objects(path)
    for patch in spec.get("patches", []):
        assert set(patch) == {"target", "patch"} and set(patch["target"]) == {"kind", "name"}, patch
        matches = [o for o in objects if (o["kind"], o["metadata"]["name"]) == (patch["target"]["kind"],
                                                                                 patch["target"]["name"])]
        assert len(matches) == 1, f"{directory}: patch target {patch['target']} matches {len(matches)} objects"
        operations = yaml.safe_load(patch["patch"])
        assert isinstance(operations, list), "only JSON 6902 patches (a list of operations) are supported"
        for operation in operations:
            json_patch(matches[0], operation)
    if "namespace" in spec:
        for obj in objects:
            obj["metadata"]["namespace"] = spec["namespace"]
    for entry in spec.get("labels", []):
        assert set(entry) == {"pairs"}, "labels: only `pairs` (metadata labels, no selectors) are supported"
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in spec.get("images", []):
        assert set(image) <= {"name", "newName", "newTag"}, image
        for container in all_containers(objects):
            if re.fullmatch(re.escape(image["name"]) + r"([:@].*)?", container["image"]):
                tag = image.get("newTag") or container["image"].partition(":")[2]
                container["image"] = image.get("newName", image["name"]) + (f":{tag}" if tag else "")
    return objects


def json_patch(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) on `document`, in place."""
    op, path = operation["op"], operation["path"]
    assert op in ("add", "replace", "remove"), f"unsupported patch op {op}"
    keys = [k.replace("~1", "/").replace("~0", "~") for k in path.lstrip("/").split("/")]
    parent: Any = document
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, copy.deepcopy(operation["value"]))
            return
        assert index < len(parent), f"{path} does not exist"
    else:
        index = last
        assert op == "add" or last in parent, f"{op} {path}: the path does not exist"
    if op == "remove":
        del parent[index]
    else:
        parent[index] = copy.deepcopy(operation["value"])


def load_yaml_objects(path: Path) -> list[dict[str, Any]]:
    return [obj for obj in yaml.safe_load_all(path.read_text()) if obj]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def all_containers(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            spec = pod_spec(obj)
            yield from spec.get("initContainers", [])
            yield from spec["containers"]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def server_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(one(objects, "Deployment", "colgrid"))["containers"]
    return next(c for c in containers if c["name"] == SERVER_CONTAINER)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def secret_examples() -> list[dict[str, Any]]:
    return load_yaml_objects(K8S / "base" / "secret.example.yaml")


# ------------------------------------------------------------------------------- the renderer

def test_renderer_applies_json_patches_like_rfc6902():
    doc = {"a": {"b": [1, 2]}, "c~d/e": 1}
    json_patch(doc, {"op": "add", "path": "/a/b/-", "value": 3})
    json_patch(doc, {"op": "add", "path": "/a/b/0", "value": 0})
    json_patch(doc, {"op": "replace", "path": "/c~0d~1e", "value": 2})
    json_patch(doc, {"op": "remove", "path": "/a/b/1"})
    assert doc == {"a": {"b": [0, 2, 3]}, "c~d/e": 2}
    with pytest.raises(AssertionError):
        json_patch(doc, {"op": "replace", "path": "/missing", "value": 1})


def test_renderer_refuses_kustomization_fields_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("kind: Kustomization\nnamePrefix: x-\nresources: []\n")
    with pytest.raises(AssertionError, match="namePrefix"):
        render(tmp_path)


# ------------------------------------------------------------------------------ schemas

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes(overlay, version):
    name, objects = overlay
    assert objects, f"overlay {name} rendered nothing"
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_secret_examples_are_valid_kubernetes(secret_examples, version):
    for obj in secret_examples:
        kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_rejects_an_unknown_field():
    """The strict schemas are what make the validation above worth something."""
    objects = render(K8S / "overlays" / "prod")
    deployment = copy.deepcopy(one(objects, "Deployment", "colgrid"))
    pod_spec(deployment)["containers"][0]["readinessprobe"] = {"grpc": {"port": GRPC_PORT}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_overlays_set_their_namespace_and_instance_label(overlay):
    name, objects = overlay
    namespaces = {o["metadata"].get("namespace") for o in objects}
    assert len(namespaces) == 1 and None not in namespaces
    assert all(o["metadata"]["labels"]["app.kubernetes.io/instance"] == f"colgrid-{name}" for o in objects)


# ----------------------------------------------------------------------------- the server pods

def test_probes_are_grpc_health_checks_on_the_grpc_port(overlay):
    _, objects = overlay
    container = server_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == GRPC_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": ports["grpc"]}, probe
    # Liveness must not kill a pod that is still loading versions: the startup probe gates it.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_every_pod_runs_as_non_root_without_privilege_escalation(overlay):
    _, objects = overlay
    for obj in objects:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        security = pod_spec(obj)["securityContext"]
        assert security["runAsNonRoot"] is True, obj["metadata"]["name"]
        assert security["runAsUser"] > 0
        for container in pod_spec(obj)["containers"] + pod_spec(obj).get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_server_pods_run_as_the_image_user_on_a_read_only_root(overlay):
    _, objects = overlay
    spec = pod_spec(one(objects, "Deployment", "colgrid"))
    assert spec["securityContext"]["runAsUser"] == int(dockerfile_user().split(":")[0])
    for container in spec["containers"] + spec["initContainers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # What the server writes goes to volumes: the data dir (seeded from the image), /tmp (hnswlib
    # graphs load through temp files) and $HOME (onnxruntime's ~/.cache).
    mounts = {m["mountPath"] for m in server_container(objects)["volumeMounts"]}
    assert {dockerfile_env()["COLGRID_DATA_DIR"], "/tmp", dockerfile_env()["HOME"]} <= mounts
    seed = spec["initContainers"][0]
    assert seed["command"][-2] == dockerfile_env()["COLGRID_DATA_DIR"] + "/."
    seed_volume = next(m["name"] for m in seed["volumeMounts"] if m["mountPath"] == seed["command"][-1].rstrip("/"))
    data_volume = next(m["name"] for m in server_container(objects)["volumeMounts"]
                       if m["mountPath"] == dockerfile_env()["COLGRID_DATA_DIR"])
    assert seed_volume == data_volume


def test_the_server_image_is_the_overlay_image(overlay):
    name, objects = overlay
    spec = pod_spec(one(objects, "Deployment", "colgrid"))
    images = {c["image"] for c in spec["containers"] + spec["initContainers"]}
    assert len(images) == 1
    image = images.pop()
    assert image == {"dev": "colgrid:dev", "prod": "registry.example.com/colgrid:0.1.0"}[name]


def test_deployment_leaves_the_replica_count_to_the_autoscaler(overlay):
    _, objects = overlay
    assert "replicas" not in one(objects, "Deployment", "colgrid")["spec"]


def test_termination_grace_covers_prestop_and_the_drain(overlay):
    _, objects = overlay
    spec = pod_spec(one(objects, "Deployment", "colgrid"))
    config = one(objects, "ConfigMap", "colgrid-config")["data"]
    pre_stop = server_container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(config["COLGRID_GRACE_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 5


def test_replicas_report_under_their_pod_names(overlay):
    _, objects = overlay
    env = {e["name"]: e for e in server_container(objects)["env"]}
    assert env["COLGRID_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


# ----------------------------------------------------------------------- references between objects

def test_pod_disruption_budget_selects_the_server_pods(overlay):
    _, objects = overlay
    deployment = one(objects, "Deployment", "colgrid")
    pdb = one(objects, "PodDisruptionBudget", "colgrid")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selects(selector, deployment["spec"]["template"]["metadata"]["labels"])


def test_autoscaler_targets_the_deployment(overlay):
    _, objects = overlay
    hpa = one(objects, "HorizontalPodAutoscaler", "colgrid")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "colgrid"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Utilization targets are relative to requests: the container must request CPU.
    assert "cpu" in server_container(objects)["resources"]["requests"]


def test_each_service_selects_the_pods_of_exactly_one_workload(overlay):
    _, objects = overlay
    workloads = [o for o in objects if o["kind"] in WORKLOAD_KINDS]
    for service in (o for o in objects if o["kind"] == "Service"):
        name, selector = service["metadata"]["name"], service["spec"]["selector"]
        chosen = [w for w in workloads if selects(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert len(chosen) == 1, f"service {name} selects {len(chosen)} workloads"
        container_ports = {p["name"]: p["containerPort"] for c in pod_spec(chosen[0])["containers"]
                           for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in container_ports or target in container_ports.values(), (name, target)


def test_server_service_exposes_grpc_and_metrics(overlay):
    _, objects = overlay
    ports = {p["name"]: p for p in one(objects, "Service", "colgrid")["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}
    assert ports["grpc"]["port"] == container_ports["grpc"] == GRPC_PORT
    assert ports["metrics"]["port"] == container_ports["metrics"] == int(dockerfile_env()["COLGRID_METRICS_PORT"])


def test_statefulset_names_its_governing_service(overlay):
    _, objects = overlay
    postgres = one(objects, "StatefulSet", "colgrid-postgres")
    service = one(objects, "Service", postgres["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], postgres["spec"]["template"]["metadata"]["labels"])


def test_config_and_secret_references_resolve(overlay, secret_examples):
    """Every ConfigMap / Secret a pod reads exists with that key: in the overlay, or (for the
    Secrets prod creates out of band) in base/secret.example.yaml."""
    _, objects = overlay
    available = {(o["kind"], o["metadata"]["name"]): o for o in [*secret_examples, *objects]}

    def keys(kind: str, name: str) -> set[str]:
        obj = available.get((kind, name))
        assert obj is not None, f"{kind}/{name} is referenced but defined nowhere"
        return set(obj.get("data", {})) | set(obj.get("stringData", {}))

    for container in all_containers(objects):
        for source in container.get("envFrom", []):
            keys("ConfigMap", source["configMapRef"]["name"])
        for var in container.get("env", []):
            ref = var.get("valueFrom", {})
            for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if field in ref:
                    assert ref[field]["key"] in keys(kind, ref[field]["name"]), var["name"]
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            for volume in pod_spec(obj).get("volumes", []):
                if "secret" in volume:
                    keys("Secret", volume["secret"]["secretName"])


def test_registry_url_reaches_the_postgres_service_with_its_password():
    dev = render(K8S / "overlays" / "dev")
    secrets = [one(dev, "Secret", "colgrid-secrets"),
               one(load_yaml_objects(K8S / "base" / "secret.example.yaml"), "Secret", "colgrid-secrets")]
    postgres = one(dev, "StatefulSet", "colgrid-postgres")
    env = {e["name"]: e for e in pod_spec(postgres)["containers"][0]["env"]}
    service = one(dev, "Service", "colgrid-postgres")
    for secret in secrets:
        url = urlparse(secret["stringData"]["registry-url"])
        assert url.scheme == "postgresql"
        assert url.hostname == service["metadata"]["name"]
        assert url.port == service["spec"]["ports"][0]["port"]
        assert url.username == env["POSTGRES_USER"]["value"]
        assert url.path.lstrip("/") == env["POSTGRES_DB"]["value"]
        password_key = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"]
        assert url.password == secret["stringData"][password_key]


def test_dev_object_storage_is_the_in_cluster_s3_service():
    dev = render(K8S / "overlays" / "dev")
    config = one(dev, "ConfigMap", "colgrid-config")["data"]
    endpoint = urlparse(config["AWS_ENDPOINT_URL"])
    service = one(dev, "Service", endpoint.hostname)
    assert endpoint.port == service["spec"]["ports"][0]["port"]
    assert config["COLGRID_STORAGE_URL"].startswith("s3://")


def test_prod_turns_api_keys_on_from_the_mounted_secret():
    prod = render(K8S / "overlays" / "prod")
    path = Path(one(prod, "ConfigMap", "colgrid-config")["data"]["COLGRID_API_KEYS_FILE"])
    container = server_container(prod)
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    volume = next(v for v in pod_spec(one(prod, "Deployment", "colgrid"))["volumes"] if v["name"] == mount["name"])
    example = one(load_yaml_objects(K8S / "base" / "secret.example.yaml"), "Secret", volume["secret"]["secretName"])
    assert path.name in example["stringData"]
    assert "COLGRID_API_KEYS_FILE" not in one(render(K8S / "overlays" / "dev"), "ConfigMap", "colgrid-config")["data"]


def test_api_key_file_example_is_a_key_file_the_server_reads(secret_examples):
    from colgrid_server.security import parse_keys

    example = one(secret_examples, "Secret", "colgrid-api-keys")["stringData"]["api-keys.json"]
    keys = parse_keys(example, source="secret.example.yaml")
    assert {role for key in keys for role in key.roles} == {"search", "admin"}


def test_every_colgrid_variable_in_the_manifests_is_a_setting(overlay):
    _, objects = overlay
    names = set(one(objects, "ConfigMap", "colgrid-config")["data"])
    for container in all_containers(objects):
        names |= {e["name"] for e in container.get("env", [])}
    colgrid = {n for n in names if n.startswith(ENV_PREFIX)}
    assert colgrid, "no COLGRID_* variables found"
    assert colgrid <= SETTINGS_ENV, f"not settings: {sorted(colgrid - SETTINGS_ENV)}"


def test_config_map_values_load_as_settings(overlay):
    _, objects = overlay
    data = one(objects, "ConfigMap", "colgrid-config")["data"]
    settings = Settings.load(environ=data)
    assert settings.storage_url == data["COLGRID_STORAGE_URL"]
    assert settings.grace_seconds == float(data["COLGRID_GRACE_SECONDS"])


def test_the_version_cache_budget_fits_the_data_volume_with_room_to_spare(overlay):
    _, objects = overlay
    settings = Settings.load(environ=one(objects, "ConfigMap", "colgrid-config")["data"])
    (data,) = [v for v in pod_spec(one(objects, "Deployment", "colgrid"))["volumes"] if v["name"] == "data"]
    size_limit = data["emptyDir"]["sizeLimit"]
    assert size_limit.endswith("Gi")
    assert 0 < settings.storage_cache_max_gb <= 0.75 * float(size_limit.removesuffix("Gi"))


# ------------------------------------------------------------------------------------ compose

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def colgrid_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("image", "").startswith("colgrid:")}


def test_compose_runs_two_replicas_of_the_image_built_from_the_dockerfile(compose):
    replicas = {n: s for n, s in colgrid_services(compose).items() if "ports" in s}
    assert len(replicas) == 2
    ids = {s["environment"]["COLGRID_REPLICA_ID"] for s in replicas.values()}
    assert len(ids) == 2
    for service in colgrid_services(compose).values():  # each builds it: compose never pulls it
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    host_ports = [p.split(":")[0] for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))


def test_compose_services_name_an_image_and_wait_on_defined_healthy_services(compose):
    services = compose["services"]
    for name, service in services.items():
        assert service.get("image"), f"{name} has no image"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on undefined {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
    for name in colgrid_services(compose):
        if "ports" in services[name]:
            assert services[name]["healthcheck"]["test"][:2] == ["CMD", "/usr/local/bin/docker-entrypoint.sh"]


def test_compose_colgrid_variables_are_settings(compose):
    for name, service in colgrid_services(compose).items():
        colgrid = {k for k in service["environment"] if k.startswith(ENV_PREFIX)}
        assert colgrid <= SETTINGS_ENV, f"{name}: not settings: {sorted(colgrid - SETTINGS_ENV)}"
        Settings.load(environ={k: str(v) for k, v in service["environment"].items()})


def test_compose_registry_and_storage_point_at_services_they_wait_for(compose):
    services = compose["services"]
    for name, service in colgrid_services(compose).items():
        env = service["environment"]
        endpoint = urlparse(env["AWS_ENDPOINT_URL"])
        assert service["depends_on"][endpoint.hostname]["condition"] == "service_healthy", name
        if "ports" not in service:
            continue  # the one-shot bucket job reads no registry
        url = urlparse(env["COLGRID_REGISTRY_URL"])
        db = services[url.hostname]["environment"]
        assert (url.username, url.password, url.path.lstrip("/"), url.port) == (
            db["POSTGRES_USER"], db["POSTGRES_PASSWORD"], db["POSTGRES_DB"], 5432)
        assert service["depends_on"][url.hostname]["condition"] == "service_healthy", name


# ------------------------------------------------------------------------------------ Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            result.append((instruction.upper(), args.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def dockerfile_user() -> str:
    return [args for name, args in final_stage() if name == "USER"][-1]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in final_stage():
        if name == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(args))
    return env


def test_dockerfile_runs_as_a_numeric_non_root_user():
    uid, _, gid = dockerfile_user().partition(":")
    assert uid.isdigit() and int(uid) > 0, "USER must be numeric for runAsNonRoot to verify it"
    assert gid.isdigit() and int(gid) > 0


def test_dockerfile_entrypoint_is_the_executable_script_it_copies():
    stage = final_stage()
    entrypoint = yaml.safe_load([args for name, args in stage if name == "ENTRYPOINT"][-1])
    copies = [args.split() for name, args in stage if name == "COPY"]
    source = next(c[-2] for c in copies if c[-1] == entrypoint[0])
    script = ROOT / source
    assert script == DEPLOY / "docker-entrypoint.sh"
    assert script.is_file() and script.stat().st_mode & 0o111, "docker-entrypoint.sh must be executable"
    assert script.read_text().startswith("#!/usr/bin/env bash")


def test_dockerfile_exposes_the_grpc_and_metrics_ports_it_configures():
    exposed = {int(p) for name, args in final_stage() if name == "EXPOSE" for p in args.split()}
    env = dockerfile_env()
    assert exposed == {int(env["COLGRID_PORT"]), int(env["COLGRID_METRICS_PORT"])} == {GRPC_PORT, 9090}


def test_dockerfile_settings_are_settings():
    env = dockerfile_env()
    colgrid = {k for k in env if k.startswith(ENV_PREFIX)}
    assert colgrid <= SETTINGS_ENV, sorted(colgrid - SETTINGS_ENV)
    settings = Settings.load(environ=env)
    assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"


def test_dockerfile_pins_the_torch_the_project_pins():
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert set(re.findall(r"torch==([\w.]+)", dockerfile)) == {pinned}


def test_dockerfile_bakes_the_encoder_where_the_server_looks_for_it():
    from colgrid_server.encoders.bundled import default_encoder_dir

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    expected = default_encoder_dir(Path(dockerfile_env()["COLGRID_DATA_DIR"]))
    assert f"colgrid encoder export --out {expected} --name {DEFAULT_ENCODER_NAME}" in dockerfile


def test_dockerfile_copies_only_what_exists_and_the_build_context_allows():
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for name, args in dockerfile_instructions():
        if name != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), source
            assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"
