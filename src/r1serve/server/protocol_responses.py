"""The wire format of `POST /v1/responses` (OpenAI's Responses API), for text input and a reasoning model.

The request accepts what r1serve can serve: `input` as a string or a list of messages (text content),
`instructions`, `max_output_tokens`, `temperature`, `top_p`, `reasoning.effort`, `stream`, `metadata`, and
r1serve's `max_thinking_tokens` and `ignore_eos`. The fields OpenAI defines for tools, server-side state and
other outputs are declared too, so that the document names them, and refused by `serving_responses` with a
400 naming the field. The response models follow `openai.types.responses` (the SDK parses them; a test
holds them to it): the reasoning is an `output` item of type `reasoning` with `reasoning_text` content (as
vLLM returns it), the answer a `message` item with `output_text` content.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from r1serve.server.protocol import (
    REQUEST_CONFIG,
    NonEmptyText,
    NonNegativeInt,
    PositiveInt,
    ReasoningEffort,
    Text,
)

InputRole = Literal["user", "system", "developer", "assistant"]


class InputTextPart(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["input_text", "output_text"]
    text: Text


class InputMessage(BaseModel):
    """One turn of `input` (`type` may be left out, as the SDK's easy form does)."""

    model_config = REQUEST_CONFIG
    type: Literal["message"] = "message"
    role: InputRole
    content: Text | list[InputTextPart]

    def to_chat(self) -> dict[str, Any]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ReasoningConfig(BaseModel):
    model_config = REQUEST_CONFIG
    effort: ReasoningEffort | None = Field(None, description="a thinking budget: low 1024, medium 4096, high none")
    summary: Literal["auto", "concise", "detailed"] | None = Field(
        None, description="accepted: the reasoning is returned whole, as reasoning_text")


class ResponsesRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: Text = Field(description="a name from /v1/models")
    input: NonEmptyText | Annotated[list[InputMessage], Field(min_length=1)] = Field(
        description="a user message as text, or the conversation (text content only)")
    instructions: Text | None = Field(None, description="a system prompt: folded into the first user turn "
                                                        "(R1 usage rule 1)")
    max_output_tokens: PositiveInt | None = Field(None, description="most output tokens, reasoning included")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 0.6 (R1 usage rule 2)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default 0.95 (R1 usage rule 2)")
    reasoning: ReasoningConfig | None = None
    max_thinking_tokens: NonNegativeInt | None = Field(
        None, description="r1serve's rule 7: close the reasoning after this many tokens (wins over effort)")
    ignore_eos: bool = Field(False, description="r1serve (vLLM) extension: keep generating past the end token")
    stream: bool = False
    metadata: dict[str, Text] | None = Field(None, description="echoed in the response")
    user: Text | None = None
    # OpenAI fields r1serve does not implement: declared so that the 400 for them is documented.
    tools: list[Any] | None = Field(None, description="not supported: a non-empty list is a 400")
    tool_choice: Any | None = Field(None, description="not supported: a 400")
    parallel_tool_calls: bool | None = Field(None, description="not supported: true is a 400")
    previous_response_id: Text | None = Field(None, description="not supported (nothing is stored): a 400")
    conversation: Any | None = Field(None, description="not supported (nothing is stored): a 400")
    store: bool | None = Field(None, description="nothing is stored: true is a 400")
    background: bool | None = Field(None, description="not supported: true is a 400")
    include: list[Any] | None = Field(None, description="not supported: a non-empty list is a 400")
    prompt: Any | None = Field(None, description="prompt templates are not supported: a 400")
    text: dict[str, Any] | None = Field(
        None, description="format: text, json_object or json_schema (name, schema, strict), applied to the "
                          "answer after </think>")
    truncation: Literal["auto", "disabled"] | None = Field(None, description="'auto' is not supported: a 400")
    top_logprobs: int | None = Field(None, description="not supported: a 400")
    max_tool_calls: int | None = Field(None, description="not supported: a 400")


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class ReasoningItem(BaseModel):
    """The text before `</think>` (R1 usage rule 5), whole, as `content`; `summary` stays empty."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    status: ItemStatus


class MessageItem(BaseModel):
    """The answer: the text after `</think>`."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText] = Field(default_factory=list)


OutputItem = Annotated[Annotated[ReasoningItem, Tag("reasoning")] | Annotated[MessageItem, Tag("message")],
                       Discriminator(lambda item: item.get("type") if isinstance(item, dict) else item.type)]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponsesUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ReasoningEcho(BaseModel):
    effort: ReasoningEffort | None = None
    summary: str | None = None


class ResponseObject(BaseModel):
    """A response: `status` `completed`, `incomplete` (the output limit, `incomplete_details` says so; or the
    repetition guard / an abort, with none) or `in_progress` (in a stream's first events)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    model: str
    status: Literal["in_progress", "completed", "incomplete"]
    incomplete_details: IncompleteDetails | None = None
    error: None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float
    top_p: float
    output: list[OutputItem]
    parallel_tool_calls: bool = False
    tool_choice: Literal["none"] = "none"
    tools: list[Any] = Field(default_factory=list)
    reasoning: ReasoningEcho = Field(default_factory=ReasoningEcho)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["disabled"] = "disabled"
    store: bool = False
    background: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    usage: ResponsesUsage | None = None


class ResponsesStreamEvent(BaseModel):
    """One event of a Responses stream (documentation): `type` is `response.created`, `response.in_progress`,
    `response.output_item.added`, `response.content_part.added`, `response.reasoning_text.delta`,
    `response.reasoning_text.done`, `response.output_text.delta`, `response.output_text.done`,
    `response.content_part.done`, `response.output_item.done`, then `response.completed` or
    `response.incomplete`; the other fields are those of that event type in OpenAI's API."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int
