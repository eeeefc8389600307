"""The OpenAI wire format: pydantic models of the requests r1serve accepts and of the responses it sends.

Requests are validated here, field by field, so a wrong type or an out-of-range value becomes a 400 that names
the field before any work is done; the bounds also document themselves in `/docs`, so the OpenAPI document
admits exactly what validation admits. Validation is strict, as OpenAI's own API is: a JSON number where an
integer is meant, a string where a number is meant or `true` as a token id is refused, not coerced; NaN and
infinity are refused in every number field; a lone UTF-16 surrogate (`"\\ud800"`, which no UTF-8 text can hold)
is refused in every text field, before it could reach the tokenizer or be echoed in an error. Fields OpenAI defines
but r1serve does not implement (`tools`, `suffix`, ...) are refused by the serving code
with a clear message rather than silently ignored; fields nobody defines are accepted and ignored, because
the `openai` SDK and other clients send extras (`extra_body`) that must not break a drop-in server. Stream
chunks are plain dicts built by `chat_chunk` / `completion_chunk` (a hot path; the JSON stays explicit).
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, field_validator

FinishReason = Literal["stop", "length", "abort", "repetition"]
ReasoningEffort = Literal["low", "medium", "high"]
MAX_STOP_STRINGS = 16
MAX_TOKEN_ID = 2**31 - 1

_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_lone_surrogate(text: Any) -> Any:
    """A JSON escape such as "\\ud800" decodes to a lone surrogate, which cannot be encoded as UTF-8. Checked
    before the type (a constrained string would fail on it with a vaguer message); non-strings pass through."""
    match = _SURROGATE.search(text) if isinstance(text, str) else None
    if match:
        raise ValueError(f"contains a lone UTF-16 surrogate (\\u{ord(match.group()):04x}) at index "
                         f"{match.start()}, which is not valid Unicode text")
    return text


def _integral_number(value: Any) -> Any:
    """JSON Schema's `integer` admits 2.0 (a number with no fraction), so the server does too."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Text = Annotated[str, BeforeValidator(_no_lone_surrogate)]
"""A string field: any text but a lone surrogate."""

# Integer fields: a JSON integer (2 or 2.0), never `true`, `"2"` or 2.5. Bounds go before the validator, where
# pydantic turns them into the schema's minimum / maximum.
INTEGRAL = BeforeValidator(_integral_number)
Integer = Annotated[int, INTEGRAL]
PositiveInt = Annotated[int, Field(ge=1), INTEGRAL]
NonNegativeInt = Annotated[int, Field(ge=0), INTEGRAL]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID), INTEGRAL]
"""A token id: a non-negative integer (never `true`); the vocabulary bound is checked when served."""

NonEmptyText = Annotated[str, Field(min_length=1), BeforeValidator(_no_lone_surrogate)]

# Strict: no coercion (OpenAI's API refuses "1" for 1 as well); NaN / infinity refused in every float.
REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`, as OpenAI defines it (the SDK's `parse` sends it with strict: true)."""

    model_config = REQUEST_CONFIG
    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema of the answer")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text` (the default: no constraint), `json_object` (any JSON object) or `json_schema`."""

    model_config = REQUEST_CONFIG
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(BaseModel):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object."""

    model_config = REQUEST_CONFIG
    json_: dict[str, Any] | Text | None = Field(None, alias="json", description="a JSON schema")
    regex: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None
    grammar: Text | None = Field(None, description="EBNF (with ::=) or Lark")
    json_object: bool | None = None
    structural_tag: Any = Field(None, description="not supported: a 400")
    disable_any_whitespace: bool = Field(False, description="not supported: true is a 400")
    disable_additional_properties: bool = Field(False, description="not supported: true is a 400")
    whitespace_pattern: Text | None = Field(None, description="not supported: a 400")


