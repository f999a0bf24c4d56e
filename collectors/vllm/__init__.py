"""latentwatch inside vLLM: a plugin that taps vLLM's model runner (``pip install latentwatch[vllm]``).

* :mod:`collectors.vllm.plugin` -- the ``vllm.general_plugins`` entry point;
* :mod:`collectors.vllm.settings` -- its configuration (a file and ``LATENTWATCH_VLLM_*`` variables);
* :mod:`collectors.vllm.tap` -- the tap: per-request prompt capture from vLLM's flat token stream;
* :mod:`collectors.vllm.weights` -- the model fingerprint of vLLM-loaded weights;
* :mod:`collectors.vllm.stats` -- the tap's counters on vLLM's ``/metrics`` (``vllm.stat_logger_plugins``);
* :mod:`collectors.vllm.private` -- the folder those counters pass through, this user's alone.

See docs/integrations.md. Importing this package imports nothing of vLLM or torch.
"""
