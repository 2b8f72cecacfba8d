"""Regeneration through an OpenAI-compatible completions server (vLLM, SGLang): `ServerGenerator`.

The prompts are rendered here with the backbone's chat template (the stage's ChatRenderer), so the server
only continues token sequences; its own chat template is never used. `ServerGenerator` implements the
`Generator` protocol of regen.py, so sharding, resumption and accounting are the ones of `regenerate`.

Wire format, decided once per generator by a probe request (`connect`):

* Prompts go as token ids (`"prompt": [ids]`, accepted by vLLM, SGLang and the OpenAI spec): the server
  sees exactly the tokens the local template wrote, with no second BOS and no re-parsing of special-token
  text. A server that refuses them (HTTP 4xx) gets the decoded text instead, with `add_special_tokens: false`,
  and a warning.
* Responses are taken as token ids when the server returns them: `choices[i].token_ids` (vLLM's
  `return_token_ids`), else `logprobs.tokens` written as "token_id:N" (vLLM's `return_tokens_as_token_ids`).
  Otherwise the text (asked with `skip_special_tokens: false`) is tokenized again here, with a warning:
  encode(decode(ids)) is not always the ids the model wrote (a BPE can merge across the boundaries the model
  chose), so a few training tokens may differ from what the target would have produced.
* A response that the server ended with finish_reason "stop" ends with an end-of-sequence token: when the
  server left it out, the stop token it names (`stop_reason`) or the tokenizer's eos is appended, as the
  local generators do.

Model and tokenizer check (before the first prompt is sent): `/v1/models` must list `model` (or exactly one
model when `model` is None), and the server must tokenize a probe conversation, rendered with the local chat
template, into exactly the local ids: through its tokenize endpoint when present (vLLM, SGLang, llama.cpp's
llama-server: `/tokenize`; llama-cpp-python: `/extras/tokenize`), else
through `prompt_token_ids` of a 1-token text completion, else (weakest) its `usage.prompt_tokens` count.
Two checkpoints with the same tokenizer (e.g. two sizes of one family) are told apart only by their name.

Requests: one prompt per request, at most `concurrency` in flight (a thread pool; `regenerate` hands over
`data.batch_size` prompts at a time, so set batch_size to a few times the concurrency). Connection errors,
timeouts, 429 and 5xx are retried up to `max_retries` times with exponential backoff (honouring Retry-After);
any other status fails at once with the server's message. Sampling (temperature > 0) sends a per-prompt seed
derived from the batch seed, and leaves top-k / top-p to the server's defaults (vLLM: the model's
generation_config).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ..config.schema import ConfigError
from .regen import cut_at_eos

PROBE_MESSAGES = [{"role": "user", "content": "Probe: 3 + 4 = 7? Naïve café, 日本語, emoji 🙂 and  two spaces.\n"}]


class ServerError(ConfigError):
    """The server is unreachable, refuses the requests, or serves another model or tokenizer."""


class _HTTPStatusError(Exception):
    """A non-retryable HTTP status (4xx other than 408/429)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def _snippet(raw: bytes | str, limit: int = 300) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:  # vLLM/SGLang/OpenAI errors: {"error": {"message": ...}} or {"message": ...} or {"detail": ...}
        d = json.loads(text)
        err = d.get("error", d) if isinstance(d, dict) else d
        text = err.get("message") or err.get("detail") or text if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        pass
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def base_url(url: str) -> str:
    """http://host:8000, http://host:8000/ and http://host:8000/v1 all name the same server."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")):
        raise ServerError(f"data.server.url={url!r} must start with http:// or https:// (e.g. http://host:8000)")
    return url


def generation_config_eos(model_path: str | None) -> list[int]:
    """eos ids of a checkpoint's generation_config.json (none when there is no such file)."""
    if not model_path:
        return []
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):
        return []
    return [] if eos is None else [int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos])]


