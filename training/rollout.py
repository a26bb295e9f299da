"""Promotion for servers the bot does not manage (Kubernetes, compose): make them really serve it.

Flipping the ``/models/active`` link is not a promotion: a running ``lmdeploy serve api_server``
keeps the weights it loaded. This command makes the servers load the new folder and returns only
once they serve it, so the registry (which marks the version active after the promote command
succeeds) never says "active" while the old weights still answer, for longer than the rollout:

``python -m training.rollout MODEL_DIR VERSION [options]`` (``training.promote_command`` and
``ab.start_command`` run it with ``{model_dir}``/``{version}`` filled in):

1. repoint ``--link`` (``/models/active``, or ``/models/candidate`` for an A/B arm) at MODEL_DIR
   atomically (a new symlink renamed over the old one);
2. ``--kubernetes DEPLOYMENT``: patch the Deployment's pod template (annotation
   ``oogiri.io/model-version``, and ``--replicas`` if given) — a rolling restart — through the
   API server with the pod's service account, and wait until the rollout completes;
   compose: the api_server containers restart themselves when the link changes (their command
   watches it, deploy/compose.yaml);
   systemd: oogiri-lmdeploy-reload.path restarts the units, which read the name from the
   folder's ``oogiri-model.env`` (written here);
3. wait until ``--url`` (the proxy, or the server) lists VERSION in ``/v1/models`` and nothing
   else: the servers name the model they serve after the folder's ``oogiri-model.json`` version,
   which is also how the bot labels every joke with the version that really answered;
4. on any failure or timeout: point the link back, roll the Deployment back, exit non-zero —
   the registry is not changed and the previous model keeps serving.

``python -m training.rollout --stop --kubernetes DEPLOYMENT [--link L]`` scales an A/B arm's
Deployment to zero (``ab.stop_command``) and removes its link.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
ANNOTATION = "oogiri.io/model-version"
VERSION_NAME = re.compile(r"[A-Za-z0-9._-]+")


class RolloutError(RuntimeError):
    pass


def say(message: str) -> None:
    print(f"rollout: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the link


def repoint(link: Path, target: Path) -> Path | None:
    """Point ``link`` at ``target`` atomically; returns the previous target (None: none)."""
    previous = Path(os.readlink(link)) if link.is_symlink() else None
    tmp = link.with_name(f".{link.name}.next")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)
    return previous


# --------------------------------------------------------------------------- the served name


def served_models(url: str, api_key: str | None, timeout_s: float = 10.0) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    return [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]


def wait_served(
    url: str,
    version: str,
    api_key: str | None,
    timeout_s: float,
    poll_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Until ``url`` serves ``version`` and only it (a proxy lists every node's model)."""
    deadline = clock() + timeout_s
    seen: list[str] | str = "nothing yet"
    while True:
        try:
            seen = served_models(url, api_key)
            if seen == [version]:
                return
        except (httpx.HTTPError, ValueError) as exc:
            seen = f"{type(exc).__name__}: {exc}"
        if clock() >= deadline:
            raise RolloutError(f"{url} does not serve {version} after {timeout_s:g} s ({seen})")
        time.sleep(poll_s)


# --------------------------------------------------------------------------- Kubernetes


