"""A minimal client for OpenAI-compatible chat-completions endpoints (vLLM, llama.cpp server, hosted APIs).

Standard library only: urllib for HTTP, a thread pool for bounded concurrency. It is a `chat_fn` for the
judges in `steering.judge`: a batch of chat-message lists in, one reply per item out: the text, None (a reply
without text), or a `ChatFailure` (the request failed after its retries).

Credentials stay with the configured server: redirects are never followed (a 3xx is an `EndpointError`), proxy
environment variables (`http_proxy`, ...) are ignored (a proxy is used only when passed as `proxy=`, and is checked
like the URL), and an API key is not sent over plain http to a host other than this machine unless
`allow_insecure=True`. Each attempt has an overall deadline of `timeout` seconds, so a server that trickles its reply
cannot hold a request longer.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from steering.judge import ChatFailure

log = logging.getLogger(__name__)

_HINTS = {
    401: "set a valid API key in the environment variable named by api_key_env",
    403: "the API key lacks access to this model or endpoint",
    404: "check the URL (it should be the API base, e.g. http://host:8000/v1, without /chat/completions) "
    "and the model name",
}


class EndpointError(RuntimeError):
    """The endpoint cannot be used as configured: it refused the request (4xx), redirected it (3xx), or an API
    key would go over plain http to another machine. (A server error or timeout after the retries is not raised:
    that item gets a `ChatFailure`.)"""


class _RetryableError(Exception):
    """A failure worth retrying: 5xx, 429, connection error, timeout."""


class OpenAIChatClient:
    """Posts each conversation of a batch to `{url}/chat/completions` and returns the replies in order.

    Retries 5xx / 429 / connection errors / timeouts with exponential backoff (`backoff * 2**k` s); `timeout` is
    an overall deadline per attempt (connection, headers and body together), so the longest wait for one item is
    about `(max_retries + 1) * timeout` plus the backoff. An item that still fails gets a
    `ChatFailure` (falsy, with the last error) instead of a reply, and counts in `failed_requests`; the rest of
    the batch goes on, so a flaky judge leaves items unjudged rather than stopping the caller. A 4xx or a 3xx
    redirect is a configuration error: the batch stops at once with an `EndpointError`. A 200 reply without
    `choices[0].message.content` gives None for that item.

    The API key is read from `api_key_env` at call time and never logged; with the variable unset no
    Authorization header is sent (fine for local servers). Redirects are never followed, so the key reaches only
    `url`; over plain `http://` the key is sent only to this machine (`localhost` or a loopback address, not other
    names that merely end in `.localhost`) unless `allow_insecure=True`. Proxy environment variables are ignored;
    `proxy="http://host:port"` routes requests through that proxy, which must then pass the same check (over plain
    http the proxy reads the key)."""

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
        allow_insecure: bool = False,
        proxy: str | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
        if not urllib.parse.urlsplit(url).hostname:
            raise ValueError(f"url {url!r} has no host name; use e.g. http://127.0.0.1:8000/v1")
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
        self.allow_insecure = allow_insecure
        if proxy is not None and not (
            proxy.startswith(("http://", "https://")) and urllib.parse.urlsplit(proxy).hostname
        ):
            raise ValueError(f"proxy {proxy!r} must be a URL such as http://127.0.0.1:3128")
        self.proxy = proxy
        self.failed_requests = 0
        """Items that failed after their retries, over the client's lifetime."""
        self._count_lock = threading.Lock()
        if self._api_key() and self.insecure:
            raise ValueError(self._insecure_message())

    @property
    def insecure(self) -> bool:
        """True when a key would travel unencrypted to another machine (http:// to a non-local host, or through a
        non-local proxy) unasked."""
        if self.allow_insecure or urllib.parse.urlsplit(self.url).scheme != "http":
            return False
        hosts = [self.url] if self.proxy is None else [self.url, self.proxy]
        return not all(_is_local(urllib.parse.urlsplit(u).hostname or "") for u in hosts)

    def _insecure_message(self) -> str:
        via = "" if self.proxy is None else f" through the proxy {self.proxy}"
        return (
            f"refusing to send the API key in ${self.api_key_env} over plain http to {self.url}{via} (another "
            "machine: anyone on the way can read it); use https://, unset the variable for a server without keys, "
            "or pass allow_insecure=True (judge_allow_insecure = true in a spec) if the network is trusted"
        )

    def _api_key(self) -> str | None:
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

    @property
    def endpoint(self) -> str:
        return f"{self.url}/chat/completions"

    def __repr__(self) -> str:
        return f"OpenAIChatClient(url={self.url!r}, model={self.model!r})"

    def __call__(self, batch: Sequence[Sequence[Mapping[str, str]]]) -> list[str | ChatFailure | None]:
        """Replies for a batch of conversations, in input order: the text, None where a reply had no content, or
        a `ChatFailure` where the request failed after its retries."""
        batch = list(batch)
        if not batch:
            return []
        stop = threading.Event()
        results: list[str | ChatFailure | None] = [None] * len(batch)
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
        """The reply text for one conversation; a request that fails after its retries raises `EndpointError`."""
        reply = self._complete(messages, threading.Event())
        if isinstance(reply, ChatFailure):
            raise EndpointError(reply.error)
        return reply

    # -- internals ---------------------------------------------------------------------------------

    def _payload(self, messages: Sequence[Mapping[str, str]]) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": [dict(m) for m in messages]}
        body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.extra_body)
        return json.dumps(body).encode("utf-8")

    def _complete(self, messages: Sequence[Mapping[str, str]], stop: threading.Event) -> str | ChatFailure | None:
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
        error = (
            f"{self.endpoint} did not answer after {attempts} attempt(s) (last error: {last}); "
            "check that the server is running, or raise timeout / max_retries"
        )
        log.warning("%s; item left unjudged", error)
        with self._count_lock:
            self.failed_requests += 1
        return ChatFailure(error)

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "steering"}
        key = self._api_key()
        if key:
            if self.insecure:  # the variable was set after the client was made
                raise EndpointError(self._insecure_message())
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        deadline = _Deadline(self.timeout)
        proxies = {} if self.proxy is None else {"http": self.proxy, "https": self.proxy}
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler(proxies), _NoRedirects, *_deadline_handlers(deadline)
        )  # fmt: skip
        try:
            reply = self._exchange(opener, request)
        except (EndpointError, _RetryableError):
            if deadline.expired:
                raise _RetryableError(deadline.message) from None
            raise
        finally:
            deadline.cancel()
        if deadline.expired:  # the socket was shut mid-reply: what came may be cut short
            raise _RetryableError(deadline.message)
        return reply

    def _exchange(self, opener: urllib.request.OpenerDirector, request: urllib.request.Request) -> bytes:
        """One HTTP exchange: the reply body, or an `EndpointError` / `_RetryableError`."""
        try:
            with opener.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = _snippet(exc)
            if 300 <= exc.code < 400:
                target = exc.headers.get("Location", "?") if exc.headers else "?"
                raise EndpointError(
                    f"{self.endpoint} answered HTTP {exc.code}, a redirect to {target}; redirects are not followed "
                    "(the request and its API key would go to another address): set the judge URL to the "
                    "final address"
                ) from None
            if exc.code >= 500 or exc.code == 429:
                raise _RetryableError(f"HTTP {exc.code}: {detail}") from None
            hint = _HINTS.get(exc.code, "fix the request (model name, message format)")
            raise EndpointError(f"{self.endpoint} answered HTTP {exc.code}: {detail}; {hint}") from None
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets are OSErrors
            reason = getattr(exc, "reason", exc)
            raise _RetryableError(f"{type(exc).__name__}: {reason}") from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib then raises the 3xx as an HTTPError (handled above)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        return None


