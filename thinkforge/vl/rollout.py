"""MORL rollouts: the Seamless Rollout scheduler and the GRPO trainer of the text RL stack, on VL models.

- `VLRolloutEngine` implements the `thinkforge.cluster.roles.RolloutEngine` interface with HF
  `generate` (through `HFVLBackend`: vision tokens suppressed, 3D MRoPE, policy log-probs). A request
  with images comes in through `add_encoded`, which binds the processor's encoding (ids and pixels) to
  the request id: prompts of one task share their text, so equal prompt ids say nothing about the image.
  Each `step` generates every queued request to the end: requests with the same sampling settings share
  batched `generate` calls (left-padded, at most `max_batch_size` rows), seeded with the batch's first
  request seed, so a rerun of the same queue matches; it trades the native engine's continuous batching
  (text-only) for simplicity.
- `VLSeamlessRollout` is `SeamlessRollout` with prompts encoded by the VL processor; every group it
  admits carries its prompt's vision inputs (`Group.mm`), which `thinkforge.train.grpo.build_samples`
  hands to the trainer. Dynamic sampling, the easy pool, the reward router and the GRPO objective are
  the text stack's own.
"""

from __future__ import annotations

from typing import Any

import torch

from thinkforge.engine.base import Completion, SamplingParams
from thinkforge.engine.native import SequenceOutput
from thinkforge.errors import ThinkforgeError
from thinkforge.rollout.engine import SeamlessRollout
from thinkforge.vl.backend import HFVLBackend, split_images
from thinkforge.vl.processor import VLEncoding


class VLRolloutEngine:
    def __init__(self, model: Any, processor: Any, max_batch_size: int = 64, version: int = -1) -> None:
        from thinkforge.cluster.weights import VersionedReceiver

        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.backend = HFVLBackend((model, processor), batch_size=max_batch_size)
        self.max_batch_size = max_batch_size
        self._receiver = VersionedReceiver(self.load_weights, version)
        self._queue: list[tuple[str, VLEncoding, SamplingParams]] = []

    @property
    def weight_version(self) -> int:
        return self._receiver.version

    @property
    def num_running(self) -> int:
        return 0  # nothing runs between steps: a step generates its requests to the end

    @property
    def num_waiting(self) -> int:
        return sum(p.n for _, _, p in self._queue)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str) -> str:
        """A text-only request; one whose prompt holds image tokens must come with its images (`add_encoded`)."""
        if self.processor.image_token_id in prompt_ids:
            raise ThinkforgeError(f"request {request_id}: prompt has image tokens but no images; use add_encoded")
        return self.add_encoded(VLEncoding(list(prompt_ids), [0] * len(prompt_ids)), params, request_id=request_id)

    def add_encoded(self, enc: VLEncoding, params: SamplingParams, *, request_id: str) -> str:
        self._queue.append((request_id, enc, params))
        return request_id

    def abort(self, request_id: str) -> None:
        self._queue = [q for q in self._queue if q[0] != request_id]

    def step(self) -> list[SequenceOutput]:
        import dataclasses

        queue, self._queue = self._queue, []
        batches: dict[str, list[tuple[str, VLEncoding, SamplingParams]]] = {}
        for item in queue:  # one batch per sampling setting (seeds aside), in queue order
            batches.setdefault(repr(dataclasses.replace(item[2], seed=None)), []).append(item)
        out = []
        for items in batches.values():
            per_call = max(1, self.max_batch_size // items[0][2].n)  # prompts per generate: rows <= max_batch_size
            for start in range(0, len(items), per_call):
                chunk = items[start:start + per_call]
                comps = self.backend.generate_encoded([enc for _, enc, _ in chunk], chunk[0][2])
                for (rid, _, _), samples in zip(chunk, comps, strict=True):
                    out += [SequenceOutput(rid, i, comp) for i, comp in enumerate(samples)]
        return out

    def has_unfinished(self) -> bool:
        return bool(self._queue)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Text-only prompts (prompts with images go through `backend.generate_encoded` with their encodings)."""
        if any(self.processor.image_token_id in p for p in prompts):
            raise ThinkforgeError("generate: a prompt has image tokens but no images; use backend.generate_encoded")
        return self.backend.generate_encoded([VLEncoding(list(p), [0] * len(p)) for p in prompts], params)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state_dict.items():
                if name not in params or params[name].shape != tensor.shape:
                    raise ThinkforgeError(f"load_weights: unknown parameter or shape {name!r} {tuple(tensor.shape)}")
                params[name].copy_(tensor)

    def load_weight_buckets(self, buckets: list[Any], version: int) -> int:
        return self._receiver.receive(buckets, version)

    def close(self) -> None:
        self._queue = []


def build_vl_roles(cfg: Any, model: Any, processor: Any, router: Any) -> Any:
    """The in-process roles of an RL run on a VL policy (`thinkforge.train.rl` on a VL checkpoint): this
    engine sampling from a copy of the trainer's model, the router as reward pool, in-process weight sync."""
    import copy

    from thinkforge.cluster.setup import Roles
    from thinkforge.cluster.weights import InProcessWeightSync

    if cfg.cluster_config().backend != "local" or cfg.speculative:
        raise ThinkforgeError("rl: VL policies run in-process (cluster backend local, no speculative decoding)")
    engine = VLRolloutEngine(copy.deepcopy(model).requires_grad_(False).eval(), processor,
                             max_batch_size=cfg.engine_max_batch)
    return Roles(engine, router, InProcessWeightSync(engine, int(cfg.cluster_config().bucket_mb * (1 << 20))))


class VLSeamlessRollout(SeamlessRollout):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # problem id -> its encoding (ids, pixels, token types), held from `prompt_ids` until the request is
        # submitted: pixels for every problem a long run sees would grow without bound (ids alone are cached)
        self._pending: dict[str, VLEncoding] = {}

    def _encode(self, problem: Any) -> VLEncoding:
        where = f"problem {problem.id}"
        messages, images = split_images(self.tasks[problem.task].messages(problem, self.cfg.system_prompt), where)
        return self.engine.processor.encode_chat(messages, images, where=where)

    def prompt_ids(self, slot: Any) -> list[int]:
        pid = slot.problem.id
        if pid not in self._prompt_cache:
            self._pending[pid] = enc = self._encode(slot.problem)
            self._prompt_cache[pid] = enc.input_ids
        return self._prompt_cache[pid]

    def _submit(self, g: Any, params: SamplingParams) -> None:
        # The request carries its own problem's images: every count prompt has the same ids.
        enc = self._pending.pop(g.slot.problem.id, None) or self._encode(g.slot.problem)
        g.mm = {"pixel_values": enc.pixel_values, "image_grid_thw": enc.image_grid_thw,
                "mm_token_type_ids": enc.mm_token_type_ids, "suppress_ids": self.engine.processor.vision_token_ids}
        self.engine.add_encoded(enc, params, request_id=g.request_id)
