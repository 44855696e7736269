"""The standalone umT5 text encoder: parity with transformers, every weight layout, tokenizers, the cache, bad files.

Everything is tiny and random (UMT5_PRESETS["tiny"]); tokenizers are built here. No weights, no network.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import randomize_, tiny_model
from histream_core.text import (UMT5_PRESETS, TextEncoder, TextEncoderError, UMT5Config, UMT5Encoder, UMT5Tokenizer,
                                encode_prompts, load_text_embeddings, load_umt5_encoder)
from histream_core.text.umt5 import relative_position_buckets

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
sentencepiece = pytest.importorskip("sentencepiece")

CFG = UMT5_PRESETS["tiny"]
WORDS = "a cat dog runs over the green hill under blue sky with red sun and white cloud in city at night".split()
# ComfyUI-style fp8 e4m3 weights with one scale per tensor, measured on the tiny random model (seeds 0-3): relative
# L2 error 2.6-2.8% per linear weight (3 mantissa bits), 12-18% on the final states (random weights with T5's
# unscaled attention give sharp softmaxes that amplify it; trained umT5 weights were not available to measure).
FP8_WEIGHT_TOL, FP8_STATES_TOL = 0.035, 0.25


def hf_config(cfg: UMT5Config = CFG) -> "transformers.UMT5Config":
    return transformers.UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.ffn_dim, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        layer_norm_epsilon=cfg.eps)


@pytest.fixture(scope="module")
def hf_model() -> "transformers.UMT5EncoderModel":
    """transformers' umT5 encoder with every parameter random: norms, relative biases and embeddings included."""
    model = transformers.UMT5EncoderModel._from_config(hf_config(), attn_implementation="eager")
    with torch.no_grad():  # relative biases as large as trained ones, so that a wrong bucket shows
        for block in model.encoder.block:
            block.layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 2.0)
    return randomize_(model, seed=1).eval()


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The HF state dict with tied tensors cloned (safetensors refuses shared memory)."""
    return {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_file(hf_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("te") / "umt5_hf.safetensors"
    save_file(hf_state(hf_model), str(path))
    return path


def hf_states(hf_model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask).last_hidden_state


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def word_tokenizer(folder: Path) -> Path:
    """A WordLevel tokenizer.json with umT5's special ids (<pad> 0, </s> 1, <unk> 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "&": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def sentencepiece_bytes() -> bytes:
    """A small unigram sentencepiece model trained here, with umT5's special ids."""
    corpus = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(200)]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, vocab_size=60, model_type="unigram", pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return buffer.getvalue()


# -- the model ------------------------------------------------------------------------------------------------------
def test_parity_with_transformers_including_padding(hf_model, hf_file):
    model = load_umt5_encoder(hf_file, dtype=torch.float32)
    ids = random_ids(2, 24)  # 24 tokens: every bucket is used, the last one included
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 15:] = 0
    ours = model(ids, mask)
    ref = hf_states(hf_model, ids, mask)
    assert (ours[0] - ref[0]).abs().max() < 1e-5 * ref[0].abs().max()
    assert (ours[1, :15] - ref[1, :15]).abs().max() < 1e-5 * ref[1].abs().max()
    assert ours[1, 15:].abs().max() == 0  # padded positions zeroed
    alone = model(ids[1:, :15])  # padding changes nothing for the real tokens
    assert torch.allclose(alone[0], ours[1, :15], atol=1e-5, rtol=1e-5)
    # and without a mask at all
    assert torch.allclose(model(ids[:1]), ref[:1], atol=1e-5, rtol=1e-5)


def test_buckets_match_transformers_at_full_size():
    full = UMT5_PRESETS["umt5-xxl"]
    attention = transformers.models.umt5.modeling_umt5.UMT5Attention(
        hf_config(full.with_(dim=8, ffn_dim=8, num_heads=1, head_dim=8, num_layers=1)),
        has_relative_attention_bias=True)
    position = torch.arange(full.text_len)
    ref = attention._relative_position_bucket(position[None, :] - position[:, None])
    ours = relative_position_buckets(full.text_len, full.num_buckets, full.max_distance)
    assert torch.equal(ours, ref)
    assert ours.max() == full.num_buckets - 1


