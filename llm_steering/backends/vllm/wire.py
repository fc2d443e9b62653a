"""The one record a request's steering travels in to vLLM's workers (no torch: the HTTP middleware,
the engine client and the worker all read it).

    >>> record = SteeringRecord((WireComponent(15, "clamp", 8.5, name="pirate", feature="pirate"),),
    ...                         vectors_file="/srv/steering_vectors.pt", vectors_digest=file_digest(path))
    >>> params.extra_args = {EXTRA_KEY: record.sign()}          # what the engine and the middleware send
    >>> prompt["cache_salt"] = record.cache_salt()              # the one place the prefix-cache salt comes from
    >>> SteeringRecord.verify(params.extra_args[EXTRA_KEY])     # the admission check (SteeringValidator)

A component names its direction either as a vector of the vectors file the server loaded
(`feature`, resolved by the worker in that file, checked by its digest) or carries it as raw
little-endian float32 (`vector`, base64 on the wire; a direction made in the caller's process).
The record is signed with a key that never leaves the process that made it: vLLM checks the
signature at admission (`SteeringValidator.validate_params`, in the same process as the signer),
so a record a client writes into `vllm_xargs` itself is refused with a 400 by whichever route it
came. `check` is the structural validation; the worker runs it again (with the model's layer
count and width) before it touches the model.
"""

from __future__ import annotations

import array
import base64
import hashlib
import hmac
import json
import math
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

EXTRA_KEY = "llm_steering"  # the key of a request's steering in SamplingParams.extra_args (vllm_xargs)
# A request's `auto` where no chat is answered with it (another route; one that reaches the engine unread):
# vLLM would drop the unknown field with a log line, and the client would quietly get its fixed strength
AUTO_REFUSED = ("auto (the way of steering chosen for each prompt) answers chats: send it in a JSON body to "
                "/v1/chat/completions (docs/serving.md)")
OPS = ("add", "clamp", "cap", "ablate", "add_keepnorm", "clamp_keepnorm")  # components.OPS, without torch
MAX_COMPONENTS = 64
MAX_WIDTH = 65_536
MAX_RELEASE_IDS = 4096
_KEY = secrets.token_bytes(32)  # this process's signing key: records are admitted only where they were made


class RecordError(ValueError):
    """A steering record that is malformed, unsigned or does not fit the model (one line)."""


@dataclass(frozen=True)
class WireComponent:
    """One component of a `steering.SteeringComponent`'s meaning, without its tensor."""

    layer: int
    op: str
    strength: float = 0.0
    cap_min: float | None = None
    cap_max: float | None = None
    scale: float = 0.0
    name: str = ""
    feature: str | None = None  # a vector of the record's vectors file, by name
    vector: str | None = None  # else the float32 unit vector itself: base64 of its little-endian bytes
    release: bool = False  # let go (unsteered) from the record's let_go_at, or its first generated release_ids token

    @staticmethod
    def encode_vector(values: Any) -> str:
        """base64 of float32 little-endian `values` (a list of floats or anything `array` takes)."""
        arr = array.array("f", values)
        if arr.itemsize != 4:  # pragma: no cover (every platform vLLM runs on)
            raise RecordError("float32 is not 4 bytes here")
        return base64.b64encode(_little_endian(arr).tobytes()).decode("ascii")

    def vector_values(self) -> array.array:
        """The carried vector as float32 values (ValueError when there is none or it is malformed)."""
        if self.vector is None:
            raise RecordError(f"component {self.name!r} carries no vector")
        try:
            raw = base64.b64decode(self.vector, validate=True)
        except ValueError:
            raise RecordError(f"component {self.name!r}: the vector is not base64") from None
        if len(raw) % 4:
            raise RecordError(f"component {self.name!r}: the vector is not float32 ({len(raw)} bytes)")
        arr = array.array("f")
        arr.frombytes(raw)
        return _little_endian(arr)


