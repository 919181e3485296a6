"""The traced module: flat tensors in, flat tensors out, in the graph's I/O order (DESIGN.md §6)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.export import Dim

from hybridtrt.exporter.io import DYNAMIC_CACHE, CacheFlavour, StateSpec, state_specs
from hybridtrt.models.cache import HybridCache
from hybridtrt.models.model import HybridLM

_CACHE_FIELD = {"conv": "conv", "ssm": "ssm", "key": "key", "value": "value"}


def cache_from_flat(specs: list[StateSpec], tensors: tuple[Tensor, ...] | list[Tensor]) -> HybridCache:
    """Flat states in graph order -> `HybridCache`."""
    cache = HybridCache()
    for spec, t in zip(specs, tensors, strict=True):
        getattr(cache, _CACHE_FIELD[spec.kind])[spec.layer] = t
    return cache


def flat_from_cache(specs: list[StateSpec], cache: HybridCache) -> list[Tensor]:
    """`HybridCache` -> flat states in graph order."""
    return [getattr(cache, _CACHE_FIELD[s.kind])[s.layer] for s in specs]


class GraphModule(nn.Module):
    """The function a graph computes, with the graph's flat I/O.

    Dynamic flavour: ``forward(input_ids, attention_mask, *past_states)``; static flavour:
    ``forward(input_ids, cache_position, padding_length, *past_states)``. Both return
    ``(logits, *present_states[, *layer_outputs][, last_hidden_state])``.

    Args:
        model: The reference model (its parameters become the graph's initializers, named
            ``model.<parameter>``).
        logits: ``"last"`` -> ``[B, V]``; ``"all"`` -> ``[B, L, V]``.
        decode: Build the decode-only graph (one token, ``mamba2_state_update``) instead of the
            unified one (``mamba2_chunk_scan`` for every L).
        per_layer: Also output each decoder layer's hidden states ``layer_output.{i} [B, L, hidden]``.
        flavour: KV-cache flavour (`hybridtrt.exporter.io.CacheFlavour`).
        hidden: Also output the final hidden states after ``norm_f`` ``[B, L, hidden]`` (speculative
            exports: the MTP head's input).
    """

    def __init__(
        self,
        model: HybridLM,
        logits: Literal["last", "all"] = "last",
        decode: bool = False,
        per_layer: bool = False,
        flavour: CacheFlavour = DYNAMIC_CACHE,
        hidden: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.logits = logits
        self.decode = decode
        self.per_layer = per_layer
        self.flavour = flavour
        self.hidden = hidden
        self.specs = state_specs(model.config, flavour)

    def forward(self, input_ids: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        if self.flavour.static:
            cache_position, padding_length, *states = inputs
            cache = cache_from_flat(self.specs, states)
            out = self.model.forward_static(
                input_ids, cache_position, padding_length, cache, logits=self.logits, use_update=self.decode, output_hidden_states=self.per_layer
            )
        else:
            attention_mask, *states = inputs
            cache = cache_from_flat(self.specs, states)
            out = self.model._forward(input_ids, attention_mask, cache, self.logits, self.decode, self.per_layer)
        return (out.logits, *flat_from_cache(self.specs, out.cache), *out.hidden_states, *([out.last_hidden] if self.hidden else []))

    def dynamic_shapes(self) -> tuple:
        """``dynamic_shapes`` for ``torch.export`` matching `forward`'s inputs: batch always,
        ``seq`` unless decode-only, ``past`` on a dynamic KV cache; the static capacity is fixed."""
        auto = Dim.AUTO
        grows = not self.flavour.static
        states = tuple({0: auto, 2: auto} if grows and s.kind in ("key", "value") else {0: auto} for s in self.specs)
        ids = {0: auto} if self.decode else {0: auto, 1: auto}
        positions = ({0: auto}, {0: auto}) if self.flavour.static else ({0: auto, 1: auto},)
        return (ids, (*positions, *states))  # forward(input_ids, *inputs)


def example_inputs(
    model: HybridLM,
    *,
    batch: int = 2,
    seq: int = 5,
    past: int = 3,
    state_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    flavour: CacheFlavour = DYNAMIC_CACHE,
) -> tuple[Tensor, ...]:
    """Realistic example inputs: states from an actual prefill of ``past`` tokens (so a verification
    run compares meaningful numbers), and ``seq`` new tokens on top. For the static flavour the
    prefilled KV sits at the start of zero buffers of ``flavour.max_cache_len`` positions."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    with torch.no_grad():
        cache = model.new_cache(batch, state_dtype)
        if past:
            # The prefill only reads the zero SSM states: stride-0 views of one zero hold no memory
            # while it builds the new ones (a verification by layer windows holds no more than that).
            cache.ssm = {i: t.new_zeros(()).expand(t.shape) for i, t in cache.ssm.items()}
            cache = model(torch.randint(0, vocab, (batch, past), generator=gen), cache=cache, logits="last").cache
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    if not flavour.static:
        mask = torch.ones(batch, past + seq, dtype=torch.int64)
        return (ids, mask, *flat_from_cache(state_specs(model.config), cache))
    for layer in cache.key:
        for field in (cache.key, cache.value):
            t = field[layer]
            buf = torch.zeros(*t.shape[:2], flavour.max_cache_len, t.shape[3], dtype=t.dtype)
            buf[:, :, :past] = t
            field[layer] = buf
    positions = (torch.full((batch,), past, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64))
    return (ids, *positions, *flat_from_cache(state_specs(model.config, flavour), cache))
