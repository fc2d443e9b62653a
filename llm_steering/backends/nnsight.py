"""The NNsight backend: interventions on every generation step (`tracer.iter[:]`), with a trace.

It returns the whole answer at the end (no streaming). It runs in a thread of its own, so a
caller waiting for it can be interrupted (Ctrl-C) and cancel it: the run then ends after its
current token, keeping the answer so far.

    >>> answer, trace = generate_steered_answer_nnsight(model, tok, chat, [comp], return_trace=True)
    >>> trace.components[0].after[-1]
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from llm_steering.backends.base import Generation, GenerationSettings, finish_reason, trim_trace
from llm_steering.backends.hooks import InProcessBackend, _StopOnEvent
from llm_steering.components import SteeringComponent, by_layer, device_vectors, steer_hidden
from llm_steering.models import decoder_layers, eos_ids, generation_kwargs, layer_hidden
from llm_steering.traces import SteeringTrace

import torch

_NNSIGHT: weakref.WeakKeyDictionary[Any, tuple[Any, threading.Lock]] = weakref.WeakKeyDictionary()
_NNSIGHT_LOCK = threading.Lock()


def _nnsight_model(model: Any, tokenizer: Any) -> tuple[Any, threading.Lock]:
    """An NNsight wrapper around a structural copy of `model` that shares its weights.

    NNsight installs its own forward on every module it wraps; wrapping a copy keeps
    the user's model (and the hooks backend running on it) untouched. One trace at a
    time runs on a wrapper, so a lock comes with it.
    """
    with _NNSIGHT_LOCK:
        if model not in _NNSIGHT:
            from nnsight import TransformersModel

            _unmount_nnsight_save()

            shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
            clone = copy.deepcopy(model, memo=shared)
            for module in clone.modules():  # hooks of requests in flight must not come along
                module._forward_hooks.clear()
                module._forward_pre_hooks.clear()
            _NNSIGHT[model] = (TransformersModel(clone, tokenizer=tokenizer), threading.Lock())
        return _NNSIGHT[model]


def _unmount_nnsight_save() -> None:
    """Take back the `.save` NNsight 0.8 mounts on every object at import.

    With it in place, any class anyio checks that is defined later (gradio's MCP server, for
    one) fails with "Attribute 'save' is missing its type annotation": importing gradio after
    an NNsight answer broke. This backend calls `nnsight.save(...)` instead.
    """
    try:
        from nnsight._c import unmount
    except ImportError:
        return
    if unmount is not None and "save" in object.__dict__:
        unmount("save")




class NNsightBackend(InProcessBackend):
    """NNsight interventions on a structural copy of the user's model; the whole answer at the end."""

    name = "nnsight"
    streams = False

    def pieces(self, s: GenerationSettings, comps: list[SteeringComponent], prompt_ids: list[int], result: Generation,
               cancel: threading.Event | None) -> Iterator[str]:
        return self._pieces(comps, s, result, cancel)

    def _pieces(self, comps: list[SteeringComponent], s: GenerationSettings, result: Generation,
                cancel: threading.Event | None) -> Iterator[str]:
        """Run in a worker thread; wait for it in short steps (a Ctrl-C lands in the wait, not in NNsight)."""
        stop, done, error = threading.Event(), threading.Event(), []

        def work() -> None:
            try:
                _run(self.model, self.tokenizer, comps, s, result, stop)
            except BaseException as exc:  # handed to the consumer below
                error.append(exc)
            finally:
                done.set()

        threading.Thread(target=work, name="nnsight-answer", daemon=True).start()
        try:
            while not done.wait(0.05):
                if cancel is not None and cancel.is_set():
                    stop.set()
            if error:
                raise error[0]
            answer = _decode(self.model, self.tokenizer, result.token_ids)
            if answer:
                yield answer
        finally:
            stop.set()  # closed early: the run ends after its current token
            done.wait()
            result.finish_reason = finish_reason(result.token_ids, s.max_new_tokens, eos_ids(self.model, self.tokenizer))


