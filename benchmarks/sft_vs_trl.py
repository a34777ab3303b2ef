"""SFT throughput and loss, side by side: thinkforge packed vs thinkforge padded vs TRL `SFTTrainer`.

Same tiny Qwen2 (the speedrun's 0.85M `tiny` preset unless --model), same conversations (arith + code
teacher traces), same batch size, steps, learning rate and cosine schedule; loss on completion tokens
only everywhere. Reported: training tokens/s counting only real (non-padding) tokens over the summed
step times, and held-out loss (thinkforge's `eval_loss`, the same examples for all) at the end.

    python benchmarks/sft_vs_trl.py --steps 60 --out results/sft_vs_trl.json
    python benchmarks/sft_vs_trl.py --device cuda --model-size small --steps 100   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def build_data(tmp: Path, n_per_task: int, seed: int) -> tuple[Path, list]:
    from thinkforge.tasks import get_task

    rows, held = [], []
    for name in ("arith", "code"):
        task = get_task(name)
        rows += [task.messages(p) + [{"role": "assistant", "content": p.solution}]
                 for p in task.problems("train", n=n_per_task, seed=seed)]
        held += [task.messages(p) + [{"role": "assistant", "content": p.solution}]
                 for p in task.problems("heldout", n=64, seed=seed)]
    random.Random(seed).shuffle(rows)
    path = tmp / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path, held


def heldout(model_dir: str, held: list, device: str) -> float:
    from thinkforge.model.io import load_model
    from thinkforge.train.sft import encode, eval_loss

    model, tok = load_model(model_dir, device=device, dtype="float32")
    return eval_loss(model, [encode(c, tok, 512) for c in held], tok.pad_token_id, 32, device)


def run_thinkforge(model: str, data: Path, held: list, out: Path, args: argparse.Namespace, packing: bool) -> dict:
    from thinkforge.train.sft import SFTConfig, sft

    summary = sft(SFTConfig(model=model, data=str(data), out_dir=str(out), steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, warmup_steps=args.warmup, eval_every=10**9, eval_examples=0,
                            save_every=10**9, device=args.device, packing=packing, tensorboard=False, seed=args.seed))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    prev = [0] + [r["tokens"] for r in rows[:-1]]
    step_s = sum((r["tokens"] - p) / r["tokens_per_s"] for r, p in zip(rows, prev, strict=True))
    return {"real_tokens": summary["tokens"], "train_s": step_s, "tokens_per_s": summary["tokens"] / step_s,
            "final_train_loss": rows[-1]["loss"], "heldout_loss": heldout(summary["model_dir"], held, args.device)}


def run_trl(model_dir: str, data: Path, held: list, out: Path, args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    # prompt-completion format: TRL puts the loss on the completion only (its default for this format).
    ds = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    cfg = SFTConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                    learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=args.device == "cpu", max_length=512, seed=args.seed,
                    dataloader_num_workers=0, bf16=args.device.startswith("cuda"), packing=False,
                    max_grad_norm=1.0, weight_decay=0.0, adam_beta2=0.95)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    batch_tokens: list[int] = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        batch_tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else
                            int((batch["input_ids"] != tok.pad_token_id).sum()))
        return batch

    trainer.data_collator = counting
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(StepTimer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    # the dataloader prefetches a batch beyond the last step: count only the batches that were trained
    tokens = sum(batch_tokens[: args.steps])
    return {"real_tokens": tokens, "train_s": sum(times), "tokens_per_s": tokens / sum(times),
            "final_train_loss": losses[-1] if losses else None,
            "heldout_loss": heldout(str(out / "model"), held, args.device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--model", default=None, help="HF checkpoint (default: a fresh tiny Qwen2 from our pretrainer)")
    ap.add_argument("--model-size", default="tiny")
    ap.add_argument("--examples-per-task", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/sft_vs_trl.json")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from thinkforge.train.pretrain import PretrainConfig, pretrain

    tmp = Path(tempfile.mkdtemp(prefix="sft_bench_"))
    model = args.model or pretrain(PretrainConfig(out_dir=str(tmp / "base"), model_size=args.model_size, steps=2,
                                                  batch_size=4, seq_len=64, docs_per_stage=300, eval_docs=8,
                                                  save_every=100, warmup_steps=1, device=args.device))["model_dir"]
    data, held = build_data(tmp, args.examples_per_task, args.seed)
    results = {
        "thinkforge packed": run_thinkforge(model, data, held, tmp / "packed", args, packing=True),
        "thinkforge padded": run_thinkforge(model, data, held, tmp / "padded", args, packing=False),
    }
    if not args.skip_trl:
        results["TRL SFTTrainer"] = run_trl(model, data, held, tmp / "trl", args)
    base = results.get("TRL SFTTrainer", results["thinkforge padded"])["tokens_per_s"]
    print(f"\n{'run':<20} {'real tokens':>12} {'train s':>9} {'tokens/s':>10} {'vs ref':>7} {'train loss':>11} "
          f"{'held-out loss':>14}")
    for name, r in results.items():
        r["speedup_vs_reference"] = r["tokens_per_s"] / base
        print(f"{name:<20} {r['real_tokens']:>12,} {r['train_s']:>9.2f} {r['tokens_per_s']:>10,.0f} "
              f"{r['speedup_vs_reference']:>6.2f}x {r['final_train_loss']:>11.4f} {r['heldout_loss']:>14.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from thinkforge.utils import run_metadata

    out.write_text(json.dumps({"results": results, **run_metadata(vars(args), args.seed),
                               "torch_threads": torch.get_num_threads()}, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
