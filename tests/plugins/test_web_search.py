"""The web-search plugin: the model card's prompts verbatim, the card's date and reference formats, the
question's language, and the transform on the gateway's request model and on plain dicts."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from ernie_serve.core import plugins
from ernie_serve.gateway.protocol import ChatCompletionRequest
from ernie_serve.plugins.web_search import (
    ERNIE_SEARCH_EN_PROMPT,
    ERNIE_SEARCH_ZH_PROMPT,
    TRANSFORM_NAME,
    SearchReference,
    WebSearchError,
    apply_web_search,
    build_search_prompt,
    detect_language,
    format_date,
    format_references,
    parse_date,
)

SEED = Path(__file__).resolve().parents[2].parent / "shared" / "seed" / "ernie-4.5-300b-a47b-model-card.txt"

JAY = SearchReference(
    title="周杰伦",
    publish_time="2025-04-20",
    content="周杰伦(Jay Chou),1979年1月18日出生于台湾省新北市,祖籍福建省永春县,华语流行乐男歌手。",
    url="baike.baidu.com",
    site_name="百度百科",
)


def _card_prompt(name: str) -> str:
    text = SEED.read_text(encoding="utf-8")
    start = text.index("'''", text.index(name)) + 3
    return text[start : text.index("'''", start)]


@pytest.mark.skipif(not SEED.is_file(), reason="the model card seed is not beside this checkout")
def test_prompts_are_the_cards_text_verbatim() -> None:
    assert ERNIE_SEARCH_ZH_PROMPT == _card_prompt("ernie_search_zh_prompt")
    assert ERNIE_SEARCH_EN_PROMPT == _card_prompt("ernie_search_en_prompt")


def test_prompts_have_the_three_placeholders_once() -> None:
    for template in (ERNIE_SEARCH_ZH_PROMPT, ERNIE_SEARCH_EN_PROMPT):
        for name in ("{date}", "{references}", "{question}"):
            assert template.count(name) == 1
    assert ERNIE_SEARCH_ZH_PROMPT.startswith("下面你会收到当前时间")
    assert ERNIE_SEARCH_EN_PROMPT.endswith("answer the question and complete the conversation: {question}")


def test_dates_in_the_cards_format_in_beijing_time() -> None:
    assert format_date(datetime(2025, 4, 20, 14, 30, 5)) == "2025-04-20 14:30:05, Sunday, Beijing/China"
    assert format_date(date(2025, 4, 21)) == "2025-04-21 00:00:00, Monday, Beijing/China"
    utc = datetime(2025, 4, 20, 20, 0, tzinfo=timezone.utc)
    assert format_date(utc) == "2025-04-21 04:00:00, Monday, Beijing/China"  # converted to UTC+8
    assert parse_date("2025-04-20T06:30:00Z") == "2025-04-20 14:30:00, Sunday, Beijing/China"
    assert parse_date("2025-04-20") == "2025-04-20 00:00:00, Sunday, Beijing/China"
    card = "2025-04-20 14:30:00, Sunday, Beijing/China"
    assert parse_date(card) == card
    now = datetime.now(timezone(timedelta(hours=8)))
    assert parse_date(None)[:10] in {now.strftime("%Y-%m-%d"), (now - timedelta(seconds=5)).strftime("%Y-%m-%d")}
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_date("last Tuesday")


def test_references_in_the_cards_layout() -> None:
    assert format_references([JAY, SearchReference(content="第二篇")]) == (
        "##参考文章1\n标题:周杰伦\n文章发布时间:2025-04-20\n"
        "内容:周杰伦(Jay Chou),1979年1月18日出生于台湾省新北市,祖籍福建省永春县,华语流行乐男歌手。\n"
        "来源网站网址:baike.baidu.com\n来源网站的网站名:百度百科\n\n##参考文章2\n内容:第二篇"
    )


@pytest.mark.parametrize(
    ("question", "language"),
    [
        ("周杰伦出生在哪里?", "zh"),
        ("Where was Jay Chou born?", "en"),
        ("When was 周杰伦 born, and which of his albums sold best?", "en"),
        ("Jay Chou 是哪里人?", "zh"),
        ("1 + 1 = ?", "en"),
    ],
)
def test_language_follows_the_question(question: str, language: str) -> None:
    assert detect_language(question) == language


def test_prompt_is_filled_in_one_pass() -> None:
    tricky = SearchReference(content="a reference that mentions {question} and {date}")
    prompt = build_search_prompt("Who?", [tricky], "2025-04-20", "en")
    assert prompt.startswith("\n    Below you will be given the current time")
    assert "#Current Time 2025-04-20 00:00:00, Sunday, Beijing/China" in prompt
    assert "内容:a reference that mentions {question} and {date}" in prompt
    assert prompt.endswith("complete the conversation: Who?")
    zh = build_search_prompt("周杰伦出生在哪里?", [JAY], "2025-04-20T14:30:00+08:00")
    assert "#当前时间 2025-04-20 14:30:00, Sunday, Beijing/China" in zh
    assert zh.endswith("补全对话 周杰伦出生在哪里?")
    assert build_search_prompt("周杰伦?", [JAY], "2025-04-20", language="en").startswith("\n    Below")


def test_transform_rewrites_the_last_user_message_of_a_gateway_request() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "earlier question"},
            {"role": "assistant", "content": "earlier answer"},
            {"role": "user", "content": [{"type": "text", "text": "周杰伦"}, {"type": "text", "text": "出生在哪里?"}]},
        ],
        "web_search": {"references": [JAY.model_dump()], "date": "2025-04-20 14:30:00"},
    }
    request = ChatCompletionRequest.model_validate_json(json.dumps(body))
    out = apply_web_search(request)
    assert isinstance(out, ChatCompletionRequest) and out is not request
    assert [m.text() for m in out.messages[:3]] == ["be brief", "earlier question", "earlier answer"]
    assert out.messages[3].text() == build_search_prompt("周杰伦\n出生在哪里?", [JAY], "2025-04-20 14:30:00")
    assert request.messages[3].text() == "周杰伦\n出生在哪里?"  # the original is untouched


def test_transform_on_plain_dicts_and_without_the_extension() -> None:
    plain = {"messages": [{"role": "user", "content": "Who is Jay Chou?"}]}
    assert apply_web_search(plain) is plain
    out = apply_web_search({**plain, "web_search": {"references": [{"content": "A singer."}], "date": "2025-04-20"}})
    assert out["messages"][0]["content"].endswith("complete the conversation: Who is Jay Chou?")


@pytest.mark.parametrize(
    ("extension", "param"),
    [
        ({"references": "x"}, "web_search.references"),
        ({"references": [{"title": "no content"}]}, "web_search.references.0.content"),
        ({"references": [], "date": "someday"}, "web_search.date"),
        ({"references": [], "language": "fr"}, "web_search.language"),
        ({"references": [], "unknown": 1}, "web_search.unknown"),
    ],
)
def test_bad_extensions_name_the_field(extension: dict, param: str) -> None:
    with pytest.raises(WebSearchError) as info:
        apply_web_search({"messages": [{"role": "user", "content": "q"}], "web_search": extension})
    assert info.value.param == param


def test_needs_a_user_message() -> None:
    with pytest.raises(WebSearchError) as info:
        apply_web_search({"messages": [{"role": "system", "content": "s"}], "web_search": {"references": []}})
    assert info.value.param == "messages"


def test_registered_as_a_builtin_transform() -> None:
    plugins.reset_plugin_manager()
    try:
        registration = plugins.registry().request_transforms[TRANSFORM_NAME]
        assert registration.obj is apply_web_search
        # through the `web_search` entry point that ernie-serve's pyproject.toml declares
        assert (registration.provider, registration.distribution) == ("web_search", "ernie-serve")
    finally:
        plugins.reset_plugin_manager()
