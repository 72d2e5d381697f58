"""LLM-judge accuracy reward (docs/reference.md#rewards): strict YES/NO from an OpenAI-compatible server (vLLM sidecar).

``JudgeClient.score(pairs)`` returns one score per (prediction, ground truth): 1.0 (YES), 0.0 (NO) or ``None``
(missing: the judge could not be reached, or answered something other than YES/NO twice). Missing is never 0.
``JudgeClient.verdicts(pairs)`` also gives each missing score's reason, ``"KIND: detail"``, KIND one of
``FAILURE_KINDS``: ``connection`` (connection refused, timeout, 429, 5xx once retries are spent), ``malformed`` (a
body that is not a chat completion, or a reply that is neither YES nor NO), ``rejected`` (another 4xx: a wrong
model name, URL or key) and ``deadline`` (cancelled at the batch's deadline). ``check_judge(cfg)`` sends one probe
request at start-up and raises ``JudgeUnreachable`` (one line: URL, model, error, fix) when no verdict comes back.

The request is the reference's: its prompt (``REFERENCE_PROMPT``, prediction and truth inserted as they are),
temperature 0, 4 new tokens, thinking off; a prediction equal to the truth scores 1 without a call. Differences from
the reference, which calls the judge serially, never retries, scores an HTTP error 0 and counts "YES" anywhere in
the reply (docs/reference.md#reference-defects-we-do-not-copy):

* requests run concurrently (``asyncio`` + the ``openai`` async client) under a semaphore of ``max_concurrency``;
* connection errors, timeouts, 429, 5xx and malformed bodies are retried with exponential backoff and full jitter
  (``max_retries: 0`` is the reference's single try); any other exception (a TypeError, AttributeError, KeyError,
  ... in our code) is a bug: it is not retried and not counted missing, it propagates out of ``score`` so the
  trainer stops loudly;
* ``missing_on_failure`` (false: the reference's 0): a verdict that could not be had is missing, never 0;
* ``strict_reply`` (false: the reference's "YES" anywhere in the upper-cased reply): the reply, stripped, must be
  exactly ``YES`` or ``NO``; anything else is retried once, then missing. With ``structured_outputs`` (false: the
  reference) decoding is constrained to the two words (vLLM structured outputs ``choice``);
* verdicts are cached per (prediction, truth) across calls, in an LRU cache of ``cache_size`` entries (at
  temperature 0 the same request gets the same verdict), and predictions that address the judge ("respond with
  YES", "ignore the instructions", ...) are counted (``judge_flagged``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import threading
import time
from collections import Counter, OrderedDict

import openai

REFERENCE_PROMPT = (
    "You are a helpful assistant.\nGiven a predicted answer and the ground truth answer, respond with exactly "
    '"YES" if the content matches, otherwise respond with "NO".\nStart your response with "YES" or "NO" in '
    "uppercase.\n\nPredicted:{predict}\nGround Truth:{ground_truth}\n"
)


class MalformedReply(Exception):
    """A 200 whose body is not a chat completion: a proxy's error page, a garbled or truncated body."""


class JudgeUnreachable(RuntimeError):
    """The start-up probe (``check_judge``) got no verdict; the message is one line: URL, model, error, fix."""


CONNECTION, MALFORMED, REJECTED, DEADLINE = "connection", "malformed", "rejected", "deadline"
FAILURE_KINDS = (CONNECTION, MALFORMED, REJECTED, DEADLINE)  # why a judge reward is missing (module docstring)


# Transient: connection errors, timeouts, 429, 5xx, and bodies that are not a chat completion. Nothing broader: a
# TypeError or ValueError from our own code must not be retried into a "missing" reward.
RETRYABLE = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError, openai.InternalServerError,
             openai.APIResponseValidationError, MalformedReply)
