"""TokenFlow on the joint (text + image) attention of diffusion transformers: SD3's MMDiT blocks and FLUX.1's
double- and single-stream blocks.

The branch layout and the call descriptions are those of :mod:`tokenflow.attention`; what differs is
that every frame carries text tokens besides its image tokens in the same attention. The mechanism acts on the
image tokens only:

- a keyframe call: in the edited branches each keyframe's *image* queries attend to the text and image tokens of
  every keyframe of its window (the joint sequence of each keyframe, so text and image keep their per-frame
  proportions); each frame's *text* queries attend to that frame's own tokens, as in a plain call (text tokens
  stay per frame); the source branch stays per frame;
- a propagation call: each frame's image outputs are the stored keyframes' image outputs gathered along the
  nearest-neighbour field of the source branch's image input tokens, blended as for the UNet; text outputs are
  the frame's own;
- Plug-and-Play: the edited branches take the source branch's image queries and keys (values and text kept).

A plain call without injection is the layer's own processor untouched, so the transformer computes what it did
before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import (
    FrameCall,
    KeyframeCall,
    KeyframeTokens,
    PropagationCall,
    TokenFlowState,
    propagated_tokens,
    windowed_extended_attention,
)

__all__ = ["JointTokenFlowProcessor", "LAYOUTS"]

#: sd3: image tokens then text tokens, outputs projected per stream; flux-double: text then image, rotary
#: positions; flux-single: one concatenated stream (text then image), no output projection in the attention
LAYOUTS = ("sd3", "flux-double", "flux-single")


class JointTokenFlowProcessor:
    """Attention processor of one joint-attention layer for TokenFlow keyframe attention, propagation and PnP q/k
    injection on the image tokens (see the module docstring)."""

    def __init__(self, state: TokenFlowState, name: str, inject_qk: bool = False, fallback=None, *,
                 tokenflow: bool = True, layout: str, text_tokens: int | None = None):
        """``fallback``: the layer's own processor, which serves every call TokenFlow leaves alone. ``text_tokens``:
        the text length of a single-stream layer (whose input is text and image concatenated). ``tokenflow=False``:
        PnP only, every frame attending to its own tokens in keyframe and propagation calls too."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: one of {LAYOUTS}")
        if layout == "flux-single" and not text_tokens:
            raise ValueError("a single-stream layer needs its text length (text_tokens)")
        self.state, self.name, self.inject_qk, self.tokenflow = state, name, inject_qk, tokenflow
        self.layout, self.text_tokens = layout, text_tokens
        self._default = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        call = self.state.call
        if call is not None and not self.tokenflow:
            call = FrameCall(call.inject)
        plain = isinstance(call, FrameCall) and not (call.inject.qk and self.inject_qk) and self.state.observe is None
        if call is None or attention_mask is not None or plain:
            if image_rotary_emb is not None:
                kwargs["image_rotary_emb"] = image_rotary_emb
            return self._default(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        image, text = self._streams(hidden_states, encoder_hidden_states)
        q, k, v = self._projections(attn, image, text, image_rotary_emb)  # [B, heads, S, d], family order
        branches = self.state.branches
        n = image.shape[0] // branches
        length = image.shape[1]
        img = self._image_slice(q.shape[2], length)
        if call.inject.qk and self.inject_qk:  # PnP: the source's image queries and keys in the edited branches
            q, k = q.clone(), k.clone()
            q[n:, :, img] = q[:n, :, img].repeat(branches - 1, 1, 1, 1)
            k[n:, :, img] = k[:n, :, img].repeat(branches - 1, 1, 1, 1)
        txt = self._text_slice(img, q.shape[2])
        attend = F.scaled_dot_product_attention
        if isinstance(call, KeyframeCall) and len(call.positions) != n:
            raise RuntimeError(f"{call} describes {len(call.positions)} frames, the transformer call has {n}")
        if isinstance(call, PropagationCall):  # image outputs come from the keyframes: only text queries attend
            image_att, text_att = None, attend(q[:, :, txt], k, v)
        elif isinstance(call, KeyframeCall) and n > 1:
            source = attend(q[:n], k[:n], v[:n])  # the source branch stays per frame
            shape = (branches - 1, n) + q.shape[1:2]
            joint = windowed_extended_attention(
                q[n:, :, img].reshape(*shape, length, q.shape[-1]),
                k[n:].reshape(*shape, k.shape[2], k.shape[-1]),
                v[n:].reshape(*shape, v.shape[2], v.shape[-1]),
                call.window, call.anchors, call.positions, call.num_keyframes,
            )
            image_att = torch.cat([source[:, :, img], joint.reshape((branches - 1) * n, *joint.shape[2:])])
            text_att = torch.cat([source[:, :, txt], attend(q[n:, :, txt], k[n:], v[n:])])  # text: per frame
        else:
            every = attend(q, k, v)  # every frame on its own tokens
            image_att, text_att = every[:, :, img], every[:, :, txt]
        image_out, text_out = self._outputs(attn, image_att, text_att)
        if isinstance(call, PropagationCall):
            image_out = propagated_tokens(self.state.cache, self.name, image, call).to(image.dtype)
        elif isinstance(call, KeyframeCall) and call.store:
            rows = list(call.store)
            tokens = KeyframeTokens(source_inputs=image[:n], outputs=image_out.view(branches, n, length, -1))
            self.state.cache.store(self.name, [call.positions[r] for r in rows], tokens, rows=rows,
                                   offload=self.state.offload_cache)
        if self.state.observe is not None and not isinstance(call, PropagationCall):
            self.state.observe(self.name, image, image_out)
        if self.layout == "flux-single":
            return torch.cat([text_out, image_out], dim=1)
        return image_out, text_out

    # -- the family's layout ----------------------------------------------------------------------------------

    def _streams(self, hidden_states, encoder_hidden_states):
        """(image tokens, text tokens), each ``[B, S, C]``."""
        if self.layout == "flux-single":
            t = self.text_tokens
            return hidden_states[:, t:], hidden_states[:, :t]
        return hidden_states, encoder_hidden_states

    def _image_slice(self, total: int, length: int) -> slice:
        return slice(0, length) if self.layout == "sd3" else slice(total - length, total)

    @staticmethod
    def _text_slice(img: slice, total: int) -> slice:
        return slice(img.stop, total) if img.start == 0 else slice(0, img.start)

    def _projections(self, attn, image, text, rotary):
        """Queries, keys and values of text and image tokens, normalised (and rotated), concatenated in the
        family's order: ``[B, heads, S, d]``."""
        if self.layout == "sd3":
            heads = attn.heads

            def split(x):
                return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)

            q, k, v = split(attn.to_q(image)), split(attn.to_k(image)), split(attn.to_v(image))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            tq, tk, tv = split(attn.add_q_proj(text)), split(attn.add_k_proj(text)), split(attn.add_v_proj(text))
            if attn.norm_added_q is not None:
                tq = attn.norm_added_q(tq)
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)
            return torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2)
        from diffusers.models.embeddings import apply_rotary_emb

        d = attn.head_dim
        if self.layout == "flux-single":
            joint = torch.cat([text, image], dim=1)
            q, k, v = (f(joint).unflatten(-1, (-1, d)) for f in (attn.to_q, attn.to_k, attn.to_v))
            q, k = attn.norm_q(q), attn.norm_k(k)
        else:
            q, k, v = (f(image).unflatten(-1, (-1, d)) for f in (attn.to_q, attn.to_k, attn.to_v))
            q, k = attn.norm_q(q), attn.norm_k(k)
            tq, tk, tv = (f(text).unflatten(-1, (-1, d)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
            q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _outputs(self, attn, image, text):
        """(image outputs, text outputs) ``[B, S, C]`` as the family's processor returns them, from the attention
        of the image and the text queries ``[B, heads, S, d]`` (``image`` None: not computed, None back)."""

        def tokens(x):
            return x.transpose(1, 2).flatten(2, 3)

        text = tokens(text)
        image = None if image is None else tokens(image)
        if self.layout == "flux-single":
            return image, text
        if image is not None:
            image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        if self.layout == "flux-double" or not attn.context_pre_only:
            text = attn.to_add_out(text.contiguous())
        return image, text
