"""demo.yaml (model profiles, features, presets) and steering specs (what users save and share).

`demo.yaml` is loaded once into frozen dataclasses: DemoConfig > ModelProfile > FeatureConfig,
Preset, GenerationDefaults. A SteeringSpec is the steering a user exports, imports or sends
to the API: the model id, the features switched on (key, fraction of the layer's norm, op)
and whether the prompt is steered too. YAML here is parsed with a size limit and without
aliases, so no file or request can make parsing (or an error message) expensive.

    >>> profile = load_config("demo.yaml").profile()          # the default profile
    >>> spec = SteeringSpec(EMBEDDED_MODEL_ID, (ActiveFeature("pirate", 0.2, "clamp"),))
    >>> save_steering_spec(spec, "pirate.json"); load_steering_spec("pirate.json") == spec
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_steering.core import (
    SPEC_VERSION,
    atomic_write,
    check_header,
    check_name,
    is_finite_number,
    one_line,
    parse_layer_index,
    short_repr,
)
from llm_steering.recipe import CONCEPT_LIMITS, CONCEPT_TEMPLATES, ConceptRecipe  # noqa: F401  (part of the spec)

SPEC_FORMAT = "llm-steering/spec"
FEATURE_OPS = ("add", "clamp")  # the ops a feature is switched on with by name (demo.yaml, --steer, /steer)
SPEC_OPS = (*FEATURE_OPS, "add_keepnorm", "clamp_keepnorm")  # a spec may also keep the norm (the app's per-feature box)
# the SAE formats of llm_steering/saes/registry.py: one module each in saes/formats/, named after the format
# (read from the file names: this torch-free module may not import the saes package)
SAE_FORMATS = tuple(sorted(p.stem for p in (Path(__file__).parent / "saes" / "formats").glob("[!_]*.py")))
MAX_YAML_BYTES = 1_000_000  # demo.yaml and concept files are tens of kB
MAX_SPEC_BYTES = 64_000  # a steering spec is a few hundred bytes


# ---------------------------------------------------------------------------
# Safe YAML
# ---------------------------------------------------------------------------


def parse_yaml_text(text: str, what: str, max_bytes: int = MAX_YAML_BYTES, aliases: bool = False) -> Any:
    """Parse YAML (or JSON) text: bounded size, and (unless `aliases`) no anchors or aliases;
    a one-line ValueError otherwise.

    Text from visitors never gets aliases (`&a [x, x]`, `*a`): nested ones make a few
    hundred bytes into a structure whose every printout is gigabytes. They are refused
    before anything is built. The project's own files (demo.yaml, concepts.yaml) may use them.
    """
    import yaml

    if not isinstance(text, str):
        raise ValueError(f"{what} must be text, got {type(text).__name__}")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ValueError(f"{what} is {size:,} bytes; the limit is {max_bytes:,}: a steering file is a few lines")
    json_error = None
    if text.lstrip().startswith(("{", "[")):  # JSON first: its errors are the ones to report for JSON
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            json_error = f"{what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg[:60]})"
        except RecursionError:
            raise ValueError(f"{what} is nested too deeply") from None
    try:
        for event in () if aliases else yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ValueError(f"{what} uses YAML anchors or aliases (&, *): write the values out instead")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = (getattr(exc, "problem", None) or str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ValueError(json_error or f"{what} is not valid YAML{at}: {problem[:80]}") from None


def read_yaml_file(path: str | os.PathLike, what: str, missing_hint: str = "", max_bytes: int = MAX_YAML_BYTES,
                   aliases: bool = True) -> Any:
    """Parse a YAML (or JSON) file with `parse_yaml_text`; missing, unreadable or malformed: one line.

        >>> data = read_yaml_file("demo.yaml", "config file", ": give the path of demo.yaml")
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} not found{missing_hint}")
    try:
        if path.stat().st_size > max_bytes:
            raise ValueError(f"{path} is {path.stat().st_size:,} bytes; a {what} is at most {max_bytes:,}")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {what} {path}: {one_line(exc, 100)}") from None
    return parse_yaml_text(text, f"{what} {path.name}", max_bytes, aliases)


