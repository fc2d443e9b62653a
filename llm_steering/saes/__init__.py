"""SAE files as their libraries write them: find the SAE of a layer, read decoder directions, find
features from text. One module per format in `formats/`, registered in `registry.py`.

    from llm_steering import saes
    feats = saes.read_features("andyrdt/saes-llama-3.1-8b-instruct", [(15, 21576)])
    feats[0].direction.shape, feats[0].sae.file, feats[0].sae.hook_point
    # (torch.Size([4096]), 'resid_post_layer_15/trainer_1/ae.pt', 'resid_post_layer_15')
    saes.neuronpedia_url(15, 21576)   # 'https://www.neuronpedia.org/llama3.1-8b-it/15-resid-post-aa/21576'

Formats (`sae_format`, one of `SAE_FORMATS`; detected from the file names when not given): one
module each in `formats/`, named after the format, whose docstring gives its layout and encoder.

A layer here is a steering layer: the residual stream after decoder layer L (`resid_post`). An
SAE is at the layer of the hook its decoder writes: resid_post L is layer L, resid_pre L is
layer L-1; a transcoder is at the layer of its output hook. SAEs whose output is not the
residual stream (mlp_out, attn_out, hook_z, transcoders) are used only when `hook_point=` names
them; hook_z rows are mapped into the residual stream through the layer's o_proj. Only the
needed elements of a file are read.
"""

from llm_steering.saes.base import Decoder, Encoder, SAEFile, SAEFormat, hook_kind, hook_layer
from llm_steering.saes.core import (
    NEURONPEDIA,
    SAEFeature,
    check_model,
    detect_format,
    extract_sae_features,
    locate_sae,
    neuronpedia_url,
    read_directions,
    read_features,
    z_to_residual,
)
from llm_steering.saes.find import FoundFeature, find_features, hook_activations, load_encoder, top_features
from llm_steering.saes.registry import FORMATS, SAE_FORMATS, get_format, register
from llm_steering.saes.source import SAESource
from llm_steering.saes.tensors import TensorRef, tensor_index

__all__ = ["Decoder", "Encoder", "SAEFile", "SAEFormat", "hook_kind", "hook_layer", "NEURONPEDIA",
           "SAEFeature", "check_model", "detect_format", "extract_sae_features", "locate_sae", "neuronpedia_url",
           "read_directions", "read_features", "z_to_residual", "FoundFeature", "find_features", "hook_activations",
           "load_encoder", "top_features", "FORMATS", "SAE_FORMATS", "get_format", "register", "SAESource",
           "TensorRef", "tensor_index"]
