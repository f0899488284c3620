"""Deployment files of `lm serve` (deploy/, .dockerignore): no Docker engine or cluster here, so this
checks what can be checked without them:

- the image's ENTRYPOINT (with deploy/serve.yaml) starts a working server locally, and the server
  refuses serve.yaml's 0.0.0.0 without an API key (loopback without a key stays allowed);
- the Dockerfile installs CPU torch by default and lm with the `serve` extra only, its build context
  (.dockerignore) holds what it COPYs and none of checkpoints/, logs/, .cache/, .venv/, .git/;
- every volume, claim, env var, secret, configMap and path that compose.yaml and k8s.yaml name is
  defined in the same file, exists in the repository or is made by a documented step, and the
  container paths are the ones the image and serve.yaml use (the checkpoint the server reads is the
  one mounted); image tags are pinned (the project's version, never `latest`).
"""

from __future__ import annotations

import inspect
import json
import os
import posixpath
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

from lm.commands.serve import is_loopback, serve
from lm.errors import LMError
from tests.serve_support import ServerProcess, make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# --- readers -------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.+)$", text, re.M)]


def dockerfile_instruction(name: str) -> str:
    return next(args for instruction, args in dockerfile_instructions() if instruction == name)


def dockerfile_args() -> dict[str, str]:
    """ARG name -> default ("" when none)."""
    out = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ARG":
            name, _, default = args.partition("=")
            out[name.strip()] = default.strip().strip('"')
    return out


def dockerfile_comments() -> str:
    return "\n".join(line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("#"))


def serve_config() -> dict:
    return yaml.safe_load((DEPLOY / "serve.yaml").read_text())


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pinned_tag() -> str:
    return project()["version"]


def header_comments(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$."""
    env = env or {}

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if op in (":-", "-"):
            return env.get(name) or arg if op == ":-" else env.get(name, arg)
        if op in (":?", "?") and not env.get(name):
            raise KeyError(f"{name}: {arg}")
        return env.get(name, "")

    return re.sub(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, value)


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_mounts(service: dict) -> list[dict]:
    """Every volume of a compose service in the long syntax (short `src:dst[:ro]` strings converted)."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "$", "~")) else "volume"
            volume = {"type": kind, "source": source, "target": target, "read_only": "ro" in parts[2:],
                      "bind": {"create_host_path": True}}  # what the short syntax does
        mounts.append(volume)
    return mounts


def make_train_checkpoint() -> Path:
    """The checkpoint `make train` writes: checkpoints/<experiment>/last.ckpt, the experiment being
    the default CONFIG's file stem (Makefile) and `lm fit` writing last.ckpt there."""
    makefile = (REPO / "Makefile").read_text()
    config = re.search(r"^CONFIG\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert re.search(r"^EXPERIMENT\s*\?=\s*\$\(basename \$\(notdir \$\(CONFIG\)\)\)", makefile, re.M)
    assert (REPO / config).is_file()
    return REPO / "checkpoints" / Path(config).stem / "last.ckpt"


def k8s_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text()) if d]


def k8s_pod(docs: list[dict]) -> dict:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]


