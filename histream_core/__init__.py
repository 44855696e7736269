"""HiStream engine: streaming high-resolution text-to-video on causal Wan2.1 DiTs (plain PyTorch, no ComfyUI).

Entry points: ``pipeline.HiStreamPipeline`` (files in, mp4 out), ``sampler.stream_video`` (the chunk loop),
``modes.MODES`` (the paper's modes as presets), ``flops.run_flops``, and ``python -m histream_core``.
"""

__version__ = "0.1.0"
