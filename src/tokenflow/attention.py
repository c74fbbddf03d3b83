"""Attention processors and feature hooks for TokenFlow and Plug-and-Play, installed on a diffusers UNet.

Every UNet call made by the editor carries three branches stacked on the batch axis, ``n`` frames each:

    [ source (x_t^src, inversion prompt) | uncond (edited, negative prompt) | cond (edited, target prompt) ]

or two for a guidance-distilled model, which takes the guidance scale as an input and has no unconditional
branch: ``[ source | cond ]`` (:attr:`TokenFlowState.branches`). Row block 0 is always the source; every block after
it is an edited branch.

The processors replace the self-attention (``attn1``) of every transformer block and read one
:class:`TokenFlowState`, owned by the editor and reset per edit. Each UNet call is described by one immutable value
(:class:`FrameCall`, :class:`KeyframeCall` or :class:`PropagationCall`, each with the step's PnP
:class:`Injection`), set for the length of the call by :meth:`TokenFlowState.calling`; outside a call the layer's own
processor runs. Nothing is stored on the modules, and :func:`tokenflow_attention` restores the UNet's original
processors and removes its hooks on exit.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .correspondence import consecutive_runs, first_argmax, unit_rows

__all__ = [
    "NUM_BRANCHES",
    "KeyframeTokens",
    "KeyframeCache",
    "to_host",
    "TokenFlowState",
    "Injection",
    "FrameCall",
    "KeyframeCall",
    "PropagationCall",
    "Call",
    "TokenFlowAttnProcessor",
    "propagated_tokens",
    "extended_attention",
    "windowed_extended_attention",
    "anchor_positions",
    "keyframe_key_sets",
    "auto_keyframe_window",
    "auto_keyframe_batch",
    "DEFAULT_KEYFRAME_TOKEN_BUDGET",
    "tokenflow_attention",
]

NUM_BRANCHES = 3  # source, uncond, cond (the default layout; TokenFlowState.branches)
SOURCE = 0


@dataclass
class KeyframeTokens:
    """What the keyframe pass leaves in one self-attention layer for the propagation pass."""

    source_inputs: torch.Tensor  # [K, L, C] the source branch's attention input tokens (after norm1)
    outputs: torch.Tensor  # [3, K, L, C] attention outputs of all branches (after to_out)


def _copy_rows(x: torch.Tensor, dim: int, rows: list[int], host: bool) -> torch.Tensor:
    """``x``'s ``rows`` along ``dim`` as a tensor of its own; in host memory when ``host`` (see :func:`to_host`)."""
    picked = x.index_select(dim, torch.tensor(rows, device=x.device))
    return to_host(picked) if host else picked


