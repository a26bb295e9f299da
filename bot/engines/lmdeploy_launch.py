"""Run LMDeploy's CLI with its API key taken from the environment, never from the command line.

LMDeploy 0.18 takes the keys of ``serve api_server`` and ``serve proxy`` only as the argument
``--api-keys KEY …`` (``lmdeploy/cli/utils.py``: ``ArgumentHelper.api_keys``;
``lmdeploy/cli/serve.py`` hands ``args.api_keys`` to ``serve(...)``); it reads no environment
variable or file for them. A
process's command line is readable by every local user (``/proc/PID/cmdline``, ``ps``); its
environment only by its owner and root. Managed mode therefore runs::

    LMDEPLOY_LAUNCH_API_KEY=KEY  python .../bot/engines/lmdeploy_launch.py serve api_server MODEL …

and this launcher

1. takes the key out of its environment (LMDeploy's workers, spawned later, do not inherit it);
2. appends ``--api-keys=KEY`` to the arguments *inside* the process (``sys.argv``, which does not
   change ``/proc/PID/cmdline``; the ``=`` form keeps a key that starts with ``-`` a value);
3. runs ``lmdeploy`` as ``python -m lmdeploy`` would (``runpy``), in this process.

``--module NAME`` or ``--script FILE.py`` first runs that module or script instead of ``lmdeploy``
(managed mode uses them for a ``server_command`` that runs Python, e.g. LMDeploy in another
virtualenv). With the key set, the arguments must not carry ``--api-keys`` too (exit 2); without
it, ``--api-keys`` on the command line is passed on with a warning (it is visible to everyone).

Standard library only, and LMDeploy is imported only when the launcher runs: the file also works
as a script under any Python that has LMDeploy, without the bot installed there.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

API_KEY_ENV = "LMDEPLOY_LAUNCH_API_KEY"  # not OOGIRI_…: that prefix is the bot's settings
LAUNCH_FILE = Path(__file__).resolve()
KEYED_COMMANDS = (("serve", "api_server"), ("serve", "proxy"))  # those with --api-keys


class LaunchError(Exception):
    """The launcher's arguments or environment cannot be run as asked."""


def is_api_keys_flag(arg: str) -> bool:
    """``--api-keys``, ``--api-keys=K``, ``--api_keys`` or an abbreviation argparse accepts."""
    if not arg.startswith("--api"):
        return False
    name = arg.split("=", 1)[0].replace("_", "-")  # LMDeploy's parser accepts either spelling
    return "--api-keys".startswith(name)


def lmdeploy_args(args: Sequence[str], api_key: str | None) -> list[str]:
    """The arguments LMDeploy's CLI parses (``sys.argv[1:]``) for ``args`` and ``api_key``."""
    args = list(args)
    if not api_key:
        return args
    if any(is_api_keys_flag(a) for a in args):
        raise LaunchError(
            f"{API_KEY_ENV} is set and the arguments carry --api-keys as well; give the key "
            "once, in the environment (remove --api-keys from engine.extra_args)"
        )
    if tuple(args[:2]) not in KEYED_COMMANDS:
        return args  # no server, no key to hand over
    return [*args, f"--api-keys={api_key}"]


def split_target(args: Sequence[str]) -> tuple[str, str, list[str]]:
    """``("module" | "script", name, rest)`` from ``[--module M | --script F] REST…``."""
    args = list(args)
    if args[:1] in (["--module"], ["--script"]):
        if len(args) < 2:
            raise LaunchError(f"{args[0]} needs a value")
        return args[0][2:], args[1], args[2:]
    return "module", "lmdeploy", args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the target with the key from :data:`API_KEY_ENV` in its ``sys.argv``."""
    raw = list(sys.argv[1:] if argv is None else argv)
    api_key = os.environ.pop(API_KEY_ENV, None) or None  # children of LMDeploy do not get it
    try:
        kind, target, args = split_target(raw)
        full = lmdeploy_args(args, api_key)
    except LaunchError as exc:
        print(f"lmdeploy_launch: {exc}", file=sys.stderr, flush=True)
        return 2
    if api_key is None and any(is_api_keys_flag(a) for a in args):
        print(
            "lmdeploy_launch: WARNING: --api-keys on the command line is visible to every local "
            f"user (ps, /proc/PID/cmdline); hand the key over in {API_KEY_ENV} instead",
            file=sys.stderr,
            flush=True,
        )
    saved = sys.argv
    sys.argv = [target, *full]
    try:
        if kind == "script":
            sys.path.insert(0, str(Path(target).resolve().parent))  # as `python FILE.py` does
            runpy.run_path(target, run_name="__main__")
        else:
            # alter_sys: __main__ is the target's, as with `python -m` (multiprocessing's spawn
            # then re-imports LMDeploy's __main__, not this launcher, in its workers)
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    if sys.path and Path(sys.path[0] or ".").resolve() == LAUNCH_FILE.parent:
        # run as a script: bot/engines/ must not shadow top-level modules; put the working
        # directory there instead, as `python -m lmdeploy` has it
        sys.path[0] = os.getcwd()
    sys.exit(main())