# ---------------------------------------------------------------------------
# demo.yaml
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationDefaults:
    """Generation settings a profile starts with (the reference's evaluation settings)."""

    temperature: float = 0.5
    repetition_penalty: float = 1.1
    max_new_tokens: int = 256
    system_prompt: str = "You are a helpful assistant."
    max_input_tokens: int = 2048
    auto: bool = False  # a switched-on feature's steering is chosen for each answer (calibrate.auto_answer)


@dataclass(frozen=True)
class FeatureConfig:
    """A named feature of a profile; `strength` is absolute (reduced_strengths already applied)."""

    name: str
    description: str
    layer: int
    index: int | None
    strength: float
    op: str
    label: str = ""  # the name people read ("Eiffel Tower"); "" = made from `name` (human_name)


@dataclass(frozen=True)
class ActiveFeature:
    """A feature switched on: `key` (a name or "layer:index"), strength as a fraction of the
    layer's typical norm, and `op` ("add" or "clamp"; None: the feature's own op)."""

    key: str
    fraction: float
    op: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key.strip() or len(self.key) > 100:
            raise ValueError(f"a feature key must be a name or 'layer:index', got {short_repr(self.key)}")
        if not is_finite_number(self.fraction):
            raise ValueError(
                f"feature {self.key!r}: fraction must be a finite number (0.5 = half the norm), got {short_repr(self.fraction)}"
            )
        object.__setattr__(self, "fraction", float(self.fraction))
        if self.op is not None and self.op not in SPEC_OPS:
            raise ValueError(f"feature {self.key!r}: op must be one of {', '.join(SPEC_OPS)}, got {short_repr(self.op)}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "fraction": self.fraction}
        if self.op is not None:
            out["op"] = self.op
        return out

    @classmethod
    def from_dict(cls, item: Any, where: str) -> ActiveFeature:
        """From {key, fraction, op}; files written before the rename say `mode` for `op`."""
        if not isinstance(item, dict) or set(item) - {"key", "fraction", "op", "mode"} or not {"key", "fraction"} <= set(item):
            raise ValueError(f"{where}: feature {short_repr(item)} must be a mapping with key, fraction and optionally op")
        op = item.get("op", item.get("mode"))
        return cls(key=item["key"], fraction=item["fraction"], op=op)


@dataclass(frozen=True)
class Preset:
    """A button in the app: a named set of active features."""

    name: str
    description: str
    features: tuple[ActiveFeature, ...]
    steer_prompt: bool = True


@dataclass(frozen=True)
class ModelProfile:
    """One model of demo.yaml: where its vectors are, its features, presets and generation defaults.

    `config_dir` (demo.yaml's folder) resolves `vectors_file`.
    """

    name: str
    model_id: str | None
    vectors_file: str
    sae_source: str | None
    sae_format: str | None
    reduced_strengths: bool
    features: tuple[FeatureConfig, ...]
    presets: tuple[Preset, ...]
    generation: GenerationDefaults
    config_dir: Path = Path(".")

    def feature(self, name: str) -> FeatureConfig:
        for feat in self.features:
            if feat.name == name:
                return feat
        names = ", ".join(f.name for f in self.features) or "none"
        raise ValueError(f"profile {self.name!r} has no feature {short_repr(name)}; available: {names}")

    def vectors_path(self) -> Path:
        return (Path(self.config_dir) / self.vectors_file).resolve()


@dataclass(frozen=True)
class DemoConfig:
    """demo.yaml: the model profiles and which one is the default."""

    path: Path
    default_profile: str
    profiles: dict[str, ModelProfile]

    def profile(self, name: str | None = None) -> ModelProfile:
        """A profile by name (None: the default), with the STEERING_MODEL / STEERING_SAE_SOURCE /
        STEERING_VECTORS environment overrides applied: a way to point a profile at local
        directories without editing demo.yaml."""
        from dataclasses import replace

        key = self.default_profile if name is None else name
        if key not in self.profiles:
            raise ValueError(f"no profile {short_repr(key)} in {self.path}; available: {', '.join(self.profiles)}")
        prof = self.profiles[key]
        overrides = {
            field: os.environ[env]
            for field, env in (("model_id", "STEERING_MODEL"), ("sae_source", "STEERING_SAE_SOURCE"),
                               ("vectors_file", "STEERING_VECTORS"))
            if os.environ.get(env)
        }
        return replace(prof, **overrides) if overrides else prof


_PROFILE_KEYS = {"model_id", "vectors_file", "sae_source", "sae_format", "reduced_strengths", "features", "presets", "generation"}
_FEATURE_KEYS = {"name", "label", "description", "feature", "op", "mode"}
_PRESET_KEYS = {"name", "description", "features", "steer_prompt"}


def load_config(path: str | os.PathLike = "demo.yaml") -> DemoConfig:
    """Read demo.yaml into a DemoConfig; a one-line ValueError says what is wrong and where.

        >>> cfg = load_config("demo.yaml")
        >>> prof = cfg.profile()                 # the default profile
        >>> prof.feature("eiffel_tower").layer, prof.generation.temperature
    """
    path = Path(path)
    data = read_yaml_file(path, "config file", ": give the path of demo.yaml")
    try:
        return _parse_config(path, data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _parse_config(path: Path, data: Any) -> DemoConfig:
    _expect_keys(data, {"default_profile", "profiles"}, "the top level", required={"profiles"})
    profiles_raw = data["profiles"]
    if not isinstance(profiles_raw, dict) or not profiles_raw:
        raise ValueError("'profiles' must map profile names to profiles")
    profiles = {str(name): _parse_profile(str(name), raw, path.resolve().parent) for name, raw in profiles_raw.items()}
    default = data.get("default_profile", next(iter(profiles)))
    if default not in profiles:
        raise ValueError(f"default_profile {short_repr(default)} is not one of the profiles: {', '.join(profiles)}")
    return DemoConfig(path=path.resolve(), default_profile=str(default), profiles=profiles)


def _expect_keys(raw: Any, allowed: set[str], where: str, required: set[str] = frozenset()) -> None:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown field {short_repr(unknown[0])} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(raw))
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r}")


