"""HiStream Prompt Schedule: later prompts that take over at a given video frame (a story told across chunks).

At each switch the sampler re-encodes its cached frames under the new prompt (LongLive's KV recache), so the new
prompt takes hold at once instead of fading in; ``recache_anchor`` off keeps the first frame on the old prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..histream_core.sampler import story_chunks
from .errors import input_error

NODE = "HiStream Prompt Schedule"
LATER_PROMPTS = 3


@dataclass(frozen=True)
class HiStreamPrompts:
    """The HISTREAM_PROMPTS value: (first video frame, CONDITIONING, prompt number) of each later prompt, and the
    recache switches. The number i (2, 3, ...) names the node's inputs positive_i and start_frame_i in messages."""

    entries: tuple[tuple[int, list, int], ...]
    kv_recache: bool
    recache_anchor: bool

    def chunk_starts(self, chunk_frames: int) -> list[tuple[int, list, int]]:
        """(first chunk, conditioning, prompt number): a prompt starts with the first chunk that begins at or after
        its frame. Two prompts in one chunk raise the core's StoryError (its ``index`` counts the sampler's positive
        as 0, so entry ``index - 1`` is the prompt that came too soon)."""
        starts = story_chunks([0, *(frame for frame, _, _ in self.entries)], chunk_frames)[1:]
        return [(start, conditioning, number) for start, (_, conditioning, number) in zip(starts, self.entries)]

    def start_input(self, index: int) -> str:
        """The input that sets story prompt ``index`` >= 1 (0 is the sampler's positive: start frames are >= 1, so a
        later prompt never shares its chunk)."""
        return f"start_frame_{self.entries[index - 1][2]}"


class HiStreamPromptSchedule:
    @classmethod
    def INPUT_TYPES(cls):
        optional = {}
        for i in range(2, LATER_PROMPTS + 2):
            optional[f"positive_{i}"] = ("CONDITIONING", {"tooltip": f"Prompt {i} (CLIPTextEncode, wan)."})
            optional[f"start_frame_{i}"] = ("INT", {"default": 48 * (i - 1), "min": 1, "max": 100000, "step": 1,
                                                    "tooltip": (f"Video frame (from 0) where prompt {i} takes over: "
                                                                "it starts with the first chunk beginning at or "
                                                                "after it (with 3-frame chunks, the default: 0, 9, "
                                                                "21, 33, 45, ...; 4 video frames per latent frame).")})
        return {
            "required": {
                "kv_recache": ("BOOLEAN", {"default": True, "tooltip": (
                    "Re-encode the cached frames under the new prompt at each switch, so it takes hold at once. "
                    "Off: the cache keeps the old prompt and the new one fades in slowly or not at all.")}),
                "recache_anchor": ("BOOLEAN", {"default": True, "tooltip": (
                    "Re-encode the anchor (first) frame too. Off keeps the first frame's look on the old prompt.")}),
            },
            "optional": optional,
        }

    RETURN_TYPES = ("HISTREAM_PROMPTS",)
    RETURN_NAMES = ("prompt_schedule",)
    FUNCTION = "build"
    CATEGORY = "HiStream"
    DESCRIPTION = "Prompts that take over later in the video; connect to the Dual-Res Sampler's prompt_schedule."

    def build(self, kv_recache, recache_anchor, **inputs):
        entries, names = [], []
        for i in range(2, LATER_PROMPTS + 2):
            conditioning = inputs.get(f"positive_{i}")
            if conditioning is not None:
                entries.append((int(inputs.get(f"start_frame_{i}", 48 * (i - 1))), conditioning, i))
                names.append(f"start_frame_{i}")
        if not entries:
            raise input_error(NODE, "positive_2", "connect at least one later prompt (CLIPTextEncode)")
        frames = [frame for frame, _, _ in entries]
        late = next((j for j in range(1, len(frames)) if frames[j] <= frames[j - 1]), None)
        if late is not None:
            raise input_error(NODE, names[late], f"{frames[late]} is not after {names[late - 1]} ({frames[late - 1]}): "
                              f"start frames must increase from prompt to prompt")
        return (HiStreamPrompts(tuple(entries), kv_recache, recache_anchor),)
