"""The plugin's ``GptOssForCausalLM``: vLLM's gpt-oss model with the MoE block owned by the plugin.

Everything but the experts is vLLM's (attention with sinks and alternating sliding window, YaRN rope,
qkv/o linears, RMSNorm, embedding, logits, sampler, and its weight loading for those). Where vLLM has a
native MoE for the platform and checkpoint, the model is vLLM's own, unchanged. Elsewhere the MoE blocks
are ``MXFP4MoEBlock`` and the expert tensors are loaded by the plugin, staying MXFP4 in memory.
Either way, every checkpoint tensor is checked against the gpt-oss layout before it is loaded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models import gpt_oss as vllm_gpt_oss
from vllm.model_executor.models.utils import maybe_prefix

from gptoss_vllm.checkpoints.config import LAYER_TYPES
from gptoss_vllm.checkpoints.layout import CheckpointLayoutError, LayoutChecker, checkpoint_specs
from gptoss_vllm.model.backend import announce, resolve_for_vllm
from gptoss_vllm.model.cpu_eager import skip_compile_dispatch
from gptoss_vllm.model.cpu_gemm import pack_linears
from gptoss_vllm.model.huge_pages import process_huge_bytes
from gptoss_vllm.model.moe import MXFP4MoEBlock
from gptoss_vllm.model.resident import no_second_copies, released_as_consumed

log = logging.getLogger("vllm." + __name__)  # under vLLM's logger: its handler, level and format

_EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\w+)$")
_LAYOUT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
    "num_hidden_layers",
)


class MXFP4TransformerBlock(vllm_gpt_oss.TransformerBlock):
    mlp_cls = MXFP4MoEBlock


class MXFP4GptOssModel(vllm_gpt_oss.GptOssModel):
    block_cls = MXFP4TransformerBlock


def _is_mxfp4(hf_config) -> bool:
    quant = getattr(hf_config, "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return method in ("mxfp4", "gpt_oss_mxfp4")


def _check_layer_types(hf_config) -> None:
    layer_types = getattr(hf_config, "layer_types", None)
    expected = [LAYER_TYPES[i % 2] for i in range(hf_config.num_hidden_layers)]
    if layer_types is not None and list(layer_types) != expected:
        raise ValueError(
            "config.json layer_types must alternate sliding_attention/full_attention starting with sliding "
            "(vLLM's gpt-oss attention applies the window to even layers); got "
            f"{list(layer_types)}"
        )


class GptOssForCausalLM(vllm_gpt_oss.GptOssForCausalLM):
    """vLLM's gpt-oss with a platform-chosen MoE backend (see ``gptoss_vllm.model.backend``)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        _check_layer_types(config)
        backend, platform = resolve_for_vllm(vllm_config)
        announce(backend, platform)
        if backend == "native":
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        else:
            # vLLM's constructor with the plugin's model body.
            nn.Module.__init__(self)
            self.vllm_config = vllm_config
            self.config = config
            self.model = MXFP4GptOssModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
            )
            self.logits_processor = LogitsProcessor(config.vocab_size)
            self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        self.moe_backend = backend
        self._mxfp4_checkpoint = _is_mxfp4(config)
        no_second_copies(self)
        packed = pack_linears(self)
        if packed:
            log.info("gpt-oss: %d bf16 linears on vLLM's packed CPU kernel (model/cpu_gemm.py)", packed)
        skip_compile_dispatch(self, vllm_config)

    # ----------------------------------------------------------------- weights
    def _layout_checker(self) -> LayoutChecker:
        layout = {k: getattr(self.config, k) for k in _LAYOUT_KEYS}
        dtype = "mxfp4" if self._mxfp4_checkpoint else "bf16"
        description = (
            f"this config.json ({self.config.num_hidden_layers} layers, {self.config.num_local_experts} experts, "
            f"{'MXFP4' if self._mxfp4_checkpoint else 'bf16'} experts)"
        )
        return LayoutChecker(checkpoint_specs(layout, dtype), description)

    def _load_expert(self, layer: int, suffix: str, tensor: torch.Tensor) -> set[str]:
        if not self.model.start_layer <= layer < self.model.end_layer:
            return set()  # another pipeline stage owns this layer
        experts = self.model.layers[layer].mlp.experts
        return {
            f"model.layers.{layer}.mlp.experts.{p}" for p in experts.load_checkpoint_tensor(suffix, tensor)
        }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        checker = self._layout_checker()
        checked = checker.stream(released_as_consumed(weights))
        if self.moe_backend == "native":
            loaded = set(super().load_weights(checked))
        else:
            expert_params: set[str] = set()

            def non_expert() -> Iterator[tuple[str, torch.Tensor]]:
                for name, tensor in checked:
                    match = _EXPERT_NAME.match(name)
                    if match:
                        expert_params.update(self._load_expert(int(match[1]), match[2], tensor))
                    else:
                        yield name, tensor

            rest = non_expert()
            loaded = set(super().load_weights(rest))
            for name, _ in rest:  # vLLM's loader stops early only on a bug; never skip a tensor silently
                raise CheckpointLayoutError(
                    f"checkpoint tensor {name} was not consumed by vLLM's gpt-oss loader"
                )
            loaded |= expert_params
            for layer in self.model.layers[self.model.start_layer : self.model.end_layer]:
                layer.mlp.experts.pack_for_backend()
        for _ in checked:  # validate anything the loader left unread
            pass
        checker.finish()
        self._log_expert_memory()
        return loaded

    def expert_resident_bytes(self) -> int:
        """Bytes held by expert weights and biases on this rank."""
        total = 0
        for name, param in self.named_parameters():
            if ".mlp.experts." in name:
                total += param.numel() * param.element_size()
        return total

    def _log_expert_memory(self) -> None:
        nbytes = self.expert_resident_bytes()
        fmt = "MXFP4" if (self.moe_backend != "native" or self._mxfp4_checkpoint) else "bf16"
        log.info(
            "gpt-oss expert weights resident: %.1f MiB (%d bytes, %s, backend %s); %.1f GiB of this process on "
            "2 MB pages (the bf16 linears move there next, as they are packed)",
            nbytes / 2**20,
            nbytes,
            fmt,
            self.moe_backend,
            process_huge_bytes() / 2**30,
        )
