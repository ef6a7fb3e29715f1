"""Tests for nodegraph_diffusion.text.t5: parity with transformers' T5EncoderModel, config from shapes, errors, fp16."""

from __future__ import annotations

import pytest
import torch
from nodegraph_diffusion.text.t5 import (
    EMBEDDING_ALIAS,
    RELATIVE_BIAS_KEY,
    CastLinear,
    T5Config,
    T5Encoder,
    T5LoadError,
    load_t5_encoder,
    relative_position_buckets,
    t5_config_from_shapes,
)
from torch import Tensor, nn

TOL = 1e-4
EOS, PAD = 1, 0

# heads * head_dim (64) differs from the width (48) on purpose: the two must not be confused.
TINY = T5Config(vocab_size=160, width=48, heads=4, head_dim=16, ff_width=80, layers=3)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values in every parameter: norm scales around 1, matrices by fan-in, bias table and embeddings wide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layer_norm" in name:
                param.copy_(1 + 0.3 * noise)
            elif "relative_attention_bias" in name or "shared" in name or "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[1] ** 0.5)
    return module.eval()


def hf_model(config: T5Config, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.T5Config(
        vocab_size=config.vocab_size,
        d_model=config.width,
        d_kv=config.head_dim,
        d_ff=config.ff_width,
        num_layers=config.layers,
        num_heads=config.heads,
        relative_attention_num_buckets=config.relative_buckets,
        relative_attention_max_distance=config.relative_max_distance,
        dropout_rate=0.0,
        layer_norm_epsilon=config.norm_eps,
        feed_forward_proj="gated-gelu",
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    model = transformers.T5EncoderModel(hf_config)
    return randomize_(model, seed)


def token_ids(lengths: list[int], total: int, vocab: int, seed: int = 1) -> Tensor:
    """A batch of prompts of the given token counts, each followed by EOS and zero padding to `total`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), total), PAD, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(2, vocab, (n,), generator=generator)
        ids[row, n] = EOS
    return ids


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def reference():
    return hf_model(TINY)


@pytest.fixture(scope="module")
def ours(reference) -> T5Encoder:
    return load_t5_encoder(reference.state_dict())


# --------------------------------------------------------------------------- parity


def test_every_reference_parameter_is_random(reference) -> None:
    for name, param in reference.named_parameters():
        assert param.std() > 0.05, name  # no zero-init or constant-init parameter left


@pytest.mark.parity
@pytest.mark.parametrize(
    "lengths, total",
    [([0], 1), ([3, 0], 5), ([10, 40], 77), ([150, 5], 200)],  # 200 > 2 x 128: every bucket, the cap included
)
def test_matches_transformers_unmasked(reference, ours: T5Encoder, lengths: list[int], total: int) -> None:
    ids = token_ids(lengths, total, TINY.vocab_size)
    with torch.no_grad():
        want = reference(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (len(lengths), total, TINY.width) and got.dtype == torch.float32
    assert max_err(got, want) <= TOL


@pytest.mark.parity
def test_matches_transformers_masked(reference, ours: T5Encoder) -> None:
    ids = token_ids([12, 70, 3], 77, TINY.vocab_size)
    mask = (torch.arange(77)[None, :] <= torch.tensor([12, 70, 3])[:, None]).long()  # text and EOS
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask)
        unmasked = ours(ids)
    kept = mask.bool()
    assert max_err(got[kept], want[kept]) <= TOL
    assert max_err(got[kept], unmasked[kept]) > 1e-2  # the mask does change what the text tokens see


@pytest.mark.parity
def test_relative_buckets_match_transformers() -> None:
    from transformers.models.t5.modeling_t5 import T5Attention

    for buckets, max_distance in [(32, 128), (16, 20)]:
        length = 2 * max_distance + 9
        positions = torch.arange(length)
        want = T5Attention._relative_position_bucket(
            positions[None, :] - positions[:, None], bidirectional=True, num_buckets=buckets, max_distance=max_distance
        )
        got = relative_position_buckets(length, buckets, max_distance)
        assert torch.equal(got, want)
        # Every bucket is reached but "after the query at distance 0", which cannot happen.
        assert set(got.unique().tolist()) == set(range(buckets)) - {buckets // 2}


@pytest.mark.parity
def test_embed_tokens_alias_and_full_t5_files_load(reference, ours: T5Encoder) -> None:
    state = reference.state_dict()
    alias_only = {(EMBEDDING_ALIAS if k == "shared.weight" else k): v for k, v in state.items() if k != EMBEDDING_ALIAS}
    assert "shared.weight" not in alias_only
    decoder = {"decoder.final_layer_norm.weight": torch.ones(TINY.width), "lm_head.weight": torch.ones(3, 3)}
    with_decoder = {**state, **decoder}
    ids = token_ids([20], 30, TINY.vocab_size)
    with torch.no_grad():
        want = ours(ids)
        assert torch.equal(load_t5_encoder(alias_only)(ids), want)
        assert torch.equal(load_t5_encoder(with_decoder)(ids), want)


# --------------------------------------------------------------------------- config from shapes and errors


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_config_from_shapes(reference) -> None:
    assert t5_config_from_shapes(shapes_of(reference)) == TINY
    other = T5Config(vocab_size=99, width=32, heads=2, head_dim=8, ff_width=24, layers=5, relative_buckets=16)
    with torch.device("meta"):
        assert t5_config_from_shapes(shapes_of(T5Encoder(other))) == other


def test_config_from_shapes_t5_xxl_header() -> None:
    """The shapes of t5xxl_fp16.safetensors give the default config (T5-XXL v1.1)."""
    with torch.device("meta"):
        shapes = shapes_of(T5Encoder(T5Config()))
    assert shapes["encoder.block.23.layer.1.DenseReluDense.wi_1.weight"] == (10240, 4096)
    assert shapes[RELATIVE_BIAS_KEY] == (32, 64)
    assert t5_config_from_shapes(shapes) == T5Config()


@pytest.mark.parametrize(
    "key",
    [
        "shared.weight",
        RELATIVE_BIAS_KEY,
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
    ],
)
def test_config_from_shapes_names_missing_key(reference, key: str) -> None:
    shapes = shapes_of(reference)
    del shapes[key]
    shapes.pop(EMBEDDING_ALIAS, None)
    with pytest.raises(T5LoadError, match=f"no '{key}'") as info:
        t5_config_from_shapes(shapes)
    assert info.value.key == key


def test_config_from_shapes_names_odd_keys(reference) -> None:
    shapes = shapes_of(reference)
    bad_q = dict(shapes, **{"encoder.block.0.layer.0.SelfAttention.q.weight": (63, TINY.width)})
    q_message = r"'encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight' has shape \(63, 48\)"
    with pytest.raises(T5LoadError, match=q_message):
        t5_config_from_shapes(bad_q)
    original_t5 = {k.replace("wi_0", "wi"): v for k, v in shapes.items() if "wi_1" not in k}
    with pytest.raises(T5LoadError, match="original T5") as info:
        t5_config_from_shapes(original_t5)
    assert info.value.key == "encoder.block.0.layer.1.DenseReluDense.wi.weight"
    umt5 = dict(shapes, **{"encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": (32, 4)})
    with pytest.raises(T5LoadError, match="umT5"):
        t5_config_from_shapes(umt5)
    gap = {k: v for k, v in shapes.items() if not k.startswith("encoder.block.1.")}
    with pytest.raises(T5LoadError, match=r"not numbered 0\.\.N-1: \[0, 2\]"):
        t5_config_from_shapes(gap)
    vector_bias = dict(shapes, **{RELATIVE_BIAS_KEY: (32,)})
    with pytest.raises(T5LoadError, match="expected 2 dimensions"):
        t5_config_from_shapes(vector_bias)


def test_load_names_missing_unexpected_and_misshapen_keys(reference) -> None:
    state = reference.state_dict()
    missing_key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    with pytest.raises(T5LoadError, match=f"missing \\['{missing_key}'\\]") as info:
        load_t5_encoder({k: v for k, v in state.items() if k != missing_key})
    assert info.value.key == missing_key
    with pytest.raises(T5LoadError, match=r"unexpected \['scaled_fp8'\]"):
        load_t5_encoder({**state, "scaled_fp8": torch.zeros(0)})
    misshapen = dict(state, **{"encoder.block.2.layer.0.layer_norm.weight": torch.ones(TINY.width + 1)})
    with pytest.raises(T5LoadError, match=r"encoder\.block\.2\.layer\.0\.layer_norm\.weight"):
        load_t5_encoder(misshapen)


def test_input_checks(ours: T5Encoder) -> None:
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        ours(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        ours(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="compute_dtype"):
        ours(torch.zeros(1, 4, dtype=torch.long), compute_dtype=torch.int8)


# --------------------------------------------------------------------------- dtypes and half precision


def test_weights_keep_their_dtype(reference) -> None:
    state = {k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()}
    state["encoder.final_layer_norm.weight"] = state["encoder.final_layer_norm.weight"].float()  # mixed files exist
    model = load_t5_encoder(state)
    assert model.shared.weight.dtype == torch.bfloat16
    assert model.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
    assert model.encoder.final_layer_norm.weight.dtype == torch.float32
    assert model.shared.weight.data_ptr() == state["shared.weight"].data_ptr()  # taken, not copied
    ids = token_ids([9], 16, TINY.vocab_size)
    with torch.no_grad():
        assert model(ids).dtype == torch.bfloat16
        assert model(ids, compute_dtype=torch.float32).dtype == torch.float32


def test_cast_linear_computes_in_input_dtype() -> None:
    layer = CastLinear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]]))
    layer.half()
    x = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    out = layer(x)
    assert out.dtype == torch.float64 and layer.weight.dtype == torch.float16
    assert out.tolist() == [[6.0, -0.25]]


def overflowing_model() -> tuple[T5Encoder, dict[str, Tensor]]:
    """The tiny encoder with feed-forward outputs far beyond float16's 65504 (as in T5-XXL)."""
    model = randomize_(T5Encoder(TINY), seed=3)
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(30000.0)
    return model, model.state_dict()


def residual_peaks(model: T5Encoder, ids: Tensor, **kwargs) -> tuple[Tensor, float]:
    peaks = []
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: peaks.append(out.abs().max().item()))
        for block in model.encoder.block
    ]
    try:
        with torch.no_grad():
            out = model(ids, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return out, max(peaks)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_stays_finite_and_close(half: torch.dtype) -> None:
    model, state = overflowing_model()
    ids = token_ids([30, 7], 64, TINY.vocab_size)
    want, peak = residual_peaks(model, ids)
    assert peak > 2 * torch.finfo(torch.float16).max  # the test does provoke float16 overflow
    half_model = load_t5_encoder({k: v.to(half) for k, v in state.items()})
    fp32_of_half_weights = load_t5_encoder({k: v.to(half).float() for k, v in state.items()})
    got, _ = residual_peaks(half_model, ids)
    with torch.no_grad():
        same_weights = fp32_of_half_weights(ids)
    assert got.dtype == half and torch.isfinite(got).all()
    # Against float32 on the same (rounded) weights: only the half input projections differ.
    scale = same_weights.abs().max().item()
    tolerance = 0.02 if half == torch.float16 else 0.08
    assert max_err(got, same_weights) <= tolerance * scale, (max_err(got, same_weights), scale)
    # And the rounded weights still give (roughly) the float32 model's output.
    assert torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_8bit_storage_computes_like_its_upcast(reference, storage: torch.dtype) -> None:
    """The seam for 8-bit files: weights stay 8-bit, each layer casts them to the compute dtype."""
    state = reference.state_dict()
    stored = load_t5_encoder({k: v.to(storage) for k, v in state.items()})
    upcast = load_t5_encoder({k: v.to(storage).float() for k, v in state.items()})
    assert stored.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == storage
    ids = token_ids([20, 5], 40, TINY.vocab_size)
    with torch.no_grad():
        got = stored(ids)  # compute dtype defaults to float32 for 8-bit tables
        assert got.dtype == torch.float32
        assert torch.equal(got, upcast(ids))
