"""Ratings → an XTuner InternVL data set (``oogiri train export``).

Output folder::

    train.json       well-rated jokes, XTuner InternVL format (the tutorial's), images/ beside it
    heldout.json     same format: the images the gate evaluates on (never trained on)
    base_mix.json    the base data set (e.g. CLoT_cn_2000) sampled/repeated to the configured ratio;
                     its image paths stay relative to the base image folder
    negatives.json   thumbs-down jokes (same format plus vote counts) for later preference training
    images/          the rated images, ``<sha256>.jpg``
    data_card.json   counts, like-rates, thresholds, sources

Every item is ``{"id", "image": [path], "conversations": [{"from": "human", "value": "<image>\\n"
+ prompt}, {"from": "gpt", "value": joke}]}`` where the prompt is exactly the one the model was
given when it told the joke. The serialisation is pinned (``dumps_dataset``): UTF-8, no ASCII
escaping, two-space indent, trailing newline.

The base data set is mixed here, in the exported JSON, rather than through XTuner's
``repeat_times`` (which truncates fractional values above 1): the config then lists every file
with ``repeat_times`` 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.plugins import await_results, each_implementation
from training.settings import TrainingSettings

IMAGE_TOKEN = "<image>"
JSON_INDENT = 2
FORMAT = "xtuner-internvl"

TRAIN_FILE = "train.json"
HELDOUT_FILE = "heldout.json"
BASE_FILE = "base_mix.json"
NEGATIVES_FILE = "negatives.json"
CARD_FILE = "data_card.json"
IMAGES_DIR = "images"


class ExportError(Exception):
    """The export cannot be made (bad base data set, bad hook output, …)."""


class NotEnoughData(ExportError):
    """Fewer qualifying examples than ``min_examples``: nothing worth training on yet."""


# --------------------------------------------------------------------------- format


def xtuner_item(item_id: str, image: str, prompt: str, answer: str) -> dict[str, Any]:
    """One sample in the tutorial's XTuner InternVL format (key order included)."""
    return {
        "id": item_id,
        "image": [image],
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
            {"from": "gpt", "value": answer},
        ],
    }


def dumps_dataset(items: Sequence[dict[str, Any]]) -> str:
    """The pinned serialisation of a data set file."""
    return json.dumps(list(items), ensure_ascii=False, indent=JSON_INDENT) + "\n"


