"""The trainer role of an RL run: one process (`LocalTrainer`), or FSDP2 over `cluster.trainer_procs`
ranks (`FSDPTrainer`; gloo on CPU, NCCL on CUDA) with the controller on rank 0.

Layout (verl's single controller, with the controller co-located on trainer rank 0): rank 0 runs the
whole RL loop -- rollout engines, reward pool, Seamless Rollout scheduler, checkpoints, logs -- and
holds one shard of the policy. Ranks 1..N-1 only train: they wait for rank 0's next command (a
pickled message on a gloo group, even under NCCL), run the same collective code, and wait again. A
step is "train" (rank 0 broadcasts the step's GRPO rows and learning rate; every rank runs the same
mini-batch loop, each on its share of the rows, `thinkforge.cluster.fsdp.fsdp_update`), then "weights"
(the unsharded parameters gathered on rank 0 for the weight sync).

Launch: `thinkforge rl ... --set cluster.trainer_procs=N` spawns ranks 1..N-1 itself on this machine
(`python -m thinkforge.cluster.trainer`), each watching its parent so a SIGKILLed driver takes them
with it. Across machines, start every rank with torchrun (`torchrun --nnodes 2 --nproc_per_node 8 -m
thinkforge.cli rl ... --set cluster.trainer_procs=16`): RANK/WORLD_SIZE then come from torchrun and
ranks other than 0 turn into trainer ranks.

Checkpoints are gathered, not sharded: rank 0 writes the same `checkpoint/` a one-process run writes
(HF model dir + `trainer.pt` with the optimizer state keyed by parameter index), so a run may resume
with another `trainer_procs`, 1 included; every rank reads it back (a shared filesystem across nodes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from thinkforge.errors import ThinkforgeError

RANK_SPEC = ".trainer_ranks.json"  # in out_dir: the config the spawned ranks build the same policy from

# ---------------------------------------------------------------------------------------- one process


class LocalTrainer:
    """Today's trainer: the policy and its optimizer in this process."""

    world = 1

    def __init__(self, cfg: Any, model: Any, ref: Any, pad_id: int, device: Any) -> None:
        from thinkforge.train.common import make_optimizer

        self.cfg, self.model, self.ref, self.pad_id, self.device = cfg, model, ref, pad_id, device
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)

    def load(self, out_dir: Path) -> dict[str, Any] | None:
        from thinkforge.train.common import load_checkpoint

        return load_checkpoint(out_dir, self.model, self.optimizer)

    def train(self, groups: list[Any], step: int) -> dict[str, float]:
        from thinkforge.train.rl import _train_step

        return _train_step(self.model, self.ref, self.optimizer, groups, self.cfg, self.pad_id, self.device, step)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}

    def save(self, out_dir: Path, tokenizer: Any, state: dict[str, Any]) -> None:
        from thinkforge.train.common import save_checkpoint

        save_checkpoint(out_dir, self.model, tokenizer, self.optimizer, state)

    def finalize(self, out_dir: Path, tokenizer: Any) -> Path:
        from thinkforge.train.common import finalize

        return finalize(out_dir, self.model, tokenizer)

    def close(self, ok: bool = True) -> None:
        pass


# ---------------------------------------------------------------------------------------- FSDP2 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: str) -> str:
    """This rank's device: `cuda` means the rank's local GPU (LOCAL_RANK)."""
    if str(device) == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return str(device)