def request_seed(seed: int, index: int) -> int:
    """Seed of the index-th prompt of a batch: independent of the order in which requests complete."""
    h = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class ServerGenerator:
    """`Generator` (regen.py) that sends each prompt to an OpenAI-compatible `/v1/completions` endpoint."""

    backoff_s = 1.0        # first retry delay, doubled each retry ...
    max_backoff_s = 60.0   # ... up to this

    def __init__(self, url: str, tokenizer: Any, eos_token_ids: Sequence[int] = (), *, model: str | None = None,
                 concurrency: int = 32, timeout_s: float = 600.0, max_retries: int = 5, api_key: str | None = None,
                 backoff_s: float | None = None):
        self.url = base_url(url)
        self.tokenizer = tokenizer
        eos = {int(t) for t in eos_token_ids}
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        if not eos:
            raise ValueError("ServerGenerator needs at least one eos token id")
        self.eos_token_ids = sorted(eos)
        self.default_eos = int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else self.eos_token_ids[0]
        self.model = model
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.api_key = api_key
        if backoff_s is not None:
            self.backoff_s = backoff_s
        self.token_prompts: bool | None = None   # decided by connect()
        self.tokenizer_check: str | None = None  # how the tokenizer was checked
        self._retokenize_warned = False
        # vLLM: the generated (and prompt) ids in the reply, in two spellings across versions; the probe
        # drops the logprobs one when the server knows the first
        self._id_fields: dict[str, Any] = {"return_token_ids": True, "logprobs": 0, "return_tokens_as_token_ids": True}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, server: Any, tokenizer: Any, eos_token_ids: Sequence[int] = (),
                    model_path: str | None = None) -> "ServerGenerator":
        """From `data.server` (a ServerConfig): the api key is read from the environment variable it names.
        eos_token_ids: extra end-of-turn ids (the renderer's stop tokens); model_path: the local checkpoint
        whose generation_config.json adds its eos ids (as `eos_ids_for` does for local generation)."""
        if not server.url:
            raise ServerError("data.regen_backend=server needs the server's address, e.g. "
                              "data.server.url=http://host:8000")
        api_key = None
        if server.api_key_env:
            api_key = os.environ.get(server.api_key_env)
            if not api_key:
                raise ServerError(f"data.server.api_key_env={server.api_key_env!r}: that environment variable is "
                                  "not set (or empty); export it with the server's API key")
        return cls(server.url, tokenizer, [*eos_token_ids, *generation_config_eos(model_path)], model=server.model,
                   concurrency=server.concurrency, timeout_s=server.timeout_s, max_retries=server.max_retries,
                   api_key=api_key)

    def wire_info(self) -> dict:
        """For the data report: the server, the model it serves, how its tokenizer was checked, and how prompts
        and responses travelled (token ids, or text: tokenized again here)."""
        return {"url": self.url, "model": self.model, "tokenizer_check": self.tokenizer_check,
                "prompts_as": None if self.token_prompts is None else "token ids" if self.token_prompts else "text",
                "responses_as": "text, tokenized again" if self._retokenize_warned else "token ids"}

    # ------------------------------------------------------------------------------------------------ HTTP

    def _call(self, path: str, body: dict | None = None, *, retry: bool = True, final: tuple[int, ...] = ()) -> dict:
        """JSON in, JSON out; retries transient failures; raises ServerError or _HTTPStatusError (also for the
        statuses in `final`: a probe that must tell a refused request from a broken server)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        url = self.url + path
        attempts = self.max_retries + 1 if retry else 1
        last = ""
        for attempt in range(attempts):
            wait = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    raw = r.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    last = f"the reply is not JSON: {_snippet(raw)}"
            except urllib.error.HTTPError as e:
                message = _snippet(e.read())
                if e.code in (401, 403):
                    raise ServerError(f"{url}: HTTP {e.code} ({message}); set data.server.api_key_env to the "
                                      "environment variable holding the server's API key") from None
                if (e.code not in (408, 429) and e.code < 500) or e.code in final:
                    raise _HTTPStatusError(e.code, message) from None
                last = f"HTTP {e.code}: {message}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.strip().isdigit():
                    wait = float(retry_after)
            except (urllib.error.URLError, OSError, ConnectionError) as e:  # refused, reset, timed out, DNS
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
            except Exception as e:  # http.client.RemoteDisconnected / IncompleteRead and friends
                last = f"{type(e).__name__}: {e}"
            if attempt + 1 < attempts:
                if wait is None:
                    wait = self.backoff_s * 2 ** attempt * (0.75 + 0.5 * random.random())
                time.sleep(min(wait, self.max_backoff_s))
        raise ServerError(f"{url} failed {attempts} time(s), last: {last}; is the server up at data.server.url="
                          f"{self.url}? (data.server.max_retries={self.max_retries}, timeout_s={self.timeout_s:g})")

    # --------------------------------------------------------------------------------------------- checks

    def connect(self) -> None:
        """Check the served model and tokenizer, and decide how prompts go (once; thread-safe)."""
        with self._lock:
            if self.token_prompts is not None:
                return
            self.model = self._served_model()
            probe_text = self._probe_text()
            probe_ids = self._encode(probe_text)
            try:
                self.tokenizer_check = self._check_tokenizer(probe_text, probe_ids)
            except _HTTPStatusError as e:
                raise ServerError(f"{self.url}/v1/completions refused a 1-token probe completion: {e}") from None
            self.token_prompts = self._accepts_token_ids(probe_ids)

    def _served_model(self) -> str:
        try:
            listing = self._call("/v1/models")
        except _HTTPStatusError as e:
            raise ServerError(f"{self.url}/v1/models answered {e}; is data.server.url an OpenAI-compatible "
                              "server (vLLM, SGLang)?") from None
        ids = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if self.model is None:
            if len(ids) != 1:
                raise ServerError(f"{self.url} serves {len(ids)} models {ids}; name one in data.server.model")
            return ids[0]
        if self.model not in ids:
            raise ServerError(f"{self.url} serves {ids}, not data.server.model={self.model!r}: point data.server.url "
                              "at the server of the target model, or set data.server.model to the name it serves")
        return self.model

    def _probe_text(self) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False, add_generation_prompt=True)
        return PROBE_MESSAGES[0]["content"]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _mismatch(self, how: str, local: Sequence[int], remote: Sequence[int]) -> ServerError:
        k = next((i for i, (a, b) in enumerate(zip(local, remote)) if a != b), min(len(local), len(remote)))
        name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
        return ServerError(
            f"the server's tokenizer differs from the local one ({name}): {how} the probe conversation gives "
            f"{len(remote)} tokens there and {len(local)} here, first difference at token {k} "
            f"(server {list(remote[k:k + 4])}, local {list(local[k:k + 4])}); serve the target model, or set "
            "data.model / data.tokenizer to the checkpoint the server runs")

    def _tokenize_requests(self, text: str) -> list[tuple[str, dict]]:
        """The tokenize endpoints of the servers we know, each with its request body: vLLM and SGLang (`/tokenize`,
        `/v1/tokenize`: prompt), llama.cpp's llama-server (`/tokenize`: content), llama-cpp-python (`/extras/
        tokenize`: input). All answer {"tokens": [ids]}."""
        vllm = {"model": self.model, "prompt": text, "add_special_tokens": False}
        return [("/tokenize", vllm), ("/v1/tokenize", vllm),
                ("/tokenize", {"content": text, "add_special": False, "with_pieces": False}),
                ("/extras/tokenize", {"model": self.model, "input": text})]

    def _check_tokenizer(self, text: str, local: list[int]) -> str:
        for path, body in self._tokenize_requests(text):
            try:
                d = self._call(path, body, retry=False)
            except (_HTTPStatusError, ServerError):
                continue  # no such endpoint here
            tokens = d.get("tokens") if isinstance(d, dict) else None
            # an empty list for a non-empty probe: the endpoint did not read this body (llama-server without content)
            if isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens):
                if tokens != local:
                    raise self._mismatch(f"its {path} of", local, tokens)
                return path
        d = self._completion(text, 1, 0.0, None)
        remote = _prompt_token_ids(d)
        if remote is not None:
            if remote != local:
                raise self._mismatch("a text completion of", local, remote)
            return "prompt_token_ids"
        n = (d.get("usage") or {}).get("prompt_tokens")
        if isinstance(n, int) and n != len(local):
            raise self._mismatch("a text completion of", local, [-1] * n)
        warnings.warn(f"{self.url} has no /tokenize endpoint and returns no prompt token ids: the tokenizer was "
                      "checked only by the prompt's token count", stacklevel=3)
        return "usage.prompt_tokens"

    def _accepts_token_ids(self, ids: list[int]) -> bool:
        try:
            d = self._completion(ids, 1, 0.0, None, final=(500,))
        except _HTTPStatusError as e:
            if e.status == 500:  # llama-cpp-python answers 500 to a prompt it cannot parse: is it the token ids?
                try:
                    self._completion(self.tokenizer.decode(ids, skip_special_tokens=False), 1, 0.0, None)
                except _HTTPStatusError as e2:
                    raise ServerError(f"{self.url}/v1/completions refused a 1-token probe completion: {e2}") from None
            warnings.warn(f"{self.url} refuses token-id prompts ({_snippet(str(e), 160)}); sending the decoded "
                          "prompt text instead (add_special_tokens: false)", stacklevel=3)
            return False
        n = (d.get("usage") or {}).get("prompt_tokens")
        if isinstance(n, int) and n != len(ids):
            raise ServerError(f"{self.url} read a {len(ids)}-token prompt as {n} tokens; it does not take token-id "
                              "prompts as the OpenAI API defines them")
        if _int_list(((d.get("choices") or [{}])[0]).get("token_ids")) is not None:
            self._id_fields = {"return_token_ids": True}  # no logprobs to compute
        return True

    # ---------------------------------------------------------------------------------------- completions

    def _completion(self, prompt: str | list[int], max_tokens: int, temperature: float, seed: int | None, *,
                    final: tuple[int, ...] = ()) -> dict:
        body: dict[str, Any] = {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "n": 1, "stream": False, "stop_token_ids": self.eos_token_ids, "skip_special_tokens": False,
            "spaces_between_special_tokens": False, **self._id_fields,
        }
        if isinstance(prompt, str):
            body["add_special_tokens"] = False  # the rendered text already holds every special token
        if seed is not None:
            body["seed"] = seed
        return self._call("/v1/completions", body, final=final)

    def _one(self, prompt: str | list[int], n_tokens: int, max_new_tokens: int, temperature: float,
             seed: int | None) -> dict:
        try:
            d = self._completion(prompt, max_new_tokens, temperature, seed)
        except _HTTPStatusError as e:
            raise ServerError(f"{self.url}/v1/completions refused a {n_tokens}-token prompt with max_tokens="
                              f"{max_new_tokens}: {e} (too long for the server's context? lower data.max_new_tokens "
                              "or raise vLLM's --max-model-len)") from None
        choices = d.get("choices") if isinstance(d, dict) else None
        if not choices:
            raise ServerError(f"{self.url}/v1/completions returned no choices: {_snippet(json.dumps(d))}")
        return choices[0]

    def _response_ids(self, choice: dict, max_new_tokens: int) -> list[int]:
        ids = _choice_token_ids(choice)
        if ids is None:
            if not self._retokenize_warned:
                self._retokenize_warned = True
                warnings.warn(f"{self.url} returns no token ids (vLLM: return_token_ids / return_tokens_as_token_ids)"
                              ": responses are tokenized again from their text, which may differ from the tokens "
                              "the model wrote", stacklevel=3)
            ids = self._encode(choice.get("text") or "")
        eos = set(self.eos_token_ids)
        out = cut_at_eos(ids, eos, max_new_tokens)
        if choice.get("finish_reason") == "stop" and len(out) < max_new_tokens and (not out or out[-1] not in eos):
            reason = choice.get("stop_reason")
            out.append(reason if isinstance(reason, int) and reason in eos else self.default_eos)
        return out

    def _wire_prompt(self, prompt: Sequence[int]) -> str | list[int]:
        ids = [int(t) for t in prompt]
        return ids if self.token_prompts else self.tokenizer.decode(ids, skip_special_tokens=False)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 seed: int = 0) -> list[list[int]]:
        if not prompts:
            return []
        self.connect()
        seeds = [request_seed(seed, i) if temperature > 0 else None for i in range(len(prompts))]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts)),
                                thread_name_prefix="orthrus-server") as pool:
            futures = [pool.submit(self._one, self._wire_prompt(p), len(p), max_new_tokens, temperature, s)
                       for p, s in zip(prompts, seeds)]
            try:
                choices = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        # tokenizing (text replies) happens here, on one thread: fast tokenizers are not re-entrant
        return [self._response_ids(c, max_new_tokens) for c in choices]


def _int_list(x: Any) -> list[int] | None:
    return [int(t) for t in x] if isinstance(x, list) and all(isinstance(t, int) for t in x) else None


def _choice_token_ids(choice: dict) -> list[int] | None:
    ids = _int_list(choice.get("token_ids"))
    if ids is not None:
        return ids
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if isinstance(tokens, list) and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        return [int(t.split(":", 1)[1]) for t in tokens]
    return None


def _prompt_token_ids(d: dict) -> list[int] | None:
    choices = d.get("choices") or [{}]
    return _int_list(choices[0].get("prompt_token_ids")) or _int_list(d.get("prompt_token_ids"))
