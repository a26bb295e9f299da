"""InternVL tooling the engines need: the tiny random model, InternVL2 → transformers conversion,
and the config code shipped for ``trust_remote_code`` folders.

It lives beside the engines that use it (``transformers_engine``, ``lmdeploy_server``), not in the
core; its commands (``oogiri dev make-tiny-model``, ``oogiri dev convert-internvl2``) are added by
the transformers engine plugin through ``oogiri_register_commands``.
"""

from __future__ import annotations

from pathlib import Path

#: LMDeploy-style chat template of InternVL2 (InternLM2 chat format) that the bot ships.
CHAT_TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "internvl2_internlm2.json"
