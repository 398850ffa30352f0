"""cluster/: the Ray cluster-launcher YAML validates against the schema that ships with Ray, the
KubeRay RayJob has the fields KubeRay requires, and the sweep command both run loads as written."""
import json
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def _sweep_args(command: str) -> list[str]:
    """The arguments after ``python -m orchestrator.sweep`` in a shell command."""
    words = shlex.split(command.replace("\\\n", " ").replace("\\", " "))
    return words[words.index("orchestrator.sweep") + 1:]


def _loads(args: list[str], tmp_path) -> None:
    """The command line parses (the sweep's own parser) and the sweep loads with its overrides."""
    from orchestrator.sweep import parser
    from orchestrator.sweeping.spec import load_sweep

    ns = parser().parse_intermixed_args(args)
    spec = load_sweep(ns.sweep, ns.overrides, cwd=ROOT)
    assert spec.storage.remote and spec.storage.uri == "s3://BUCKET/sweeps"
    assert spec.file.scaling.use_gpu and spec.file.scaling.gpus_per_worker == 0.25
    assert spec.file.tracking.uri.startswith("http://")
    from orchestrator.sweep import plan_resources

    # two 4-CPU, 1-GPU workers and an 8-CPU head: seven quarter-GPU trials beside the evaluator,
    # one CPU each, so four fit one worker's CPUs
    assert plan_resources(spec, {"CPU": 16.0, "GPU": 2.0}) == (7, 1.0, 1)


def test_the_launcher_yaml_validates_against_rays_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any("g5" in t["node_config"]["InstanceType"] for t in types.values())      # GPU workers
    assert config["file_mounts"] == {"~/softdimo": "."}
    setup = " && ".join(config["setup_commands"])
    assert "pip install -q -e '.[s3]'" in setup and "python -m orchestrator.prepare" in setup
    assert any(c.startswith("ray start --head") for c in config["head_start_ray_commands"])
    assert any("mlflow server" in c and "s3://BUCKET/" in c for c in config["head_start_ray_commands"])
    # the sweep command in the file's header, as a user copies it
    header = "\n".join(line[1:] for line in (CLUSTER / "aws-gpu.yaml").read_text().splitlines()
                       if line.startswith("#"))
    command = header.split("ray exec cluster/aws-gpu.yaml --tmux '", 1)[1].split("'", 1)[0]
    _loads(_sweep_args(command.replace('$(hostname -I | cut -d" " -f1)', "10.0.0.1")), tmp_path)


def test_the_rayjob_has_what_kuberay_requires(tmp_path):
    docs = [d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m orchestrator.sweep ")
    cluster = spec["rayClusterSpec"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["groupName"] and "rayStartParams" in w and w["template"]["spec"]["containers"]
                           for w in workers)
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for w in workers
               for c in w["template"]["spec"]["containers"])
    # the MLflow server the entrypoint names is a Service of the same file
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert "sweep.tracking.uri=http://mlflow:5000" in spec["entrypoint"] and "mlflow" in services
    _loads(_sweep_args(spec["entrypoint"]), tmp_path)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}" in dockerfile and "orchestrator.prepare" in dockerfile
