"""``python -m training.rollout``: a promotion on Kubernetes/compose really changes what is served
(a fake Kubernetes API and a fake LMDeploy over loopback HTTP), and a failed one goes back."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from training import rollout
from training.rollout import ANNOTATION, Kubernetes, repoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
from fake_lmdeploy import FakeLMDeploy


class FakeKube:
    """One Deployment; a PATCH of its template 'rolls' it: after ``roll_gets`` GETs its status
    says done and the fake LMDeploy behind it serves the annotated version (unless ``broken``)."""

    def __init__(self, server: FakeLMDeploy, roll_gets: int = 2, broken: bool = False) -> None:
        self.server = server
        self.roll_gets = roll_gets
        self.broken = broken
        self.patches: list[dict[str, Any]] = []
        self.auth: set[str] = set()
        self.dep: dict[str, Any] = {
            "metadata": {"name": "oogiri-lmdeploy", "generation": 1},
            "spec": {"replicas": 2, "template": {"metadata": {"annotations": {ANNOTATION: "v1"}}}},
            "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                       "availableReplicas": 2},
        }  # fmt: skip
        self.pending = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None: ...

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.auth.add(self.headers.get("Authorization", ""))
                if not self.path.endswith("/namespaces/oogiri/deployments/oogiri-lmdeploy"):
                    return self._send(404, {"message": "not found"})
                if fake.pending:
                    fake.pending -= 1
                    if fake.pending == 0 and not fake.broken:
                        d = fake.dep
                        d["status"].update(
                            observedGeneration=d["metadata"]["generation"],
                            updatedReplicas=d["spec"]["replicas"],
                            availableReplicas=d["spec"]["replicas"],
                            replicas=d["spec"]["replicas"],
                        )
                        ann = d["spec"]["template"]["metadata"]["annotations"][ANNOTATION]
                        fake.server.model_name = ann
                self._send(200, fake.dep)

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.headers["Content-Type"] == "application/strategic-merge-patch+json"
                fake.patches.append(body)
                spec = body.get("spec", {})
                d = fake.dep
                if "replicas" in spec:
                    d["spec"]["replicas"] = spec["replicas"]
                if "template" in spec:
                    d["spec"]["template"]["metadata"]["annotations"].update(
                        spec["template"]["metadata"]["annotations"]
                    )
                    d["metadata"]["generation"] += 1
                    d["status"]["updatedReplicas"] = 0
                    fake.pending = fake.roll_gets
                self._send(200, d)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def client(self) -> Kubernetes:
        return Kubernetes(api=self.url, token="sa-token", namespace="oogiri", verify=False)


@pytest.fixture
def server() -> Iterator[FakeLMDeploy]:
    fake = FakeLMDeploy(model_name="v1").start()
    yield fake
    fake.stop()


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for name in ("v1", "v2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    repoint(tmp_path / "active", tmp_path / "v1")
    return tmp_path


def argv(models: Path, url: str, *extra: str) -> list[str]:
    return [str(models / "v2"), "v2", "--link", str(models / "active"), "--url", url,
            "--poll", "0.01", *extra]  # fmt: skip


def test_kubernetes_promotion_rolls_the_servers_and_waits_for_the_new_version(
    models: Path, server: FakeLMDeploy
) -> None:
    kube = FakeKube(server)
    rc = rollout.main(argv(models, server.url, "--kubernetes", "oogiri-lmdeploy"), kube.client())
    assert rc == 0
    assert (models / "active").resolve() == (models / "v2").resolve()
    assert kube.patches == [
        {"spec": {"template": {"metadata": {"annotations": {ANNOTATION: "v2"}}}}}
    ]
    assert server.model_name == "v2" and kube.auth == {"Bearer sa-token"}
    # the systemd units read the served name from the folder
    assert (models / "v2" / "oogiri-model.env").read_text() == "LMDEPLOY_MODEL_NAME=v2\n"


def test_a_rollout_that_never_finishes_goes_back(models: Path, server: FakeLMDeploy) -> None:
    kube = FakeKube(server, broken=True)
    args = argv(models, server.url, "--kubernetes", "oogiri-lmdeploy", "--timeout", "0.3")
    assert rollout.main(args, kube.client()) == 1
    assert (models / "active").resolve() == (models / "v1").resolve()
    rolled = [p["spec"]["template"]["metadata"]["annotations"][ANNOTATION] for p in kube.patches]
    assert rolled == ["v2", "v1"]  # the pods are rolled back onto the old folder


def test_compose_promotion_waits_until_the_server_serves_the_version(
    models: Path, server: FakeLMDeploy
) -> None:
    # compose: the container restarts itself when the link changes; here nobody does, so the
    # server keeps serving v1 and the promotion must fail (and put the link back)
    assert rollout.main(argv(models, server.url, "--timeout", "0.2")) == 1
    assert (models / "active").resolve() == (models / "v1").resolve()
    server.model_name = "v2"
    assert rollout.main(argv(models, server.url, "--timeout", "0.2")) == 0
    assert (models / "active").resolve() == (models / "v2").resolve()


def test_stop_scales_the_arm_to_zero_and_drops_its_link(models: Path, server: FakeLMDeploy) -> None:
    kube = FakeKube(server)
    link = models / "candidate"
    repoint(link, models / "v2")
    args = ["--stop", "--kubernetes", "oogiri-lmdeploy", "--link", str(link)]
    assert rollout.main(args, kube.client()) == 0
    assert kube.patches == [{"spec": {"replicas": 0}}] and not link.is_symlink()


def test_bad_input_is_refused(models: Path, tmp_path: Path) -> None:
    assert rollout.main([str(tmp_path / "nothing"), "v9", "--link", str(models / "active")]) == 1
    assert (models / "active").resolve() == (models / "v1").resolve()
    assert rollout.main([str(models / "v2"), "v2; rm -rf /", "--link", str(models / "active")]) == 1
    with pytest.raises(SystemExit):
        rollout.main(["--link", str(models / "active")])
