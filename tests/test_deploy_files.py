"""The deployment files of deploy/ checked without running them: the Dockerfile by hadolint, the Kubernetes
manifests by kubernetes-validate's bundled schemas (strict) and yamllint, the systemd unit by
`systemd-analyze verify`, the Ray Serve sample by compiling it; and what ties them to r1serve: /health as the
probe, SIGTERM's grace period inside the orchestrator's, the autoscaler's metric one that r1serve exports."""

from __future__ import annotations

import configparser
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from r1serve.server.metrics import _ENGINE_GAUGES
from r1serve.server.settings import ServerSettings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "k8s"
SCHEMA_CHECKED = [*sorted(K8S.glob("*.yaml")), K8S / "monitoring" / "prometheus-adapter-rules.yaml"]
BACKSTOP_S = 10  # what the server's shutdown takes after the grace period (launcher.SHUTDOWN_BACKSTOP_S)


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (the `test` extra installs it)")
    return found


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def container_flag(container: dict[str, Any], flag: str) -> str:
    return next(arg.split("=", 1)[1] for arg in container["args"] if arg.startswith(flag + "="))


def test_the_dockerfile_passes_hadolint_and_a_root_one_does_not(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    done = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\n")  # untagged, unpinned, no --no-install-recommends
    assert subprocess.run([hadolint, str(bad)], capture_output=True).returncode != 0


def test_the_image_runs_as_a_user_on_cuda_with_models_as_a_volume_and_health_as_its_check() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-runtime-", text, re.M)
    assert re.search(r"^USER 1000:1000$", text, re.M) and 'VOLUME ["/models"]' in text
    assert "HF_HOME=/models/hf" in text and "/health" in text.split("HEALTHCHECK", 1)[1]
    assert "download.pytorch.org/whl/cu" in text and "/src[deploy]" in text


def test_the_manifests_pass_the_bundled_kubernetes_schemas_strictly() -> None:
    done = subprocess.run([tool("kubernetes-validate"), "--strict", *map(str, SCHEMA_CHECKED)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == sum(len(documents(p)) for p in SCHEMA_CHECKED)


def test_the_yaml_files_pass_yamllint() -> None:
    config = "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}"
    done = subprocess.run([tool("yamllint"), "--strict", "-d", config, str(K8S)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _r1serve_container() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = documents(K8S / "deployment.yaml")[0]
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_the_deployment_probes_health_requests_a_gpu_and_outwaits_the_grace_period() -> None:
    pod, container = _r1serve_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    grace = float(container_flag(container, "--shutdown-grace-period"))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + BACKSTOP_S
    settings = ServerSettings(model=container_flag(container, "--model"), port=int(container_flag(container, "--port")))
    assert container["ports"][0]["containerPort"] == settings.port


def test_service_monitor_and_autoscaler_point_at_the_replicas_and_an_exported_metric() -> None:
    labels = documents(K8S / "deployment.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    service = documents(K8S / "service.yaml")[0]
    assert service["spec"]["selector"] == labels
    monitor = documents(K8S / "monitoring" / "servicemonitor.yaml")[0]
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    hpa = documents(K8S / "hpa.yaml")[0]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in {name for name, _, _ in _ENGINE_GAUGES} and metric == "r1serve_num_requests_waiting"
    rules = yaml.safe_load(documents(K8S / "monitoring" / "prometheus-adapter-rules.yaml")[0]["data"]["config.yaml"])
    assert rules["rules"][0]["name"]["as"] == metric
    assert hpa["spec"]["scaleTargetRef"]["name"] == documents(K8S / "deployment.yaml")[0]["metadata"]["name"]


def test_the_router_finds_the_replicas_by_their_label() -> None:
    labels = documents(K8S / "deployment.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    router = next(d for d in documents(K8S / "router.yaml") if d["kind"] == "Deployment")
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    selector = args[args.index("--selector") + 1]
    assert selector == "{}={}".format(*next(iter(labels.items()))) and "--policy=cache_aware" in args


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "r1serve.service").read_text().replace("\\\n", " "))
    return unit


def test_the_systemd_unit_stops_with_sigterm_after_the_grace_period_and_restarts_on_failure() -> None:
    service = _unit()["Service"]
    grace = float(re.search(r"--shutdown-grace-period (\S+)", service["ExecStart"]).group(1))  # type: ignore[union-attr]
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) >= grace + BACKSTOP_S
    assert service["Restart"] == "on-failure" and "/health" in service["ExecStartPost"]
    assert service["User"] != "root" and "\nEnvironment=HF_HOME=" in (DEPLOY / "r1serve.service").read_text()


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (DEPLOY / "r1serve.service").read_text().replace("/opt/r1serve/venv", sys.prefix)
    unit = tmp_path / "r1serve.service"
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and "r1serve.service" not in done.stderr, done.stderr
    unit.write_text(text.replace("ExecStart=" + sys.prefix, "ExecStart=/nonexistent"))
    assert subprocess.run([analyze, "verify", str(unit)], capture_output=True).returncode != 0


def test_the_ray_serve_sample_compiles(tmp_path: Path) -> None:
    py_compile.compile(str(DEPLOY / "ray_serve.py"), cfile=str(tmp_path / "ray_serve.pyc"), doraise=True)
