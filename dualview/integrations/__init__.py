"""Dual view past the model: serving engines and evaluation harnesses.

- :mod:`dualview.integrations.vllm_plugin`: a vLLM plug-in (entry point group
  ``vllm.general_plugins``, extra ``dualview[vllm]``) that serves models saved by
  :mod:`dualview.adapters.hf_llava_next`.
- :mod:`dualview.integrations.lmms_eval_models`: lmms-eval models (entry point group
  ``lmms_eval.models``, extra ``dualview[eval]``) that evaluate them.

The engines import these modules through their entry points; the core and the adapters never do.
Each module imports without its engine installed (the engine's classes are built on first use).
"""
