"""A minimal client for OpenAI-compatible chat-completions endpoints (vLLM, llama.cpp server, hosted APIs).

Standard library only: urllib for HTTP, a thread pool for bounded concurrency. It is a `chat_fn` for the
judges in `steering.judge`: a batch of chat-message lists in, one reply string (or None) per item out.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

log = logging.getLogger(__name__)

_HINTS = {
    401: "set a valid API key in the environment variable named by api_key_env",
    403: "the API key lacks access to this model or endpoint",
    404: "check the URL (it should be the API base, e.g. http://host:8000/v1, without /chat/completions) "
    "and the model name",
}


class EndpointError(RuntimeError):
    """The endpoint refused the request (4xx) or did not answer within the retry budget."""


class _RetryableError(Exception):
    """A failure worth retrying: 5xx, 429, connection error, timeout."""


class OpenAIChatClient:
    """Posts each conversation of a batch to `{url}/chat/completions` and returns the reply texts in order.

    Retries 5xx / 429 / connection errors / timeouts with exponential backoff (`backoff * 2**k` s); a 4xx
    fails at once. The longest wait for one item is about `(max_retries + 1) * timeout` plus the backoff; the
    first item that exhausts its retries stops the batch with an `EndpointError`. A 200 reply without
    `choices[0].message.content` gives None for that item. The API key is read from `api_key_env` at call time
    and never logged; with the variable unset no Authorization header is sent (fine for local servers)."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 4,
        temperature: float = 0.0,
        max_tokens: int | None = 1024,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
        if timeout <= 0 or max_retries < 0 or backoff < 0 or concurrency < 1:
            raise ValueError(
                "need timeout > 0, max_retries >= 0, backoff >= 0 and concurrency >= 1; "
                f"got timeout={timeout}, max_retries={max_retries}, backoff={backoff}, "
                f"concurrency={concurrency}"
            )
        self.url = url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})

    @property
    def endpoint(self) -> str:
        return f"{self.url}/chat/completions"

    def __repr__(self) -> str:
        return f"OpenAIChatClient(url={self.url!r}, model={self.model!r})"

    def __call__(self, batch: Sequence[Sequence[Mapping[str, str]]]) -> list[str | None]:
        """Reply texts for a batch of conversations, in input order (None where a reply had no content)."""
        batch = list(batch)
        if not batch:
            return []
        stop = threading.Event()
        results: list[str | None] = [None] * len(batch)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(batch))) as pool:
            futures = {pool.submit(self._complete, messages, stop): i for i, messages in enumerate(batch)}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
            except BaseException:
                stop.set()
                for future in futures:
                    future.cancel()
                raise
        return results

    def complete(self, messages: Sequence[Mapping[str, str]]) -> str | None:
        """The reply text for one conversation."""
        return self._complete(messages, threading.Event())

    # -- internals ---------------------------------------------------------------------------------

    def _payload(self, messages: Sequence[Mapping[str, str]]) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": [dict(m) for m in messages]}
        body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.extra_body)
        return json.dumps(body).encode("utf-8")

    def _complete(self, messages: Sequence[Mapping[str, str]], stop: threading.Event) -> str | None:
        body = self._payload(messages)
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            if stop.is_set():
                raise EndpointError(f"{self.endpoint}: batch stopped after another request failed")
            try:
                return _content(self._post(body), self.endpoint)
            except _RetryableError as exc:
                last = str(exc)
            if attempt + 1 < attempts:
                delay = self.backoff * 2**attempt
                log.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.2fs",
                    self.endpoint,
                    attempt + 1,
                    attempts,
                    last,
                    delay,
                )
                if stop.wait(delay):
                    raise EndpointError(f"{self.endpoint}: batch stopped after another request failed")
        raise EndpointError(
            f"{self.endpoint} did not answer after {attempts} attempt(s) (last error: {last}); "
            "check that the server is running, or raise timeout / max_retries"
        )

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "steering"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        opener = urllib.request.build_opener()
        try:
            with opener.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = _snippet(exc)
            if exc.code >= 500 or exc.code == 429:
                raise _RetryableError(f"HTTP {exc.code}: {detail}") from None
            hint = _HINTS.get(exc.code, "fix the request (model name, message format)")
            raise EndpointError(f"{self.endpoint} answered HTTP {exc.code}: {detail}; {hint}") from None
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets are OSErrors
            reason = getattr(exc, "reason", exc)
            raise _RetryableError(f"{type(exc).__name__}: {reason}") from None


def _snippet(exc: urllib.error.HTTPError, limit: int = 300) -> str:
    try:
        text = exc.read(limit).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the body is only a hint
        text = ""
    return " ".join(text.split()) or exc.reason or "no body"


def _content(raw: bytes, endpoint: str) -> str | None:
    """choices[0].message.content of a reply body, or None (logged) when the body has no such text."""
    try:
        data = json.loads(raw)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        log.warning("%s: reply without choices[0].message.content; item left unjudged", endpoint)
        return None
    if not isinstance(content, str):
        log.warning("%s: reply content is %s, not text; item left unjudged", endpoint, type(content).__name__)
        return None
    return content
