"""What llava-torch's code (1.2.2) needs to run under transformers >= 5.24: mixins of the dual-view
subclasses of :mod:`dualview.adapters.llava15` (nothing is patched on llava's own classes).

1. :class:`CacheAsPastKeyValues`: ``generate()`` hands the KV cache to the model as ``cache=``;
   llava's ``forward`` only knows ``past_key_values=`` and raises TypeError.
2. :class:`MptForward`: llava-torch 1.2.2's ``LlavaMptForCausalLM.forward`` calls
   ``prepare_inputs_labels_for_multimodal`` with its pre-1.2 five-argument signature and raises
   TypeError on every call, with or without dual view. (llava's MPT has no ``generate`` of its own:
   its output starts with the prompt.)
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class CacheAsPastKeyValues:
    """``prepare_inputs_for_generation`` (where generate builds the forward's keywords) hands the
    cache on as ``past_key_values``; ``forward`` itself is left alone, since generate reads its signature."""

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, past_key_values: Any = None, inputs_embeds: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> dict:
        """llava's ``prepare_inputs_for_generation``, with ``cache`` renamed ``past_key_values``.
        Keeps llava's parameter names: generate reads them."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs
        )
        if "cache" in inputs:  # absent when generate runs without a cache (use_cache=False)
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs


class MptForward:
    """llava's MPT forward with the current ``prepare_inputs_labels_for_multimodal`` signature. The
    class it is mixed into names llava's MPT class as ``dualview_plain``."""

    dualview_plain: type

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        past_key_values: Any = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        images: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        if inputs_embeds is None:
            prepared = self.prepare_inputs_labels_for_multimodal(
                input_ids, None, attention_mask, past_key_values, labels, images
            )
            input_ids, _, attention_mask, past_key_values, inputs_embeds, labels = prepared
        base_forward = super(type(self).dualview_plain, self).forward  # the MPT LM's, past llava's broken one
        return base_forward(
            input_ids=input_ids, cache=past_key_values, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            labels=labels, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs,
        )
