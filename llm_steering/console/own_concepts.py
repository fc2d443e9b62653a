"""The console's own concepts: made with /concept, kept in the user's vectors file, loaded at start.

The file is a normal vectors file (`SteeringVectorSet.load` reads it), one per profile, in the
user's data folder: $STEERING_DATA_DIR, else $XDG_DATA_HOME/llm-steering, else
~/.local/share/llm-steering (cli.user_concepts_path). Each vector carries its recipe, so /features
and --help list the concepts, and a saved steering rebuilds them anywhere.

    >>> catalog, note = load_user_concepts(catalog, user_concepts_path("smollm2"))
    >>> feature, catalog, seconds = make_and_keep(catalog, recipe, path)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llm_steering.catalog import Catalog, Feature, recipe_of
from llm_steering.concepts import TEMPLATES, make_concept
from llm_steering.core import format_fraction, format_strength, one_line
from llm_steering.recipe import ConceptRecipe
from llm_steering.vectors import SteeringVectorSet


def load_user_concepts(catalog: Catalog, path: Path | None) -> tuple[Catalog, str | None]:
    """The catalog with the concepts of the user's file added, and a notice (None: nothing to say).
    A file that cannot be used is left alone and named in the notice: the chat starts anyway."""
    if path is None or not Path(path).is_file():
        return catalog, None
    try:
        kept = SteeringVectorSet.load(path)
        if (kept.model_id, kept.hidden_size) != (catalog.vectors.model_id, catalog.vectors.hidden_size):
            raise ValueError(f"it holds concepts for {kept.model_id!r}, not {catalog.vectors.model_id!r}")
        mine = [v for v in kept.vectors if recipe_of(v) is not None]
        catalog = catalog.with_concepts(mine)
    except ValueError as exc:
        return catalog, f"your concepts in {path} are not loaded: {one_line(exc)}"
    if not mine:
        return catalog, None
    return catalog, f"your concepts (from {path}): {', '.join(v.name for v in mine)}"


def make_and_keep(catalog: Catalog, recipe: ConceptRecipe, path: Path | None) -> tuple[Feature, Catalog, float, str]:
    """Make the concept, add it to the catalog and (with a path) to the user's file, atomically;
    returns the feature, the new catalog, the seconds it took and where it is kept. A file that
    cannot be read is never overwritten: the concept is then kept for this chat only, and the note says why."""
    started = time.monotonic()
    feature = make_concept(catalog, recipe)
    kept = "kept for this chat only"
    if path is not None:
        norms = {feature.layer: catalog.norm(feature.layer)}
        new = SteeringVectorSet(catalog.vectors.model_id, catalog.vectors.hidden_size, [feature.vector], norms)
        try:
            old = SteeringVectorSet.load(path) if Path(path).is_file() else None
            (old.merged(new) if old is not None else new).save(path)  # atomic: a failed write leaves the old file
            kept = f"kept in {path}"
        except (ValueError, OSError) as exc:
            kept = f"kept for this chat only: {one_line(exc, 160)}; move that file away to keep your concepts"
    return feature, catalog.with_concepts([feature.vector]), time.monotonic() - started, kept


def templates_text() -> str:
    """/concept alone: how to write one, with each template and an example."""
    lines = ["/concept NAME [topic|style|persona]: sentence | sentence | ...  (five short sentences are plenty)"]
    for t in TEMPLATES.values():
        lines.append(f"  {t.name:<8} {t.what}, e.g. {t.example[0]!r}")
    return "\n".join(lines)


def feature_details(catalog: Catalog, feature: Feature, tokens: Any) -> list[str]:
    """/features NAME: what it is, its default, its layer, and the tokens it promotes and suppresses
    (`tokens`: catalog.feature_tokens, measured or the logit lens, and the lines say which)."""
    from llm_steering.lens import token_words

    recipe = catalog.concepts.get(feature.key)
    lines = [f"{feature.title} ({feature.key})" + (f": {feature.description}" if feature.description else "")]
    lines.append(f"  layer {feature.layer}, default {format_fraction(feature.default_fraction)} x norm "
                 f"= {format_strength(feature.default_fraction, feature.norm)} (norm {feature.norm:.1f}), {feature.default_op}")
    if recipe is not None:
        lines.append(f"  your {recipe.template}, from {len(recipe.sentences)} sentence(s): "
                     + " | ".join(recipe.sentences)[:200])
    up, down = tokens.verbs
    width = max(len(up), len(down)) + 1
    lines.append(f"  {up + ':':<{width}} {', '.join(token_words(tokens.promoted))}")
    lines.append(f"  {down + ':':<{width}} {', '.join(token_words(tokens.suppressed))}")
    lines.append("  (measured: the tokens whose probability rises and falls most when a few everyday chats are steered "
                 "at its default strength and op)" if tokens.measured else
                 "  (the logit lens: the direction through the model's final norm and unembedding)")
    return lines
