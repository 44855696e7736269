"""The CLI end to end: the embedded default, the user's own (tiny, random) files, inspect, config files, errors."""

from __future__ import annotations

import json

import imageio.v3 as iio
import pytest
import torch
from safetensors.torch import save_file

from conftest import needs_fp8_matmul, randomize_, tiny_model
from histream_core.cli import build_parser, main
from histream_core.cli_request import sampler_config
from histream_core.config import ChunkSteps
from histream_core.modes import MODES
from histream_core.pipeline import HiStreamPipeline
from histream_core.text import UMT5_PRESETS, UMT5Encoder
from histream_core.vae import WanVAE, WanVAEConfig

SMALL = ["--width", "64", "--height", "64", "--frames", "9", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A ComfyUI-layout DiT, a Wan VAE, a umT5 encoder (HF names) and a WordLevel tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    folder = tmp_path_factory.mktemp("user")
    text_cfg = UMT5_PRESETS["tiny"]
    # head_dim 128 as in every Wan2.1 checkpoint, so the loader's default detection applies
    dit = tiny_model(seed=4, dim=256, num_heads=2, num_layers=1, ffn_dim=128, text_dim=text_cfg.dim)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in dit.state_dict().items()},
              str(folder / "dit.safetensors"))
    torch.manual_seed(0)
    save_file(WanVAE(WanVAEConfig(base_dim=8)).state_dict(), str(folder / "vae.safetensors"))
    encoder = randomize_(UMT5Encoder(text_cfg), seed=2)
    torch.save(encoder.state_dict(), folder / "umt5.pth")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a fox runs in snow".split())}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_embedded_default_writes_a_video_and_a_timing_table(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["generate", *SMALL, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "chunk" in table and "s/frame" in table
    assert out.is_file() and sum(1 for _ in iio.imiter(out)) == 9


def test_interleaved_decode_order_writes_the_same_video(tmp_path, capsys):
    outs = [tmp_path / "after.webm", tmp_path / "interleaved.webm"]
    for out, order in zip(outs, ["after", "interleaved"]):
        assert main(["generate", *SMALL, "--frames", "17", "--decode-order", order, "--out", str(out), "--json"]) == 0
        assert [c["video_frames"] for c in json.loads(capsys.readouterr().out)["chunks"]] == [9, 8]
    first, second = (iio.imread(out) for out in outs)  # the containers differ in their ids, the frames must not
    assert first.shape[0] == 17 and (first == second).all()


