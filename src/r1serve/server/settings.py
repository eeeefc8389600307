"""`ServerSettings`: every option of `r1serve serve` in one validated, frozen model.

The command-line flags are generated from this model (`r1serve.server.cli`), tests and embedders build it
directly, and `create_app` reads it: one definition, so the flags, the defaults, `--help` and the validation
never drift apart. Engine options carry vLLM's names and map one-to-one onto `EngineConfig`; the usage-rule
switches (DESIGN.md rules 1-8) are each on by default and map onto `PolicyConfig`. Invalid combinations are
refused here, before anything is loaded, with a message that names the flag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from r1serve.config import DEFAULT_MODEL, KV_CACHE_DTYPES, QUANTIZATION_METHODS, EngineConfig
from r1serve.sampling_params import R1_TEMPERATURE, R1_TOP_P
from r1serve.server.policy import PolicyConfig

# What `--quantization` accepts ("none": as the checkpoint's config.json says; docs/quantization.md).
QUANTIZATION_CHOICES = ("none", *QUANTIZATION_METHODS)


class ServerSettings(BaseModel):
    """Options of `r1serve serve` (flag `--foo-bar` is field `foo_bar`; booleans also have `--no-foo-bar`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- model and engine (names follow vLLM) ---
    model: str = Field(DEFAULT_MODEL, description="model folder or Hugging Face id")
    served_model_name: list[str] = Field(
        default_factory=list, description="extra name the model answers to (repeatable)")
    tokenizer: str | None = Field(None, description="tokenizer folder (default: the model's)")
    revision: str | None = Field(None, description="model revision on the Hugging Face hub")
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        "auto", description="'dummy' builds random weights (no checkpoint needed)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="weight dtype")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
    seed: int = Field(0, description="seed of dummy weights and of requests without their own seed")
    max_model_len: int = Field(4096, gt=0, description="context window: prompt + output tokens")
    max_num_seqs: int = Field(256, gt=0, description="sequences decoded together (also the most `n` allowed)")
    max_num_batched_tokens: int = Field(8192, gt=0, description="token budget of one engine step")
    block_size: int = Field(16, gt=0, description="tokens per KV-cache block")
    gpu_memory_utilization: float = Field(
        0.90, gt=0.0, le=1.0, description="fraction of GPU memory r1serve may use (weights + KV cache)")
    kv_cache_space: float = Field(4.0, gt=0.0, description="GiB of KV cache when running on CPU")
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of shared prompt prefixes")
    enforce_eager: bool = Field(False, description="no CUDA graphs")
    engine_process: bool = Field(
        True, description="run the engine in a child process, off the HTTP server's GIL (--no-: on a thread)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model (only 1 is supported yet)")
    quantization: Literal[QUANTIZATION_CHOICES] = Field(  # type: ignore[valid-type]
        "none", description="weight quantization (none: as config.json's quantization_config says)")
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = Field(  # type: ignore[valid-type]
        "auto", description="KV-cache dtype: auto = the model's; fp8 (= fp8_e4m3) holds twice the tokens")
    num_cpu_threads: int | None = Field(
        None, gt=0, description="threads of a CPU engine (default: every core; the HTTP process keeps one)")

    # --- data parallel: replicas behind vllm-router (docs/deployment.md) ---
    data_parallel_size: int = Field(
        1, ge=1, description="engines (one per GPU, or a share of the CPU cores each) behind vllm-router on --port")
    data_parallel_base_port: int | None = Field(
        None, ge=1, le=65535, description="port of the first replica on 127.0.0.1 (default: --port + 1)")
    router_policy: Literal["cache_aware", "round_robin"] = Field(
        "cache_aware", description="how the router picks a replica: cache_aware sends a prompt to the replica "
                                   "holding its prefix")
    data_parallel_max_restarts: int = Field(
        3, ge=0, description="restarts of a replica that died, after which the whole server exits with code 1")

    # --- HTTP ---
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: all interfaces)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    api_key: str | None = Field(None, description="require `Authorization: Bearer KEY` on /v1 routes")
    max_pending_requests: int = Field(
        4096, gt=0, description="requests in progress (streamed or not) beyond which new ones get 503 (overloaded)")
    max_request_body_mb: float = Field(16.0, gt=0.0, description="largest request body in MiB (larger: 413)")
    timeout_keep_alive: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    timeout_request_header: float = Field(
        10.0, gt=0.0, description="seconds a connection has to send its request line and headers")
    shutdown_grace_period: float = Field(
        30.0, ge=0.0, description="seconds in-flight requests may run after SIGTERM before they are aborted")
    log_file: Path | None = Field(None, description="also write the log to this file")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    access_log: bool = Field(True, description="log one line per HTTP request")

    # --- vLLM's flags that recipes for this model use (docs/serving.md has the table) ---
    trust_remote_code: bool = Field(
        False, description="accepted for vLLM compatibility: the Qwen2 architecture runs no remote code")
    reasoning_parser: str | None = Field(
        None, description="accepted as `deepseek_r1`: the reasoning split is built in (usage rule 5)")
    enable_reasoning: bool = Field(False, description="accepted: reasoning is always returned apart (rule 5)")
    enable_chunked_prefill: bool = Field(True, description="accepted: chunked prefill is always on")
    disable_log_requests: bool = Field(False, description="no log line per request")
    uvicorn_log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] | None = Field(
        None, description="log level of uvicorn's own loggers (default: --log-level)")
    allowed_origins: list[str] = Field(
        default_factory=list, description="CORS: origins allowed to call the API (repeatable, or a JSON list)")
    allowed_methods: list[str] = Field(default_factory=lambda: ["*"], description="CORS: allowed methods")
    allowed_headers: list[str] = Field(default_factory=lambda: ["*"], description="CORS: allowed headers")
    allow_credentials: bool = Field(False, description="CORS: allow credentials")
    ssl_keyfile: Path | None = Field(None, description="TLS: private key file (with --ssl-certfile: HTTPS)")
    ssl_certfile: Path | None = Field(None, description="TLS: certificate file")
    root_path: str | None = Field(None, description="path prefix the server runs under behind a proxy")
    chat_template: str | None = Field(
        None, description="a chat template file (jinja) or template text replacing the tokenizer's")
    generation_config: str = Field(
        "auto", description="'auto': the R1 sampling defaults (the model's generation_config.json); 'vllm': "
                            "OpenAI's 1.0 / 1.0; a folder: the temperature and top_p of its generation_config.json")
    download_dir: str | None = Field(None, description="where hub downloads go (default: the Hugging Face cache)")
    max_logprobs: int = Field(20, ge=0, description="accepted: logprobs are not supported yet (a request asking "
                                                    "for them gets 400)")

    # --- the R1 usage rules (DESIGN.md), each on by default ---
    fold_system_prompt: bool = Field(
        True, description="rule 1: fold system messages into the first user turn")
    r1_sampling_defaults: bool = Field(
        True, description="rule 2: temperature 0.6 / top_p 0.95 if omitted; flag temperature outside 0.5-0.7")
    enforce_temperature: bool = Field(False, description="rule 2: clamp temperature into 0.5-0.7")
    force_thinking: bool = Field(True, description="rule 3: the prompt ends with `<think>\\n`")
    strip_history_reasoning: bool = Field(
        True, description="rule 4: earlier assistant turns keep only their text after </think>")
    reasoning_split: bool = Field(True, description="rule 5: reasoning_content apart from content")
    reasoning_field_alias: bool = Field(
        True, description="rule 5: send the reasoning also as `reasoning` (vLLM's name) beside reasoning_content")
    thinking_budget: bool = Field(True, description="rule 7: honour max_thinking_tokens")
    max_thinking_tokens: int | None = Field(
        None, ge=0, description="rule 7: default thinking budget of requests that set none")
    repetition_guard: bool = Field(
        True, description="rule 8: stop looping streams (finish_reason 'repetition')")

    @field_validator("served_model_name", "allowed_origins", "allowed_methods", "allowed_headers", mode="before")
    @classmethod
    def _json_list(cls, values: object) -> object:
        """vLLM takes `--allowed-origins '["https://a"]'`: one value that is a JSON list is that list."""
        if isinstance(values, list) and len(values) == 1 and str(values[0]).lstrip().startswith("["):
            try:
                return json.loads(values[0])
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list of strings: {values[0]!r}") from exc
        return values

    @field_validator("reasoning_parser")
    @classmethod
    def _deepseek_parser(cls, parser: str | None) -> str | None:
        if parser is not None and parser.replace("-", "_") != "deepseek_r1":
            raise ValueError(f"reasoning parser {parser!r} is not built in: r1serve splits DeepSeek-R1's "
                             "<think> output itself (deepseek_r1)")
        return parser

    @field_validator("generation_config")
    @classmethod
    def _generation_config(cls, value: str) -> str:
        if value not in ("auto", "vllm") and not (Path(value) / "generation_config.json").is_file():
            raise ValueError(f"{value!r} is neither 'auto', 'vllm' nor a folder holding generation_config.json")
        return value

    @field_validator("served_model_name")
    @classmethod
    def _names_not_empty(cls, names: list[str]) -> list[str]:
        if any(not name.strip() for name in names):
            raise ValueError("served model names must be non-empty")
        return names

    @field_validator("api_key")
    @classmethod
    def _api_key_not_empty(cls, key: str | None) -> str | None:
        if key is not None and not key.strip():
            raise ValueError("--api-key is empty, which would turn authentication off: pass a key, or leave the "
                             "flag out to serve without one")
        return key

    @model_validator(mode="after")
    def _replica_ports_fit(self) -> ServerSettings:
        if self.data_parallel_size > 1:
            first = self.data_parallel_base_port or self.port + 1
            last = first + self.data_parallel_size  # the replicas, then the router's metrics port
            if last > 65535:
                raise ValueError(f"--data-parallel-size {self.data_parallel_size} replicas from port {first} run "
                                 "past 65535: lower --port or --data-parallel-base-port")
            if first <= self.port <= last:
                raise ValueError(f"--port {self.port} is among the replica ports {first}-{last}: choose a "
                                 "--data-parallel-base-port outside it")
        return self

    @model_validator(mode="after")
    def _engine_accepts(self) -> ServerSettings:
        self.engine_config()  # EngineConfig names what it refuses (tensor parallel, quantization, ...)
        return self

    def engine_config(self) -> EngineConfig:
        """The `EngineConfig` these settings describe."""
        return EngineConfig(
            model=self.model, tokenizer=self.tokenizer, revision=self.revision, load_format=self.load_format,
            dtype=self.dtype, device=self.device, seed=self.seed, max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            block_size=self.block_size, gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_space=self.kv_cache_space, enable_prefix_caching=self.enable_prefix_caching,
            enforce_eager=self.enforce_eager, tensor_parallel_size=self.tensor_parallel_size,
            quantization=None if self.quantization == "none" else self.quantization,
            download_dir=self.download_dir,
            kv_cache_dtype=self.kv_cache_dtype, num_cpu_threads=self.num_cpu_threads,
        )

    def policy_config(self) -> PolicyConfig:
        """The usage-rule switches these settings describe."""
        switches: dict[str, Any] = dict(
            fold_system_prompt=self.fold_system_prompt, r1_sampling_defaults=self.r1_sampling_defaults,
            enforce_temperature=self.enforce_temperature, force_thinking=self.force_thinking,
            strip_history_reasoning=self.strip_history_reasoning, reasoning_split=self.reasoning_split,
            reasoning_field_alias=self.reasoning_field_alias,
            thinking_budget=self.thinking_budget, default_max_thinking_tokens=self.max_thinking_tokens,
            repetition_guard=self.repetition_guard,
        )
        return PolicyConfig(**{**switches, **self._sampling_defaults()})

    def _sampling_defaults(self) -> dict[str, Any]:
        """Rule 2's defaults as `--generation-config` says: R1's, OpenAI's (rule 2 off), or a folder's."""
        if self.generation_config == "auto":
            return {}
        if self.generation_config == "vllm":
            return {"r1_sampling_defaults": False}
        config = json.loads((Path(self.generation_config) / "generation_config.json").read_text())
        return {"default_temperature": float(config.get("temperature", R1_TEMPERATURE)),
                "default_top_p": float(config.get("top_p", R1_TOP_P))}

    def model_names(self) -> list[str]:
        """Every name the model answers to: `served_model_name`s first, then the path and its basename."""
        names = [*self.served_model_name, self.model, Path(self.model.rstrip("/")).name]
        return list(dict.fromkeys(name for name in names if name))
