"""The goodfire format: files mirroring the model card of Goodfire/Llama-3.1-8B-Instruct-SAE-l19, read back
to the exact decoder column, and features found from text equal to the card's encode."""

from __future__ import annotations

from pathlib import Path

from llm_steering import saes
from llm_steering.saes import find as sae_find

import pytest
import torch
from test_sae_find import LAYER, TEXT, assert_same, expected, hidden_at, tiny  # noqa: F401  (tiny: the fixture)
from test_saes import D, N, check, randomize, write_saelens
from torch import nn


class GoodfireSAE(nn.Module):
    """The card's SparseAutoEncoder: encoder_linear = Linear(d_in, d_hidden), decoder_linear = Linear(d_hidden, d_in)."""

    def __init__(self, d_in: int, d_hidden: int):
        super().__init__()
        self.encoder_linear = nn.Linear(d_in, d_hidden)
        self.decoder_linear = nn.Linear(d_hidden, d_in)


def write_goodfire(root: Path, layer: int, seed: int = 0) -> GoodfireSAE:
    """Llama-3.1-8B-Instruct-SAE-l{L}.pth: the module's state_dict, torch.save'd (the card loads it with load_state_dict)."""
    sae = randomize(GoodfireSAE(D, N), seed)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(sae.state_dict(), root / f"Llama-3.1-8B-Instruct-SAE-l{layer}.pth")
    return sae


def test_goodfire_pth(tmp_path):
    sae = write_goodfire(tmp_path, 19)
    (f,) = saes.read_features(str(tmp_path), [(19, 40)])
    check(f.direction, sae.decoder_linear.weight.detach()[:, 40])
    assert (f.sae.format, f.sae.hook_point) == ("goodfire", "blocks.19.hook_resid_post")
    with pytest.raises(ValueError, match=r"layer 18 has no goodfire SAE .*\(layers available: 19\)"):
        saes.read_features(str(tmp_path), [(18, 40)])


def test_goodfire_is_detected_and_told_apart(tmp_path):
    write_goodfire(tmp_path / "gf", 3)
    assert saes.detect_format(saes.SAESource.open(str(tmp_path / "gf"))) == "goodfire"
    write_saelens(tmp_path / "sl", "blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match=r"several SAE layouts \(goodfire, saelens\)"):
        saes.detect_format(saes.SAESource.open(str(tmp_path)))


def test_goodfire_matches_its_encode(tmp_path, tiny):  # noqa: F811
    model, tok = tiny
    gf = write_goodfire(tmp_path, LAYER, seed=5)
    with torch.no_grad():
        acts = torch.relu(gf.encoder_linear(hidden_at(model, tok, TEXT, LAYER)))  # the card's encode
    assert_same(sae_find.find_features(str(tmp_path), LAYER, TEXT, model, tok, k=5, chunk_size=13), expected(acts, 5))
