"""What the steering did: projections on each component's direction, before and after its edit,
at every position the model ran. Filled by every backend (hooks, NNsight, vLLM) on request.

    >>> trace = SteeringTrace()
    >>> "".join(stream_steered_answer_hf(model, tok, chat, [comp], trace=trace))
    >>> trace.components[0].before[trace.prompt_len:]     # the answer positions
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ComponentTrace:
    """Projections h·v on one component's direction, before and after its edit, per position."""

    layer: int
    name: str
    op: str
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    # Chunks recorded during generation, kept where the model runs (no device sync per
    # layer and token); `flush` moves them to `before`/`after` in one transfer.
    pending: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)

    def record(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Keep one chunk of projections ([seq] each) until `flush`."""
        self.pending.append(torch.stack([before.detach(), after.detach()]))

    def flush(self) -> None:
        """Move the recorded chunks to the CPU lists `before` and `after`."""
        if self.pending:
            both = torch.cat(self.pending, dim=1).float().cpu()  # [2, positions]
            self.pending = []
            self.before.extend(both[0].tolist())
            self.after.extend(both[1].tolist())


@dataclass
class SteeringTrace:
    """What the steering did: for each component, projections at every position the model ran.

    `token_ids` holds the prompt then the answer; `prompt_len` how many are prompt.
    Position i of `before`/`after` is the hidden state while reading token i, so the
    last answer token (never fed back) has no entry.
    """

    prompt_len: int = 0
    token_ids: list[int] = field(default_factory=list)
    components: list[ComponentTrace] = field(default_factory=list)

    def flush(self) -> None:
        """Move every component's recorded projections to the CPU (the backends call this)."""
        for comp in self.components:
            comp.flush()