class _Deadline:
    """An overall deadline for one attempt: when it passes, the attempt's socket is shut down, so a server that
    trickles its reply (each byte within the per-read timeout) cannot hold the request longer."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def message(self) -> str:
        return f"no complete reply within the timeout of {self.seconds:g}s"

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                _shut(self._sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


def _deadline_handlers(deadline: _Deadline) -> tuple[urllib.request.BaseHandler, ...]:
    """HTTP and HTTPS handlers whose connections hand their socket to ``deadline`` once connected."""

    def watched(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        class Watched(base):  # type: ignore[valid-type, misc]
            def connect(self) -> None:
                super().connect()
                deadline.attach(self.sock)

        return Watched

    class HTTPHandler(urllib.request.HTTPHandler):
        def do_open(self, http_class, req, **kwargs):  # noqa: ANN001, ANN201 - urllib's signature
            return super().do_open(watched(http_class), req, **kwargs)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def do_open(self, http_class, req, **kwargs):  # noqa: ANN001, ANN201 - urllib's signature
            return super().do_open(watched(http_class), req, **kwargs)

    return HTTPHandler(), HTTPSHandler()


def _is_local(host: str) -> bool:
    """``localhost`` or a loopback address: traffic that never leaves this machine. Other names ending in
    ``.localhost`` are not trusted by name: a resolver may send them anywhere."""
    host = host.lower().rstrip(".").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
