"""Node settings: YAML file + environment, validated once at the entry point.

Precedence (highest first): explicit arguments, environment variables
``CXR_NODE__<GROUP>__<KEY>``, the YAML file (``--config`` or ``CXR_NODE_CONFIG``), built-in defaults.
Only entry points (CLI, web app factory) call :func:`load_settings`; everything else receives
values as arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_ENV = "CXR_NODE_CONFIG"
# The model card's intended use: adults. Younger patients are not classified (dicom_node.eligibility).
ADULT_AGE_YEARS = 18.0
ENV_PREFIX = "CXR_NODE__"


AE_TITLE_RULE = "AE title must be 1-16 printable ASCII characters without backslash"


def checked_ae_title(value: str) -> str:
    """An AE title as PS3.5 (VR AE) allows it, its leading and trailing spaces (not significant) removed.

    One rule for the node's own title, the settings' callers and destinations and the ones an admin enters
    (dicom_node.aes): a control character or a non-ASCII letter passed the settings and stopped ``serve``
    (or a C-ECHO) with pynetdicom's traceback (review)."""
    title = value.strip(" ")
    if not 1 <= len(title) <= 16 or "\\" in title or not (title.isascii() and title.isprintable()):
        raise ValueError(AE_TITLE_RULE)
    return title


def _ae_title_or_none(value: str | None) -> str | None:
    """An optional AE title: empty is none (a caller's ``reply_to: ""``)."""
    return checked_ae_title(value) if value and value.strip(" ") else None


AeTitle = Annotated[str, AfterValidator(checked_ae_title)]


class _Group(BaseModel):
    """A group of settings: an unknown key is an error, never ignored. A typo such as ``retention_day``
    or ``secure_cookie`` would otherwise leave the default in force without a sign."""

    model_config = ConfigDict(extra="forbid")


