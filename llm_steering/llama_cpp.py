"""llama.cpp in this process, through its own C API: a GGUF model steered by a control vector.

llama.cpp comes from the prebuilt CPU wheel `xllamacpp` (pinned in requirements-dev.txt; no compiler
needed). Its one shared object carries the whole llama.cpp and ggml C API, which this module calls
with ctypes: the same `llama_set_adapter_cvec`, `llama_decode` and `gguf_*` functions that `llama-cli`
and `llama-server` run. It is what the tests and benchmarks/bench_llamacpp.py check exported control
vectors with; users run the same file with `llama-cli --control-vector`.

    >>> llm = LlamaCpp(embedded_gguf_path())
    >>> llm.set_control_vector("eiffel.gguf")                   # as --control-vector eiffel.gguf
    >>> llm.detokenize(llm.generate(ids, max_tokens=64, repeat_penalty=1.1))

Only scalars, pointers and `llama_batch` cross by value with a layout written here. The two parameter
structs are taken from llama.cpp's own `*_default_params()` and handed back whole (as opaque blocks
larger than any version's struct); the three context fields set here (n_ctx, n_batch, n_ubatch, which lead
the struct) are written only after the fourth reads as the default n_seq_max of 1, so a llama.cpp whose layout
moved fails loudly instead of misreading.
"""

from __future__ import annotations

import ctypes
import functools
import os
from importlib.util import find_spec
from pathlib import Path

import numpy as np

c_int32, c_float, c_void_p = ctypes.c_int32, ctypes.c_float, ctypes.c_void_p


class _Params(ctypes.Structure):
    """An opaque parameter struct (llama_model_params / llama_context_params), larger than either: passed
    and returned in memory either way (over 16 bytes), so llama.cpp reads and writes only its own prefix."""

    _fields_ = [("words", ctypes.c_uint32 * 512)]


class _Batch(ctypes.Structure):  # llama.h: struct llama_batch
    _fields_ = [("n_tokens", c_int32), ("token", ctypes.POINTER(c_int32)), ("embd", ctypes.POINTER(c_float)),
                ("pos", ctypes.POINTER(c_int32)), ("n_seq_id", ctypes.POINTER(c_int32)),
                ("seq_id", ctypes.POINTER(ctypes.POINTER(c_int32))), ("logits", ctypes.POINTER(ctypes.c_int8))]


class _GgufInitParams(ctypes.Structure):  # gguf.h: struct gguf_init_params
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", c_void_p)]


_SIGNATURES = {
    "llama_backend_init": (None, []),
    "llama_log_set": (None, [c_void_p, c_void_p]),
    "llama_model_default_params": (_Params, []),
    "llama_context_default_params": (_Params, []),
    "llama_model_load_from_file": (c_void_p, [ctypes.c_char_p, _Params]),
    "llama_init_from_model": (c_void_p, [c_void_p, _Params]),
    "llama_model_free": (None, [c_void_p]),
    "llama_set_n_threads": (None, [c_void_p, c_int32, c_int32]),
    "llama_free": (None, [c_void_p]),
    "llama_model_n_embd": (c_int32, [c_void_p]),
    "llama_model_n_layer": (c_int32, [c_void_p]),
    "llama_model_get_vocab": (c_void_p, [c_void_p]),
    "llama_vocab_n_tokens": (c_int32, [c_void_p]),
    "llama_vocab_is_eog": (ctypes.c_bool, [c_void_p, c_int32]),
    "llama_set_adapter_cvec": (c_int32, [c_void_p, ctypes.POINTER(c_float), ctypes.c_size_t, c_int32, c_int32, c_int32]),
    "llama_get_memory": (c_void_p, [c_void_p]),
    "llama_memory_clear": (None, [c_void_p, ctypes.c_bool]),
    "llama_batch_init": (_Batch, [c_int32, c_int32, c_int32]),
    "llama_batch_free": (None, [_Batch]),
    "llama_decode": (c_int32, [c_void_p, _Batch]),
    "llama_get_logits_ith": (ctypes.POINTER(c_float), [c_void_p, c_int32]),
    "llama_detokenize": (c_int32, [c_void_p, ctypes.POINTER(c_int32), c_int32, ctypes.c_char_p, c_int32,
                                   ctypes.c_bool, ctypes.c_bool]),
    "gguf_init_from_file": (c_void_p, [ctypes.c_char_p, _GgufInitParams]),
    "gguf_free": (None, [c_void_p]),
    "gguf_get_n_tensors": (ctypes.c_int64, [c_void_p]),
    "gguf_get_data_offset": (ctypes.c_size_t, [c_void_p]),
    "gguf_get_tensor_name": (ctypes.c_char_p, [c_void_p, ctypes.c_int64]),
    "gguf_get_tensor_offset": (ctypes.c_size_t, [c_void_p, ctypes.c_int64]),
    "gguf_get_tensor_type": (ctypes.c_int, [c_void_p, ctypes.c_int64]),
}


_QUIET = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, c_void_p)(lambda level, text, data: None)


