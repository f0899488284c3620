"""Deployment files of `lm serve` (deploy/): no Docker engine or cluster here, so this checks what can
be checked: the image's ENTRYPOINT (with deploy/serve.yaml) starts a working server locally, and the
compose file and Kubernetes manifest parse as YAML with health checks / probes on /health."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml

from tests.serve_support import ServerProcess, make_tiny_checkpoint

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def dockerfile_instruction(name: str) -> str:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return re.search(rf"^{name}\s+(.+)$", text, re.MULTILINE).group(1).strip()


def test_dockerfile_entrypoint_serves_locally(tmp_path):
    entrypoint = json.loads(dockerfile_instruction("ENTRYPOINT"))
    assert entrypoint[:2] == ["lm", "serve"] and entrypoint[2:] == ["--config", "/app/deploy/serve.yaml"]
    assert "BASE_IMAGE" in dockerfile_instruction("FROM") and "/health" in dockerfile_instruction("HEALTHCHECK")
    # The same command with the image's /app replaced by this checkout; the checkpoint, the port and the
    # loopback address are overridden after the config, as `docker run ... lm-serve --flag` would.
    config = str(DEPLOY / "serve.yaml")
    assert yaml.safe_load(Path(config).read_text())["ckpt_path"] == "/models/model.ckpt"
    ckpt = make_tiny_checkpoint(tmp_path / "model.ckpt", steps=1)
    server = ServerProcess(ckpt, tmp_path, "--feedback_path", str(tmp_path / "feedback.jsonl"),
                           command=(*entrypoint[:2], "--config", config))
    try:
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "The", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        assert httpx.get(server.url + "/info").json()["engine"]["max_batch_size"] == 16  # from serve.yaml
    finally:
        server.stop()


def test_compose_file_has_a_health_check():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    service = compose["services"]["lm-serve"]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile" and "BASE_IMAGE" in service["build"]["args"]
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert service["ports"] == ["127.0.0.1:8000:8000"]  # loopback only unless changed on purpose
    assert any(v.endswith(":/models/model.ckpt:ro") for v in service["volumes"])


def test_kubernetes_manifest_probes_and_service():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text())}
    assert set(docs) == {"Deployment", "Service"}
    pod = docs["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"name": "http", "containerPort": 8000} in container["ports"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    service = docs["Service"]["spec"]
    assert service["selector"] == pod["metadata"]["labels"] and service["ports"][0]["targetPort"] == "http"
