"""Multi-stream residuals: Hyper-Connections (``hc``), mHC (``mhc``) and mHC-lite (``mhc_lite``).

The stream is ``H [B, T, m, d]``: ``m = residual.n_streams`` copies of the hidden state. Every
sublayer computes, per token, read weights ``r [m]``, a mixing matrix ``M [m, m]`` and write
weights ``w [m]`` from ``H``, and::

    x     = Σ_s r_s H_s                    (the sublayer's input; its own pre-norm follows)
    H'_i  = Σ_j M_ij H_j + w_i · f(x)      (row i of M says what stream i gathers)

Expand: the embedding is copied into every stream. Reduce: the streams are averaged before the
final norm. The papers sum; after the final RMSNorm the two differ only through its epsilon, and
the mean makes every variant here equal PreNorm at init exactly (**our choice**).

All three start as PreNorm (tests pin it): the streams start identical, every read's weights sum
to 1, every write weight is 1 and every row of ``M`` sums to 1, so they stay identical.
The coefficient maths runs in fp32 (mHC keeps it there: its eps are near fp16's resolution), with
autocast off, and the streams keep the stream dtype (``attnres.residuals.base``): fp32 under
autocast, where a sublayer output enters them upcast.

HC's paper rescales the output projections' init by ``sqrt(m)``. We keep the model's shared init
for every variant (**our choice**): the comparison then starts from identical weights, and the
mean reduce already keeps the final scale.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnres.ops.precision import no_autocast
from attnres.residuals.base import ResidualConfig, ResidualScheme, check_at_least, check_eps, to_stream
from attnres.residuals.registry import register


@dataclass
class StreamOptions(ResidualConfig):
    """Options of every multi-stream variant (``mhc_lite`` has only these).

    Attributes:
        n_streams: residual streams ``m`` (``mhc_lite`` allows at most 5: it mixes ``m!``
            permutations).
        dynamic: add the input-dependent part of the connection weights to the static part.
    """

    variant: str = "mhc_lite"
    n_streams: int = 4
    dynamic: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, "n_streams")


@dataclass
class HCOptions(StreamOptions):
    """Options of Hyper-Connections: those of :class:`StreamOptions`, and the norm's epsilon.

    Attributes:
        eps: epsilon of the RMSNorm of the streams in the dynamic weights.
    """

    variant: str = "hc"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_eps(self)


@dataclass
class MHCOptions(StreamOptions):
    """Options of mHC: those of :class:`StreamOptions`, and the Sinkhorn iterations.

    Attributes:
        sinkhorn_iters: Sinkhorn-Knopp iterations (paper: 20).
    """

    variant: str = "mhc"
    sinkhorn_iters: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, "sinkhorn_iters")


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits) [..., m, m]`` towards a doubly stochastic matrix.

    fp32 (or the input's precision if higher) throughout. Each iteration normalises the columns,
    then the rows (mHC Eq. 9), so the rows sum to 1 exactly (the forward gain is conserved) and the
    columns approximately. Near-identity inputs converge slowly (see tests/residuals/test_hyper.py).
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    m = torch.exp(x - x.amax(dim=(-2, -1), keepdim=True))  # the scale cancels in the first normalisation
    # A column ~100 below the largest logit underflows to zeros: dividing by the smallest normal
    # number instead of 0 keeps it 0 (not NaN) and changes nothing when no sum underflows.
    tiny = torch.finfo(m.dtype).tiny
    for _ in range(iters):
        m = m / m.sum(-2, keepdim=True).clamp_min(tiny)
        m = m / m.sum(-1, keepdim=True).clamp_min(tiny)
    return m


def permutation_matrices(n: int) -> Tensor:
    """All ``n!`` permutation matrices ``[n!, n, n]`` in ``itertools.permutations`` order; index 0 is I."""
    perms = torch.tensor(list(itertools.permutations(range(n))))  # [n!, n]
    return F.one_hot(perms, n).float()  # row i of P_k has its 1 in column perm_k[i]


class StreamScheme(ResidualScheme):
    """Shared expand / read / write / reduce of the multi-stream variants."""

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int) -> None:
        super().__init__(cfg, d_model, n_sublayers)
        self.n_streams = cfg.n_streams

    def coefficients(self, state: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(read [B, T, m], mix [B, T, m, m], write [B, T, m])`` of sublayer ``layer``, in fp32
        (or the stream's precision if higher)."""
        raise NotImplementedError

    @staticmethod
    def compute_dtype(state: Tensor) -> torch.dtype:
        """fp32, or the stream's dtype when it is wider (fp64 tests)."""
        return torch.promote_types(state.dtype, torch.float32)

    def init_state(self, embedding: Tensor) -> Tensor:
        return embedding.unsqueeze(-2).expand(*embedding.shape[:-1], self.n_streams, self.d_model)

    @no_autocast  # coefficients and mixing in fp32 / the stream dtype, not autocast's bf16/fp16
    def layer_input(self, state: Tensor, layer: int) -> Tensor:
        read, _, _ = self.coefficients(state, layer)
        return torch.einsum("...s,...sd->...d", read.to(state.dtype), state)

    @no_autocast
    def update(self, state: Tensor, layer: int, out: Tensor) -> Tensor:
        # The coefficients are recomputed rather than cached from layer_input, so update stays a
        # pure function of its arguments (safe under activation recomputation).
        _, mix, write = self.coefficients(state, layer)
        mixed = torch.einsum("...ij,...jd->...id", mix.to(state.dtype), state)  # [B, T, m, d]
        return mixed + write.to(state.dtype).unsqueeze(-1) * to_stream(out, state).unsqueeze(-2)

    def final(self, state: Tensor) -> Tensor:
        return state.mean(-2)

    def extra_repr(self) -> str:
        return f"n_streams={self.n_streams}, dynamic={self.cfg.dynamic}"


