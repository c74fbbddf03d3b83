"""The mechanism, tested exactly: processors, hooks, extended attention, propagation and layer choice."""

from __future__ import annotations

import math

import pytest
import torch

from tokenflow.attention import (
    FrameCall,
    Injection,
    KeyframeCall,
    KeyframeTokens,
    PropagationCall,
    TokenFlowAttnProcessor,
    TokenFlowState,
    extended_attention,
    tokenflow_attention,
)
from tokenflow.backbones import LayerSelection, select_layers
from tokenflow.correspondence import linear_neighbors, nearest_neighbors, reference_neighbors


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def _inputs(model, n=2, seed=0, h=8, w=12):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(3 * n, 4, h, w, generator=g)
    text = torch.randn(3 * n, 77, model.text_encoder.config.hidden_size, generator=g)
    return latents, text


def _unet(model, latents, text, t=501):
    return model.unet(latents, t, encoder_hidden_states=text).sample


def test_processors_in_default_mode_equal_diffusers_attention_exactly(model):
    latents, text = _inputs(model)
    expected = _unet(model, latents, text)
    state = TokenFlowState()
    with tokenflow_attention(model.unet, state):
        assert torch.equal(_unet(model, latents, text), expected)  # outside a call: the layers' own processors
        # our own attention path with sharing and injection off is diffusers' computation too
        with state.calling(FrameCall()):
            assert torch.equal(_unet(model, latents, text), expected)
        # and extended attention really changes the output when frames are shared
        with state.calling(KeyframeCall.all(2, store=False)):
            assert not torch.allclose(_unet(model, latents, text), expected, atol=1e-4)
        assert state.call is None


def test_apply_then_remove_restores_the_unet_exactly(model):
    latents, text = _inputs(model, seed=1)
    before = _unet(model, latents, text)
    processors = model.unet.attn_processors
    state = TokenFlowState()
    with tokenflow_attention(model.unet, state) as (self_attn, qk, conv):
        with state.calling(KeyframeCall.all(2, store=False, inject=Injection(qk=True, residual=True))):
            changed = _unet(model, latents, text)
        assert all(isinstance(model.unet.attn_processors[n], TokenFlowAttnProcessor) for n in self_attn)
        assert len(model.unet.get_submodule(conv[0]).conv2._forward_hooks) == 1
    assert not torch.equal(changed, before)
    assert torch.equal(_unet(model, latents, text), before)
    assert model.unet.attn_processors == processors
    assert all(len(m._forward_hooks) == 0 for m in model.unet.modules())


def test_restored_even_when_the_block_raises(model):
    processors = model.unet.attn_processors
    with pytest.raises(RuntimeError):
        with tokenflow_attention(model.unet, TokenFlowState()):
            raise RuntimeError("boom")
    assert model.unet.attn_processors == processors
    assert all(len(m._forward_hooks) == 0 for m in model.unet.modules())


def test_extended_attention_equals_a_naive_per_head_computation():
    g = torch.Generator().manual_seed(0)
    b, n, heads, length, d = 2, 3, 2, 5, 4
    q, k, v = (torch.randn(b, n, heads, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    out = extended_attention(q, k, v)
    expected = torch.empty_like(out)
    for bi in range(b):
        for f in range(n):
            for h in range(heads):
                keys = torch.cat([k[bi, j, h] for j in range(n)])  # all frames' keys concatenated
                values = torch.cat([v[bi, j, h] for j in range(n)])
                weights = torch.softmax(q[bi, f, h] @ keys.T / math.sqrt(d), dim=-1)
                expected[bi, f, h] = weights @ values
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.numerics
def test_pnp_qk_injection_uses_source_queries_and_keys_and_edited_values(model, record_difference):
    name = "up_blocks.2.attentions.1.transformer_blocks.0.attn1.processor"
    attn = model.unet.get_submodule(name.rsplit(".processor", 1)[0])
    state = TokenFlowState()
    proc = TokenFlowAttnProcessor(state, name, inject_qk=True)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 16, attn.to_q.in_features, generator=g)
    with state.calling(FrameCall(Injection(qk=True))):
        out = proc(attn, hidden)
    # naive: branch b uses q, k of the source branch (index 0) and v of its own
    heads = attn.heads
    for b in range(3):
        q = attn.to_q(hidden[0]).view(16, heads, -1).transpose(0, 1)
        k = attn.to_k(hidden[0]).view(16, heads, -1).transpose(0, 1)
        v = attn.to_v(hidden[b]).view(16, heads, -1).transpose(0, 1)
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        expected = attn.to_out[0]((w @ v).transpose(0, 1).reshape(16, -1))
        # fused SDPA vs this softmax: sums of 16 keys and 32 channels in another order, values O(1) -> ~1e-7;
        # the source's q/k vs the branch's own would differ by O(0.1)
        record_difference((out[b] - expected).abs().max())
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6)


