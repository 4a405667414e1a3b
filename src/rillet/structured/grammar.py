"""Compile a `StructuredOutputs` into an llguidance grammar for one tokenizer, once per spec.

`grammar_compiler(tokenizer)` gives the compiler of a Hugging Face tokenizer (its llguidance
tokenizer is built once, ~0.4 s); `GrammarCompiler.compile(spec)` validates the grammar against
that tokenizer and keeps it in a bounded LRU cache, so equal specs (StructuredOutputs compares
by value, JSON schemas as canonical text) compile once. A spec that does not compile raises
ValueError naming the problem: the front end turns it into a 400 at admission
(`AsyncEngine.add_request`), before the request reaches the engine core.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# llguidance computes masks on its own rayon pool, one thread per core by default. Beside the
# kernels' OpenMP team that oversubscribes a small CPU: on 2 cores under load, constrained
# requests took 30-65 s instead of ~1 s. rillet fills masks on one worker thread of its own
# (structured/matcher.py), so one rayon thread is all it needs. Set before the pool exists.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import llguidance  # noqa: E402
import llguidance.hf  # noqa: E402

from rillet.structured.spec import StructuredOutputs
from rillet.structured.tighten import tighten

logger = logging.getLogger(__name__)

CACHE_SIZE = 256
# No free whitespace: small models given `[ \n\t]*` between tokens tend to emit runs of newlines
# instead of closing the object; compact separators keep the output short and always valid.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def grammar_text(spec: StructuredOutputs, tightened: bool = True) -> str:
    """The llguidance grammar (its JSON form) of a spec; not yet checked (see GrammarCompiler).
    A JSON schema is `tighten`ed first unless `tightened` is False."""
    try:
        spec.validate()
    except json.JSONDecodeError as exc:  # a hand-built spec (from_schema always makes JSON)
        raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
    kind = spec.kind
    matcher = llguidance.LLMatcher
    if kind == "json":
        try:  # objects closed and numbers bounded, as llama.cpp (objects: also xgrammar) reads them
            schema = json.loads(spec.json or "")
            return matcher.grammar_from_json_schema(tighten(schema) if tightened else schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise ValueError(f"invalid JSON schema: {exc}") from None
    if kind == "json_object":
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return matcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        # Lark string literals read JSON string escapes, so any text is one exact literal.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return matcher.grammar_from_lark(f"start: {alternatives}")
    return matcher.grammar_from_lark(spec.grammar)


@dataclass
class CompiledGrammar:
    """A grammar known to compile for the compiler's tokenizer. `new_matcher()` gives a fresh
    matcher at the start of the output (a copy of one built at compile time: copying skips
    re-parsing the grammar)."""

    spec: StructuredOutputs
    grammar: str
    compile_s: float
    warnings: list[str]
    _template: llguidance.LLMatcher
    vocab_size: int  # the tokenizer's: ids at or past it are never allowed

    def new_matcher(self) -> llguidance.LLMatcher:
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles specs for one tokenizer; thread-safe (the front end compiles off the event loop
    from several threads at once)."""

    def __init__(self, tokenizer: Any, eos_token_ids: list[int] | None = None, cache_size: int = CACHE_SIZE):
        start = time.perf_counter()
        eos = list(eos_token_ids) if eos_token_ids else None
        # The matcher allows these tokens where the grammar may end; several EOS ids (an
        # instruct model's end-of-turn and end-of-text) are all allowed there.
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos)
        self.vocab_size = self.ll_tokenizer.vocab_size
        self.tokenizer_s = time.perf_counter() - start
        self.cache_size = cache_size
        self._cache: OrderedDict[StructuredOutputs, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def compile(self, spec: StructuredOutputs) -> CompiledGrammar:
        """The compiled grammar of `spec`, from the cache when compiled before. ValueError names
        what is wrong with a spec that does not compile (bad schema, regex or grammar)."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                return compiled
        compiled = self._compile(spec)  # outside the lock: a slow grammar must not hold up others
        with self._lock:
            self.misses += 1
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputs) -> CompiledGrammar:
        start = time.perf_counter()
        grammar = grammar_text(spec)
        # The constructor never raises for a bad grammar: it leaves the matcher in its error state.
        template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if template.is_error() and spec.kind == "json":  # a bound tighten added that llguidance cannot
            grammar = grammar_text(spec, tightened=False)  # build (a float range to 1e300): as given
            template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if template.is_error():
            raise ValueError(f"the {_KIND_NAMES[spec.kind]} does not compile: {_shorten(template.get_error())}")
        elapsed = time.perf_counter() - start
        logger.debug("compiled %s grammar (%d chars) in %.1f ms", spec.kind, len(grammar), elapsed * 1e3)
        return CompiledGrammar(spec, grammar, elapsed, template.get_grammar_warnings(), template, self.vocab_size)

    def contains(self, spec: StructuredOutputs) -> bool:
        with self._lock:
            return spec in self._cache

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max_size": self.cache_size}


_KIND_NAMES = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
               "choice": "choice", "grammar": "grammar"}
MAX_ERROR_CHARS = 500


def _shorten(message: str) -> str:
    """llguidance's message, cut to a readable length (it may quote a long grammar)."""
    message = message.strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + " ..."


_compilers: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], GrammarCompiler]] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()  # the registry only: held for dict operations, never while building
_build_lock = threading.Lock()  # one build at a time (~0.4 s each, once per tokenizer)


def grammar_compiler(tokenizer: Any, eos_token_ids: list[int] | None = None) -> GrammarCompiler:
    """The compiler of `tokenizer` (a fast Hugging Face tokenizer), built on first use and shared
    by every caller with the same tokenizer object and EOS ids."""
    key = tuple(sorted(eos_token_ids or ()))

    def registered() -> GrammarCompiler | None:
        with _compilers_lock:
            return _compilers.get(tokenizer, {}).get(key)

    compiler = registered()
    if compiler is None:
        with _build_lock:
            compiler = registered()
            if compiler is None:
                compiler = GrammarCompiler(tokenizer, eos_token_ids)
                with _compilers_lock:
                    _compilers.setdefault(tokenizer, {})[key] = compiler
    return compiler


def is_compiled(tokenizer: Any, eos_token_ids: list[int] | None, spec: StructuredOutputs) -> bool:
    """Whether `spec` is in the cache of `tokenizer`'s compiler (a check that never compiles,
    never builds a compiler, so it may run on the event loop)."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer, {}).get(tuple(sorted(eos_token_ids or ())))
    return compiler is not None and compiler.contains(spec)
