"""Block streaming (placement=stream): the same numbers as a resident model, the weights' home is CPU memory."""
import torch

from renderer.families.wan22.model import build_dit
from renderer.offload import BlockStreamer, stream_blocks
from renderer.pipeline import Pipeline, RenderOptions, ShotSpec
from renderer.presets import load_preset


def test_streamed_model_equals_resident_model():
    cfg = load_preset("tiny_t2v").dit
    resident = build_dit(cfg, dtype=torch.float32, seed=3)
    streamed = stream_blocks(build_dit(cfg, dtype=torch.float32, seed=3), "cpu")
    x, c = torch.randn(1, 16, 3, 6, 8), torch.randn(1, 5, cfg.text_dim)
    with torch.no_grad():
        for t in (900.0, 100.0):  # two forwards: the second reuses the block 0 prefetched by the first
            assert torch.equal(streamed(x, torch.tensor([t]), c), resident(x, torch.tensor([t]), c))
    s: BlockStreamer = streamed.block_streamer
    # between forwards every block's parameters point at their host copies again
    for block, host in zip(s.blocks, s.host):
        for name, p in block.named_parameters():
            assert p.data.data_ptr() == host[name].data_ptr()
    s.detach()
    assert not s.handles


def test_pipeline_stream_placement_renders_the_same_video():
    preset = load_preset("tiny_t2v")
    shot = ShotSpec(prompt="a red kite", seed=2, steps=3)
    a = Pipeline(preset, options=RenderOptions(progress=False, placement="resident")).render(shot, keep_latent=True)
    pipe = Pipeline(preset, options=RenderOptions(progress=False, placement="stream"))
    assert pipe.placement == "stream" and all(hasattr(m, "block_streamer") for m in pipe.experts)
    b = pipe.render(shot, keep_latent=True)
    assert torch.equal(a.latent, b.latent)
    assert (a.frames == b.frames).all()