def test_conv_injection_copies_the_source_residual_into_the_edited_branches(model):
    state = TokenFlowState()
    captured = {}
    with tokenflow_attention(model.unet, state) as (_, _, conv):
        conv2 = model.unet.get_submodule(conv[0]).conv2
        handle = conv2.register_forward_hook(lambda m, a, o: captured.setdefault("out", o))
        latents, text = _inputs(model, n=2, seed=4)
        with state.calling(FrameCall(Injection(residual=True))):
            _unet(model, latents, text)
        handle.remove()
    out = captured["out"]
    assert torch.equal(out[2:4], out[0:2]) and torch.equal(out[4:6], out[0:2])


def test_layer_choice_by_role_matches_the_reference_on_the_sd_layout(model):
    self_attn, qk, conv = select_layers(model.unet)
    assert len(self_attn) == 16  # 6 down, 1 mid, 9 up transformer blocks, as in SD 2.x
    expected_qk = [f"up_blocks.1.attentions.{i}" for i in (1, 2)] + [
        f"up_blocks.{b}.attentions.{i}" for b in (2, 3) for i in range(3)
    ]
    assert [n.split(".transformer_blocks")[0] for n in qk] == expected_qk
    assert conv == ["up_blocks.1.resnets.1"]
    # explicit patterns override the role-based choice
    _, qk2, conv2 = select_layers(
        model.unet, LayerSelection(qk_patterns=["up_blocks.3.*"], conv_patterns=["up_blocks.2.resnets.0"])
    )
    assert all(n.startswith("up_blocks.3.") for n in qk2) and len(qk2) == 3
    assert conv2 == ["up_blocks.2.resnets.0"]


def test_nearest_neighbours_recover_a_known_shift():
    g = torch.Generator().manual_seed(0)
    h, w, c, dy, dx = 9, 11, 32, 2, 3
    feats = torch.randn(h + dy, w + dx, c, generator=g)
    key = feats[:h, :w]  # keyframe
    query = feats[dy : dy + h, dx : dx + w]  # the frame: the keyframe moved by (dy, dx)
    idx = nearest_neighbors(query.reshape(1, -1, c), key.reshape(1, -1, c))[0].view(h, w)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    inside = (ys + dy < h) & (xs + dx < w)
    assert torch.equal(idx[inside], ((ys + dy) * w + (xs + dx))[inside])


def test_linear_neighbours_use_the_real_keyframes_around_each_frame():
    prev, nxt, w = linear_neighbors([0, 2, 5, 6, 9, 11], [2, 6, 10])
    assert prev == [0, 0, 0, 1, 1, 2]
    assert nxt == [0, 0, 1, 1, 2, 2]
    assert w == [1.0, 1.0, 0.75, 1.0, 0.75, 1.0]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # against the definition, on random keyframe sets
        keyframes = sorted(torch.randperm(40, generator=g)[: int(torch.randint(1, 12, (1,), generator=g))].tolist())
        prev, nxt, w = linear_neighbors(list(range(40)), keyframes)
        for f in range(40):
            before = [j for j, k in enumerate(keyframes) if k <= f]
            after = [j for j, k in enumerate(keyframes) if k >= f]
            j_next = after[0] if after else before[-1]
            j_prev = before[-1] if before else j_next
            assert (prev[f], nxt[f]) == (j_prev, j_next)
            span = keyframes[j_next] - keyframes[j_prev]
            assert w[f] == (1.0 if span == 0 else (f - keyframes[j_prev]) / span)