def to_host(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` in host memory, never a view of it, whatever its device: page-locked when it comes from
    CUDA (faster copies both ways). The copy is blocking: the host side may read it before the device is
    synchronised. On the CPU this is one plain copy, so the offload path runs (and is tested) there too."""
    out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
    return out.copy_(x)


class KeyframeCache:
    """The keyframe pass's tokens per layer and keyframe position (index into the step's sorted keyframes).

    The editor stores keyframes chunk by chunk and drops those no frame left to propagate needs
    (:meth:`drop_before`), so it holds a bounded number of keyframes however long the video. With ``offload`` the
    tokens live in host memory and :meth:`fetch` moves just the keyframes a propagation batch blends to the device.
    """

    def __init__(self) -> None:
        self._layers: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    def store(
        self, name: str, positions: list[int], tokens: KeyframeTokens, rows: list[int] | None = None,
        offload: bool = False,
    ) -> None:
        """Keep ``tokens``' ``rows`` (default: all) for layer ``name`` under ``positions`` (one per row), copied so
        that they do not keep the keyframe pass's three-branch tensors alive."""
        rows = list(range(len(positions))) if rows is None else rows
        source = _copy_rows(tokens.source_inputs, 0, rows, offload)
        outputs = _copy_rows(tokens.outputs, 1, rows, offload)
        layer = self._layers.setdefault(name, {})
        for row, position in enumerate(positions):
            layer[position] = (source[row], outputs[:, row])

    def fetch(self, name: str, positions: list[int], device: torch.device | str) -> KeyframeTokens:
        """The stored keyframes at ``positions`` (in that order) stacked, on ``device``."""
        layer = self._layers[name]
        try:
            entries = [layer[p] for p in positions]
        except KeyError as exc:
            raise RuntimeError(f"keyframe position {exc.args[0]} of layer {name} is not stored (or was dropped)") from None
        source = torch.stack([e[0] for e in entries]).to(device, non_blocking=True)
        outputs = torch.stack([e[1] for e in entries], dim=1).to(device, non_blocking=True)
        return KeyframeTokens(source_inputs=source, outputs=outputs)

    def positions(self) -> list[int]:
        """Keyframe positions held (in any layer), ascending."""
        return sorted({p for layer in self._layers.values() for p in layer})

    def devices(self) -> set[str]:
        return {e[1].device.type for layer in self._layers.values() for e in layer.values()}

    def drop_before(self, position: int) -> None:
        """Forget every keyframe before ``position``."""
        for layer in self._layers.values():
            for p in [p for p in layer if p < position]:
                del layer[p]

    def clear(self) -> None:
        self._layers.clear()

    def __len__(self) -> int:
        return len(self._layers)


@dataclass(frozen=True)
class Injection:
    """Plug-and-Play for one step: whether the edited branches take the source branch's decoder self-attention
    queries/keys (``qk``) and its residual features (``residual``)."""

    qk: bool = False
    residual: bool = False


NO_INJECTION = Injection()


@dataclass(frozen=True)
class FrameCall:
    """A UNet call whose frames each attend to themselves only (the per-frame baseline), with PnP injection."""

    inject: Injection = NO_INJECTION


@dataclass(frozen=True)
class KeyframeCall:
    """A call of the keyframe pass: its frames are the keyframes at ``positions`` (ascending) among the step's
    ``num_keyframes``; in the edited branches each attends jointly to the keyframes of its ``window`` (``None``:
    all of them, the paper's extended attention) and the ``anchors`` (:func:`windowed_extended_attention`); the
    source branch stays per frame. The tokens of the rows ``store`` go to the keyframe cache, under their
    positions, for the propagation calls that follow."""

    positions: tuple[int, ...]
    num_keyframes: int
    store: tuple[int, ...] = ()
    window: int | None = None
    anchors: int = 0
    inject: Injection = NO_INJECTION

    def __post_init__(self):
        positions = self.positions
        if list(positions) != sorted(set(positions)) or not positions:
            raise ValueError(f"keyframe positions {positions}: must be a non-empty ascending list")
        if positions[0] < 0 or positions[-1] >= self.num_keyframes:
            raise ValueError(f"keyframe positions {positions}: outside 0..{self.num_keyframes - 1}")
        if any(not 0 <= r < len(positions) for r in self.store) or len(set(self.store)) != len(self.store):
            raise ValueError(f"stored rows {self.store}: must be distinct rows of the call's {len(positions)} frames")
        if self.window is not None and self.window < 0:
            raise ValueError(f"keyframe window {self.window}: must be None (full attention) or >= 0")
        if self.anchors < 0:
            raise ValueError(f"anchors {self.anchors}: must be >= 0")

    @classmethod
    def all(cls, n: int, store: bool = True, **kwargs) -> "KeyframeCall":
        """A call of all ``n`` keyframes of a step, in order (storing every row unless ``store=False``)."""
        return cls(tuple(range(n)), n, tuple(range(n)) if store else (), **kwargs)


@dataclass(frozen=True)
class PropagationCall:
    """A call of the propagation pass: frame ``i`` takes, in every self-attention layer, the stored keyframe
    tokens that are its nearest neighbours in the source branch, from its previous and next keyframes (positions
    among the stored keyframes), blended ``next_weight[i] * next + (1 - next_weight[i]) * previous``."""

    prev: tuple[int, ...]
    next: tuple[int, ...]
    next_weight: tuple[float, ...]
    inject: Injection = NO_INJECTION

    def __post_init__(self):
        if not (len(self.prev) == len(self.next) == len(self.next_weight)) or not self.prev:
            raise ValueError("a propagation call needs one previous keyframe, next keyframe and weight per frame")
        if any(not 0.0 <= w <= 1.0 for w in self.next_weight):
            raise ValueError(f"blend weights {self.next_weight}: must lie in [0, 1]")


Call = FrameCall | KeyframeCall | PropagationCall


@dataclass
class TokenFlowState:
    """The one mutable object of an edit, shared by the processors and hooks it installs: the keyframe cache and
    the description of the UNet call in progress (:meth:`calling`). Outside a call (``call is None``) every
    processor hands the call to the layer's own processor, so the UNet computes exactly what it did before.

    ``offload_cache``: keep the stored :class:`KeyframeTokens` in host memory and move to the device only the
    keyframes a propagation batch uses; the results are identical.
    """

    cache: KeyframeCache = field(default_factory=KeyframeCache)
    offload_cache: bool = False
    # row blocks of every call: the source and the edited branches (3: uncond and cond; 2: cond alone)
    branches: int = NUM_BRANCHES
    call: Call | None = None
    # ``observe(name, inputs, outputs)``: shown every self-attention layer's input tokens (after the block's norm)
    # and output tokens (after ``to_out``) of a frame or keyframe call, all branches; the feature analysis reads them
    observe: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None

    @contextmanager
    def calling(self, call: Call) -> Iterator[None]:
        """Describe the UNet call(s) made inside the block; reset afterwards, errors included."""
        if not isinstance(call, (FrameCall, KeyframeCall, PropagationCall)):
            raise TypeError(f"{call!r} is not a FrameCall, KeyframeCall or PropagationCall")
        self.call = call
        try:
            yield
        finally:
            self.call = None

    def reset(self) -> None:
        self.call = None
        self.cache.clear()


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, length, dim = x.shape
    return x.view(b, length, heads, dim // heads).transpose(1, 2)


def extended_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each frame's queries attend to the keys/values of all ``n`` frames concatenated.

    ``q, k, v``: ``[B, n, heads, L, d]`` -> ``[B, n, heads, L, d]``. One fused scaled-dot-product attention over the
    ``n * L`` tokens (memory linear in ``n`` with flash/memory-efficient kernels), no per-frame copy of K/V.
    """
    b, n, h, length, d = q.shape

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 1, 3, 4).reshape(b, h, n * x.shape[3], d)

    out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v))
    return out.view(b, h, n, length, d).permute(0, 2, 1, 3, 4)


def anchor_positions(num_keyframes: int, anchors: int) -> list[int]:
    """``anchors`` keyframe positions spread evenly over ``num_keyframes``: the middles of equal segments."""
    count = min(max(int(anchors), 0), num_keyframes)
    return sorted({(2 * i + 1) * num_keyframes // (2 * count) for i in range(count)})


def keyframe_key_sets(
    num_keyframes: int, window: int | None, anchors: int = 0, positions: Sequence[int] | None = None
) -> list[tuple[list[int], list[int]]]:
    """(query rows, key rows) groups of windowed extended attention, keys ascending.

    Keyframe ``j`` attends to keyframes ``max(0, j-window) .. min(n-1, j+window)`` and the anchors, without
    duplicates; keyframes with the same key set share one group (one attention call). ``window=None``: one group,
    every keyframe attending to all.

    ``positions``: when a call holds only some of the ``num_keyframes`` keyframes (a chunk of the keyframe pass),
    their positions, ascending; rows index ``positions`` and each keyframe attends to the keys of its window and
    the anchors that the call holds. ``None``: the call holds all keyframes, row ``j`` is keyframe ``j``.
    """
    return _key_sets(num_keyframes, window, anchors, None if positions is None else tuple(positions))


@functools.lru_cache(maxsize=64)  # every self-attention layer of a call asks for the same groups
def _key_sets(n: int, window: int | None, anchors: int, positions: tuple[int, ...] | None):
    present = tuple(range(n)) if positions is None else positions
    if window is None or window >= n - 1:
        every = list(range(len(present)))
        return [(every, every)]
    anchor_set = set(anchor_positions(n, anchors))
    extra = {row for row, p in enumerate(present) if p in anchor_set}
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, j in enumerate(present):
        lo, hi = bisect.bisect_left(present, j - window), bisect.bisect_right(present, j + window)
        keys = set(range(lo, hi)) | extra
        groups.setdefault(tuple(sorted(keys)), []).append(row)
    return [(queries, list(keys)) for keys, queries in groups.items()]


def windowed_extended_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    anchors: int = 0,
    positions: Sequence[int] | None = None,
    num_keyframes: int | None = None,
) -> torch.Tensor:
    """Extended attention restricted to a temporal window of keyframes plus evenly spaced anchor keyframes.

    ``q, k, v``: ``[B, n, heads, L, d]`` -> ``[B, n, heads, L, d]`` (keys and values may hold more tokens a frame than
    the queries: a diffusion transformer's image queries attend to each frame's text and image tokens). Keyframe ``j``'s queries attend to the tokens
    of keyframes ``j-window .. j+window`` (clipped) and of the ``anchors`` keyframes (:func:`keyframe_key_sets`),
    concatenated in ascending order: cost O(n * (2 * window + 1 + anchors)) frames of keys instead of O(n^2).
    ``window=None`` (or a window that covers every keyframe) is exactly :func:`extended_attention`.
    ``positions`` / ``num_keyframes``: the frames are the keyframes at these positions among ``num_keyframes``
    (a chunk of the keyframe pass, see :func:`keyframe_key_sets`); default: all of them, in order.

    Keys are laid out once as ``[B, heads, n, L, d]``, so a contiguous run of keyframes is a view; only key sets
    broken by anchors are concatenated, one group at a time (never a copy per keyframe of all keys).
    """
    b, n, h, length, d = q.shape
    groups = keyframe_key_sets(num_keyframes or n, window, anchors, positions)
    if len(groups) == 1 and len(groups[0][1]) == n:
        return extended_attention(q, k, v)

    def frames_major(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 1, 3, 4).contiguous()  # [B, heads, n, L, d]

    qf, kf, vf = frames_major(q), frames_major(k), frames_major(v)

    def tokens(x: torch.Tensor, positions: list[int]) -> torch.Tensor:  # keys may be longer than queries (DiTs)
        parts = [x[:, :, a:z].reshape(b, h, (z - a) * x.shape[3], d) for a, z in consecutive_runs(positions)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    out = torch.empty_like(qf)
    for queries, keys in groups:
        o = F.scaled_dot_product_attention(tokens(qf, queries), tokens(kf, keys), tokens(vf, keys))
        o = o.view(b, h, len(queries), length, d)
        done = 0
        for a, z in consecutive_runs(queries):
            out[:, :, a:z] = o[:, :, done : done + z - a]
            done += z - a
    return out.permute(0, 2, 1, 3, 4)


# 16 keyframes of Stable Diffusion's 64x64-token first attention level (512 px): 128 frames at --batch-size 8.
DEFAULT_KEYFRAME_TOKEN_BUDGET = 16 * 64 * 64


def _budget_frames(tokens_per_frame: int, budget_tokens: int) -> int:
    return max(1, budget_tokens // tokens_per_frame)


def attention_break_even(batch_size: int) -> float:
    """How many keyframes one keyframe may attend to before TokenFlow's self-attention costs more than per-frame
    editing's: a step runs ``N / batch_size`` keyframes, whose source branch attends per frame and whose two edited
    branches attend to ``K`` keyframes' tokens, while the propagated frames attend to nothing (their outputs are
    gathered from the keyframes); per-frame editing attends ``3 N`` times per frame. Equal when
    ``(1 + 2 K) / batch_size = 3``."""
    return (3 * batch_size - 1) / 2


def auto_keyframe_window(
    num_keyframes: int, tokens_per_frame: int, budget_tokens: int = DEFAULT_KEYFRAME_TOKEN_BUDGET, anchors: int = 0,
    batch_size: int | None = None,
) -> int | None:
    """A keyframe window for :func:`windowed_extended_attention`: ``None`` (full) while it fits the token budget
    and, given ``batch_size``, while joint attention costs no more than the per-frame attention it replaces.

    ``tokens_per_frame``: tokens of the largest self-attention level: latent ``h * w`` for SD, a quarter of it for
    SDXL, whose first level has no attention (the editor's ``_attention_tokens``).
    Full joint attention lets every keyframe see every other one, which is what makes the paper's edit globally
    consistent, but its cost grows as ``(num_keyframes * tokens_per_frame) ** 2`` in compute and, without a fused
    kernel, in memory, and the keyframe pass's activations grow with ``num_keyframes``. Past ``budget_tokens``
    (``B`` frames) the keyframe pass runs in calls of at most ``B`` keyframes (:func:`auto_keyframe_batch`), half
    of each call the keyframes it computes and half their context, so the window is
    ``K = (B - 1 - anchors) // 4`` (at least 1): cost then grows linearly with the video and memory not at all.
    The price: keyframes further apart than the window only meet through the chain of overlapping windows
    (one hop of ``K`` keyframes per attention layer and step), so a look that depends on the edit's free choices
    (a colour, a texture) can drift slowly along a long video; ``anchors`` give every keyframe the same few
    global references at ``anchors * tokens_per_frame`` extra keys each, which holds it together.

    Compute: each keyframe attends to ``2 K + 1 + anchors`` keyframes, so past :func:`attention_break_even`
    keyframes the window is the widest that stays under it: the editing loop's cost per UNet frame evaluation
    then stays at the per-frame baseline's however long the video (benchmarks/README.md: the micro model's
    loop-cost study). Where even one neighbour a side would pass it (``batch_size`` 1 or 2, or many anchors),
    no window can, and only the memory budget applies. Both limits apply; the narrower window wins.
    """
    if num_keyframes < 1 or tokens_per_frame < 1:
        raise ValueError(f"num_keyframes {num_keyframes} and tokens_per_frame {tokens_per_frame} must be positive")
    windows = []
    if num_keyframes * tokens_per_frame > budget_tokens:
        windows.append(max(1, (_budget_frames(tokens_per_frame, budget_tokens) - 1 - anchors) // 4))
    even = None if batch_size is None else attention_break_even(batch_size)
    if even is not None and num_keyframes > even and 3 + anchors <= even:  # (one neighbour a side must fit)
        windows.append(int((even - 1 - anchors) // 2))
    return min(windows) if windows else None


def auto_keyframe_batch(
    window: int, tokens_per_frame: int, budget_tokens: int = DEFAULT_KEYFRAME_TOKEN_BUDGET, anchors: int = 0
) -> int:
    """Keyframes a call of the windowed keyframe pass computes: the rest of a ``B``-keyframe call (the budget of
    :func:`auto_keyframe_window`) after the ``window`` context keyframes on each side and the anchors; at least 1.

    So no call is larger than the largest full-attention keyframe pass, whatever the video's length.
    """
    return max(1, _budget_frames(tokens_per_frame, budget_tokens) - 2 * window - anchors)


class TokenFlowAttnProcessor:
    """Self-attention processor for TokenFlow keyframe attention, propagation and PnP q/k injection."""

    def __init__(self, state: TokenFlowState, name: str, inject_qk: bool = False, fallback=None,
                 tokenflow: bool = True):
        """``fallback``: the layer's own processor (an IP-Adapter's, xformers', a user's), which serves every call
        that TokenFlow leaves alone; default: diffusers' ``AttnProcessor2_0``. ``tokenflow=False``: the layer takes
        part in PnP only, every frame attending to itself in keyframe and propagation calls too."""
        if fallback is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            fallback = AttnProcessor2_0()
        self.state = state
        self.name = name
        self.inject_qk = inject_qk
        self.tokenflow = tokenflow
        self._default = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        call = self.state.call
        if call is None or encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            return self._default(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if not self.tokenflow:
            call = FrameCall(call.inject)
        if isinstance(call, PropagationCall):
            return self._propagate(hidden_states, call)
        return self._attention(attn, hidden_states, call)

    def _attention(self, attn, hidden_states: torch.Tensor, call: FrameCall | KeyframeCall) -> torch.Tensor:
        state = self.state
        total, length, _ = hidden_states.shape
        branches = state.branches
        n = total // branches
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if call.inject.qk and self.inject_qk:
            # Plug-and-Play: the edited branches take the source branch's queries and keys (values kept).
            q = q[:n].repeat(branches, 1, 1)
            k = k[:n].repeat(branches, 1, 1)
        q, k, v = (_split_heads(x, attn.heads) for x in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        keyframes = isinstance(call, KeyframeCall)
        if keyframes and len(call.positions) != n:
            raise RuntimeError(f"{call} describes {len(call.positions)} frames, the UNet call has {n}")
        if keyframes and n > 1:
            per_frame = F.scaled_dot_product_attention(q[:n], k[:n], v[:n])  # the source branch stays per frame
            shape = (branches - 1, n) + q.shape[1:]
            joint = windowed_extended_attention(
                q[n:].view(shape), k[n:].view(shape), v[n:].view(shape), call.window, call.anchors,
                call.positions, call.num_keyframes,
            )
            out = torch.cat([per_frame, joint.reshape((branches - 1) * n, *q.shape[1:])])
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(total, length, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        if state.observe is not None:
            state.observe(self.name, hidden_states, out)
        if keyframes and call.store:
            rows = list(call.store)
            tokens = KeyframeTokens(source_inputs=hidden_states[:n], outputs=out.view(branches, n, length, -1))
            state.cache.store(self.name, [call.positions[r] for r in rows], tokens, rows=rows,
                              offload=state.offload_cache)
        return out

    def _propagate(self, hidden_states: torch.Tensor, call: PropagationCall) -> torch.Tensor:
        return propagated_tokens(self.state.cache, self.name, hidden_states, call)


# Similarity values one batched product may hold (float32: 64 MiB). At 512 px a frame's [4096, 2 x 4096]
# similarities are 32 M, so frames go one at a time; small frames go together, saving the per-frame calls that
# dominate there.
SIMILARITY_BUDGET = 2**24


def propagated_tokens(cache: KeyframeCache, name: str, inputs: torch.Tensor, call: PropagationCall) -> torch.Tensor:
    """A propagation call's attention outputs of layer ``name``: for each frame, the stored keyframe outputs (all
    branches) gathered along the nearest neighbours of its source-branch ``inputs`` ``[branches * n, L, C]`` (the
    source's ``n`` rows first) among the keyframes' source inputs, previous and next keyframe blended by the
    call's weights."""
    total, length, _ = inputs.shape
    n = len(call.prev)
    if total % n:
        raise RuntimeError(f"a propagation call of {n} frames got a denoiser call of {total} rows")
    # bring over only the keyframes this batch blends, renumbered in that subset
    needed = sorted(set(call.next) | set(call.prev))
    stored = cache.fetch(name, needed, inputs.device)
    local = {j: i for i, j in enumerate(needed)}
    blend = any(p != q or w != 1.0 for p, q, w in zip(call.prev, call.next, call.next_weight))
    # each frame's keyframes as columns (previous, next), or the next alone when no frame blends
    pairs = [(local[p], local[q]) if blend else (local[q],) for p, q in zip(call.prev, call.next)]
    which = torch.tensor(pairs, device=inputs.device)  # [n, columns]
    queries = unit_rows(inputs[:n])  # correspondences come from the source video only
    nearest = _nearest_tokens(queries, unit_rows(stored.source_inputs), which)
    branches, keyframes, width = stored.outputs.shape[:3]
    if branches * n != total:
        raise RuntimeError(f"layer {name}: keyframes stored with {branches} branches, a call of {total // n}")
    flat = (which.unsqueeze(1) * width + nearest).view(-1)  # rows of the keyframes' tokens laid end to end
    picked = stored.outputs.reshape(branches, keyframes * width, -1).index_select(1, flat)
    picked = picked.view(branches, n, length, which.shape[1], -1)
    if not blend:
        return picked.reshape(total, length, -1)
    weight = torch.tensor(call.next_weight, dtype=torch.float32, device=inputs.device).view(1, n, 1, 1)
    # exactly the next (previous) keyframe's token where the weight is 1 (0)
    out = weight * picked[:, :, :, 1].float() + (1 - weight) * picked[:, :, :, 0].float()
    return out.to(stored.outputs.dtype).reshape(total, length, -1)


def _nearest_tokens(queries: torch.Tensor, keys: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """For frame ``f``'s unit ``queries`` ``[n, L, C]``, the index of the nearest of keyframe ``which[f, c]``'s unit
    ``keys`` ``[K, M, C]`` for every column ``c`` -> ``[n, L, columns]``: each frame's keyframes in one product,
    frames in batches of :data:`SIMILARITY_BUDGET` similarity values."""
    n, length, channels = queries.shape
    columns, width = which.shape[1], keys.shape[1]
    per_batch = max(1, SIMILARITY_BUDGET // (length * columns * width))
    parts = []
    for start in range(0, n, per_batch):
        rows = which[start : start + per_batch]
        frame_keys = keys[rows].view(len(rows), columns * width, channels)
        similarity = torch.bmm(queries[start : start + per_batch], frame_keys.transpose(1, 2))
        parts.append(first_argmax(similarity.view(len(rows), length, columns, width)))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _conv_injection_hook(state: TokenFlowState):
    """Forward hook on a ResNet's ``conv2``: the edited branches take the source branch's residual features
    (after conv2, before the shortcut is added; each branch keeps its own shortcut)."""

    def hook(module, args, output):
        if state.call is None or not state.call.inject.residual:
            return None
        n = output.shape[0] // state.branches
        return output[:n].repeat(state.branches, 1, 1, 1)

    return hook


@contextmanager
def tokenflow_attention(unet, state: TokenFlowState, layers=None) -> Iterator[tuple[list[str], list[str], list[str]]]:
    """Install the processors and hooks on ``unet`` for the duration of the block; restore it exactly on exit.

    ``layers``: the backbone's layers by role (:meth:`~tokenflow.backbones.base.Backbone.layers`), or a
    :class:`~tokenflow.backbones.unet_layers.LayerSelection` / ``None`` resolved on ``unet``'s UNet layout.
    """
    from .backbones.base import Layers
    from .backbones.unet_layers import select_layers

    layers = layers if isinstance(layers, Layers) else select_layers(unet, layers)
    self_attn, qk, conv = layers
    original = unet.attn_processors
    processors = dict(original)
    qk_set = set(qk)
    acting = set(self_attn if layers.tokenflow is None else layers.tokenflow)
    make = layers.processor or TokenFlowAttnProcessor
    for name in self_attn:
        processors[name] = make(state, name, inject_qk=name in qk_set, fallback=original[name],
                                tokenflow=name in acting)
    handles = []
    try:
        unet.set_attn_processor(processors)
        for name in conv:
            handles.append(unet.get_submodule(name).conv2.register_forward_hook(_conv_injection_hook(state)))
        yield self_attn, qk, conv
    finally:
        for handle in handles:
            handle.remove()
        unet.set_attn_processor(original)
