"""The per-architecture contract (st.models.units): where units' entries are, and the operations on them."""

import torch

from st.models.bert import BertConfig
from st.models.units import Place, entries, put, silent_head, take, unit_mask


def test_entries_follow_groups_then_units():
    # A GLU's input|gate halves: FFN unit j is rows j and F + j (F = 4 units here).
    assert entries(Place("mlp.wi.weight", 0, 2), [1, 3], 4, 1).tolist() == [1, 3, 5, 7]
    # Fused Q|K|V with Dh = 2, 3 heads: head 1 is rows 2-3 of each block of 6.
    assert entries(Place("qkv.weight", 0, 3), [1], 3, 2).tolist() == [2, 3, 8, 9, 14, 15]


def test_take_then_put_keeps_the_units_and_zeros_the_rest():
    place = Place("qkv.weight", 0, 3)
    full = torch.randn(3 * 5 * 4, 7)  # 5 heads of Dh 4
    kept = [0, 2, 4]
    small = take(full, place, kept, 5, 4)
    assert small.shape == (3 * 3 * 4, 7)
    back = put(small, place, kept, 5, 4)
    dropped = entries(place, [1, 3], 5, 4)
    assert torch.equal(back[entries(place, kept, 5, 4)], full[entries(place, kept, 5, 4)])
    assert not back[dropped].any()
    columns = Place("out.weight", 1)
    out = torch.randn(7, 5 * 4)
    assert torch.equal(put(take(out, columns, kept, 5, 4), columns, kept, 5, 4)[:, :4], out[:, :4])


def test_unit_mask_marks_exactly_the_entries_of_kept_units():
    place = Place("qkv.weight", 0, 3)
    keep = torch.tensor([True, False, True])
    mask = unit_mask(place, keep, 2, ndim=2)
    assert mask.shape == (18, 1)
    marked = mask.squeeze(1).nonzero().squeeze(1)
    assert marked.tolist() == entries(place, [0, 2], 3, 2).tolist()
    assert unit_mask(Place("out.weight", 1), keep, 2, ndim=2).shape == (1, 6)


def test_a_head_is_silent_by_its_output_columns_or_by_value_rows_and_bias_together():
    config = BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=4)
    layout, Dh = config.units(), config.head_dim
    tensors = {
        "attention.qkv.weight": torch.randn(3 * 8, 8),
        "attention.qkv.bias": torch.randn(3 * 8),
        "attention.out.weight": torch.randn(8, 8),
    }
    assert not silent_head(layout, tensors, 0, 2, Dh)
    tensors["attention.qkv.weight"][16:20] = 0  # head 0's value rows, its value bias still there
    assert not silent_head(layout, tensors, 0, 2, Dh)
    tensors["attention.qkv.bias"][16:20] = 0
    assert silent_head(layout, tensors, 0, 2, Dh) and not silent_head(layout, tensors, 1, 2, Dh)
    tensors["attention.out.weight"][:, 4:] = 0  # head 1's output columns
    assert silent_head(layout, tensors, 1, 2, Dh)