def test_reference_neighbours_reproduce_the_sigmoid_weights():
    prev, nxt, w = reference_neighbors(list(range(8)), 4)
    assert nxt == [0, 0, 0, 0, 1, 1, 1, 1] and prev == [0, 0, 0, 0, 0, 0, 0, 0]
    assert w[:4] == [1.0] * 4  # the first chunk is not blended
    assert w[4:] == pytest.approx([0.62246, 0.67918, 0.73106, 0.69706], abs=1e-5)


@pytest.mark.numerics
def test_propagation_copies_tokens_from_the_matched_keyframes_and_blends_them(model):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    attn = model.unet.get_submodule(name.rsplit(".processor", 1)[0])
    g = torch.Generator().manual_seed(5)
    length, c = 6, attn.to_q.in_features
    kf_inputs = torch.randn(2, length, c, generator=g)
    kf_outputs = torch.randn(3, 2, length, c, generator=g)
    perm0, perm1 = torch.randperm(length, generator=g), torch.randperm(length, generator=g)
    # frame 0 is keyframe 0's tokens permuted; frame 1 is keyframe 1's tokens permuted
    source = torch.stack([kf_inputs[0, perm0], kf_inputs[1, perm1]])
    hidden = torch.cat([source, torch.randn(4, length, c, generator=g)])  # edited branches' tokens are ignored
    state = TokenFlowState()
    state.cache.store(name, [0, 1], KeyframeTokens(source_inputs=kf_inputs, outputs=kf_outputs))
    with state.calling(PropagationCall(prev=(0, 0), next=(0, 1), next_weight=(1.0, 1.0))):
        out = TokenFlowAttnProcessor(state, name)(attn, hidden).view(3, 2, length, c)
    assert torch.equal(out[:, 0], kf_outputs[:, 0, perm0])  # every branch, the same indices
    assert torch.equal(out[:, 1], kf_outputs[:, 1, perm1])
    # blended: w * next + (1 - w) * prev, with each keyframe matched separately
    with state.calling(PropagationCall(prev=(0, 0), next=(1, 1), next_weight=(0.25, 0.25))):
        out = TokenFlowAttnProcessor(state, name)(attn, hidden).view(3, 2, length, c)
    nn_next = nearest_neighbors(source[:1], kf_inputs[1:2])[0]
    expected = 0.25 * kf_outputs[:, 1, nn_next] + 0.75 * kf_outputs[:, 0, perm0]
    # the same two products and one sum per value, in float32: exact on any kernel
    assert torch.equal(out[:, 0], expected)


def test_propagation_matches_frames_in_batches_as_it_does_one_by_one(model, monkeypatch):
    """Small frames share one similarity product (the per-frame calls dominate there); the budget splits large ones.
    Random tokens have no near-tie matches, so both give the same neighbours and so the same values, bit for bit."""
    import tokenflow.attention as attention

    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    attn = model.unet.get_submodule(name.rsplit(".processor", 1)[0])
    g = torch.Generator().manual_seed(7)
    n, length, c = 5, 24, attn.to_q.in_features
    state = TokenFlowState()
    state.cache.store(name, [0, 1, 2], KeyframeTokens(source_inputs=torch.randn(3, length, c, generator=g),
                                                     outputs=torch.randn(3, 3, length, c, generator=g)))
    hidden = torch.randn(3 * n, length, c, generator=g)
    call = PropagationCall(prev=(0, 0, 1, 1, 2), next=(0, 1, 2, 2, 2), next_weight=(1.0, 0.5, 0.25, 0.75, 1.0))
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(a.shape[0]) or real_bmm(a, b))
    with state.calling(call):
        together = TokenFlowAttnProcessor(state, name)(attn, hidden)
        assert calls == [5]  # every frame against both its keyframes in one product
        monkeypatch.setattr(attention, "SIMILARITY_BUDGET", 2 * length * length)  # one frame per product
        calls.clear()
        alone = TokenFlowAttnProcessor(state, name)(attn, hidden)
        assert calls == [1] * 5
    assert torch.equal(together, alone)


