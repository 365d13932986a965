"""The gpt-oss MoE block with MXFP4 experts, for platforms where vLLM has no native MXFP4 MoE.

Router: top-k over the raw logits, then softmax over the k selected values. Experts: MXFP4 weights in the
checkpoint layout (``(E, rows, K/32, 16)`` blocks, ``(E, rows, K/32)`` E8M0 scales) with fp32 biases,
sharded for tensor parallelism along the intermediate dimension in whole 32-element blocks. The ``cpu``
backend's kernel reads its own layout: once loading is done, ``pack_for_backend`` repacks the blocks and
scales in place (still 4.25 bits per weight).
"""

from __future__ import annotations

import torch
from torch import nn

from gptoss_vllm.kernels import cpu_moe, reference  # noqa: F401  (registers the torch ops)
from gptoss_vllm.model.huge_pages import back_with_huge_pages
from gptoss_vllm.quant import mxfp4

# Checkpoint suffixes of the expert tensors, after ``mlp.experts.``.
MXFP4_SUFFIXES = (
    "gate_up_proj_blocks",
    "gate_up_proj_scales",
    "gate_up_proj_bias",
    "down_proj_blocks",
    "down_proj_scales",
    "down_proj_bias",
)
BF16_SUFFIXES = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


class MXFP4Experts(nn.Module):
    """One layer's experts, resident as MXFP4, computed by the chosen backend's torch op."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        backend: str,
        tp_rank: int = 0,
        tp_size: int = 1,
        alpha: float = 1.702,
        limit: float = 7.0,
    ) -> None:
        super().__init__()
        if intermediate_size % tp_size or (intermediate_size // tp_size) % mxfp4.BLOCK_SIZE:
            raise ValueError(
                f"intermediate_size={intermediate_size} cannot be split over tensor_parallel_size={tp_size} in "
                f"whole MXFP4 blocks of {mxfp4.BLOCK_SIZE}: intermediate_size / tp must be a multiple of 32"
            )
        if hidden_size % mxfp4.BLOCK_SIZE:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of the MXFP4 block size 32")
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.local_intermediate = intermediate_size // tp_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.alpha, self.limit = alpha, limit
        self.backend = backend
        e, h, i = num_experts, hidden_size, self.local_intermediate

        def buffer(*shape: int, dtype: torch.dtype, fill=torch.empty) -> nn.Parameter:
            param = nn.Parameter(fill(*shape, dtype=dtype), requires_grad=False)
            param.dummy_weight_value = 0  # what vLLM's dummy loader writes into these integer tensors
            return param

        # Blocks and scales uninitialised: zero-filling gpt-oss-20b's 10 GB took ~28 s of loading, and the
        # layout checker fails a load that leaves any of them unwritten.
        self.gate_up_blocks = buffer(e, 2 * i, h // 32, 16, dtype=torch.uint8)
        self.gate_up_scales = buffer(e, 2 * i, h // 32, dtype=torch.uint8)
        self.gate_up_bias = buffer(e, 2 * i, dtype=torch.float32, fill=torch.zeros)
        self.down_blocks = buffer(e, h, i // 32, 16, dtype=torch.uint8)
        self.down_scales = buffer(e, h, i // 32, dtype=torch.uint8)
        self.down_bias = buffer(e, h, dtype=torch.float32, fill=torch.zeros)
        self.packed = False  # blocks/scales in the cpu kernel's layout instead of the checkpoint's

    def pack_for_backend(self) -> None:
        """Repack the loaded blocks and scales into the layout the backend's kernel reads (``cpu`` only)."""
        if self.backend != "cpu" or self.packed:
            return
        for blocks, scales in (
            (self.gate_up_blocks, self.gate_up_scales),
            (self.down_blocks, self.down_scales),
        ):
            blocks.data, scales.data = cpu_moe.prepack(blocks.data, scales.data)
            # The kernel asked for 2 MB pages before writing; what a fragmented memory did not give then, now.
            back_with_huge_pages(blocks.data)
        self.packed = True

    def resident_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def load_checkpoint_tensor(self, suffix: str, tensor: torch.Tensor) -> list[str]:
        """Load one checkpoint tensor (``suffix`` after ``mlp.experts.``); returns the parameters it filled."""
        if self.packed:
            raise RuntimeError(
                "these experts' weights were already repacked for the cpu kernel; load a checkpoint into a "
                "new model instead of loading over a packed one"
            )
        i, r = self.local_intermediate, self.tp_rank
        if suffix.startswith("gate_up_proj_") and suffix != "gate_up_proj_bias":
            # (E, 2I, H/32[, 16]): this rank's rows; gate/linear rows are interleaved, so pairs stay together.
            target = self.gate_up_blocks if suffix.endswith("blocks") else self.gate_up_scales
            target.data.copy_(tensor.narrow(1, 2 * i * r, 2 * i))
            return ["gate_up_blocks" if suffix.endswith("blocks") else "gate_up_scales"]
        if suffix == "gate_up_proj_bias":
            self.gate_up_bias.data.copy_(tensor.narrow(1, 2 * i * r, 2 * i))
            return ["gate_up_bias"]
        if suffix in ("down_proj_blocks", "down_proj_scales"):
            # (E, H, I/32[, 16]): this rank's share of the contraction, in whole blocks.
            g = i // mxfp4.BLOCK_SIZE
            target = self.down_blocks if suffix.endswith("blocks") else self.down_scales
            target.data.copy_(tensor.narrow(2, g * r, g))
            return ["down_blocks" if suffix.endswith("blocks") else "down_scales"]
        if suffix == "down_proj_bias":
            # Every rank's partial sums are all-reduced: only rank 0 adds the bias.
            self.down_bias.data.copy_(tensor if r == 0 else torch.zeros_like(tensor))
            return ["down_bias"]
        if suffix == "gate_up_proj":  # bf16 (E, H, 2I): quantised on load
            blocks, scales = mxfp4.quantize(tensor.narrow(2, 2 * i * r, 2 * i).transpose(1, 2))
            self.gate_up_blocks.data.copy_(blocks)
            self.gate_up_scales.data.copy_(scales)
            return ["gate_up_blocks", "gate_up_scales"]
        if suffix == "down_proj":  # bf16 (E, I, H)
            blocks, scales = mxfp4.quantize(tensor.narrow(1, i * r, i).transpose(1, 2))
            self.down_blocks.data.copy_(blocks)
            self.down_scales.data.copy_(scales)
            return ["down_blocks", "down_scales"]
        raise KeyError(f"unknown expert tensor suffix {suffix!r}")

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        self.pack_for_backend()  # a no-op once loaded; packs weights set without load_weights (dummy, tests)
        op = (
            torch.ops.gptoss_vllm.mxfp4_moe
            if self.backend == "cpu"
            else torch.ops.gptoss_vllm.mxfp4_moe_reference
        )
        return op(
            x,
            topk_ids,
            topk_weights,
            self.gate_up_blocks,
            self.gate_up_scales,
            self.gate_up_bias,
            self.down_blocks,
            self.down_scales,
            self.down_bias,
            self.alpha,
            self.limit,
        )


