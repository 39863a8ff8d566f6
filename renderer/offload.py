"""Block streaming: render with an expert that does not fit on the GPU (a 14B expert is 28 GB in bf16; a 4090
has 24 GB).

The blocks' weights live in pinned CPU memory. Before block i runs, its weights are already on the GPU: they were
copied on a side CUDA stream while block i-1 computed; block i+1's copy starts as block i begins. After a block
runs, its GPU copies are dropped. Only the embeddings and the head stay on the GPU. So the GPU holds two blocks of
weights (≈ 1.4 GB for A14B) plus activations.

Why this and not DeepSpeed ZeRO-3 parameter offload: rendering is inference in one process. ZeRO-3 brings an
engine, partitioned parameters gathered through its hooks and its own fetch scheduling built for training; the
copy here is the only thing a renderer needs, it overlaps with compute on its own stream, keeps the fused kernels
and needs no DeepSpeed build. Per forward it moves one expert's block weights over PCIe once (28 GB at ~25 GB/s ≈
1.1 s on PCIe 4.0), against ~60–100 s of compute for an A14B forward at 720p on a 4090-class card.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class BlockStreamer:
    """Streams `model.blocks` from pinned CPU memory to `device`, one block ahead. `detach()` undoes it."""

    def __init__(self, model: nn.Module, device: torch.device | str, pin: bool = True):
        self.model = model
        self.device = torch.device(device)
        self.blocks = list(model.blocks)
        cuda = self.device.type == "cuda"
        # everything outside the blocks (embeddings, head) is small: keep it on the device
        for name, p in model.named_parameters():
            if not name.startswith("blocks."):
                p.data = p.data.to(self.device)
        self.host: list[dict[str, torch.Tensor]] = []
        for block in self.blocks:
            params = {}
            for name, p in block.named_parameters():
                t = p.data.to("cpu")
                params[name] = t.pin_memory() if (pin and cuda) else t
                p.data = params[name]
            self.host.append(params)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.ready: dict[int, tuple[dict[str, torch.Tensor], object]] = {}  # block -> (device tensors, event)
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._before(i)))
            self.handles.append(block.register_forward_hook(self._after(i)))

    def _copy(self, i: int) -> None:
        """Start copying block i's weights to the device (async on the side stream when on CUDA)."""
        if i in self.ready or i >= len(self.blocks):
            return
        if self.stream is None:
            self.ready[i] = ({n: t.to(self.device) for n, t in self.host[i].items()}, None)
            return
        with torch.cuda.stream(self.stream):
            on_dev = {n: t.to(self.device, non_blocking=True) for n, t in self.host[i].items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        self.ready[i] = (on_dev, event)

    def _before(self, i: int):
        def hook(block, args):
            self._copy(i)  # no-op when the previous block already started it
            on_dev, event = self.ready.pop(i)
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for t in on_dev.values():
                    t.record_stream(current)  # memory made on the side stream, used on this one
            for name, p in block.named_parameters():
                p.data = on_dev[name]
            self._copy(i + 1 if i + 1 < len(self.blocks) else 0)  # the next block, or the next forward's first
        return hook

    def _after(self, i: int):
        def hook(block, args, output):
            for name, p in block.named_parameters():
                p.data = self.host[i][name]  # drop the device copy; the host copy is the weights' home
        return hook

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.ready.clear()


def stream_blocks(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Attach a BlockStreamer to `model` (kept as `model.block_streamer`) and return the model."""
    model.block_streamer = BlockStreamer(model, device)
    if hasattr(model, "compile_mode"):
        model.compile_mode = "off"  # the weights move under the blocks every call; keep the eager fused path
    return model