def test_xxl_shape_and_config_checks():
    with torch.device("meta"):
        model = UMT5Encoder(UMT5_PRESETS["umt5-xxl"])
    # 1.05 B embedding + 24 x 193 M blocks: the 5.68 B parameters of umt5_xxl_fp16.safetensors (11.4 GB)
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336
    for bad in (dict(dim=0), dict(num_buckets=7), dict(num_buckets=2), dict(max_distance=2), dict(eps=0.0)):
        with pytest.raises(ValueError, match="UMT5Config"):
            CFG.with_(**bad)


# -- weight layouts -------------------------------------------------------------------------------------------------
def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().max().float() / torch.finfo(torch.float8_e4m3fn).max
    return (weight.float() / scale).to(torch.float8_e4m3fn), scale


def comfy_scaled_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's umt5_xxl_fp8_e4m3fn_scaled layout: fp8 linears with scale_weight / scale_input, a marker, fp16 rest."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if key == "encoder.embed_tokens.weight":
            continue
        if "relative_attention_bias" in key or value.ndim == 1 or key == "shared.weight":
            out[key] = value.half()
        else:
            out[key], out[key.removesuffix("weight") + "scale_weight"] = _quantize(value)
            out[key.removesuffix("weight") + "scale_input"] = torch.ones(())
    return out


