"""The one timing line ``generate`` and ``chat`` end with, after llama.cpp's load, prompt-eval and eval timings.

    [load 2.41 s | prompt 14 tokens in 0.31 s, 45.2 tok/s | generated 60 tokens in 2.95 s, 20.0 tok/s]

load: reading the checkpoint and making the model. prompt: the forward pass over the prompt
tokens (every row's, for a batch), which also gives each answer's first token. generated: every
answer token; its tok/s counts the tokens after each answer's first over the time after it, one
decoding step each (llama.cpp's "eval"), so the two rates are the two phases' speeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Timing:
    load_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    generated: int = 0
    decoded: int = 0          # generated tokens after each answer's first: one decoding step each
    decode_s: float = 0.0

    def add(self, generation, prompt_tokens: int | None = None) -> None:
        """Count one npllama.generate.Generation (consumed, stopped or interrupted).

        prompt_tokens: the tokens its forward pass read (default: every row's prompt_lengths, which
        is right when no cache held tokens before)."""
        now = time.perf_counter()
        first = generation.first_at if generation.first_at is not None else now
        self.prompt_tokens += sum(generation.prompt_lengths) if prompt_tokens is None else prompt_tokens
        self.prompt_s += first - generation.started
        made = [len(t) for t in generation.tokens]
        self.generated += sum(made)
        self.decoded += sum(n - 1 for n in made if n)
        self.decode_s += (generation.last_at or first) - first

    def line(self) -> str:
        def rate(n: int, s: float) -> str:
            return f", {n / s:.1f} tok/s" if s > 0 and n else ""
        return (f"[load {self.load_s:.2f} s | prompt {self.prompt_tokens} tokens in {self.prompt_s:.2f} s"
                f"{rate(self.prompt_tokens, self.prompt_s)} | generated {self.generated} tokens in "
                f"{self.decode_s:.2f} s{rate(self.decoded, self.decode_s)}]")
