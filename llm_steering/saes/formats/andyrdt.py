"""dictionary_learning (andyrdt's SAEs): `{hook}_layer_{L}/trainer_{N}/ae.pt` + `config.json`.

`ae.pt` is the `state_dict()` of a dictionary_learning class, torch.save'd; `config.json` is
`{"trainer": {"dict_class", "layer", "lm_name", ...}}`. BatchTopKSAE, AutoEncoderTopK and
AutoEncoder store `decoder.weight` [d_model, d_sae]; MatryoshkaBatchTopKSAE and
JumpReluAutoEncoder store `W_dec` [d_sae, d_model]. Encoders as each class's `encode` computes
them (saprmarks/dictionary_learning @ 60ec6bf):
- AutoEncoder: relu(encoder(x - bias))
- BatchTopKSAE, MatryoshkaBatchTopKSAE (use_threshold=True): post = relu(enc(x - b_dec)); post * (post > threshold)
- AutoEncoderTopK (use_threshold=False): post's per-token top k (k from the file)
- JumpReluAutoEncoder: pre = x @ W_enc + b_enc; relu(pre * (pre > threshold))
BatchTopKSAE and AutoEncoderTopK save the same tensors: without config.json naming the class,
finding features from text is refused rather than guessed.
"""

from __future__ import annotations

import re

from llm_steering.saes.base import Decoder, Encoder, SAEFile, SAEFormat, sae_file
from llm_steering.saes.common import check_mirror, pick_decoder
from llm_steering.saes.registry import register
from llm_steering.saes.source import SAESource
from llm_steering.saes.tensors import TensorRef

CLASSES = ("AutoEncoder", "BatchTopKSAE", "AutoEncoderTopK", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder")


def _trainer_config(src: SAESource, sae: SAEFile) -> dict:
    rel = src.beside(sae.file, "config.json")
    trainer = src.read_json(rel).get("trainer", {}) if rel in src.files else {}
    return trainer if isinstance(trainer, dict) else {}


def _dict_class(trainer: dict, tensors: dict[str, TensorRef], label: str) -> str:
    """The class that saved the file: config.json's dict_class, else what only one class stores."""
    named = trainer.get("dict_class")
    if "r_mag" in tensors or named == "GatedAutoEncoder":
        raise ValueError(f"{label} is a GatedAutoEncoder: finding features from text supports {', '.join(CLASSES)}")
    if named is not None:
        if named not in CLASSES:
            raise ValueError(f"{label}: config.json names dict_class {named!r}; finding supports {', '.join(CLASSES)}")
        return named
    if "W_enc" in tensors:
        return "MatryoshkaBatchTopKSAE" if "k" in tensors else "JumpReluAutoEncoder"
    if "k" in tensors:
        raise ValueError(f"{label} has no config.json saying its class, and BatchTopKSAE and AutoEncoderTopK save the "
                         "same tensors but encode differently: put the trainer's config.json (trainer.dict_class) beside it")
    return "AutoEncoder"


@register("andyrdt", r"(?:^|/)(([a-z][a-z_]*?)_layer_(\d+))/trainer_(\d+)/ae\.pt$",
          looks_like="resid_post_layer_L/trainer_N/ae.pt", takes_trainer=True)
class DictionaryLearning(SAEFormat):
    def candidate(self, src: SAESource, file: str, match: re.Match, layer: int, hook_point: str | None) -> SAEFile | None:
        trainer = int(match.group(4))
        cfg_rel = src.beside(file, "config.json")
        model = None
        if src.local is not None and cfg_rel in src.files:  # (on the hub: not worth a download per trainer)
            cfg = src.read_json(cfg_rel).get("trainer")
            model = cfg.get("lm_name") if isinstance(cfg, dict) else None
        return sae_file(src, file, self.name, match.group(1), rank=(trainer != 1, trainer), model_name=model)

    def decoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Decoder:
        dec = pick_decoder(tensors, [("decoder.weight", 1), ("W_dec", 0)], sae.label)
        if dec.name == "W_dec":
            check_mirror(dec, tensors, "W_enc", 1, sae.label)
        else:
            check_mirror(dec, tensors, "encoder.weight", 0, sae.label)
        return dec

    def encoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Encoder:
        label = sae.label
        dec = self.decoder(src, sae, tensors)
        cls = _dict_class(_trainer_config(src, sae), tensors, label)
        weight_name = "W_enc" if dec.name == "W_dec" else "encoder.weight"
        if weight_name not in tensors:
            raise ValueError(f"{label} has no encoder tensor {weight_name!r}: features cannot be found from text with it")
        weight, axis = tensors[weight_name], 1 if weight_name == "W_enc" else 0
        bias = tensors.get("b_enc" if weight_name == "W_enc" else "encoder.bias")
        need = {"AutoEncoder": ["bias"], "JumpReluAutoEncoder": ["threshold"], "AutoEncoderTopK": ["k", "b_dec"],
                "BatchTopKSAE": ["threshold", "b_dec"], "MatryoshkaBatchTopKSAE": ["threshold", "b_dec"]}[cls]
        if missing := [n for n in need if n not in tensors]:
            raise ValueError(f"{label} is a {cls} without {', '.join(repr(n) for n in missing)}")
        if cls == "AutoEncoder":
            return Encoder(weight, axis, bias, tensors["bias"], label=label)
        if cls == "JumpReluAutoEncoder":  # apply_b_dec_to_input is False (not saved)
            return Encoder(weight, axis, bias, threshold=tensors["threshold"], threshold_per_feature=True, label=label)
        if cls == "AutoEncoderTopK":
            k = tensors["k"]
            if k.shape != ():
                raise ValueError(f"{label}: k has shape {list(k.shape)}; AutoEncoderTopK saves one number")
            return Encoder(weight, axis, bias, tensors["b_dec"], topk=int(k.read()), label=label)
        return Encoder(weight, axis, bias, tensors["b_dec"], threshold=tensors["threshold"], label=label)
