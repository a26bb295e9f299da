"""What the Telegram bot says, in Chinese and English.

Core rejections (bad image, rate limits, engine trouble) carry their own text in ``bot.models``;
this table holds only what is Telegram-specific: help, privacy, buttons, hints and admin output.
"""

from __future__ import annotations

from typing import Any

from bot.models import Forms
from bot.models import counted as counted_forms
from bot.moderation import MODERATION_TEXTS

TEXTS: dict[str, dict[str, str]] = {
    "help": {
        "en": (
            "Send me a picture — a photo, an image file or a still sticker — and I'll make up a "
            "joke about it.\n\n"
            "• Add a caption to nudge the joke in a direction.\n"
            "• Rate every joke with 👍 or 👎: your votes teach me what is funny. "
            "Press the other button to change your vote.\n"
            "• In groups I stay quiet unless asked: mention me in a picture's caption, or reply "
            "to a picture with /joke (or with a mention).\n\n"
            "/help — this message\n/privacy — what I store"
        ),
        "zh": (
            "发给我一张图片（照片、图片文件或静态贴纸），我就给它讲一个脑洞大开的梗。\n\n"
            "• 加一句图片说明，可以给笑话一点方向。\n"
            "• 每个笑话都可以点 👍 或 👎，你的投票会教我什么才好笑；点另一个按钮就能改票。\n"
            "• 在群里我不会随便插话：在图片说明里 @我，或者回复一张图片发送 /joke（或 @我）。\n\n"
            "/help — 显示本说明\n/privacy — 我会保存什么"
        ),
    },
    "privacy": {
        "en": (
            "What I store, and why:\n"
            "• the picture you send, re-encoded as a JPEG and named by its hash;\n"
            "• the joke, the model version that wrote it and your caption if you gave one;\n"
            "• your numeric Telegram user id and chat id (no name, no username, no phone number);\n"
            "• your 👍/👎 votes and a log of requests (time and outcome).\n\n"
            "Pictures with their jokes and votes are used to fine-tune the joke model. "
            "I never read messages that are not meant for me, and nothing is sold or shared. "
            "Ask the bot's operator to delete your data."
        ),
        "zh": (
            "我会保存这些内容，以及原因：\n"
            "• 你发来的图片（重新编码为 JPEG，以哈希命名）；\n"
            "• 笑话本身、生成它的模型版本，以及你写的图片说明（如果有）；\n"
            "• 你的 Telegram 数字用户 id 和会话 id（不保存名字、用户名或手机号）；\n"
            "• 你的 👍/👎 投票，以及请求记录（时间和结果）。\n\n"
            "图片、笑话和投票会用来微调笑话模型。我不会读取不是发给我的消息，也不会出售或分享任何数据。"
            "如需删除你的数据，请联系机器人的运营者。"
        ),
    },
    "send_picture": {
        "en": (
            "Send me a picture — a photo, an image file or a still sticker. "
            "Videos, animations, animated stickers and voice messages are beyond me."
        ),
        "zh": (
            "请发给我一张图片：照片、图片文件或静态贴纸都可以。"
            "视频、动图、动态贴纸和语音我还看不懂。"
        ),
    },
    "group_usage": {
        "en": "Reply to a picture with /joke, or mention me in a picture's caption.",
        "zh": "请回复一张图片并发送 /joke，或者在图片说明里 @我。",
    },
    "download_failed": {
        "en": "I couldn't fetch that picture from Telegram; please send it again.",
        "zh": "没能从 Telegram 取到这张图片，请重新发送。",
    },
    "internal_error": {
        "en": "Something went wrong on my side; please try again.",
        "zh": "我这边出了点问题，请再试一次。",
    },
    "vote_up": {"en": "👍 Thanks!", "zh": "👍 收到！"},
    "vote_down": {"en": "👎 Noted.", "zh": "👎 记下了。"},
    "vote_changed_up": {"en": "Changed to 👍", "zh": "已改为 👍"},
    "vote_changed_down": {"en": "Changed to 👎", "zh": "已改为 👎"},
    "vote_same": {"en": "You already voted that.", "zh": "你已经投过这一票了。"},
    "bad_button": {
        "en": "This button is not valid (any more).",
        "zh": "这个按钮无效或已过期。",
    },
    "admin_only": {
        "en": "Sorry, /stats is for the bot's admins.",
        "zh": "抱歉，/stats 只对管理员开放。",
    },
    "stats_empty": {"en": "No jokes yet.", "zh": "还没有笑话。"},
    "stats_header": {
        "en": "Like-rate per model version:",
        "zh": "各模型版本的好评率：",
    },
    "stats_line": {  # {jokes} is counted("jokes", n, lang): "1 joke", "2 jokes"
        "en": "{version}: {jokes} · {up} 👍 · {down} 👎 · {rate}",
        "zh": "{version}：{jokes} · {up} 👍 · {down} 👎 · {rate}",
    },
    "no_votes": {"en": "no votes", "zh": "暂无投票"},
    "cmd_help": {"en": "How to use me", "zh": "使用说明"},
    "cmd_joke": {"en": "Joke about the picture you reply to", "zh": "给你回复的图片讲个梗"},
    "cmd_privacy": {"en": "What I store", "zh": "我会保存什么"},
    # moderation (admins only)
    "admins_only": {
        "en": "Sorry, that command is for the bot's admins.",
        "zh": "抱歉，这个命令只对管理员开放。",
    },
    "mod_usage": {
        "en": (
            "/{command} as a reply to someone's message, or /{command} <user id>, "
            "/{command} <chat id> or /{command} telegram:user:<id>."
        ),
        "zh": "回复某人的消息发送 /{command}，或 /{command} <用户 id>、/{command} <群 id>、"
        "/{command} telegram:user:<id>。",
    },
    **MODERATION_TEXTS,  # with mod_error and mod_in_settings
    # the {error} of mod_error
    "mod_not_an_id": {
        "en": (
            "{value} is not a Telegram id. Use the numeric id of a user or a group, or send the "
            "command as a reply to their message (bots can't look up @usernames)."
        ),
        "zh": "{value} 不是 Telegram id。请使用用户或群的数字 id，或者回复对方的消息发送这个命令"
        "（机器人无法按 @用户名 查找）。",
    },
    "mod_bad_subject": {
        "en": (
            "{value} is not a moderation subject: write telegram:user:<id>, "
            "telegram:chat:<id> (or discord:user:<id>, discord:guild:<id>)."
        ),
        "zh": "{value} 不是有效的对象：请写 telegram:user:<id>、telegram:chat:<id>"
        "（或 discord:user:<id>、discord:guild:<id>）。",
    },
    "no_such_joke": {"en": "There is no joke {joke_id}.", "zh": "没有编号为 {joke_id} 的笑话。"},
    "delete_usage": {
        "en": "Reply to one of my jokes with /delete (or /delete <joke id>).",
        "zh": "回复我的某个笑话发送 /delete（或 /delete <笑话 id>）。",
    },
    # /delete in reply to a message of another chat (Telegram's external_reply: no buttons, and
    # for a basic group not even the message id), e.g. the old group's history of a supergroup
    "delete_external": {
        "en": (
            "That message is in another chat (for a supergroup: in the group it was before the "
            "upgrade), so I can't tell which joke it is. Use /delete <joke id>."
        ),
        "zh": "那条消息属于另一个会话（对超级群来说：升级之前的那个群），我无法判断是哪个笑话。"
        "请使用 /delete <笑话 id>。",
    },
    # what /delete did with the joke's message (the joke itself is removed in every case)
    "joke_deleted_kept": {
        "en": (
            "Joke {joke_id} removed from training, but Telegram did not let me delete its message "
            "(bots can delete only messages younger than 48 hours; or it is gone already)."
        ),
        "zh": "笑话 {joke_id} 已从训练数据中移除，但 Telegram 没让我删除它的消息"
        "（机器人只能删除 48 小时以内的消息，或者它已被删除）。",
    },
    "joke_deleted_upgraded": {
        "en": (
            "Joke {joke_id} removed from training and won't be sent again. Its message is still "
            "shown: it was posted in the group before the group was upgraded to a supergroup, "
            "and Telegram doesn't let bots delete the old group's messages."
        ),
        "zh": "笑话 {joke_id} 已从训练数据中移除，也不会再发送。但它的消息还在："
        "那条消息发在群升级为超级群之前，Telegram 不允许机器人删除旧群里的消息。",
    },
    "joke_deleted_unsent": {
        "en": (
            "Joke {joke_id} removed from training and won't be sent. I have no record of it "
            "reaching a chat, so there was no message to delete."
        ),
        "zh": "笑话 {joke_id} 已从训练数据中移除，也不会再发送。没有它发到任何会话的记录，"
        "所以没有消息可删。",
    },
}

# Numbers with their noun: {"one": …, "other": …} in English; Chinese has one form.
COUNTED: dict[str, Forms] = {
    "jokes": {"en": {"one": "{n} joke", "other": "{n} jokes"}, "zh": {"other": "{n} 个笑话"}},
}


def counted(key: str, n: int, lang: str = "en") -> str:
    """``n`` with its noun in ``lang``: "1 joke", "2 jokes", "0 jokes"; "1 个笑话"."""
    return counted_forms(COUNTED[key], n, lang)


def text(key: str, lang: str = "en", **params: Any) -> str:
    table = TEXTS[key]
    value = table.get(lang) or table["en"]
    return value.format(**params) if params else value
