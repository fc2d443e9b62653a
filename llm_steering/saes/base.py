"""What every SAE format shares: the SAE found in a source, its encoder, the format protocol, hook names.

A format (one module in `llm_steering/saes/formats/`) is an `SAEFormat` subclass registered with
`@register`: it names its files, reads its metadata into `SAEFile`s (input and output hook,
steering layer, architecture, the model it was trained on), says which tensor is its decoder,
and builds its `Encoder` as its library computes activations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from llm_steering.saes.source import SAESource
    from llm_steering.saes.tensors import TensorRef


@dataclass(frozen=True)
class SAEFile:
    """One SAE in a source: its file and format, the hook it reads (`hook_point`) and the one its
    decoder writes (`hook_out`: the same for an SAE, another for a transcoder), the steering layer
    of `hook_out` (None: before layer 0) and whether `hook_out` is the residual stream."""

    source: str
    file: str
    format: str
    hook_point: str
    layer: int | None
    residual: bool
    rank: tuple = field(default=(), compare=False, repr=False)  # preference among SAEs of a layer
    hook_out: str = ""
    architecture: str = ""
    model_name: str | None = None

    @property
    def label(self) -> str:
        return f"{self.source}/{self.file}"

    @property
    def writes_z(self) -> bool:
        """Its decoder rows are per-head attention z vectors (hook_z), not residual-stream vectors."""
        return (self.hook_out or self.hook_point).endswith("hook_z")


@dataclass(frozen=True)
class Decoder:
    """The decoder tensor of an SAE file and the axis along which its features lie."""

    tensor: TensorRef
    name: str
    axis: int  # 0: [d_sae, d_out] (row i is feature i), 1: [d_out, d_sae] (column i)

    @property
    def d_sae(self) -> int:
        return self.tensor.shape[self.axis]


@dataclass(frozen=True)
class Encoder:
    """How an SAE computes activations: x normalised (`input_norm`), times `input_scale`, minus
    `input_bias`; pre = x @ W + bias; then relu(pre) * (pre > threshold), or per token only the
    `topk` largest pre (then ReLU)."""

    weight: TensorRef
    axis: int  # the axis of `weight` that runs over features
    bias: TensorRef | None = None
    input_bias: TensorRef | None = None
    input_scale: float = 1.0
    input_norm: str | None = None  # "token": each token to norm sqrt(d_in); "layer_norm": (x - mean) / (std + 1e-5)
    threshold: TensorRef | float | None = None
    threshold_per_feature: bool = False  # threshold is [d_sae] (JumpReLU), else one number
    topk: int | None = None
    decoder_norm: Decoder | None = None  # SAELens rescale_acts_by_decoder_norm
    label: str = ""

    @property
    def d_sae(self) -> int:
        return self.weight.shape[self.axis]

    @property
    def d_model(self) -> int:
        return self.weight.shape[1 - self.axis]


class SAEFormat:
    """One SAE file layout. Subclasses set the class attributes and implement the three methods."""

    name: ClassVar[str]
    pattern: ClassVar[re.Pattern]  # matches the path of each SAE file of this layout in a source
    looks_like: ClassVar[str]  # the file names, for "cannot tell the format" messages
    takes_trainer: ClassVar[bool] = False  # --trainer picks among trainer_N folders

    def candidates(self, src: SAESource, layer: int, hook_point: str | None) -> list[SAEFile]:
        """The SAEs of this layout in `src`: `candidate` for each file its `pattern` matches."""
        found = (self.candidate(src, f, m, layer, hook_point) for f in src.files if (m := self.pattern.search(f)))
        return [sae for sae in found if sae is not None]

    def candidate(self, src: SAESource, file: str, match: re.Match, layer: int, hook_point: str | None) -> SAEFile | None:
        """The SAE in `file` (its path matched `pattern` as `match`), or None to pass it over (a hub
        source may skip files that cannot be at `layer`, to save their downloads)."""
        raise NotImplementedError

    def decoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Decoder:
        """The decoder tensor, checked against the file's encoder and config."""
        raise NotImplementedError

    def encoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Encoder:
        """The encoder as the library computes it (parameters located, nothing read yet)."""
        raise NotImplementedError


def sae_file(src: SAESource, file: str, fmt: str, hook_in: str, hook_out: str | None = None,
             rank: tuple = (0,), architecture: str = "", model_name: Any = None) -> SAEFile:
    """An SAEFile whose steering layer comes from the hook its decoder writes."""
    out = hook_out or hook_in
    layer, residual = hook_layer(out)
    if "resid_pre" in out:
        rank = (1, *rank)  # resid_post L and resid_pre L+1 are the same stream: prefer resid_post
    return SAEFile(src.name, file, fmt, hook_in, layer, residual, rank, out, architecture,
                   model_name if isinstance(model_name, str) and model_name else None)


def hook_layer(hook: str) -> tuple[int | None, bool]:
    """(steering layer, is the residual stream) of a hook point name, in any library's naming."""
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook):
        layer = int(m.group(1)) - (m.group(2) == "pre")
        return (layer, True) if layer >= 0 else (None, True)  # resid_pre 0: the embeddings
    if m := re.fullmatch(r"(?:model\.)?(?:layers|h)\.(\d+)", hook) or re.fullmatch(r"resid_post_layer_(\d+)", hook):
        return int(m.group(1)), True
    if m := re.fullmatch(r"resid_pre_layer_(\d+)", hook):
        return (int(m.group(1)) - 1, True) if int(m.group(1)) > 0 else (None, True)
    if m := re.match(r"(?:blocks|(?:model\.)?layers|h)\.(\d+)\.", hook) or re.fullmatch(r"[a-z_]+_layer_(\d+)", hook):
        return int(m.group(1)), False
    return None, False


# where a hook point's activations are in a Hugging Face Llama: (kind, block) by the names libraries use
_HOOK_KINDS = (
    (r"blocks\.(\d+)\.hook_resid_post|(?:model\.)?(?:layers|h)\.(\d+)|resid_post_layer_(\d+)", "resid_post"),
    (r"blocks\.(\d+)\.hook_resid_pre|resid_pre_layer_(\d+)", "resid_pre"),
    (r"blocks\.(\d+)\.hook_resid_mid", "resid_mid"),
    (r"blocks\.(\d+)\.hook_mlp_out|(?:model\.)?layers\.(\d+)\.mlp|mlp_out_layer_(\d+)", "mlp_out"),
    (r"blocks\.(\d+)\.hook_attn_out|(?:model\.)?layers\.(\d+)\.self_attn|attn_out_layer_(\d+)", "attn_out"),
    (r"blocks\.(\d+)\.attn\.hook_z", "z"),
)


def hook_kind(hook: str) -> tuple[str, int] | None:
    """(kind, block) of a hook point whose activations the finder can capture, else None."""
    for rx, kind in _HOOK_KINDS:
        if m := re.fullmatch(rx, hook):
            return kind, int(next(g for g in m.groups() if g is not None))
    return None