class Kubernetes:
    """The few calls a rollout needs, with the pod's service account (in-cluster)."""

    def __init__(
        self,
        api: str = "https://kubernetes.default.svc",
        token: str | None = None,
        namespace: str | None = None,
        verify: ssl.SSLContext | bool | str = True,
    ) -> None:
        if token is None:
            token = (SA_DIR / "token").read_text().strip()
        if namespace is None:
            namespace = (SA_DIR / "namespace").read_text().strip()
        if verify is True and (SA_DIR / "ca.crt").is_file():
            verify = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
        self.namespace = namespace
        self.client = httpx.Client(
            base_url=api, headers={"Authorization": f"Bearer {token}"}, verify=verify, timeout=30
        )

    def _path(self, name: str) -> str:
        return f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{name}"

    def get(self, name: str) -> dict[str, Any]:
        response = self.client.get(self._path(name))
        if response.status_code != 200:
            raise RolloutError(f"GET deployment {name}: {response.status_code} {response.text}")
        return response.json()

    def patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.client.patch(
            self._path(name),
            content=json.dumps(body),
            headers={"Content-Type": "application/strategic-merge-patch+json"},
        )
        if response.status_code != 200:
            raise RolloutError(f"PATCH deployment {name}: {response.status_code} {response.text}")
        return response.json()

    def roll(self, name: str, version: str, replicas: int | None = None) -> int:
        """Restart the pods with ``version`` recorded on the template; returns the generation."""
        body: dict[str, Any] = {
            "spec": {"template": {"metadata": {"annotations": {ANNOTATION: version}}}}
        }
        if replicas is not None:
            body["spec"]["replicas"] = replicas
        return int(self.patch(name, body)["metadata"]["generation"])

    def wait_rolled(
        self, name: str, generation: int, timeout_s: float, poll_s: float = 5.0
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            d = self.get(name)
            st, want = d.get("status", {}), int(d.get("spec", {}).get("replicas", 1))
            done = (
                int(st.get("observedGeneration", 0)) >= generation
                and int(st.get("updatedReplicas", 0)) == want
                and int(st.get("availableReplicas", 0)) == want
                and int(st.get("replicas", 0)) == want
                and not int(st.get("unavailableReplicas", 0) or 0)
            )
            if done:
                return
            if time.monotonic() >= deadline:
                raise RolloutError(f"deployment {name} did not finish rolling out ({st})")
            time.sleep(poll_s)


# --------------------------------------------------------------------------- the command


def write_name(folder: Path, version: str) -> None:
    """``oogiri-model.env`` (``LMDEPLOY_MODEL_NAME=VERSION``) in the folder: the systemd units
    read it when they restart, and serve the model under that name."""
    if not VERSION_NAME.fullmatch(version):
        raise RolloutError(f"version {version!r} is not a plain name ([A-Za-z0-9._-]+)")
    try:
        (folder / "oogiri-model.env").write_text(f"LMDEPLOY_MODEL_NAME={version}\n")
    except OSError as exc:  # a read-only models volume: the JSON marker names it instead
        say(f"could not write {folder / 'oogiri-model.env'}: {exc}")


def promote(args: argparse.Namespace, kube: Kubernetes | None = None) -> None:
    target = Path(args.model_dir).resolve()
    if not (target / "config.json").is_file():
        raise RolloutError(f"{target} is not a model folder (no config.json)")
    write_name(target, args.version)
    link = Path(args.link)
    previous = repoint(link, target)
    say(f"{link} → {target} (was {previous})")
    old_version: str | None = None
    try:
        if args.kubernetes:
            kube = kube or Kubernetes()
            current = kube.get(args.kubernetes)
            annotations = current["spec"]["template"]["metadata"].get("annotations") or {}
            old_version = annotations.get(ANNOTATION)
            generation = kube.roll(args.kubernetes, args.version, args.replicas)
            say(f"rolling out deployment {args.kubernetes} (generation {generation})")
            kube.wait_rolled(args.kubernetes, generation, args.timeout, args.poll)
        if args.url:
            wait_served(args.url, args.version, os.environ.get(args.api_key_env), args.timeout,
                        args.poll)  # fmt: skip
        say(f"{args.version} is served")
    except BaseException as exc:
        say(f"FAILED ({exc}); going back")
        if previous is not None:
            repoint(link, previous)
        elif link.is_symlink():  # there was none: a link left here would serve the failed model
            link.unlink()
        if args.kubernetes and kube is not None:
            try:  # the previous pod template again: the old pods come back
                kube.roll(args.kubernetes, old_version or "previous")
            except Exception as undo:
                say(f"could not roll {args.kubernetes} back: {undo}")
        raise


def stop(args: argparse.Namespace, kube: Kubernetes | None = None) -> None:
    if args.kubernetes:
        kube = kube or Kubernetes()
        kube.patch(args.kubernetes, {"spec": {"replicas": 0}})
        say(f"deployment {args.kubernetes} scaled to 0")
    link = Path(args.link)
    if link.is_symlink():
        link.unlink()
        say(f"removed {link}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.rollout", description=__doc__)
    p.add_argument("model_dir", nargs="?")
    p.add_argument("version", nargs="?")
    p.add_argument("--link", default="/models/active", help="symlink the servers serve")
    p.add_argument("--kubernetes", metavar="DEPLOYMENT", help="roll this Deployment")
    p.add_argument("--replicas", type=int, help="also set the Deployment's replicas")
    p.add_argument("--url", help="wait until this server/proxy serves VERSION")
    p.add_argument("--api-key-env", default="OOGIRI_ENGINE__API_KEY", help="env var with the key")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole rollout")
    p.add_argument("--poll", type=float, default=5.0)
    p.add_argument("--stop", action="store_true", help="scale the Deployment to 0, drop the link")
    return p


def main(argv: list[str] | None = None, kube: Kubernetes | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.stop:
            stop(args, kube)
        else:
            if not (args.model_dir and args.version):
                parser().error("MODEL_DIR and VERSION are required")
            promote(args, kube)
    except (RolloutError, OSError, httpx.HTTPError) as exc:
        say(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