def nnsight_backend(model: Any, tokenizer: Any, model_id: str | None = None, verbose: bool = False) -> NNsightBackend:
    """The registry's factory."""
    return NNsightBackend(model, tokenizer)


def _decode(model: Any, tokenizer: Any, ids: list[int]) -> str:
    eos = set(eos_ids(model, tokenizer))
    return tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)


def _run(model: Any, tokenizer: Any, comps: list[SteeringComponent], s: GenerationSettings, result: Generation,
         stop: threading.Event) -> None:
    """One NNsight generation: fills result.token_ids and result.trace."""
    import warnings

    import nnsight
    from transformers import StoppingCriteriaList

    nn_model, lock = _nnsight_model(model, tokenizer)
    path, _ = decoder_layers(model)
    layer_list = nn_model
    for part in path.split("."):
        layer_list = getattr(layer_list, part)
    groups = [(layer_list[layer], [comps[i] for i in idx], idx) for layer, idx in by_layer(comps).items()]
    vectors = device_vectors(model, comps)
    trace = result.trace
    record = None if trace is None else trace.components
    n_prompt = len(result.prompt_ids)
    steer_from = 0 if s.steer_prompt else n_prompt
    input_ids = torch.tensor([result.prompt_ids], device=next(model.parameters()).device)
    kwargs = generation_kwargs(model, tokenizer, s.max_new_tokens, s.temperature, s.repetition_penalty, s.top_p)
    kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnEvent(stop)])

    with lock, warnings.catch_warnings(), torch.inference_mode():
        # An open `tracer.iter[:]` ends by parking on the step after the last one: expected.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        if s.seed is not None:
            torch.manual_seed(s.seed)
        with nn_model.generate(**kwargs) as tracer:
            with tracer.invoke({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}):
                # With no component nothing is touched per step, and an open loop would never end.
                for step in tracer.iter[:] if groups else ():
                    start = 0 if step == 0 else n_prompt + step - 1
                    for envoy, group, idx in groups:
                        hidden = layer_hidden(envoy.output)  # [batch, seq, d_model]
                        hidden[:] = steer_hidden(hidden, group, [vectors[i] for i in idx], steer_from, start,
                                                 None if record is None else [record[i] for i in idx])
            with tracer.invoke():
                output_ids = nnsight.save(tracer.result)
    result.token_ids[:] = output_ids[0, n_prompt:].tolist()
    if trace is not None:
        trace.flush()
        trace.token_ids[:] = [*result.prompt_ids, *result.token_ids]
        trim_trace(trace)


def generate_steered_answer_nnsight(
    model: Any,
    tokenizer: Any,
    chat: Sequence[dict],
    components: Sequence[SteeringComponent],
    clamp_intensity: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    repetition_penalty: float = 1.0,
    steer_prompt: bool = True,
    return_trace: bool = False,
    cancel: threading.Event | None = None,
) -> str | tuple[str, SteeringTrace]:
    """The whole steered answer, with the steering applied by NNsight interventions (older API).

    Same arguments and meaning as `stream_steered_answer_hf`; under greedy decoding
    both return the same tokens. With `return_trace=True` it returns
    `(answer, SteeringTrace)`: the projection on each component's direction before
    and after its edit, at every prompt and answer position. Setting the `cancel`
    event from another thread ends the generation after the current token; the call
    then returns the answer so far.

        >>> answer, trace = generate_steered_answer_nnsight(model, tok, chat, [comp], return_trace=True)
        >>> trace.components[0].after[-1]
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                  repetition_penalty=repetition_penalty, steer_prompt=steer_prompt,
                                  clamp_intensity=clamp_intensity, trace=return_trace)
    result = NNsightBackend(model, tokenizer).generate(chat, components, settings, cancel)
    return (result.text, result.trace) if return_trace else result.text


# The older name (it is the NNsight backend, beside generate_steered_answer_hf): kept for users' code.
generate_steered_answer = generate_steered_answer_nnsight
