"""A user's own concept as data: the recipe a steering spec carries to rebuild its vector anywhere.

Torch-free (the spec format in config.py uses it); concepts.py turns a recipe into a vector.

    >>> recipe = ConceptRecipe("paris_trip", ("We walked along the Seine.", "The Louvre was full."))
    >>> ConceptRecipe.from_dict(recipe.to_dict()) == recipe
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llm_steering.core import short_repr

CONCEPT_TEMPLATES = ("topic", "style", "persona")  # how a concept's sentences are read (concepts.TEMPLATES)
# bounds on what a visitor may send: a share link carries the sentences, and each one is run through the model
CONCEPT_LIMITS = {"sentences": 20, "sentence_chars": 300, "total_chars": 1500, "name_chars": 40, "per_spec": 4}


@dataclass(frozen=True)
class ConceptRecipe:
    """A user's own concept: a name and a few example sentences, read as a topic, a style or a persona.

    Everything needed to rebuild its vector (concepts.make_concept) on any copy of the model, so a
    spec carries it through export, import and share links. Bounded (CONCEPT_LIMITS), checked here.

        >>> ConceptRecipe("paris_trip", ("We walked along the Seine.", "The Louvre was full."))
    """

    name: str
    sentences: tuple[str, ...]
    template: str = "topic"
    layer: int | None = None

    def __post_init__(self) -> None:
        lim = CONCEPT_LIMITS
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", self.name) or len(self.name) > lim["name_chars"]:
            raise ValueError(f"concept name {short_repr(self.name)} is not valid: use snake_case (a-z, 0-9, _, starting "
                             f"with a letter), at most {lim['name_chars']} characters, e.g. paris_trip")
        if isinstance(self.sentences, str) or not isinstance(self.sentences, (list, tuple)):
            raise ValueError(f"concept {self.name!r}: give its sentences as a list of texts")
        sentences = tuple(s.strip() if isinstance(s, str) else s for s in self.sentences)
        sentences = tuple(s for s in sentences if s != "")
        if not 1 <= len(sentences) <= lim["sentences"]:
            raise ValueError(f"concept {self.name!r} has {len(sentences)} sentences: give 1 to {lim['sentences']} "
                             "example sentences (five is a good number)")
        for s in sentences:
            if not isinstance(s, str) or len(s) > lim["sentence_chars"]:
                raise ValueError(f"concept {self.name!r}: each sentence must be text of at most {lim['sentence_chars']} "
                                 f"characters, got {short_repr(s)}")
        if sum(map(len, sentences)) > lim["total_chars"]:
            raise ValueError(f"concept {self.name!r}: its sentences are {sum(map(len, sentences))} characters; "
                             f"keep them under {lim['total_chars']} in all (a few short sentences are enough)")
        object.__setattr__(self, "sentences", sentences)
        if self.template not in CONCEPT_TEMPLATES:
            raise ValueError(f"concept {self.name!r}: template {short_repr(self.template)} is unknown; use "
                             f"{', '.join(CONCEPT_TEMPLATES)}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or not 0 <= self.layer < 1000):
            raise ValueError(f"concept {self.name!r}: layer must be a layer number or null, got {short_repr(self.layer)}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "sentences": list(self.sentences), "template": self.template}
        if self.layer is not None:
            out["layer"] = self.layer
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ConceptRecipe:
        """From {name, sentences, template?, layer?}; anything else is a one-line ValueError."""
        if not isinstance(data, dict) or not {"name", "sentences"} <= set(data):
            raise ValueError(f"a concept must be a mapping with name and sentences, got {short_repr(data)}")
        unknown = sorted(map(str, set(data) - {"name", "sentences", "template", "layer"}))
        if unknown:
            raise ValueError(f"concept {short_repr(data.get('name'))}: unknown field {short_repr(unknown[0])}")
        sentences = data["sentences"]
        if isinstance(sentences, list) and len(sentences) > CONCEPT_LIMITS["sentences"] * 2:
            raise ValueError(f"concept {short_repr(data['name'])}: at most {CONCEPT_LIMITS['sentences']} sentences")
        return cls(name=data["name"], sentences=tuple(sentences) if isinstance(sentences, list) else sentences,
                   template=data.get("template", "topic"), layer=data.get("layer"))
