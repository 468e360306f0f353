"""The Block/Full AttnRes schedule of SPEC §3, checked source by source.

Sublayer ``i`` outputs the basis vector ``e_{i+1}`` and the embedding is ``e_0``. With random
pseudo-queries every source gets its own softmax weight, and all basis vectors summed into one
source share it, so the read's *output* reveals the sources: the coefficients of the basis vectors,
grouped by equal value. This observes the scheme only through its public interface, whatever read
implementation it uses.
"""

from __future__ import annotations

import pytest
import torch

from attnres.model import ModelConfig, Transformer
from attnres.residuals import ResidualConfig, build_residual


def expected_sources(read: int, block_size: int) -> list[set[int]]:
    """SPEC §3 restated: the embedding, then outputs ``0 … read-1`` cut into consecutive chunks of S.

    Ids: ``-1`` is the embedding, ``i`` is sublayer ``i``'s output.
    """
    chunks = [set(range(s, min(s + block_size, read))) for s in range(0, read, block_size)]
    return [{-1}, *chunks]


def decode(h: torch.Tensor) -> list[set[int]]:
    """Group the ids present in a read output ``[1, 1, d]`` by their (shared) coefficient."""
    coef = h.flatten().double()
    present = [j for j in range(len(coef)) if coef[j] != 0]
    groups: list[tuple[float, set[int]]] = []
    for j in present:
        for value, members in groups:
            if abs(coef[j].item() - value) <= 1e-6 * abs(value):
                members.add(j - 1)
                break
        else:
            groups.append((coef[j].item(), {j - 1}))
    return sorted((m for _, m in groups), key=min)


def observed_sources(L: int, block_size: int) -> list[list[set[int]]]:
    d = L + 1
    scheme = build_residual(ResidualConfig("block", block_size=block_size), d, L)
    with torch.no_grad():
        scheme.query.copy_(
            torch.randn(scheme.query.shape, generator=torch.Generator().manual_seed(L * 31 + block_size))
        )
    basis = torch.eye(d).view(d, 1, 1, d)
    seen: list[list[set[int]]] = []
    state = scheme.init_state(basis[0])
    for layer in range(L):
        seen.append(decode(scheme.layer_input(state, layer)))
        state = scheme.update(state, layer, basis[layer + 1])
    seen.append(decode(scheme.final(state)))
    return seen


@pytest.mark.parametrize("L", [4, 6, 7])
@pytest.mark.parametrize("S", [1, 2, 3, 4, "L", "L+1"])
def test_every_read_sees_the_spec_sources(L: int, S: int | str) -> None:
    block_size = {"L": L, "L+1": L + 1}.get(S, S)
    seen = observed_sources(L, block_size)
    assert len(seen) == L + 1  # L sublayer reads and the final read
    for read, sources in enumerate(seen):
        assert sources == expected_sources(read, block_size), f"read {read}"


def test_full_reads_every_output_separately() -> None:
    """S = 1 is Full AttnRes (paper Eq. 2–4): sublayer l reads [v_0, v_1, …, v_l]."""
    for read, sources in enumerate(observed_sources(6, 1)):
        assert sources == [{-1}] + [{i} for i in range(read)]


def test_source_count_bound() -> None:
    """At most ceil(L/S) + 1 sources per read (blocks plus embedding, the partial included)."""
    for L, S in [(7, 2), (8, 3), (16, 4)]:
        assert max(len(s) for s in observed_sources(L, S)) <= -(-L // S) + 1


def test_block_size_one_equals_full_exactly() -> None:
    torch.manual_seed(0)
    full = Transformer(ModelConfig(d_model=32, n_layers=3, n_heads=2, residual=ResidualConfig("full")))
    block = Transformer(
        ModelConfig(d_model=32, n_layers=3, n_heads=2, residual=ResidualConfig("block", block_size=1))
    )
    with torch.no_grad():
        full.residual.query.normal_()
    block.load_state_dict(full.state_dict())
    tokens = torch.randint(0, 256, (2, 9))
    assert torch.equal(full(tokens), block(tokens))


def test_default_block_size_is_about_eight_blocks() -> None:
    scheme = build_residual(ResidualConfig("block"), 8, 32)
    assert scheme.block_size == 4
    assert build_residual(ResidualConfig("block"), 8, 12).block_size == 2