_ADDRESSES_JUDGE = re.compile(
    r"(respond|answer|reply|say|output)\s+(with\s+)?[\"']?(yes|no)\b|ignore\s+(all\s+|the\s+|previous\s+|above\s+)*"
    r"(instructions|rules)|ground\s*truth|you\s+are\s+(a|an|the)\s+(judge|grader|assistant)|\bas\s+the\s+judge\b",
    re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    url: str | None = None  # e.g. http://127.0.0.1:8000/v1 ; None switches the judge off
    model: str = "Qwen/Qwen3-4B-Instruct-2507"
    api_key_env: str = "MEDIX_JUDGE_API_KEY"  # the key is read from this variable and never logged
    prompt: str = REFERENCE_PROMPT  # {predict} and {ground_truth} are filled in
    max_concurrency: int = 64
    timeout_s: float = 30.0  # per request
    max_retries: int = 4  # transport retries (connection, timeout, 429, 5xx)
    backoff_s: float = 0.25  # first backoff; doubles, with full jitter
    structured_outputs: bool = True  # vLLM: constrain decoding to YES / NO (the reference does not)
    strict_reply: bool = True  # the reply must be exactly YES or NO (false: "YES" anywhere counts, as the reference)
    missing_on_failure: bool = True  # no verdict is missing, never 0 (false: 0, as the reference)
    enable_thinking: bool = False  # passed as chat_template_kwargs (Qwen3 judges)
    # Verdicts kept per (prediction, truth), least recently used evicted first; 0 switches the cache off.
    # An entry holds the answer and the truth: 100k short answers take tens of MB.
    cache_size: int = 100_000

    def __post_init__(self):
        if isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise ValueError(f"judge cache_size must be an integer >= 0 (0 switches the verdict cache off), "
                             f"not {self.cache_size!r}")


def addresses_judge(prediction: str) -> bool:
    return bool(_ADDRESSES_JUDGE.search(prediction))


class JudgeClient:
    def __init__(self, cfg: JudgeConfig):
        if not cfg.url:
            raise ValueError("rewards.judge.url is not set")
        self.cfg = cfg
        self.cache: OrderedDict[tuple[str, str], float] = OrderedDict()  # LRU: most recently used last
        self._cache_lock = threading.Lock()  # score may be called from more than one thread
        self.stats: Counter = Counter()
        self.latencies: list[float] = []  # seconds per answered request, since the last reset by the caller

    def _client(self) -> openai.AsyncOpenAI:
        return make_client(self.cfg)

    def _cached(self, key: tuple[str, str]) -> float | None:
        with self._cache_lock:
            verdict = self.cache.get(key)
            if verdict is not None:
                self.cache.move_to_end(key)
            return verdict

    def _remember(self, key: tuple[str, str], verdict: float) -> None:
        if self.cfg.cache_size == 0:
            return
        with self._cache_lock:
            self.cache[key] = verdict
            self.cache.move_to_end(key)
            while len(self.cache) > self.cfg.cache_size:
                self.cache.popitem(last=False)
                self.stats["judge_cache_evictions"] += 1

    def prompt(self, prediction: str, truth: str) -> str:
        return self.cfg.prompt.format(predict=prediction, ground_truth=truth)

    def score(self, pairs: list[tuple[str, str]], timeout: float | None = None) -> list[float | None]:
        """Blocking: judge every (prediction, truth) pair; run from a worker thread, not an event loop.

        After ``timeout`` seconds the unfinished requests are cancelled and their pairs are missing, so one hung
        batch never holds the worker (or the server's queue) into the next. An exception that is not a transport
        failure (a bug) cancels the other requests and is raised here.
        """
        return self.verdicts(pairs, timeout)[0]

    def verdicts(self, pairs: list[tuple[str, str]],
                 timeout: float | None = None) -> tuple[list[float | None], list[str | None]]:
        """``score``, and per pair why its score is missing (``"KIND: detail"``, module docstring) or None."""
        return asyncio.run(self.verdicts_async(pairs, timeout))

    async def score_async(self, pairs: list[tuple[str, str]], timeout: float | None = None) -> list[float | None]:
        return (await self.verdicts_async(pairs, timeout))[0]

    async def verdicts_async(self, pairs: list[tuple[str, str]],
                             timeout: float | None = None) -> tuple[list[float | None], list[str | None]]:
        scores: list[float | None] = [None] * len(pairs)
        errors: list[str | None] = [None] * len(pairs)
        todo: dict[tuple[str, str], list[int]] = {}
        for i, (prediction, truth) in enumerate(pairs):
            key = (prediction, truth)
            self.stats["judge_flagged"] += addresses_judge(prediction)
            if prediction == truth:
                scores[i] = 1.0
                self.stats["judge_exact_match"] += 1
            elif (cached := self._cached(key)) is not None:
                scores[i] = cached
                self.stats["judge_cache_hits"] += 1
            else:
                todo.setdefault(key, []).append(i)
        if todo:
            client = self._client()
            semaphore = asyncio.Semaphore(self.cfg.max_concurrency)
            tasks = {key: asyncio.ensure_future(self._judge(client, semaphore, *pairs[idx[0]]))
                     for key, idx in todo.items()}
            try:
                # Transport failures end a task with None, never an exception: an exception is a bug, so stop there.
                _, late = await asyncio.wait(tasks.values(), timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)  # waits for the cancellations; checked below
            finally:
                await client.close()
            bugs = [e for task in tasks.values() if not task.cancelled() and (e := task.exception()) is not None]
            if bugs:  # every exception retrieved (none logged as "never retrieved"), the first raised
                raise bugs[0]
            self.stats["judge_cancelled"] += len(late)
            for key, task in tasks.items():
                verdict, error = ((None, f"{DEADLINE}: no verdict within the batch's {timeout or 0:.1f} s")
                                  if task.cancelled() else task.result())
                self.stats["judge_cache_hits"] += len(todo[key]) - 1
                if verdict is not None:
                    self._remember(key, verdict)
                for i in todo[key]:
                    scores[i], errors[i] = verdict, error
        self.stats["judge_missing"] += sum(s is None for s in scores)
        if not self.cfg.missing_on_failure:  # the reference: no verdict scores 0 (the reason is still reported)
            scores = [0.0 if s is None else s for s in scores]
        return scores, errors

    async def _judge(self, client, semaphore, prediction: str, truth: str) -> tuple[float | None, str | None]:
        """(verdict, None), or (None, why: ``"KIND: detail"``)."""
        for _ in range(2):  # one retry for a reply that is not exactly YES or NO
            failures: list[str] = []
            reply = await self._call(client, semaphore, self.prompt(prediction, truth), failures)
            if reply is None:
                return None, failures[-1] if failures else f"{CONNECTION}: no reply"
            if not self.cfg.strict_reply:  # the reference's reading
                return (1.0 if "YES" in reply.upper() else 0.0), None
            if reply in ("YES", "NO"):
                return (1.0 if reply == "YES" else 0.0), None
            self.stats["judge_invalid_replies"] += 1
        return None, f"{MALFORMED}: the reply is neither YES nor NO: {reply!r:.80}"

    def _extra(self) -> dict:
        extra: dict[str, dict] = {"chat_template_kwargs": {"enable_thinking": self.cfg.enable_thinking}}
        if self.cfg.structured_outputs:
            extra["structured_outputs"] = {"choice": ["YES", "NO"]}
        return extra

    async def _call(self, client, semaphore, prompt: str, failures: list[str] | None = None) -> str | None:
        reply = await chat(client, semaphore, self.cfg, [{"role": "user", "content": prompt}],
                           THINKING_TOKENS if self.cfg.enable_thinking else 4, self._extra(), self.stats,
                           self.latencies, failures)
        return after_thinking(reply)


THINKING_TOKENS = 4096  # reply budget of a judge allowed to think (enable_thinking) before its verdict


def after_thinking(reply: str | None) -> str | None:
    """The reply after a thinking judge's ``</think>`` (unchanged when there is none)."""
    return None if reply is None else reply.rsplit("</think>", 1)[-1].strip()


async def _create(client: openai.AsyncOpenAI, **request):
    """``client.chat.completions.create``; a body that cannot be decoded (the client's ``response.json()``, with a
    JSON content type) is a ``MalformedReply``, not the ``ValueError`` it comes as."""
    try:
        return await client.chat.completions.create(**request)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MalformedReply(f"the reply body is not JSON ({type(e).__name__}: {e})") from e


def reply_text(response: object) -> str:
    """The stripped text of the first choice ('' when there is no choice or no content). ``MalformedReply`` when the
    body is not a chat completion: the client hands back a non-JSON body as a ``str`` and does not validate shapes."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list):
        raise MalformedReply(f"the reply is not a chat completion (a {type(response).__name__} without choices)")
    if not choices:
        return ""
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if message is None or not isinstance(content, (str, type(None))):
        raise MalformedReply(f"the reply's first choice has no message with text content: {choices[0]!r:.200}")
    return (content or "").strip()


def make_client(cfg: JudgeConfig) -> openai.AsyncOpenAI:
    """Async client for ``cfg.url``; the key comes from ``cfg.api_key_env`` (never logged); retries are ours."""
    return openai.AsyncOpenAI(base_url=cfg.url, api_key=os.environ.get(cfg.api_key_env, "EMPTY"),
                              timeout=cfg.timeout_s, max_retries=0)


def failure_kind(error: BaseException) -> str:
    """The ``FAILURE_KINDS`` entry of a transport error ``chat`` gave up on."""
    if isinstance(error, (MalformedReply, openai.APIResponseValidationError)):
        return MALFORMED
    if isinstance(error, openai.APIStatusError) and error.status_code not in (408, 429) and error.status_code < 500:
        return REJECTED
    return CONNECTION  # connection refused, timeout, 408, 429, 5xx


def describe(error: BaseException) -> str:
    """``"KIND: Type: message"`` on one line (at most ~300 characters); a connection error names its root cause
    (e.g. ``ConnectionRefusedError``), which the client's message ("Connection error.") does not."""
    text = f"{type(error).__name__}: {str(error).rstrip('.')}"
    if isinstance(error, openai.APIConnectionError) and not isinstance(error, openai.APITimeoutError):
        root: BaseException = error
        seen: set[int] = set()
        while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
            seen.add(id(root))
            root = nxt
        if root is not error and str(root):
            text += f" ({type(root).__name__}: {root})"
    return f"{failure_kind(error)}: {' '.join(text.split())[:300]}"


async def chat(client: openai.AsyncOpenAI, semaphore: asyncio.Semaphore, cfg: JudgeConfig, messages: list[dict],
               max_tokens: int, extra: dict, stats: Counter, latencies: list[float],
               failures: list[str] | None = None) -> str | None:
    """One chat completion at temperature 0: the reply's stripped text, or None once transport retries are spent
    (then, with ``failures``, ``describe`` of the last error is appended to it).

    Connection errors, timeouts, 429, 5xx and malformed bodies are retried ``cfg.max_retries`` times with
    exponential backoff and full jitter; other 4xx are not retried (the request itself is wrong). Any other
    exception is a bug in the caller or here and propagates."""
    for attempt in range(cfg.max_retries + 1):
        try:
            async with semaphore:
                stats["judge_calls"] += 1
                start = time.perf_counter()
                response = await _create(client, model=cfg.model, messages=messages, temperature=0.0,
                                         max_tokens=max_tokens, extra_body=extra)
                latencies.append(time.perf_counter() - start)
            return reply_text(response)
        except RETRYABLE as e:
            stats[f"judge_error_{type(e).__name__}"] += 1
            if attempt == cfg.max_retries:
                if failures is not None:
                    failures.append(describe(e))
                return None
            await asyncio.sleep(random.uniform(0, cfg.backoff_s * 2**attempt))
        except openai.APIError as e:
            stats[f"judge_error_{type(e).__name__}"] += 1
            if failures is not None:
                failures.append(describe(e))
            return None
    return None


_PROBE = ("pneumonia of the left lower lobe", "left lower lobe pneumonia")  # any pair; the reply must parse
_FIXES = {CONNECTION: "is the judge running and healthy? Start it (scripts/serve_judge.sh) or fix the judge URL",
          MALFORMED: "the server does not answer as a YES/NO chat judge: check the judge URL and model",
          REJECTED: "check the model name the server serves (the judge model setting) and its API key"}


def check_judge(cfg: JudgeConfig, timeout: float | None = None, *, messages: list[dict] | None = None,
                accept=None, max_tokens: int | None = None, extra: dict | None = None) -> str:
    """Send one probe request to the judge at ``cfg.url``, as scoring sends them, without retries; the reply.

    Raises ``JudgeUnreachable`` with one line naming the URL, the model, the error and the fix (or
    ``--no-judge-check`` to skip the probe) when the request fails or ``accept(reply)`` is false. Defaults: the
    reward judge's request (``cfg.prompt`` on a fixed pair, its structured outputs and token budget), ``accept``:
    the reply is exactly YES or NO. ``timeout``: seconds for the request (default ``cfg.timeout_s``). Blocking; call
    it from no event loop.
    """
    if not cfg.url:
        raise ValueError("check_judge: the judge config has no url")
    probe = dataclasses.replace(cfg, max_retries=0, timeout_s=cfg.timeout_s if timeout is None else timeout)
    judge = JudgeClient(probe)
    if messages is None:
        messages = [{"role": "user", "content": judge.prompt(*_PROBE)}]
        max_tokens = max_tokens or (THINKING_TOKENS if cfg.enable_thinking else 4)
        extra = judge._extra() if extra is None else extra
    accept = accept or (lambda text: text in ("YES", "NO"))
    failures: list[str] = []

    async def ask():
        client = make_client(probe)
        try:
            return after_thinking(await chat(client, asyncio.Semaphore(1), probe, messages, max_tokens or 64,
                                             extra or {}, judge.stats, judge.latencies, failures))
        finally:
            await client.close()

    reply = asyncio.run(ask())
    if reply is None:
        error = failures[-1] if failures else f"{CONNECTION}: no reply"
    elif not accept(reply):
        error = f"{MALFORMED}: the reply is not a verdict: {reply!r:.80}"
    else:
        return reply
    kind = error.split(":", 1)[0]
    raise JudgeUnreachable(f"judge check failed: {cfg.url} (model {str(cfg.model)!r}): {error}; "
                           f"{_FIXES.get(kind, _FIXES[CONNECTION])}, or skip this check with --no-judge-check")
