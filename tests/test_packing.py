import pytest
import torch

from optq.core.packing import pack, pack_cols, unpack, unpack_cols


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    rows = 32 * 3
    values = torch.randint(0, 2**bits, (rows, 7), generator=g, dtype=torch.int32)
    values[:32, 0] = 2**bits - 1  # all bits set: words with the sign bit set
    packed = pack(values, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows * bits // 32, 7)
    assert torch.equal(unpack(packed, bits), values)
    assert (packed < 0).any(), "a word with its top bit set must come out negative (int32 is signed)"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cols_round_trip(bits):
    values = torch.randint(0, 2**bits, (5, 64), dtype=torch.int32)
    packed = pack_cols(values, bits)
    assert packed.shape == (5, 64 * bits // 32)
    assert torch.equal(unpack_cols(packed, bits), values)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_power_of_two_layout_matches_spec(bits):
    # Spec: input i of column o lives in row i // (32 // bits) at bit offset bits * (i % (32 // bits)).
    per = 32 // bits
    values = torch.randint(0, 2**bits, (per * 4, 3), dtype=torch.int32)
    packed = pack(values, bits)
    for i in range(values.shape[0]):
        for o in range(3):
            word = int(packed[i // per, o]) & 0xFFFFFFFF
            assert (word >> (bits * (i % per))) & (2**bits - 1) == int(values[i, o])


def _spec_3bit_words(vals):
    """The spec's 3-bit layout, written out literally for one run of 32 values."""
    w0 = w1 = w2 = 0
    for i in range(10):
        w0 |= vals[i] << (3 * i)
    w0 |= (vals[10] & 0b11) << 30
    w1 |= (vals[10] >> 2) & 1
    for k, i in enumerate(range(11, 21)):
        w1 |= vals[i] << (1 + 3 * k)
    w1 |= (vals[21] & 1) << 31
    w2 |= (vals[21] >> 1) & 0b11
    for k, i in enumerate(range(22, 32)):
        w2 |= vals[i] << (2 + 3 * k)
    return [w0, w1, w2]


def test_3bit_layout_bit_by_bit():
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, 8, (64, 4), generator=g, dtype=torch.int32)
    values[10, 0] = 0b101  # straddles words 0 and 1
    values[21, 0] = 0b011  # straddles words 1 and 2
    packed = pack(values, 3)
    assert packed.shape == (6, 4)
    for run in range(2):
        for o in range(4):
            vals = [int(v) for v in values[run * 32 : (run + 1) * 32, o]]
            want = _spec_3bit_words(vals)
            got = [int(packed[run * 3 + k, o]) & 0xFFFFFFFF for k in range(3)]
            assert got == want


def test_symmetric_4bit_v1_zero_word():
    # Symmetric 4-bit has z = 8; v1 stores z - 1 = 7 in every nibble: 0x77777777.
    packed = pack_cols(torch.full((1, 8), 7, dtype=torch.int32), 4)
    assert int(packed[0, 0]) == 0x77777777


def test_bad_lengths_and_values():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(12, 1, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.zeros(16, 1, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.full((8, 1), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        pack(torch.zeros(8, 1, dtype=torch.int32), 5)