class StructuredFields(BaseModel):
    """The constraints on the answer after `</think>` (server/structured.py reads them; at most one)."""

    model_config = REQUEST_CONFIG
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | Text | None = Field(None, description="vLLM's older name: a JSON schema")
    guided_regex: Text | None = None
    guided_choice: Annotated[list[Text], Field(min_length=1)] | None = None
    guided_grammar: Text | None = Field(None, description="EBNF (with ::=) or Lark")
    guided_decoding_backend: Text | None = Field(None, description="xgrammar (or auto): the only backend")
    guided_whitespace_pattern: Text | None = Field(None, description="not supported: a 400")


class SamplingFields(StructuredFields):
    """Fields shared by chat and text completions (OpenAI's names, plus vLLM's and r1serve's extensions)."""

    model_config = REQUEST_CONFIG

    model: Text = Field(description="a name from /v1/models")
    n: PositiveInt = Field(1, description="samples per prompt (at most --max-num-seqs)")
    max_tokens: PositiveInt | None = Field(None, description="most output tokens (default: what fits)")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 0.6 (R1 usage rule 2)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default 0.95 (R1 usage rule 2)")
    top_k: Annotated[int, Field(ge=-1), INTEGRAL] | None = Field(None, description="-1 or 0: off")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: Integer | None = Field(None, description="per-request seed: same seed, same output")
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"stop strings (not included in the output), at most {MAX_STOP_STRINGS}")
    stop_token_ids: list[TokenId] | None = Field(None, description="token ids that end the output")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token")
    min_tokens: NonNegativeInt = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    max_thinking_tokens: NonNegativeInt | None = Field(
        None, description="R1 usage rule 7: close the reasoning with </think> after this many tokens")
    prompt_logprobs: Integer | None = Field(
        None, description="vLLM's: each prompt token's logprob and rank, with this many most likely tokens, "
                          "0..--max-logprobs (not with stream)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        return [stop] if isinstance(stop, str) else stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["text"]
    text: Text


Content = Text | list[TextPart]


class _Message(BaseModel):
    """One turn. `developer` is OpenAI's newer name for `system`; `reasoning_content` sent back is dropped."""

    model_config = REQUEST_CONFIG
    role: str
    content: Content | None
    name: Text | None = None

    def to_template(self) -> dict[str, Any]:
        """The `{"role", "content"}` dict the chat template reads (text parts joined, developer = system)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        elif content is None:  # an assistant turn without text (OpenAI allows it)
            content = ""
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class SystemMessage(_Message):
    role: Literal["system"]
    content: Content


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    """An earlier answer; its content may be null (OpenAI allows that for assistant turns)."""

    role: Literal["assistant"]
    content: Content | None = None


def _role_of(message: Any) -> str | None:
    return message.get("role") if isinstance(message, dict) else getattr(message, "role", None)


# Tags with a space, so that they never read as a field name where an error names the field (errors.py).
ChatMessage = Annotated[
    Annotated[SystemMessage, Tag("system message")] | Annotated[DeveloperMessage, Tag("developer message")]
    | Annotated[UserMessage, Tag("user message")] | Annotated[AssistantMessage, Tag("assistant message")],
    Discriminator(lambda message: f"{_role_of(message)} message", custom_error_type="invalid_role",
                  custom_error_message="role must be one of 'system', 'developer', 'user', 'assistant'"),
]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation, oldest turn first")
    max_completion_tokens: PositiveInt | None = Field(None, description="OpenAI's newer name for max_tokens")
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="a thinking budget (rule 7): low 1024 tokens, medium 4096, high none; an explicit "
                          "max_thinking_tokens wins")
    logprobs: bool | None = Field(None, description="each output token's logprob (server/logprobs.py)")
    top_logprobs: Integer | None = Field(None, description="with logprobs: this many most likely tokens per "
                                                           "position, 0..--max-logprobs")
    tools: list[Any] | None = None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: (NonEmptyText | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[NonEmptyText], Field(min_length=1, max_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)]
             ) = Field(description="text, or token ids (a list of one of either is accepted too; batched prompts "
                                   "are not supported yet)")
    max_tokens: NonNegativeInt | None = Field(None, description="most output tokens (default: what fits); 0 only "
                                                                "with echo: the prompt alone")
    logprobs: Integer | None = Field(None, description="each output token's logprob and this many most likely "
                                                       "tokens, 0..--max-logprobs")
    echo: bool = Field(False, description="the prompt before the output (with logprobs: the prompt tokens' too)")
    suffix: str | None = None
    best_of: Integer | None = None

    @property
    def echo_only(self) -> bool:
        """`max_tokens: 0` with `echo`: the prompt (and its logprobs) alone, as OpenAI's legacy API gives it."""
        return self.echo and self.max_tokens == 0

    @property
    def output_limit(self) -> int | None:
        return 1 if self.echo_only else self.max_tokens  # the engine samples one token, which is not returned


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None
    prompt_tokens_details: PromptTokensDetails | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = Field(None, description="the text before </think> (R1 usage rule 5)")
    reasoning: str | None = Field(None, description="the same text under vLLM's name (off with "
                                                    "--no-reasoning-field-alias)")


class ChatCompletionChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: dict[str, Any] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "r1serve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = Field(None, description="never in the same chunk as content")
    reasoning: str | None = Field(None, description="the same text under vLLM's name (off with "
                                                    "--no-reasoning-field-alias)")


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    """One event of a chat stream (documentation of what `chat_chunk` builds)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = Field(None, description="in the last chunk, with stream_options.include_usage")


class CompletionChunk(BaseModel):
    """One event of a text-completion stream (documentation of what `completion_chunk` builds)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(None, description="in the last chunk, with stream_options.include_usage")


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict[str, Any]],
               usage: UsageInfo | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; each choice is built by `chat_choice`."""
    chunk: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                             "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage.model_dump()
    return chunk


def chat_choice(index: int, delta: dict[str, Any], finish_reason: str | None = None,
                stop_reason: str | int | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def completion_chunk(request_id: str, created: int, model: str, choices: list[dict[str, Any]],
                     usage: UsageInfo | None = None) -> dict[str, Any]:
    """One streamed `text_completion`; each choice is built by `completion_choice`."""
    chunk: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created,
                             "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage.model_dump()
    return chunk


def completion_choice(index: int, text: str, finish_reason: str | None = None,
                      stop_reason: str | int | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize` body: a text `prompt`, or chat `messages` (exactly one of the two)."""

    model_config = ConfigDict(**REQUEST_CONFIG, json_schema_extra={
        "oneOf": [{"required": ["prompt"], "not": {"required": ["messages"]}},
                  {"required": ["messages"], "not": {"required": ["prompt"]}}]})

    model: Text | None = Field(None, description="a name from /v1/models (optional, as in vLLM)")
    # Absent or set, never null: the schema's oneOf tells the two shapes apart by which key is present.
    prompt: Text = Field(None, description="text, tokenized as /v1/completions does (BOS added)")  # type: ignore[assignment]
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(  # type: ignore[assignment]
        None, description="a conversation, rendered as /v1/chat/completions renders it (rules 1, 3, 4)")
    add_generation_prompt: bool = Field(True, description="messages: end with the assistant prompt (and "
                                                          "<think>\\n, rule 3)")
    add_special_tokens: bool | None = Field(
        None, description="add the BOS (default: yes for a prompt; no for messages, whose template writes it)")
    return_token_strs: bool = Field(False, description="not supported: true is a 400")
    continue_final_message: bool = Field(False, description="not supported: true is a 400")
    chat_template: Text | None = Field(None, description="not supported (the server's --chat-template applies): "
                                                         "a 400")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: None = None


class DetokenizeRequest(BaseModel):
    model_config = REQUEST_CONFIG
    model: Text | None = Field(None, description="a name from /v1/models (optional, as in vLLM)")
    tokens: list[TokenId] = Field(description="token ids, decoded with special tokens kept")


class DetokenizeResponse(BaseModel):
    prompt: str