def test_scaled_fp8_dequantizes_and_stays_close(hf_model, tmp_path):
    state = hf_state(hf_model)
    stored = comfy_scaled_fp8(state)
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(stored, str(path))
    model = load_umt5_encoder(path, dtype=torch.float32)
    loaded = model.state_dict()
    assert torch.equal(loaded["blocks.1.ffn.fc2.weight"], stored["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
                       .float() * stored["encoder.block.1.layer.1.DenseReluDense.wo.scale_weight"])
    assert torch.equal(loaded["blocks.0.attn.q.weight"], stored["encoder.block.0.layer.0.SelfAttention.q.weight"]
                       .float() * stored["encoder.block.0.layer.0.SelfAttention.q.scale_weight"])
    reference = load_umt5_encoder(_save_hf(hf_model, tmp_path), dtype=torch.float32).state_dict()
    for key, weight in reference.items():
        if key.startswith("blocks.") and weight.ndim == 2 and "pos_embedding" not in key:
            assert 1e-3 < ((loaded[key] - weight).norm() / weight.norm()) < FP8_WEIGHT_TOL, key
    ids = random_ids(1, 20, seed=3)
    ours, ref = model(ids), hf_states(hf_model, ids)
    assert ((ours - ref).norm() / ref.norm()) < FP8_STATES_TOL


@pytest.mark.parametrize("layout", ["comfy_fp16", "wan_pth", "prefixed_bundle", "hf_pt"])
def test_every_layout_round_trips(layout, hf_model, tmp_path):
    reference = load_umt5_encoder(_save_hf(hf_model, tmp_path), dtype=torch.float32)
    expected = reference.state_dict()
    state = hf_state(hf_model)
    if layout == "comfy_fp16":  # no embed_tokens copy, fp16, an embedded tokenizer
        path = tmp_path / "umt5_xxl_fp16.safetensors"
        stored = {k: v.half() for k, v in state.items() if k != "encoder.embed_tokens.weight"}
        save_file({**stored, "spiece_model": torch.frombuffer(bytearray(b"spm"), dtype=torch.uint8)}, str(path))
        expected = {k: v.half().float() for k, v in expected.items()}
    elif layout == "wan_pth":  # the model's own names are Wan's
        path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
        torch.save({k: v.bfloat16() for k, v in expected.items()}, path)
        expected = {k: v.bfloat16().float() for k, v in expected.items()}
    elif layout == "prefixed_bundle":  # a checkpoint bundling other models next to the text encoder
        path = tmp_path / "bundle.safetensors"
        save_file({**{f"text_encoders.umt5xxl.transformer.{k}": v for k, v in state.items()},
                   "model.diffusion_model.blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(path))
    else:  # a full transformers encoder-decoder state dict saved with torch.save: the decoder is ignored
        path = tmp_path / "pytorch_model.bin"
        torch.save({**state, "decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2),
                    "lm_head.weight": torch.zeros(2, 2)}, path)
    loaded = load_umt5_encoder(path, dtype=torch.float32).state_dict()
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key


def _save_hf(hf_model, folder: Path) -> Path:
    path = folder / "hf.safetensors"
    save_file(hf_state(hf_model), str(path))
    return path


def test_dtype_and_bf16_run(hf_file):
    model = load_umt5_encoder(hf_file, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = random_ids(1, 10)
    states = model(ids)
    ref = load_umt5_encoder(hf_file, dtype=torch.float32)(ids)
    assert states.dtype == torch.float32 and ((states - ref).norm() / ref.norm()) < 0.05
    with pytest.raises(ValueError, match="dtype"):
        load_umt5_encoder(hf_file, dtype=torch.float8_e4m3fn)


# -- tokenizers -----------------------------------------------------------------------------------------------------
def test_tokenizer_json_end_to_end(hf_model, hf_file, tmp_path, caplog):
    folder = word_tokenizer(tmp_path / "google" / "umt5-xxl")
    tokenizer = UMT5Tokenizer.from_file(folder)
    tokens = tokenizer("  a cat &amp;amp;\n dog  ", CFG.text_len)
    assert tokens.ids == [4, 5, 3, 6, 1] and tokens.dropped == 0  # cleaned like Wan, then </s>
    with TextEncoder(hf_file, folder, cache_dir=None) as text:
        states = text.encode("a cat & dog")
    assert states.shape == (1, 5, CFG.dim)
    assert torch.allclose(states, hf_states(hf_model, torch.tensor([tokens.ids])), atol=1e-5, rtol=1e-5)

    long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(30))
    with caplog.at_level(logging.WARNING):
        cut = tokenizer(long_prompt, CFG.text_len)
    assert len(cut.ids) == CFG.text_len and cut.ids[-1] == 1 and cut.dropped == 30 - (CFG.text_len - 1)
    assert "cut to 16 tokens" in caplog.text
    with TextEncoder(hf_file, folder, cache_dir=None, text_len=CFG.text_len) as text:
        assert text.encode(long_prompt).shape == (1, CFG.text_len, CFG.dim)


def test_sentencepiece_file_and_embedded_tokenizer(hf_model, tmp_path):
    data = sentencepiece_bytes()
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "spiece.model").write_bytes(data)
    from_file = UMT5Tokenizer.from_file(tmp_path / "spm")
    ids = from_file("a cat runs", CFG.text_len).ids
    assert ids[-1] == 1 and len(ids) >= 4 and max(ids) < CFG.vocab_size
    # ComfyUI embeds the same bytes as a uint8 tensor; then no tokenizer file is needed
    path = tmp_path / "umt5_with_spiece.safetensors"
    save_file({**hf_state(hf_model), "spiece_model": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, str(path))
    text = TextEncoder(path, cache_dir=None)
    assert text.tokenizer.identity == from_file.identity
    assert torch.allclose(text.encode("a cat runs"), hf_states(hf_model, torch.tensor([ids])), atol=1e-5, rtol=1e-5)


def test_batched_prompts_equal_single_prompts(hf_file, tmp_path):
    tokenizer = UMT5Tokenizer.from_file(word_tokenizer(tmp_path))
    model = load_umt5_encoder(hf_file, dtype=torch.float32)
    prompts = ["a cat", "the green hill under blue sky with red sun", "dog"]
    batched = encode_prompts(model, tokenizer, prompts)
    assert [e.states.shape[1] for e in batched] == [3, 10, 2]
    for prompt, encoded in zip(prompts, batched):
        assert torch.allclose(encode_prompts(model, tokenizer, [prompt])[0].states, encoded.states, atol=1e-5)


@pytest.mark.parametrize("name", ["states.safetensors", "states.SFT", "states.pt"])
def test_text_embedding_files_in_every_weight_suffix(tmp_path, name):
    states = torch.randn(1, 5, 4096)
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save(states[0], path)  # a bare [tokens, 4096] tensor gets its batch axis
    else:
        save_file({"context": states}, str(path))
    assert torch.equal(load_text_embeddings(path), states)


# -- the cache ------------------------------------------------------------------------------------------------------
def test_cache_skips_the_encoder(hf_file, tmp_path, monkeypatch):
    calls = []
    forward = UMT5Encoder.forward
    monkeypatch.setattr(UMT5Encoder, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    folder, cache = word_tokenizer(tmp_path / "tok"), tmp_path / "cache"

    with TextEncoder(hf_file, folder, cache_dir=cache) as text:
        first = text.encode("a cat runs")
        assert len(calls) == 1 and text.loaded
    assert not text.loaded  # freed on leaving the block
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and torch.equal(load_text_embeddings(files[0]), first)

    again = TextEncoder(hf_file, folder, cache_dir=cache)  # a new run: same files
    assert torch.equal(again.encode("a cat runs"), first)
    assert len(calls) == 1 and not again.loaded  # the encoder was never even loaded
    states = again.encode_all(["a cat runs", "a dog", "a dog"])  # one hit, one miss (asked twice): one call
    assert len(calls) == 2 and torch.equal(states[1], states[2])

    key = again.cache_key("a cat runs")
    assert again.cache_key("a dog") != key
    assert TextEncoder(hf_file, folder, cache_dir=cache, dtype=torch.bfloat16).cache_key("a cat runs") != key
    other = tmp_path / "other.safetensors"
    other.write_bytes(hf_file.read_bytes())
    assert TextEncoder(other, folder, cache_dir=cache).cache_key("a cat runs") != key
    os.utime(hf_file, ns=(hf_file.stat().st_atime_ns, hf_file.stat().st_mtime_ns + 10**9))  # the file changed
    assert TextEncoder(hf_file, folder, cache_dir=cache).cache_key("a cat runs") != key
    vocab = json.loads((folder / "tokenizer.json").read_text())
    words = vocab["model"]["vocab"]
    words["runs"], words["cat"] = words["cat"], words["runs"]  # a different tokenizer
    (tmp_path / "tok2").mkdir()
    (tmp_path / "tok2" / "tokenizer.json").write_text(json.dumps(vocab))
    assert TextEncoder(hf_file, tmp_path / "tok2", cache_dir=cache).cache_key("a cat runs") != key


def test_an_unwritable_cache_is_said_and_the_run_goes_on(hf_file, tmp_path, caplog):
    """The cache only saves time: a folder that cannot be made (here a file is in the way) must not end the run
    after the encoder has run (it used to, with a bare [Errno 17])."""
    folder, blocked = word_tokenizer(tmp_path / "tok"), tmp_path / "a_file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING):
        states = TextEncoder(hf_file, folder, cache_dir=blocked / "cache").encode("a cat runs")
    assert states.shape[0] == 1 and "cannot write the prompt cache in" in caplog.text and "--text-cache" in caplog.text


def test_a_damaged_cache_file_is_encoded_again_and_replaced(hf_file, tmp_path, caplog):
    """An interrupted run or a full disk leaves a cut cache file: it is re-encoded and overwritten, never fatal."""
    folder, cache = word_tokenizer(tmp_path / "tok"), tmp_path / "cache"
    first = TextEncoder(hf_file, folder, cache_dir=cache).encode("a cat runs")
    (entry,) = cache.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])
    again = TextEncoder(hf_file, folder, cache_dir=cache)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(again.encode("a cat runs"), first)
    assert "ignoring unreadable cache file" in caplog.text
    assert [p.name for p in cache.iterdir()] == [entry.name]  # rewritten whole, no temporary left
    assert not TextEncoder(hf_file, folder, cache_dir=cache).loaded
    assert torch.equal(TextEncoder(hf_file, folder, cache_dir=cache).encode("a cat runs"), first)


# -- bad files ------------------------------------------------------------------------------------------------------
def _error(path: Path) -> str:
    with pytest.raises(TextEncoderError) as caught:
        load_umt5_encoder(path)
    message = str(caught.value)
    assert str(path) in message and "What to do" in message
    return message


def test_bad_encoder_files(hf_model, hf_file, tmp_path):
    assert "does not exist" in _error(tmp_path / "nothing.safetensors")

    dit = tmp_path / "wan2.1_t2v_1.3B.safetensors"
    save_file(tiny_model().state_dict(), str(dit))
    message = _error(dit)
    assert "Layouts tried" in message and "diffusion model" in message and "umt5_xxl_fp16" in message

    for name in ("cut.safetensors", "cut.pth"):
        whole = tmp_path / ("whole" + Path(name).suffix)
        if name.endswith(".pth"):
            torch.save(hf_state(hf_model), whole)
        else:
            whole.write_bytes(hf_file.read_bytes())
        data = whole.read_bytes()
        (tmp_path / name).write_bytes(data[:len(data) // 2])
        assert "truncated" in _error(tmp_path / name)

    state = hf_state(hf_model)
    t5 = {k: v for k, v in state.items() if "relative_attention_bias" not in k or ".block.0." in k}
    save_file(t5, str(tmp_path / "t5xxl_fp16.safetensors"))
    assert "T5 v1.1" in _error(tmp_path / "t5xxl_fp16.safetensors")

    partial = {k: v for k, v in state.items() if "block.1.layer.1.DenseReluDense.wo" not in k}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    assert "missing keys: blocks.1.ffn.fc2.weight" in _error(tmp_path / "partial.safetensors")

    torch.save([1, 2], tmp_path / "list.pt")
    assert "not a dict of tensors" in _error(tmp_path / "list.pt")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert "unsupported file type" in _error(tmp_path / "model.gguf")


@pytest.mark.parametrize("state, what", [
    ({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, "looks like a VAE"),
    ({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}, "looks like a CLIP text encoder"),
    ({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, "looks like a decoder-only language model"),
])
def test_other_models_given_as_the_text_encoder_are_named(tmp_path, state, what):
    path = tmp_path / "other.safetensors"
    save_file(state, str(path))
    assert what in _error(path)


def test_bad_tokenizers(hf_file, tmp_path):
    with pytest.raises(TextEncoderError, match="(?s)does not exist.*google/umt5-xxl"):
        UMT5Tokenizer.from_file(tmp_path / "missing" / "tokenizer.json")
    with pytest.raises(TextEncoderError, match="neither tokenizer.json nor spiece.model"):
        UMT5Tokenizer.from_file(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"version": "1.0", "mod')
    with pytest.raises(TextEncoderError, match="truncated"):
        UMT5Tokenizer.from_file(tmp_path / "bad")
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"[UNK]": 0, "cat": 1}, unk_token="[UNK]")).save(str(tmp_path / "bert.json"))
    with pytest.raises(TextEncoderError, match="no '</s>' token"):
        UMT5Tokenizer.from_file(tmp_path / "bert.json")
    with pytest.raises(TextEncoderError, match="(?s)does not embed one.*spiece.model"):
        TextEncoder(hf_file, cache_dir=None)  # no tokenizer given, none inside the file

    from tokenizers import pre_tokenizers
    big = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "cat": CFG.vocab_size + 5}, unk_token="<unk>"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big.save(str(tmp_path / "big.json"))
    with pytest.raises(TextEncoderError, match="beyond the encoder's vocabulary"):
        TextEncoder(hf_file, tmp_path / "big.json", cache_dir=None).encode("cat")


def test_encoder_and_tokenizer_paths_that_cannot_work(tmp_path):
    with pytest.raises(TextEncoderError, match="(?s)text encoder file .*absent.safetensors' does not exist"):
        TextEncoder(tmp_path / "absent.safetensors", cache_dir=None)
    with pytest.raises(TextEncoderError, match="is a folder, not a file"):
        TextEncoder(tmp_path, cache_dir=None)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TextEncoderError, match="is not a tokenizer file"):
        UMT5Tokenizer.from_file(tmp_path / "vocab.txt")
    (tmp_path / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TextEncoderError, match="cannot read the sentencepiece model"):
        UMT5Tokenizer.from_file(tmp_path / "spiece.model")


def test_fp16_activations_are_clamped_not_inf(hf_file):
    model = load_umt5_encoder(hf_file, dtype=torch.float16)
    with torch.no_grad():
        for block in model.blocks:
            block.ffn.gate[0].weight.mul_(300)  # gated products far beyond the fp16 range (65504)
            block.ffn.fc1.weight.mul_(300)
    assert torch.isfinite(model(random_ids(1, 8))).all()


def test_fp16_attention_outputs_are_clamped_not_inf(hf_file):
    """The attention branch's fp16 output is clamped before it joins the residual, as transformers and Wan clamp it;
    an inf there would turn every later state into NaN."""
    model = load_umt5_encoder(hf_file, dtype=torch.float16)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.v.weight.mul_(300)  # attention outputs far beyond the fp16 range (65504)
            block.attn.o.weight.mul_(300)
    assert torch.isfinite(model(random_ids(1, 8))).all()


def test_truncation_keeps_the_first_tokens(tmp_path):
    """A long prompt keeps its beginning (transformers truncates on the right), then </s>."""
    tokenizer = UMT5Tokenizer.from_file(word_tokenizer(tmp_path))
    long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(30))
    whole = tokenizer(long_prompt, 100).ids
    assert len(whole) == 31 and whole[-1] == 1
    assert tokenizer(long_prompt, CFG.text_len).ids == whole[:CFG.text_len - 1] + [1]


def test_text_encoder_runs_in_the_dtype_asked_for(hf_file, tmp_path):
    """TextEncoder(dtype=bf16) loads the encoder in bf16 (the dtype its cache key names), not the device default."""
    folder = word_tokenizer(tmp_path)
    with TextEncoder(hf_file, folder, cache_dir=None, dtype=torch.bfloat16) as text:
        states = text.encode("a cat runs")
    ids = torch.tensor([UMT5Tokenizer.from_file(folder)("a cat runs", CFG.text_len).ids])
    with torch.no_grad():
        bf16 = load_umt5_encoder(hf_file, dtype=torch.bfloat16)(ids)
        fp32 = load_umt5_encoder(hf_file, dtype=torch.float32)(ids)
    assert torch.equal(states, bf16) and not torch.equal(states, fp32)


def test_cache_is_keyed_by_the_token_limit_and_remembers_the_cut(hf_file, tmp_path, caplog):
    """A prompt cut to 8 tokens and cached must not be served to a run that reads 16; and a cut prompt read back
    from the cache is reported as cut again."""
    folder, cache = word_tokenizer(tmp_path / "tok"), tmp_path / "cache"
    long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(30))
    with TextEncoder(hf_file, folder, cache_dir=cache, text_len=8) as text:
        assert text.encode(long_prompt).shape[1] == 8
    with caplog.at_level(logging.WARNING):
        again = TextEncoder(hf_file, folder, cache_dir=cache, text_len=8)
        assert again.encode(long_prompt).shape[1] == 8 and not again.loaded  # from the cache
    assert "prompt cut to 8 tokens: its last 23 tokens were dropped" in caplog.text
    assert TextEncoder(hf_file, folder, cache_dir=cache, text_len=16).encode(long_prompt).shape[1] == 16