def load_dataset(path: Path) -> list[dict[str, Any]]:
    """An XTuner data file: a ``.json`` list or ``.jsonl`` (one object per line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"cannot read data set {path}: {exc}") from exc
    try:
        if path.suffix == ".jsonl":
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(i, dict) for i in data):
        raise ExportError(f"{path} must hold a list of objects")
    return data


def item_image(item: dict[str, Any]) -> str | None:
    image = item.get("image")
    if isinstance(image, list | tuple):
        return str(image[0]) if len(image) == 1 else None
    return str(image) if image else None


def item_is_valid(item: dict[str, Any]) -> bool:
    """An image sample XTuner trains on: one image, ``<image>`` in a human turn, a gpt answer.

    (XTuner silently ignores the image of a sample whose text lacks ``<image>``.)
    """
    conv = item.get("conversations")
    if not item_image(item) or not isinstance(conv, list) or not conv:
        return False
    human = [c for c in conv if isinstance(c, dict) and c.get("from") == "human"]
    gpt = [c for c in conv if isinstance(c, dict) and c.get("from") == "gpt"]
    return (
        bool(human)
        and bool(gpt)
        and IMAGE_TOKEN in str(human[0].get("value", ""))
        and all(str(g.get("value", "")).strip() for g in gpt)
    )


# --------------------------------------------------------------------------- selection


def heldout_bucket(image_sha256: str) -> float:
    """A stable number in [0, 1) per image: the same image always falls on the same side."""
    digest = hashlib.sha256(b"oogiri-heldout:" + image_sha256.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_images(hashes: Iterable[str], fraction: float) -> set[str]:
    """The held-out image hashes: deterministic by hash, at least one image (and at least one
    left for training) whenever ``fraction`` > 0 and there are two images or more."""
    unique = sorted(set(hashes), key=heldout_bucket)
    if fraction <= 0 or not unique:
        return set()
    held = {h for h in unique if heldout_bucket(h) < fraction}
    if len(unique) >= 2:
        if not held:
            held = {unique[0]}
        elif len(held) == len(unique):
            held.discard(unique[-1])
    return held


def _rank_key(ex: dict[str, Any]) -> tuple[Any, ...]:
    # float: web votes at a fractional weight make scores like 1.5 (int() would tie them with 1)
    return (-float(ex.get("net", 0)), -float(ex.get("up", 0)), str(ex.get("id")))


@dataclass
class Selection:
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    negatives: list[dict[str, Any]]
    counts: dict[str, int]
    sources: dict[str, Any]


def examples_from_ratings(
    rated: Sequence[dict[str, Any]],
    settings: TrainingSettings,
    image_path: Callable[[str], Path],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rated jokes (``Store.rated_jokes()``) → example dicts, positives and negatives.

    Each example: ``id``, ``kind`` ("positive"/"negative"), ``image_sha256``, ``image_path``,
    ``prompt`` (exactly as sent to the model), ``text`` (the joke), ``joke_id``, ``user_id``
    (who asked), ``channel``, ``model_version``, ``up``, ``down``, ``net``, ``source``.
    This is what ``oogiri_training_examples`` implementations receive.
    """
    counts: Counter[str] = Counter()
    per_voter: Counter[str] = Counter()
    cap = settings.per_voter_cap
    # The voter cap counts a voter's earliest votes first (by joke, then vote order).
    out: list[dict[str, Any]] = []
    for entry in sorted(rated, key=lambda e: e["joke"].id):
        joke = entry["joke"]
        weights = web_vote_weights(entry, settings, counts)
        up: float = 0
        down: float = 0
        for voter, value in entry["votes"]:
            counts["votes"] += 1
            weight = weights.get(voter, 1)
            if weight == 0:
                continue
            if cap is not None and per_voter[voter] >= cap:
                counts["votes_over_voter_cap"] += 1
                continue
            per_voter[voter] += 1
            if value > 0:
                up += weight
            elif value < 0:
                down += weight
        up, down = _whole(up), _whole(down)
        counts["rated_jokes"] += 1
        net = up - down
        if up + down < settings.min_votes:
            counts["too_few_votes"] += 1
            continue
        if net >= settings.min_net_score and joke.text.strip():
            kind = "positive"
        elif net < 0:
            kind = "negative"
        else:
            counts["below_net_score"] += 1
            continue
        out.append(
            {
                "id": f"oogiri-{joke.id}",
                "kind": kind,
                "image_sha256": joke.image_sha256,
                "image_path": str(image_path(joke.image_sha256)),
                "prompt": joke.prompt,
                "text": joke.text,
                "joke_id": joke.id,
                "user_id": joke.user_id,
                "channel": joke.channel,
                "model_version": joke.model_version,
                "up": up,
                "down": down,
                "net": net,
                "source": "ratings",
            }
        )
    counts["voters"] = len(per_voter)
    return out, dict(counts)


def _is_web_vote(voter: str, source: tuple[str, str | None] | None) -> bool:
    return (source[0] if source else voter.partition(":")[0]) == "web"


def web_vote_weights(
    entry: dict[str, Any], settings: TrainingSettings, counts: Counter[str]
) -> dict[str, float]:
    """Voter → weight for this joke's web votes under ``settings.web_votes`` (others count 1).

    A web identity is a cookie anyone can mint, so 500 of them from one address once put an
    attacker's joke into the training set. By default ("networks") web votes count
    ``web_vote_weight`` each, and only when they come from at least ``web_min_networks``
    distinct networks (votes stored before networks were recorded count as one unknown
    network).
    """
    sources: dict[str, tuple[str, str | None]] = entry.get("vote_sources", {})
    web = [voter for voter, _ in entry["votes"] if _is_web_vote(voter, sources.get(voter))]
    if not web or settings.web_votes == "equal":
        return {}
    weight = settings.web_vote_weight
    if settings.web_votes == "exclude" or weight == 0:
        counts["web_votes_excluded"] += len(web)
        return dict.fromkeys(web, 0.0)
    if settings.web_votes == "networks":
        networks = {(sources.get(v) or ("web", None))[1] or "unknown" for v in web}
        if len(networks) < settings.web_min_networks:
            counts["web_votes_too_few_networks"] += len(web)
            return dict.fromkeys(web, 0.0)
    counts["web_votes_weighted"] += len(web)
    return dict.fromkeys(web, weight)


