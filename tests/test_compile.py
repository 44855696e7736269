"""compile_blocks: the compiled model gives the eager model's output, and one-off shapes do not compile graphs."""

import torch
import torch._dynamo

from conftest import tiny_model
from histream_core.modes import mode_config
from histream_core.sampler import generate_video


def test_compiled_blocks_match_eager_and_skip_one_off_shapes():
    model = tiny_model(seed=1)
    context = torch.randn(1, 8, model.cfg.text_dim, generator=torch.Generator().manual_seed(0))
    prompts = [(0, context), (2, torch.randn(1, 5, model.cfg.text_dim))]  # chunk 3 starts with a recache
    cfg = mode_config("histream+")
    with torch.no_grad():
        eager = generate_video(model, prompts, 64, 64, 37, cfg, 0)  # 10 latent frames: chunks of 3, 3, 3, 1
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model.compile_blocks()
        assert model.is_compiled and set(model.state_dict()) == set(tiny_model().state_dict())
        compiled = generate_video(model, prompts, 64, 64, 37, cfg, 0)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        generate_video(model, prompts, 64, 64, 37, cfg, 0)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # chunk 1 (no cache) and later chunks (3 cached frames), at two resolutions; the 1-frame last chunk and the
    # recache runs stay eager, and a second video reuses every graph
    assert graphs == 4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
