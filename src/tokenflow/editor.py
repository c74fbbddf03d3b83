"""The editing loop: TokenFlow + Plug-and-Play (and its per-frame baseline) over DDIM.

At every timestep: sample keyframes, edit them jointly with extended attention (keyframe pass), then run every
other frame with its self-attention replaced by the keyframes' tokens, gathered along the source video's own
nearest-neighbour field (propagation pass). Plug-and-Play injects the source branch's decoder q/k and residual
features into the edited branches early in the schedule. See ``docs`` in the README and method.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import (
    NUM_BRANCHES,
    Call,
    FrameCall,
    Injection,
    KeyframeCall,
    PropagationCall,
    TokenFlowState,
    anchor_positions,
    tokenflow_attention,
)
from .correspondence import linear_neighbors, reference_neighbors
from .errors import InputError
from .events import CancelToken, ProgressCallback, Tracker, as_progress
from .inversion import InversionCache, SourceLatents, invert_frames
from .io.disktensor import DiskTensor
from .inversion.ddim import next_alphas
from .keyframes import RandomKeyframes, make_schedule
from .modes import get_mode
from .options import DEFAULT_NEGATIVE_PROMPT, EditConfig, resolve_inversion
from .backbones import DEFAULT_MODEL, Backbone, TextConditioning, load_model
from .backbones.base import check_finite

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_NEGATIVE_PROMPT", "EditConfig", "EditOutput", "TokenFlowEditor"]


@dataclass
class EditOutput:
    """Result of :meth:`TokenFlowEditor.edit`."""

    latents: torch.Tensor  # [N, C, h, w] float32 on the CPU, before VAE decode
    keyframes: list[list[int]]  # per denoising step (empty lists for the per-frame baseline)
    timesteps: list[int]
    unet_frame_evaluations: int
    seconds: float
    max_cached_keyframes: int = 0  # most keyframes whose tokens were held at once (bounded for long videos)
    max_keyframes_per_call: int = 0  # largest keyframe-pass UNet call


class TokenFlowEditor:
    """Loaded once, edits many videos and prompts. ``edit`` takes source latents from :meth:`invert` (or your own)."""

    def __init__(self, model: Backbone):
        self.model = model

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", **kwargs):
        return cls(load_model(model, device=device, dtype=dtype, **kwargs))

    def invert(
        self,
        frames: torch.Tensor,
        inversion_prompt: str = "",
        steps: int = 50,
        inversion_steps: int | None = None,
        batch_size: int = 8,
        cache: InversionCache | None = None,
        reconstruct: bool = True,
        progress: bool | ProgressCallback | None = True,
        on_cache_hit: Callable | None = None,
        cancel: CancelToken | None = None,
        inversion: str = "fixed-point",
        refinements: int = 1,
        check_frames: int | None = None,
        cache_stride: int | str = "auto",
    ) -> SourceLatents:
        """DDIM-invert uint8 frames ``[N,H,W,3]`` (already at the working size); see :func:`invert_frames`.

        ``inversion``: ``fixed-point`` (default: on the editing grid, ``refinements`` fixed-point iterations per
        step) or ``ddim`` (plain, ``inversion_steps`` default 500: the reference's); ``check_frames``: frames the
        reconstruction check samples (default: all); ``cache_stride``: timesteps a cache entry keeps (see
        :func:`invert_frames`). Calls from several threads take turns on the model."""
        inversion_steps, refinements = resolve_inversion(inversion, steps, inversion_steps, refinements)
        with self.model.lock:
            return invert_frames(
                self.model,
                frames,
                prompt=inversion_prompt,
                steps=steps,
                inversion_steps=inversion_steps,
                batch_size=batch_size,
                cache=cache,
                reconstruct=reconstruct,
                progress=progress,
                on_cache_hit=on_cache_hit,
                cancel=cancel,
                refinements=refinements,
                check_frames=check_frames,
                cache_stride=cache_stride,
            )

    # -- the loop ---------------------------------------------------------------------------------------------

    def edit(
        self,
        source: SourceLatents,
        config: EditConfig,
        progress: bool | ProgressCallback | None = True,
        callback_on_step_end: Callable[[int, int, torch.Tensor], torch.Tensor | None] | None = None,
        control: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        cancel: CancelToken | None = None,
        workspace: str | Path | None = None,
    ) -> EditOutput:
        """Edit the frames whose source latents are given. Deterministic for a given seed, inputs and machine.

        1. Timesteps: the last ``round(strength * steps)`` of the DDIM schedule (all of them for PnP); PnP injection
           during the first ``int(steps * pnp_attn_t)`` / ``int(steps * pnp_f_t)`` timesteps of the full schedule
           (truncation, as the reference).
        2. Start latent: the clean latents re-noised to the first timestep run, with the noise implied by the
           noisiest inverted latent.
        3. Per step: keyframe pass (joint, extended attention), propagation pass (batches), CFG, DDIM step.

        ``control``: ControlNet conditioning images ``[N, 3, H, W]`` in [0, 1], or uint8 maps ``[N, H, W, 3]`` read
        a batch at a time (a :class:`~tokenflow.io.FrameStore`) (mode ``controlnet``; the model must carry
        a ControlNet). ``generator`` replaces the seeded generator of the default random keyframe schedule.
        ``callback_on_step_end(step, t, latents)`` runs after every step; a tensor it returns replaces the latents.
        ``progress``: ``True`` for a progress bar, or a callable receiving :class:`~tokenflow.events.ProgressEvent` objects
        (stage ``editing``, in frames x steps); ``cancel``: checked after every UNet call, raises
        :class:`~tokenflow.events.Cancelled`.

        ``workspace``: a folder for the loop's full-length arrays (the current and next latents, the start latent),
        which then live in files read and written a batch at a time (:class:`~tokenflow.io.DiskTensor`) instead of
        in memory, so host memory does not grow with the video (the same numbers: results are identical); the
        returned ``latents`` are then a :class:`~tokenflow.io.DiskTensor` in it. Default: in memory.

        The processors live on the model's UNet for the length of the edit, so edits from several threads sharing a
        model take turns (one at a time), each with its own state.
        """
        with self.model.lock, torch.no_grad():
            return self._edit(source, config, as_progress(progress), callback_on_step_end, control, generator, cancel,
                              None if workspace is None else Path(workspace))

    def _edit(self, source, config, progress, callback_on_step_end, control, generator, cancel,
              workspace: Path | None) -> EditOutput:
        config.check_inputs()
        model = self.model
        started = time.perf_counter()
        scheduler = model.make_scheduler(tuple(source.clean.shape[2:]))
        scheduler.set_timesteps(config.steps)
        schedule_all = [int(t) for t in scheduler.timesteps]
        mode = get_mode(config.mode)
        plan = mode.plan(schedule_all, config.effective_strength, config.effective_pnp, config.pnp_attn_t,
                         config.pnp_f_t)
        timesteps = plan.timesteps
        missing = [t for t in timesteps if t not in source.noisy]
        if missing:
            raise InputError(
                f"the source latents lack timesteps {missing[:5]} of the {config.steps}-step schedule; "
                "invert with the same `steps`"
            )
        n_frames = source.clean.shape[0]
        conditioner = mode.conditioner(model, control, config.controlnet_scale, tuple(source.clean.shape))

        if not timesteps:  # strength 0: nothing to denoise, the clean latents come back
            return EditOutput(source.clean.clone(), [], [], 0, time.perf_counter() - started)
        alphas, final = model.noise_levels(scheduler)
        top = source.noisiest
        x = _start_latents(model, source, alphas[top], alphas[timesteps[0]], config.batch_size, workspace)
        buffers = _Buffers(x, workspace)
        alpha_next = next_alphas(scheduler, alphas, final)

        factor = model.vae_scale_factor
        texts = model.condition(
            [config.inversion_prompt, config.negative_prompt, config.prompt],
            height=source.clean.shape[2] * factor,
            width=source.clean.shape[3] * factor,
        )
        schedule = make_schedule(config.keyframes, config.batch_size, config.seed)
        if generator is not None and isinstance(schedule, RandomKeyframes):
            schedule.generator = generator
        tokens_per_frame = model.attention_tokens(source.clean.shape[2], source.clean.shape[3])
        window = config.resolve_keyframe_window(n_frames, tokens_per_frame)
        offload = config.offload_cache if config.offload_cache is not None else model.device.type != "cpu"
        state = TokenFlowState(offload_cache=offload, branches=model.branches)
        chunks = _KeyframePlan(window, config.anchors, config.resolve_keyframe_batch(window, tokens_per_frame, n_frames))
        if window is not None and config.propagation != "none":
            logger.info("keyframe attention window: %d keyframes each side, %d anchors, %s keyframes per call",
                        window, config.anchors, chunks.batch or "all")
        guidance = config.guidance_scale if config.guidance_scale is not None else model.default_guidance
        run = _StepRunner(model, alphas, alpha_next, texts, guidance, state, conditioner)
        fraction = config.propagation_t if config.propagation_t is not None else model.default_propagation_t
        tokenflow_steps = set(schedule_all[: int(config.steps * fraction)])  # noisiest first, as PnP's gating
        used_keyframes: list[list[int]] = []

        bar = Tracker("editing", len(timesteps) * n_frames, progress, cancel)
        run.on_frames = bar.update
        with tokenflow_attention(model.unet, state, model.layers(config.layer_selection())):
            for step, t in enumerate(timesteps):
                bar.detail = f"step {step + 1}/{len(timesteps)}"
                run.step = step
                inject = plan.injections[t]  # PnP gating is part of the step
                src_t = source.noisy[t]
                if config.propagation == "none" or t not in tokenflow_steps:
                    x = self._per_frame_step(run, x, buffers.next(), src_t, t, config.batch_size, inject)
                    used_keyframes.append([])
                else:
                    keyframes = schedule(step, n_frames)
                    _check_keyframes(keyframes, n_frames, config)
                    used_keyframes.append(list(keyframes))
                    x = self._tokenflow_step(run, x, buffers.next(), src_t, t, keyframes, config,
                                             chunks.calls(len(keyframes), step), window, inject)
                state.cache.clear()
                if callback_on_step_end is not None:
                    replaced = callback_on_step_end(step, t, x if workspace is None else x.load())
                    if replaced is not None:  # a callback may replace the latents (diffusers' convention)
                        if workspace is None:
                            x = replaced.to(x.device, x.dtype)
                        else:
                            x[:] = replaced
            state.reset()
        return EditOutput(
            latents=x,
            keyframes=used_keyframes,
            timesteps=timesteps,
            unet_frame_evaluations=run.frame_evaluations,
            seconds=time.perf_counter() - started,
            max_cached_keyframes=run.max_cached_keyframes,
            max_keyframes_per_call=run.max_keyframes_per_call,
        )

    @staticmethod
    def _per_frame_step(run: "_StepRunner", x, out, src_t, t, batch_size, inject: Injection) -> torch.Tensor:
        """The per-frame PnP baseline: every frame edited on its own (plain self-attention), no propagation."""
        call = FrameCall(inject)
        for start in range(0, x.shape[0], batch_size):
            idx = list(range(start, min(start + batch_size, x.shape[0])))
            out[idx] = run(idx, x, src_t, t, call)
        return out

    @staticmethod
    def _tokenflow_step(
        run: "_StepRunner", x, out, src_t, t, keyframes: list[int], config: EditConfig, calls: list["_KeyframeChunk"],
        window: int | None, inject: Injection,
    ) -> torch.Tensor:
        """One denoising step: the keyframe pass call by call, each followed by the propagation batches whose
        keyframes are all computed by then; keyframes no batch left needs leave the cache. With one call this is
        the paper's order (all keyframes, then all batches), and always the same batches with the same neighbours.
        """
        state = run.state
        n_frames = x.shape[0]
        if config.blending == "linear":
            # A keyframe is its own nearest neighbour, so its propagated result would equal its keyframe-pass
            # result: keep that and propagate only the other frames.
            is_key = set(keyframes)
            others = [f for f in range(n_frames) if f not in is_key]
            batches = [others[i : i + config.batch_size] for i in range(0, len(others), config.batch_size)]
            pending = [(frames, linear_neighbors(frames, keyframes)) for frames in batches]
        else:
            # The reference re-derives every frame chunk by chunk, blending with the previous chunk's keyframe.
            batches = [list(range(i, min(i + config.batch_size, n_frames))) for i in range(0, n_frames, config.batch_size)]
            pending = [(frames, reference_neighbors(frames, config.batch_size)) for frames in batches]
        pending.reverse()  # popped from the end, in time order
        for chunk in calls:
            call = KeyframeCall(tuple(chunk.positions), len(keyframes), tuple(chunk.rows), window, config.anchors,
                                inject)
            count = len(chunk.rows) if config.blending == "linear" else 0  # reference: batches redo every frame
            result = run([keyframes[p] for p in chunk.positions], x, src_t, t, call, count=count)
            if config.blending == "linear":
                out[[keyframes[chunk.positions[r]] for r in chunk.rows]] = result[chunk.rows]
            run.max_cached_keyframes = max(run.max_cached_keyframes, len(state.cache.positions()))
            while pending and max(pending[-1][1][1]) < chunk.computed:
                frames, (prev, nxt, weight) = pending.pop()
                out[frames] = run(frames, x, src_t, t, PropagationCall(tuple(prev), tuple(nxt), tuple(weight), inject))
            # what the batches left still blend: from the earliest previous keyframe on
            state.cache.drop_before(min(pending[-1][1][0]) if pending else len(keyframes))
        if pending:
            raise RuntimeError(f"keyframe calls {calls} left {len(pending)} propagation batches without keyframes")
        return out


def _start_latents(model: Backbone, source: SourceLatents, alpha_top, alpha_start, batch_size: int,
                   workspace: Path | None):
    """The start latent: the clean latents re-noised to the first timestep run, with the noise implied by the
    noisiest inverted latents (in memory, or a batch at a time into the workspace: the same elementwise maths)."""
    top = source.noisiest
    implied_noise, noised = model.implied_noise, model.noised
    if workspace is None:
        eps = implied_noise(source.noisy[top][:], source.clean, alpha_top)
        return noised(source.clean, eps, alpha_start)
    x = DiskTensor(workspace / "latents-start.f32", tuple(source.clean.shape))
    n = source.clean.shape[0]
    for start in range(0, n, max(1, batch_size)):
        rows = slice(start, min(n, start + batch_size))
        clean = source.clean[rows]
        x[rows] = noised(clean, implied_noise(source.noisy[top][rows], clean, alpha_top), alpha_start)
    return x


class _Buffers:
    """Where each step writes its next latents: a fresh tensor (in memory), or two files in the workspace used in
    turn (never the one the step reads)."""

    def __init__(self, x, workspace: Path | None):
        self.workspace, self.shape = workspace, tuple(x.shape)
        self._files: list[DiskTensor] = []
        self._turn = 0

    def next(self):
        if self.workspace is None:
            return torch.empty(self.shape)
        if not self._files:
            self._files = [DiskTensor(self.workspace / f"latents-{k}.f32", self.shape) for k in "ab"]
        self._turn ^= 1
        return self._files[self._turn]


@dataclass
class _KeyframeChunk:
    """One UNet call of the keyframe pass: the keyframe positions it runs (ascending), the rows among them it
    computes (whose results and tokens are kept; the others are context), and how many keyframes are computed
    once it is done (all positions before that)."""

    positions: list[int]
    rows: list[int]
    computed: int


@dataclass
class _KeyframePlan:
    """How a step's keyframe pass splits into calls of ``batch`` keyframes (``None``: one call of all).

    A call computes ``batch`` consecutive keyframes; it also runs the ``window`` keyframes on each side and the
    anchors, so every computed keyframe attends to its whole window. The context keyframes' own features see a
    truncated window, so a split pass is close to, not equal to, one call; the split points move from step to
    step (by the golden ratio of ``batch``) so no frame sits next to a split at every step.
    """

    window: int | None
    anchors: int
    batch: int | None

    def calls(self, num_keyframes: int, step: int) -> list[_KeyframeChunk]:
        k = num_keyframes
        if self.batch is None or self.window is None or self.batch >= k:
            return [_KeyframeChunk(list(range(k)), list(range(k)), k)]
        offset = round(step * 0.6180339887 * self.batch) % self.batch
        starts = ([0] if offset else []) + list(range(offset, k, self.batch))
        anchors = set(anchor_positions(k, self.anchors))
        calls = []
        for a, z in zip(starts, starts[1:] + [k]):
            positions = sorted(set(range(max(0, a - self.window), min(k, z + self.window))) | anchors)
            rows = [i for i, p in enumerate(positions) if a <= p < z]
            calls.append(_KeyframeChunk(positions, rows, z))
        return calls


def _check_keyframes(keyframes: list[int], n_frames: int, config: EditConfig) -> None:
    if sorted(set(keyframes)) != list(keyframes) or not keyframes:
        raise InputError(f"keyframes {keyframes}: must be a non-empty increasing list of distinct frame indices")
    if keyframes[0] < 0 or keyframes[-1] >= n_frames:
        raise InputError(f"keyframes {keyframes}: outside the video's {n_frames} frames")
    if config.blending == "reference":
        chunks = -(-n_frames // config.batch_size)
        if [k // config.batch_size for k in keyframes] != list(range(chunks)):
            raise InputError(
                f"keyframes {keyframes}: `blending` reference needs exactly one keyframe per chunk of "
                f"`batch_size` {config.batch_size} frames"
            )


class _StepRunner:
    """One denoiser call on a set of frames in the branch layout (source, edited branches), then guidance and the
    step."""

    def __init__(self, model: Backbone, alphas, alpha_next: dict, texts: TextConditioning,
                 guidance: float, state: TokenFlowState, conditioner=None):
        self.model = model
        self.alphas, self.alpha_next = alphas, alpha_next
        self.texts = texts  # 3 rows: inversion prompt (source), negative prompt (uncond), target prompt (cond);
        # a guidance-distilled model (state.branches 2) uses rows 0 and 2
        self.guidance = guidance
        self.state = state
        self.conditioner = conditioner  # the mode's extra conditioning (ControlNet residuals), or None
        self.frame_evaluations = 0
        self.on_frames: Callable[[int], object] | None = None  # progress: frames finished
        self.max_cached_keyframes = 0
        self.max_keyframes_per_call = 0
        self.step = 0  # the step in progress (for messages)

    def __call__(self, frames: list[int], x: torch.Tensor, src_t: torch.Tensor, t: int, call: Call,
                 count: int | None = None):
        """The next latents of ``frames`` from one UNet call described by ``call``; ``count``: how many of them
        this call finishes (progress)."""
        model = self.model
        n = len(frames)
        if isinstance(call, KeyframeCall) and call.store:
            self.max_keyframes_per_call = max(self.max_keyframes_per_call, n)
        branches = self.state.branches
        latents = torch.cat([src_t[frames]] + [x[frames]] * (branches - 1)).to(model.device, model.dtype)
        prompts = torch.tensor([0, 1, 2] if branches == NUM_BRANCHES else [0, 2])  # uncond's prompt only for CFG
        text = self.texts.rows(prompts.repeat_interleave(n))  # branch-major, n frames each
        extra = self.conditioner(latents, text, frames, t) if self.conditioner is not None else {}
        extra.update(model.branch_kwargs(self.guidance, n))
        with self.state.calling(call):
            pred = model.predict(latents, t, text, **extra)
        self.frame_evaluations += branches * n
        outputs = pred.chunk(branches)
        cond = outputs[-1]
        if model.classifier_free_guidance:  # classifier-free guidance on the raw outputs
            guided = (outputs[1] + self.guidance * (cond - outputs[1])).cpu()
        else:  # guidance-distilled: the scale went in as an input (branch_kwargs)
            guided = cond.cpu()
        current = x[frames]
        eps = model.predicted_noise(guided, current, self.alphas[t])  # linear: CFG commutes with it
        if self.on_frames is not None:
            self.on_frames(n if count is None else count)
        nxt = model.transition(current, eps, self.alphas[t], self.alpha_next[t])
        # checked per call, so a full-length array on disk is never read back for it; fail early, not black
        check_finite(nxt, f"the edited latents after step {self.step + 1}", self.model.dtype)
        return nxt
