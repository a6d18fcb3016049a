"""cluster/ checked offline with the validators the real tools use.

Launcher configs: Ray's `prepare_config` + `validate_config` (what `ray up` runs before any cloud call). KubeRay
manifests: the CRDs' v1 OpenAPI schemas via jsonschema, a strict walker for undeclared keys (jsonschema lets typos
through; `kubectl apply` does not), and Ray's KubeRay autoscaler translation. Pods and node types fit the instance
types they name. Cross-references: one image (the Dockerfile's, on the Ray pin), roles, storage and secrets agree
across files; the RayJob's job is in the image and fits its cluster.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from cluster_files import (
    CLUSTER,
    GPU_MEMORY_GIB,
    INSTANCE_TYPES,
    KUBERAY,
    LAUNCHER,
    NODES,
    REPO,
    ROLES,
    VALIDATION,
    _rename,
    _set,
    all_roles,
    cluster_spec,
    dockerfile,
    entrypoint_job,
    gpu_demand,
    load,
    misfits,
    node_roles,
    pod_specs,
    ray_up_validate,
)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_ray_validation_scales_from_zero_and_fits_its_instances(name):
    prepared = ray_up_validate(load(name))
    assert prepared["provider"]["type"] == name.removesuffix(".yaml")
    workers = [t for n, t in prepared["available_node_types"].items() if n != prepared["head_node_type"]]
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers)
    assert sum(t["max_workers"] for t in workers) <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0
    for node_type, node in load(name)["available_node_types"].items():
        node_config, resources = node["node_config"], node["resources"]
        vcpus, _, gpus = INSTANCE_TYPES[node_config.get("InstanceType") or node_config["machineType"]]
        assert resources["CPU"] <= vcpus, f"{node_type}: {resources['CPU']} CPUs on a {vcpus}-vCPU instance"
        assert resources.get("GPU", 0) == gpus, f"{node_type}: the instance has {gpus} GPUs"


BROKEN_LAUNCHER = {   # case -> (mutation, exception, message)
    "unknown top-level key": (_set("idle_timeout_minute", value=5), VALIDATION, "'idle_timeout_minute' was unexp"),
    "max_workers as a string": (_set("max_workers", value="10"), VALIDATION, "'10' is not of type 'integer'"),
    "typo in a node type": (_rename(NODES, "gpu_learner", "max_workers", to="max_worker"), VALIDATION,
                            "'max_worker' was unexpected"),
    "fractional custom resource": (_set(NODES, "gpu_inference", "resources", "inference", value=0.5), VALIDATION,
                                   "0.5 is not of type 'integer'"),
    "head type not defined": (_set("head_node_type", value="ray_head"), ValueError, "must be one of"),
    "min_workers above max_workers": (_set(NODES, "gpu_inference", "min_workers", value=11), ValueError,
                                      "smaller than the sum of `min_workers`"),
}


@pytest.mark.parametrize("name", LAUNCHER)
@pytest.mark.parametrize("case", sorted(BROKEN_LAUNCHER))
def test_ray_validation_rejects_broken_launcher_config(name, case):
    mutate, error, message = BROKEN_LAUNCHER[case]
    config = load(name)
    mutate(config)
    with pytest.raises(error, match=re.escape(message)):
        ray_up_validate(config)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_runs_the_image_shares_the_token_and_starts_ray(name):
    config = load(name)
    commands = config["initialization_commands"] + config["setup_commands"] + config["worker_setup_commands"]
    commands += [c for node in config["available_node_types"].values() for c in node.get("initialization_commands", [])]
    assert not [c for c in commands if "pip install" in c], "rayuid and its dependencies come from the image"
    sdk = {"aws.yaml": "boto3", "gcp.yaml": "google-api-python-client"}[name]
    assert any(sdk in cmd for cmd in config["head_setup_commands"]), "the head's autoscaler needs the cloud SDK"
    assert not [c for c in config["head_setup_commands"] if re.search(r"rayuid|vllm|-e |\.\[", c)]
    assert "." not in config["file_mounts"].values(), "the code is in the image; jobs bring theirs (--working-dir)"
    head, worker = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    assert "--head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    env = dict(opt.removeprefix("--env ").split("=", 1) for opt in config["docker"]["run_options"]
               if opt.startswith("--env "))
    assert env["RAY_AUTH_MODE"] == "token"
    token_dir = str(Path(env["RAY_AUTH_TOKEN_PATH"]).parent).replace("/home/ray", "~")
    assert token_dir in config["file_mounts"], "the token file must be synced to every node"


def test_aws_nodes_have_instance_profiles_and_the_policy_is_documented():
    config = load("aws.yaml")
    head = config["head_node_type"]
    profiles = {name: node["node_config"]["IamInstanceProfile"] for name, node in config[NODES].items()}
    assert all(set(p) & {"Name", "Arn"} for p in profiles.values()), profiles
    assert all(p != profiles[head] for name, p in profiles.items() if name != head), "workers need no EC2 rights"
    readme = (CLUSTER / "README.md").read_text()
    assert all(a in readme for a in ("ssm:GetParameters", "iam:PassRole", "s3:PutObject", "s3:ListBucket"))
    granted = re.findall(r"arn:aws:ssm:([\w-]+)::parameter(/[\w/.-]*)\*", readme)
    for node in config[NODES].values():   # EC2 resolves a resolve:ssm: AMI with the caller's (the head's) rights
        parameter = node["node_config"]["ImageId"].removeprefix("resolve:ssm:")
        assert any(region == config["provider"]["region"] and parameter.startswith(prefix)
                   for region, prefix in granted), f"README grants no ssm:GetParameters on {parameter}"


def test_gcp_service_accounts_can_write_storage_and_disks_are_in_the_provider_zone():
    config = load("gcp.yaml")
    zone, emails = config["provider"]["availability_zone"], {}
    scopes = {"https://www.googleapis.com/auth/" + s for s in ("cloud-platform", "devstorage.read_write")}
    for name, node in config[NODES].items():
        (account,) = node["node_config"]["serviceAccounts"]
        assert set(account["scopes"]) & scopes, f"{name}: the default scopes make GCS read-only"
        emails[name] = account["email"]
        for disk in node["node_config"]["disks"]:
            disk_type = disk["initializeParams"].get("diskType", f"zones/{zone}/")
            assert disk_type.startswith(f"zones/{zone}/"), disk_type
    assert emails.pop(config["head_node_type"]) not in emails.values(), "workers need no Compute Engine rights"


def test_custom_resources_agree_across_files():
    for name, (head, roles) in all_roles().items():
        assert not set(head) & ({"GPU"} | set(ROLES)), f"{name}: the head must not attract engines or learners"
        assert set(roles) == set(ROLES), name
        assert roles["learner"][0] == ROLES["learner"], f"{name}: a learner node must have 8 GPUs"
        assert roles["inference"][0] >= ROLES["inference"], name


def test_one_rayuid_image_on_the_project_ray_pin():
    found = {(name, load(name)["docker"]["image"]) for name in LAUNCHER}
    found |= {(name, c["image"]) for name in KUBERAY for pod in pod_specs(name).values() for c in pod["containers"]}
    images = {image for _, image in found}
    assert len(images) == 1, f"set the same image everywhere: {sorted(found)}"
    assert re.fullmatch(r"[\w.-]+(/[\w.-]+)*/rayuid:[\w.-]+", images.pop()), "the image built from the Dockerfile"
    pins = [re.search(rf"^{pin}([\d.]+)$", (REPO / f).read_text(), re.MULTILINE)
            for f, pin in (("requirements-cpu.txt", r"ray\[default\]=="), ("requirements-cuda.txt", r"ray=="))]
    assert all(pins), "both requirement files pin ray"
    version = pins[0].group(1)
    assert pins[1].group(1) == version
    base = re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py3(\d+)-gpu", dockerfile("BASE"))
    assert base, dockerfile("BASE")
    assert f"CPython 3.{base.group(1)}" in (REPO / "requirements-cuda.txt").read_text(), "lock and base: one Python"
    for name in KUBERAY:
        assert cluster_spec(f"kuberay/{name}")["rayVersion"] == version


def test_rayjob_job_is_in_the_image_and_fits_its_cluster():
    from rayuid.config import load_config

    job, overrides = entrypoint_job()
    assert re.search(r"^COPY jobs jobs$", (REPO / "Dockerfile").read_text(), re.MULTILINE), "jobs/ in the image"
    assert (REPO / job).is_file(), f"{job} is not in jobs/"
    config = load_config(REPO / job, overrides)
    assert config.ray is not None, f"{job} has no `ray:` block: it would not use the cluster"
    _, roles = all_roles()["kuberay/rayjob.yaml"]
    assert misfits(gpu_demand(config.ray), roles) == []


def test_ray_jobs_fit_every_cluster():
    from rayuid.config import load_config

    jobs = [p for p in sorted((REPO / "jobs").glob("*.yaml")) if "ray" in (yaml.safe_load(p.read_text()) or {})]
    problems = [f"{path.name} on {cluster}: {problem}" for path in jobs for cluster, (_, roles) in all_roles().items()
                for problem in misfits(gpu_demand(load_config(path).ray), roles)]
    assert problems == []


def test_the_gpu_memory_jobs_are_sized_for_is_what_the_node_types_have():
    """Each GPU role's `gpu_memory_gib` (what rayuid.system.capacity checks against) is at most the GPU memory of
    every instance type that advertises the role's node resource in cluster/'s launcher files."""
    from rayuid.config import load_config

    def role_of(resources: dict) -> str | None:
        return next((r for r in ROLES if r in resources), None)

    smallest: dict[str, float] = {}
    for name in LAUNCHER:
        for node in load(name)["available_node_types"].values():
            if role := role_of(node["resources"]):
                instance = node["node_config"].get("InstanceType") or node["node_config"]["machineType"]
                smallest[role] = min(smallest.get(role, float("inf")), GPU_MEMORY_GIB[instance])
    assert set(smallest) == set(ROLES)
    sized = []
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        if "ray" not in (yaml.safe_load(path.read_text()) or {}):
            continue                                    # runtime_env.yaml, the single-process offline jobs
        r = load_config(path).ray
        for res in [r.learner, r.engine, r.user, r.judge]:
            if res.num_gpus > 0 and res.gpu_memory_gib and (role := role_of(res.resources)):
                sized.append(path.name)
                assert res.gpu_memory_gib <= smallest[role], f"{path.name}: {res}"
    assert len(sized) >= 10


def test_capacity_check_catches_a_job_too_big():
    from rayuid.config import RaySettings

    roles = node_roles(load("aws.yaml"))[1]
    fits = RaySettings(learners=8, learner={"num_gpus": 1}, rollout_workers=6, engine={"num_gpus": 1, "num_cpus": 2})
    too_big = RaySettings(learners=4, learner={"num_gpus": 8}, engine={"num_gpus": 1, "num_cpus": 16})
    assert misfits(gpu_demand(fits), roles) == []
    assert misfits(gpu_demand(too_big), roles) == [
        "learner: 4 actors > 2 nodes x 1 per node", "inference: an actor (1.0 GPU, 16.0 CPU) > a node (1 GPU, 4 CPU)"]