@functools.cache
def library() -> ctypes.CDLL:
    """llama.cpp's C API from the xllamacpp wheel's shared object, with the signatures this module uses."""
    spec = find_spec("xllamacpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llama.cpp is not installed: pip install xllamacpp==2026.10.11549 (a prebuilt CPU wheel, "
                          "requirements-dev.txt)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    lib = ctypes.CDLL(str(next(folder.glob("xllamacpp*.so"))))
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    lib.llama_log_set(ctypes.cast(_QUIET, c_void_p), None)  # llama.cpp and ggml log to stderr by default
    lib.llama_backend_init()
    return lib


def gguf_tensors(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(name, ggml type, absolute byte offset) of every tensor in a GGUF file, as llama.cpp's own GGUF
    reader (ggml's `gguf_init_from_file`) finds them."""
    lib = library()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
    if not ctx:
        raise ValueError(f"llama.cpp could not read {path} as GGUF")
    try:
        base = lib.gguf_get_data_offset(ctx)
        return [(lib.gguf_get_tensor_name(ctx, i).decode(), lib.gguf_get_tensor_type(ctx, i),
                 base + lib.gguf_get_tensor_offset(ctx, i)) for i in range(lib.gguf_get_n_tensors(ctx))]
    finally:
        lib.gguf_free(ctx)


class LlamaCpp:
    """One llama.cpp model and context (one sequence) on the CPU; greedy decoding over its logits."""

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 1024, n_threads: int = 2) -> None:
        self._lib = lib = library()
        if not Path(gguf_path).is_file():
            raise FileNotFoundError(f"no GGUF model at {gguf_path}")
        self._ctx = self._model = None
        self._model = lib.llama_model_load_from_file(str(gguf_path).encode(), lib.llama_model_default_params())
        if not self._model:
            raise ValueError(f"llama.cpp could not load {gguf_path}")
        cparams = lib.llama_context_default_params()
        n_batch, n_ubatch, n_seq_max = cparams.words[1:4]
        if not (n_seq_max == 1 and 0 < n_ubatch <= n_batch):  # n_ctx, n_batch, n_ubatch, n_seq_max lead the struct
            lib.llama_model_free(self._model)
            raise RuntimeError(f"this llama.cpp's llama_context_params does not begin as expected: "
                               f"{list(cparams.words[:4])}")
        cparams.words[0:3] = [n_ctx, n_ctx, n_ctx]  # n_ctx, n_batch, n_ubatch: a whole prompt in one pass
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise RuntimeError("llama.cpp could not create a context")
        lib.llama_set_n_threads(self._ctx, n_threads, n_threads)
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_ctx = n_ctx
        self.n_embd = int(lib.llama_model_n_embd(self._model))
        self.n_layer = int(lib.llama_model_n_layer(self._model))
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))

    def set_control_vector(self, path: str | os.PathLike | None, scale: float = 1.0) -> None:
        """Steer with a control-vector file as `--control-vector-scaled FILE scale` does (blocks 1 to
        n_layer, placed by llama.cpp's own loader's rule); `None` removes it. Empties the cache."""
        from llm_steering.control_vector import llama_cpp_buffer

        if path is None:
            rc = self._lib.llama_set_adapter_cvec(self._ctx, None, 0, self.n_embd, -1, -1)
        else:
            buf = np.ascontiguousarray(llama_cpp_buffer(path, self.n_embd, self.n_layer, scale), dtype=np.float32)
            rc = self._lib.llama_set_adapter_cvec(self._ctx, buf.ctypes.data_as(ctypes.POINTER(c_float)), buf.size,
                                                  self.n_embd, 1, self.n_layer)  # llama.cpp copies the buffer
        if rc != 0:
            raise ValueError(f"llama.cpp refused the control vector {path} (code {rc})")
        self.reset()

    def reset(self) -> None:
        """Forget every cached key and value (the next call starts at position 0)."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> None:
        if not ids or start + len(ids) > self.n_ctx:
            raise ValueError(f"{start + len(ids)} tokens do not fit the context of {self.n_ctx}")
        batch = self._lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, tok in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(tok), start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == len(ids) - 1 else 0
            rc = self._lib.llama_decode(self._ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
        finally:
            self._lib.llama_batch_free(batch)

    def _row(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,)).copy()

    def logits(self, ids: list[int]) -> np.ndarray:
        """The next-token logits at every position of `ids`, from an empty cache: [len(ids), n_vocab] float32."""
        self.reset()
        self._decode(ids, 0, all_logits=True)
        return np.stack([self._row(i) for i in range(len(ids))])

    def generate(self, ids: list[int], max_tokens: int, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64) -> list[int]:
        """Greedy answer to the prompt `ids` (from an empty cache), stopping at an end-of-generation token.
        The repetition penalty is llama.cpp's (`--repeat-penalty`, `--repeat-last-n`): a logit of a token
        among the last `repeat_last_n` (prompt included) is divided by it if positive, else multiplied."""
        self.reset()
        self._decode(ids, 0, all_logits=False)
        seen, out = list(ids), []
        while len(out) < max_tokens:
            row = self._row(-1)
            if repeat_penalty != 1.0 and repeat_last_n:
                recent = np.unique(np.asarray(seen[-repeat_last_n:]))
                row[recent] = np.where(row[recent] > 0, row[recent] / repeat_penalty, row[recent] * repeat_penalty)
            tok = int(row.argmax())
            if self._lib.llama_vocab_is_eog(self._vocab, tok):
                break
            out.append(tok)
            seen.append(tok)
            self._decode([tok], len(ids) + len(out) - 1, all_logits=False)
        return out

    def detokenize(self, ids: list[int]) -> str:
        """The text of `ids` as llama.cpp's own vocabulary writes it (special tokens left out)."""
        size = 16 * len(ids) + 16
        buf = ctypes.create_string_buffer(size)
        arr = (c_int32 * len(ids))(*[int(t) for t in ids])
        n = self._lib.llama_detokenize(self._vocab, arr, len(ids), buf, size, True, False)
        if n < 0:
            raise RuntimeError("llama.cpp could not detokenize")
        return buf.raw[:n].decode("utf-8", errors="replace")

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_free(self._ctx)
        if self._model:
            self._lib.llama_model_free(self._model)
        self._ctx = self._model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter shutdown the library may be gone
            pass
