"""The training venv (``oogiri train setup``): XTuner's pins, apart from the serving environment.

XTuner 0.2.0 needs transformers 4.48 (LMDeploy needs >= 4.56), so training gets its own venv.
It is created with ``--system-site-packages`` so the machine's CUDA build of torch is reused (no
multi-GB download, none possible offline); the venv's own pinned packages shadow the system ones.
The pins live in one lock file, ``training/requirements-xtuner.txt``, which the training image
(deploy/train.Dockerfile) installs too: ``--no-deps`` on purpose, because XTuner's declared pins
(bitsandbytes 0.45, opencv-python, …) do not work on torch 2.11/CUDA 13. The lock holds everything
XTuner's InternVL path and InternVL's model code import (scikit-image, matplotlib, OpenCV, timm,
…); ``oogiri train setup --check`` imports them and builds a one-sample data set.

Offline machines: ``oogiri train setup --download DIR`` prints the ``pip download`` commands to
run where PyPI is reachable; then ``oogiri train setup --wheels DIR`` installs from that folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

XTUNER_VERSION = "0.2.0"
TRANSFORMERS_VERSION = "4.48.0"
MMENGINE_VERSION = "0.10.6"
MIN_BITSANDBYTES = (0, 48)

# The one lock file of the training venv, shared with deploy/train.Dockerfile.
LOCK_FILE = Path(__file__).with_name("requirements-xtuner.txt")


def read_lock(path: Path = LOCK_FILE) -> tuple[str, ...]:
    """The requirement lines of the lock (comments and blank lines dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return tuple(lines)


def _name(req: str) -> str:
    return req.split("==", 1)[0].strip().lower().replace("_", "-")


_LOCK = read_lock()
# Installed with --no-deps (every dependency is in the lock), in one pip call.
PINS: tuple[str, ...] = tuple(r for r in _LOCK if _name(r) != "deepspeed")
# an sdist: built with DS_BUILD_OPS=0 against the system torch, in its own step
DEEPSPEED = next(r for r in _LOCK if _name(r) == "deepspeed")

# What XTuner 0.2.0's InternVL path and InternVL's model code import at run time (beyond the pins'
# own names): a missing one is a failed check, not a failed training run hours later.
RUNTIME_IMPORTS = (
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "mmengine",
    "xtuner",
    "peft",
    "bitsandbytes",
    "deepspeed",
    "accelerate",
    "datasets",
    "timm",
    "skimage",
    "matplotlib",
    "cv2",
    "scipy",
    "einops",
    "sentencepiece",
)

CHECK_SCRIPT = r"""
import importlib, importlib.util, json, os, pathlib, sys, tempfile, traceback
out = {"python": sys.version.split()[0], "executable": sys.executable, "versions": {}, "errors": {}}
for name in __IMPORTS__:
    try:
        mod = importlib.import_module(name)
        out["versions"][name] = getattr(mod, "__version__", "?")
    except Exception as exc:
        out["errors"][name] = f"{type(exc).__name__}: {exc}"
try:
    import xtuner.dataset  # noqa: F401  (imports scikit-image, matplotlib, mmengine's OpenCV)
    from xtuner.model import InternVL_V1_5  # noqa: F401
    from xtuner.dataset import InternVL_V1_5_Dataset  # noqa: F401
    out["xtuner_internvl"] = True
except Exception as exc:
    out["xtuner_internvl"] = False
    out["errors"]["xtuner.internvl"] = f"{type(exc).__name__}: {exc}"
spec = importlib.util.find_spec("xtuner")
if spec and spec.submodule_search_locations:
    p = pathlib.Path(list(spec.submodule_search_locations)[0])
    p = p / "configs" / "internvl" / "v1_5" / "convert_to_official.py"
    out["convert_script"] = str(p)
    out["convert_script_exists"] = p.is_file()
model = os.environ.get("OOGIRI_CHECK_MODEL")
if model:
    out["model"] = model
if model and not out.get("xtuner_internvl"):
    out["errors"]["dataset"] = "not built: XTuner's InternVL code does not import"
if model and out.get("xtuner_internvl"):
    mdir = pathlib.Path(model)
    # InternVL's own model code (a real download has it; timm is imported by InternViT's)
    if (mdir / "modeling_internvl_chat.py").is_file():
        try:  # as XTuner loads it: the config class first (it brings its sibling files)
            from transformers import AutoConfig
            from transformers.dynamic_module_utils import get_class_from_dynamic_module
            cfg = AutoConfig.from_pretrained(model, trust_remote_code=True)
            ref = getattr(cfg, "auto_map", {}).get("AutoModel",
                                                   "modeling_internvl_chat.InternVLChatModel")
            get_class_from_dynamic_module(ref, model)
            out["model_code"] = True
        except Exception as exc:
            out["model_code"] = False
            out["errors"]["model_code"] = f"{type(exc).__name__}: {exc}"
    else:
        out["model_code"] = None
    # a one-sample data set, built and tokenised exactly as training will
    try:
        import copy
        from PIL import Image
        from xtuner.dataset import InternVL_V1_5_Dataset
        from xtuner.utils import PROMPT_TEMPLATE
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="oogiri-check-"))
        Image.new("RGB", (96, 64), (200, 120, 40)).save(tmp / "a.jpg")
        item = {"id": "check-0", "image": ["a.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n" + __PROMPT__},
            {"from": "gpt", "value": "这只猫刚刚发现冰箱是空的。"}]}
        (tmp / "one.json").write_text(json.dumps([item], ensure_ascii=False), encoding="utf-8")
        template = copy.deepcopy(PROMPT_TEMPLATE.internlm2_chat)  # XTuner edits it in place
        ds = InternVL_V1_5_Dataset(model_path=model, template=template,
                                   data_paths=[str(tmp / "one.json")], image_folders=[str(tmp)],
                                   max_length=8192)
        sample = ds[0]
        out["dataset"] = {"samples": len(ds), "input_ids": len(sample["input_ids"]),
                          "pixel_values": list(sample["pixel_values"].shape)}
    except Exception as exc:
        out["dataset"] = None
        out["errors"]["dataset"] = f"{type(exc).__name__}: {exc}"
        out["dataset_traceback"] = traceback.format_exc()[-2000:]
try:
    import torch
    out["cuda"] = bool(torch.cuda.is_available())
    out["gpus"] = torch.cuda.device_count()
except Exception:
    out["cuda"] = False
print("OOGIRI-CHECK " + json.dumps(out, ensure_ascii=False))
""".replace("__IMPORTS__", repr(RUNTIME_IMPORTS)).replace(
    "__PROMPT__", repr("请你根据这张图片，讲一个脑洞大开的梗")
)

TORCHRUN_SHIM = """#!{python}
# torchrun bound to this venv (the system torchrun would start workers with the system python)
import sys

from torch.distributed.run import main

sys.exit(main())
"""


@dataclass
class Step:
    description: str
    argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    action: Callable[[], None] | None = None

    def shell(self) -> str:
        if self.argv is None:
            return f"# {self.description} (done by oogiri)"
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (env + " " if env else "") + " ".join(_quote(a) for a in self.argv)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def wheel_names(folder: Path) -> set[str]:
    """Normalised project names of the wheels and sdists in ``folder``."""
    names = set()
    for f in Path(folder).iterdir():
        if f.suffix == ".whl" or f.name.endswith(".tar.gz"):
            names.add(f.name.split("-", 1)[0].lower().replace("_", "-"))
    return names


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def _pip(venv: Path, wheels: Path | None) -> list[str]:
    cmd = [str(venv_python(venv)), "-m", "pip", "install", "--no-deps"]
    if wheels is not None:
        cmd += ["--no-index", "--find-links", str(wheels)]
    return cmd


def write_torchrun_shim(venv: Path) -> Path:
    path = Path(venv) / "bin" / "torchrun"
    path.write_text(TORCHRUN_SHIM.format(python=venv_python(venv)), encoding="utf-8")
    path.chmod(0o755)
    return path


PARENT_SITE_PTH = "zz_oogiri_parent_site.pth"


def link_parent_site(venv: Path, python: str = "python3") -> Path:
    """Let the venv see the creating python's packages even when that python is itself a venv.

    ``--system-site-packages`` reaches only the *base* interpreter's site-packages: on a GPU
    machine whose ``python3`` is a venv holding CUDA torch (the device's /opt/torch/.venv), the
    training venv then had no torch at all. A ``.pth`` file appends the creating python's
    site-packages after the venv's own, so the pinned wheels still come first.
    """
    ask = "import site, sys; print(chr(10).join(site.getsitepackages()))"
    parent = subprocess.run(
        [python, "-c", ask], capture_output=True, text=True, check=True, env=_no_pythonpath()
    ).stdout.split()
    purelib = subprocess.run(
        [str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=_no_pythonpath(),
    ).stdout.strip()
    pth = Path(purelib) / PARENT_SITE_PTH
    pth.write_text("".join(f"{d}\n" for d in parent), encoding="utf-8")
    return pth


def _no_pythonpath() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def clean_env() -> dict[str, str]:
    """The environment for the venv's own commands: the caller's PYTHONPATH (the bot's packages,
    on the device a ``--target`` folder) would make pip skip lock entries as "already installed"
    and then be missing when the venv runs on its own (DeepSpeed lacked annotated_types)."""
    return _no_pythonpath()


def setup_steps(
    venv: Path,
    python: str = "python3",
    wheels: Path | None = None,
    system_site_packages: bool = True,
    extra: tuple[str, ...] = (),
    reuse_system: bool = False,
) -> list[Step]:
    """Create the venv, install the pins, DeepSpeed, a venv-bound torchrun.

    ``reuse_system`` (with ``wheels``): lock entries without a wheel in that folder are taken
    from the machine's own packages (an offline box that already has numpy, OpenCV, …); the
    check then shows which versions those are.
    """
    venv = Path(venv)
    pins = PINS
    if wheels is not None and reuse_system:
        have = wheel_names(wheels)
        pins = tuple(p for p in PINS if _name(p) in have)
    create = [python, "-m", "venv"]
    if system_site_packages:
        create.append("--system-site-packages")
    create.append(str(venv))
    link = [
        Step(
            "see the creating python's packages (CUDA torch), also when it is a venv",
            action=lambda: link_parent_site(venv, python) and None,
        )
    ]
    return [
        Step("create the venv", create),
        *(link if system_site_packages else []),
        Step("install XTuner and its pinned dependencies", [*_pip(venv, wheels), *pins, *extra]),
        Step(
            "install DeepSpeed without building its CUDA ops",
            [*_pip(venv, wheels), "--no-build-isolation", DEEPSPEED],
            env={"DS_BUILD_OPS": "0"},
        ),
        Step("bind torchrun to the venv", action=lambda: write_torchrun_shim(venv) and None),
        Step("check the venv", [str(venv_python(venv)), "-c", CHECK_SCRIPT]),
    ]


def download_steps(
    dest: Path, python_version: str = "3.12", platform: str = "manylinux_2_28_x86_64"
) -> list[Step]:
    """``pip download`` commands that fetch every pin for an offline ``--wheels`` install."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest)]
    binary = [
        *base,
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--platform",
        platform,
        "--platform",
        "manylinux2014_x86_64",
        "--platform",
        "any",
    ]
    return [
        Step("wheels for the pins", binary + list(PINS)),
        Step("DeepSpeed (source distribution)", [*base, "--no-binary=:all:", DEEPSPEED]),
    ]


# --------------------------------------------------------------------------- checking


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def parse_check(output: str) -> dict[str, Any]:
    for line in reversed(output.splitlines()):
        if line.startswith("OOGIRI-CHECK "):
            return json.loads(line[len("OOGIRI-CHECK ") :])
    raise ValueError("the check printed no report")


def check_problems(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a check report."""
    problems: list[str] = []
    warnings: list[str] = []
    versions = report.get("versions", {})
    errors = report.get("errors", {})
    if _version_tuple(report.get("python", "0")) >= (3, 13):
        problems.append(f"python {report.get('python')}: XTuner 0.2.0 needs Python < 3.13")
    for name, error in errors.items():
        if name == "dataset":
            problems.append(f"a one-sample XTuner data set could not be built: {error}")
        elif name == "model_code":
            problems.append(f"the model folder's InternVL code does not load: {error}")
        else:
            problems.append(f"{name} does not import: {error}")
    if "model" not in report:
        warnings.append("no model folder given: the one-sample data set was not built (--model)")
    elif report.get("model_code") is None:
        warnings.append(f"{report['model']} has no InternVL model code (modeling_*.py)")
    expect = {
        "xtuner": XTUNER_VERSION,
        "transformers": TRANSFORMERS_VERSION,
        "mmengine": MMENGINE_VERSION,
    }
    for name, wanted in expect.items():
        got = versions.get(name)
        if got is not None and got != wanted:
            problems.append(f"{name} {got} (needs {wanted})")
    bnb = versions.get("bitsandbytes")
    if bnb is not None and _version_tuple(bnb) < MIN_BITSANDBYTES:
        problems.append(f"bitsandbytes {bnb} has no CUDA 13 build (needs >= 0.48)")
    if report.get("convert_script") and not report.get("convert_script_exists"):
        problems.append(f"convert_to_official.py missing at {report['convert_script']}")
    if not report.get("cuda"):
        warnings.append("CUDA is not available here: training will only run on a GPU machine")
    return problems, warnings


class VenvMissing(Exception):
    """There is no training venv where settings point: the message says what to run."""


def check_venv(
    python: Path, model: Path | None = None
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Run the check script with ``python``; returns (report, problems, warnings).

    With ``model`` (an InternVL2 folder: config + tokenizer, ideally its model code) it also
    imports that folder's model code and builds a one-sample XTuner data set from it.
    """
    if not Path(python).exists():
        raise VenvMissing(
            f"no training venv at {Path(python).parent.parent}: run `oogiri train setup` "
            "(or set OOGIRI_TRAINING__XTUNER_PYTHON to an existing one)"
        )
    env = _no_pythonpath()
    if model is not None:
        env["OOGIRI_CHECK_MODEL"] = str(model)
    proc = subprocess.run(
        [str(python), "-c", CHECK_SCRIPT], capture_output=True, text=True, check=False, env=env
    )
    try:
        report = parse_check(proc.stdout)
    except ValueError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {}, [f"{python} could not run the check: {' | '.join(tail)}"], []
    problems, warnings = check_problems(report)
    return report, problems, warnings


# --------------------------------------------------------------------------- the quick probe

PROBE_SCRIPT = (
    "import importlib.util, sys; "
    "print('OOGIRI-PROBE', '%d.%d' % sys.version_info[:2], "
    "importlib.util.find_spec('xtuner') is not None)"
)


def probe_python(
    python: Path, env: dict[str, str] | None = None, timeout_s: float = 60.0
) -> list[str]:
    """Problems of the training venv's python found in about a second: it runs, is a Python
    XTuner supports and finds the ``xtuner`` package (located, not imported: the full import is
    ``oogiri train setup --check``'s job). Empty when it looks fit to train."""
    fix = "run `oogiri train setup` (again)"
    try:
        proc = subprocess.run(
            [str(python), "-c", PROBE_SCRIPT],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
            env=clean_env() if env is None else env,
        )
    except subprocess.TimeoutExpired:
        return [f"training python {python} does not run: no answer in {timeout_s:.0f} s; {fix}"]
    except OSError as exc:
        return [f"training python {python} does not run ({exc.strerror or exc}); {fix}"]
    report = next(
        (line.split() for line in proc.stdout.splitlines() if line.startswith("OOGIRI-PROBE ")),
        None,
    )
    if proc.returncode != 0 or report is None or len(report) != 3:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:]) or "no output"
        return [f"training python {python} does not run (exit {proc.returncode}: {tail}); {fix}"]
    _, version, has_xtuner = report
    problems = []
    if _version_tuple(version) >= (3, 13):
        problems.append(
            f"training python {python} is Python {version}: XTuner 0.2.0 needs Python < 3.13; "
            "run `oogiri train setup --python python3.12`"
        )
    if has_xtuner != "True":
        problems.append(f"xtuner is not installed for {python}: {fix}")
    return problems
