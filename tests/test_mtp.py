"""MTP layers: MiMo's exact layout, save/load beside the HF model, MiMo checkpoints, loss, extension, freezing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from thinkforge.engine.testing import build_tiny_model, build_tokenizer
from thinkforge.errors import ThinkforgeError
from thinkforge.model import mtp as M
from thinkforge.model.io import load_model, save_model

# Every tensor of one MiMo-7B MTP layer (names as in XiaomiMiMo/MiMo-7B-RL's model.safetensors index).
MIMO_LAYER_KEYS = {
    "token_layernorm.weight", "hidden_layernorm.weight", "input_proj.weight", "final_layernorm.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny(tok, n_mtp=1, seed=0, **kw):
    model = build_tiny_model(tok, seed=seed, **kw)
    if n_mtp:
        torch.manual_seed(seed + 1)
        M.add_mtp_layers(model, n_mtp)
    return model.eval()


def test_layout_is_mimos(tok):
    model = tiny(tok, 2)
    h = model.config.hidden_size
    names = {k for k in model.state_dict() if k.startswith("model.mtp_layers.")}
    assert names == {f"model.mtp_layers.{i}.{k}" for i in range(2) for k in MIMO_LAYER_KEYS}
    assert tuple(model.state_dict()["model.mtp_layers.0.input_proj.weight"].shape) == (h, 2 * h)
    assert model.config.num_nextn_predict_layers == 2
    # Each MTP layer has its own KV-cache slot after the main layers, as vLLM numbers them.
    assert [layer.self_attn.layer_idx for layer in model.model.mtp_layers] == [2, 3]


def test_mtp_forward_semantics(tok):
    """Layer 0 at t reads [hidden_layernorm(h_t), token_layernorm(embed(x_{t+1}))], embedding zeroed at t=0."""
    model = tiny(tok, 1)
    x = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        logits, (mtp0,) = M.mtp_forward(model, x)
        inner, layer = model.model, model.model.mtp_layers[0]
        h = inner(input_ids=x).last_hidden_state
        emb = inner.embed_tokens(torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1))
        emb[:, 0] = 0
        z = layer.input_proj(torch.cat([layer.hidden_layernorm(h), layer.token_layernorm(emb)], -1))
        pos = torch.arange(9)[None].expand(2, 9)
        z = layer(z, position_ids=pos, position_embeddings=inner.rotary_emb(z, pos))
        z = z[0] if isinstance(z, tuple) else z
        manual = model.lm_head(layer.final_layernorm(z))
    assert torch.allclose(logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-5)
    assert torch.allclose(mtp0, manual, rtol=1e-4, atol=1e-5)


def test_loss_weight_schedule_and_targets(tok):
    assert M.mtp_weight(0, 100) == 0.3 and M.mtp_weight(39, 100) == 0.3
    assert M.mtp_weight(40, 100) == pytest.approx(0.1) and M.mtp_weight(99, 100) == pytest.approx(0.1)
    model = tiny(tok, 2)
    x = torch.randint(3, 200, (2, 12))
    labels = x[:, 1:].clone()
    labels[:, :3] = -100  # e.g. SFT prompt tokens
    loss, ex = M.mtp_lm_loss(model, x[:, :-1], labels, weight=0.3, step=50, total_steps=100)
    expect = ex["lm_loss"] + 0.1 * (ex["mtp_loss_0"] + ex["mtp_loss_1"]) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    # Layer i's targets are the labels shifted by i + 1 (the token t + i + 2).
    logits, outs = M.mtp_forward(model, x[:, :-1])
    tgt = labels[:, 2:].flatten()
    manual = torch.nn.functional.cross_entropy(outs[1][:, :-2].flatten(0, 1), tgt, ignore_index=-100)
    assert ex["mtp_loss_1"] == pytest.approx(manual.item(), rel=1e-5)


def test_save_then_plain_transformers_and_thinkforge_load(tok, tmp_path):
    model = tiny(tok, 2)
    save_model(model, tok, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert {f"model.mtp_layers.1.{k}" for k in MIMO_LAYER_KEYS} <= keys
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["num_nextn_predict_layers"] == 2
    x = torch.randint(3, 200, (1, 7))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")  # MTP tensors ignored, main model intact
    assert not hasattr(plain.model, "mtp_layers")
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6)
    ours, _ = load_model(str(tmp_path / "ck"), device="cpu", dtype="float32")
    assert M.num_mtp_layers(ours) == 2
    with torch.no_grad():
        a, b = M.mtp_forward(ours, x)[1], M.mtp_forward(model, x)[1]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def _mimo_checkpoint(tok, path: Path, hidden: int = 64, mtp_hidden: int | None = None, shards: bool = True) -> dict:
    """A checkpoint written the way MiMo-7B ships: model_type mimo, MiMoForCausalLM, num_nextn_predict_layers,
    MTP tensors named model.mtp_layers.0.* in the safetensors (here split over two shards with an index)."""
    base = build_tiny_model(tok, hidden_size=hidden, seed=3)
    main = {k: v.contiguous() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    h = mtp_hidden or hidden
    inter = base.config.intermediate_size
    kv = base.config.num_key_value_heads * (h // base.config.num_attention_heads)
    shapes = {"token_layernorm.weight": (h,), "hidden_layernorm.weight": (h,), "input_proj.weight": (h, 2 * h),
              "final_layernorm.weight": (h,), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
              "self_attn.q_proj.weight": (h, h), "self_attn.q_proj.bias": (h,), "self_attn.k_proj.weight": (kv, h),
              "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
              "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
              "mlp.down_proj.weight": (h, inter)}
    mtp = {f"model.mtp_layers.0.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}
    path.mkdir(parents=True)
    cfg = base.config.to_dict()
    cfg.update(model_type="mimo", architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1)
    (path / "config.json").write_text(json.dumps(cfg))
    if shards:
        save_file(main, str(path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
        save_file(mtp, str(path / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
        weight_map = {**{k: "model-00001-of-00002.safetensors" for k in main},
                      **{k: "model-00002-of-00002.safetensors" for k in mtp}}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file({**main, **mtp}, str(path / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(path)
    return {"main": main, "mtp": mtp}


def test_mimo_layout_checkpoint_maps_every_name_and_shape(tok, tmp_path):
    tensors = _mimo_checkpoint(tok, tmp_path / "mimo")
    model, _ = load_model(str(tmp_path / "mimo"), device="cpu", dtype="float32")
    state = model.state_dict()
    assert M.num_mtp_layers(model) == 1
    for name, t in tensors["mtp"].items():
        assert torch.equal(state[name], t), name
    for name, t in tensors["main"].items():
        assert torch.equal(state[name], t), name
    # The engine's loader goes through the same registration (model_type mimo needs no remote code).
    from thinkforge.engine.loading import load_model_and_tokenizer

    eng_model, _ = load_model_and_tokenizer(str(tmp_path / "mimo"), "cpu", "float32")
    assert torch.equal(eng_model.state_dict()["model.mtp_layers.0.input_proj.weight"],
                       tensors["mtp"]["model.mtp_layers.0.input_proj.weight"])


def test_mismatched_hidden_size_is_a_clear_error(tok, tmp_path):
    _mimo_checkpoint(tok, tmp_path / "bad", hidden=64, mtp_hidden=32, shards=False)
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ThinkforgeError, match=r"model\.mtp_layers\.0\.\S+ has shape .* expects .*hidden_size 64"):
        load_model(str(tmp_path / "bad"), device="cpu", dtype="float32")
    model = tiny(tok, 0)
    cfg["num_nextn_predict_layers"] = 3  # the config promises more layers than the safetensors hold
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ThinkforgeError, match="num_nextn_predict_layers = 3 but the safetensors hold MTP layers"):
        M.load_mtp_layers(model, tmp_path / "bad")


def test_extension_copies_layer0_and_trains_only_the_copies(tok):
    model = tiny(tok, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    M.extend_mtp_layers(model, 3)
    assert model.config.num_nextn_predict_layers == 3
    l0 = model.model.mtp_layers[0].state_dict()
    for i in (1, 2):
        assert all(torch.equal(v, model.model.mtp_layers[i].state_dict()[k]) for k, v in l0.items())
        assert model.model.mtp_layers[i].self_attn.layer_idx == model.config.num_hidden_layers + i
    trainable = M.freeze_for_extension(model)
    assert trainable and all(n.startswith(("model.mtp_layers.1.", "model.mtp_layers.2.")) for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randint(3, 200, (2, 10))
    loss, _ = M.mtp_lm_loss(model, x[:, :-1], x[:, 1:], weight=1.0, train_layers=[1, 2], include_main=False)
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # main model and layer 0 untouched
    assert not torch.equal(after["model.mtp_layers.1.input_proj.weight"], before["model.mtp_layers.0.input_proj.weight"])


def test_self_distillation_targets_the_main_models_next_token_and_moves_only_the_chosen_layers(tok):
    torch.manual_seed(0)
    model = tiny(tok, 1)
    M.extend_mtp_layers(model, 2)
    x = torch.randint(3, 200, (2, 12))
    # Layer i at t is graded against the main model's distribution at t + i + 1 (what verification uses).
    logits, mtp_logits = M.mtp_forward(model, x)
    p = logits[:, 2:].float().softmax(-1)
    want = -(p * mtp_logits[1][:, :-2].float().log_softmax(-1)).sum(-1).mean()
    loss, extras = M.mtp_self_distill_loss(model, x, train_layers=[1])
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert extras["mtp_kl_0"] > 0 and 0 <= extras["mtp_agree_1"] <= 1
    entropy = -(p * logits[:, 2:].float().log_softmax(-1)).sum(-1).mean()
    assert extras["mtp_kl_1"] == pytest.approx((want - entropy).item(), rel=1e-4)
    # Training the chosen layers lowers their KL to the main model and leaves everything else as it was.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    M.freeze_for_extension(model, first=0)
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=3e-3)
    kl0 = extras["mtp_kl_0"]
    for _ in range(30):
        loss, extras = M.mtp_self_distill_loss(model, x, train_layers=[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert extras["mtp_kl_0"] < 0.5 * kl0
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert changed and all(k.startswith("model.mtp_layers.0.") for k in changed)


def test_freeze_mtp_for_rl(tok):
    model = tiny(tok, 2)
    assert M.freeze_mtp(model) == len(list(model.model.mtp_layers.parameters()))
    assert not any(p.requires_grad for p in model.model.mtp_layers.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "mtp_layers" not in n)
    from thinkforge.train.common import make_optimizer

    opt = make_optimizer(model, 1e-3, 0.0)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in ids for p in model.model.mtp_layers.parameters())
    assert M.freeze_mtp(tiny(tok, 0)) == 0  # no MTP layers: nothing to do


def test_pretrain_with_mtp_saves_and_resumes(tmp_path):
    from thinkforge.train.pretrain import PretrainConfig, pretrain

    cfg = dict(model_size="micro", batch_size=4, seq_len=48, docs_per_stage=120, eval_docs=8, warmup_steps=1,
               steps=4, eval_every=2, save_every=2, mtp_layers=1, lr=3e-3)
    summary = pretrain(PretrainConfig(out_dir=str(tmp_path / "a"), **cfg))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("mtp_loss_0" in r and r["mtp_weight"] in (0.3, pytest.approx(0.1)) for r in rows)
    assert rows[0]["mtp_weight"] == 0.3 and rows[-1]["mtp_weight"] == pytest.approx(0.1)
    model, _ = load_model(summary["model_dir"], device="cpu", dtype="float32")
    assert M.num_mtp_layers(model) == 1
    # Continuing from the checkpoint dir keeps (and trains) the MTP layers.
    cont = pretrain(PretrainConfig(out_dir=str(tmp_path / "b"), model=summary["model_dir"],
                                   **{**cfg, "steps": 2}))
    m2, _ = load_model(cont["model_dir"], device="cpu", dtype="float32")
    assert M.num_mtp_layers(m2) == 1
    assert not torch.equal(m2.state_dict()["model.mtp_layers.0.input_proj.weight"],
                           model.state_dict()["model.mtp_layers.0.input_proj.weight"])


def test_sft_trains_mtp_layers_with_unpacked_rows(tmp_path):
    """SFT of a model with MTP layers adds the MTP loss (MiMo), one conversation per row; mtp_weight=0 leaves
    the layers exactly as they were; the MTP term's targets are the labels shifted one further."""
    from thinkforge.train.pretrain import PretrainConfig, pretrain
    from thinkforge.train.sft import SFTConfig, sft, token_losses

    pre = pretrain(PretrainConfig(out_dir=str(tmp_path / "pre"), model_size="micro", batch_size=4, seq_len=48,
                                  docs_per_stage=120, eval_docs=8, warmup_steps=1, steps=2, eval_every=2,
                                  save_every=2, mtp_layers=1))
    base, _ = load_model(pre["model_dir"], device="cpu", dtype="float32")
    key = "model.mtp_layers.0.input_proj.weight"
    common = dict(model=pre["model_dir"], steps=2, batch_size=4, examples_per_task=16, eval_every=2,
                  eval_examples=4, save_every=2, warmup_steps=1, tensorboard=False)
    on = sft(SFTConfig(out_dir=str(tmp_path / "on"), **common))
    off = sft(SFTConfig(out_dir=str(tmp_path / "off"), mtp_weight=0.0, **common))
    assert (on["mtp_weight"], on["packing"]) == (0.1, False) and (off["mtp_weight"], off["packing"]) == (0.0, True)
    m_on, _ = load_model(on["model_dir"], device="cpu", dtype="float32")
    m_off, _ = load_model(off["model_dir"], device="cpu", dtype="float32")
    assert M.num_mtp_layers(m_on) == M.num_mtp_layers(m_off) == 1
    assert not torch.equal(m_on.state_dict()[key], base.state_dict()[key])
    assert torch.equal(m_off.state_dict()[key], base.state_dict()[key])

    # token_losses with MTP = main CE + w * CE of the MTP head against the next-next token.
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    labels = torch.tensor([[-100, -100, 7, 8, 9, 10]])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits, (mtp0,) = M.mtp_forward(base, ids)
        main = token_losses(base, batch)
        both = token_losses(base, batch, mtp_weight=0.5)
        ce = torch.nn.functional.cross_entropy
        assert main[0, 1] == pytest.approx(float(ce(logits[0, 1], labels[0, 2])), rel=1e-5, abs=1e-5)
        expect = main[0, 1] + 0.5 * ce(mtp0[0, 1], labels[0, 3])  # position 1: main predicts 7, MTP 8
        assert both[0, 1] == pytest.approx(float(expect), rel=1e-5, abs=1e-5)
        assert both[0, 4] == pytest.approx(float(main[0, 4]), rel=1e-6, abs=1e-6)  # MTP has no target past the end


