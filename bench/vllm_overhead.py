"""vLLM throughput and latency with and without the latentwatch plugin (one engine, one run).

Needs vLLM (``make test-vllm`` builds a venv with vLLM's CPU build: run this with that venv's python).
One in-process engine (eager, float32, prefix caching off) serves every configuration; the tap is attached
and detached between measurements, so the ratios compare the same engine, warmed up, in one run:

  off         no tap
  tap_10      the default sites (residual stream at 1/3, 2/3, the last layer), 10 % of requests sampled
  tap_100     the same, every request sampled

``--capture op`` measures the compile-safe capture instead: torch.compile on (no enforce_eager, ~90 s to
compile), the plugin attached at load as in production (the op must be in the graph when it is traced),
and ``off`` is the same engine with the tap sampling 0 % (the op present, returning at once), so the
ratios there are against a tapped-but-idle engine; ``hook_share_*`` is the absolute cost either way.

Two workloads per configuration and round:
  throughput  ``--batch`` concurrent prompts of mixed length (8 to ~200 tokens), ``--max-tokens`` each:
              generated + prompt tokens per second of wall time
  latency     one prompt of ~100 tokens alone, ``--max-tokens``: end-to-end seconds

Rounds run the configurations in shuffled order; each ratio is the median over rounds of (configured /
off of the same round). The tap's worker reduces captures on the second core; the engine runs on one
(OMP_NUM_THREADS=1). ``hook_share_*`` is the time spent in the tap's hooks on the serving thread divided by
the wall time of the workload: what the forward path pays, measured directly rather than read off two
noisy totals.

Usage: python bench/vllm_overhead.py [--quick] [--rounds N] [--batch 16] [--max-tokens 32] [--capture op]
Last line of output: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from collectors import models as zoo

TEXT = ("The committee met on Tuesday to review the quarterly figures, and after a long discussion about the "
        "budget for the coming year it agreed to postpone the decision until the auditors had reported. ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds, small batch (< 60 s with engine start)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--capture", choices=["hooks", "op"], default="hooks")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.batch, args.max_tokens = 3, 8, 16
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out_dir = Path(tempfile.mkdtemp(prefix="lw-vllm-bench-"))
    os.environ.pop("LATENTWATCH_VLLM_CONFIG", None)
    os.environ.pop("LATENTWATCH_VLLM_SINK", None)  # hooks: the bench attaches its own taps
    if args.capture == "op":  # the plugin attaches at load, before torch.compile traces the model
        os.environ.update({"LATENTWATCH_VLLM_SINK": f"file:{out_dir / 'op.lwsr'}",
                           "LATENTWATCH_VLLM_SAMPLE_RATE": "0", "LATENTWATCH_VLLM_CAPTURE": "op",
                           "LATENTWATCH_TAP_SALT": "bench-salt-0123456789"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:  # `make bench` in the project's .venv, which has no vLLM
            print(json.dumps({"bench": "vllm_overhead", "skipped": f"vLLM is not installed ({exc}); run it "
                              "with the python of the venv `make test-vllm` builds"}))
            return

        from collectors.sampling import Sampler
        from collectors.sites import default_sites
        from collectors.vllm.settings import VllmTapSettings
        from collectors.vllm.tap import VllmTap

    folder = zoo.smollm2_folder()
    llm = LLM(str(folder), enforce_eager=args.capture == "hooks", distributed_executor_backend="uni",
              dtype="float32", enable_prefix_caching=False, max_model_len=1024, seed=0)
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    resident = getattr(runner, "latentwatch_tap", None)  # --capture op: the plugin's tap
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rng = random.Random(0)
    words = TEXT.split()
    batch = [" ".join(words[: rng.randint(6, 40)] * rng.randint(1, 5)) for _ in range(args.batch)]
    single = [TEXT * 3]
    sites = resident.site_names if resident is not None else default_sites(runner.model)

    def run(prompts: list[str]) -> tuple[float, int]:
        started = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - started
        tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
        return wall, tokens

    run(batch)  # warm-up
    configs = {"off": None, "tap_10": 0.10, "tap_100": 1.0}
    ratios: dict[str, dict[str, list[float]]] = {c: {"throughput": [], "latency": []} for c in configs if c != "off"}
    shares: dict[str, list[float]] = {c: [] for c in configs if c != "off"}
    records = {c: 0 for c in configs if c != "off"}
    for _ in range(args.rounds):
        order = list(configs)
        rng.shuffle(order)
        measured: dict[str, tuple[float, float]] = {}
        for name in order:
            rate = configs[name]
            tap = None
            if resident is not None:
                tap = resident
                resident.sampler = Sampler(rate or 0.0, resident.sampler.salt)
            elif rate is not None:
                settings = VllmTapSettings(sink=f"file:{out_dir / (name + '.lwsr')}", sample_rate=rate, sites=sites)
                tap = VllmTap(runner, settings, salt="bench-salt-0123456789").attach()
            emitted = tap.stats.requests_sampled if tap else 0
            wall, tokens = run(batch)
            hook_before = tap.stats.hook_seconds if tap else 0.0
            latency, _ = run(single)
            if tap is not None and rate is not None:
                shares[name].append((tap.stats.hook_seconds - hook_before) / latency)
                records[name] += tap.stats.requests_sampled - emitted
            if tap is not None and tap is not resident:
                tap.detach()
            measured[name] = (tokens / wall, latency)
        for name in ratios:
            ratios[name]["throughput"].append(measured[name][0] / measured["off"][0])
            ratios[name]["latency"].append(measured[name][1] / measured["off"][1])
        print(f"round: { {k: [round(v[0], 1), round(v[1], 4)] for k, v in measured.items()} }", flush=True)
    result = {
        "bench": "vllm_overhead", "vllm": __import__("vllm").__version__, "model": "SmolLM2-135M-Instruct",
        "sites": sites, "capture": args.capture,
        "baseline": "no tap" if args.capture == "hooks" else "tap attached, 0 % sampled",
        "rounds": args.rounds, "batch": args.batch,
        "max_tokens": args.max_tokens, "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
    }
    for name in ratios:
        pct = name.split("_")[1]
        result[f"throughput_ratio_{pct}pct"] = round(statistics.median(ratios[name]["throughput"]), 4)
        result[f"latency_ratio_{pct}pct"] = round(statistics.median(ratios[name]["latency"]), 4)
        result[f"hook_share_latency_{pct}pct"] = round(statistics.median(shares[name]), 5)
        result[f"records_{pct}pct"] = records[name]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
