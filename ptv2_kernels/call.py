"""One padded call of the op as every backend receives it: :class:`Call`.

:func:`ptv2_kernels.prefix_attention` checks and normalizes its arguments once; the registered custom op carries
them as its flat schema (what ``torch.library`` needs), and its forward and backward bodies make them into one
``Call`` for the chosen backend. No backend normalizes anything again: what a ``Call`` holds is already in the forms
below.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

# The score options, as a Call names them (docs/design.md §4).
SCORE_OPTIONS = ("softcap", "sinks", "prefix_bias", "window_size")


class Call(NamedTuple):
    """The checked, normalized arguments of one padded call.

    * ``q`` ``[B, Hq, Nq, Dk]``, ``k`` ``[B, Hkv, Nk, Dk]``, ``v`` ``[B, Hkv, Nk, Dv]``, each with a contiguous
      last dim;
    * ``prefix_k`` / ``prefix_v``: the 4-D bank ``[T, Hkv, P, Dk]`` / ``[T, Hkv, P, Dv]`` (its dtype may differ
      from q's); ``prefix_index`` ``[B]`` and ``prefix_lengths`` ``[T]`` contiguous integer tensors or None;
    * ``attn_mask``: None, a bool ``[B, Nk]`` key-padding mask, or a bool dense mask viewed as ``[B, Hq, Nq, Nk]``;
    * ``attn_bias``: every additive term on the sequence keys' scores as one float view expanded to
      ``[B, Hq, Nq, Nk]``, or None;
    * ``seed``: a 0-d int64 tensor on the inputs' device when ``dropout_p > 0`` (both passes draw the same dropout
      mask from it), else None;
    * ``scale``: the score scale (the default already applied); ``deterministic``: the backward's reductions in a
      fixed order;
    * the score options, None when unused: ``softcap`` (a positive float), ``sinks`` (``[Hq]``), ``prefix_bias``
      (a float view expanded to ``[B, Hq, Nq, P]``) and ``window_size`` (``(left, right)``, -1 unbounded; not both
      -1, and right -1 under ``causal``).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    prefix_k: Tensor
    prefix_v: Tensor
    prefix_index: Optional[Tensor] = None
    prefix_lengths: Optional[Tensor] = None
    attn_mask: Optional[Tensor] = None
    attn_bias: Optional[Tensor] = None
    seed: Optional[Tensor] = None
    causal: bool = False
    scale: float = 1.0
    dropout_p: float = 0.0
    deterministic: bool = False
    softcap: Optional[float] = None
    sinks: Optional[Tensor] = None
    prefix_bias: Optional[Tensor] = None
    window_size: Optional[tuple[int, int]] = None

    def score_options_used(self) -> list[str]:
        """The score options the call uses, in the order of :data:`SCORE_OPTIONS`."""
        values = (self.softcap, self.sinks, self.prefix_bias, self.window_size)
        return [option for option, value in zip(SCORE_OPTIONS, values) if value is not None]

    def require_only(self, backend: str, score_options: tuple = (), bias: bool = True):
        """Raise ValueError where the call uses what ``backend`` does not compute: the choice of a backend never
        sends it such a call; a direct caller learns why instead of getting a result without the option."""
        unserved = [option for option in self.score_options_used() if option not in score_options]
        if not bias and self.attn_bias is not None:
            unserved.insert(0, "attn_bias")
        if unserved:
            raise ValueError(f"the {backend} backend does not serve {', '.join(unserved)}")

    def samples(self, rows: slice) -> "Call":
        """The same call on the samples ``rows`` (the per-sample tensors sliced; the bank, lengths, sinks, seed and
        flags as they are)."""
        def part(t):
            return None if t is None else t[rows]

        return self._replace(q=self.q[rows], k=self.k[rows], v=self.v[rows], prefix_index=part(self.prefix_index),
                             attn_mask=part(self.attn_mask), attn_bias=part(self.attn_bias),
                             prefix_bias=part(self.prefix_bias))


class PackedCall(NamedTuple):
    """The checked, normalized arguments of one call of the variable-length op, as a backend's ``forward_varlen``
    and ``backward_varlen`` receive them: ``call`` as in :class:`Call` but for the shapes, ``q``
    ``[total_q, Hq, Dk]`` and ``k`` / ``v`` ``[total_k, Hkv, Dk|Dv]``, with ``prefix_index`` ``[S]``, no mask and no
    bias; the sequences delimited by ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32 ``[S + 1]``), of at most
    ``max_seqlen_q`` / ``max_seqlen_k`` tokens."""

    call: Call
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