def test_memory_prints_a_prediction(capsys):
    assert main(["memory", "--model", "tiny", "--width", "64", "--height", "64", "--frames", "9",
                 "--mode", "histream+", "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)
    assert prediction["end_to_end_after_gib"] <= prediction["end_to_end_interleaved_gib"]
    assert prediction["width"] == 64 and prediction["mode"] == "histream+" and prediction["frames_run"] == 9
    assert main(["memory", "--model", "tiny", "--width", "100", "--frames", "9"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_user_files_end_to_end(user_files, tmp_path, capsys):
    out = tmp_path / "fox.webm"
    args = ["generate", *SMALL, "--checkpoint", str(user_files / "dit.safetensors"),
            "--vae", str(user_files / "vae.safetensors"), "--text-encoder", str(user_files / "umt5.pth"),
            "--tokenizer", str(user_files / "tokenizer.json"), "--text-cache", str(tmp_path / "cache"),
            "--prompt", "a fox runs in snow", "--mode", "histream+", "--out", str(out), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [c["model_calls"] for c in report["chunks"]] == [4]  # one chunk: 2 low + 2 high, no cache to write
    assert sum(c["video_frames"] for c in report["chunks"]) == 9
    assert sum(1 for _ in iio.imiter(out)) == 9
    assert any((tmp_path / "cache").iterdir())  # the prompt's embedding was cached


@needs_fp8_matmul
def test_user_files_with_fp8_matmul(user_files, tmp_path, capsys):
    args = ["generate", *SMALL[:-1], "bf16", "--checkpoint", str(user_files / "dit.safetensors"), "--vae",
            str(user_files / "vae.safetensors"), "--text-encoder", str(user_files / "umt5.pth"), "--tokenizer",
            str(user_files / "tokenizer.json"), "--text-cache", str(tmp_path / "cache"), "--prompt", "a fox",
            "--fp8-matmul"]
    assert main([*args, "--out", str(tmp_path / "fast.mp4")]) == 0
    assert sum(1 for _ in iio.imiter(tmp_path / "fast.mp4")) == 9
    assert main([*args[:-1], "--dtype", "fp32", "--fp8-matmul", "--out", str(tmp_path / "no.mp4")]) == 2
    assert "add --dtype bf16" in capsys.readouterr().err and not (tmp_path / "no.mp4").exists()
    # fp8 storage alone runs in any compute dtype (weights upcast per call)
    stored = [*args[:-1], "--dtype", "fp32", "--fp8-weights", "--out", str(tmp_path / "stored.mp4")]
    assert main(stored) == 0 and sum(1 for _ in iio.imiter(tmp_path / "stored.mp4")) == 9
    pipe = HiStreamPipeline.from_files(user_files / "dit.safetensors", user_files / "vae.safetensors", device="cpu",
                                       fp8_weights=True)
    assert pipe.model.stores_block_weights_in_fp8 and pipe.model.blocks[0].ffn[0].weight_scale is not None
    assert main(["generate", *SMALL, "--fp8-weights", "--out", str(tmp_path / "embedded.mp4")]) == 0


def test_config_file_sets_defaults(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"mode": "two-step", "frames": 5}))
    out = tmp_path / "two.mp4"
    assert main(["generate", "--config", str(config), *SMALL[:4], "--device", "cpu", "--dtype", "fp32",
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == 5 and [c["model_calls"] for c in report["chunks"]] == [2]  # 1 low + 1 high


def test_unknown_config_option_is_named(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"steps": 3}))
    assert main(["generate", "--config", str(config)]) == 2
    assert "unknown options ['steps']" in capsys.readouterr().err


def test_config_file_that_is_missing_or_not_an_object_is_refused_and_null_is_the_default(tmp_path, capsys):
    assert main(["generate", "--config", str(tmp_path / "absent.json")]) == 2
    assert "config file" in (err := capsys.readouterr().err) and "does not exist" in err
    (tmp_path / "run.json").mkdir()
    assert main(["generate", "--config", str(tmp_path / "run.json")]) == 2
    assert "run.json is a folder; give the .json file inside it" in capsys.readouterr().err
    (tmp_path / "list.json").write_text(json.dumps(["--mode", "histream+"]))  # argv copied into a file
    assert main(["generate", "--config", str(tmp_path / "list.json")]) == 2
    assert "must hold a JSON object of generate options" in capsys.readouterr().err
    (tmp_path / "nulls.json").write_text(json.dumps({"tile": None, "frames": 5}))  # null: the option's default
    assert main(["generate", "--config", str(tmp_path / "nulls.json"), *SMALL[:4], "--device", "cpu", "--dtype",
                 "fp32", "--out", str(tmp_path / "x.mp4"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 5


@pytest.mark.parametrize("swap,expect", [
    ("checkpoint", "looks like a VAE: give it as the VAE (ComfyUI: Load VAE; CLI: --vae)"),
    ("vae", "diffusion model (DiT) checkpoint: give it as the model (ComfyUI: HiStream Loader, "
            "models/diffusion_models; CLI: --checkpoint)"),
])
def test_wrong_files_name_the_file_and_what_was_expected(user_files, tmp_path, capsys, swap, expect):
    files = {"checkpoint": user_files / "dit.safetensors", "vae": user_files / "vae.safetensors"}
    files["checkpoint" if swap == "checkpoint" else "vae"] = files["vae" if swap == "checkpoint" else "checkpoint"]
    args = ["generate", *SMALL, "--checkpoint", str(files["checkpoint"]), "--vae", str(files["vae"]),
            "--text-encoder", str(user_files / "umt5.pth"), "--tokenizer", str(user_files / "tokenizer.json"),
            "--text-cache", str(tmp_path), "--prompt", "a fox", "--out", str(tmp_path / "x.mp4")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expect in err and str(files[swap]) in err
    assert not (tmp_path / "x.mp4").exists()


def test_missing_files_and_bad_requests_exit_with_a_message(user_files, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope.pt"), "--vae", "v", "--text-embeds", "t"]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert main(["generate", *SMALL[:2], "--height", "64", "--frames", "8", "--device", "cpu",
                 "--out", str(tmp_path / "y.mp4")]) == 2
    assert "4k+1" in capsys.readouterr().err and not (tmp_path / "y.mp4").exists()
    assert main(["generate", "--checkpoint", str(user_files / "dit.safetensors")]) == 2
    assert "--vae" in capsys.readouterr().err


def test_inspect_prints_layout_and_config(user_files, capsys):
    assert main(["inspect", str(user_files / "dit.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "model.diffusion_model." in json.dumps(info) and info["parameters"] > 0


def test_inspect_takes_the_head_size_the_shapes_cannot_tell(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_model(seed=1).state_dict(), str(path))  # width 48: 2 heads of 24
    assert main(["inspect", str(path)]) == 2
    assert "not a multiple of head_dim 128" in (err := capsys.readouterr().err) and "inspect --head-dim N" in err
    assert main(["inspect", str(path), "--head-dim", "24"]) == 0
    assert "num_heads=2" in capsys.readouterr().out


def test_schedule_switches_prompt_at_a_frame(tmp_path, capsys):
    out = tmp_path / "story.mp4"
    assert main(["generate", *SMALL[:4], "--frames", "37", "--device", "cpu", "--dtype", "fp32", "--out", str(out),
                 "--schedule", "13:the fox jumps", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # frame 13 is latent 4, inside chunk 2 (latents 3-5): the prompt takes over with chunk 3, which recaches
    # runs [0] and [4, 5] at both resolutions before its own 6 calls; the last chunk writes no cache
    assert [c["model_calls"] for c in report["chunks"]] == [6, 6, 10, 4]
    assert [c["chunk"] for c in report["chunks"]] == [1, 2, 3, 4]  # numbered as in the table and the nodes
    assert main(["generate", *SMALL, "--schedule", "nonsense", "--out", str(tmp_path / "bad.mp4")]) == 2
    assert "FRAME:PROMPT" in capsys.readouterr().err


def test_pipeline_story_is_checked_before_encoding_and_takes_states(tmp_path):
    """A story's frames are checked before any prompt is encoded (this pipeline has no encoder: encoding would fail
    with another message), and a story may give precomputed states instead of prompts."""
    from histream_core.pipeline import embedded_default, random_text_embedding
    pipe = HiStreamPipeline(*embedded_default())
    args = dict(width=64, height=64, frames=25, mode="histream+", out=tmp_path / "story.mp4")
    with pytest.raises(ValueError, match="a story starts at frame 0"):
        pipe.generate([(5, "a fox"), (13, "b")], **args)
    with pytest.raises(ValueError, match=r"prompt at frame 5 would start in chunk 2, not after the one at frame 2 "
                                         r"\(chunk 2\): start it at frame 10 or later"):
        pipe.generate([(0, "a"), (2, "b"), (5, "c")], **args)
    states = [random_text_embedding(text, pipe.model.cfg.text_dim) for text in ("a fox", "a fox in snow")]
    report = pipe.generate([(0, states[0]), (13, states[1])], **args)
    assert [c.model_calls for c in report.chunks] == [6, 4, 6]  # chunk 3: 4 recache + 2 steps, no cache write
    with pytest.raises(ValueError, match=r"text states \[1, tokens, 32\]"):
        pipe.generate(42, **args)


def test_pipeline_without_an_encoder_refuses_prompts_and_reports_each_chunk(tmp_path):
    """A prompt string needs a text encoder (states do not); on_chunk sees every chunk, in order, with the timing
    that the report holds."""
    from histream_core.pipeline import embedded_default, random_text_embedding
    pipe = HiStreamPipeline(*embedded_default())
    args = dict(width=64, height=64, frames=13, mode="histream+")
    with pytest.raises(ValueError, match="this pipeline has no text encoder"):
        pipe.generate("a fox", out=tmp_path / "x.mp4", **args)
    assert list(tmp_path.iterdir()) == []
    seen = []
    report = pipe.generate(random_text_embedding("a fox", pipe.model.cfg.text_dim), out=tmp_path / "fox.mp4",
                           on_chunk=lambda chunk, timing: seen.append((chunk.index, timing)), **args)
    assert [index for index, _ in seen] == [0, 1]
    assert [timing for _, timing in seen] == list(report.chunks)
    assert sum(timing.video_frames for _, timing in seen) == 13


def test_pipeline_story_prompts(user_files, tmp_path):
    from histream_core.pipeline import HiStreamPipeline
    pipe = HiStreamPipeline.from_files(user_files / "dit.safetensors", user_files / "vae.safetensors",
                                       user_files / "umt5.pth", user_files / "tokenizer.json", device="cpu",
                                       text_cache_dir=tmp_path / "cache")
    report = pipe.generate([(0, "a fox runs"), (13, "a fox in snow")], width=64, height=64, frames=25,
                           mode="histream+", out=tmp_path / "new" / "story.mp4")  # folders made, as the CLI does
    assert report.path.is_file()
    assert [c.model_calls for c in report.chunks] == [6, 4, 6]  # chunk 3: 4 recache + 2 steps, no cache write
    assert not pipe.text_encoder.loaded


def test_schedule_with_a_real_checkpoint_needs_the_text_encoder(user_files, tmp_path, capsys):
    """Without an encoder the later prompts cannot be encoded: an error, never stand-in embeddings."""
    embeds = tmp_path / "first.safetensors"
    save_file({"context": torch.randn(1, 5, UMT5_PRESETS["tiny"].dim)}, str(embeds))
    out = tmp_path / "x.mp4"
    assert main(["generate", *SMALL, "--checkpoint", str(user_files / "dit.safetensors"), "--vae",
                 str(user_files / "vae.safetensors"), "--text-embeds", str(embeds), "--schedule", "13:later",
                 "--frames", "37", "--out", str(out)]) == 2
    assert "--schedule needs --text-encoder" in capsys.readouterr().err and not out.exists()


def test_tiny_decoder_file_decodes_the_video(user_files, tmp_path, capsys):
    from histream_core.vae import TinyWanDecoder
    torch.manual_seed(3)
    save_file(TinyWanDecoder().state_dict(), str(tmp_path / "taew2_1.safetensors"))
    out = tmp_path / "draft.mp4"
    base = ["generate", *SMALL, "--checkpoint", str(user_files / "dit.safetensors"), "--text-encoder",
            str(user_files / "umt5.pth"), "--tokenizer", str(user_files / "tokenizer.json"), "--text-cache",
            str(tmp_path / "cache"), "--prompt", "a fox", "--tiny-decoder", str(tmp_path / "taew2_1.safetensors")]
    assert main([*base, "--out", str(out), "--json"]) == 0
    assert sum(c["video_frames"] for c in json.loads(capsys.readouterr().out)["chunks"]) == 9
    assert sum(1 for _ in iio.imiter(out)) == 9
    assert main([*base, "--out", str(out), "--tile", "4"]) == 2
    assert "decode tiles apply to the Wan VAE; the tiny decoder" in (err := capsys.readouterr().err)
    assert "(drop --tile)" in err
    assert main([*base, "--vae", str(user_files / "vae.safetensors"), "--out", str(out)]) == 2
    assert "not both" in capsys.readouterr().err


def test_embedded_default_decodes_with_a_tiny_decoder_file(tmp_path, capsys):
    """Without --checkpoint, --tiny-decoder replaces the built-in random VAE: a quick end-to-end check of a file."""
    from histream_core.vae import TinyWanDecoder
    torch.manual_seed(3)
    save_file(TinyWanDecoder().state_dict(), str(tmp_path / "taew2_1.safetensors"))
    out = tmp_path / "draft.mp4"
    assert main(["generate", *SMALL, "--tiny-decoder", str(tmp_path / "taew2_1.safetensors"), "--out", str(out),
                 "--json"]) == 0
    assert sum(c["video_frames"] for c in json.loads(capsys.readouterr().out)["chunks"]) == 9
    assert sum(1 for _ in iio.imiter(out)) == 9


def test_bench_times_each_mode_with_its_exact_flops(capsys):
    from histream_core.config import MODEL_PRESETS
    from histream_core.flops import run_flops
    from histream_core.modes import MODES
    args = ["bench", "--model", "tiny", "--width", "64", "--height", "64", "--frames", "17", "--device", "cpu",
            "--modes", "histream,histream+,self-forcing", "--repeats", "2", "--warmup", "0"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["mode"] for row in report["modes"]] == ["histream", "histream+", "self-forcing"]
    assert report["kv_cache_fp8"] is False and report["repeats"] == 2 and report["attention"] == "sdpa"
    for row in report["modes"]:
        flops = run_flops(MODEL_PRESETS["tiny"], MODES[row["mode"]], 64, 64, 17)
        assert row["tflop_total"] == flops.tflop_total and row["model_calls"] == flops.model_calls
        assert len(row["chunk_s"]) == 2 and row["s_per_frame"] == pytest.approx(row["total_s"] / 17)
        assert row["total_s"] > 0 and row["peak_gib"] is None  # no CUDA here
        assert row["drift"] is None  # two chunks: nothing after chunk 3 to compare
    assert main(args[:-4] + ["--repeats", "1", "--warmup", "0"]) == 0
    table = capsys.readouterr().out
    assert "tiny (random weights), 64x64, 17 frames" in table and "self-forcing" in table
    header, _, *rows = table.splitlines()[1:]
    assert header.split()[2:4] == ["MFLOP", "MFLOP/s"]  # the tiny model's ~30 MFLOP did not read 0.0 TFLOP
    for row, flops in zip(rows, (report["modes"][i]["tflop_total"] for i in range(3))):
        total, rate = (float(cell.replace(",", "")) for cell in row.split()[2:4])
        assert total == pytest.approx(flops * 1e6, abs=0.05) and rate > 0


def test_bench_times_random_weights_stored_in_fp8(capsys, monkeypatch):
    """--fp8-weights also applies to the built-in random model (not only to a checkpoint): its blocks are timed in
    fp8 storage."""
    import histream_core.timing as timing
    time_mode, timed_in_fp8 = timing.time_mode, []
    monkeypatch.setattr(timing, "time_mode", lambda model, *args, **kwargs: timed_in_fp8.append(
        model.stores_block_weights_in_fp8) or time_mode(model, *args, **kwargs))
    assert main(["bench", "--model", "tiny", "--width", "64", "--height", "64", "--frames", "9", "--device", "cpu",
                 "--modes", "histream+", "--repeats", "1", "--warmup", "1", "--fp8-weights", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fp8_weights"] and report["modes"][0]["total_s"] > 0 and timed_in_fp8 == [True]


def test_bench_on_a_checkpoint_and_its_errors(user_files, capsys):
    args = ["bench", "--checkpoint", str(user_files / "dit.safetensors"), "--width", "64", "--height", "64",
            "--frames", "9", "--device", "cpu", "--repeats", "1", "--warmup", "0"]
    assert main([*args, "--modes", "histream+"]) == 0
    assert "dit.safetensors" in capsys.readouterr().out
    assert main([*args, "--modes", "histream+", "--fp8-weights", "--kv-cache-fp8"]) == 0
    assert "fp8 weights, fp8 K/V cache" in capsys.readouterr().out  # the header names every option timed
    assert main([*args, "--modes", "histream,fastest"]) == 2
    assert "unknown ['fastest']" in capsys.readouterr().err
    assert main([*args, "--height", "72"]) == 2  # not on the dual-resolution grid: the sampler's message
    assert "multiple of 32" in capsys.readouterr().err
    assert main([*args, "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_flops_table_floor_follows_the_rate(capsys):
    """The table (not only --json); --rate is read as a number: half the rate, twice the floor."""
    args = ["flops", "--model", "tiny", "--width", "64", "--height", "64", "--frames", "17"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.startswith("tiny, 64x64, 17 frames") and "histream+" in table and "floor" in table
    assert main([*args, "--rate", "399"]) == 0
    halved = capsys.readouterr().out
    floor = [float(line.split()[-1]) for text in (table, halved) for line in text.splitlines() if
             line.startswith("histream+ ")]
    assert floor[0] > 0 and floor[1] == pytest.approx(2 * floor[0], rel=0.05)
    with pytest.raises(SystemExit):
        main(["flops", "--rate", "fast"])
    assert "must be a positive number, got fast" in capsys.readouterr().err


def test_chunk_drift_compares_the_last_chunk_but_one_with_chunk_3():
    from histream_core.timing import chunk_drift
    # the last chunk writes no cache (and may be short): never the one compared
    assert chunk_drift([5.0, 2.0, 1.0, 1.01, 1.04, 0.3]) == pytest.approx(0.04)
    assert chunk_drift([5.0, 2.0, 1.0, 1.0]) is None


# -- bad input: a message that names the problem and the fix, before any file is loaded, and no file left ----------
def test_requests_are_checked_before_the_model_files_are_loaded(tmp_path, capsys):
    """Loading real weights takes minutes; a wrong size, output or schedule must not wait for it. Here the
    checkpoint does not even exist, so any message about it would mean the request was checked too late."""
    files = ["--checkpoint", str(tmp_path / "absent.safetensors"), "--vae", "v", "--text-encoder", "t",
             "--device", "cpu"]
    cases = [
        (["--width", "80"], "width 80 does not fit"),
        (["--width", "0"], "width must be a positive number of pixels, got 0; use a multiple of 32, e.g. 1920"),
        (["--out", str(tmp_path)], "is a folder"),
        (["--frames", "8"], "4k+1"),
        (["--frames", "33", "--schedule", "30:later"], "would never be used: start it at frame 21 or before"),
        (["--schedule", "0:first"], "frame 0 belongs to --prompt"),
        (["--out", str(tmp_path / "taken.mp4")], "is a folder"),
        (["--out", str(tmp_path / "new" / "x.avi")], "unknown container '.avi'"),
        (["--fps", "inf"], "fps must be between"),
        (["--tile", "4"], "--tile must be at least 8 latent pixels"),
        (["--shift", "nan"], "--shift: nan is out of range: use a number in [0.1, 100]"),
        (["--shift", "1e308"], "--shift: 1e+308 is out of range: use a number in [0.1, 100] (the mode's value is 7)"),
        (["--low-res-scale", "1e-9"], "--low-res-scale: 1e-09 is out of range: use a number in [0.1, 1]"),
        (["--first-chunk-attn-coef", "1e-9"], "--first-chunk-attn-coef: 1e-09 is out of range"),
        (["--first-chunk-steps", "1000,,750|500"], "--first-chunk-steps: cannot use '1000,,750|500' (an empty item "
                                                   "between commas)"),
        (["--mode", "no-drc", "--ntk-factor-low", "5"], "--ntk-factor-low: mode 'no-drc' does not use it"),
        (["--first-chunk-steps", "500|1000"], "--first-chunk-steps: cannot use '500|1000' (steps must strictly"),
        (["--mode", "self-forcing", "--later-chunk-steps", "1000|500"], "--later-chunk-steps: mode 'self-forcing' "
                                                                        "has no low-resolution steps"),
        (["--local-frames", "-1"], "--local-frames: StreamConfig.anchor_frames and local_frames must be >= 0"),
        (["--mode", "self-forcing", "--local-frames", "1"], "--local-frames: the sliding window is off (mode "
                                                            "'self-forcing' keeps every past frame"),
        (["--no-window", "--anchor-frames", "2"], "--anchor-frames: the sliding window is off (--no-window is given)"),
        (["--dtype", "fp32", "--fp8-matmul"], "--fp8-matmul quantizes bf16 activations, and this run computes in "
                                              "fp32: add --dtype bf16"),
        (["--chunk-frames", "0"], "--chunk-frames: StreamConfig.chunk_frames must be >= 1"),
        (["--anchor-frames", "0", "--local-frames", "0"], "needs at least one anchor or local frame"),
        (["--device", "meta"], "HiStream runs on cpu or cuda"),
    ]
    (tmp_path / "taken.mp4").mkdir()
    for extra, expected in cases:
        assert main(["generate", *files, "--width", "64", "--height", "64", "--frames", "9", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert expected in err and "absent" not in err, (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.mp4"]  # not even the folder of the refused .avi


def test_checkpoint_without_text_states_is_refused_before_loading(tmp_path, capsys):
    """A checkpoint has no stand-in embeddings: it needs --text-encoder or --text-embeds, said before it is read."""
    assert main(["generate", "--checkpoint", str(tmp_path / "absent.safetensors"), "--vae", "v", "--device", "cpu",
                 "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "with --checkpoint pass --text-encoder" in err and "absent" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_papers_readings_are_flags_on_top_of_the_mode():
    args = build_parser().parse_args(["generate", "--mode", "histream+", "--ntk-factor-low", "5", "--ntk-factor-high",
                                      "4", "--first-chunk-attn-coef", "1", "--later-chunk-steps", "1000|250",
                                      "--chunk-frames", "4", "--local-frames", "3", "--shift", "6"])
    cfg = sampler_config(args)
    assert cfg.hd.rope_factors_low == (1.0, 5.0, 5.0) and cfg.hd.rope_factors_high == (1.0, 4.0, 4.0)
    assert cfg.hd.first_chunk_attn_coef == 1.0 and cfg.shift == 6.0
    assert cfg.later_chunks == ChunkSteps(low=(1000.0,), high=(250.0,))
    assert cfg.first_chunk == MODES["histream+"].first_chunk
    assert (cfg.stream.chunk_frames, cfg.stream.anchor_frames, cfg.stream.local_frames) == (4, 1, 3)
    assert sampler_config(build_parser().parse_args(["generate", "--mode", "no-hd"])) == MODES["no-hd"]


def test_options_that_would_be_ignored_or_cannot_run_are_refused(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.mp4")]
    assert main(["generate", *SMALL, "--vae", str(tmp_path / "nope.safetensors"), *out]) == 2
    assert "--vae needs --checkpoint" in capsys.readouterr().err
    assert main(["generate", *SMALL[:6], "--device", "bogus", *out]) == 2
    assert "not a device name" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", *SMALL[:6], "--device", "cuda", *out]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
    assert main(["generate", *SMALL, "--attention", "sage", *out]) == 2  # not installed in the test environment
    assert "sageattention is not installed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["flops", "--rate", "0"])
    assert refused.value.code == 2 and "must be a positive number" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_later_chunk_steps_on_a_one_chunk_video_are_said_to_be_unused(tmp_path, capsys):
    assert main(["generate", *SMALL, "--later-chunk-steps", "1000|250", "--out", str(tmp_path / "x.mp4")]) == 0
    assert "--later-chunk-steps is unused: this 9-frame video is one chunk" in capsys.readouterr().err


def test_prompts_that_would_be_ignored_or_are_empty_are_refused(user_files, tmp_path, capsys):
    """--text-embeds holds the prompt's states: a --prompt (or an encoder) beside it used to be ignored silently,
    giving a video of another prompt; an empty prompt (an unset shell variable) an unconditioned video."""
    embeds = tmp_path / "states.safetensors"
    save_file({"context": torch.randn(1, 4, 32)}, str(embeds))
    out = ["--out", str(tmp_path / "x.mp4")]
    assert main(["generate", *SMALL, "--text-embeds", str(embeds), "--prompt", "a corgi", *out]) == 2
    assert "--text-embeds already holds the prompt's states, so --prompt would be ignored" in capsys.readouterr().err
    dit = ["--checkpoint", str(user_files / "dit.safetensors"), "--vae", str(user_files / "vae.safetensors")]
    assert main(["generate", *SMALL, *dit, "--text-embeds", str(embeds), "--text-encoder",
                 str(user_files / "umt5.pth"), "--tokenizer", str(user_files / "tokenizer.json"), *out]) == 2
    assert "so --text-encoder, --tokenizer would be ignored" in capsys.readouterr().err
    assert main(["generate", *SMALL, *dit, "--text-encoder", str(user_files / "umt5.pth"), *out]) == 2
    assert "with --checkpoint pass --text-encoder (umt5_xxl_fp16.safetensors) and --prompt" in capsys.readouterr().err
    assert main(["generate", *SMALL, "--prompt", "  ", *out]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["states.safetensors"]


def test_config_file_values_are_checked_like_options(tmp_path, capsys):
    config = tmp_path / "run.json"
    for values, expected in [({"kv_cache_fp8": "false"}, "kv_cache_fp8 takes true or false"),
                             ({"schedule": 12}, "schedule takes a list of \"FRAME:PROMPT\" strings"),
                             ({"width": [64]}, "width takes a single value"),
                             ({"width": 64.5}, "width takes an int, got 64.5"),
                             ({"dtype": "fp8"}, "dtype must be one of ['fp32', 'bf16', 'fp16'], got 'fp8'")]:
        config.write_text(json.dumps(values))
        assert main(["generate", "--config", str(config)]) == 2
        assert f"config file {config}: {expected}" in capsys.readouterr().err
    config.write_bytes(b"\xff\xfe{")
    assert main(["generate", "--config", str(config)]) == 2
    assert f"config file {config} is not valid JSON" in capsys.readouterr().err
    # the command line overrides the file; a value may start with "-"
    config.write_text(json.dumps({"frames": 17, "mode": "two-step", "prompt": "-a fox"}))
    assert main(["generate", "--config", str(config), *SMALL, "--out", str(tmp_path / "x.mp4"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == 9 and [c["model_calls"] for c in report["chunks"]] == [2]


def test_non_finite_results_stop_the_run_instead_of_writing_a_black_video(tmp_path, capsys, monkeypatch):
    import histream_core.cli as cli
    built_in = cli.embedded_default

    def overflowing(device):  # as a checkpoint whose weights overflow in fp16 would
        model, vae = built_in(device)
        model.head.head.bias.data.fill_(float("inf"))
        return model, vae

    monkeypatch.setattr(cli, "embedded_default", overflowing)
    out = tmp_path / "new" / "black.mp4"  # the folder made for the video goes again with the failed run
    assert main(["generate", *SMALL, "--out", str(out)]) == 2
    assert "chunk 1 came out as NaN/inf" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_text_embeds_that_cannot_be_used_are_refused_before_any_model_loads(user_files, tmp_path, capsys,
                                                                             monkeypatch):
    """--text-embeds is held against the model's text width and length (read from the checkpoint's header) first:
    loading a real checkpoint takes minutes. Each message names the flag and the file."""
    import histream_core.checkpoints as checkpoints
    monkeypatch.setattr(checkpoints, "load_wan_model", lambda *a, **k: pytest.fail("the checkpoint was loaded first"))
    dit = ["--checkpoint", str(user_files / "dit.safetensors"), "--vae", str(user_files / "vae.safetensors")]
    text_dim = 32  # the user files' umT5 and DiT (UMT5_PRESETS["tiny"])
    cases = {"clip.safetensors": ({"context": torch.randn(1, 4, 768)}, "holds 768-wide text states, and "
                                  f"--checkpoint dit.safetensors reads {text_dim}-wide ones"),
             "long.safetensors": ({"context": torch.randn(1, 513, text_dim)}, "holds 513 tokens, and --checkpoint "
                                  "dit.safetensors reads at most 512: keep the first 512"),
             "batch.safetensors": ({"context": torch.randn(2, 4, text_dim)}, "(one prompt), got (2, 4, 32)"),
             "nan.safetensors": ({"context": torch.full((1, 4, text_dim), float("nan"))}, "are not finite floats"),
             "two.safetensors": ({"a": torch.randn(1, 4, text_dim), "b": torch.randn(1, 4, text_dim)},
                                 "holds 2 tensors (a, b), not one: text states are a single tensor (name it "
                                 "'context'); a model's weights go to --checkpoint")}
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / name))
        assert main(["generate", *SMALL, *dit, "--text-embeds", str(tmp_path / name),
                     "--out", str(tmp_path / "x.mp4")]) == 2, name
        err = capsys.readouterr().err
        assert message in err and name in err, (name, err)
    save_file({"context": torch.randn(1, 17, 32)}, str(tmp_path / "long_for_the_built_in.safetensors"))
    assert main(["generate", *SMALL, "--text-embeds", str(tmp_path / "long_for_the_built_in.safetensors"),
                 "--out", str(tmp_path / "x.mp4")]) == 2
    assert "holds 17 tokens, and the built-in model reads at most 16" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_text_embeds_file_with_one_tensor_under_any_name_is_used(tmp_path, capsys):
    """A file holding a single tensor under another name than 'context' (e.g. diffusers' prompt_embeds) is the
    states; a missing file and a folder are named as such."""
    from histream_core.text import load_text_embeddings
    states = torch.randn(1, 4, 32)  # the built-in model's text width
    save_file({"prompt_embeds": states}, str(tmp_path / "named.safetensors"))
    assert torch.equal(load_text_embeddings(tmp_path / "named.safetensors"), states)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_embeddings(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="is a folder"):
        load_text_embeddings(tmp_path)
    assert main(["generate", *SMALL, "--text-embeds", str(tmp_path / "named.safetensors"),
                 "--out", str(tmp_path / "x.mp4")]) == 0
    assert sum(1 for _ in iio.imiter(tmp_path / "x.mp4")) == 9


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_running_out_of_host_memory_while_reading_a_file_is_not_called_a_bad_file(user_files, tmp_path, capsys,
                                                                                   monkeypatch, suffix):
    """torch.load and safetensors fail alike on a truncated file and on a full RAM: only the first is the file's."""
    weight_files = __import__("histream_core.weight_files", fromlist=["torch"])
    path = user_files / "dit.safetensors"
    if suffix == ".pt":
        path = tmp_path / "dit.pt"
        torch.save({"w": torch.zeros(2)}, path)

    def full_ram(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(weight_files.torch, "load", full_ram)
    monkeypatch.setattr("safetensors.safe_open", full_ram)
    assert main(["inspect", str(path)]) == 3
    err = capsys.readouterr().err
    assert "out of host (CPU) memory" in err and "truncated" not in err


def test_gpu_out_of_memory_exits_3_with_the_options_not_yet_used(tmp_path, capsys, monkeypatch):
    """The advice lists only the memory options this run has not used yet, and points to the memory command."""
    import histream_core.cli as cli

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(cli, "generate_to_file", out_of_memory)
    assert main(["generate", *SMALL, "--out", str(tmp_path / "x.mp4")]) == 3
    err = capsys.readouterr().err
    assert "out of GPU memory" in err and "--tile 64" in err and "--kv-cache-fp8" in err and "--fp8-weights" in err
    assert "predicts a request's peak GPU memory" in err and "--decode-order after" not in err  # already 'after'
    assert main(["generate", *SMALL, "--tile", "8", "--kv-cache-fp8", "--decode-order", "interleaved",
                 "--out", str(tmp_path / "x.mp4")]) == 3
    err = capsys.readouterr().err
    assert "--tile 64" not in err and "--kv-cache-fp8" not in err and "--decode-order after" in err
    assert list(tmp_path.iterdir()) == []


def test_a_bug_is_raised_with_its_traceback_not_reported_as_exit_2(tmp_path, monkeypatch):
    """A RuntimeError that is not an attention-backend or memory problem is a bug: main re-raises it."""
    import histream_core.cli as cli

    def bug(*args, **kwargs):
        raise RuntimeError("shape '[1, 2]' is invalid for input of size 3")
    monkeypatch.setattr(cli, "generate_to_file", bug)
    with pytest.raises(RuntimeError, match="is invalid for input"):
        main(["generate", *SMALL, "--out", str(tmp_path / "x.mp4")])


def test_interrupted_runs_exit_130_and_leave_nothing(tmp_path, capsys, monkeypatch):
    import histream_core.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "generate_to_file", interrupted)
    assert main(["generate", *SMALL, "--out", str(tmp_path / "x.mp4")]) == 130
    assert "interrupted: nothing was saved" in capsys.readouterr().err


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_stop_signals_end_a_run_without_leaving_a_partial_file(tmp_path, signal_name):
    """Job schedulers and `timeout` stop programs with SIGTERM, a closed terminal or ssh session with SIGHUP; both
    must unwind like Ctrl-C: the hidden partial file and the folder made for the video go."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "new" / "long.mp4"
    run = subprocess.Popen([sys.executable, "-m", "histream_core", "generate", "--width", "64", "--height", "64",
                            "--frames", "401", "--device", "cpu", "--dtype", "fp32", "--decode-order", "interleaved",
                            "--out", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("new/.long.*.partial.mp4")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(getattr(signal, signal_name))
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err[-2000:]
    assert "interrupted: nothing was saved" in err and list(tmp_path.iterdir()) == []


def test_a_path_the_terminal_cannot_encode_does_not_fail_a_saved_video(tmp_path):
    """With an ASCII stdout the summary's path is escaped; the video is saved, so the exit status is 0 (it was 2)."""
    import os
    import subprocess
    import sys
    out = tmp_path / "renard_ünï.mp4"
    run = subprocess.run([sys.executable, "-m", "histream_core", "generate", *SMALL, "--out", str(out)],
                         capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert b"renard_\\xfcn\\xef.mp4" in run.stdout and out.is_file()


def test_python_api_refuses_bad_arguments_with_the_fix(user_files, tmp_path):
    with pytest.raises(ValueError, match="not a device name"):
        HiStreamPipeline.from_files(user_files / "dit.safetensors", user_files / "vae.safetensors", device="gpu0")
    with pytest.raises(ValueError, match="cannot be a compute dtype"):
        HiStreamPipeline.from_files(user_files / "dit.safetensors", user_files / "vae.safetensors", device="cpu",
                                    dtype=torch.int8)
    with pytest.raises(ValueError, match="is a folder, not a file"):
        HiStreamPipeline.from_files(user_files, user_files / "vae.safetensors", device="cpu")
    pipe = HiStreamPipeline.from_files(user_files / "dit.safetensors", user_files / "vae.safetensors", device="cpu")
    states = torch.randn(1, 4, pipe.model.cfg.text_dim)
    with pytest.raises(ValueError, match="prompt must be a string"):
        pipe.generate(None, width=64, height=64, frames=5, out=tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="width must be a whole number"):
        pipe.generate(states, width=64.0, height=64, frames=5, out=tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="must be a SamplerConfig, got 'histream\\+'.*takes a mode's name as mode="):
        pipe.generate(states, width=64, height=64, frames=5, config="histream+", out=tmp_path / "x.mp4")
    (tmp_path / "taken.mp4").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        pipe.generate(states, width=64, height=64, frames=5, out=tmp_path / "taken.mp4")
    assert [p.name for p in tmp_path.iterdir()] == ["taken.mp4"]


def test_from_files_needs_exactly_one_decoder(user_files):
    for vae, tiny in ((None, None), (user_files / "vae.safetensors", user_files / "vae.safetensors")):
        with pytest.raises(ValueError, match="one of them"):
            HiStreamPipeline.from_files(user_files / "dit.safetensors", vae, device="cpu", tiny_decoder=tiny)


def test_checked_device_defaults_to_cuda_when_torch_sees_a_gpu():
    from histream_core.pipeline import checked_device
    assert checked_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_non_finite_frames_stop_the_decode(tmp_path):
    """A VAE with an inf weight (or fp16 overflow) decodes black frames; the run stops and writes nothing."""
    from histream_core.pipeline import embedded_default
    from histream_core.vae import NonFiniteFrames
    model, vae = embedded_default()
    with torch.no_grad():
        vae.decoder.head[-1].weight.view(-1)[0] = float("inf")
    pipe = HiStreamPipeline(model, vae)
    states = torch.randn(1, 4, model.cfg.text_dim)
    with pytest.raises(NonFiniteFrames, match="decoded frames of chunk 1 are NaN/inf"):
        pipe.generate(states, width=64, height=64, frames=5, out=tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="seed must be a whole number"):
        pipe.generate(states, width=64, height=64, frames=5, out=tmp_path / "x.mp4", seed=1.5)
    assert list(tmp_path.iterdir()) == []


def test_config_file_schedule_is_used_unless_the_command_line_gives_one(tmp_path, capsys):
    config = tmp_path / "story.json"
    config.write_text(json.dumps({"schedule": ["13:the fox jumps"], "frames": 37}))
    base = ["generate", "--config", str(config), *SMALL[:4], "--device", "cpu", "--dtype", "fp32", "--json"]
    assert main([*base, "--out", str(tmp_path / "a.mp4")]) == 0
    assert [c["model_calls"] for c in json.loads(capsys.readouterr().out)["chunks"]] == [6, 6, 10, 4]  # recache
    for given in (["--schedule", "25:later"], ["--schedule=25:later"], ["--sched", "25:later"]):  # as argparse reads
        assert main([*base, *given, "--out", str(tmp_path / "b.mp4")]) == 0  # chunk 4 takes over, alone
        assert [c["model_calls"] for c in json.loads(capsys.readouterr().out)["chunks"]] == [6, 6, 6, 8], given


def test_seed_and_fps_reach_the_video(tmp_path, capsys):
    """--seed picks the noise (the same seed gives the same frames, another seed others) and --fps is the file's."""
    outs = [tmp_path / f"{name}.mp4" for name in ("five", "again", "six")]
    for out, seed in zip(outs, ("5", "5", "6")):
        assert main(["generate", *SMALL, "--seed", seed, "--fps", "24", "--out", str(out)]) == 0
    capsys.readouterr()
    five, again, six = (iio.imread(out) for out in outs)
    assert (five == again).all() and not (five == six).all()
    assert iio.immeta(outs[0])["fps"] == 24


def test_decode_tiles_are_used(tmp_path, monkeypatch):
    """tile: the frames written are the tiled decode of the run's latents (which differs from the whole-frame one)."""
    import histream_core.pipeline as pipeline
    from histream_core.modes import mode_config
    from histream_core.sampler import generate_video
    from histream_core.vae import TiledDecoder, denormalize
    written = []
    monkeypatch.setattr(pipeline, "uint8_frames", lambda video: written.append(video) or video.new_zeros(
        video.shape[2], video.shape[3], video.shape[4], 3, dtype=torch.uint8))
    model, vae = pipeline.embedded_default()
    text = pipeline.random_text_embedding("a fox", model.cfg.text_dim)
    cfg = mode_config("histream+")
    pipeline.generate_to_file(model, vae, text, tmp_path / "tiled.mp4", 128, 64, 5, cfg, 3, tile=8)
    with torch.no_grad():
        latents = denormalize(generate_video(model, text, 128, 64, 5, cfg, 3))  # 16 x 8 latent px: 3 tiles of 8
        tiled = TiledDecoder.overlapping_by_a_quarter(vae, 8).decode(latents)
    assert len(written) == 1 and torch.equal(written[0], tiled)
    assert not torch.equal(tiled, vae.decode(latents))


def test_run_report_numbers():
    """The timing table and the JSON report: chunks numbered from 1, per-frame denoising over the video's frames."""
    from pathlib import Path

    from histream_core.pipeline import ChunkTiming, RunReport
    report = RunReport(Path("v.mp4"), 64, 64, 17, (ChunkTiming(0, 3, 9, 0, 6, 0.9, 0.25, 0.01),
                                                    ChunkTiming(1, 2, 8, 3, 4, 0.8, 0.5, 0.0)))
    data = report.as_dict()
    assert data["denoise_s_per_frame"] == pytest.approx(1.7 / 17) and data["decode_s"] == pytest.approx(0.75)
    assert [c["chunk"] for c in data["chunks"]] == [1, 2] and data["chunks"][1]["cached_frames"] == 3
    rows = report.table().splitlines()
    assert rows[2].split() == ["1", "3", "9", "0", "6", "0.900", "0.250", "0.010"]
    assert rows[-1] == "total: 17 frames 64x64, denoise 1.700 s (0.1000 s/frame), decode 0.750 s -> v.mp4"


def test_generate_options_reach_the_run(tmp_path, capsys, monkeypatch):
    """Options that change memory, timing or numerics but no frame count: the run must get each of them, a config
    file's value giving way to the command line's."""
    import inspect

    import histream_core.cli as cli
    from histream_core.pipeline import generate_to_file
    runs = []

    def capture(*args, **kwargs):
        bound = inspect.signature(generate_to_file).bind(*args, **kwargs)
        bound.apply_defaults()
        runs.append(bound.arguments)
        raise KeyboardInterrupt  # nothing to generate: the arguments are what this test is about
    monkeypatch.setattr(cli, "generate_to_file", capture)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"decode_order": "interleaved", "seed": 3, "kv_cache_fp8": True, "no_window": False}))
    assert main(["generate", "--config", str(config), *SMALL, "--width", "128", "--decode-order", "overlapped",
                 "--tile", "8", "--seed", "5", "--fps", "24", "--rope-positions", "window",
                 "--fp8-weights", "--out", str(tmp_path / "x.mp4")]) == 130
    (run,) = runs
    assert (run["order"], run["tile"], run["seed"], run["fps"]) == ("overlapped", 8, 5, 24.0)
    assert run["config"].kv_cache_fp8 and run["config"].rope_positions == "window" and run["config"].stream.window
    assert (run["width"], run["height"], run["frames"]) == (128, 64, 9) and run["model"].stores_block_weights_in_fp8


def test_step_strings_read_and_write_as_the_help_shows():
    """Step knobs as STEPS_EXAMPLE writes them: 'low|high', or the high steps alone at full resolution; every mode's
    steps read back from their string; a repeated timestep is refused (the steps must strictly decrease)."""
    from histream_core.modes import KnobError, format_steps, parse_steps
    assert parse_steps("k", "1000,750|500,250") == ChunkSteps(low=(1000.0, 750.0), high=(500.0, 250.0))
    assert parse_steps("k", " 1000,750,500,250 ") == ChunkSteps(low=(), high=(1000.0, 750.0, 500.0, 250.0))
    assert format_steps(MODES["no-drc"].first_chunk) == "1000,750,500,250"
    assert format_steps(MODES["histream"].first_chunk) == "1000,750|500,250"
    for cfg in MODES.values():
        for steps in (cfg.first_chunk, cfg.later_chunks):
            assert parse_steps("k", format_steps(steps)) == steps
    for bad in ("1000|750|500", "1000|1000,500", "1000,750,750"):
        with pytest.raises(KnobError):
            parse_steps("k", bad)


def test_step_strings_allow_one_trailing_comma_but_no_empty_item():
    """A trailing comma (a list copied from code) is not a deleted number; an empty item anywhere else is."""
    from histream_core.modes import KnobError, parse_steps
    assert parse_steps("k", "1000,750,|500,250,") == ChunkSteps(low=(1000.0, 750.0), high=(500.0, 250.0))
    assert parse_steps("k", "1000,750,500,250,") == ChunkSteps(low=(), high=(1000.0, 750.0, 500.0, 250.0))
    for bad in ("1000,,750|500", "1000,750,,|500", ",1000|500", "1000|500,,"):
        with pytest.raises(KnobError, match="an empty item between commas"):
            parse_steps("k", bad)


def test_text_embeds_of_exactly_the_models_text_length_are_used(tmp_path):
    """text_len is the most tokens the model reads, so a file of exactly that many (a prompt padded to it, as umT5
    pads to 512) runs; one more is refused (test_text_embeds_that_cannot_be_used_are_refused...)."""
    save_file({"context": torch.randn(1, 16, 32)}, str(tmp_path / "full.safetensors"))  # the built-in model: 16 x 32
    assert main(["generate", *SMALL, "--text-embeds", str(tmp_path / "full.safetensors"),
                 "--out", str(tmp_path / "x.mp4")]) == 0
    assert (tmp_path / "x.mp4").is_file()


def test_a_text_cache_beside_text_embeds_is_refused(user_files, tmp_path, capsys):
    """--text-cache only stores encoded prompts: with --text-embeds nothing is encoded, so it would be ignored."""
    embeds = tmp_path / "states.safetensors"
    save_file({"context": torch.randn(1, 4, 32)}, str(embeds))
    dit = ["--checkpoint", str(user_files / "dit.safetensors"), "--vae", str(user_files / "vae.safetensors")]
    assert main(["generate", *SMALL, *dit, "--text-embeds", str(embeds), "--text-cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "--text-embeds already holds the prompt's states, so --text-cache would be ignored" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["states.safetensors"]


def test_main_gives_back_the_signal_handlers_it_replaced(tmp_path):
    """main() turns SIGTERM/SIGHUP into KeyboardInterrupt only while it runs: a program calling it keeps its own."""
    import signal

    from histream_core.cli import STOP_SIGNALS

    def mine(signum, frame):
        pass

    before = {s: signal.signal(s, mine) for s in STOP_SIGNALS}
    try:
        assert main(["generate", *SMALL, "--width", "80", "--out", str(tmp_path / "x.mp4")]) == 2
        assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_bench_holds_text_embeds_against_the_preset_it_times(tmp_path, capsys, monkeypatch):
    """bench --model names the model the states go to: the tiny model's 32-wide states do not fit Wan2.1-1.3B's
    4096-wide text input, and that is said before the 1.3B model is built."""
    import histream_core.cli as cli
    monkeypatch.setattr(cli, "CausalWanModel", lambda *a, **k: pytest.fail("the model was built first"))
    save_file({"context": torch.randn(1, 4, 32)}, str(tmp_path / "tiny_states.safetensors"))
    assert main(["bench", "--model", "wan2.1-1.3b", "--width", "64", "--height", "64", "--frames", "9", "--device",
                 "cpu", "--modes", "histream", "--text-embeds", str(tmp_path / "tiny_states.safetensors")]) == 2
    assert "holds 32-wide text states, and the built-in model reads 4096-wide ones" in capsys.readouterr().err


@pytest.mark.parametrize("chunk_frames, next_chunk", [(3, 9), (4, 13)])
def test_a_schedule_at_frame_0_says_where_the_next_chunk_starts(tmp_path, capsys, chunk_frames, next_chunk):
    """Frame 0 belongs to --prompt; the message gives the first frame a later prompt can take over at."""
    assert main(["generate", *SMALL, "--frames", "33", "--chunk-frames", str(chunk_frames), "--schedule", "0:first",
                 "--out", str(tmp_path / "x.mp4")]) == 2
    assert f"(the next chunk starts at frame {next_chunk})" in capsys.readouterr().err