def _whole(x: float) -> float:
    """Vote sums stay ints when every weight was 1 (the data card and tests read them)."""
    return int(x) if float(x).is_integer() else round(x, 3)


def _check_example(ex: Any) -> dict[str, Any]:
    if not isinstance(ex, dict):
        raise ExportError(f"a training example must be a dict, got {type(ex).__name__}")
    missing = [k for k in ("id", "prompt", "text") if not isinstance(ex.get(k), str)]
    if not ex.get("image_sha256") and not ex.get("image_path"):
        missing.append("image_sha256|image_path")
    if missing:
        raise ExportError(f"training example {ex.get('id')!r} lacks {', '.join(missing)}")
    ex.setdefault("kind", "positive")
    if ex["kind"] not in ("positive", "negative"):
        raise ExportError(f"training example {ex['id']!r} has kind {ex['kind']!r}")
    if not ex.get("image_sha256"):
        ex["image_sha256"] = hashlib.sha256(Path(ex["image_path"]).read_bytes()).hexdigest()
    for key in ("up", "down", "net"):
        ex.setdefault(key, 0)
    ex.setdefault("source", "plugin")
    return ex


async def apply_hooks(pm: Any, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``oogiri_training_examples`` implementations as a chain (pluggy's call order): each
    sees the previous one's result; returning None keeps the list (in-place edits count)."""
    if pm is None:
        return examples
    for _plugin, caller in each_implementation(pm, "oogiri_training_examples"):
        for result in await await_results(caller, examples=examples):
            if result is not None:
                examples = list(result)
    return [_check_example(ex) for ex in examples]


def select(
    examples: Sequence[dict[str, Any]], settings: TrainingSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Dedupe, per-image and per-user caps, held-out split. Returns train, heldout, negatives."""
    counts: Counter[str] = Counter()
    positives = sorted((e for e in examples if e["kind"] == "positive"), key=_rank_key)
    negatives = sorted((e for e in examples if e["kind"] == "negative"), key=_rank_key)

    # The same joke on the same picture counts once (best-rated copy wins; whitespace and case
    # do not make a joke different).
    seen: set[tuple[str, str]] = set()
    unique: list[dict[str, Any]] = []
    for ex in positives:
        key = (ex["image_sha256"], "".join(ex["text"].split()).casefold())
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        unique.append(ex)

    # One picture contributes at most max_jokes_per_image jokes (its best ones).
    per_image: Counter[str] = Counter()
    kept: list[dict[str, Any]] = []
    for ex in unique:
        if per_image[ex["image_sha256"]] >= settings.max_jokes_per_image:
            counts["over_image_cap"] += 1
            continue
        per_image[ex["image_sha256"]] += 1
        kept.append(ex)

    # One person cannot steer the model: at most per_user_cap examples from jokes they asked for.
    per_user: Counter[str] = Counter()
    capped: list[dict[str, Any]] = []
    for ex in kept:
        user = ex.get("user_id")
        if user is not None:
            if per_user[user] >= settings.per_user_cap:
                counts["over_user_cap"] += 1
                continue
            per_user[user] += 1
        capped.append(ex)

    fraction = settings.heldout_fraction
    held = split_images([e["image_sha256"] for e in capped], fraction)
    train = [e for e in capped if e["image_sha256"] not in held]
    heldout = [e for e in capped if e["image_sha256"] in held]
    positive_images = {e["image_sha256"] for e in capped}
    for ex in negatives:
        sha = ex["image_sha256"]
        in_held = sha in held or (sha not in positive_images and heldout_bucket(sha) < fraction)
        ex["split"] = "heldout" if in_held else "train"
    counts["positives"] = len(capped)
    counts["negatives"] = len(negatives)
    counts["train"] = len(train)
    counts["heldout"] = len(heldout)
    return train, heldout, negatives, dict(counts)


# --------------------------------------------------------------------------- base mix


def sample_to_count(items: Sequence[Any], n: int, seed: int) -> list[Any]:
    """Exactly ``n`` items: whole copies of ``items`` plus a seeded sample for the remainder
    (kept in source order), so ratios below and above 1 — fractional ones too — come out right."""
    if n <= 0 or not items:
        return []
    whole, rest = divmod(n, len(items))
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(items)), rest))
    return list(items) * whole + [items[i] for i in picked]


@dataclass
class BaseMix:
    items: list[dict[str, Any]]
    image_folder: Path | None
    info: dict[str, Any]


def mix_base(settings: TrainingSettings, n_rated: int, exclude_hashes: set[str]) -> BaseMix:
    """The base data set sampled to ``round(base_ratio × n_rated)`` items.

    Items whose image is a held-out image (same file hash) are dropped so evaluation never sees
    a picture the candidate trained on.
    """
    if settings.base_dataset is None or settings.base_ratio <= 0:
        return BaseMix([], None, {"path": None, "used": 0})
    path = Path(settings.base_dataset)
    folder = Path(settings.base_image_folder or path.parent)
    items = load_dataset(path)
    valid: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for item in items:
        image = item_image(item)
        if not item_is_valid(item) or image is None:
            dropped["invalid"] += 1
            continue
        file = folder / image
        if not file.is_file():
            dropped["missing_image"] += 1
            continue
        if exclude_hashes and hashlib.sha256(file.read_bytes()).hexdigest() in exclude_hashes:
            dropped["heldout_image"] += 1
            continue
        valid.append(item)
    if items and not valid:
        raise ExportError(f"no usable sample in base data set {path} ({dict(dropped)})")
    target = round(settings.base_ratio * n_rated)
    chosen = sample_to_count(valid, target, settings.seed)
    info = {
        "path": str(path),
        "image_folder": str(folder),
        "items": len(items),
        "usable": len(valid),
        "dropped": dict(dropped),
        "ratio": settings.base_ratio,
        "used": len(chosen),
        "repeats": round(len(chosen) / len(valid), 4) if valid else 0.0,
    }
    return BaseMix(chosen, folder, info)


# --------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    out_dir: Path
    train: int
    heldout: int
    negatives: int
    base: int
    data_card: dict[str, Any]
    base_image_folder: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def train_samples(self) -> int:
        """Samples XTuner iterates over per epoch."""
        return self.train + self.base

    @property
    def data_paths(self) -> list[Path]:
        paths = [self.files["train"]]
        if self.base:
            paths.append(self.files["base"])
        return paths

    @property
    def image_folders(self) -> list[Path]:
        folders = [self.out_dir]
        if self.base:
            assert self.base_image_folder is not None
            folders.append(self.base_image_folder)
        return folders


def _like_rate(examples: Iterable[dict[str, Any]]) -> float | None:
    up = down = 0.0
    for ex in examples:
        up += float(ex.get("up", 0))
        down += float(ex.get("down", 0))
    return round(up / (up + down), 4) if up + down else None


def _image_name(ex: dict[str, Any]) -> str:
    suffix = Path(ex["image_path"]).suffix.lower() or ".jpg"
    return f"{IMAGES_DIR}/{ex['image_sha256']}{suffix}"


def _to_item(ex: dict[str, Any]) -> dict[str, Any]:
    return xtuner_item(ex["id"], _image_name(ex), ex["prompt"], ex["text"])


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


async def export_dataset(
    store: Any,
    settings: TrainingSettings,
    out_dir: Path,
    pm: Any = None,
    now: datetime | None = None,
) -> ExportResult:
    """Write the training data folder ``out_dir`` (must be empty or absent) from the store.

    Raises ``NotEnoughData`` when fewer than ``min_examples`` jokes qualify for training.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"export folder {out_dir} is not empty")
    rated = await store.rated_jokes()
    if hasattr(store, "session"):  # a real Store: removed jokes and blocked voters are left out
        from bot.moderation import filter_rated

        rated, moderated = await filter_rated(store, rated)
        if any(moderated.values()):
            logging.getLogger(__name__).info("export: moderation left out %s", moderated)
    examples, rating_counts = examples_from_ratings(rated, settings, store.image_path)
    before = len(examples)
    examples = await apply_hooks(pm, examples)
    train, heldout, negatives, sel_counts = select(examples, settings)
    if len(train) < settings.min_examples:
        raise NotEnoughData(
            f"{len(train)} training example(s) qualify (min_examples is {settings.min_examples}; "
            f"thresholds: min_votes={settings.min_votes}, min_net_score={settings.min_net_score})"
        )
    held_hashes = {e["image_sha256"] for e in heldout}
    base = mix_base(settings, len(train), held_hashes)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / IMAGES_DIR).mkdir(exist_ok=True)
    for ex in [*train, *heldout, *negatives]:
        dest = out_dir / _image_name(ex)
        if not dest.exists():
            try:
                shutil.copyfile(ex["image_path"], dest)
            except OSError as exc:
                raise ExportError(f"image of {ex['id']} unavailable: {exc}") from exc

    files = {
        "train": out_dir / TRAIN_FILE,
        "heldout": out_dir / HELDOUT_FILE,
        "negatives": out_dir / NEGATIVES_FILE,
        "card": out_dir / CARD_FILE,
    }
    _write(files["train"], dumps_dataset([_to_item(e) for e in train]))
    _write(files["heldout"], dumps_dataset([_to_item(e) for e in heldout]))
    negative_items = [
        {**_to_item(e), "up": e["up"], "down": e["down"], "split": e["split"]} for e in negatives
    ]
    _write(files["negatives"], dumps_dataset(negative_items))
    if base.items:
        files["base"] = out_dir / BASE_FILE
        _write(files["base"], dumps_dataset(base.items))

    kept = [*train, *heldout]
    counts = {
        **rating_counts,
        "examples": before,
        "after_hooks": len(examples),
        **sel_counts,
        "base": len(base.items),
        "train_samples": len(train) + len(base.items),
    }
    card = {
        "format": FORMAT,
        "created_at": (now or datetime.now(UTC)).isoformat(),
        "thresholds": {
            "min_votes": settings.min_votes,
            "min_net_score": settings.min_net_score,
            "per_user_cap": settings.per_user_cap,
            "per_voter_cap": settings.per_voter_cap,
            "max_jokes_per_image": settings.max_jokes_per_image,
            "heldout_fraction": settings.heldout_fraction,
            "base_ratio": settings.base_ratio,
            "seed": settings.seed,
        },
        "counts": counts,
        "like_rate": {
            "qualifying": _like_rate(kept),
            "train": _like_rate(train),
            "heldout": _like_rate(heldout),
            "negatives": _like_rate(negatives),
        },
        "sources": {
            "rated": {
                "users": len({e.get("user_id") for e in kept}),
                "images": len({e["image_sha256"] for e in kept}),
                "channels": dict(Counter(str(e.get("channel")) for e in kept)),
                "model_versions": dict(Counter(str(e.get("model_version")) for e in kept)),
                "prompts": dict(Counter(e["prompt"] for e in kept).most_common(5)),
                "origin": dict(Counter(str(e.get("source")) for e in kept)),
            },
            "base": base.info,
        },
        "files": {k: p.name for k, p in files.items()} | {"images": f"{IMAGES_DIR}/"},
    }
    _write(files["card"], json.dumps(card, ensure_ascii=False, indent=JSON_INDENT) + "\n")
    return ExportResult(
        out_dir=out_dir,
        train=len(train),
        heldout=len(heldout),
        negatives=len(negatives),
        base=len(base.items),
        data_card=card,
        base_image_folder=base.image_folder,
        files=files,
    )


def load_export(out_dir: Path) -> ExportResult:
    """An export folder written earlier (read back through its data card)."""
    out_dir = Path(out_dir)
    try:
        card = json.loads((out_dir / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{out_dir} is not an export folder ({CARD_FILE}: {exc})") from exc
    counts = card["counts"]
    folder = card["sources"]["base"].get("image_folder")
    files = {k: out_dir / v for k, v in card["files"].items() if k != "images"}
    return ExportResult(
        out_dir=out_dir,
        train=counts["train"],
        heldout=counts["heldout"],
        negatives=counts["negatives"],
        base=counts["base"],
        data_card=card,
        base_image_folder=Path(folder) if folder else None,
        files=files,
    )