def test_a_layer_outside_the_tokenflow_selection_attends_per_frame_in_every_call(model):
    """``tokenflow_patterns``: the other layers keep PnP and attend per frame in keyframe and propagation calls,
    storing nothing for propagation."""
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    attn = model.unet.get_submodule(name.rsplit(".processor", 1)[0])
    hidden = torch.randn(3 * 2, 6, attn.to_q.in_features, generator=torch.Generator().manual_seed(9))
    state = TokenFlowState()
    processor = TokenFlowAttnProcessor(state, name, inject_qk=True, tokenflow=False)
    inject = Injection(qk=True)
    with state.calling(FrameCall(inject)):
        per_frame = processor(attn, hidden)
    with state.calling(FrameCall()):
        assert not torch.equal(processor(attn, hidden), per_frame)  # the injection is still there
    for call in (KeyframeCall.all(2, inject=inject), PropagationCall((0, 0), (1, 1), (0.5, 0.5), inject)):
        with state.calling(call):
            assert torch.equal(processor(attn, hidden), per_frame)
    assert len(state.cache) == 0
    layers = select_layers(model.unet, LayerSelection(tokenflow_patterns=["up_blocks.3.*"]))
    assert layers.tokenflow and all(n.startswith("up_blocks.3.") for n in layers.tokenflow)
    assert select_layers(model.unet).tokenflow is None  # all of them


def test_first_argmax_is_argmax_with_its_ties_and_nans():
    """The blocked search must pick what ``argmax`` picks: the first maximum, whichever block it lies in."""
    from tokenflow.correspondence import first_argmax

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 50, 256, generator=g)
    x[0, :, 200] = 9.0  # one late maximum
    x[1, :, [5, 40, 41, 255]] = 9.0  # ties inside a block and across blocks: the first one wins
    x[2, :7] = 0.0  # a constant row: index 0
    x[2, 7:9, [100, 17]] = float("nan")  # NaN counts as the largest, the first one wins
    x[2, 9:11, [250, 31]] = float("inf")
    coarse = x.half().float()  # many exact ties between unrelated values
    for y in (x, coarse, x[..., :64], x[..., :96], x[..., :100], x[..., :48]):  # 100 and 48 wide: argmax itself
        assert torch.equal(first_argmax(y), y.argmax(dim=-1))
    assert first_argmax(x)[1].unique().tolist() == [5] and first_argmax(x)[2, 7:11].tolist() == [17, 17, 31, 31]


def test_a_keyframe_propagated_from_itself_gets_its_keyframe_output_back_exactly(model):
    """Why the editor may keep the keyframe pass's result for keyframes (linear blending)."""
    latents, text = _inputs(model, n=3, seed=6)
    state = TokenFlowState()
    inject = Injection(qk=True, residual=True)
    with tokenflow_attention(model.unet, state):
        with state.calling(KeyframeCall.all(3, inject=inject)):
            keyframe_out = _unet(model, latents, text)
        with state.calling(PropagationCall((0, 1, 2), (0, 1, 2), (1.0, 1.0, 1.0), inject)):
            propagated = _unet(model, latents, text)
    assert torch.equal(propagated, keyframe_out)