def covers(mount_path: str, path: str) -> bool:
    mount_path = posixpath.normpath(mount_path)
    return path == mount_path or path.startswith(mount_path.rstrip("/") + "/")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = posixpath.normpath(pattern.lstrip("!").strip("/"))
        if any(regex(body).match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    assert path.is_file(), "no .dockerignore at the repository root: checkpoints, .venv, .git... go into the build"
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


# --- the image -----------------------------------------------------------------------------------

def test_dockerfile_entrypoint_serves_locally_without_a_key_on_loopback(tmp_path):
    entrypoint = json.loads(dockerfile_instruction("ENTRYPOINT"))
    assert entrypoint[:2] == ["lm", "serve"] and entrypoint[2:] == ["--config", "/app/deploy/serve.yaml"]
    assert "BASE_IMAGE" in dockerfile_instruction("FROM") and "/health" in dockerfile_instruction("HEALTHCHECK")
    # The same command with the image's /app replaced by this checkout; the checkpoint, the port and the
    # loopback address are overridden after the config, as `docker run ... lm-serve --flag` would. No
    # API key: loopback needs none.
    config = str(DEPLOY / "serve.yaml")
    assert serve_config()["ckpt_path"] == "/models/model.ckpt"
    ckpt = make_tiny_checkpoint(tmp_path / "model.ckpt", steps=1)
    server = ServerProcess(ckpt, tmp_path, "--feedback_path", str(tmp_path / "feedback.jsonl"),
                           command=(*entrypoint[:2], "--config", config), env={"LM_API_KEY": ""})
    try:
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "The", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3  # no key asked for
        assert httpx.get(server.url + "/info").json()["engine"]["max_batch_size"] == 16  # from serve.yaml
    finally:
        server.stop()


def run_serve(*args: str, cwd: Path, key: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LM_API_KEY", "LM_DEBUG")}
    if key is not None:
        env["LM_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "lm", "serve", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("host", [None, "::"])  # None: serve.yaml's own host (0.0.0.0)
def test_server_refuses_a_public_address_without_a_key(tmp_path, host):
    ckpt = make_tiny_checkpoint(tmp_path / "model.ckpt", steps=1)
    assert not is_loopback(serve_config()["host"])  # the container's address is a public one
    args = ["--config", str(DEPLOY / "serve.yaml"), "--ckpt_path", str(ckpt), "--port", "0", "--threads", "1",
            "--feedback_path", str(tmp_path / "feedback.jsonl")]
    if host is not None:
        args += ["--host", host]
    result = run_serve(*args, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("lm serve: error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    shown = host or serve_config()["host"]
    assert f"listen on {shown} without an API key" in errors[0] and "LM_API_KEY" in errors[0], errors[0]
    assert "serving" not in result.stderr and "Uvicorn running" not in result.stderr


def test_the_key_check_happens_before_the_model_loads(monkeypatch):
    class Loaded(Exception):
        pass

    def build_state(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr("lm.commands.serve.build_state", build_state)
    monkeypatch.delenv("LM_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.com"):
        with pytest.raises(LMError, match="without an API key"):
            serve(ckpt_path="model.ckpt", host=host)
        with pytest.raises(Loaded):  # a key lets it go on
            serve(ckpt_path="model.ckpt", host=host, api_key="secret")
    monkeypatch.setenv("LM_API_KEY", "from-the-environment")
    with pytest.raises(Loaded):
        serve(ckpt_path="model.ckpt", host="0.0.0.0")
    monkeypatch.setenv("LM_API_KEY", "")  # an empty key is no key
    with pytest.raises(LMError, match="without an API key"):
        serve(ckpt_path="model.ckpt", host="0.0.0.0")
    monkeypatch.delenv("LM_API_KEY")
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"):
        with pytest.raises(Loaded):
            serve(ckpt_path="model.ckpt", host=host)


def test_is_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.53", "localhost", "LOCALHOST", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "[::]", "192.168.0.2", "::ffff:10.0.0.1", "host.lan", ""))


def test_dockerfile_installs_cpu_torch_and_only_the_serve_extra():
    args = dockerfile_args()
    assert args.get("TORCH_INDEX_URL") == CPU_INDEX, "the image must install CPU torch by default"
    makefile_torch = re.search(r"^TORCH\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert re.fullmatch(r"torch==[\w.+]+", args["TORCH"]) and args["TORCH"] == makefile_torch  # pinned, as make's
    runs = [run for instruction, run in dockerfile_instructions() if instruction == "RUN" and "pip install" in run]
    torch_runs = [i for i, run in enumerate(runs) if '"$TORCH"' in run]
    assert len(torch_runs) == 1
    torch_run = runs[torch_runs[0]]
    assert re.search(r'--index-url "\$TORCH_INDEX_URL"', torch_run), torch_run  # the build arg is used
    lm_runs = [i for i, run in enumerate(runs) if i not in torch_runs]
    assert len(lm_runs) == 1 and lm_runs[0] > torch_runs[0], runs  # torch first, then lm, nothing else
    installed = re.findall(r"pip install\s+(.+)$", runs[lm_runs[0]])[0].split()
    assert installed == ['".[serve]"'] or installed == ["'.[serve]'"] or installed == [".[serve]"], installed
    assert "serve" in project()["optional-dependencies"]
    for dependency in project()["dependencies"]:  # what every install gets: no serving-only or CUDA extra
        assert not re.match(r"(fastapi|uvicorn|prometheus|peft|matplotlib|onnx|nvidia)", dependency), dependency


def test_dockerfile_paths_and_run_example():
    config = serve_config()
    setup = next(r for i, r in dockerfile_instructions() if i == "RUN" and "useradd" in r)
    user = dockerfile_instruction("USER")
    uid = re.search(r"--uid\s+(\d+)", setup).group(1)
    feedback_dir = posixpath.dirname(config["feedback_path"])
    ckpt_dir = posixpath.dirname(config["ckpt_path"])
    assert re.search(rf"mkdir -p .*{re.escape(feedback_dir)}\b", setup) and re.search(rf"mkdir -p .*{ckpt_dir}\b", setup)
    assert re.search(rf"chown {user}(:{user})? .*{re.escape(feedback_dir)}\b", setup), setup  # writable by the user
    assert uid == "1000"  # k8s.yaml's runAsUser / fsGroup
    assert feedback_dir in dockerfile_instruction("VOLUME")
    # The `docker run` example mounts the checkpoint file `make train` writes at serve.yaml's ckpt_path.
    (example,) = [line for line in dockerfile_comments().splitlines() if "docker run" in line]
    mounts = [dict(kv.split("=", 1) if "=" in kv else (kv, True) for kv in m.split(","))
              for m in re.findall(r"--mount\s+(\S+)", example)]
    by_target = {m["target"]: m for m in mounts}
    ckpt = by_target[config["ckpt_path"]]
    assert ckpt["type"] == "bind" and ("readonly" in ckpt or "ro" in ckpt)
    assert ckpt["source"].replace("$PWD", str(REPO)) == str(make_train_checkpoint())
    assert "-v " not in example  # -v would create a missing checkpoint as a root-owned folder
    assert by_target[feedback_dir]["type"] == "volume"
    assert "LM_API_KEY=" in example  # serve.yaml listens on 0.0.0.0: a key is required
    assert example.split()[-1] == f"lm-serve:{pinned_tag()}"
    for line in dockerfile_comments().splitlines():
        if "docker build" in line:
            assert re.search(rf"-t lm-serve:{re.escape(pinned_tag())}(-\w+)? \.$", line), line
    assert "make train" in dockerfile_comments()


def test_dockerignore_keeps_the_build_context_to_what_the_image_copies():
    patterns = dockerignore_patterns()
    copied = []
    for instruction, args in dockerfile_instructions():
        if instruction in ("COPY", "ADD"):
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            copied += sources
    assert set(copied) >= {"pyproject.toml", "README.md", "lm", "deploy/serve.yaml"}
    for source in copied:
        assert (REPO / source).exists(), source
        assert not dockerignored(source, patterns), f"{source} is COPYed but .dockerignore leaves it out"
    assert not dockerignored("lm/serve/static/index.html", patterns) and not dockerignored("lm/plan/devices.yaml", patterns)
    for kept_out in ("checkpoints/wikitext2_cpu/last.ckpt", ".cache/lm/shards/x.bin", ".venv/bin/python", "logs/x/version_0/events",
                     ".git/HEAD", ".git/objects/ab/cdef", "lm/__pycache__/cli.cpython-311.pyc", "lm.egg-info/PKG-INFO",
                     "tests/test_cli.py", "exports/model.onnx", "feedback/feedback.jsonl"):
        assert dockerignored(kept_out, patterns), f"{kept_out} would be sent to the Docker build"


def test_dockerignore_matcher():  # the rule the test above relies on
    assert dockerignored("a/b/c", ["*"]) and not dockerignored("a/b/c", ["*", "!a"])
    assert dockerignored("a/x/__pycache__/y", ["*", "!a", "**/__pycache__"])
    assert not dockerignored("deploy/serve.yaml", ["*", "!deploy/serve.yaml"])
    assert dockerignored("deploy/k8s.yaml", ["*", "!deploy/serve.yaml"])


# --- docker compose ------------------------------------------------------------------------------

def test_compose_file_has_a_health_check_and_a_pinned_image():
    service = compose()["services"]["lm-serve"]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile" and "BASE_IMAGE" in service["build"]["args"]
    assert (DEPLOY / service["build"]["context"]).resolve() == REPO  # .dockerignore applies to this context
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert service["ports"] == ["127.0.0.1:8000:8000"]  # loopback only unless changed on purpose
    assert service["image"] == f"lm-serve:{pinned_tag()}" and not service["image"].endswith(":latest")


def test_compose_builds_cpu_torch_with_args_the_dockerfile_declares():
    args = compose()["services"]["lm-serve"]["build"]["args"]
    declared = dockerfile_args()
    for name in args:
        assert name in declared, f"compose passes build arg {name}, which the Dockerfile does not declare"
    index = interpolate(args["TORCH_INDEX_URL"]) if "TORCH_INDEX_URL" in args else declared["TORCH_INDEX_URL"]
    assert index == CPU_INDEX


def test_compose_volumes_env_and_paths_exist_or_are_defined():
    spec = compose()
    service = spec["services"]["lm-serve"]
    config = serve_config()
    header = header_comments(DEPLOY / "compose.yaml")
    mounts = compose_mounts(service)
    targets = {m["target"]: m for m in mounts}
    feedback_dir = posixpath.dirname(config["feedback_path"])
    assert set(targets) == {config["ckpt_path"], feedback_dir}, targets  # nothing else, nothing missing
    # The checkpoint: a file mounted read-only exactly where serve.yaml reads it; a missing one is an error
    # (the short syntax would create a root-owned folder and the server would say "Checkpoint not found").
    ckpt = targets[config["ckpt_path"]]
    assert ckpt["type"] == "bind" and ckpt.get("read_only") is True
    assert ckpt.get("bind", {}).get("create_host_path") is False
    source = (DEPLOY / interpolate(ckpt["source"])).resolve()
    assert source.is_file() or source == make_train_checkpoint(), source  # made by `make train` otherwise
    assert "make train" in header
    # Feedback: a named volume defined in the file (initialized from the image's /data, which the image's
    # user owns), or a host folder that exists.
    feedback = targets[feedback_dir]
    if feedback["type"] == "volume":
        assert feedback["source"] in (spec.get("volumes") or {}), "named volume used but not defined"
    else:
        assert (DEPLOY / interpolate(feedback["source"])).resolve().is_dir()
    assert not feedback.get("read_only")
    # Environment: every variable the file substitutes is explained in its header; the server listens on
    # 0.0.0.0 in the container, so the key is required (compose stops with a message when it is unset).
    text = (DEPLOY / "compose.yaml").read_text()
    for name in set(re.findall(r"\$\{(\w+)", text)):
        assert name in header, f"${{{name}}} is used but not explained at the top of compose.yaml"
    assert not is_loopback(config["host"])
    key = service["environment"]["LM_API_KEY"]
    with pytest.raises(KeyError):
        interpolate(key, {})
    assert interpolate(key, {"LM_API_KEY": "secret"}) == "secret"
    for name in ("secrets", "configs"):
        for ref in service.get(name, []):
            assert (ref if isinstance(ref, str) else ref["source"]) in spec.get(name, {}), ref


def test_interpolate():
    assert interpolate("${A:-x}") == "x" and interpolate("${A:-x}", {"A": "y"}) == "y"
    assert interpolate("a$${B}") == "a${B}" and interpolate("${A}", {"A": "1"}) == "1"
    with pytest.raises(KeyError):
        interpolate("${A:?set A}")


# --- Kubernetes ----------------------------------------------------------------------------------

def test_kubernetes_manifest_probes_and_service():
    docs = k8s_docs()
    by_kind = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= set(by_kind)
    pod = by_kind["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"name": "http", "containerPort": 8000} in container["ports"]
    assert container["ports"][0]["containerPort"] == serve_config()["port"]
    assert by_kind["Deployment"]["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    service = by_kind["Service"]["spec"]
    assert service["selector"] == pod["metadata"]["labels"] and service["ports"][0]["targetPort"] == "http"
    accepted = set(inspect.signature(serve).parameters)
    for flag in container.get("args", [])[::2]:
        assert flag.startswith("--") and flag[2:] in accepted, flag  # arguments `lm serve` takes


def test_kubernetes_images_are_pinned_and_not_pulled_every_time():
    pod = k8s_pod(k8s_docs())
    containers = pod["containers"] + pod.get("initContainers", [])
    for container in containers:
        name, _, tag = container["image"].rpartition(":")
        assert name and tag == pinned_tag() and tag != "latest", container["image"]
        assert container.get("imagePullPolicy") == "IfNotPresent", container["name"]


def test_kubernetes_claims_secrets_config_maps_and_paths_are_defined():
    docs = k8s_docs()
    pod = k8s_pod(docs)
    header = header_comments(DEPLOY / "k8s.yaml")
    defined = {kind: {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}
               for kind in ("PersistentVolumeClaim", "ConfigMap", "Secret")}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # Claims: every one used is defined here, with an access mode and a size.
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims
    for claim in claims:
        assert claim in defined["PersistentVolumeClaim"], f"claim {claim} is used but not defined"
        spec = defined["PersistentVolumeClaim"][claim]["spec"]
        assert spec["accessModes"] and spec["resources"]["requests"]["storage"]
    if any("ReadWriteOnce" in defined["PersistentVolumeClaim"][c]["spec"]["accessModes"] for c in claims):
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        assert deployment["spec"]["strategy"]["type"] == "Recreate"  # else a rollout waits on the claim
    # ConfigMaps and Secrets: defined here, or (Secrets only) created by the documented command; never optional.
    containers = pod["containers"] + pod.get("initContainers", [])
    config_maps = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
    secrets = [(v["secret"]["secretName"], None, v["secret"].get("optional")) for v in pod["volumes"] if "secret" in v]
    for container in containers:
        for env in container.get("env", []):
            source = env.get("valueFrom", {})
            if "configMapKeyRef" in source:
                config_maps.append(source["configMapKeyRef"]["name"])
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secrets.append((ref["name"], ref["key"], ref.get("optional")))
        for env_from in container.get("envFrom", []):
            if "configMapRef" in env_from:
                config_maps.append(env_from["configMapRef"]["name"])
            if "secretRef" in env_from:
                secrets.append((env_from["secretRef"]["name"], None, env_from["secretRef"].get("optional")))
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']} mounts undefined volume {mount['name']}"
    for name in config_maps:
        assert name in defined["ConfigMap"], f"configMap {name} is used but not defined"
    for name, key, optional in secrets:
        assert not optional, f"secret {name} is optional: the server could start without its key"
        if name not in defined["Secret"]:
            assert re.search(rf"kubectl create secret generic {re.escape(name)} .*--from-literal={key or ''}", header), \
                f"secret {name} is neither defined nor created by a documented step"
    # The server's paths: the checkpoint serve.yaml reads is on the models claim, read-only; feedback on a
    # writable claim; the API key comes from a Secret (serve.yaml listens on 0.0.0.0).
    config = serve_config()
    (server,) = [c for c in pod["containers"] if c["name"] == "lm-serve"]
    mounts = server["volumeMounts"]
    ckpt_mount = [m for m in mounts if covers(m["mountPath"], config["ckpt_path"])]
    feedback_mount = [m for m in mounts if covers(m["mountPath"], config["feedback_path"])]
    assert len(ckpt_mount) == 1 and ckpt_mount[0]["readOnly"] is True
    assert len(feedback_mount) == 1 and not feedback_mount[0].get("readOnly")
    for mount in ckpt_mount + feedback_mount:
        assert "persistentVolumeClaim" in volumes[mount["name"]]
    assert "LM_API_KEY" in {e["name"] for e in server["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["fsGroup"] == 1000  # the image's uid
    # The init container waits for that same checkpoint, on that same claim; the header says how to put it there.
    for init in pod.get("initContainers", []):
        assert config["ckpt_path"] in " ".join(init["command"])
        (mount,) = [m for m in init["volumeMounts"] if m["name"] == ckpt_mount[0]["name"]]
        assert covers(mount["mountPath"], config["ckpt_path"])
        assert "kubectl cp" in header and init["name"] in header and config["ckpt_path"] in header


def test_kubernetes_grace_period_is_set_and_explained():
    pod = k8s_pod(k8s_docs())
    assert isinstance(pod.get("terminationGracePeriodSeconds"), int) and pod["terminationGracePeriodSeconds"] >= 30
    lines = (DEPLOY / "k8s.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if "terminationGracePeriodSeconds" in line)
    assert lines[at - 1].strip().startswith("#"), "terminationGracePeriodSeconds needs a comment above it"


def test_sigterm_lets_a_stream_in_flight_finish_then_exits_without_a_traceback(tmp_path):
    """What the grace periods above (and compose.yaml's stop_grace_period) leave time for: on SIGTERM the image's
    `lm serve` (uvicorn) stops taking connections at once, runs a stream in flight to its [DONE], shuts the app
    down and exits with the signal's own status (143 in a shell: uvicorn raises the signal again once its
    graceful shutdown is done), with no traceback."""
    entrypoint = json.loads(dockerfile_instruction("ENTRYPOINT"))
    ckpt = make_tiny_checkpoint(tmp_path / "model.ckpt", steps=1, context=4096)
    server = ServerProcess(ckpt, tmp_path, "--max_tokens", "3000", "--feedback_path", str(tmp_path / "feedback.jsonl"),
                           command=(*entrypoint[:2], "--config", str(DEPLOY / "serve.yaml")), env={"LM_API_KEY": ""})
    try:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"prompt": "The", "max_tokens": 3000, "stream": True}) as response:
            events = (line[len("data: "):] for line in response.iter_lines() if line.startswith("data: "))
            chunks = [json.loads(next(events))]  # the stream is in flight
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # new connections are refused while the stream goes on
                try:
                    httpx.get(server.url + "/health", timeout=1)
                    time.sleep(0.05)
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    # refused outright, or (on a busy machine) a probe the kernel had queued on the listening
                    # socket is reset when uvicorn closes it: either way, not served
                    break
            else:
                pytest.fail("the server still accepted connections 10 s after SIGTERM")
            rest = list(events)
        assert rest[-1] == "[DONE]"
        chunks += [json.loads(event) for event in rest[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 3000
        assert server.proc.wait(30) == -signal.SIGTERM
        assert "Traceback" not in server.output() and "Finished server process" in server.output()
    finally:
        server.stop()
