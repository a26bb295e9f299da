"""Ratings → XTuner InternVL data set: format, thresholds, mix, dedupe, caps, split, data card."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from trainhelp import add_joke, photo, skimage_dir, vote

from bot.hookspecs import hookimpl
from bot.plugins import make_manager
from bot.settings import DEFAULT_PROMPT
from bot.store import Store
from training.export import (
    ExportError,
    NotEnoughData,
    dumps_dataset,
    export_dataset,
    heldout_bucket,
    load_export,
    sample_to_count,
    split_images,
    xtuner_item,
)
from training.settings import TrainingSettings

# The tutorial's example sample (its "数据集格式" block), serialised the way oogiri pins it:
# json.dumps(ensure_ascii=False, indent=2) + "\n".
TUTORIAL_EXAMPLE = """[
  {
    "id": "000000033471",
    "image": [
      "coco/train2017/000000033471.jpg"
    ],
    "conversations": [
      {
        "from": "human",
        "value": "<image>\\nWhat are the colors of the bus in the image?"
      },
      {
        "from": "gpt",
        "value": "The bus in the image is white and red."
      }
    ]
  }
]
"""


def ts(**kw: Any) -> TrainingSettings:
    base: dict[str, Any] = dict(min_examples=1, heldout_fraction=0.0, base_ratio=0.0)
    base.update(kw)
    return TrainingSettings(**base)


def read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def test_item_is_byte_exact_with_the_tutorial_example() -> None:
    item = xtuner_item(
        "000000033471",
        "coco/train2017/000000033471.jpg",
        "What are the colors of the bus in the image?",
        "The bus in the image is white and red.",
    )
    assert dumps_dataset([item]) == TUTORIAL_EXAMPLE
    assert dumps_dataset([item]).encode("utf-8") == TUTORIAL_EXAMPLE.encode("utf-8")


def test_chinese_is_written_as_utf8_not_escaped() -> None:
    item = xtuner_item("1", "images/a.jpg", DEFAULT_PROMPT, "猫才是这个家真正的主人。")
    text = dumps_dataset([item])
    assert "请你根据这张图片" in text and "\\u" not in text
    assert json.loads(text)[0]["conversations"][0]["value"] == "<image>\n" + DEFAULT_PROMPT


async def test_export_writes_tutorial_format_with_exact_prompt_and_images(
    tstore: Store, tmp_path: Path
) -> None:
    hinted = f"{DEFAULT_PROMPT}\n提示：关于猫"
    j1 = await add_joke(tstore, photo(0), "这只猫刚刚发现冰箱是空的。", prompt=hinted)
    j2 = await add_joke(tstore, photo(1), "宇航员在找外星人的厕所。")
    await vote(tstore, j1.id, up=3)
    await vote(tstore, j2.id, up=2, down=1)

    out = tmp_path / "export"
    result = await export_dataset(tstore, ts(), out)
    text = (out / "train.json").read_text(encoding="utf-8")
    items = json.loads(text)
    assert text == dumps_dataset(items)  # the pinned serialisation, byte for byte
    assert [list(i) for i in items] == [["id", "image", "conversations"]] * 2
    by_id = {i["id"]: i for i in items}
    first = by_id[f"oogiri-{j1.id}"]
    assert first["conversations"] == [
        {"from": "human", "value": "<image>\n" + hinted},
        {"from": "gpt", "value": "这只猫刚刚发现冰箱是空的。"},
    ]
    assert first["image"] == [f"images/{j1.image_sha256}.jpg"]
    for item in items:
        copied = out / item["image"][0]
        sha = Path(item["image"][0]).stem
        assert copied.read_bytes() == tstore.read_image(sha)
    assert result.train == 2 and result.data_paths == [out / "train.json"]
    assert result.image_folders == [out]
    assert read(out / "heldout.json") == [] and read(out / "negatives.json") == []


async def test_thresholds_and_negatives(tstore: Store, tmp_path: Path) -> None:
    good = await add_joke(tstore, photo(0), "好笑")
    meh = await add_joke(tstore, photo(1), "一般")  # +1 -1: net 0
    few = await add_joke(tstore, photo(2), "票太少")  # one vote only
    bad = await add_joke(tstore, photo(3), "不好笑")
    await vote(tstore, good.id, up=2)
    await vote(tstore, meh.id, up=1, down=1)
    await vote(tstore, few.id, up=1)
    await vote(tstore, bad.id, up=1, down=3)

    result = await export_dataset(tstore, ts(min_votes=2, min_net_score=1), tmp_path / "e")
    train = read(tmp_path / "e" / "train.json")
    assert [i["id"] for i in train] == [f"oogiri-{good.id}"]
    negatives = read(tmp_path / "e" / "negatives.json")
    assert [(n["id"], n["up"], n["down"]) for n in negatives] == [(f"oogiri-{bad.id}", 1, 3)]
    assert negatives[0]["conversations"][1]["value"] == "不好笑"
    assert (tmp_path / "e" / negatives[0]["image"][0]).is_file()
    counts = result.data_card["counts"]
    assert counts["too_few_votes"] == 1 and counts["below_net_score"] == 1
    assert counts["positives"] == 1 and counts["negatives"] == 1

    with pytest.raises(NotEnoughData):
        await export_dataset(tstore, ts(min_votes=2, min_examples=2), tmp_path / "e2")


async def test_dedupe_by_image_and_text_and_per_image_cap(tstore: Store, tmp_path: Path) -> None:
    img = photo(0)
    a = await add_joke(tstore, img, "同一个笑话")
    b = await add_joke(tstore, img, "同一个  笑话")  # same after whitespace normalisation
    c = await add_joke(tstore, img, "另一个笑话")
    await vote(tstore, a.id, up=2)
    await vote(tstore, b.id, up=3)
    await vote(tstore, c.id, up=1)

    r1 = await export_dataset(tstore, ts(max_jokes_per_image=5), tmp_path / "e1")
    ids = [i["id"] for i in read(tmp_path / "e1" / "train.json")]
    assert ids == [f"oogiri-{b.id}", f"oogiri-{c.id}"]  # best-rated copy kept
    assert r1.data_card["counts"]["duplicates"] == 1

    r2 = await export_dataset(tstore, ts(max_jokes_per_image=1), tmp_path / "e2")
    assert [i["id"] for i in read(tmp_path / "e2" / "train.json")] == [f"oogiri-{b.id}"]
    assert r2.data_card["counts"]["over_image_cap"] == 1
    assert len(list((tmp_path / "e2" / "images").iterdir())) == 1


async def test_per_user_cap_keeps_each_users_best(tstore: Store, tmp_path: Path) -> None:
    mallory = []
    for i in range(5):
        j = await add_joke(tstore, photo(i), f"m{i}", user="tg:mallory")
        await vote(tstore, j.id, up=1 + i)
        mallory.append(j)
    alice = await add_joke(tstore, photo(7), "a", user="tg:alice")
    await vote(tstore, alice.id, up=1)

    result = await export_dataset(tstore, ts(per_user_cap=2), tmp_path / "e")
    ids = {i["id"] for i in read(tmp_path / "e" / "train.json")}
    assert ids == {f"oogiri-{mallory[4].id}", f"oogiri-{mallory[3].id}", f"oogiri-{alice.id}"}
    assert result.data_card["counts"]["over_user_cap"] == 3
    assert result.data_card["sources"]["rated"]["users"] == 2


async def test_per_voter_cap_limits_one_voters_influence(tstore: Store, tmp_path: Path) -> None:
    jokes = [await add_joke(tstore, photo(i), f"j{i}") for i in range(4)]
    for j in jokes:  # the same voter upvotes everything
        await tstore.rate(j.id, "tg:fan", 1, "test")
    result = await export_dataset(tstore, ts(per_voter_cap=2), tmp_path / "e")
    ids = [i["id"] for i in read(tmp_path / "e" / "train.json")]
    assert ids == [f"oogiri-{jokes[0].id}", f"oogiri-{jokes[1].id}"]  # earliest votes count
    assert result.data_card["counts"]["votes_over_voter_cap"] == 2


def test_split_is_deterministic_by_hash_with_at_least_one_each_side() -> None:
    hashes = [f"{i:064x}" for i in range(200)]
    held = split_images(hashes, 0.1)
    assert held == split_images(reversed(hashes), 0.1)
    assert 5 <= len(held) <= 40
    assert all(heldout_bucket(h) < 0.1 for h in held)
    # adding images never moves an existing image to the other side
    more = split_images([*hashes, *(f"{i:064x}" for i in range(200, 400))], 0.1)
    assert held == {h for h in more if h in set(hashes)}
    assert split_images(hashes, 0.0) == set()
    two = ["a" * 64, "b" * 64]
    assert len(split_images(two, 0.01)) == 1  # at least one held out
    assert len(split_images(two, 0.99)) == 1  # at least one left to train on
    assert split_images(["c" * 64], 0.5) in (set(), {"c" * 64})


async def test_export_split_never_puts_an_image_on_both_sides(
    tstore: Store, tmp_path: Path
) -> None:
    for i in range(12):
        img = photo(i)
        for k in range(2):  # two jokes per image
            j = await add_joke(tstore, img, f"图{i}笑话{k}")
            await vote(tstore, j.id, up=1 + k)
    bad = await add_joke(tstore, photo(3), "差")
    await vote(tstore, bad.id, down=2)
    s = ts(heldout_fraction=0.3, max_jokes_per_image=2)
    r1 = await export_dataset(tstore, s, tmp_path / "e1")
    r2 = await export_dataset(tstore, s, tmp_path / "e2")
    train = read(tmp_path / "e1" / "train.json")
    held = read(tmp_path / "e1" / "heldout.json")
    train_imgs = {i["image"][0] for i in train}
    held_imgs = {i["image"][0] for i in held}
    assert train_imgs and held_imgs and not train_imgs & held_imgs
    assert (tmp_path / "e1" / "heldout.json").read_bytes() == (
        tmp_path / "e2" / "heldout.json"
    ).read_bytes()
    assert r1.heldout == len(held) and r1.train == len(train) and r1.heldout + r1.train == 24
    assert r2.data_card["counts"] == r1.data_card["counts"]
    negative = read(tmp_path / "e1" / "negatives.json")[0]
    expected_split = "heldout" if negative["image"][0] in held_imgs else "train"
    assert negative["split"] == expected_split


# --------------------------------------------------------------------------- base mix


def make_base(tmp_path: Path, n: int, prefix: str = "base") -> Path:
    root = tmp_path / prefix
    (root / "ex_images").mkdir(parents=True)
    items = []
    for i in range(n):
        img = photo(100 + i, size=32)
        (root / "ex_images" / f"{i}.jpg").write_bytes(img.jpeg)
        items.append(xtuner_item(f"b{i}", f"ex_images/{i}.jpg", DEFAULT_PROMPT, f"基础笑话{i}"))
    items.append({"id": "text-only", "conversations": [{"from": "human", "value": "hi"}]})
    items.append(xtuner_item("missing", "ex_images/nope.jpg", DEFAULT_PROMPT, "x"))
    (root / "ex_cn.json").write_text(dumps_dataset(items), encoding="utf-8")
    return root / "ex_cn.json"


def test_sample_to_count_handles_fractions_above_one() -> None:
    items = list(range(4))
    assert sample_to_count(items, 0, 0) == []
    half = sample_to_count(items, 2, 0)
    assert len(half) == 2 and len(set(half)) == 2 and half == sorted(half)
    many = sample_to_count(items, 10, 0)  # 2.5 × the data set: 2 full copies + 2 sampled
    counts = Counter(many)
    assert len(many) == 10 and set(counts.values()) <= {2, 3} and sum(counts.values()) == 10
    assert sample_to_count(items, 10, 0) == many  # seeded


@pytest.mark.parametrize(("ratio", "expected"), [(0.5, 2), (1.0, 4), (2.5, 10), (3.0, 12)])
async def test_base_mix_ratio_is_exact_in_the_exported_json(
    tstore: Store, tmp_path: Path, ratio: float, expected: int
) -> None:
    base = make_base(tmp_path, 3)
    for i in range(4):
        j = await add_joke(tstore, photo(i), f"j{i}")
        await vote(tstore, j.id, up=1)
    result = await export_dataset(tstore, ts(base_dataset=base, base_ratio=ratio), tmp_path / "e")
    mixed = read(tmp_path / "e" / "base_mix.json")
    assert len(mixed) == expected == result.base
    assert {m["id"] for m in mixed} <= {"b0", "b1", "b2"}
    per_item = Counter(m["id"] for m in mixed)
    assert max(per_item.values()) - min(per_item.values()) <= 1
    assert result.train_samples == 4 + expected
    assert result.data_paths == [tmp_path / "e" / "train.json", tmp_path / "e" / "base_mix.json"]
    assert result.image_folders == [tmp_path / "e", base.parent]
    info = result.data_card["sources"]["base"]
    assert info["usable"] == 3 and info["dropped"] == {"invalid": 1, "missing_image": 1}


async def test_base_items_showing_a_heldout_image_are_dropped(
    tstore: Store, tmp_path: Path
) -> None:
    imgs = [photo(i) for i in range(6)]
    for i, img in enumerate(imgs):
        j = await add_joke(tstore, img, f"j{i}")
        await vote(tstore, j.id, up=1)
    held = split_images([i.sha256 for i in imgs], 0.3)
    assert held
    root = tmp_path / "b"
    (root / "im").mkdir(parents=True)
    items = []
    for i, img in enumerate(imgs):
        (root / "im" / f"{i}.jpg").write_bytes(img.jpeg)
        items.append(xtuner_item(f"b{i}", f"im/{i}.jpg", DEFAULT_PROMPT, "x"))
    (root / "d.json").write_text(dumps_dataset(items), encoding="utf-8")
    result = await export_dataset(
        tstore,
        ts(base_dataset=root / "d.json", base_ratio=1.0, heldout_fraction=0.3),
        tmp_path / "e",
    )
    used = {m["image"][0] for m in read(tmp_path / "e" / "base_mix.json")}
    held_files = {f"im/{i}.jpg" for i, img in enumerate(imgs) if img.sha256 in held}
    assert not used & held_files
    assert result.data_card["sources"]["base"]["dropped"]["heldout_image"] == len(held)


async def test_bad_base_dataset_is_a_clear_error(tstore: Store, tmp_path: Path) -> None:
    j = await add_joke(tstore, photo(0), "j")
    await vote(tstore, j.id, up=1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ExportError, match="not valid JSON"):
        await export_dataset(tstore, ts(base_dataset=bad, base_ratio=1), tmp_path / "e")
    with pytest.raises(ExportError, match="cannot read"):
        await export_dataset(
            tstore, ts(base_dataset=tmp_path / "nope.json", base_ratio=1), tmp_path / "e2"
        )


async def test_jsonl_base_dataset(tstore: Store, tmp_path: Path) -> None:
    base = make_base(tmp_path, 2)
    items = read(base)
    jsonl = base.with_suffix(".jsonl")
    jsonl.write_text("\n".join(json.dumps(i, ensure_ascii=False) for i in items), encoding="utf-8")
    j = await add_joke(tstore, photo(0), "j")
    await vote(tstore, j.id, up=1)
    result = await export_dataset(tstore, ts(base_dataset=jsonl, base_ratio=2), tmp_path / "e")
    assert result.base == 2


# --------------------------------------------------------------------------- data card, hooks


async def test_data_card_counts_like_rates_and_sources(tstore: Store, tmp_path: Path) -> None:
    a = await add_joke(tstore, photo(0), "a", channel="telegram", version="v1")
    b = await add_joke(tstore, photo(1), "b", channel="web", version="v2")
    c = await add_joke(tstore, photo(2), "c", channel="web", version="v2")
    await vote(tstore, a.id, up=3, down=1)
    await vote(tstore, b.id, up=1)
    await vote(tstore, c.id, down=2)
    result = await export_dataset(tstore, ts(), tmp_path / "e")
    card = read(tmp_path / "e" / "data_card.json")
    assert card == json.loads(json.dumps(result.data_card))
    assert card["format"] == "xtuner-internvl"
    assert card["counts"]["rated_jokes"] == 3 and card["counts"]["votes"] == 7
    assert card["counts"]["train"] == 2 and card["counts"]["negatives"] == 1
    assert card["like_rate"]["train"] == pytest.approx(4 / 5)
    assert card["like_rate"]["negatives"] == 0.0
    assert card["sources"]["rated"]["channels"] == {"telegram": 1, "web": 1}
    assert card["sources"]["rated"]["model_versions"] == {"v1": 1, "v2": 1}
    assert card["thresholds"]["min_votes"] == 1
    assert card["files"]["train"] == "train.json"
    again = load_export(tmp_path / "e")
    assert again.train == 2 and again.data_paths == result.data_paths


class FilterPlugin:
    @hookimpl
    def oogiri_training_examples(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = [e for e in examples if "广告" not in e["text"]]
        kept.append(
            {
                "id": "curated-1",
                "image_path": str(skimage_dir() / "coffee.png"),
                "prompt": DEFAULT_PROMPT,
                "text": "咖啡说：今天我不加班。",
                "up": 5,
                "net": 5,
            }
        )
        return kept


class AsyncTagger:
    @hookimpl
    async def oogiri_training_examples(self, examples: list[dict[str, Any]]) -> None:
        for e in examples:  # in place; returns None
            e["text"] = e["text"].strip()


async def test_training_examples_hook_filters_and_augments(tstore: Store, tmp_path: Path) -> None:
    j1 = await add_joke(tstore, photo(0), " 正经笑话 ")
    j2 = await add_joke(tstore, photo(1), "这是广告")
    await vote(tstore, j1.id, up=1)
    await vote(tstore, j2.id, up=1)
    pm = make_manager(only=[], extra=[FilterPlugin(), AsyncTagger()])
    result = await export_dataset(tstore, ts(), tmp_path / "e", pm=pm)
    train = read(tmp_path / "e" / "train.json")
    texts = sorted(i["conversations"][1]["value"] for i in train)
    assert texts == ["咖啡说：今天我不加班。", "正经笑话"]
    curated = next(i for i in train if i["id"] == "curated-1")
    assert curated["image"][0].endswith(".png")
    assert (tmp_path / "e" / curated["image"][0]).read_bytes() == (
        skimage_dir() / "coffee.png"
    ).read_bytes()
    assert result.data_card["sources"]["rated"]["origin"] == {"ratings": 1, "plugin": 1}


class BrokenPlugin:
    @hookimpl
    def oogiri_training_examples(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"id": "x"}]


async def test_bad_hook_output_is_an_export_error(tstore: Store, tmp_path: Path) -> None:
    j = await add_joke(tstore, photo(0), "j")
    await vote(tstore, j.id, up=1)
    pm = make_manager(only=[], extra=[BrokenPlugin()])
    with pytest.raises(ExportError, match="lacks"):
        await export_dataset(tstore, ts(), tmp_path / "e", pm=pm)


async def test_export_refuses_a_non_empty_folder(tstore: Store, tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        await export_dataset(tstore, ts(), tmp_path / "e")
