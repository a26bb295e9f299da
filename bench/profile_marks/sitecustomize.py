"""Profiler marks inside LMDeploy's InternVL2 model (bench/goodput.py's profile group only).

Put this folder first on PYTHONPATH of an api_server started with ``OOGIRI_PROFILE_MARKS=1``
and LMDeploy's own torch profiler on (``LMDEPLOY_PROFILE_CUDA=1``, ``LMDEPLOY_PROFILE_CPU=1``):
the vision encoder and the eager LLM forward then appear as named ranges (``oogiri::vision``,
``oogiri::prefill``, ``oogiri::decode_eager``) that ``bench/profile_trace.py`` uses to split a
joke's GPU time. Decode steps replayed from CUDA graphs run no Python and are recognised by
their ``cudaGraphLaunch``. The model module is patched when LMDeploy imports it (nothing is
imported here); without the environment variable this file does nothing.
"""

import functools
import os
import sys

TARGET = "lmdeploy.pytorch.models.internvl"


def _patch(module):
    from torch.profiler import record_function

    model = module.InternVLChatModel

    def mark(fn, name_of):
        @functools.wraps(fn)
        def wrapped(self, *args, **kwargs):
            with record_function(name_of(args, kwargs)):
                return fn(self, *args, **kwargs)

        return wrapped

    def forward_name(_args, kwargs):
        meta = kwargs.get("attn_metadata")
        return "oogiri::decode_eager" if getattr(meta, "is_decoding", False) else "oogiri::prefill"

    for attr in ("extract_feature", "extract_and_compress"):
        if hasattr(model, attr):
            setattr(model, attr, mark(getattr(model, attr), lambda *_: "oogiri::vision"))
    model.forward = mark(model.forward, forward_name)
    print("oogiri profile marks: on", flush=True)


class _PatchOnImport:
    """A meta-path finder that lets the real finder load TARGET, then patches it."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                original = spec.loader.exec_module

                def exec_module(module, original=original):
                    original(module)
                    try:
                        _patch(module)
                    except Exception as exc:  # never stop the server for a profiling aid
                        print(f"oogiri profile marks: off ({exc!r})", flush=True)

                spec.loader.exec_module = exec_module
                return spec
        return None


if os.environ.get("OOGIRI_PROFILE_MARKS") == "1":
    sys.meta_path.insert(0, _PatchOnImport())
