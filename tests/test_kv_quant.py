"""Known-answer tests of the K/V quantizer: error bounds, group boundaries, packing."""

import pytest
import torch

from workers.kv.quant import BITS, cat_tokens, dequantize, fake_quantize, pack, quantize, unpack


def _per_element(stat: torch.Tensor, axis: str, group: int, T: int) -> torch.Tensor:
    if axis == "token":
        return stat.float().repeat_interleave(group, dim=-1)
    return stat.float().repeat_interleave(group, dim=-2)[..., :T, :]


@pytest.fixture
def x() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 37, 16, generator=gen) * 3 + 1  # odd T: the last per-channel group is short


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("axis", "group"), [("token", None), ("token", 4), ("channel", 8), ("channel", 5)])
def test_round_trip_error_is_at_most_half_a_step(x, bits, axis, group):
    q = quantize(x, bits, axis=axis, group=group)
    x_hat = dequantize(q)
    step = _per_element(q.scale, axis, q.group, x.shape[-2])
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.float16
    assert torch.all((x - x_hat).abs() <= step / 2 * (1 + 1e-5) + 1e-6 * x.abs())


def test_error_shrinks_with_bits(x):
    errors = [float((x - fake_quantize(x, b)).abs().max()) for b in BITS]
    assert errors[0] > 4 * errors[1] > 16 * errors[2] > 0


def test_fake_quantize_keeps_dtype_and_16_bits_is_identity(x):
    assert fake_quantize(x, 16) is x
    assert fake_quantize(x.to(torch.bfloat16), 4).dtype == torch.bfloat16


def test_per_channel_groups_never_straddle_channels():
    # Channel c holds values in [10c, 10c + 1): a group mixing two channels would span 10 or more.
    T, D, G = 13, 5, 4
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, T, D, generator=gen) + 10 * torch.arange(D).float()
    q = quantize(x, 2, axis="channel", group=G)
    assert q.scale.shape == (1, 1, 4, D)  # ceil(13 / 4) groups per channel
    fp16_step = 2**-5  # the fp16 spacing below 64, by which the zero may sit under the minimum
    for g in range(4):
        block = x[0, 0, g * G:(g + 1) * G, :]  # the last block has a single token
        lo, hi = block.amin(0), block.amax(0)
        zero, scale = q.zero[0, 0, g].float(), q.scale[0, 0, g].float()
        assert torch.all((zero <= lo) & (lo - zero <= fp16_step))
        assert torch.all((zero + 3 * scale >= hi) & (3 * scale <= hi - lo + 2 * fp16_step))
    assert float((x - dequantize(q)).abs().max()) < 0.5 / 3 + fp16_step


def test_per_token_groups_never_straddle_tokens():
    x = torch.zeros(1, 1, 3, 8) + 1000 * torch.arange(3).float()[:, None]  # each token is constant
    q = quantize(x, 2, axis="token", group=4)
    assert torch.equal(dequantize(q), x)  # a constant group reconstructs exactly


def test_per_channel_split_on_whole_groups_equals_one_shot(x):
    whole = quantize(x[..., :32, :], 4, axis="channel", group=8)
    parts = cat_tokens([quantize(x[..., :16, :], 4, axis="channel", group=8),
                        quantize(x[..., 16:32, :], 4, axis="channel", group=8)])
    assert torch.equal(dequantize(whole), dequantize(parts))


def test_per_token_parts_concatenate(x):
    parts = cat_tokens([quantize(x[..., :5, :], 2).pack(), quantize(x[..., 5:, :], 2).pack()])
    assert torch.equal(dequantize(parts), dequantize(quantize(x, 2)))


def test_pack_known_bytes():
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack(torch.tensor([0xA, 0x5, 0x3], dtype=torch.uint8), 4).tolist() == [0x5A, 0x03]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 5, 16])
def test_pack_unpack_round_trip(bits, n):
    gen = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 2**bits, (3, 7, n), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-n * bits // 8)
    assert torch.equal(unpack(packed, bits, n), codes)


def test_packed_dequantizes_like_unpacked(x):
    for bits in BITS:
        q = quantize(x, bits, axis="channel", group=8)
        assert torch.equal(dequantize(q.pack()), dequantize(q))
        assert q.pack().nbytes() < q.nbytes() or bits == 8


def test_bad_arguments_are_refused(x):
    with pytest.raises(ValueError, match="bits=3"):
        quantize(x, 3)
    with pytest.raises(ValueError, match="does not divide head_dim 16"):
        quantize(x, 4, axis="token", group=5)
    with pytest.raises(ValueError, match="B, H, T, D"):
        quantize(x[0], 4)
