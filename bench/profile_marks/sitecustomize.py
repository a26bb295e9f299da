"""Profiler marks inside LMDeploy's InternVL2 model (bench/goodput.py's profile group only).

Put this folder first on PYTHONPATH of an api_server started with ``OOGIRI_PROFILE_MARKS=1``
and LMDeploy's own torch profiler on (``LMDEPLOY_PROFILE_CUDA=1``, ``LMDEPLOY_PROFILE_CPU=1``):
the vision encoder and the eager LLM forward then appear as named ranges (``oogiri::vision``,
``oogiri::prefill``, ``oogiri::decode_eager``) that ``bench/profile_trace.py`` uses to split a
joke's GPU time. Decode steps replayed from CUDA graphs run no Python and are recognised by
their ``cudaGraphLaunch``. Without the environment variable this file does nothing.
"""

import functools
import os

if os.environ.get("OOGIRI_PROFILE_MARKS") == "1":
    try:
        from lmdeploy.pytorch.models import internvl
        from torch.profiler import record_function

        model = internvl.InternVLChatModel

        def _mark(fn, name_of):
            @functools.wraps(fn)
            def wrapped(self, *args, **kwargs):
                with record_function(name_of(self, args, kwargs)):
                    return fn(self, *args, **kwargs)

            return wrapped

        def _forward_name(_self, _args, kwargs):
            meta = kwargs.get("attn_metadata")
            decoding = bool(getattr(meta, "is_decoding", False))
            return "oogiri::decode_eager" if decoding else "oogiri::prefill"

        for attr in ("extract_feature", "extract_and_compress"):
            if hasattr(model, attr):
                setattr(model, attr, _mark(getattr(model, attr), lambda *_: "oogiri::vision"))
        model.forward = _mark(model.forward, _forward_name)
        print("oogiri profile marks: on", flush=True)
    except Exception as exc:  # never stop the server for a profiling aid
        print(f"oogiri profile marks: off ({type(exc).__name__}: {exc})", flush=True)