class TlsSettings(_Group):
    """DICOM TLS. ``enabled`` puts the listener on TLS; outbound associations to a destination marked
    ``tls`` use the certificate, key and CA bundle here whether or not it is."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> TlsSettings:
        if self.enabled and not (self.certificate and self.private_key):
            raise ValueError("dicom.tls.enabled needs certificate and private_key")
        # The node's identity for TLS destinations too: one without the other was ignored without a word,
        # and a destination asking for the node's certificate refused every delivery (review).
        if bool(self.certificate) != bool(self.private_key):
            raise ValueError("dicom.tls needs both certificate and private_key, or neither")
        return self


class CallerEntry(_Group):
    """A calling AE allowed to associate; seeded into the database at start-up."""

    ae_title: AeTitle
    host: str | None = None
    # destination AE title to send results back to
    reply_to: Annotated[str | None, AfterValidator(_ae_title_or_none)] = None


class DestinationEntry(_Group):
    """A C-STORE destination for results; seeded into the database at start-up."""

    ae_title: AeTitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    # after delivering, ask it to commit to keeping the results (Storage Commitment Push Model)
    storage_commitment: bool = False


class DicomSettings(_Group):
    ae_title: AeTitle = "CXRNODE"
    port: int = Field(default=11112, ge=0, le=65535)
    bind_address: str = "0.0.0.0"
    max_pdu: int = Field(default=131072, ge=0)
    max_associations: int = Field(default=16, ge=1)  # per listener process
    # The largest data set one C-STORE may carry (bytes): a larger one is refused with 0xA700 once it is in,
    # its bytes past the limit not kept (dicom_node.reactor.BoundedDataSet). A chest radiograph is 5-40 MB
    # uncompressed; 256 MiB is also the most a deflated data set may inflate to (dicom_node.part10). Storing
    # an object below it holds about twice its size in memory meanwhile.
    max_object_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    # Processes accepting associations on the node's port; 0: one per CPU, at most 4.
    listener_processes: int = Field(default=0, ge=0, le=32)
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    tls: TlsSettings = TlsSettings()
    callers: list[CallerEntry] = []
    destinations: list[DestinationEntry] = []

    def listener_count(self) -> int:
        """How many processes listen: the setting, or one per CPU (at most 4) when it is 0."""
        if self.listener_processes:
            return self.listener_processes
        return max(1, min(len(os.sched_getaffinity(0)), 4))


class DatabaseSettings(_Group):
    # None: an SQLite file in node.data_dir
    url: SecretStr | None = None
    echo: bool = False
    # How often the running node checks that it is still the one node on its database and, after a
    # database restart, takes its lock again (seconds)
    lock_check_seconds: float = Field(default=10.0, ge=0.1, le=3600.0)


class StorageSettings(_Group):
    # None: <node.data_dir>/instances
    directory: Path | None = None
    fsync: bool = True
    direct_io: bool = True
    min_free_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    # None: keep received pixel files forever
    retention_days: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)


class PipelineSettings(_Group):
    settle_seconds: float = Field(default=10.0, ge=0.0)
    # None: the model shipped with the package
    model_path: Path | None = None
    indeterminate_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    # Skip images the model's novelty check finds unlike its training images, or the wrong way up (as
    # turned head up by their Patient Orientation), or a negative (classifier.novelty)
    skip_unfamiliar: bool = True
    # Skip patients younger than this by Patient Age or Birth Date (the model was trained on adults); 0: none
    minimum_patient_age_years: float = Field(default=ADULT_AGE_YEARS, ge=0.0, le=150.0)
    # A header without Patient Age or Birth Date: skip it (True), or classify it with a caution (False)
    skip_unknown_age: bool = False
    batch_size: int = Field(default=16, ge=1)
    heatmap: bool = True
    secondary_capture: bool = False
    send_skipped: bool = False
    fixed_destinations: list[AeTitle] = []


class OutboxSettings(_Group):
    # 5 s doubling to every 15 minutes, 300 attempts: about 3 days of retries, through a weekend's PACS
    # maintenance, before a delivery is DEAD and waits for `cxr-node resend` (8 attempts gave up after
    # 11 minutes)
    max_attempts: int = Field(default=300, ge=1)
    # A peer that refuses the object itself (SOP Class not supported, Data Set does not match, cannot
    # understand) answers every retry the same: DEAD after this many such answers in a row, not 3 days on
    refused_attempts: int = Field(default=3, ge=1)
    # Destinations set to storage commitment: how long the node waits for the PACS's report on a request
    # before asking again, and how many requests it makes before the objects are "not confirmed"
    commitment_timeout_seconds: float = Field(default=3600.0, gt=0.0)
    commitment_requests: int = Field(default=3, ge=1)
    # ... and how long it keeps the request's association open for a report on it (PS3.4 J.3.3 lets the PACS
    # report there or on an association of its own; it ends once the report came either way); 0: not at all.
    # The destination's outbox waits meanwhile, so at most 30 s (and the peer's idle limit may be shorter).
    commitment_report_wait_seconds: float = Field(default=2.0, ge=0.0, le=30.0)
    backoff_initial_seconds: float = Field(default=5.0, gt=0.0)
    backoff_max_seconds: float = Field(default=900.0, gt=0.0)


class MetricsSettings(_Group):
    """``/healthz`` and Prometheus ``/metrics`` on their own small HTTP listener."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9111, ge=0, le=65535)


def _long_enough_key(key: SecretStr | None) -> SecretStr | None:
    """A console key an attacker cannot guess from a cookie (the length is said, never the key)."""
    if key is not None and len(key.get_secret_value()) < 32:
        raise ValueError("must be at least 32 characters (openssl rand -hex 32 makes one)")
    return key


class WebSettings(_Group):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    session_minutes: int = Field(default=480, ge=1)
    session_max_hours: float = Field(default=12, gt=0)
    # None: a random key made once and kept in node.data_dir/web-secret-key (0600). At least 32 characters:
    # it signs the device cookies that exempt a browser from another's login lockout, and a short one
    # ("changeme") is found from one such cookie offline, after which every lockout can be passed (review)
    secret_key: Annotated[SecretStr | None, AfterValidator(_long_enough_key)] = None
    secure_cookies: bool = False
    # Addresses of reverse proxies whose X-Forwarded-For the console believes (the audit trail then records
    # the browser's address, not the proxy's); empty: the direct peer's address, whatever a request claims
    trusted_proxies: list[IPvAnyAddress] = Field(default_factory=list)
    # Uploaded images the console reads, previews, classifies or reports on at once, and stored images and
    # heat maps it draws for the study pages (web.imagegate): each
    # holds its pixels several times over meanwhile, in the process that runs the DICOM listener
    image_workers: int = Field(default=2, ge=1, le=16)
    # How long a request waits for its turn before it is answered 503, "busy, try again" (seconds)
    image_wait_seconds: float = Field(default=30.0, gt=0.0, le=300.0)


