"""The control round of bench/learning_loop: train on the answers the audience disliked.

A plugin (``oogiri_training_examples``) registered for the experiment's own processes only (an
entry point in its state folder), active only while ``OOGIRI_LEARNING_LOOP_CONTROL`` is set. It
simulates a broken data pipeline, not a change of taste: the gate's held-out images keep their
ratings, and on the training images the thumbs-down answers replace the thumbs-up ones —
``matched`` (default) as many per model version as there were liked ones (only the labels
differ from a real round), ``all`` every one.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from typing import Any

from bot.hookspecs import hookimpl

ENV = "OOGIRI_LEARNING_LOOP_CONTROL"
MODES = ("matched", "all")


def control_examples(
    examples: list[dict[str, Any]], heldout_fraction: float, mode: str, seed: int = 0
) -> list[dict[str, Any]]:
    """The control's examples: the held-out side as rated, the training side's negatives as
    positives (``source`` "control"), and no thumbs-up answer on the training side."""
    from training.export import heldout_bucket

    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")

    def held(ex: dict[str, Any]) -> bool:
        return heldout_bucket(str(ex["image_sha256"])) < heldout_fraction

    reference = [ex for ex in examples if held(ex)]
    liked: dict[str, int] = defaultdict(int)
    disliked: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ex in examples:
        if held(ex):
            continue
        version = str(ex.get("model_version"))
        if ex.get("kind") == "negative":
            disliked[version].append(ex)
        else:
            liked[version] += 1
    rng = random.Random(seed)
    chosen: list[dict[str, Any]] = []
    for version in sorted(disliked):
        pool = sorted(disliked[version], key=lambda ex: str(ex["id"]))
        if mode == "matched":
            pool = rng.sample(pool, min(len(pool), liked.get(version, 0)))
        chosen += pool
    swapped = [{**ex, "kind": "positive", "source": "control"} for ex in chosen]
    return keep_yardstick(reference + swapped, heldout_fraction)


def keep_yardstick(examples: list[dict[str, Any]], heldout_fraction: float) -> list[dict[str, Any]]:
    """Drop swapped examples from pictures the export's split would hold out.

    The split holds out at least one picture; when no picture on the held-out side has a liked
    answer it takes the training side's lowest one, which would put disliked answers into the
    gate's yardstick. Without them the yardstick may end up empty, and the gate then says no.
    """
    from training.export import split_images

    while True:
        positives = [ex for ex in examples if ex.get("kind") == "positive"]
        held = split_images([str(ex["image_sha256"]) for ex in positives], heldout_fraction)
        bad = {
            ex["image_sha256"]
            for ex in positives
            if ex.get("source") == "control" and ex["image_sha256"] in held
        }
        if not bad:
            return examples
        examples = [
            ex
            for ex in examples
            if not (ex.get("source") == "control" and ex["image_sha256"] in bad)
        ]


@hookimpl
def oogiri_training_examples(examples: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    mode = os.environ.get(ENV, "").strip()
    if not mode:
        return None
    from bot.settings import Settings

    training = Settings().training
    return control_examples(examples, training.heldout_fraction, mode, training.seed)
