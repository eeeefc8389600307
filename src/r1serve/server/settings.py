"""`ServerSettings`: every option of `r1serve serve` in one validated, frozen model.

The command-line flags are generated from this model (`r1serve.server.cli`), tests and embedders build it
directly, and `create_app` reads it: one definition, so the flags, the defaults, `--help` and the validation
never drift apart. The engine options are `EngineConfig`'s fields (vLLM's names) and the usage-rule switches
(DESIGN.md rules 1-8, each on by default) `PolicyConfig`'s: their types, defaults, bounds and help are declared
once there (`dataclasses` field metadata) and become fields of `EngineOptions` / `RuleOptions` here. Invalid
combinations are refused here, before anything is loaded, with a message that names the flag.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, create_model, field_validator, model_validator

from r1serve.config import EngineConfig, QuantizationFlag
from r1serve.sampling_params import R1_TEMPERATURE, R1_TOP_P
from r1serve.server.policy import PolicyConfig

# What `--quantization` accepts ("none": as the checkpoint's config.json says; docs/quantization.md).
QUANTIZATION_CHOICES: tuple[str, ...] = QuantizationFlag.__args__  # type: ignore[attr-defined]
# A flag cannot pass None: `--quantization none` (the default) says "as the checkpoint's config.json says".
_FLAG_DEFAULTS: dict[str, tuple[Any, Any]] = {"quantization": (QuantizationFlag, "none")}
FROZEN = ConfigDict(frozen=True, extra="forbid")


def _options(config: type) -> dict[str, tuple[Any, Any]]:
    """Pydantic field definitions of a dataclass's server options (fields whose metadata has help), by flag
    name: the dataclass's type, default, bounds and help."""
    hints = typing.get_type_hints(config)
    options: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(config):
        if not f.metadata.get("server"):
            continue
        annotation, default = _FLAG_DEFAULTS.get(f.name, (hints[f.name], f.default))
        options[f.metadata.get("flag") or f.name] = (
            annotation, Field(default, description=f.metadata["help"], **f.metadata["bounds"]))
    return options


def _field_names(config: type) -> dict[str, str]:
    """flag name -> the dataclass field it sets, for the server options of `config`."""
    return {f.metadata.get("flag") or f.name: f.name for f in dataclasses.fields(config) if f.metadata.get("server")}


EngineOptions = create_model("EngineOptions", __config__=FROZEN, **_options(EngineConfig))  # type: ignore[call-overload]
RuleOptions = create_model("RuleOptions", __base__=EngineOptions, **_options(PolicyConfig))  # type: ignore[call-overload]


class ServerSettings(RuleOptions):  # type: ignore[misc,valid-type]
    """Options of `r1serve serve` (flag `--foo-bar` is field `foo_bar`; booleans also have `--no-foo-bar`): the
    engine's and the usage rules' (from `EngineConfig` and `PolicyConfig`), then the server's own."""

    model_config = FROZEN

    served_model_name: list[str] = Field(
        default_factory=list, description="extra name the model answers to (repeatable)")
    engine_process: bool = Field(
        True, description="run the engine in a child process, off the HTTP server's GIL (--no-: on a thread)")

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
    max_logprobs: int = Field(20, ge=0, description="the most top logprobs a request may ask for (chat "
                                                    "top_logprobs, completions logprobs); more is a 400")

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
        values = {name: getattr(self, flag) for flag, name in _field_names(EngineConfig).items()}
        return EngineConfig(**{**values, "quantization": None if self.quantization == "none" else self.quantization})

    def policy_config(self) -> PolicyConfig:
        """The usage-rule switches these settings describe."""
        switches = {name: getattr(self, flag) for flag, name in _field_names(PolicyConfig).items()}
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
