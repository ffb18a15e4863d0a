"""Decoding with a KV cache: prefill, jitted decode steps, sampling and beam search, loading a run to decode."""

from generation.decoding import Decoder, decode_config
from generation.sampling import Sampling
from generation.search import Completion, beam_search, generate

__all__ = ["Completion", "Decoder", "Sampling", "beam_search", "decode_config", "generate"]