def test_a_layer_selection_that_matches_nothing_is_an_error_naming_the_unet_and_the_pattern(model):
    from tokenflow.backbones import LayerSelectionError
    from tokenflow.errors import InputError

    processors = model.unet.attn_processors
    for selection, words in [
        (LayerSelection(qk_patterns=["up_blocks.9.*"]), ["UNet2DConditionModel", "up_blocks.9.*", "q/k"]),
        (LayerSelection(skip_first_decoder_attention=99), ["UNet2DConditionModel", "skip_first_decoder_attention=99"]),
        (LayerSelection(conv_patterns=["mid_block.nothing"]), ["UNet2DConditionModel", "mid_block.nothing", "ResNet"]),
        (LayerSelection(conv_block=7), ["UNet2DConditionModel", "up_blocks.7.resnets.1"]),
        (LayerSelection(tokenflow_patterns=["up_blocks.9.*"]), ["UNet2DConditionModel", "up_blocks.9.*", "TokenFlow"]),
    ]:
        with pytest.raises(LayerSelectionError) as info:
            with tokenflow_attention(model.unet, TokenFlowState(), selection):
                pass  # pragma: no cover - never entered
        assert isinstance(info.value, InputError)  # the CLI's one-line error
        assert all(w in str(info.value) for w in words), str(info.value)
    assert model.unet.attn_processors == processors  # nothing was installed


class _CountingProcessor:
    """A user's own processor (as an IP-Adapter or xformers installs one): diffusers' computation, counted."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner, self.calls = AttnProcessor2_0(), 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self.calls += 1
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_calls_tokenflow_leaves_alone_go_to_the_layers_own_processor(model):
    original = model.unet.attn_processors
    users = {name: _CountingProcessor() for name in original}
    model.unet.set_attn_processor(dict(users))
    try:
        latents, text = _inputs(model, seed=7)
        state = TokenFlowState()  # default mode: every call is left alone
        with tokenflow_attention(model.unet, state) as (self_attn, _, _):
            _unet(model, latents, text)
            assert all(users[name].calls == 1 for name in self_attn)  # not a fresh AttnProcessor2_0
            with state.calling(FrameCall()):  # TokenFlow's own attention: the user's processor is not called
                _unet(model, latents, text)
            assert all(users[name].calls == 1 for name in self_attn)
        assert all(model.unet.attn_processors[n] is users[n] for n in original)  # restored to the user's
    finally:
        model.unet.set_attn_processor(original)


def test_a_call_that_cannot_make_sense_cannot_be_described():
    """The call values refuse nonsensical combinations up front, instead of a processor guessing later."""
    for bad in [
        lambda: KeyframeCall(positions=(2, 1), num_keyframes=3),  # not ascending
        lambda: KeyframeCall(positions=(0, 3), num_keyframes=3),  # outside the step's keyframes
        lambda: KeyframeCall(positions=(0, 1), num_keyframes=2, store=(2,)),  # a row the call does not have
        lambda: KeyframeCall(positions=(0,), num_keyframes=1, window=-1),
        lambda: PropagationCall(prev=(0, 1), next=(1,), next_weight=(0.5, 0.5)),  # one keyframe pair per frame
        lambda: PropagationCall(prev=(0,), next=(1,), next_weight=(1.5,)),
    ]:
        with pytest.raises(ValueError):
            bad()
    state = TokenFlowState()
    with pytest.raises(TypeError):
        with state.calling("keyframe"):
            pass  # pragma: no cover
    with pytest.raises(RuntimeError, match="boom"):
        with state.calling(FrameCall()):
            raise RuntimeError("boom")
    assert state.call is None  # reset after every call, errors included


def test_a_keyframe_call_for_another_number_of_frames_is_refused_by_the_processor(model):
    latents, text = _inputs(model, n=2, seed=8)
    state = TokenFlowState()
    with tokenflow_attention(model.unet, state):
        with state.calling(KeyframeCall.all(3)), pytest.raises(RuntimeError, match="3 frames"):
            _unet(model, latents, text)
