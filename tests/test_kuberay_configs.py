"""KubeRay manifests (cluster/kuberay/) against the CRDs' v1 OpenAPI schemas (jsonschema, plus a strict walker for
undeclared keys: jsonschema lets typos through, `kubectl apply` does not), Ray's KubeRay autoscaler translation,
and the pods: the image, secrets, the model cache, sizes that fit the instance types they select."""

from __future__ import annotations

import re

import jsonschema
import pytest
import yaml
from cluster_files import (
    CRD_DIR,
    DNS_LABEL,
    GKE_TYPES,
    INSTANCE_LABEL,
    INSTANCE_TYPES,
    KUBERAY,
    _drop,
    _rename,
    _set,
    cluster_spec,
    dockerfile,
    entrypoint_job,
    kuberay_autoscaler_view,
    load,
    pod_specs,
    storage,
)


def openapi_to_jsonschema(node):
    """OpenAPI v3 `nullable` -> a JSON Schema type list; everything else (x-kubernetes-*) jsonschema ignores."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: openapi_to_jsonschema(value) for key, value in node.items()}
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def crd_schemas() -> dict:
    """{manifest: (v1 openAPIV3Schema, jsonschema validator for it)}; skips when the CRDs are absent."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (the shared data folder is not next to the repo)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # the CRDs are large: libyaml when available
    schemas = {}
    for manifest, crd_file in KUBERAY.items():
        crd = yaml.load((CRD_DIR / crd_file).read_text(), Loader=loader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = v1["schema"]["openAPIV3Schema"]
        converted = openapi_to_jsonschema(schema)
        jsonschema.Draft7Validator.check_schema(converted)
        schemas[manifest] = (schema, jsonschema.Draft7Validator(converted))
    return schemas


def schema_errors(doc: dict, validator: jsonschema.Draft7Validator) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def undeclared_keys(value, schema: dict, path: str = "") -> list[str]:
    """Keys not in `properties` where the schema lists properties and leaves no room for others."""
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [bad for i, item in enumerate(value) for bad in undeclared_keys(item, schema["items"], f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    open_ended = schema.get("x-kubernetes-preserve-unknown-fields") is True or extra is True
    found = []
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if props is not None and key in props:
            found += undeclared_keys(item, props[key], where)
        elif isinstance(extra, dict):
            found += undeclared_keys(item, extra, where)
        elif props is not None and not open_ended:
            found.append(where)
    return found


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_manifest_matches_crd(name, crd_schemas):
    doc = load(f"kuberay/{name}")
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[name]
    schema, validator = crd_schemas[name]
    assert schema_errors(doc, validator) == []
    assert undeclared_keys(doc, schema) == []


WORKERS = ("spec", "workerGroupSpecs")


JOB_WORKERS = ("spec", "rayClusterSpec", "workerGroupSpecs")


CONTAINER = ("template", "spec", "containers", 0)


BROKEN_KUBERAY = {   # case -> (manifest, mutation, jsonschema error or None, strict-walker finding or None)
    "typo enableInTreeAutoscalling": ("raycluster.yaml", _rename("spec", "enableInTreeAutoscaling",
                                      to="enableInTreeAutoscalling"), None, "spec.enableInTreeAutoscalling"),
    "typo in a pod container": ("raycluster.yaml", _rename(*WORKERS, 1, *CONTAINER, "resources", to="resource"),
                                None, "spec.workerGroupSpecs[1].template.spec.containers[0].resource"),
    "upscalingMode not in enum": ("raycluster.yaml", _set("spec", "autoscalerOptions", "upscalingMode",
                                  value="Fast"), "'Fast' is not one of ['Default', 'Aggressive'", None),
    "maxReplicas as a string": ("raycluster.yaml", _set(*WORKERS, 0, "maxReplicas", value="8"),
                                "spec.workerGroupSpecs.0.maxReplicas: '8' is not of type 'integer'", None),
    "typo shutdownAfterJobFinish": ("rayjob.yaml", _rename("spec", "shutdownAfterJobFinishes",
                                    to="shutdownAfterJobFinish"), None, "spec.shutdownAfterJobFinish"),
    "worker group without groupName": ("rayjob.yaml", _drop(*JOB_WORKERS, 0, "groupName"),
                                       "'groupName' is a required property", None),
    "GPU limit not a quantity": ("rayjob.yaml", _set(*JOB_WORKERS, 1, *CONTAINER, "resources", "limits",
                                 "nvidia.com/gpu", value="eight"), "limits.nvidia.com/gpu: 'eight' does not match",
                                 None),
}


@pytest.mark.parametrize("case", sorted(BROKEN_KUBERAY))
def test_crd_validators_reject_broken_copies(case, crd_schemas):
    """Each validator catches its own kind of mistake; jsonschema alone lets typos in field names through."""
    name, mutate, schema_error, walker_finding = BROKEN_KUBERAY[case]
    doc = load(f"kuberay/{name}")
    mutate(doc)
    schema, validator = crd_schemas[name]
    errors = schema_errors(doc, validator)
    assert any(schema_error in e for e in errors) if schema_error else errors == []
    assert undeclared_keys(doc, schema) == ([walker_finding] if walker_finding else [])


def test_ray_rejects_unquoted_kuberay_resources():
    spec = cluster_spec("kuberay/raycluster.yaml")
    spec["workerGroupSpecs"][0]["rayStartParams"]["resources"] = '{"inference": 1}'
    with pytest.raises(ValueError):   # json.JSONDecodeError: KubeRay's format is '"{\"inference\": 1}"'
        kuberay_autoscaler_view(spec)


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_autoscaling_and_auth(name):
    doc = load(f"kuberay/{name}")
    spec = cluster_spec(f"kuberay/{name}")
    assert DNS_LABEL.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    idle_minutes = kuberay_autoscaler_view(spec)["idle_timeout_minutes"]
    assert idle_minutes == spec["autoscalerOptions"]["idleTimeoutSeconds"] / 60 > 0
    assert all(DNS_LABEL.match(group["groupName"]) for group in spec["workerGroupSpecs"])
    if spec.get("authOptions", {}).get("mode") == "token":   # KubeRay refuses token auth below Ray 2.52
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52)


def pod_requests(pod: dict, extra: list[dict]) -> tuple[float, float, float]:
    """(CPUs, memory GiB, GPUs) a pod requests; each container must request what it is limited to."""
    from ray.autoscaler._private.kuberay.utils import parse_quantity  # Kubernetes quantities: 500m, 48Gi

    total = [0.0, 0.0, 0.0]
    for resources in [c["resources"] for c in pod["containers"]] + extra:
        assert resources["requests"] == resources["limits"], "Ray sizes itself from the limits"
        for i, key in enumerate(("cpu", "memory", "nvidia.com/gpu")):
            total[i] += float(parse_quantity(str(resources["requests"].get(key, 0))))
    return total[0], total[1] / 2**30, total[2]


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_pods_fit_their_nodes(name):
    autoscaler = cluster_spec(f"kuberay/{name}")["autoscalerOptions"]["resources"]   # a sidecar in the head pod
    for group, pod in pod_specs(name).items():
        cpus, memory, gpus = pod_requests(pod, [autoscaler] if group == "head" else [])
        selected = pod.get("nodeSelector", {}).get(INSTANCE_LABEL)
        assert selected in GKE_TYPES, f"{group}: no nodeSelector on a known instance type ({selected})"
        for node_type in (selected, GKE_TYPES[selected]):   # kubelet reservation + DaemonSets need room
            vcpus, node_memory, node_gpus = INSTANCE_TYPES[node_type]
            assert cpus <= vcpus - 0.5 and memory <= 0.9 * node_memory, f"{group}: {cpus} CPU, {memory} GiB"
            assert gpus == node_gpus, f"{group}: {gpus} GPUs on a {node_gpus}-GPU {node_type}"
        if gpus:
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_containers_run_the_image_with_secrets_and_the_model_cache(name):
    assert "ray.io/overwrite-container-cmd" not in load(f"kuberay/{name}")["metadata"].get("annotations", {})
    docs = storage()
    secret, claim = docs["Secret"], docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"], "one cache for all nodes"
    for group, pod in pod_specs(name).items():
        assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"], group   # S3 through IRSA
        volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        for container in pod["containers"]:
            assert not set(container) & {"command", "args"}, f"{group}: KubeRay's own ray start, nothing before it"
            assert "pip install" not in yaml.safe_dump(container), group
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            assert mounts.get(dockerfile("HF_HOME")) == claim, f"{group}: the shared model cache at HF_HOME"
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
            for ref in (refs["HF_TOKEN"], refs["WANDB_API_KEY"]):
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], ref


def test_rayjob_keeps_results_in_object_storage_and_cleans_up():
    doc = load("kuberay/rayjob.yaml")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    # The submitter pod has no checkout and the image has the code: nothing to upload.
    assert "working_dir" not in (yaml.safe_load(spec["runtimeEnvYAML"]) or {})
    _, overrides = entrypoint_job()
    (run_dir,) = [o.removeprefix("run_dir=") for o in overrides if o.startswith("run_dir=")]
    assert re.fullmatch(r"(s3|gs)://[\w.-]+/.+", run_dir), "results must outlive the cluster"
    assert run_dir.rstrip("/").endswith("/" + doc["metadata"]["name"]), "one run_dir per RayJob"
