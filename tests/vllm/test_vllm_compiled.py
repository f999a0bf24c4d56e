"""The compile-safe capture: vLLM with torch.compile on (no enforce_eager), the tap's custom op at each site.

A module of its own because it starts a second engine (``make test-vllm`` runs each module in its own
process); compiling SmolLM2 takes about 90 s on two cores.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from collectors import models as lw_models
from collectors import read_file
from tests.vllm.test_vllm_plugin import SALT, _cos, _generate, _reference

pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore")]

SITES = ["layers.9.resid", "layers.19.attn", "layers.29.resid"]


def test_compiled_model_records_equal_the_transformers_tap(tmp_path, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm builds a venv with it)")
    path = tmp_path / "records.lwsr"
    for k, v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                 "LATENTWATCH_VLLM_SINK": f"file:{path}", "LATENTWATCH_VLLM_SAMPLE_RATE": "1.0",
                 "LATENTWATCH_VLLM_SITES": ",".join(SITES), "LATENTWATCH_TAP_SALT": SALT}.items():
        monkeypatch.setenv(k, v)
    folder = lw_models.smollm2_folder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from vllm import LLM

        llm = LLM(str(folder), distributed_executor_backend="uni", dtype="float32", enable_prefix_caching=False,
                  max_model_len=512, max_num_batched_tokens=64, seed=0)
    assert llm.llm_engine.vllm_config.compilation_config.mode != 0, "torch.compile must be on for this test"
    tap = llm.llm_engine.model_executor.driver_worker.worker.model_runner.latentwatch_tap
    assert tap.capture_mode == "op"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = [tok(t)["input_ids"] for t in ("Hello there, how are you today?",
                                         "The quick brown fox jumps over the lazy dog. " * 10)]
    _generate(llm, ids)
    assert tap.flush()
    got = {r.n_tokens: r for r in read_file(path)}
    want, fingerprint = _reference(ids, SITES)
    assert tap.fingerprint == fingerprint and tap.stats.hook_errors == 0
    assert sorted(got) == sorted(map(len, ids))
    for ref in want:
        rec = got[ref.n_tokens]
        np.testing.assert_allclose(rec.sites["layers.19.attn"]["heads"], ref.sites["layers.19.attn"]["heads"],
                                   atol=1e-4)
        for site in ("layers.9.resid", "layers.29.resid"):
            for name in ("mean", "last", "wmax"):
                assert _cos(rec.sites[site][name], ref.sites[site][name]) >= 0.999, (site, name)
    tap.detach()
