"""ERNIE 4.5's web-search prompt, as a built-in chat-request transform.

A chat request may carry search results in a `web_search` extension (with the OpenAI SDK:
`extra_body={"web_search": {...}}`):

    "web_search": {
        "references": [{"title": ..., "url": ..., "site_name": ..., "publish_time": ..., "content": ...}],
        "date": "2025-04-20 14:30:00",   # optional; default: now, Beijing time
        "language": "zh"                 # optional; default: the question's language
    }

The last user message is then replaced by the model card's search prompt in the question's language, with
`{date}` in the card's recommended format ("YYYY-MM-DD HH:MM:SS, Day of the Week, Beijing/China") and each
reference in the card's `##参考文章N` layout. The two prompts are the model card's text verbatim (the
characters between the triple quotes of `ernie_search_zh_prompt` / `ernie_search_en_prompt`, indentation
included); tests check them against the card.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ernie_serve.core.hookspecs import RegisterRequestTransform, hookimpl

EXTENSION_FIELD = "web_search"
TRANSFORM_NAME = "ernie_web_search"

# The model card's two prompts, verbatim.
ERNIE_SEARCH_ZH_PROMPT = (
    "下面你会收到当前时间、多个不同来源的参考文章和一段对话。你的任务是阅读多个参考文章,并根据参考"
    "文章中的信息回答对话中的问题。\n"
    "    以下是当前时间和参考文章:\n"
    "    \n"
    "    #当前时间 {date}\n"
    "\n"
    "    #参考文章\n"
    "    {references}\n"
    "\n"
    "\n"
    "    请注意:\n"
    "  • 回答必须结合问题需求和当前时间,对参考文章的可用性进行判断,避免在回答中使用错误或过时的信息"
    "。\n"
    "  • 当参考文章中的信息无法准确地回答问题时,你需要在回答中提供获取相应信息的建议,或承认无法提供"
    "相应信息。\n"
    "  • 你需要优先根据百科、官网、权威机构、专业网站等高权威性来源的信息来回答问题。\n"
    "  • 回复需要综合参考文章中的相关数字、案例、法律条文、公式等信息,使你的答案更专业。\n"
    "  • 当问题属于创作类任务时,需注意以下维度:\n"
    "    • 态度鲜明:观点、立场清晰明确,避免模棱两可,语言果断直接\n"
    "    • 文采飞扬:用词精准生动,善用修辞手法,增强感染力\n"
    "    • 有理有据:逻辑严密递进,结合权威数据/事实支撑论点\n"
    "\n"
    "    下面请结合以上信息,回答问题,补全对话 {question}"
)

ERNIE_SEARCH_EN_PROMPT = (
    "\n"
    "    Below you will be given the current time, multiple references from different sources, and "
    "a conversation. Your task is to read the references and use the information in them to answer "
    "the question in the conversation.\n"
    "    Here are the current time and the references:\n"
    "    \n"
    "    #Current Time {date}\n"
    "\n"
    "    #References\n"
    "    {references}\n"
    "\n"
    "\n"
    "    Please note:\n"
    "  • Based on the question’s requirements and the current time, assess the usefulness of the "
    "references to avoid using inaccurate or outdated information in the answer.\n"
    "  • If the references do not provide enough information to accurately answer the question, "
    "you should suggest how to obtain the relevant information or acknowledge that you are unable "
    "to provide it.\n"
    "  • Prioritize using information from highly authoritative sources such as encyclopedias, "
    "official websites, authoritative institutions, and professional websites when answering "
    "questions.\n"
    "  • Incorporate relevant numbers, cases, legal provisions, formulas, and other details from "
    "the references to make your answer more professional.\n"
    "  • For creative tasks, keep these dimensions in mind:\n"
    "    • Clear attitude: Clear views and positions, avoid ambiguity, and use decisive and direct "
    "language\n"
    "    • Brilliant writing: Precise and vivid words, good use of rhetoric, and enhance the "
    "appeal\n"
    "    • Well-reasoned: Rigorous logic and progressive, combined with authoritative data/facts "
    "to support the argument\n"
    "\n"
    "    Now, using the information above, answer the question and complete the conversation: "
    "{question}"
)


_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# A date already written the card's way is used as given.
_CARD_DATE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}, [A-Za-z]+, .+$")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_PLACEHOLDER = re.compile(r"\{(date|references|question)\}")


def _beijing() -> tzinfo:
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo("Asia/Shanghai")
    except Exception:  # no tz database on this system: China has no daylight saving, a fixed offset is exact
        return timezone(timedelta(hours=8), "CST")


class WebSearchError(ValueError):
    """A malformed `web_search` extension; `param` names the field (the gateway answers 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class SearchReference(BaseModel):
    """One search result. Only `content` is required; absent fields leave their line out."""

    model_config = ConfigDict(extra="ignore")

    title: str | None = None
    url: str | None = None
    site_name: str | None = None
    publish_time: str | None = None
    content: str


class WebSearch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    references: list[SearchReference] = Field(default_factory=list)
    date: str | datetime | None = None
    language: Literal["zh", "en"] | None = None


def format_date(moment: datetime | date | None = None) -> str:
    """The card's `{date}`: "YYYY-MM-DD HH:MM:SS, Day of the Week, Beijing/China", in Beijing time.

    None means now; an aware datetime is converted to Beijing time; a naive one is taken as Beijing time;
    a date means its midnight."""
    beijing = _beijing()
    if moment is None:
        moment = datetime.now(beijing)
    elif not isinstance(moment, datetime):
        moment = datetime(moment.year, moment.month, moment.day)
    if moment.tzinfo is not None:
        moment = moment.astimezone(beijing)
    return f"{moment:%Y-%m-%d %H:%M:%S}, {_WEEKDAYS[moment.weekday()]}, Beijing/China"


def parse_date(value: str | datetime | date | None) -> str:
    """A request's `date` as the card's `{date}`: ISO 8601 ("2025-04-20", "2025-04-20T14:30:00+08:00"), or a
    string already in the card's format (kept as is). Raises ValueError for anything else."""
    if value is None or isinstance(value, datetime | date):
        return format_date(value)
    text = value.strip()
    if _CARD_DATE.match(text):
        return text
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"date {value!r} is neither ISO 8601 (e.g. 2025-04-20T14:30:00) nor the card's "
            "'YYYY-MM-DD HH:MM:SS, Day of the Week, Beijing/China'"
        ) from None
    return format_date(parsed)


