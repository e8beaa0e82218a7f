"""One pydantic-settings object, built once at start-up and passed down.

Environment variables `STRONGROOM_*` (nested groups with `__`, e.g.
`STRONGROOM_IDEMPOTENCY__LOCK_TIMEOUT_S`), or `strongroom.toml` in the data dir. Nothing else
reads `os.environ`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class DatabaseSettings(BaseModel):
    # Connections per process, all kept open (see store.db): SQLAlchemy's pool, and on PostgreSQL
    # the asyncpg pool of the hot statements (store.pg: group commit, the idempotency claim, the
    # payment's lookups). 4 workers use at most 80 of PostgreSQL's default 100.
    pool_size: int = Field(default=10, ge=1)
    raw_pool_size: int = Field(default=10, ge=1)
    # How long a request waits for a pooled connection: before it began, it is then shed with a
    # 503; after, it answers 500 outcome_unknown. Long, because admission control
    # (http.max_inflight) sheds excess at the door: an admitted request should finish, slowly if
    # need be.
    pool_timeout_s: float = Field(default=30.0, gt=0)
    # Most payments whose final writes share one transaction (store.group); 1 turns grouping off.
    group_commit_max: int = Field(default=64, ge=1)
    # Group transactions in flight at once per lane and process. One is fastest: while it writes,
    # the next batch gathers, and larger batches cost less per payment.
    group_commit_writers: int = Field(default=1, ge=1)
    # Event-loop turns a group-commit writer lets pass before it takes its next batch, so that
    # requests about to commit join it; the same for lookups by key (store.reads: those arriving
    # within these turns are one statement). Costs no timed wait: at low load a turn is
    # microseconds; under load each turn runs other requests' work. 4 is where larger values
    # stopped paying (docs/performance.md). 0 turns both off.
    group_commit_gather_turns: int = Field(default=4, ge=0)
    # With gathering on: group commit's and group reads' statements go one at a time per worker,
    # the fullest lane first, so a worker's requests move through their statements together
    # (store.flush). A lane whose first unit has waited this long goes next whatever its size,
    # and a statement is waited for this long before the next may start beside it. 0: a writer
    # per lane.
    flush_max_wait_s: float = Field(default=0.002, ge=0)


class IdempotencySettings(BaseModel):
    # Stripe keeps keys for at least 24 hours (IETF Idempotency-Key draft §2: expiry documented).
    ttl_s: int = Field(default=24 * 3600, ge=24 * 3600)
    # A lock older than this belongs to a request that died; the next retry recovers it
    # (Brandur Leach, "Implementing Stripe-like idempotency keys": 90 s).
    lock_timeout_s: float = Field(default=90.0, gt=0)
    # When true, every POST must carry an Idempotency-Key (draft §2.7: 400 if missing).
    require_key: bool = False
    key_max_length: int = 255
    purge_batch: int = Field(default=1000, ge=1)
    purge_interval_s: float = Field(default=3600.0, gt=0)


class PaymentsSettings(BaseModel):
    # Intents left in `processing` longer than this are resolved by the recovery sweep.
    recovery_after_s: float = Field(default=300.0, ge=0)
    recovery_interval_s: float = Field(default=30.0, gt=0)
    recovery_batch: int = Field(default=100, ge=1)
    processor_retry_max: int = Field(default=2, ge=0, le=10)
    processor_timeout_s: float = Field(default=10.0, gt=0)
    # Where the sandbox processor's card-bearing endpoint is: in-process by default; the api's own
    # /sandbox mount (e.g. http://127.0.0.1:8080/sandbox) when the vault runs as its own process.
    sandbox_url: str = "http://sandbox.internal"
    # Failure injection for crash-recovery tests: "exit_after_processor_call" ends the process
    # between the processor's answer and the commit that records it. Honoured only in
    # development mode.
    failpoint: Literal["", "exit_after_processor_call"] = ""
    failpoint_allowed: bool = False  # set from `Settings.development` at start-up


class AuthSettings(BaseModel):
    # Keyed hash for API secret keys. Required outside the embedded development mode.
    key_hash_secret: SecretStr | None = None
    # Authenticated keys are remembered this long per API process (saves a round trip per
    # request); a revoked key may keep working this long. 0 disables.
    key_cache_ttl_s: float = Field(default=10.0, ge=0, le=60)


class VaultSettings(BaseModel):
    # The development keystore's root key file (0600; default DATA_DIR/keys/dev-kek.key): keys the
    # card fingerprints and opens cards stored before envelope encryption. Its KEK versions are
    # files beside it.
    key_file: Path | None = None
    # Production (`development` false) refuses the development keystore unless this is set.
    allow_development_keystore: bool = False
    # NIST SP 800-38D with 96-bit random nonces: at most 2^32 encryptions per key (SECURITY.md C1);
    # a DEK is retired far below that. Processes reserve encryptions in blocks of this size.
    dek_max_encryptions: int = Field(default=2**24, ge=1, le=2**32)
    dek_reserve_block: int = Field(default=4096, ge=1, le=2**20)
    # NIST SP 800-57 crypto-periods per key type (SECURITY.md C2): a KEK is rotated, a DEK retired,
    # once its period ends. Fractions of a day are allowed (tests).
    kek_crypto_period_days: float = Field(default=365.0, gt=0, le=2 * 365)
    dek_crypto_period_days: float = Field(default=90.0, gt=0, le=2 * 365)
    # Unwrapped DEKs (and a process's reserved block) live in memory at most this long.
    dek_cache_ttl_s: float = Field(default=300.0, gt=0, le=3600)
    dek_cache_max: int = Field(default=1024, ge=1)
    # Per-merchant fingerprint keys (computed in the HSM) are cached this long.
    fingerprint_key_ttl_s: float = Field(default=3600.0, gt=0, le=24 * 3600)
    fingerprint_key_cache_max: int = Field(default=100_000, ge=1)
    # Scheduled rotation: how often the background loop checks whether the active KEK is due.
    rotation_enabled: bool = True
    rotation_interval_s: float = Field(default=3600.0, gt=0)
    rotation_batch: int = Field(default=500, ge=1, le=10_000)
    # A retired key is destroyed only once nothing references it AND it has been retired this
    # long: longer than any process may still hold a reserved block of it (dek_cache_ttl_s).
    retired_key_grace_s: float = Field(default=900.0, ge=0)
    # Processor origins the relay may send card data to (https:// only, exact host and port),
    # e.g. ["https://api.stripe.com"]. The in-process sandbox is always allowed.
    relay_allowlist: list[str] = []
    # Plain-HTTP processors the relay may use, for local testing only (e.g. the api's own
    # /sandbox endpoint when the vault runs as its own process). Empty in production.
    relay_local_test_origins: list[str] = []
    # Segmentation (issue 4 item 9). On the api: the vault service's URL; unset = in-process.
    url: str | None = None
    # Shared by the api and the vault service to sign and verify internal calls (>= 32 bytes).
    service_secret: SecretStr | None = None
    # On the vault service: its own database (own credentials); unset = the main database.
    database_url: str | None = None
    # On the api: the CA that signed the vault service's TLS certificate (a private CA); unset =
    # the system's trust store. With the signed service token, both ends are authenticated.
    tls_ca_file: Path | None = None
    # CVCs live in memory only, until the first authorization, and at most this long.
    cvc_ttl_s: float = Field(default=600.0, gt=0, le=600)
    cvc_cache_max: int = Field(default=100_000, ge=1)


class HttpSettings(BaseModel):
    max_body_bytes: int = 256 * 1024
    page_limit_max: int = 100
    # Admission control: API requests in flight per worker process beyond which new ones are
    # shed at once with 503 + Retry-After, instead of queueing until they time out. Not much
    # lower: a closed-loop client that ignores Retry-After would keep a worker busy shedding.
    max_inflight: int = Field(default=128, ge=1)
    # PCI DSS 4.2.1: `strongroom serve` with a certificate and key listens with TLS only. The floor
    # is TLS 1.3; "1.2" admits TLS 1.2 clients, then with ECDHE + AEAD suites only.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_min_version: Literal["1.3", "1.2"] = "1.3"
    # TLS ends at a proxy in front of this server: outside development, `serve` and `vault serve`
    # listen in plain HTTP only when this (or --behind-tls-proxy) says so.
    behind_tls_proxy: bool = False
    # Bearer token for /metrics, compared in constant time. Outside development /metrics is not
    # served without one; in development it is open unless one is set.
    metrics_token: SecretStr | None = None
    # The API reference page at /docs (script-free, sandboxed). None: on in development only.
    docs_enabled: bool | None = None


class CardFormSettings(BaseModel):
    # Payment methods one hosted card-form session may create (issue 17: a leaked client secret
    # must not be a card-testing tool). A refused card does not use one up.
    session_max_uses: int = Field(default=1, ge=1, le=10)


class RateLimitSettings(BaseModel):
    """PCI DSS 6.4.1/6.4.2 (SECURITY.md P10): the public, keyless endpoints (the card form's
    submission, the 3-D Secure completion) are limited per client IP and per session. Counters
    live in Redis when `redis_url` is set (shared by every process), else in this process."""

    key_prefix: str = "strongroom:rl:"
    # The in-process backend forgets the oldest counters beyond this many.
    memory_max_keys: int = Field(default=100_000, ge=1)
    card_form_per_ip: int = Field(default=30, ge=1)
    card_form_per_ip_window_s: int = Field(default=60, ge=1)
    # Attempts (accepted or refused cards) per card-form session over its lifetime.
    card_form_per_session: int = Field(default=10, ge=1)
    threeds_per_ip: int = Field(default=30, ge=1)
    threeds_per_ip_window_s: int = Field(default=60, ge=1)
    threeds_per_intent: int = Field(default=10, ge=1)
    threeds_per_intent_window_s: int = Field(default=900, ge=1)


class RetentionSettings(BaseModel):
    """PCI DSS 3.2.1: card data is kept only as long as it is needed. Unused `tok_` tokens are
    purged after `token_ttl_s`; vault cards nothing references (an unused token's, a payment
    method whose creation failed after the card was stored) after `orphan_card_grace_s`, which
    is longer than any request storing a card and referencing it can take."""

    token_ttl_s: int = Field(default=3600, ge=60)
    orphan_card_grace_s: int = Field(default=7200, ge=600)
    purge_interval_s: float = Field(default=600.0, gt=0)
    purge_batch: int = Field(default=500, ge=1, le=10_000)


class WorkerSettings(BaseModel):
    """`strongroom worker`: jobs leased from the jobs table (worker.service)."""

    poll_interval_s: float = Field(1.0, gt=0)  # how often an idle worker looks for due jobs
    batch_max: int = Field(10, ge=1, le=1000)  # jobs leased per look
    # A leased job not finished by then is taken by another worker; a run is cut off at this.
    lease_s: float = Field(60.0, gt=0)
    retry_base_s: float = Field(1.0, gt=0)  # a failed run waits base * 2^(attempts-1), jittered
    retry_max_s: float = Field(3600.0, gt=0)
    max_attempts: int = Field(20, ge=1)  # a one-off job failing this often stops as `failed`
    # Each api process also runs a worker. None: in development only (the embedded default needs
    # no second process); production runs `strongroom worker` instead.
    in_process: bool | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STRONGROOM_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path(".strongroom")
    database_url: str | None = None
    redis_url: str | None = None
    hsm_module: Path | None = None
    hsm_token_label: str | None = None
    hsm_pin: SecretStr | None = None
    # The embedded development mode: SQLite, local key files, sandbox processor, secrets
    # generated on first run. Production sets this false and must configure every secret.
    development: bool = True
    log_level: str = "info"
    # The address clients reach this server at (used in redirect URLs such as 3-D Secure).
    public_url: str = "http://127.0.0.1:8080"

    database: DatabaseSettings = DatabaseSettings()
    idempotency: IdempotencySettings = IdempotencySettings()
    payments: PaymentsSettings = PaymentsSettings()
    auth: AuthSettings = AuthSettings()
    vault: VaultSettings = VaultSettings()
    http: HttpSettings = HttpSettings()
    card_form: CardFormSettings = CardFormSettings()
    ratelimit: RateLimitSettings = RateLimitSettings()
    retention: RetentionSettings = RetentionSettings()
    worker: WorkerSettings = WorkerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        data_dir = _data_dir_hint(init_settings, env_settings)
        toml = TomlConfigSettingsSource(settings_cls, toml_file=data_dir / "strongroom.toml")
        return (init_settings, env_settings, toml)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'strongroom.db').resolve()}"


def _data_dir_hint(init_settings: PydanticBaseSettingsSource, env_settings: PydanticBaseSettingsSource) -> Path:
    init: dict[str, Any] = init_settings()
    if init.get("data_dir"):
        return Path(init["data_dir"])
    env: dict[str, Any] = env_settings()
    return Path(env.get("data_dir") or ".strongroom")


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
