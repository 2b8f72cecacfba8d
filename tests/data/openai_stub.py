"""A small OpenAI-compatible completions server for tests (not shipped): the tiny backbone on loopback.

It speaks the part of vLLM's API that `ServerGenerator` uses: GET /v1/models, POST /tokenize and POST
/v1/completions (prompt as text or token ids, greedy or seeded sampling with transformers `generate`,
stop_token_ids, token ids in the reply as `token_ids` and/or logprobs "token_id:N"). Knobs turn features
off or inject faults, and counters record what clients did:

    with OpenAIStub(fail_first=2) as srv:        # 127.0.0.1, ephemeral port
        gen = ServerGenerator(srv.url, tok)      # srv.url = "http://127.0.0.1:PORT"

The server thread stops after `lifetime_s` even if the test never closes it.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SLOW_S = 3.0
TINY = Path(__file__).resolve().parents[2] / "orthrus_train" / "assets" / "tiny-qwen3"


class OpenAIStub:
    def __init__(self, model_dir: str | Path = TINY, *, served_name: str = "tiny-qwen3", tokenizer: Any = None,
                 token_prompts: bool = True, token_ids_field: bool = True, logprob_ids: bool = True,
                 tokenize_endpoint: bool = True, prompt_ids_field: bool = True, fail_first: int = 0,
                 fail_status: int = 503, retry_after: str | None = None, api_key: str | None = None,
                 delay_s: float = 0.0, slow_first: int = 0, lifetime_s: float = 300.0, model: Any = None,
                 token_prompt_status: int = 400, tokenize_style: str = "vllm"):
        """fail_first: answer the first N completion requests with fail_status. slow_first: sleep SLOW_S before
        answering the first N completion requests (client timeouts). delay_s: extra time per completion.
        token_prompt_status: the status refusing a token-id prompt (token_prompts=False; llama-cpp-python's
        server answers 500). tokenize_style: the tokenize endpoint when tokenize_endpoint is on: "vllm" (POST
        /tokenize {prompt}), "llama-server" (POST /tokenize {content}; {"tokens": []} without content, as
        llama.cpp's server), "llama-cpp-python" (POST /extras/tokenize {input})."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model_dir))
        self.model = model or AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.served_name = served_name
        self.token_prompts, self.token_ids_field, self.logprob_ids = token_prompts, token_ids_field, logprob_ids
        self.tokenize_endpoint, self.prompt_ids_field = tokenize_endpoint, prompt_ids_field
        self.token_prompt_status, self.tokenize_style = token_prompt_status, tokenize_style
        self.fail_first, self.fail_status, self.retry_after = fail_first, fail_status, retry_after
        self.api_key, self.delay_s, self.slow_first = api_key, delay_s, slow_first
        self.lifetime_s = lifetime_s
        self.max_model_len = 2048
        # counters (under self.lock)
        self.lock = threading.Lock()
        self.completion_attempts = 0   # every POST /v1/completions, failed ones included
        self.completions = 0           # answered with 200
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts: list[Any] = []   # the `prompt` of every answered completion
        self.bodies: list[dict] = []
        self._model_lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._stopped = False

    # ----------------------------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the stub first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "OpenAIStub":
        stub = self

        class Handler(_Handler):
            server_stub = stub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = False  # server_close() waits for the handlers: no thread outlives stop()
        self._httpd.block_on_close = True
        self._httpd.handle_error = lambda request, address: None  # clients killed mid-request: not our problem
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        timer = threading.Timer(self.lifetime_s, self.stop)
        timer.daemon = True
        timer.start()
        return self

    def stop(self) -> None:
        with self.lock:
            if self._httpd is None or self._stopped:
                return
            self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "OpenAIStub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------- model

    def generate(self, ids: list[int], max_tokens: int, temperature: float, seed: int | None,
                 stop_ids: list[int]) -> tuple[list[int], str]:
        import torch
        from transformers import GenerationConfig

        eos = sorted({int(self.tokenizer.eos_token_id), *map(int, stop_ids)})
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        cfg = GenerationConfig(max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id,
                               num_beams=1, repetition_penalty=1.0, **sampling)
        x = torch.tensor([ids], dtype=torch.long)
        with self._model_lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=cfg)
        new = out[0, len(ids):].tolist()
        if new and new[-1] in eos:
            return new, "stop"
        return new, "length"

    def completion(self, body: dict) -> tuple[int, dict]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if not self.token_prompts:
                return self.token_prompt_status, {"error": {"message": "prompt must be a string",
                                                            "type": "BadRequestError"}}
            ids = list(prompt)
        elif isinstance(prompt, str):
            ids = list(self.tokenizer(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"])
        else:
            return 400, {"error": {"message": f"bad prompt {prompt!r}"}}
        max_tokens = int(body.get("max_tokens", 16))
        if len(ids) + max_tokens > self.max_model_len:  # vLLM's wording
            return 400, {"error": {"message": f"This model's maximum context length is {self.max_model_len} tokens. "
                                              f"However, you requested {len(ids) + max_tokens} tokens.",
                                   "type": "BadRequestError"}}
        if body.get("model") != self.served_name:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
        temperature = float(body.get("temperature", 1.0))
        new, finish = self.generate(ids, max_tokens, temperature, body.get("seed"),
                                    list(body.get("stop_token_ids") or []))
        # like vLLM: the text leaves out the stop token (special tokens are skipped unless asked otherwise)
        text_ids = new[:-1] if finish == "stop" else new
        text = self.tokenizer.decode(text_ids, skip_special_tokens=bool(body.get("skip_special_tokens", True)))
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish,
                                  "stop_reason": new[-1] if finish == "stop" and new[-1] != self.tokenizer.eos_token_id
                                  else None}
        if self.token_ids_field and body.get("return_token_ids"):
            choice["token_ids"] = new
            if self.prompt_ids_field:
                choice["prompt_token_ids"] = ids
        if body.get("logprobs") is not None:
            as_ids = self.logprob_ids and body.get("return_tokens_as_token_ids")
            choice["logprobs"] = {"tokens": [f"token_id:{t}" if as_ids else self.tokenizer.decode([t]) for t in new],
                                  "token_logprobs": [0.0] * len(new)}
        return 200, {"id": "cmpl-stub", "object": "text_completion", "model": self.served_name,
                     "choices": [choice],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new),
                               "total_tokens": len(ids) + len(new)}}