@dataclass(frozen=True)
class SteeringRecord:
    """A request's steering as it crosses into vLLM: components, whether the prompt is steered, trace key."""

    components: tuple[WireComponent, ...]
    steer_prompt: bool = True
    trace: str | None = None  # a key under which the worker records projections (the library's traces)
    vectors_file: str | None = None  # where `feature` names resolve (the server's --vectors)
    vectors_digest: str | None = None  # file_digest of it: a worker that loaded another file refuses
    # auto on the server (serving/auto.py): where steering starts and where its releasing components let go
    steer_from: int | None = None  # the first steered position (overrides steer_prompt): a continued answer's
    let_go_at: int | None = None   # releasing components are unsteered from this position on
    release_ids: tuple[int, ...] = ()  # ... or from the first generated token that is one of these
    score: str | None = None  # a key under which the worker records the mean log-probabilities the model gives
    score_from: int = 0       # every vocabulary token at the prompt positions [score_from, prompt length - 1)

    # -- the wire -----------------------------------------------------------------

    def payload(self) -> str:
        """The record as canonical JSON text (sorted keys): what is signed and what the salt hashes."""
        data = asdict(self)
        data["components"] = [{k: v for k, v in c.items() if v is not None and not (k == "release" and v is False)}
                              for c in data["components"]]
        data["release_ids"] = list(self.release_ids)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def sign(self) -> str:
        """The value of extra_args[EXTRA_KEY]: "<mac>.<payload>" (checked first, so it is never sent unchecked)."""
        self.check()
        text = self.payload()
        return f"{_mac(text)}.{text}"

    def cache_salt(self) -> str:
        """The prefix-cache salt: requests share cached prompt KV only under the same steering; traced ones never."""
        if self.trace or self.score:
            return self.trace or self.score
        return hashlib.sha256(self.payload().encode()).hexdigest()

    @classmethod
    def verify(cls, value: Any) -> SteeringRecord:
        """The record in a signed value, if this process signed it; RecordError otherwise (admission)."""
        mac, text = _split(value)
        if not hmac.compare_digest(mac, _mac(text)):
            raise RecordError(f"{EXTRA_KEY} is reserved for the server's own steering: send the steering as 'steering'")
        return cls.parse(text)

    @classmethod
    def read(cls, value: Any) -> SteeringRecord:
        """The record in a signed value, without the signature check (the worker: another process)."""
        return cls.parse(_split(value)[1])

    @classmethod
    def parse(cls, text: str) -> SteeringRecord:
        """The record in payload text, every field checked (`check`); RecordError for anything else."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise RecordError("the steering record is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("components"), list):
            raise RecordError("the steering record must be an object with a list of components")
        fields = {"components", "steer_prompt", "trace", "vectors_file", "vectors_digest", "steer_from", "let_go_at",
                  "release_ids", "score", "score_from"}
        if set(data) - fields:
            raise RecordError(f"the steering record has unknown fields {sorted(set(data) - fields)}")
        comp_fields = set(WireComponent.__dataclass_fields__)
        comps = []
        for item in data["components"][: MAX_COMPONENTS + 1]:
            if not isinstance(item, dict) or not set(item) <= comp_fields or not {"layer", "op"} <= set(item):
                raise RecordError("a steering component must be an object with layer, op and known fields only")
            comps.append(WireComponent(**item))
        ids = data.get("release_ids", [])
        if not isinstance(ids, list) or len(ids) > MAX_RELEASE_IDS:
            raise RecordError(f"release_ids must be a list of at most {MAX_RELEASE_IDS} token ids")
        record = cls(tuple(comps), data.get("steer_prompt", True), data.get("trace"), data.get("vectors_file"),
                     data.get("vectors_digest"), data.get("steer_from"), data.get("let_go_at"), tuple(ids),
                     data.get("score"), data.get("score_from", 0))
        record.check()
        return record

    # -- validation -----------------------------------------------------------------

    def check(self, num_layers: int | None = None, hidden_size: int | None = None) -> None:
        """Every field well typed and finite, ops known, vectors finite and non-zero; with the model's
        `num_layers` and `hidden_size`, every layer in range and every carried vector of that width."""
        if not isinstance(self.steer_prompt, bool):
            raise RecordError("steer_prompt must be true or false")
        for name in ("trace", "vectors_file", "vectors_digest"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise RecordError(f"{name} must be text")
        for name in ("steer_from", "let_go_at", "score_from"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise RecordError(f"{name} must be a non-negative integer")
        if self.score is not None and (not self.score or len(self.score) > 200):
            raise RecordError("score must be a key of 1 to 200 characters")
        if len(self.release_ids) > MAX_RELEASE_IDS or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.release_ids):
            raise RecordError(f"release_ids must be at most {MAX_RELEASE_IDS} non-negative token ids")
        if self.trace and any(c.release for c in self.components):
            raise RecordError("a traced record cannot let go of a component")
        if len(self.components) > MAX_COMPONENTS:
            raise RecordError(f"at most {MAX_COMPONENTS} steering components, got {len(self.components)}")
        for comp in self.components:
            _check_component(comp, num_layers, hidden_size)
            if comp.feature is not None and (self.vectors_file is None or self.vectors_digest is None):
                raise RecordError(f"component {comp.name!r} names a feature but the record names no vectors file")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: the vectors file a record's feature names mean."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _check_component(c: WireComponent, num_layers: int | None, hidden_size: int | None) -> None:
    label = f"steering component {c.name!r}"
    if not isinstance(c.name, str) or len(c.name) > 200:
        raise RecordError("a steering component's name must be text of at most 200 characters")
    if isinstance(c.layer, bool) or not isinstance(c.layer, int) or c.layer < 0:
        raise RecordError(f"{label}: layer must be a non-negative integer, got {c.layer!r}")
    if num_layers is not None and c.layer >= num_layers:
        raise RecordError(f"{label}: layer {c.layer} is out of range: this model has {num_layers} layers "
                          f"(0-{num_layers - 1})")
    if c.op not in OPS:
        raise RecordError(f"{label}: unknown op {str(c.op)[:40]!r}; use one of {', '.join(OPS)}")
    for key in ("strength", "scale"):
        if not _finite(getattr(c, key)):
            raise RecordError(f"{label}: {key} must be a finite number")
    for key in ("cap_min", "cap_max"):
        if getattr(c, key) is not None and not _finite(getattr(c, key)):
            raise RecordError(f"{label}: {key} must be a finite number or absent")
    if c.op == "cap" and c.cap_min is None and c.cap_max is None:
        raise RecordError(f"{label}: op 'cap' needs cap_min, cap_max or both")
    if c.cap_min is not None and c.cap_max is not None and c.cap_min > c.cap_max:
        raise RecordError(f"{label}: cap_min is above cap_max")
    if not isinstance(c.release, bool):
        raise RecordError(f"{label}: release must be true or false")
    if (c.feature is None) == (c.vector is None):
        raise RecordError(f"{label}: give either a feature name or a vector")
    if c.feature is not None and (not isinstance(c.feature, str) or len(c.feature) > 200):
        raise RecordError(f"{label}: the feature must be a name of at most 200 characters")
    if c.vector is not None:
        if not isinstance(c.vector, str) or len(c.vector) > 4 * MAX_WIDTH * 4 // 3 + 4:
            raise RecordError(f"{label}: the vector must be base64 text of at most {MAX_WIDTH} float32 values")
        values = c.vector_values()
        if hidden_size is not None and len(values) != hidden_size:
            raise RecordError(f"{label}: the vector has {len(values)} values, but this model's hidden size is {hidden_size}")
        if not len(values) or not all(map(math.isfinite, values)) or not any(values):
            raise RecordError(f"{label}: the vector must be non-empty, finite and non-zero")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _little_endian(arr: array.array) -> array.array:
    import sys

    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr


def _mac(text: str) -> str:
    return hmac.new(_KEY, text.encode(), hashlib.sha256).hexdigest()


def _split(value: Any) -> tuple[str, str]:
    if not isinstance(value, str) or "." not in value[:80]:
        raise RecordError(f"{EXTRA_KEY} is reserved for the server's own steering: send the steering as 'steering'")
    mac, _, text = value.partition(".")
    return mac, text