def format_references(references: Sequence[SearchReference]) -> str:
    """The card's `{references}`: `##参考文章N` blocks with its field labels, separated by blank lines."""
    blocks = []
    for number, ref in enumerate(references, start=1):
        lines = [f"##参考文章{number}"]
        for label, value in (
            ("标题", ref.title),
            ("文章发布时间", ref.publish_time),
            ("内容", ref.content),
            ("来源网站网址", ref.url),
            ("来源网站的网站名", ref.site_name),
        ):
            if value is not None:
                lines.append(f"{label}:{value.strip()}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def detect_language(text: str) -> Literal["zh", "en"]:
    """ "zh" when Chinese characters are at least as many as Latin words (so an English question naming a
    Chinese person stays English), else "en"."""
    han = len(_HAN.findall(text))
    return "zh" if han and han >= len(_LATIN_WORD.findall(text)) else "en"


def build_search_prompt(
    question: str,
    references: Sequence[SearchReference],
    date: str | datetime | None = None,
    language: Literal["zh", "en"] | None = None,
) -> str:
    """The card's search prompt for `question`; placeholders are filled in one pass, so text inside the
    references or the question is never itself substituted."""
    template = ERNIE_SEARCH_ZH_PROMPT if (language or detect_language(question)) == "zh" else ERNIE_SEARCH_EN_PROMPT
    values = {"date": parse_date(date), "references": format_references(references), "question": question}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _message_text(message: Any) -> str:
    content = _get(message, "content")
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(str(_get(part, "text") or "") for part in content)


def _replace(obj: Any, **changes: Any) -> Any:
    if isinstance(obj, Mapping):
        return {**obj, **changes}
    return obj.model_copy(update=changes)


def apply_web_search(request: Any) -> Any:
    """The request transform: a request without the extension is returned unchanged; otherwise a copy whose
    last user message is the search prompt. Works on the gateway's pydantic request or a plain dict."""
    raw = _get(request, EXTENSION_FIELD)
    if raw is None:
        return request
    try:
        search = WebSearch.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        path = ".".join(str(p) for p in (EXTENSION_FIELD, *error.get("loc", ())))
        raise WebSearchError(path, f"{path}: {error['msg']}") from None
    messages = list(_get(request, "messages") or [])
    last_user = next((i for i in range(len(messages) - 1, -1, -1) if _get(messages[i], "role") == "user"), None)
    if last_user is None:
        raise WebSearchError("messages", "web_search needs a user message holding the question")
    try:
        prompt = build_search_prompt(
            _message_text(messages[last_user]), search.references, search.date, search.language
        )
    except ValueError as exc:
        raise WebSearchError(f"{EXTENSION_FIELD}.date", str(exc)) from None
    messages[last_user] = _replace(messages[last_user], content=prompt)
    return _replace(request, messages=messages)


@hookimpl
def register_request_transforms(register: RegisterRequestTransform) -> None:
    """Called once when the registry is built: registers the web-search prompt transform."""
    register(TRANSFORM_NAME, apply_web_search)
