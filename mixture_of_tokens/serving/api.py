"""The HTTP side of `mot-serve`: a FastAPI app whose routes read a typed request (`protocol.py`), hand its prompts to
the [`Engine`] as [`Job`]s, and turn the jobs' [`Event`]s into `protocol.py`'s typed answers, sent as JSON or as
server-sent events."""

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from .engine import Engine, Event, Job, QueueFull, SamplingParams, TokenInfo
from .protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    Logprobs,
    ModelCard,
    ModelList,
    RequestBase,
    UsageInfo,
    now,
    parse_body,
)

GROUPING_HEADER = "X-MoT-Grouping"

StreamChoice = CompletionResponseStreamChoice | ChatCompletionResponseStreamChoice
CompletionChoiceT = TypeVar("CompletionChoiceT", CompletionResponseChoice, CompletionResponseStreamChoice)


@dataclass(frozen=True)
class ChunkFormat:
    """How an endpoint streams: the model of its chunks, the choice each event becomes, and the choice sent before
    any event (chat's announces the assistant's role)."""

    response: type[CompletionStreamResponse | ChatCompletionStreamResponse]
    choice: Callable[[Event], StreamChoice]
    opening: ChatCompletionResponseStreamChoice | None = None


def group_fields(event: Event) -> dict[str, int]:
    """A choice that ends its prompt also says how many requests its group held: its `mot_group_requests`."""
    return {"mot_group_requests": event.group_requests} if event.finish_reason is not None else {}


def completion_choice(choice_class: type[CompletionChoiceT], event: Event, logprobs: bool) -> CompletionChoiceT:
    """A completion's choice for one streamed event, or for all of a prompt's events merged by [`collect`]."""
    return choice_class(index=event.index, text=event.text, finish_reason=event.finish_reason,
                        logprobs=logprobs_of(event.tokens) if logprobs else None, **group_fields(event))  # fmt: skip


def chat_delta(event: Event) -> ChatCompletionResponseStreamChoice:
    delta = DeltaMessage(content=event.text) if event.text else DeltaMessage()
    return ChatCompletionResponseStreamChoice(index=0, delta=delta, finish_reason=event.finish_reason, logprobs=None,
                                              **group_fields(event))  # fmt: skip


CHAT_CHUNKS = ChunkFormat(
    ChatCompletionStreamResponse, chat_delta,
    opening=ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""),
                                               finish_reason=None),
)  # fmt: skip