def test_text_embeddings_of_integers_are_refused(tmp_path):
    """Token ids (or quantized states) saved in place of the encoder's states would run as numbers: refused."""
    path = tmp_path / "ids.safetensors"
    save_file({"context": torch.arange(20).reshape(1, 5, 4)}, str(path))
    with pytest.raises(ValueError, match="are not finite floats \\(torch.int64, NaN/inf or integers\\)"):
        load_text_embeddings(path)


@pytest.mark.parametrize("name", ["states.safetensors", "states.pt"])
def test_running_out_of_host_memory_reading_text_embeddings_is_not_called_a_bad_file(tmp_path, monkeypatch, name):
    """A full RAM is not a truncated file: the error goes up as it is (the CLI reports it as out of host memory)."""
    path = tmp_path / name
    torch.save(torch.zeros(5, 4), path) if name.endswith(".pt") else save_file({"context": torch.zeros(1, 5, 4)},
                                                                                 str(path))

    def full_ram(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr("safetensors.torch.load_file", full_ram)
    monkeypatch.setattr(torch, "load", full_ram)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        load_text_embeddings(path)


def test_text_embeddings_of_several_tensors_are_named_in_order(tmp_path):
    """The message lists a file's tensors sorted, whatever order the file holds them in."""
    path = tmp_path / "two.pt"
    torch.save({"b_states": torch.zeros(1, 5, 4), "a_mask": torch.zeros(1, 5)}, path)
    with pytest.raises(ValueError, match="holds 2 tensors \\(a_mask, b_states\\), not one"):
        load_text_embeddings(path)
