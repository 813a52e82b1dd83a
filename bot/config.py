"""All configuration, read from the environment and `.env` (see `.env.example`).

One flat settings object: every variable is named exactly as in `.env.example`, so the
documentation, the error messages and the code use the same words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

ROLES = ("chat", "bajie", "agent", "vision")

IdSet = Annotated[frozenset[str], NoDecode]


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and "localhost": reachable from this machine only."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[] ")).is_loopback
    except ValueError:
        return False


class ConfigError(Exception):
    """A setting is missing or wrong; the message is one line that names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- models, one block per role -------------------------------------------------
    chat_model: str = "internlm/internlm2-chat-1_8b"
    bajie_model: str = "JimmyMa99/BaJie-Chat-mini"
    agent_model: str = "internlm/internlm2-chat-7b"
    vision_model: str = "internlm/internlm-xcomposer2-vl-1_8b"  # fits beside the others (README GPU notes)

    chat_backend: Literal["transformers", "openai"] = "transformers"
    bajie_backend: Literal["transformers", "openai"] = "transformers"
    agent_backend: Literal["transformers", "openai"] = "transformers"
    vision_backend: Literal["transformers", "openai"] = "transformers"

    # For the openai backend: the server's URL, key and the model name it serves.
    chat_base_url: str = ""
    bajie_base_url: str = ""
    agent_base_url: str = ""
    vision_base_url: str = ""
    chat_api_key: SecretStr = SecretStr("")
    bajie_api_key: SecretStr = SecretStr("")
    agent_api_key: SecretStr = SecretStr("")
    vision_api_key: SecretStr = SecretStr("")
    openai_timeout: float = Field(120.0, gt=0)
    openai_max_retries: int = Field(3, ge=0)
    # Requests in flight per server and model; beyond it the bot's fair queue. Servers batch
    # (LMDeploy --max-batch-size: 128 by default; vLLM --max-num-seqs: 256) and queue the rest.
    openai_max_concurrent: int = Field(128, ge=1)

    model_hub: Literal["huggingface", "modelscope"] = "huggingface"
    bajie_hub: Literal["", "huggingface", "modelscope"] = "modelscope"  # Bajie is published there; empty: MODEL_HUB
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # In-process text models decode this many answers together (continuous batching).
    max_concurrent_generations: int = Field(16, ge=1)  # per loaded model
    kv_cache_mb: int = Field(4096, ge=16)  # KV cache budget per in-process text model
    generation_host: Literal["process", "thread"] = "process"  # where in-process models generate
    preload_models: bool = False  # load in-process models at start (default: on first use)
    max_context_tokens: int = Field(8192, ge=256)  # prompt + answer budget

    # --- personas --------------------------------------------------------------------
    chat_system_prompt: str | None = None  # None: the official InternLM2 prompt
    bajie_system_prompt: str | None = None  # None: the Bajie demo's prompt
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.8, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1)

    # --- storage and logs ------------------------------------------------------------
    data_dir: Path = Path("./data")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    # --- metrics, health and the status page ---------------------------------------------
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(9464, ge=0, le=65535)  # empty: no metrics server
    status_token: SecretStr = SecretStr("")  # required when METRICS_HOST is not loopback

    # --- limits and access -------------------------------------------------------------
    max_input_chars: int = Field(4000, ge=1)
    rate_limit_messages: int = Field(10, ge=1)  # bucket size
    rate_limit_per_minute: float = Field(20.0, gt=0)  # refill
    agent_rate_limit_messages: int = Field(3, ge=1)
    agent_rate_limit_per_minute: float = Field(6.0, gt=0)
    group_sessions: Literal["per_user", "shared"] = "per_user"
    shutdown_grace: float = Field(20.0, ge=0)  # seconds answers in flight get to finish at shutdown

    # --- Telegram ---------------------------------------------------------------------
    telegram_bot_token: SecretStr = SecretStr("")
    telegram_api_base_url: str = ""  # self-hosted Bot API server, e.g. http://host:8081/bot
    telegram_file_base_url: str = ""
    telegram_webhook_url: str = ""
    telegram_webhook_secret: SecretStr = SecretStr("")
    telegram_webhook_listen: str = "0.0.0.0"
    telegram_webhook_port: int = 8443
    telegram_allowed_users: IdSet = frozenset()
    telegram_allowed_chats: IdSet = frozenset()

    # --- Discord ----------------------------------------------------------------------
    discord_bot_token: SecretStr = SecretStr("")
    discord_guild_ids: IdSet = frozenset()
    discord_allowed_users: IdSet = frozenset()
    discord_allowed_guilds: IdSet = frozenset()
    discord_allowed_channels: IdSet = frozenset()

    # --- agent ------------------------------------------------------------------------
    agent_allowed_users: IdSet = frozenset()  # platform:id or id; empty = everyone
    agent_max_turn: int = Field(4, ge=1)
    agent_tools: str = "python"  # comma list: python, arxiv
    sandbox_cpu_seconds: int = Field(10, ge=1)
    sandbox_wall_seconds: float = Field(20.0, gt=0)
    sandbox_memory_mb: int = Field(512, ge=32)  # per run, all its processes together
    sandbox_max_processes: int = Field(32, ge=1)
    sandbox_max_output_chars: int = Field(4000, ge=100)
    sandbox_total_memory_mb: int = Field(2048, ge=32)  # all runs at once; runs × SANDBOX_MEMORY_MB ≤ this
    sandbox_unsafe_no_bwrap: bool = False

    # --- images -----------------------------------------------------------------------
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(50_000_000, ge=10_000)

    @field_validator(
        "telegram_allowed_users",
        "telegram_allowed_chats",
        "discord_guild_ids",
        "discord_allowed_users",
        "discord_allowed_guilds",
        "discord_allowed_channels",
        "agent_allowed_users",
        mode="before",
    )
    @classmethod
    def _split_ids(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.replace(";", ",").split(",") if part.strip())
        return value

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _empty_port_is_off(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> "Settings":
        if self.metrics_port is not None and not is_loopback(self.metrics_host) and not self.status_token.get_secret_value():
            raise ValueError(
                f"METRICS_HOST={self.metrics_host} is reachable from other machines: set STATUS_TOKEN "
                "(the status page and /metrics then need it), bind METRICS_HOST=127.0.0.1, or leave METRICS_PORT empty"
            )
        return self

    @field_validator("sandbox_total_memory_mb")
    @classmethod
    def _check_sandbox_total(cls, value: int, info) -> int:
        per_run = info.data.get("sandbox_memory_mb")
        if per_run is not None and value < per_run:
            raise ValueError(f"must be at least SANDBOX_MEMORY_MB ({per_run}): one run must fit")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return value

    # --- derived helpers ----------------------------------------------------------------
    def model_for(self, role: str) -> str:
        return getattr(self, f"{role}_model")

    def backend_for(self, role: str) -> str:
        return getattr(self, f"{role}_backend")

    def hub_for(self, role: str) -> str:
        return (self.bajie_hub or self.model_hub) if role == "bajie" else self.model_hub

    @property
    def db_path(self) -> Path:
        return self.data_dir / "bot.sqlite3"

    @property
    def enabled_tools(self) -> tuple[str, ...]:
        return tuple(t.strip().lower() for t in self.agent_tools.split(",") if t.strip())


def load_settings(**overrides: object) -> Settings:
    """Build the settings; any problem becomes one ConfigError line naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a check across settings: its message names them
            raise ConfigError(str(first["msg"]).removeprefix("Value error, ")) from None
        raise ConfigError(f"Invalid setting {str(first['loc'][0]).upper()}: {first['msg']}") from None
