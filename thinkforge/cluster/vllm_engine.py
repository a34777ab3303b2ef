"""vLLM as a `RolloutEngine` (GPU; the optional `vllm` extra, imported only here, only when asked for).

Runs vLLM's engine in the controller's process, colocated with the trainer on the same GPU:
`add_request` / `abort_request` / `step` map one to one onto vLLM's `LLMEngine`, log-probs are the
processed ones (after temperature / top-p, the quantity the trainer recomputes), and a weight update
goes bucket by bucket into the workers' models (`collective_rpc` -> `model.load_weights`), then the
prefix cache is reset so no cached KV of the old weights is reused. Speculative decoding is vLLM's
own (`speculative_config`, e.g. MTP for MiMo checkpoints) when `speculative="mtp"`.

Not testable on the CPU-only machine that builds thinkforge: `scripts/gpu_check.sh` runs it on a GPU.
"""

from __future__ import annotations

import os
from typing import Any

from thinkforge.cluster.roles import generate_blocking
from thinkforge.cluster.weights import VersionedReceiver, WeightBucket, check_ack, pack_buckets
from thinkforge.engine.base import Completion, SamplingParams
from thinkforge.engine.native import SequenceOutput
from thinkforge.errors import ThinkforgeError


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise ThinkforgeError("cluster.rollout_engine=vllm needs vllm installed (pip install 'thinkforge[vllm]', "
                              "GPU only); use cluster.rollout_engine=native instead") from None
    return vllm


def _load_bucket_on_worker(worker: Any, named: list[tuple[str, Any]]) -> bool:
    """Runs inside each vLLM worker: vLLM's own loader maps HF names onto its fused layers."""
    worker.model_runner.model.load_weights(weights=named)
    return True


class VLLMRolloutEngine:
    def __init__(self, model: str, tokenizer: Any, *, seed: int = 0, dtype: str = "auto", max_batch_size: int = 128,
                 speculative: str | None = None, num_draft: int = 1, gpu_memory_utilization: float = 0.5,
                 **kwargs: Any) -> None:
        vllm = import_vllm()
        # In-process engine core: weight updates reach the model without pickling callables across processes.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        kw: dict[str, Any] = {"model": model, "seed": seed, "dtype": dtype, "max_num_seqs": max_batch_size,
                              "enable_prefix_caching": True, "gpu_memory_utilization": gpu_memory_utilization,
                              "logprobs_mode": "processed_logprobs", **kwargs}
        if speculative == "mtp":
            kw["speculative_config"] = {"method": "mtp", "num_speculative_tokens": num_draft}
        try:
            self.llm = vllm.LLM(**kw)
        except TypeError as err:  # older vLLM without logprobs_mode: raw log-probs would not match the trainer's
            raise ThinkforgeError(f"vllm {vllm.__version__}: {err}; thinkforge needs vllm >= 0.10.2 "
                                  "(processed log-probs)") from None
        self.engine = self.llm.llm_engine
        self._receiver = VersionedReceiver(self._load, -1)
        self._n: dict[str, int] = {}
        self._delivered: dict[str, set[int]] = {}
        self._rows = 0
        self._aborted: list[str] = []

    @property
    def weight_version(self) -> int:
        return self._receiver.version

    @property
    def num_running(self) -> int:
        return self._rows

    @property
    def num_waiting(self) -> int:
        return 0

    def _params(self, p: SamplingParams) -> Any:
        from vllm.sampling_params import RequestOutputKind

        p.validate()
        return self._vllm.SamplingParams(
            n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or -1, max_tokens=p.max_tokens,
            stop=p.stop or None, stop_token_ids=p.stop_token_ids or None, seed=p.seed,
            logprobs=0 if p.logprobs else None, output_kind=RequestOutputKind.FINAL_ONLY)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str) -> str:
        if request_id in self._n:
            raise ThinkforgeError(f"request id {request_id!r} is already in flight")
        self.engine.add_request(request_id, {"prompt_token_ids": list(prompt_ids)}, self._params(params))
        self._n[request_id], self._delivered[request_id] = params.n, set()
        self._rows += params.n
        return request_id

    def abort(self, request_id: str) -> None:
        if request_id in self._n:
            self.engine.abort_request([request_id])
            self._aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._n)

    def step(self) -> list[SequenceOutput]:
        out: list[SequenceOutput] = []
        for rid in self._aborted:  # vLLM drops aborted requests silently
            for i in range(self._n.get(rid, 0)):
                if i not in self._delivered.get(rid, {i}):
                    out.append(self._deliver(rid, i, Completion("", [], "abort", [])))
        self._aborted = []
        if self.engine.has_unfinished_requests():
            for r in self.engine.step():
                for c in r.outputs:
                    if c.finish_reason is None or r.request_id not in self._n or c.index in self._delivered[r.request_id]:
                        continue
                    lp = [d[t].logprob for d, t in zip(c.logprobs, c.token_ids, strict=False)] if c.logprobs else []
                    reason = "stop" if c.finish_reason == "stop" else "length" if c.finish_reason == "length" else "abort"
                    comp = Completion(c.text, list(c.token_ids), reason, lp, len(r.prompt_token_ids or []))
                    out.append(self._deliver(r.request_id, c.index, comp))
        return out

    def _deliver(self, rid: str, index: int, comp: Completion) -> SequenceOutput:
        self._delivered[rid].add(index)
        self._rows -= 1
        if len(self._delivered[rid]) == self._n[rid]:
            del self._n[rid], self._delivered[rid]
        return SequenceOutput(rid, index, comp)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return generate_blocking(self, prompts, params, prefix="vllm-gen")

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    # ------------------------------------------------------------ weights
    def _load(self, named: dict[str, Any]) -> None:
        self.llm.collective_rpc(_load_bucket_on_worker, args=(list(named.items()),))

    def load_weight_buckets(self, buckets: list[WeightBucket], version: int) -> int:
        got = self._receiver.receive(buckets, version)
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        return got

    def named_weights(self) -> dict[str, Any]:
        raise ThinkforgeError("vllm engine: weights live in vLLM's fused layout; compare generations instead")

    def close(self) -> None:
        for rid in list(self._n):
            self.engine.abort_request([rid])
        self._n.clear()


class VLLMWeightSync:
    """Trainer -> colocated vLLM: buckets stay on the GPU (no host copy), loaded by vLLM's own loader."""

    def __init__(self, engine: VLLMRolloutEngine, bucket_bytes: int) -> None:
        self.engine, self.bucket_bytes = engine, bucket_bytes

    def push(self, named: dict[str, Any], version: int) -> float:
        import time

        import torch

        t = time.perf_counter()
        with torch.no_grad():
            buckets = pack_buckets(named, version, self.bucket_bytes)
        check_ack(self.engine.load_weight_buckets(buckets, version), version, "vllm engine")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t

