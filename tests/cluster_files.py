"""What the cluster/ tests share: the files, their node roles as Ray's autoscalers read them, the instance types
the docs name, and a job's demand against a cluster."""

from __future__ import annotations

import copy
import math
import re
import shlex
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]


CLUSTER = REPO / "cluster"


CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "external" / "kuberay-crds"


LAUNCHER = ["aws.yaml", "gcp.yaml"]


KUBERAY = {"raycluster.yaml": "ray.io_rayclusters.yaml", "rayjob.yaml": "ray.io_rayjobs.yaml"}


# Custom resource marking a GPU node role -> GPUs such a node must have (inference: at least this many).
ROLES = {"inference": 1, "learner": 8}


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# Instance types the files name -> (vCPUs, memory GiB, GPUs). GCP's "GB" of machine memory are GiB (memoryMb/1024).
INSTANCE_TYPES = {"m6i.4xlarge": (16, 64, 0), "g6e.xlarge": (4, 32, 1), "g6e.2xlarge": (8, 64, 1),
                  "p5.48xlarge": (192, 2048, 8), "n2-standard-16": (16, 64, 0), "g2-standard-8": (8, 32, 1),
                  "a3-highgpu-8g": (208, 1872, 8)}


# GPU instance types -> memory of one GPU in GiB (what `gpu_memory_gib` in jobs/ must not exceed): L40S 48 GB,
# L4 24 GB, H100 80 GB (nvidia-smi's MiB / 1024).
GPU_MEMORY_GIB = {"g6e.xlarge": 44.7, "g6e.2xlarge": 44.7, "g2-standard-8": 22.5, "p5.48xlarge": 79.6,
                  "a3-highgpu-8g": 79.6}


# The GKE machine types the KubeRay pods must also fit (cluster/README.md: on GKE only the nodeSelectors change).
GKE_TYPES = {"m6i.4xlarge": "n2-standard-16", "g6e.2xlarge": "g2-standard-8", "p5.48xlarge": "a3-highgpu-8g"}


INSTANCE_LABEL = "node.kubernetes.io/instance-type"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def cluster_spec(name: str) -> dict:
    doc = load(name)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(name: str) -> dict[str, dict]:
    """{group name ("head" for the head group): pod spec} of a KubeRay manifest."""
    spec = cluster_spec(f"kuberay/{name}")
    groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    return {group: g["template"]["spec"] for group, g in groups.items()}


def dockerfile(key: str) -> str:
    """The repo Dockerfile's ARG BASE, WORKDIR or HF_HOME value."""
    patterns = {"BASE": r"^ARG BASE=(\S+)", "WORKDIR": r"^WORKDIR (\S+)", "HF_HOME": r"HF_HOME=(\S+)"}
    return re.search(patterns[key], (REPO / "Dockerfile").read_text(), re.MULTILINE).group(1)


def storage() -> dict[str, dict]:
    """{kind: document} of kuberay/storage.yaml."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all((CLUSTER / "kuberay/storage.yaml").read_text())}


def ray_up_validate(config: dict) -> dict:
    """What `ray up` does to a config before any cloud call (ray.autoscaler._private.commands._bootstrap_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _walk(doc, keys):
    for key in keys:
        doc = doc[key]
    return doc


def _set(*keys, value):
    return lambda doc: _walk(doc, keys[:-1]).__setitem__(keys[-1], value)


def _rename(*keys, to: str):
    return lambda doc: _walk(doc, keys[:-1]).__setitem__(to, _walk(doc, keys[:-1]).pop(keys[-1]))


def _drop(*keys):
    return lambda doc: _walk(doc, keys[:-1]).pop(keys[-1])


NODES = "available_node_types"


VALIDATION = jsonschema.ValidationError


def node_roles(config: dict) -> tuple[dict, dict]:
    """(head resources, {role: (GPUs, CPUs per node, max nodes)}) of an autoscaler config (launcher or KubeRay's)."""
    types, head = config["available_node_types"], config["head_node_type"]
    roles = {}
    for name, node in types.items():
        if name != head:
            (role,) = set(node["resources"]) & set(ROLES)   # exactly one role per GPU node type
            roles[role] = (node["resources"]["GPU"], node["resources"]["CPU"], node["max_workers"])
    return types[head]["resources"], roles


def kuberay_autoscaler_view(spec: dict) -> dict:
    """Ray's own translation of a RayCluster spec into the autoscaler config (validate_config included)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    return _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "rayuid", "namespace": "default"},
                                                   "spec": copy.deepcopy(spec)})


def all_roles() -> dict[str, tuple[dict, dict]]:
    """Node roles of all four files; the KubeRay ones as Ray's KubeRay autoscaler reads them."""
    views = {name: node_roles(load(name)) for name in LAUNCHER}
    views.update({f"kuberay/{name}": node_roles(kuberay_autoscaler_view(cluster_spec(f"kuberay/{name}")))
                  for name in KUBERAY})
    return views


def entrypoint_job() -> tuple[str, list[str]]:
    """(the job file relative to the repo, overrides) of the RayJob, which names the job's path in the image."""
    words = shlex.split(load("kuberay/rayjob.yaml")["spec"]["entrypoint"])
    in_image = f"{dockerfile('WORKDIR')}/jobs/"
    assert words[:2] == ["rayuid", "train"] and words[2].startswith(in_image) and words[2].endswith(".yaml")
    return "jobs/" + words[2].removeprefix(in_image), words[3:]


def gpu_demand(ray) -> dict[str, tuple[float, float, int]]:
    """{node role: (GPUs, CPUs per actor, actors)} for a job's `ray:` block; a GPU user simulator or judge counts on
    the node role its custom resource names (a 32B user/judge sits on the 80 GB learner GPUs)."""
    learners, engines = ray.learners, ray.rollout_workers + ray.teacher_workers
    for extra, replicas in ((ray.user, ray.user_workers), (ray.judge, ray.judge_workers)):
        if extra.num_gpus > 0:
            if "learner" in extra.resources:
                learners += replicas
            else:
                engines += replicas
    return {"learner": (ray.learner.num_gpus, ray.learner.num_cpus, learners),
            "inference": (ray.engine.num_gpus, ray.engine.num_cpus, engines)}


def misfits(demand: dict, roles: dict) -> list[str]:
    problems = []
    for role, (gpus, cpus, actors) in demand.items():
        node_gpus, node_cpus, max_nodes = roles[role]
        if gpus <= 0:
            continue   # CPU-only actors fit any node, the head included
        per_node = min(math.floor(node_gpus / gpus), math.floor(node_cpus / cpus) if cpus > 0 else math.inf)
        if per_node < 1:
            problems.append(f"{role}: an actor ({gpus} GPU, {cpus} CPU) > a node ({node_gpus} GPU, {node_cpus} CPU)")
        elif per_node * max_nodes < actors:
            problems.append(f"{role}: {actors} actors > {max_nodes} nodes x {per_node} per node")
    return problems