class _Handler(BaseHTTPRequestHandler):
    server_stub: OpenAIStub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _authorized(self) -> bool:
        key = self.server_stub.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._send(401, {"error": {"message": "Unauthorized"}})
            return False
        return True

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path == "/v1/models":
            s = self.server_stub
            self._send(200, {"object": "list", "data": [{"id": s.served_name, "object": "model",
                                                         "owned_by": "stub", "max_model_len": s.max_model_len}]})
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        s = self.server_stub
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if not self._authorized():
            return
        if s.tokenize_endpoint and (self.path, s.tokenize_style) in (
                ("/tokenize", "vllm"), ("/tokenize", "llama-server"), ("/extras/tokenize", "llama-cpp-python")):
            if s.tokenize_style == "vllm":
                text, special = body["prompt"], bool(body.get("add_special_tokens", True))
            elif s.tokenize_style == "llama-server":  # no content: an empty list, not an error
                text, special = body.get("content", ""), bool(body.get("add_special", False))
            else:
                text, special = body["input"], False
            ids = s.tokenizer(text, add_special_tokens=special)["input_ids"] if text else []
            self._send(200, {"tokens": list(ids), "count": len(ids), "max_model_len": s.max_model_len})
            return
        if self.path != "/v1/completions":
            self._send(404, {"detail": "Not Found"})
            return
        with s.lock:
            s.completion_attempts += 1
            attempt = s.completion_attempts
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
        headers = None
        try:
            if attempt <= s.fail_first:
                status, payload = s.fail_status, {"error": {"message": "stub: overloaded"}}
                headers = {"Retry-After": s.retry_after} if s.retry_after else None
            else:
                if attempt <= s.slow_first:
                    time.sleep(SLOW_S)
                if s.delay_s:
                    time.sleep(s.delay_s)
                status, payload = s.completion(body)
                if status == 200:
                    with s.lock:
                        s.completions += 1
                        s.prompts.append(body.get("prompt"))
                        s.bodies.append(body)
        finally:
            with s.lock:  # before the reply goes out: the client may send its next request at once
                s.in_flight -= 1
        self._send(status, payload, headers)
