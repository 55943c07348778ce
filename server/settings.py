"""Settings of `atv serve`: one pydantic-settings class read from `ATV_*` environment variables and flags.

A flag beats its environment variable, which beats the default. Every field is a flag named after it
(`max_running` -> `--max-running`) and a variable (`ATV_MAX_RUNNING`). `ATV_CACHE_DIR` (where the embedded
target is converted once) is read by atv_core.models, not here. This module loads nothing.
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from atv_core.engine.request import generation_default_problem
from atv_core.models import DTYPES, EMBEDDED_TARGET

DtypeName = Literal[("auto", *DTYPES)]   # the names atv_core.models.select_dtype takes


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATV_", extra="forbid")

    model: str = Field(EMBEDDED_TARGET, description="target model: a local path, an HF id or an embedded: name")
    generator: str = Field("default", description="generator checkpoint folder; 'default' = "
                           "atv_core/default_generator when present, 'none' = serve without steering")
    vectors: str | None = Field(None, description="folder of named vectors (`atv vectors build`); each is served "
                                "as model id <model>:vector/<name>; reload with POST /v1/vectors/reload")
    vllm_metrics: bool = Field(False, description="also export vLLM-named series (vllm:...) with a model_name "
                               "label, for vLLM dashboards, alerts and autoscalers")
    served_model_name: str | None = Field(None, description="model id in the API (default: --model)")
    chat_template: str | None = Field(None, description="a Jinja chat template, or a file holding one, replacing "
                                      "the model's (e.g. for a base model that has none)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: DtypeName = Field("auto", description="auto (CUDA: bf16, else fp16; CPU: bf16 where the processor has "
                                           "AVX512-BF16 or AMX, else fp32; logged at start), float32, bfloat16, float16")
    device_map: str | None = Field(None, description="e.g. auto: spread a large target over the visible GPUs")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535)
    max_running: int = Field(32, ge=1, description="requests decoded together (KV rows, vector slots)")
    max_waiting: int = Field(256, ge=1, description="queued requests; beyond this, HTTP 429")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="tokens computed in one engine step "
                                               "(running decodes + prompt chunks); default 512 on CPU, 2048 on CUDA")
    long_prompt_tokens: int = Field(256, ge=1, description="prompts with more tokens left than this are long: "
                                    "chunked while other requests decode")
    long_prefill_chunk: int | None = Field(None, ge=1, description="prompt tokens of long prompts (all together) "
                                           "per step beside decodes; default 8 on CPU, 256 on CUDA")
    block_size: int = Field(16, ge=1, description="tokens per KV cache block")
    generator_worker: bool | None = Field(None, description="make vectors on a thread of their own, beside the "
                                          "engine's steps (--no-generator-worker: in the step that admits the "
                                          "request); default: on for accelerators, off on CPU")
    generator_threads: int = Field(1, ge=1, description="torch threads of that generator thread (when the engine "
                                   "has nothing to step it makes the vectors itself with all its threads)")
    cpu_decode_kernel: bool = Field(True, description="fp32 or bf16 on CPU: attend decodes with the C++ paged kernel, "
                                    "compiled on first start (g++; ~25 s, then cached); off or unbuildable: torch")
    kv_cache_gib: float | None = Field(None, gt=0, description="KV cache memory budget in GiB; default on CPU "
                                       "min(2, a quarter of the available RAM), on CUDA --kv-cache-fraction")
    kv_cache_fraction: float = Field(0.8, gt=0, le=1, description="CUDA: share of the free GPU memory at start "
                                     "given to the KV cache when --kv-cache-gib is not set")
    generation_config: Literal["auto", "vllm"] = Field(
        "auto", description="auto: sampling fields a request leaves out (temperature, top_p, top_k, min_p, "
        "repetition_penalty; a chat's max_tokens: max_new_tokens) default to the model's generation_config.json, "
        "as vLLM's default; vllm: to the neutral values")
    override_generation_config: dict[str, int | float] | None = Field(
        None, description='JSON over the generation_config, as vLLM\'s flag, e.g. \'{"temperature": 0.5, '
        '"max_new_tokens": 256}\': merged over the model\'s with --generation-config auto, alone with vllm; '
        'max_new_tokens is also the most tokens any request gets (larger max_tokens are cut to it)')
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of a prompt prefix already computed "
                                        "for another request where steering leaves them equal (steering off, the "
                                        "same vector, or tokens before the last prompt token under policy last)")
    max_model_len: int | None = Field(None, ge=2, description="context length (default: the model's, capped at 8192)")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest accepted prompt; longer is HTTP 413")
    max_tokens: int = Field(2048, ge=1, description="most completion tokens one request may ask for")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body; larger is HTTP 413, "
                                "refused before it is read")
    request_timeout: float = Field(600.0, gt=0, description="seconds before a request is aborted (HTTP 504)")
    drain_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")
    api_key: SecretStr | None = Field(None, description="when set, /v1/*, /tokenize and /detokenize need "
                                                        "'Authorization: Bearer KEY'")
    log_prompts: bool = Field(False, description="put prompt text in the per-request log line")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", value):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("override_generation_config", mode="before")
    @classmethod
    def _generation_json(cls, value):
        if isinstance(value, str):   # a flag's text (the environment variable is parsed as JSON by pydantic-settings)
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"is not JSON ({exc.msg}); e.g. '{{\"temperature\": 0.5}}'") from None
        if isinstance(value, dict):
            problems = [p for name, v in value.items() if (p := generation_default_problem(name, v)) is not None]
            if problems:
                raise ValueError("; ".join(problems))
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, value):
        # an empty key would require an empty bearer token; serving without a key must be asked for by leaving it unset
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty: unset it to serve without a key, or give it a value")
        return value

    @model_validator(mode="after")
    def _device_map_needs_accelerator(self):
        if self.device_map and self.device == "cpu":
            raise ValueError("device_map spreads a target over accelerators; with device cpu leave it out")
        return self

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model


def parse_settings(argv: list[str] | None) -> Settings:
    """Flags from argv over ATV_* variables over defaults. Bad values exit with status 2 (argparse style)."""
    parser = argparse.ArgumentParser(prog="atv serve", description="Serve a target LLM with per-request "
                                     "ATV steering over an OpenAI-compatible HTTP API.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        text = f"{field.description or name} (env ATV_{name.upper()}, default {field.default!r})"
        if field.annotation in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=text, metavar=name.upper())
    given = vars(parser.parse_args(argv))
    try:
        return Settings(**given)
    except ValidationError as exc:
        # one line (not argparse's usage block): what is wrong, and where the value came from
        parser.exit(2, "atv serve: error: " + "; ".join(_describe(e, given) for e in exc.errors()) +
                    " (atv serve --help lists the settings)\n")


def pydantic_message(error: dict) -> str:
    """The message of one pydantic error, without the "Value error, " prefix pydantic gives our own checks'."""
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def _describe(error: dict, given: dict) -> str:
    """One pydantic error as `--flag: what is wrong (got value)`, or `ATV_FLAG: ...` when the value came from the
    environment."""
    if not error["loc"]:
        return pydantic_message(error)
    name = str(error["loc"][0])
    source = f"--{name.replace('_', '-')}" if name in given else f"ATV_{name.upper()}"
    got = "" if name == "api_key" else f" (got {error.get('input')!r})"
    return f"{source}: {pydantic_message(error)}{got}"