def test_mtp_extend_cli(tok, tmp_path):
    src = tmp_path / "src"
    save_model(tiny(tok, 1), tok, src)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"count {' '.join(str(j) for j in range(i, i + 30))}"})
                              for i in range(40)))
    run = [sys.executable, "-m", "thinkforge.cli", "mtp-extend", "--model", str(src), "--out", str(tmp_path / "o"),
           "--layers", "3", "--steps", "3", "--data", str(data), "--set", "seq_len=32", "--set", "batch_size=4"]
    res = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    model, _ = load_model(str(tmp_path / "o" / "model"), device="cpu", dtype="float32")
    assert M.num_mtp_layers(model) == 3
    res = subprocess.run(run[:-10] + ["--layers", "1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --layers must be >= 2")


def test_self_distilled_extension_on_the_models_own_answers(tok, tmp_path):
    from safetensors.torch import load_file

    from thinkforge.train.mtp_extend import MTPExtendConfig, mtp_extend

    src = tmp_path / "src"
    save_model(tiny(tok, 1), tok, src)
    cfg = dict(model=str(src), layers=3, steps=3, seq_len=32, batch_size=4, target="self", train_first=True,
               generate=6, generate_tokens=16, device="cpu")
    summary = mtp_extend(MTPExtendConfig(out_dir=str(tmp_path / "o"), **cfg))
    assert summary["generate_s"] > 0 and {"mtp_kl_0", "mtp_agree_2"} <= set(summary["final"])
    before, after = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "o" / "model" / "model.safetensors"))
    main = [k for k in before if "mtp_layers" not in k]
    assert main and all(torch.equal(before[k], after[k]) for k in main)  # the main model is the teacher: frozen
    assert not torch.equal(before["model.mtp_layers.0.input_proj.weight"], after["model.mtp_layers.0.input_proj.weight"])
    assert {k for k in after if k.startswith("model.mtp_layers.2.")}
    with pytest.raises(ThinkforgeError, match="target must be 'data' or 'self'"):
        mtp_extend(MTPExtendConfig(out_dir=str(tmp_path / "x"), **{**cfg, "target": "main"}))
    with pytest.raises(ThinkforgeError, match="not both"):
        mtp_extend(MTPExtendConfig(out_dir=str(tmp_path / "x"), data=str(tmp_path / "d.jsonl"), **cfg))