class Server:
    """The request handling between HTTP and the [`Engine`]: the checks that need the served model (its name,
    vocabulary, context length and tokenizer), tokenization, jobs, and the response models made of their events."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.created = now()
        self.headers = {GROUPING_HEADER: engine.grouping}

    def health(self) -> dict:
        engine = self.engine
        return {"status": "ok", "grouping": engine.grouping, "running": engine.running, "waiting": engine.waiting}

    def models(self) -> ModelList:
        card = ModelCard(id=self.model_name, created=self.created, mot_grouping=self.engine.grouping,
                         group_size=self.engine.group_size, max_model_len=self.engine.context_limit)  # fmt: skip
        return ModelList(data=[card])

    async def complete(self, request: CompletionRequest, http: Request) -> Response:
        """One choice per prompt, in the prompts' order: streamed, or all together when every prompt is done."""
        jobs, queue = self.completion_jobs(request)
        events = self.submit(jobs, queue, http)
        choice = partial(completion_choice, logprobs=request.logprobs is not None)
        if request.stream:
            chunks = ChunkFormat(CompletionStreamResponse, partial(choice, CompletionResponseStreamChoice))
            return self.stream(events, request, chunks)
        finals = await collect(events, len(jobs))
        check_errors(finals)
        choices = [choice(CompletionResponseChoice, final) for final in finals]
        return self.answer(CompletionResponse(**self.envelope(), choices=choices, usage=usage_of(finals)))

    async def chat(self, request: ChatCompletionRequest, http: Request) -> Response:
        """The assistant's message: streamed, or whole when it is done."""
        jobs, queue = self.chat_jobs(request)
        events = self.submit(jobs, queue, http)
        if request.stream:
            return self.stream(events, request, CHAT_CHUNKS)
        (final,) = await collect(events, 1)
        check_errors([final])
        message = ChatMessage(role="assistant", content=final.text)
        choice = ChatCompletionResponseChoice(index=0, message=message, finish_reason=final.finish_reason,
                                              logprobs=None, **group_fields(final))  # fmt: skip
        return self.answer(ChatCompletionResponse(**self.envelope(), choices=[choice], usage=usage_of([final])))

    def completion_jobs(self, request: CompletionRequest) -> tuple[list[Job], asyncio.Queue]:
        """One job per prompt, and the queue their events arrive in."""
        self.check_model(request)
        max_tokens = 16 if request.max_tokens is None else request.max_tokens
        params = request.to_sampling_params(max_tokens, self.engine.vocab_size)
        prompts = self.prompts(request.prompt)
        for ids, _ in prompts:
            self.check_length(ids, max_tokens, "prompt")
        events: asyncio.Queue = asyncio.Queue()
        return [self._job(ids, params, events, index, text) for index, (ids, text) in enumerate(prompts)], events

    def chat_jobs(self, request: ChatCompletionRequest) -> tuple[list[Job], asyncio.Queue]:
        """The job of the chat's prompt, and the queue its events arrive in."""
        self.check_model(request)
        ids = self.chat_prompt(request)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        if max_tokens is None:
            max_tokens = max(self.engine.context_limit - len(ids), 1)  # OpenAI's default: up to the context length
        self.check_length(ids, max_tokens, "messages")
        events: asyncio.Queue = asyncio.Queue()
        return [self._job(ids, request.to_sampling_params(max_tokens, self.engine.vocab_size), events)], events

    def check_model(self, request: RequestBase) -> None:
        if request.model != self.model_name:
            raise ApiError(400, f"unknown model {request.model!r}: this server serves {self.model_name!r}", "model",
                           "model_not_found")  # fmt: skip

    def check_length(self, prompt_ids: list[int], max_tokens: int, param: str) -> None:
        limit = self.engine.context_limit
        if not prompt_ids:
            raise ApiError(400, f"'{param}' must not be empty", param)
        if len(prompt_ids) + max_tokens > limit:
            too_long = len(prompt_ids) >= limit
            raise ApiError(
                400,
                f"this model takes at most {limit} tokens of prompt and answer together; '{param}' has "
                f"{len(prompt_ids)} tokens and 'max_tokens' is {max_tokens}",
                param if too_long else "max_tokens",
                "context_length_exceeded",
            )

    def prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[list[int], str | None]]:
        """(token ids, text) of each prompt of a completion request (text None: given as token ids)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and all(isinstance(token, int) for token in prompt):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "'prompt' must not be empty", "prompt")
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append((self.tokenizer(item)["input_ids"], item))
            elif all(0 <= token < self.engine.vocab_size for token in item):
                prompts.append((list(item), None))
            else:
                raise ApiError(400, f"'prompt' token ids must be in [0, {self.engine.vocab_size})", "prompt")
        return prompts

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"model {self.model_name!r} has no chat template: use /v1/completions", "messages")
        messages = [{"role": message.role, "content": message.text()} for message in request.messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _job(
        self, ids: list[int], params: SamplingParams, events: asyncio.Queue, index: int = 0, text: str | None = None
    ) -> Job:
        """A job whose events the engine's thread hands over to this event loop's `events` queue."""
        loop = asyncio.get_running_loop()
        return Job(ids, params, lambda event: loop.call_soon_threadsafe(events.put_nowait, event), self.tokenizer,
                   index, text)  # fmt: skip

    def submit(self, jobs: list[Job], queue: asyncio.Queue, http: Request) -> AsyncIterator[Event]:
        """Queue all the jobs or none (HTTP 503 when they do not fit), and return their events."""
        try:
            self.engine.submit(jobs)
        except QueueFull as error:
            raise ApiError(503, str(error), None, "queue_full") from error
        return events_of(http, jobs, queue)

    def envelope(self) -> dict[str, str]:
        """The fields of every answer and chunk that come from the server (`id`, `object`, `created` are the models'
        own): the model's name and the grouping mode."""
        return {"model": self.model_name, "mot_grouping": self.engine.grouping}

    def answer(self, response: CompletionResponse | ChatCompletionResponse) -> JSONResponse:
        return JSONResponse(response.model_dump(), headers=self.headers)

    def stream(self, events: AsyncIterator[Event], request: RequestBase, chunks: ChunkFormat) -> StreamingResponse:
        return StreamingResponse(self.sse(events, chunks, request.include_usage), media_type="text/event-stream",
                                 headers=self.headers)  # fmt: skip

    async def sse(self, events: AsyncIterator[Event], chunks: ChunkFormat, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per event, an error object if decoding failed, usage if asked, [DONE]."""

        def chunk(**fields) -> str:
            return sse_line(chunks.response(**self.envelope(), **fields))

        if chunks.opening is not None:
            yield chunk(choices=[chunks.opening])
        finals = []
        async for event in events:
            if event.error is not None:
                yield sse_line(ErrorResponse(error=ErrorInfo(message=event.error, type="server_error")))
                continue
            if event.finish_reason is not None:
                finals.append(event)
            yield chunk(choices=[chunks.choice(event)])
        if include_usage:
            yield chunk(choices=[], usage=usage_of(finals))
        yield "data: [DONE]\n\n"


async def events_of(request: Request, jobs: list[Job], queue: asyncio.Queue) -> AsyncIterator[Event]:
    """The jobs' events until each has finished. A client that disconnects cancels its jobs, which frees their rows
    at the engine's next step, and ends this stream."""

    async def cancel_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for job in jobs:
            job.cancel()
            queue.put_nowait(Event(job.index, finish_reason="cancelled"))

    watcher = asyncio.create_task(cancel_on_disconnect())
    remaining = len(jobs)
    try:
        while remaining:
            event = await queue.get()
            remaining -= event.finish_reason is not None
            yield event
    finally:
        watcher.cancel()
        for job in jobs:
            job.cancel()


async def collect(events: AsyncIterator[Event], n_prompts: int) -> list[Event]:
    """Each prompt's events merged into one, in the prompts' order: all its text and tokens, with the finish reason
    and counts of its last."""
    texts, tokens, finals = defaultdict(str), defaultdict(list), {}
    async for event in events:
        texts[event.index] += event.text
        tokens[event.index] += event.tokens
        if event.finish_reason is not None:
            finals[event.index] = event
    return [replace(finals[i], text=texts[i], tokens=tokens[i]) for i in range(n_prompts)]


def sse_line(data: BaseModel) -> str:
    return f"data: {json.dumps(data.model_dump())}\n\n"


def logprobs_of(tokens: list[TokenInfo]) -> Logprobs:
    """The tokens' [`Logprobs`], each token's offset counted from the start of the events' text."""
    offsets, start = [], 0
    for token in tokens:
        offsets.append(start)
        start += len(token.text)
    return Logprobs(tokens=[t.text for t in tokens], token_logprobs=[t.logprob for t in tokens],
                    top_logprobs=[t.top for t in tokens], text_offset=offsets)  # fmt: skip


def usage_of(finals: list[Event]) -> UsageInfo:
    prompt, completion = sum(e.prompt_tokens for e in finals), sum(e.completion_tokens for e in finals)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def check_errors(finals: list[Event]) -> None:
    """Answer HTTP 500 if decoding any of the prompts failed."""
    for event in finals:
        if event.error is not None:
            raise ApiError(500, event.error, None, "decoding_failed")


# ------------------------------------------------------------------------------------------------------- routes

router = APIRouter()


def server_of(request: Request) -> Server:
    return request.app.state.server


@router.get("/health")
async def health(request: Request) -> dict:
    return server_of(request).health()


@router.get("/v1/models")
async def models(request: Request) -> dict:
    return server_of(request).models().model_dump()


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    body = parse_body(await request.body(), CompletionRequest)
    return await server_of(request).complete(body, request)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = parse_body(await request.body(), ChatCompletionRequest)
    return await server_of(request).chat(body, request)


async def api_error(request: Request, error: ApiError) -> JSONResponse:
    """An [`ApiError`] as OpenAI answers it; a full queue (503) also tells the client when to retry."""
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error.to_response().model_dump(), status_code=error.status, headers=headers)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in OpenAI's shape too."""
    return await api_error(request, ApiError(error.status_code, str(error.detail)))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = app.state.server.engine
    engine.start()
    yield
    # Uvicorn calls this after the in-flight requests are answered; the engine still finishes anything queued.
    await asyncio.to_thread(engine.stop)


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI application around a (not yet started) engine; it starts and stops the engine with the app."""
    app = FastAPI(title="mot-serve", lifespan=lifespan)
    app.state.server = Server(engine, model_name)
    app.include_router(router)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    return app