class LoggingSettings(_Group):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False


def _institution_name(value: str) -> str:
    """Every result carries it as Institution Name (LO): a longer name or a backslash made highdicom
    refuse each SR, so every study failed long after the node had started."""
    value = value.strip()
    if len(value) > 64 or "\\" in value or any(ord(char) < 32 for char in value):
        raise ValueError("institution_name must be at most 64 characters, without backslash or control "
                         "characters (DICOM Institution Name, LO)")
    return value


class NodeSettings(_Group):
    name: str = "CXR AI node"
    institution_name: Annotated[str, AfterValidator(_institution_name)] = ""
    data_dir: Path = Path("var")


class Settings(BaseSettings):
    """All settings of one node, grouped as in config/default.yaml."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
    )

    yaml_path: ClassVar[Path | None] = None

    node: NodeSettings = NodeSettings()
    dicom: DicomSettings = DicomSettings()
    database: DatabaseSettings = DatabaseSettings()
    storage: StorageSettings = StorageSettings()
    pipeline: PipelineSettings = PipelineSettings()
    outbox: OutboxSettings = OutboxSettings()
    web: WebSettings = WebSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = getattr(settings_cls, "yaml_path", None)
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    # Derived locations -------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        if self.database.url is not None:
            return self.database.url.get_secret_value()
        return f"sqlite:///{(self.node.data_dir / 'cxr-node.sqlite3').resolve()}"

    @property
    def storage_dir(self) -> Path:
        return (self.storage.directory or self.node.data_dir / "instances").resolve()

    @property
    def results_dir(self) -> Path:
        return (self.node.data_dir / "results").resolve()


def _said(exc: ValidationError, path: Path | None) -> str:
    """pydantic's errors in one line: each setting by its dotted name, what is wrong with it and where it
    came from (the variable in the environment, else the file). pydantic's own text took four lines an
    error, named a class ("FileSettings") for a variable from the environment, and quoted the value, which
    may be a password (review)."""
    said = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"])
        variable = ENV_PREFIX + "__".join(str(part).upper() for part in error["loc"])
        where = f"from {variable}" if variable in {key.upper() for key in os.environ} else (
            f"in {path}" if path is not None else "")
        what = "unknown setting" if error["type"] == "extra_forbidden" else error["msg"]
        said.append(f"{name}: {what}" + (f" ({where})" if where else ""))
    return "; ".join(said)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Read settings from ``config_file`` (or ``$CXR_NODE_CONFIG``) and the environment."""
    from dicom_node.errors import ConfigurationError

    raw = config_file if config_file is not None else os.environ.get(CONFIG_ENV)
    path = Path(raw).resolve() if raw else None
    if path is not None and not path.is_file():
        raise ConfigurationError(f"configuration file not found: {path}")
    unknown = sorted(
        name for name in os.environ
        if name.upper().startswith(ENV_PREFIX)
        and name[len(ENV_PREFIX):].split("__")[0].lower() not in Settings.model_fields
    )
    if unknown:
        raise ConfigurationError(f"unknown settings group in the environment: {', '.join(unknown)}")
    # CXR_NODE_DATABASE__URL (one underscore): the setting was silently not read, and a production node
    # ran on an SQLite file nobody looked at (review)
    misspelt = sorted(
        name for name in os.environ
        if name.upper().startswith(ENV_PREFIX[:-1]) and not name.upper().startswith(ENV_PREFIX)
        and name.upper() != CONFIG_ENV
    )
    if misspelt:
        raise ConfigurationError(
            f"unknown variable in the environment: {', '.join(misspelt)} (settings are "
            f"{ENV_PREFIX}<GROUP>__<KEY>, with two underscores after CXR_NODE; the file is {CONFIG_ENV})"
        )
    bound = type("FileSettings", (Settings,), {"yaml_path": path, "__module__": __name__})
    try:
        settings: Settings = bound(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(f"invalid settings: {_said(exc, path)}") from exc
    except ValueError as exc:  # the file's bytes are not text
        raise ConfigurationError(f"invalid settings: {exc}") from exc
    except yaml.YAMLError as exc:  # a typo in the file: the message gives its line and column, in one line
        raise ConfigurationError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    except OSError as exc:
        raise ConfigurationError(f"{path} cannot be read: {exc.strerror or type(exc).__name__}") from exc
    return settings