def test_model_modules_import_no_trainer():
    """Model definitions import no trainer (training code lives in thinkforge/train/), and the speculator
    never imports the engine that drives it: each module in a fresh interpreter, sys.modules checked."""
    import pkgutil

    import thinkforge.model

    mods = [f"thinkforge.model.{m.name}" for m in pkgutil.iter_modules(thinkforge.model.__path__)]
    assert "thinkforge.model.mtp" in mods and "thinkforge.model.io" in mods
    checks = {m: "thinkforge.train" for m in mods}
    checks["thinkforge.engine.speculative"] = "thinkforge.engine.native"
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in sys.modules if m == sys.argv[2] or m.startswith(sys.argv[2] + '.'))))")
    for mod, banned in checks.items():
        res = subprocess.run([sys.executable, "-c", code, mod, banned], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.strip().splitlines()[-1]) == [], f"{mod} imported {res.stdout.strip()}"
    # A function-level import would pass the check above and still tie the layers: scan every import statement.
    import ast

    import thinkforge.engine.speculative as spec

    sources = [Path(thinkforge.model.__path__[0]) / f"{m.split('.')[-1]}.py" for m in mods]
    for src, banned in [*((s, "thinkforge.train") for s in sources), (Path(spec.__file__), "thinkforge.engine.native")]:
        for node in ast.walk(ast.parse(src.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            hit = [n for n in names if n == banned or n.startswith(banned + ".")]
            assert not hit, f"{src.name}:{node.lineno} imports {hit[0]}"
    # The recipe still exists where the CLI looks for it.
    from thinkforge.train.mtp_extend import MTPExtendConfig, mtp_extend

    assert MTPExtendConfig().layers == 3 and callable(mtp_extend)


def test_mtp_bench_recipe_is_deep_with_one_mtp_layer():
    """The shipped MTP benchmark recipe: >= 16 main layers, 1 MTP layer pretrained (extended to 3 afterwards)."""
    from thinkforge.model.tiny import PRESETS
    from thinkforge.train.pretrain import PretrainConfig
    from thinkforge.utils import load_config

    cfg = load_config(PretrainConfig, "mtp-bench", "pretrain")
    spec = PRESETS[cfg.model_size]
    assert cfg.mtp_layers == 1 and spec.num_hidden_layers >= 16
    assert spec.hidden_size % spec.num_attention_heads == 0