def _parse_profile(name: str, raw: Any, config_dir: Path) -> ModelProfile:
    where = f"profile {name!r}"
    _expect_keys(raw, _PROFILE_KEYS, where, required={"vectors_file", "features"})
    model_id = raw.get("model_id")
    if model_id is not None and (not isinstance(model_id, str) or not model_id):
        raise ValueError(f"{where}: model_id must be a hub id, a local path, or null for the embedded model")
    if not isinstance(raw["vectors_file"], str) or not raw["vectors_file"]:
        raise ValueError(f"{where}: vectors_file must be a file name (relative to demo.yaml's folder)")
    for key in ("sae_source", "sae_format"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ValueError(f"{where}: {key} must be a string or null")
    if raw.get("sae_format") is not None and raw["sae_format"] not in SAE_FORMATS:
        raise ValueError(f"{where}: sae_format {short_repr(raw['sae_format'])} is unknown; use one of {', '.join(SAE_FORMATS)} or null")
    reduced = raw.get("reduced_strengths", False)
    if not isinstance(reduced, bool):
        raise ValueError(f"{where}: reduced_strengths must be true or false")
    if not isinstance(raw["features"], list):
        raise ValueError(f"{where}: features must be a list")
    features = tuple(_parse_feature(where, item, reduced) for item in raw["features"])
    names = [f.name for f in features]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: the feature name {dupes[0]!r} is used twice")
    presets_raw = raw.get("presets") or []
    if not isinstance(presets_raw, list):
        raise ValueError(f"{where}: presets must be a list")
    presets = tuple(_parse_preset(where, item, {f.name: f for f in features}) for item in presets_raw)
    return ModelProfile(
        name=name, model_id=model_id, vectors_file=raw["vectors_file"], sae_source=raw.get("sae_source"),
        sae_format=raw.get("sae_format"), reduced_strengths=reduced, features=features, presets=presets,
        generation=_parse_generation(where, raw.get("generation") or {}), config_dir=config_dir,
    )


def _parse_feature(where: str, raw: Any, reduced: bool) -> FeatureConfig:
    _expect_keys(raw, _FEATURE_KEYS, f"{where}: a feature", required={"name", "feature"})
    name = check_name(raw["name"], f"{where}: a feature")
    where = f"{where}: feature {name!r}"
    triple = raw["feature"]
    if not isinstance(triple, list) or len(triple) != 3:
        raise ValueError(f"{where}: 'feature' must be [layer, index, strength] (index null for a contrastive vector)")
    layer, index, strength = triple
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"{where}: layer must be a non-negative integer, got {short_repr(layer)}")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        raise ValueError(f"{where}: index must be a non-negative integer or null, got {short_repr(index)}")
    if not is_finite_number(strength):
        raise ValueError(f"{where}: strength must be a finite number, got {short_repr(strength)}")
    op = raw.get("op", raw.get("mode", "clamp"))  # `mode` is the field's old name
    if op not in FEATURE_OPS:
        raise ValueError(f"{where}: op must be 'clamp' or 'add', got {short_repr(op)}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}: description must be a string")
    label = raw.get("label", "")
    if not isinstance(label, str) or len(label) > 60:
        raise ValueError(f"{where}: label must be a short string (the name the app shows), got {short_repr(label)}")
    return FeatureConfig(name=name, description=description, layer=layer, index=index,
                         strength=float(strength) * (layer if reduced else 1), op=op, label=label.strip())


