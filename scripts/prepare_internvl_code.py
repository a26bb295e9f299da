#!/usr/bin/env python3
"""Extract InternVL2's remote code (InternLM2 path) from OpenGVLab's InternVL repository.

XTuner's ``InternVL_V1_5`` loads the base model folder with ``trust_remote_code``, so the folder it
fine-tunes needs InternVL's *modeling* code, which oogiri does not ship (the tiny model builder
writes only the project's own config class, enough for LMDeploy). InternVL's training repository
keeps that code as a package (``internvl.model.internlm2…``); Hugging Face remote code needs flat
sibling files with relative imports. This script reads the files from a git checkout or a bare
mirror (``git show REV:path``; nothing is downloaded), flattens them into ``ext/internvl2-code/``
(git-ignored: the output is OpenGVLab's code, never committed here) and rewrites only import
statements:

- ``from internvl.model.internlm2.X import …``, ``from internvl.model.internvl_chat.X import …``
  and ``from internvl.conversation import …`` become ``from .X import …``;
- the Phi-3 backend, which the InternLM2 path never uses, is not extracted: its imports become
  ``Name = None`` (a Phi-3 model then fails at construction; InternVL2-2B is InternLM2);
- any other ``internvl`` import is an error, so that upstream changes are noticed.

The result is the same file set as a real InternVL2-2B download: ``configuration_*``,
``modeling_*``, ``tokenization_internlm2*`` and ``conversation.py``, plus ``SOURCE.json``
(commit, per-file sha256, the rewrites).

``install MODEL_DIR`` copies the ``*.py`` files into a model folder (overwriting the project's
``configuration_internvl_chat.py``: the training copy of the base uses InternVL's full code set,
their config class included) and sets ``config.json``'s ``auto_map`` like InternVL2-2B's
(``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``). It needs only the standard library,
so it runs on the device too.

    python scripts/prepare_internvl_code.py                      # extract into ext/internvl2-code
    python scripts/prepare_internvl_code.py install /tmp/base-train
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MIRROR = Path("/work/.mirror/OpenGVLab+InternVL/repo")
DEFAULT_OUT = ROOT / "ext" / "internvl2-code"

PKG = "internvl_chat/internvl"
# flat name -> path inside the InternVL repository
FILES: dict[str, str] = {
    "configuration_intern_vit.py": f"{PKG}/model/internvl_chat/configuration_intern_vit.py",
    "configuration_internvl_chat.py": f"{PKG}/model/internvl_chat/configuration_internvl_chat.py",
    "modeling_intern_vit.py": f"{PKG}/model/internvl_chat/modeling_intern_vit.py",
    "modeling_internvl_chat.py": f"{PKG}/model/internvl_chat/modeling_internvl_chat.py",
    "configuration_internlm2.py": f"{PKG}/model/internlm2/configuration_internlm2.py",
    "modeling_internlm2.py": f"{PKG}/model/internlm2/modeling_internlm2.py",
    "tokenization_internlm2.py": f"{PKG}/model/internlm2/tokenization_internlm2.py",
    "tokenization_internlm2_fast.py": f"{PKG}/model/internlm2/tokenization_internlm2_fast.py",
    "conversation.py": f"{PKG}/conversation.py",
}
# package prefixes whose modules are flattened next to each other
FLATTENED = ("internvl.model.internlm2.", "internvl.model.internvl_chat.", "internvl.")
# optional LLM backends that are not extracted: their imported names become None
DROPPED = ("internvl.model.phi3",)

AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}


class ExtractError(RuntimeError):
    pass


def _git(repo: Path, *args: str, failure: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise ExtractError(f"{failure}: {proc.stderr.strip()}")
    return proc.stdout


def git_show(repo: Path, rev: str, path: str) -> str:
    return _git(repo, "show", f"{rev}:{path}", failure=f"git show {rev}:{path} in {repo} failed")


def git_commit(repo: Path, rev: str) -> str:
    out = _git(repo, "rev-parse", f"{rev}^{{commit}}", failure=f"{repo} has no commit {rev}")
    return out.strip()


def _flat_module(module: str) -> str | None:
    """``internvl.model.internlm2.modeling_internlm2`` -> ``modeling_internlm2`` (or None)."""
    for prefix in FLATTENED:
        if module.startswith(prefix):
            rest = module[len(prefix) :]
            if "." not in rest:
                return rest
    return None


def rewrite_imports(source: str, name: str, available: set[str]) -> tuple[str, list[str]]:
    """Rewrite the ``internvl`` imports of one file; returns (new source, notes)."""
    tree = ast.parse(source, filename=name)
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []  # (first line, last line, replacement), 1-based
    notes: list[str] = []
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] == "internvl"]
            if bad:
                problems.append(f"{name}:{node.lineno}: import {', '.join(bad)}")
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        assert node.end_lineno is not None
        first = lines[node.lineno - 1]
        indent = first[: len(first) - len(first.lstrip())]
        old = "".join(lines[node.lineno - 1 : node.end_lineno]).strip()
        if node.level > 0:  # already relative: must stay a sibling
            if node.level != 1 or (node.module or "") + ".py" not in available:
                problems.append(f"{name}:{node.lineno}: {old} has no flat sibling")
            continue
        module = node.module or ""
        if module.split(".")[0] != "internvl":
            continue
        if module.startswith(DROPPED):
            stub = "".join(
                f"{indent}{a.asname or a.name} = None  # oogiri: {module} is not extracted "
                "(InternLM2 only)\n"
                for a in node.names
            )
            edits.append((node.lineno, node.end_lineno, stub))
            notes.append(f"{old}  ->  stubbed as None")
            continue
        flat = _flat_module(module)
        if flat is None or flat + ".py" not in available:
            problems.append(f"{name}:{node.lineno}: {old} (not among the extracted files)")
            continue
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        new = f"{indent}from .{flat} import {names}\n"
        edits.append((node.lineno, node.end_lineno, new))
        notes.append(f"{old}  ->  {new.strip()}")
    if problems:
        raise ExtractError("unhandled imports:\n  " + "\n  ".join(problems))
    for start, end, text in sorted(edits, reverse=True):
        lines[start - 1 : end] = [text]
    out = "".join(lines)
    ast.parse(out, filename=name)  # still valid Python
    return out, notes


def extract(repo: Path, rev: str, out: Path) -> dict:
    commit = git_commit(repo, rev)
    available = set(FILES)
    sources = {flat: git_show(repo, commit, path) for flat, path in FILES.items()}
    rewritten: dict[str, str] = {}
    record: dict = {
        "repository": "https://github.com/OpenGVLab/InternVL (MIT License)",
        "mirror": str(repo),
        "commit": commit,
        "note": "extracted by scripts/prepare_internvl_code.py; OpenGVLab's code, not oogiri's",
        "files": {},
    }
    for flat, text in sources.items():
        new, notes = rewrite_imports(text, flat, available)
        rewritten[flat] = new
        record["files"][flat] = {
            "from": FILES[flat],
            "sha256_upstream": hashlib.sha256(text.encode()).hexdigest(),
            "sha256": hashlib.sha256(new.encode()).hexdigest(),
            "rewrites": notes,
        }
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for flat, text in rewritten.items():
        (tmp / flat).write_text(text, encoding="utf-8")
    (tmp / "SOURCE.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return record


def install(code: Path, model_dir: Path) -> list[str]:
    """Copy the flattened code into ``model_dir`` and point auto_map at InternVL's classes."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ExtractError(f"{model_dir} has no config.json")
    files = sorted(code.glob("*.py"))
    if not any(f.name == "modeling_internvl_chat.py" for f in files):
        raise ExtractError(f"{code} holds no extracted code: run this script without 'install'")
    for f in files:
        shutil.copy2(f, model_dir / f.name)
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = {**config.get("auto_map", {}), **AUTO_MAP}
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [f.name for f in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--repo", type=Path, default=DEFAULT_MIRROR, help="InternVL git dir")
    parser.add_argument("--rev", default="HEAD", help="commit or branch to read")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    inst = sub.add_parser("install", help="copy the extracted code into a model folder")
    inst.add_argument("model_dir", type=Path)
    inst.add_argument("--code", type=Path, default=DEFAULT_OUT, help="extracted code folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            names = install(args.code, args.model_dir)
            print(f"installed {len(names)} files into {args.model_dir}: {', '.join(names)}")
            print(f"auto_map: {json.dumps(AUTO_MAP)}")
            return 0
        record = extract(args.repo, args.rev, args.out)
    except ExtractError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"extracted {len(record['files'])} files from {record['commit'][:12]} into {args.out}")
    for flat, info in record["files"].items():
        for note in info["rewrites"]:
            print(f"  {flat}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