@register("hc")
class HyperConnections(StreamScheme):
    """Hyper-Connections (Zhu et al., ICLR 2025), static + dynamic (DHC; ``dynamic=False``: SHC).

    Per sublayer ``l`` (parameters stacked over ``L``), with ``H̄ = rmsnorm(H) ⊙ γ`` per stream:

        read  = s_α · tanh(H̄ W_r) + A_m          A_m = e_{l mod m} at init (one-hot)
        A_r   = s_α · tanh(H̄ W_A) + A_r⁰         A_r⁰ = I; row s comes from stream s; mix = A_rᵀ
        write = s_β · tanh(H̄ W_b) + B            B = 1

    ``W_*`` are zero and ``s_α = s_β = 0.01`` at init (paper §2.3). The static parts should get
    no weight decay (paper §4); that is the optimiser's choice.
    """

    options = HCOptions

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int) -> None:
        super().__init__(cfg, d_model, n_sublayers)
        L, m, d = n_sublayers, self.n_streams, d_model
        self.static_read = nn.Parameter(torch.zeros(L, m))
        self.static_mix = nn.Parameter(torch.zeros(L, m, m))
        self.static_write = nn.Parameter(torch.zeros(L, m))
        if cfg.dynamic:
            self.norm_gain = nn.Parameter(torch.ones(L, d))
            self.dyn_read = nn.Parameter(torch.zeros(L, d))
            self.dyn_mix = nn.Parameter(torch.zeros(L, d, m))
            self.dyn_write = nn.Parameter(torch.zeros(L, d))
            self.scale_alpha = nn.Parameter(torch.zeros(L))
            self.scale_beta = nn.Parameter(torch.zeros(L))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        L, m = self.n_sublayers, self.n_streams
        with torch.no_grad():
            self.static_read.copy_(F.one_hot(torch.arange(L) % m, m).float())
            self.static_mix.copy_(torch.eye(m).expand(L, m, m))
            nn.init.ones_(self.static_write)
            if self.cfg.dynamic:
                nn.init.ones_(self.norm_gain)
                for p in (self.dyn_read, self.dyn_mix, self.dyn_write):
                    nn.init.zeros_(p)
                nn.init.constant_(self.scale_alpha, 0.01)
                nn.init.constant_(self.scale_beta, 0.01)

    def coefficients(self, state: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        dt = self.compute_dtype(state)
        read, mix, write = (p[layer].to(dt) for p in (self.static_read, self.static_mix, self.static_write))
        if self.cfg.dynamic:
            gain = self.norm_gain[layer].to(dt)
            hbar = F.rms_norm(state.to(dt), (self.d_model,), gain, self.cfg.eps)  # [B, T, m, d]
            s_a, s_b = self.scale_alpha[layer].to(dt), self.scale_beta[layer].to(dt)
            read = s_a * torch.tanh(hbar @ self.dyn_read[layer].to(dt)) + read  # [B, T, m]
            mix = s_a * torch.tanh(hbar @ self.dyn_mix[layer].to(dt)) + mix  # [B, T, m(s), m(t)]
            write = s_b * torch.tanh(hbar @ self.dyn_write[layer].to(dt)) + write  # [B, T, m]
        else:
            lead = state.shape[:-2]
            read, mix, write = read.expand(*lead, -1), mix.expand(*lead, -1, -1), write.expand(*lead, -1)
        return read, mix.transpose(-1, -2), write


class ManifoldScheme(StreamScheme):
    """mHC's coefficient path (Xie et al., 2025, Eq. 7-8, fused form Eq. 14-19), per sublayer:

        x     = vec(H) ∈ R^{m·d}, r = ||x|| / sqrt(m·d)          (fp32, eps 1e-20 as the paper)
        z     = α ⊙ (x φ) / r + b                                (1/r after the matmul, b after)
        read  = σ(z_pre),   write = 2σ(z_post),   mix = P(z_res)

    ``α`` is three scalars (pre, post, res), 0.01 at init. The paper leaves ``φ`` and ``b``
    unstated; **our choice** (research/baselines.md §6, "recommended PreNorm-equivalent init"):
    ``φ = 0``, ``b_pre = logit(1/m)`` (uniform reads summing to 1), ``b_post = 0`` (writes of 1),
    and ``b_res`` from the subclass so that ``mix ≈ I``. No tanh. DeepSeek's kernel adds 1e-6 to
    ``read``; we do not, so the init stays exact. ``dynamic=False`` keeps only ``b``.
    """

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int, n_res: int) -> None:
        super().__init__(cfg, d_model, n_sublayers)
        L, m = n_sublayers, self.n_streams
        self.n_res = n_res
        width = 2 * m + n_res  # [pre | post | res]
        self.bias = nn.Parameter(torch.zeros(L, width))
        if cfg.dynamic:
            self.proj = nn.Parameter(torch.zeros(L, m * d_model, width))
            self.gate = nn.Parameter(torch.zeros(L, 3))

    def res_bias(self) -> Tensor:
        """The residual logits' bias ``[n_res]`` at init."""
        raise NotImplementedError

    def res_matrix(self, z: Tensor) -> Tensor:
        """``[..., n_res]`` logits -> the ``[..., m, m]`` mixing matrix."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        m = self.n_streams
        with torch.no_grad():
            # logit(1/m); with one stream σ(30) = 1 to fp32 precision
            b_pre = torch.full((m,), -math.log(m - 1) if m > 1 else 30.0)
            b = torch.cat([b_pre, torch.zeros(m), self.res_bias()])
            self.bias.copy_(b.expand_as(self.bias))
            if self.cfg.dynamic:
                nn.init.zeros_(self.proj)
                nn.init.constant_(self.gate, 0.01)

    def coefficients(self, state: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        m, dt = self.n_streams, self.compute_dtype(state)
        z = self.bias[layer].to(dt)
        if self.cfg.dynamic:
            x = state.to(dt).flatten(-2)  # [B, T, m·d]
            inv_r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-20)
            mixes = (x @ self.proj[layer].to(dt)) * inv_r  # [B, T, 2m + n_res]
            a_pre, a_post, a_res = self.gate[layer].to(dt)
            gate = torch.cat([a_pre.expand(m), a_post.expand(m), a_res.expand(self.n_res)])
            z = gate * mixes + z
        else:
            z = z.expand(*state.shape[:-2], -1)
        read, write = torch.sigmoid(z[..., :m]), 2 * torch.sigmoid(z[..., m : 2 * m])
        return read, self.res_matrix(z[..., 2 * m :]), write


@register("mhc")
class ManifoldHyperConnections(ManifoldScheme):
    """mHC: the mixing matrix is the Sinkhorn projection (``residual.sinkhorn_iters``, paper 20,
    fp32) of ``exp(z_res)``, so it is (close to) doubly stochastic. ``b_res = -8`` off the
    diagonal and 0 on it, so ``mix ≈ I`` at init.

    Memory: autograd keeps every Sinkhorn iterate (about ``2·iters·m²`` floats per token per
    sublayer); a recompute-in-backward version would not. Fine at reference scale.
    """

    options = MHCOptions

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int) -> None:
        super().__init__(cfg, d_model, n_sublayers, n_res=cfg.n_streams**2)
        self.reset_parameters()

    def res_bias(self) -> Tensor:
        m = self.n_streams
        return (-8.0 * (1 - torch.eye(m))).flatten()

    def res_matrix(self, z: Tensor) -> Tensor:
        return sinkhorn(z.unflatten(-1, (self.n_streams, self.n_streams)), self.cfg.sinkhorn_iters)


@register("mhc_lite")
class MHCLite(ManifoldScheme):
    """mHC-lite (Yang & Gao, 2026): the mixing matrix is a convex mix of all ``m!`` permutation
    matrices, ``Σ_k softmax(z_res)_k P_k``, doubly stochastic by construction (no Sinkhorn).
    ``b_res`` is 0 for the identity and -8 for every other permutation, so ``mix ≈ I`` at init.
    Practical for ``m ≤ 5`` only (``m!`` logits).
    """

    options = StreamOptions

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int) -> None:
        if cfg.n_streams > 5:
            raise ValueError(
                f"mhc_lite mixes n_streams! permutations; residual.n_streams={cfg.n_streams} is too many "
                "(use at most 5; the paper uses 4)"
            )
        super().__init__(cfg, d_model, n_sublayers, n_res=math.factorial(cfg.n_streams))
        self.register_buffer("perms", permutation_matrices(cfg.n_streams), persistent=False)
        self.reset_parameters()

    def res_bias(self) -> Tensor:
        b = torch.full((self.n_res,), -8.0)
        b[0] = 0.0
        return b

    def res_matrix(self, z: Tensor) -> Tensor:
        return torch.einsum("...k,kij->...ij", z.softmax(-1), self.perms.to(z.dtype))