def _parse_preset(where: str, raw: Any, features: dict[str, FeatureConfig]) -> Preset:
    _expect_keys(raw, _PRESET_KEYS, f"{where}: a preset", required={"name", "features"})
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: a preset needs a non-empty name")
    where = f"{where}: preset {name!r}"
    if not isinstance(raw["features"], list) or not raw["features"]:
        raise ValueError(f"{where}: features must be a non-empty list of {{key, fraction, op}}")
    active = []
    for feat in (ActiveFeature.from_dict(item, where) for item in raw["features"]):
        if feat.key not in features and parse_layer_index(feat.key) is None:
            raise ValueError(
                f"{where}: feature key {feat.key!r} is neither a feature of the profile "
                f"({', '.join(features)}) nor 'layer:index'"
            )
        if feat.op is None and feat.key in features:  # a preset shows its op: the feature's own
            feat = ActiveFeature(feat.key, feat.fraction, features[feat.key].op)
        active.append(feat)
    steer_prompt = raw.get("steer_prompt", True)
    if not isinstance(steer_prompt, bool):
        raise ValueError(f"{where}: steer_prompt must be true or false")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}: description must be a string")
    return Preset(name=name, description=description, features=tuple(active), steer_prompt=steer_prompt)


def _parse_generation(where: str, raw: Any) -> GenerationDefaults:
    allowed = set(GenerationDefaults.__dataclass_fields__)
    _expect_keys(raw, allowed, f"{where}: generation")
    values = {**GenerationDefaults().__dict__, **raw}
    if not is_finite_number(values["temperature"]) or values["temperature"] < 0:
        raise ValueError(f"{where}: generation.temperature must be a number >= 0, got {short_repr(values['temperature'])}")
    if not is_finite_number(values["repetition_penalty"]) or values["repetition_penalty"] <= 0:
        raise ValueError(f"{where}: generation.repetition_penalty must be a number > 0, got {short_repr(values['repetition_penalty'])}")
    for key in ("max_new_tokens", "max_input_tokens"):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: generation.{key} must be a positive integer, got {short_repr(value)}")
    if not isinstance(values["system_prompt"], str):
        raise ValueError(f"{where}: generation.system_prompt must be a string")
    if not isinstance(values["auto"], bool):
        raise ValueError(f"{where}: generation.auto must be true or false, got {short_repr(values['auto'])}")
    return GenerationDefaults(
        temperature=float(values["temperature"]), repetition_penalty=float(values["repetition_penalty"]),
        max_new_tokens=values["max_new_tokens"], system_prompt=values["system_prompt"],
        max_input_tokens=values["max_input_tokens"], auto=values["auto"],
    )


