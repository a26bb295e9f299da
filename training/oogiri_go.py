"""The seed's training set from the Oogiri-GO data set (``oogiri data oogiri-go``).

Oogiri-GO (``zhongshsh/CLoT-Oogiri-GO`` on the hub) holds ``cn.jsonl``, ``en.jsonl`` and
``jp.jsonl``, one game per line ``{"type", "question", "image", "text", "star"}``, and the
pictures in ``images.zip``. The seed's tutorial trained on a 2,000-sample Chinese subset made by
hand (CLoT_cn_2000); this module makes that subset reproducibly:

1. one language's file; only image-to-text games (``type`` ``I2T``: a picture in, a joke out,
   which is what the bot is asked). Text-only games (T2T) have no picture, and picture+question
   games (IT2T) answer a question the bot never asks;
2. ranked by ``star`` (the likes the answer got), best first; answers without a star rank after
   every starred one, in file order; ``--min-star`` drops the weaker ones (and the unstarred);
3. one joke per joke text (whitespace, width and case do not make a joke new) and one joke per
   picture (by the hash of the picture the model sees, so a re-uploaded copy under another id is
   the same picture): in both cases the best-ranked copy stays;
4. every picture goes through ``bot/images.py``, the gate the bot's own uploads pass, and is
   stored as the normalised JPEG it returns (``images/<sha256>.jpg``): training sees exactly what
   serving will see, and a picture the bot would refuse is never trained on;
5. written in XTuner's InternVL format with the bot's instruction (``settings.prompt``) as the
   human turn: ``train.json`` (``n`` samples) and ``heldout.json`` (a few more pictures, never in
   ``train.json``, for the gate's sanity check), plus ``report.json``: every dropped line counted
   by reason, with examples.

The build stops decoding once it has enough pictures, so ``--n 2000`` from the 32,130 Chinese
image games reads a few thousand pictures, not all of them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import unicodedata
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from bot.settings import ImageSettings
from training.export import dumps_dataset, heldout_bucket, xtuner_item

REPO = "zhongshsh/CLoT-Oogiri-GO"
LANGS = ("cn", "en", "jp")
IMAGE_TO_TEXT = "I2T"
IMAGES_ZIP = "images.zip"
TRAIN_FILE = "train.json"
HELDOUT_FILE = "heldout.json"
REPORT_FILE = "report.json"
IMAGES_DIR = "images"
RECIPE_VERSION = 1
EXAMPLES_PER_REASON = 5

Progress = Callable[[int, int | None, str], None]


class DataError(Exception):
    """The data set cannot be built (missing files, nothing usable); the message says why."""


@dataclass
class Record:
    line: int
    image: str
    text: str
    star: float | None


@dataclass
class BuildResult:
    out_dir: Path
    train: int
    heldout: int
    report: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def dropped(self) -> dict[str, int]:
        return dict(self.report.get("dropped", {}))


def joke_key(text: str) -> str:
    """Two jokes are the same joke when they differ only in spacing, width or case."""
    return "".join(unicodedata.normalize("NFKC", text).split()).casefold()


def _star(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        star = float(value)
    except (TypeError, ValueError):
        return None
    return star if star == star else None  # NaN is no rating


class _Drops:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, Any]]] = {}

    def add(self, reason: str, line: int, detail: str = "") -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append({"line": line, **({"detail": detail[:200]} if detail else {})})


def read_records(
    path: Path, drops: _Drops, min_star: float | None = None
) -> tuple[list[Record], Counter[str]]:
    """The image-to-text games of one jsonl file; everything else counted in ``drops``."""
    types: Counter[str] = Counter()
    out: list[Record] = []
    try:
        fh = Path(path).open("rb")  # decoded line by line: one bad byte spoils one line only
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    with fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except ValueError as exc:  # UnicodeDecodeError included
                drops.add("bad_line", n, str(exc))
                continue
            if not isinstance(row, dict):
                drops.add("bad_line", n, "not an object")
                continue
            kind = str(row.get("type"))
            types[kind] += 1
            if kind != IMAGE_TO_TEXT:
                drops.add("not_image_to_text", n, kind)
                continue
            image, text = row.get("image"), row.get("text")
            if not isinstance(image, str | int) or not str(image).strip():
                drops.add("no_image", n)
                continue
            if not isinstance(text, str) or not text.strip():
                drops.add("empty_text", n)
                continue
            star = _star(row.get("star"))
            if min_star is not None and (star is None or star < min_star):
                drops.add("below_min_star" if star is not None else "no_star", n, str(star))
                continue
            out.append(Record(n, str(image).strip(), text.strip(), star))
    return out, types


def rank(records: list[Record]) -> list[Record]:
    """Best first: highest star, then the starred before the unstarred, then file order."""
    return sorted(records, key=lambda r: (r.star is None, -(r.star or 0.0), r.line))


class ImageIndex:
    """Pictures of ``images.zip`` by name: ``images/5651380.jpg`` answers to ``5651380``,
    ``5651380.jpg`` and the full member name (the jsonl's ``image`` has no folder or suffix).

    Where one name is in several folders (``cn/5651380.jpg``, ``jp/5651380.jpg``), the one under
    a folder named after the language wins; a name still ambiguous is not guessed at (None).
    """

    def __init__(self, zf: zipfile.ZipFile, lang: str | None = None) -> None:
        self.zf = zf
        self.lang = lang
        self.by_key: dict[str, list[zipfile.ZipInfo]] = {}
        for info in zf.infolist():
            if info.is_dir():
                continue
            p = PurePosixPath(info.filename)
            for key in dict.fromkeys((info.filename, p.name, p.stem)):
                self.by_key.setdefault(key, []).append(info)

    def find(self, image: str) -> zipfile.ZipInfo | None:
        p = PurePosixPath(image)
        for key in (image, p.name, p.stem):
            found = self.by_key.get(key)
            if not found:
                continue
            if len(found) == 1:
                return found[0]
            mine = [i for i in found if self.lang in PurePosixPath(i.filename).parts[:-1]]
            return mine[0] if len(mine) == 1 else None
        return None


def check_params(lang: str, n: int) -> None:
    """Bad parameters, found before anything is downloaded."""
    if lang not in LANGS:
        raise DataError(f"--lang must be one of {', '.join(LANGS)}, not {lang!r}")
    if n < 1:
        raise DataError("--n must be at least 1")


def build(
    raw_dir: Path,
    out_dir: Path,
    *,
    lang: str = "cn",
    n: int = 2000,
    min_star: float | None = None,
    heldout: int | None = None,
    prompt: str,
    images: ImageSettings | None = None,
    source: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Build the training set from a pulled copy of Oogiri-GO in ``raw_dir`` into ``out_dir``.

    ``out_dir`` is replaced atomically (built beside it, then renamed) so a failed build never
    leaves half a data set where training would find it.
    """
    from bot.images import load
    from bot.models import ImageRejected

    check_params(lang, n)
    images = images or ImageSettings.model_validate({})
    held_target = heldout if heldout is not None else min(64, max(1, n // 20))
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    jsonl, archive = raw_dir / f"{lang}.jsonl", raw_dir / IMAGES_ZIP
    for need in (jsonl, archive):
        if not need.is_file():
            raise DataError(f"{need} is missing: fetch the data set first (oogiri data oogiri-go)")
    drops = _Drops()
    records, types = read_records(jsonl, drops, min_star)
    ranked = rank(records)

    # One joke per joke text: the best-ranked copy stays (no pictures read yet).
    seen_text: set[str] = set()
    unique: list[Record] = []
    for r in ranked:
        key = joke_key(r.text)
        if key in seen_text:
            drops.add("duplicate_text", r.line, r.text)
            continue
        seen_text.add(key)
        unique.append(r)

    work = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    (work / IMAGES_DIR).mkdir(parents=True)
    train: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    stars: list[float] = []
    seen_raw: dict[str, str] = {}  # raw bytes sha256 -> normalised sha256
    seen_image: set[str] = set()
    held_fraction = max(held_target / max(n + held_target, 1), 0.01)
    decoded = 0
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{archive} is not a readable zip: {exc}") from exc
    with zf:
        index = ImageIndex(zf, lang)
        total = len(unique)
        for i, r in enumerate(unique):
            if len(train) >= n and len(held) >= held_target:
                break
            if progress is not None:
                progress(i, total, "pictures")
            info = index.find(r.image)
            if info is None:
                known = PurePosixPath(r.image).stem in index.by_key
                drops.add("image_ambiguous" if known else "image_missing", r.line, r.image)
                continue
            if info.file_size > images.max_bytes:
                drops.add("image_too_large", r.line, f"{r.image}: {info.file_size} bytes")
                continue
            try:
                data = zf.read(info)
            # zlib.error: damaged deflated data; RuntimeError: encrypted; NotImplementedError:
            # a compression method zipfile lacks. One picture lost, not the build.
            except (
                zipfile.BadZipFile,
                OSError,
                EOFError,
                zlib.error,
                RuntimeError,
                NotImplementedError,
            ) as exc:
                drops.add("image_unreadable", r.line, f"{r.image}: {exc}")
                continue
            raw_sha = hashlib.sha256(data).hexdigest()
            sha = seen_raw.get(raw_sha)
            if sha is None:
                try:
                    img = load(data, images, filename=info.filename)
                except ImageRejected as exc:
                    drops.add(f"image_{exc.key}", r.line, f"{r.image}: {exc.detail or exc.key}")
                    continue
                decoded += 1
                sha = img.sha256
                seen_raw[raw_sha] = sha
                if sha not in seen_image:
                    (work / IMAGES_DIR / f"{sha}.jpg").write_bytes(img.jpeg)
            if sha in seen_image:
                drops.add("duplicate_image", r.line, r.image)
                continue
            seen_image.add(sha)
            item = xtuner_item(
                f"oogiri-go-{lang}-{r.line}", f"{IMAGES_DIR}/{sha}.jpg", prompt, r.text
            )
            # held out: pictures whose stable bucket says so, or any once train is full
            if len(held) < held_target and (len(train) >= n or heldout_bucket(sha) < held_fraction):
                held.append(item)
            else:
                train.append(item)
                if r.star is not None:
                    stars.append(r.star)
        if progress is not None:
            progress(total, total, "pictures")
    # Fewer usable pictures than asked for: the hash rule may have held none out, yet the gate
    # needs some. Hold out the weakest-ranked training samples (about 5 %, at least one).
    while (
        len(held) < held_target
        and len(train) > 1
        and len(held) < max(1, (len(train) + len(held)) // 20)
    ):
        held.append(train.pop())
    if not train:
        shutil.rmtree(work, ignore_errors=True)
        raise DataError(
            f"no usable {lang} image-to-text sample in {jsonl} (dropped: {dict(drops.counts)})"
        )
    # pictures decoded but then dropped as duplicates of a later-kept one are not referenced
    used = {item["image"][0] for item in [*train, *held]}
    for f in (work / IMAGES_DIR).iterdir():
        if f"{IMAGES_DIR}/{f.name}" not in used:
            f.unlink()
    report = {
        "recipe": RECIPE_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "source": source or {"path": str(raw_dir)},
        "params": {"lang": lang, "n": n, "min_star": min_star, "heldout": held_target},
        "prompt": prompt,
        "lines": {"types": dict(types), "image_to_text": len(records) + _image_drops(drops)},
        "kept": {"train": len(train), "heldout": len(held)},
        "short_of_n": max(0, n - len(train)),
        "pictures_decoded": decoded,
        "star": {
            "min": min(stars) if stars else None,
            "max": max(stars) if stars else None,
            "unstarred": len(train) - len(stars),
        },
        "dropped": dict(sorted(drops.counts.items())),
        "examples": drops.examples,
        "files": {"train": TRAIN_FILE, "heldout": HELDOUT_FILE, "images": f"{IMAGES_DIR}/"},
    }
    (work / TRAIN_FILE).write_text(dumps_dataset(train), encoding="utf-8")
    (work / HELDOUT_FILE).write_text(dumps_dataset(held), encoding="utf-8")
    (work / REPORT_FILE).write_text(
        json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        work.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work.rename(out_dir)
    files = {k: out_dir / v for k, v in (("train", TRAIN_FILE), ("heldout", HELDOUT_FILE))}
    files["report"] = out_dir / REPORT_FILE
    return BuildResult(out_dir, len(train), len(held), report, files)


def _image_drops(drops: _Drops) -> int:
    """Image-to-text lines dropped before ranking (they still count as image-to-text lines)."""
    return sum(drops.counts[k] for k in ("no_image", "empty_text", "below_min_star", "no_star"))


def load_built(out_dir: Path) -> BuildResult | None:
    """A finished build in ``out_dir`` (its report and both files present), else None."""
    out_dir = Path(out_dir)
    try:
        report = json.loads((out_dir / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = {"train": out_dir / TRAIN_FILE, "heldout": out_dir / HELDOUT_FILE}
    if not all(p.is_file() for p in files.values()):
        return None
    files["report"] = out_dir / REPORT_FILE
    kept = report.get("kept", {})
    return BuildResult(
        out_dir, int(kept.get("train", 0)), int(kept.get("heldout", 0)), report, files
    )


def default_out(root: Path, lang: str, n: int, min_star: float | None) -> Path:
    star = f"-star{min_star:g}" if min_star is not None else ""
    return Path(root) / f"oogiri-go-{lang}-{n}{star}"


def summary_lines(result: BuildResult) -> list[str]:
    """What the operator reads: kept, dropped by reason."""
    r = result.report
    lines = [
        f"kept {result.train} training + {result.heldout} held-out samples "
        f"({r['params']['lang']}, image-to-text, best star first) in {result.out_dir}"
    ]
    if r.get("short_of_n"):
        lines.append(f"only {result.train} of the {r['params']['n']} asked for were usable")
    for reason, count in r.get("dropped", {}).items():
        example = (r.get("examples", {}).get(reason) or [{}])[0]
        where = f" (e.g. line {example['line']}" if example.get("line") else ""
        detail = f": {example['detail']}" if example.get("detail") else ""
        lines.append(f"  dropped {count:>6} {reason}{where}{detail}{')' if where else ''}")
    return lines
