"""Keeping a loaded model's resident memory at the size of its weights on CPUs.

Two things make a vLLM CPU worker hold more than its weights, and both are undone here:

- **Checkpoint pages.** vLLM reads safetensors through a file mapping, and every page a tensor was copied
  from stays mapped (and counted in the worker's RSS) until the whole file is closed: up to the checkpoint's
  size on top of the weights, for a one-file checkpoint. ``released_as_consumed`` drops each tensor's pages
  from this process once the loader has moved on to the next tensor. The pages stay in the page cache; a
  later read of the same range maps them again from the file, so nothing is lost but residency.
- **Embedding and lm_head kept twice.** vLLM's ``UnquantizedEmbeddingMethod`` prepares a oneDNN GEMM
  (a packed copy of the weight) for every vocabulary layer on CPU and keeps the original beside it: the input
  embedding gets a copy it never uses (it only looks rows up), and an untied lm_head keeps a weight its GEMM
  never reads. For gpt-oss-20b that is 2 x 1.16 GB. ``no_second_copies`` gives each layer only what it reads.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.platforms import current_platform

from gptoss_vllm.model.cpu_gemm import pack_for_cpu

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


class _CheckpointMappings:
    """The address ranges of this process's safetensors file mappings (read from /proc/self/maps, again
    whenever an address falls outside the ones known: a loader opens the shards one after another)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

    def _reload(self) -> None:
        ranges = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split()
                    if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                        start, end = (int(part, 16) for part in fields[0].split("-"))
                        ranges.append((start, end))
        except OSError:  # not Linux: nothing to release
            pass
        self.ranges = ranges

    def _mapped(self, start: int, end: int) -> bool:
        return any(lo <= start and end <= hi for lo, hi in self.ranges)

    def release(self, tensor: torch.Tensor) -> int:
        """Drop the whole pages of ``tensor``'s bytes from this process if they lie in a checkpoint mapping;
        returns the bytes released (0 for a tensor that is not file-mapped, which is never touched)."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
            return 0
        first = tensor.data_ptr()
        start = -(-first // _PAGE) * _PAGE
        end = (first + tensor.numel() * tensor.element_size()) // _PAGE * _PAGE
        if end <= start:
            return 0
        if not self._mapped(start, end):
            self._reload()
            if not self._mapped(start, end):
                return 0
        if self.libc.madvise(ctypes.c_void_p(start), end - start, _MADV_DONTNEED) != 0:
            return 0  # the pages stay resident; loading goes on
        return end - start


def released_as_consumed(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` as they are, each tensor's checkpoint pages dropped once the next one is asked for (by
    then the loader has copied it into its parameter)."""
    mappings = _CheckpointMappings()
    for name, tensor in weights:
        yield name, tensor
        mappings.release(tensor)


class LookupOnlyMethod(UnquantizedEmbeddingMethod):
    """An input embedding on CPU: rows are looked up in the weight, no GEMM copy is prepared."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.cpu_linear = torch.nn.functional.linear  # what vLLM sets for a layer it does not pack


class GemmOnlyMethod(UnquantizedEmbeddingMethod):
    """An untied lm_head on CPU: the GEMM's packed weight only (vLLM's CPU GEMM never reads the original)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not pack_for_cpu(layer):  # vLLM's packed kernel where it fits (model/cpu_gemm.py), else oneDNN's
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)


def no_second_copies(model: nn.Module) -> None:
    """On CPU, the input embedding skips vLLM's unused GEMM copy and an untied lm_head keeps only its GEMM's
    packed weight. Elsewhere, and for tied embeddings (one weight serves both), nothing changes."""
    if not current_platform.is_cpu():
        return
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    embedding = getattr(getattr(model, "model", None), "embedding", None)
    lm_head = getattr(model, "lm_head", None)
    if embedding is not None and type(embedding.quant_method) is UnquantizedEmbeddingMethod:
        embedding.quant_method = LookupOnlyMethod()
    if lm_head is not None and not tied and type(lm_head.quant_method) is UnquantizedEmbeddingMethod:
        lm_head.quant_method = GemmOnlyMethod()