# ---------------------------------------------------------------------------
# Steering specs: what a user saves, loads, exports, imports and sends to the API
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeringSpec:
    """The features switched on for a model, with their strengths and ops.

        >>> spec = SteeringSpec("HuggingFaceTB/SmolLM2-135M-Instruct", (ActiveFeature("pirate", 0.5),))
        >>> save_steering_spec(spec, "pirate.json"); load_steering_spec("pirate.json") == spec
        True
    """

    model_id: str
    features: tuple[ActiveFeature, ...]
    steer_prompt: bool = True
    concepts: tuple[ConceptRecipe, ...] = ()  # the user's own concepts among the features: how to rebuild them

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id or len(self.model_id) > 300:
            raise ValueError("a steering spec needs a model_id (a hub id or the embedded model's id)")
        feats = tuple(self.features)
        if not all(isinstance(f, ActiveFeature) for f in feats):
            raise ValueError("a steering spec's features must be ActiveFeature objects")
        if len(feats) > 64:
            raise ValueError(f"a steering spec has at most 64 features, this one has {len(feats)}")
        object.__setattr__(self, "features", feats)
        if not isinstance(self.steer_prompt, bool):
            raise ValueError(f"steer_prompt must be true or false, got {short_repr(self.steer_prompt)}")
        concepts = tuple(self.concepts)
        if not all(isinstance(c, ConceptRecipe) for c in concepts):
            raise ValueError("a steering spec's concepts must be ConceptRecipe objects")
        if len(concepts) > CONCEPT_LIMITS["per_spec"] or len({c.name for c in concepts}) != len(concepts):
            raise ValueError(f"a steering spec carries at most {CONCEPT_LIMITS['per_spec']} concepts, each name once")
        object.__setattr__(self, "concepts", concepts)

    def to_dict(self) -> dict:
        out = {
            "format": SPEC_FORMAT, "version": SPEC_VERSION, "model_id": self.model_id,
            "steer_prompt": self.steer_prompt, "features": [f.to_dict() for f in self.features],
        }
        if self.concepts:  # only when there are some: older readers keep reading plain specs
            out["concepts"] = [c.to_dict() for c in self.concepts]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> SteeringSpec:
        check_header(data, SPEC_FORMAT, SPEC_VERSION, "steering spec")
        unknown = sorted(map(str, set(data) - {"format", "version", "model_id", "steer_prompt", "features", "concepts"}))
        if unknown:
            raise ValueError(f"steering spec: unknown field {short_repr(unknown[0])}")
        feats = data.get("features")
        if not isinstance(feats, list) or len(feats) > 64:
            raise ValueError("steering spec: 'features' must be a list of at most 64 {key, fraction, op}")
        active = tuple(ActiveFeature.from_dict(item, "steering spec") for item in feats)
        concepts = data.get("concepts", [])
        if not isinstance(concepts, list) or len(concepts) > CONCEPT_LIMITS["per_spec"]:
            raise ValueError(f"steering spec: 'concepts' must be a list of at most {CONCEPT_LIMITS['per_spec']} "
                             "{name, sentences, template}")
        recipes = tuple(ConceptRecipe.from_dict(item) for item in concepts)
        return cls(model_id=data.get("model_id"), features=active, steer_prompt=data.get("steer_prompt", True),
                   concepts=recipes)


def save_steering_spec(spec: SteeringSpec, path: str | os.PathLike) -> None:
    """Write a spec as JSON (.json) or YAML (.yaml/.yml), atomically.

        >>> save_steering_spec(spec, "my_steering.yaml")
    """
    import json

    import yaml

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(spec.to_dict(), indent=2) + "\n"
    elif suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    else:
        raise ValueError(f"cannot tell the format of {short_repr(str(path))}: name it .json, .yaml or .yml")
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_steering_spec(path: str | os.PathLike) -> SteeringSpec:
    """Read a spec written by `save_steering_spec` (JSON or YAML, whatever the suffix).

        >>> spec = load_steering_spec("my_steering.json")
    """
    path = Path(path)
    data = read_yaml_file(path, "steering spec", max_bytes=MAX_SPEC_BYTES, aliases=False)  # JSON is YAML too
    try:
        return SteeringSpec.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None

