"""Wire models only (no torch, no engine): importable by clients/ and evals/.

Fields are in the order of OpenAI's API reference; obliviate's extensions sit in one marked block.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger("obliviate.protocol")

MAX_LOGPROBS = 20
MAX_N = 16
MAX_NAME = 256  # model, profile and user names


def _check_unicode(v, where: str = ""):
    """Strings must be encodable text: JSON allows lone surrogates ("\\ud800"), tokenizers do not."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where}not valid Unicode: a lone surrogate at character {e.start}") from None
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_unicode(x, f"item {i}: " if isinstance(x, str) else where)
    return v


class OpenAIBaseModel(BaseModel):
    # unknown fields are accepted (as OpenAI clients send new ones) and logged
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_extra(self):
        if self.model_extra:
            log.warning("ignoring unknown fields: %s", sorted(self.model_extra))
        return self


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class SamplingFields(OpenAIBaseModel):
    """What completions and chat completions share: the model, the sampling fields and streaming."""
    model: str | None = Field(default=None, max_length=MAX_NAME)
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> added to its logit, in [-100, 100]
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float = 0.0
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = Field(default=None, max_length=MAX_NAME)
    # --- obliviate extensions ---------------------------------------------------------------
    # the ablation profile; may also be given as the model name ("hp_unlearn" or
    # "gemma-3-270m:hp_unlearn") for clients that cannot add fields; or a whole profile spec (an inline
    # profile, for keys that allow it: its SAEs must be ones the server has)
    profile: Annotated[str, Field(max_length=MAX_NAME)] | dict[str, Any] | None = None
    # vLLM's sampling extensions, with its meanings
    top_k: int | None = None  # 0 or -1: every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False  # generate through end-of-sequence tokens until max_tokens (fixed-length workloads)

    _unicode = field_validator("model", "stop", "user", "profile")(_check_unicode)

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int = Field(default=16, ge=0)
    suffix: str | None = None

    _unicode_prompt = field_validator("prompt", "suffix")(_check_unicode)

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of strings or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class Logprobs(BaseModel):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] | None = None


class Unlearning(BaseModel):
    """The trigger audit (an extension, on each choice of a profile that edits the model; streamed with the
    choice's finish_reason): whether the profile's edit fired, and at which token. first_token indexes the
    prompt's tokens as the model read them (the BOS the server adds is 0; usage.prompt_tokens counts them),
    then the generated ones; token is its text."""

    triggered: bool
    first_token: int | None = None
    token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    unlearning: Unlearning | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    # --- obliviate extensions ---
    profile: str | None = None


# --- chat completions ---------------------------------------------------------------------------
class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str

    _unicode = field_validator("text")(_check_unicode)


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=MAX_NAME)

    _unicode = field_validator("content", "name")(_check_unicode)

    def text(self) -> str:
        c = self.content
        return c if isinstance(c, str) else "".join(p.text for p in c or [])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=0)  # deprecated by OpenAI for max_completion_tokens
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # --- vLLM's extensions ---
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the reply continues the last (assistant) message


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    unlearning: Unlearning | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    # --- obliviate extensions ---
    profile: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    unlearning: Unlearning | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    # --- obliviate extensions ---
    profile: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "obliviate"
    root: str | None = None
    # --- obliviate extensions ---
    profile: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ProfileCard(BaseModel):
    name: str
    description: str = ""
    model: str | None = None
    prefix: str = ""
    adapter: str | None = None  # the LoRA adapter folder the profile applies (None: none)
    interventions: list[dict[str, Any]] = []
    version: int = 1


class ProfileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ProfileCard]


# --- tokenizer endpoints, as vLLM serves them (lm-eval's `tokenizer_backend=remote` uses them) ---
class TokenizeRequest(OpenAIBaseModel):
    """A prompt, or chat messages (vLLM's chat form: rendered with the served chat template, the ids
    returned are the prompt a chat completion is served with)."""
    model: str | None = Field(default=None, max_length=MAX_NAME)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True  # prompts only: a chat prompt's special tokens are the template's
    return_token_strs: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    _unicode = field_validator("prompt", "model")(_check_unicode)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class TokenizerInfo(BaseModel):
    """vLLM's /tokenizer_info: what a client needs to tokenize as the server does."""
    tokenizer_class: str
    model_max_length: int
    vocab_size: int
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = Field(default=None, max_length=MAX_NAME)
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def first_error(e: ValidationError, whole: str = "body", skip: tuple[str, ...] = ()) -> tuple[str, str]:
    """A pydantic error as one line: (where, message) of its first problem; `whole` names an empty location."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()) if p not in skip) or whole
    return where, err["msg"].removeprefix("Value error, ")
