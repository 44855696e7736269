"""The one attention function: its scale, and the optional backends found (once) when installed."""

import importlib
import math
import types

import pytest
import torch
import torch.nn.functional as F

attn = importlib.import_module("histream_core.model.attention")  # the package exports a function of that name


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 7, 2, 8, generator=g) for _ in range(3)]  # [B, L, heads, head_dim]


def reference(q, k, v, logit_scale):
    logits = torch.einsum("blhd,bmhd->bhlm", q, k) * logit_scale / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", logits.softmax(-1), v)


@pytest.mark.parametrize("logit_scale", [1.0, 1.091])
def test_sdpa_is_softmax_attention_with_the_logit_scale(logit_scale):
    q, k, v = qkv()
    torch.testing.assert_close(attn.attention(q, k, v, "sdpa", logit_scale), reference(q, k, v, logit_scale))


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """A flash-attn stand-in (FA3's module name and tuple return) that counts its imports and calls."""
    imports, calls = [], []
    module = types.ModuleType("flash_attn_interface")

    def flash_attn_func(q, k, v, softmax_scale):
        calls.append(softmax_scale)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=softmax_scale).transpose(1, 2)
        return out, None  # FA3 also returns the log-sum-exp

    module.flash_attn_func = flash_attn_func
    real_import = attn.importlib.import_module

    def counting_import(name):
        imports.append(name)
        return module if name == "flash_attn_interface" else real_import(name)

    monkeypatch.setattr(attn.importlib, "import_module", counting_import)
    attn._flash_attn_func.cache_clear()
    yield imports, calls
    attn._flash_attn_func.cache_clear()


def test_flash_attn_is_looked_up_once_and_gives_attention(fake_flash_attn):
    imports, calls = fake_flash_attn
    q, k, v = qkv(1)
    for _ in range(3):
        out = attn.attention(q, k, v, "flash_attn", 1.091)
    torch.testing.assert_close(out, reference(q, k, v, 1.091))
    assert imports == ["flash_attn_interface"] and calls == [1.091 / math.sqrt(8)] * 3


def test_missing_flash_attn_names_the_packages_and_a_later_install_is_found(monkeypatch, fake_flash_attn):
    found_import = attn.importlib.import_module  # the fixture's: finds the stand-in

    def nothing_installed(name):
        raise ImportError(name)

    monkeypatch.setattr(attn.importlib, "import_module", nothing_installed)
    with pytest.raises(attn.AttentionBackendError, match="cannot run on cpu .*no flash-attn package is installed; "
                                                         "install flash-attn \\(2/3\\) or flash-attn-4"):
        attn.check_backend_runs("flash_attn", torch.device("cpu"), torch.float32)
    monkeypatch.setattr(attn.importlib, "import_module", found_import)  # installed since: the failure was not kept
    q, k, v = qkv(2)
    torch.testing.assert_close(attn.attention(q, k, v, "flash_attn"), reference(q, k, v, 1.0))



def test_a_backend_whose_kernel_fails_is_named_before_the_model_loads(monkeypatch):
    """A kernel that cannot run on the device raises torch's plain RuntimeError (here FlashAttention on a GPU older
    than Ampere): it is reported as the backend's problem with the fix, not left to end the run as a bug would."""
    def old_gpu(q, k, v, scale):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nException raised from mha_fwd")

    monkeypatch.setitem(attn._IMPLEMENTATIONS, "flash_attn", old_gpu)
    with pytest.raises(attn.AttentionBackendError, match="attention backend flash_attn cannot run on cpu in "
                                                         "torch.float32 \\(FlashAttention only supports Ampere GPUs "
                                                         "or newer.\\); choose sdpa"):
        attn.check_backend_runs("flash_attn", torch.device("cpu"), torch.float32)