def launched_rank() -> tuple[int, int] | None:
    """(rank, world size) when a launcher (torchrun) started this process as one rank of several."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _index_keyed(fqn_sd: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict keyed by parameter name -> the layout of `optimizer.state_dict()`
    (parameters numbered in param-group order), which a one-process run loads as is."""
    names = [n for g in fqn_sd["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in fqn_sd["param_groups"]]
    return {"state": {index[n]: s for n, s in fqn_sd["state"].items()}, "param_groups": groups}


def _name_keyed(sd: dict[str, Any], model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The inverse of `_index_keyed`, numbered by this optimizer's own param groups."""
    ids = {id(p): n for n, p in model.named_parameters()}
    if len(sd["param_groups"]) != len(optimizer.param_groups):
        raise ThinkforgeError(f"fsdp: checkpoint optimizer has {len(sd['param_groups'])} param groups, "
                              f"this model's has {len(optimizer.param_groups)}")
    names = [ids[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = []
    for saved, mine in zip(sd["param_groups"], optimizer.param_groups, strict=True):
        if len(saved["params"]) != len(mine["params"]):
            raise ThinkforgeError("fsdp: checkpoint optimizer does not match the model's parameters")
        groups.append({**saved, "params": [names[i] for i in saved["params"]]})
    return {"state": {names[i]: s for i, s in sd["state"].items()}, "param_groups": groups}


class FSDPRank:
    """What every rank holds and does: the sharded policy, its optimizer, and the collective steps."""

    def __init__(self, cfg: Any, model: Any, ref: Any, pad_id: int, device: str, gloo: Any) -> None:
        from thinkforge.cluster.fsdp import shard_model
        from thinkforge.train.common import make_optimizer

        self.cfg, self.ref, self.pad_id, self.device, self.gloo = cfg, ref, pad_id, device, gloo
        self.model = shard_model(model, device)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()

    def message(self, obj: Any = None) -> Any:
        """Rank 0's `obj`, on every rank."""
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.gloo)
        return box[0]

    def load(self, out_dir: Path) -> dict[str, Any] | None:
        """Every rank reads the gathered checkpoint and keeps its shard; returns the trainer state."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from thinkforge.train.common import set_rng_state

        ckpt = Path(out_dir) / "checkpoint"
        if not (ckpt / "trainer.pt").exists():
            return None
        weights = load_file(str(ckpt / "model" / "model.safetensors"))
        names = {n for n, _ in self.model.named_parameters()}
        missing = sorted(names - set(weights))
        if missing:
            raise ThinkforgeError(f"{ckpt}: checkpoint does not match the model (missing {missing[:3]})")
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, {k: v for k, v in weights.items() if k in names}, options=opts)
        blob = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(self.model, self.optimizer, _name_keyed(blob["optimizer"], self.model, self.optimizer),
                                 options=StateDictOptions(full_state_dict=True))
        if self.rank == 0:
            set_rng_state(blob["rng"])
        return blob["state"]

    def train(self, samples: list[Any], extra: dict[str, Any], step: int, lr: float) -> dict[str, float]:
        from thinkforge.cluster.fsdp import fsdp_update
        from thinkforge.train.rl import _train_samples

        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return _train_samples(self.model, self.ref, self.optimizer, samples, extra, self.cfg, self.pad_id,
                              self.device, step, update=fsdp_update)

    def weights(self) -> dict[str, torch.Tensor]:
        from thinkforge.cluster.fsdp import full_weights

        return full_weights(self.model)

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(unsharded weights, index-keyed optimizer state) on rank 0; every rank takes part."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights = self.weights()
        optim = get_optimizer_state_dict(self.model, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return weights, (_index_keyed(optim) if self.rank == 0 else {})

    def serve(self) -> None:
        """The loop of ranks 1..N-1: run rank 0's commands until it says stop."""
        while True:
            cmd = self.message()
            if cmd[0] == "train":
                self.train(*cmd[1:])
            elif cmd[0] == "weights":
                self.weights()
            elif cmd[0] == "save":
                self.full_state()
            elif cmd[0] == "stop":
                return
            else:
                raise ThinkforgeError(f"fsdp rank {self.rank}: unknown command {cmd[0]!r}")


def _save_hf(model: Any, weights: dict[str, torch.Tensor], tokenizer: Any, path: Path) -> None:
    """An HF directory from gathered weights (the sharded module's config, the full tensors)."""
    from thinkforge.model.io import quiet_hf

    quiet_hf()
    model.save_pretrained(path, state_dict={k: v.contiguous() for k, v in weights.items()}, safe_serialization=True)
    tokenizer.save_pretrained(path)


class FSDPTrainer:
    """Rank 0's side: the `LocalTrainer` interface, each call first telling the other ranks what to run."""

    def __init__(self, cfg: Any, model: Any, ref: Any, pad_id: int, device: Any) -> None:
        from thinkforge.cluster.fsdp import init_distributed

        n = cfg.cluster_config().trainer_procs
        self.cfg = cfg
        self.procs: list[subprocess.Popen] = []
        launched = launched_rank()
        if launched is None:  # this process is rank 0 of ranks it starts itself (one machine)
            init = f"tcp://127.0.0.1:{_free_port()}"
            self.procs = spawn_ranks(cfg, n, init)
            backend = "nccl" if str(device).startswith("cuda") else "gloo"
            try:
                torch.distributed.init_process_group(backend, init_method=init, rank=0, world_size=n,
                                                     timeout=timedelta(seconds=cfg.cluster_config().trainer_timeout_s))
            except BaseException:
                self.close(ok=False)
                raise
        else:
            if launched[1] != n:
                raise ThinkforgeError(f"cluster.trainer_procs={n} but the launcher started {launched[1]} ranks")
            init_distributed(str(device))
        try:
            gloo = torch.distributed.new_group(backend="gloo")
            self.rank = FSDPRank(cfg, model, ref, pad_id, str(device), gloo)
        except BaseException:
            self.close(ok=False)
            raise
        self.world = n
        self.model, self.optimizer = self.rank.model, self.rank.optimizer
        self.cfg, self.pad_id, self.device = cfg, pad_id, device
        self._started = True

    def load(self, out_dir: Path) -> dict[str, Any] | None:
        return self.rank.load(out_dir)  # every rank runs the same load right after start-up

    def train(self, groups: list[Any], step: int) -> dict[str, float]:
        from thinkforge.train.rl import _build_train_samples

        samples, extra = _build_train_samples(groups, self.cfg)
        lr = self.optimizer.param_groups[0]["lr"]
        self.rank.message(("train", samples, extra, step, lr))
        return self.rank.train(samples, extra, step, lr)

    def weights(self) -> dict[str, torch.Tensor]:
        self.rank.message(("weights",))
        return self.rank.weights()

    def save(self, out_dir: Path, tokenizer: Any, state: dict[str, Any]) -> None:
        from thinkforge.train.common import rng_state
        from thinkforge.utils import atomic_dir

        self.rank.message(("save",))
        weights, optim = self.rank.full_state()
        with atomic_dir(Path(out_dir) / "checkpoint") as tmp:
            _save_hf(self.model, weights, tokenizer, tmp / "model")
            torch.save({"optimizer": optim, "rng": rng_state(), "state": state}, tmp / "trainer.pt")

    def finalize(self, out_dir: Path, tokenizer: Any) -> Path:
        import shutil

        from thinkforge.utils import atomic_dir

        weights = self.weights()
        path = Path(out_dir) / "model"
        with atomic_dir(path) as tmp:
            _save_hf(self.model, weights, tokenizer, tmp)
        shutil.rmtree(Path(out_dir) / "checkpoint", ignore_errors=True)
        return path

    def close(self, ok: bool = True) -> None:
        """`ok`: the ranks are between commands (stop them cleanly); otherwise they may be inside a collective
        rank 0 left, so the ranks it started are killed."""
        if ok and getattr(self, "_started", False):
            self.rank.message(("stop",))
            for p in self.procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
        else:
            for p in self.procs:
                p.kill()
                p.wait()
        bad = [p.returncode for p in self.procs if p.returncode not in (0, -9)]
        if self.procs:
            (Path(self.cfg.out_dir) / RANK_SPEC).unlink(missing_ok=True)
        self._started = False
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if ok and bad:
            raise ThinkforgeError(f"fsdp: trainer ranks exited with codes {bad}")


def make_trainer(cfg: Any, model: Any, ref: Any, pad_id: int, device: Any) -> LocalTrainer | FSDPTrainer:
    if cfg.cluster_config().trainer_procs > 1:
        return FSDPTrainer(cfg, model, ref, pad_id, device)
    return LocalTrainer(cfg, model, ref, pad_id, device)


# ---------------------------------------------------------------------------------------- ranks 1..N-1


def spawn_ranks(cfg: Any, n: int, init: str) -> list[subprocess.Popen]:
    """Starts ranks 1..n-1 of the trainer on this machine (rank 0 is the calling process)."""
    from thinkforge.utils import asdict

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / RANK_SPEC
    spec.write_text(json.dumps({"config": asdict(cfg), "init": init, "world": n}), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = []
    for rank in range(1, n):
        env_r = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n)}
        procs.append(subprocess.Popen([sys.executable, "-m", "thinkforge.cluster.trainer", str(spec), str(rank),
                                       str(os.getpid())], env=env_r))
    return procs


def _watch_parent(parent: int) -> None:
    """A rank started by the driver exits when the driver is gone (SIGKILL included)."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="watch-driver", daemon=True).start()


def run_rank(cfg: Any, rank: int, world: int, init: str | None = None) -> None:
    """Ranks 1..N-1: build the same policy as rank 0, shard it, then serve rank 0's commands."""
    import copy

    from thinkforge.engine.loading import resolve_dtype
    from thinkforge.model.io import load_model, resolve_device
    from thinkforge.model.mtp import freeze_mtp
    from thinkforge.utils import seed_everything

    seed_everything(cfg.seed)
    device = rank_device(resolve_device(cfg.device))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if init is not None:
        torch.distributed.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                             timeout=timedelta(seconds=cfg.cluster_config().trainer_timeout_s))
    else:
        torch.distributed.init_process_group(backend)
    try:
        gloo = torch.distributed.new_group(backend="gloo")
        model, tokenizer = load_model(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
        if not cfg.train_mtp:
            freeze_mtp(model)
        ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
        model.train()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        worker = FSDPRank(cfg, model, ref, pad_id, device, gloo)
        worker.load(Path(cfg.out_dir))
        worker.serve()
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str]) -> None:
    from thinkforge.train.rl import RLConfig
    from thinkforge.utils import build_config

    spec_path, rank, parent = argv[0], int(argv[1]), int(argv[2])
    _watch_parent(parent)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    run_rank(build_config(RLConfig, spec["config"], "fsdp rank"), rank, spec["world"], spec["init"])
    # The group is destroyed (run_rank's finally); skip interpreter finalization, where gloo's C++ threads can
    # still abort the process (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291),
    # which rank 0 would report as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