class MXFP4MoEBlock(nn.Module):
    """Drop-in for vLLM's gpt-oss ``MLPBlock`` (same constructor), computing experts with the plugin."""

    def __init__(self, vllm_config, layer_idx: int, prefix: str = "") -> None:
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.fused_moe import GateLinear

        from gptoss_vllm.model.backend import resolve_for_vllm

        config = vllm_config.model_config.hf_config
        self.layer_idx = layer_idx
        self.top_k = config.num_experts_per_tok
        self.hidden_size = config.hidden_size
        self.tp_size = get_tensor_model_parallel_world_size()
        self.router = GateLinear(
            config.hidden_size,
            config.num_local_experts,
            bias=True,
            prefix=f"{prefix}.router",
            return_bias=False,
        )
        self.experts = MXFP4Experts(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
            backend=resolve_for_vllm(vllm_config)[0],
            tp_rank=get_tensor_model_parallel_rank(),
            tp_size=self.tp_size,
            alpha=getattr(config, "swiglu_alpha", 1.702),
            limit=getattr(config, "swiglu_limit", 7.0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        top_values, top_ids = torch.topk(logits.float(), self.top_k, dim=-1)
        weights = torch.softmax(top_values, dim=-1)
        out = self.experts(x, top_ids, weights)
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            out = tensor_model_parallel_all_reduce(out)
        return out
