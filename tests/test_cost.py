"""`thinkforge cost`: 6NT arithmetic, Sky-T1's worked example, parameter counting from a config, errors."""

import json
import subprocess
import sys

import pytest

from thinkforge.cost import CostConfig, estimate, model_params
from thinkforge.errors import ThinkforgeError


def test_six_n_t_and_sky_t1_example():
    r = estimate(CostConfig(params=1e9, tokens=1e9, hardware="a100", gpus=2, mfu=0.5, price_per_gpu_hour=2.0))
    assert r["flops"] == 6e18
    assert r["wall_hours"] == pytest.approx(6e18 / (2 * 312e12 * 0.5) / 3600)
    assert r["cost_usd"] == pytest.approx(r["wall_hours"] * 2 * 2.0)
    # Sky-T1-32B: 19 h x 8 H100 ~ $450.
    sky = estimate(CostConfig(params=32.8e9, examples=17000, avg_tokens=8000, epochs=3, hardware="h100", gpus=8,
                              mfu=0.15))
    assert 18 < sky["wall_hours"] < 20 and 420 < sky["cost_usd"] < 470


def test_params_from_a_checkpoint_config(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_checkpoint).parameters())
    assert model_params(tiny_checkpoint) == real
    r = estimate(CostConfig(model=tiny_checkpoint, tokens=1e6))
    assert r["params"] == real


def test_cli_and_errors():
    out = subprocess.run([sys.executable, "-m", "thinkforge.cli", "cost", "--params", "7e9", "--tokens", "1e9",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["flops"] == pytest.approx(4.2e19)
    bad = subprocess.run([sys.executable, "-m", "thinkforge.cli", "cost", "--params", "7e9", "--tokens", "1e9",
                          "--hardware", "tpu"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown hardware 'tpu'" in bad.stderr and "h100" in bad.stderr
    with pytest.raises(ThinkforgeError, match="tokens must be > 0"):
        estimate(CostConfig(params=1e9))
    with pytest.raises(ThinkforgeError, match="mfu"):
        estimate(CostConfig(params=1e9, tokens=1, mfu=1.5))
